// time soft_max of 9 heads x one row of 4480 (f16 mask broadcast over the heads, scale 0.125)
#include "perf_util.h"

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
    const double best = best_graph_ms(gf, nth, 200, 2000)*1e3; // us
    printf("soft_max 9 x 4480, %d threads: %.1f us (best of 7 runs of 2000)\n", nth, best);
}
