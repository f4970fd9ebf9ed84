// time ggml_top_k (1 thread) on 30 rows of n with k = 64 against the kernel before (nth_element over
// every index) on the same rows: random normal values, then rising values (the best at the end)
#include "ggml.h"
#include "ggml-cpu.h"
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>
struct cmp { const float * d; bool operator()(int a, int b) const { return d[a] > d[b]; } };
int main() {
    std::mt19937 rng(3);
    std::normal_distribution<float> nd(0, 1);
    for (int rising : {0, 1})
    for (int n : {4096, 16384}) {
        const int k = 64, nr = 30, reps = 2000;
        ggml_init_params ip = { (size_t) 16*n*nr + (64<<20), nullptr, false };
        ggml_context * ctx = ggml_init(ip);
        ggml_tensor * a = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n, nr);
        float * x = (float *) a->data;
        for (size_t i = 0; i < (size_t) n*nr; i++) x[i] = rising ? (float)(i % n) : nd(rng);
        ggml_tensor * t = ggml_top_k(ctx, a, k);
        ggml_cgraph * gf = ggml_new_graph(ctx);
        ggml_build_forward_expand(gf, t);
        ggml_threadpool_params tpp = ggml_threadpool_params_default(1);
        ggml_threadpool * tp = ggml_threadpool_new(&tpp);
        ggml_cplan cp = ggml_graph_plan(gf, 1, tp);
        std::vector<uint8_t> work(cp.work_size + 1);
        cp.work_data = work.data();
        ggml_graph_compute(gf, &cp);
        auto t0 = std::chrono::steady_clock::now();
        for (int r = 0; r < reps; r++) ggml_graph_compute(gf, &cp);
        auto t1 = std::chrono::steady_clock::now();
        std::vector<int> tmp(n);
        int sink = 0;
        auto t2 = std::chrono::steady_clock::now();
        for (int r = 0; r < reps; r++) for (int row = 0; row < nr; row++) {
            const float * d = x + (size_t) row*n;
            for (int j = 0; j < n; j++) tmp[j] = j;
            std::nth_element(tmp.begin(), tmp.begin() + k - 1, tmp.end(), cmp{d});
            sink += tmp[0];
        }
        auto t3 = std::chrono::steady_clock::now();
        double us_new = std::chrono::duration<double, std::micro>(t1 - t0).count() / reps / nr;
        double us_old = std::chrono::duration<double, std::micro>(t3 - t2).count() / reps / nr;
        printf("n=%d k=%d %s rows: nth_element %.1f us/row, filtered (ggml_top_k) %.1f us/row (%d)\n", n, k, rising ? "rising" : "random", us_old, us_new, sink & 1);
        ggml_threadpool_free(tp);
        ggml_free(ctx);
    }
}
