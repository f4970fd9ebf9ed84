// helpers of the kernel timing programs (*_perf.cpp)
#pragma once

#include "ggml.h"
#include "ggml-cpu.h"

#include <chrono>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

// the best time of a graph on nth threads: warmup computes first, then 7 runs of reps computes each;
// returns the best run's milliseconds per compute
static inline double best_graph_ms(ggml_cgraph * gf, int nth, int warmup, int reps) {
    ggml_threadpool_params tpp = ggml_threadpool_params_default(nth);
    ggml_threadpool * tp = ggml_threadpool_new(&tpp);
    ggml_cplan cp = ggml_graph_plan(gf, nth, tp);
    std::vector<uint8_t> work(cp.work_size + 1);
    cp.work_data = work.data();
    for (int r = 0; r < warmup; r++) {
        ggml_graph_compute(gf, &cp);
    }
    double best = 1e9;
    for (int t = 0; t < 7; t++) {
        const auto t0 = std::chrono::steady_clock::now();
        for (int r = 0; r < reps; r++) {
            ggml_graph_compute(gf, &cp);
        }
        const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / reps;
        if (ms < best) {
            best = ms;
        }
    }
    ggml_threadpool_free(tp);
    return best;
}

// f32 [n, h]: one softmax row per head over n cells, of weights exp(-x) for x uniform in [0, 10),
// as attention weights spread over many cells
static inline ggml_tensor * softmax_rows(ggml_context * ctx, int n, int h, std::mt19937 & rng) {
    std::uniform_real_distribution<float> ld(0, 10);
    ggml_tensor * w = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n, h);
    for (int j = 0; j < h; j++) {
        float * row = (float *) w->data + (size_t) j*n;
        double s = 0;
        for (int i = 0; i < n; i++) { row[i] = expf(-ld(rng)); s += row[i]; }
        for (int i = 0; i < n; i++) row[i] /= s;
    }
    return w;
}
