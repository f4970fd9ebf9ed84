// time the attended rest's product of selective reconstruction where the cache does not fit the CPU's
// caches: 32 latent value caches (as 32 layers of one decoded token) of 16,384 cells of 96 / 128 / 160
// f16 values against 9 heads' softmax rows, once as ggml_out_prod over untransposed rows (the rows
// of a cell, against a transposed view of the softmax rows) and once as ggml_mul_mat over a
// transposed cache (a row of every cell per value dim, as llama.cpp keeps dense values without flash
// attention). Each graph reads every cache once; best of 7 graphs, per layer, on the threads given
// (argv[1])
#include "perf_util.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

int main(int argc, char ** argv) {
    const int nth = argc > 1 ? atoi(argv[1]) : 2;
    const int n = 16384, h = 9, n_layer = 32;
    std::mt19937 rng(7); std::uniform_real_distribution<float> ud(-1, 1);
    for (int r : {96, 128, 160}) {
        ggml_init_params ip = { (size_t) 2*n_layer*n*r*sizeof(ggml_fp16_t) + ((size_t) 64 << 20), nullptr, false };
        ggml_context * ctx = ggml_init(ip);
        ggml_tensor * w = softmax_rows(ctx, n, h, rng);
        ggml_cgraph * g_rows  = ggml_new_graph(ctx);
        ggml_cgraph * g_trans = ggml_new_graph(ctx);
        for (int l = 0; l < n_layer; l++) {
            ggml_tensor * v  = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, r, n); // a cell's values per row
            ggml_tensor * vt = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, n, r); // every cell's value dim per row
            for (int64_t i = 0; i < ggml_nelements(v); i++) {
                ((ggml_fp16_t *) v->data)[i]  = ggml_fp32_to_fp16(ud(rng));
                ((ggml_fp16_t *) vt->data)[i] = ggml_fp32_to_fp16(ud(rng));
            }
            ggml_build_forward_expand(g_rows,  ggml_out_prod(ctx, v, ggml_transpose(ctx, w)));
            ggml_build_forward_expand(g_trans, ggml_mul_mat(ctx, vt, w));
        }
        const double ms_rows  = best_graph_ms(g_rows,  nth, 1, 1)/n_layer;
        const double ms_trans = best_graph_ms(g_trans, nth, 1, 1)/n_layer;
        printf("rest product, %d caches of %d x %d f16 against %d heads, %d thread%s, per cache: "
               "out_prod of rows %.3f ms, mul_mat of a transposed cache %.3f ms\n",
               n_layer, n, r, h, nth, nth == 1 ? "" : "s", ms_rows, ms_trans);
        ggml_free(ctx);
    }
    return 0;
}
