// time soft_max of 9 heads x one row of 4480 (f16 mask broadcast over the heads, scale 0.125)
#include "ggml.h"
#include "ggml-cpu.h"
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>
int main(int argc, char ** argv) {
    const int nth = atoi(argv[1]);
    std::mt19937 rng(5); std::normal_distribution<float> nd(0, 4);
    ggml_init_params ip = { (size_t) 64<<20, nullptr, false };
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * a = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 4480, 1, 9);
    for (int64_t i = 0; i < ggml_nelements(a); i++) ((float *) a->data)[i] = nd(rng);
    ggml_tensor * m = ggml_new_tensor_3d(ctx, GGML_TYPE_F16, 4480, 1, 1);
    for (int64_t i = 0; i < ggml_nelements(m); i++) ((ggml_fp16_t *) m->data)[i] = ggml_fp32_to_fp16(i < 4400 ? 0.0f : -INFINITY);
    ggml_tensor * out = ggml_soft_max_ext(ctx, a, m, 0.125f, 0.0f);
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);
    ggml_threadpool_params tpp = ggml_threadpool_params_default(nth);
    ggml_threadpool * tp = ggml_threadpool_new(&tpp);
    ggml_cplan cp = ggml_graph_plan(gf, nth, tp);
    std::vector<uint8_t> work(cp.work_size + 1); cp.work_data = work.data();
    for (int r = 0; r < 200; r++) ggml_graph_compute(gf, &cp);
    double best = 1e9;
    for (int t = 0; t < 7; t++) {
        const int reps = 2000;
        auto t0 = std::chrono::steady_clock::now();
        for (int r = 0; r < reps; r++) ggml_graph_compute(gf, &cp);
        auto t1 = std::chrono::steady_clock::now();
        double us = std::chrono::duration<double, std::micro>(t1 - t0).count() / reps;
        if (us < best) best = us;
    }
    printf("soft_max 9 x 4480, %d threads: %.1f us (best of 7 runs of 2000)\n", nth, best);
    ggml_threadpool_free(tp);
}
