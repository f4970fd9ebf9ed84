// time out_prod of f16 and bf16 rows against 9 dst rows, as the attended rest of selective
// reconstruction runs it: 16,384 latent value rows of 96 / 128 / 160 against the transposed view
// of 9 heads' softmax rows; best of 7 runs of 50, on the threads given (argv[1])
#include "perf_util.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

int main(int argc, char ** argv) {
    const int nth = argc > 1 ? atoi(argv[1]) : 2;
    const int n = 16384, h = 9;
    std::mt19937 rng(7); std::uniform_real_distribution<float> ud(-1, 1);
    ggml_init_params ip = { (size_t) 256 << 20, nullptr, false };
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * w = softmax_rows(ctx, n, h, rng);
    ggml_tensor * wt = ggml_transpose(ctx, w);
    for (int r : {96, 128, 160}) {
        double ms[2];
        const ggml_type types[2] = { GGML_TYPE_F16, GGML_TYPE_BF16 };
        for (int t = 0; t < 2; t++) {
            ggml_tensor * v = ggml_new_tensor_2d(ctx, types[t], r, n);
            for (int64_t i = 0; i < ggml_nelements(v); i++) {
                if (types[t] == GGML_TYPE_F16) ((ggml_fp16_t *) v->data)[i] = ggml_fp32_to_fp16(ud(rng));
                else                           ((ggml_bf16_t *) v->data)[i] = ggml_fp32_to_bf16(ud(rng));
            }
            ggml_cgraph * gf = ggml_new_graph(ctx);
            ggml_build_forward_expand(gf, ggml_out_prod(ctx, v, wt));
            ms[t] = best_graph_ms(gf, nth, 10, 50);
        }
        printf("out_prod %d x %d rows against %d dst rows, %d thread%s: f16 %.3f ms, bf16 %.3f ms\n",
               n, r, h, nth, nth == 1 ? "" : "s", ms[0], ms[1]);
    }
    ggml_free(ctx);
    return 0;
}
