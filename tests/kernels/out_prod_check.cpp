// out_prod of f16, q8_0, q4_0 and bf16 rows against f32 weights (plain and a transposed view), few dst
// rows against long sums (the path that splits the row elements over the threads; bf16 rows in pairs
// with bf16 dot products where the CPU has them) and shapes that take the row-split path, on 1, 2 and
// 3 threads: the outputs must be the same bits on every thread count and near a double-precision sum
// over the dequantized rows (bf16 rows: against the weights rounded to bf16, as the op takes them).
// Prints the largest difference relative to the sum of the terms' magnitudes.
#include "ggml.h"
#include "ggml-cpu.h"
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>
int main() {
    int differ = 0, cases = 0;
    double worst = 0.0;
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0, 1);
    for (ggml_type type : {GGML_TYPE_F16, GGML_TYPE_Q8_0, GGML_TYPE_Q4_0, GGML_TYPE_BF16}) {
      for (int ne0 : {32, 96, 100, 160, 608}) {
        if (ne0 % ggml_blck_size(type) != 0) continue;
        for (int n : {1, 4, 9, 32, 40}) {           // 40 dst rows: the row-split path
          for (int k : {3, 128, 1000, 4096}) {      // 3 rows: the row-split path
            for (int trans : {0, 1}) {
              ggml_init_params ip = { (size_t) 4*(ne0 + n)*k*4 + (size_t) 4*ne0*n*4 + (16 << 20), nullptr, false };
              ggml_context * ctx = ggml_init(ip);
              std::vector<float> af((size_t) ne0*k);
              for (float & v : af) v = nd(rng);
              ggml_tensor * a = ggml_new_tensor_2d(ctx, type, ne0, k);
              if (type == GGML_TYPE_F16) {
                ggml_fp32_to_fp16_row(af.data(), (ggml_fp16_t *) a->data, (int64_t) ne0*k);
              } else if (type == GGML_TYPE_BF16) {
                ggml_fp32_to_bf16_row(af.data(), (ggml_bf16_t *) a->data, (int64_t) ne0*k);
              } else {
                ggml_quantize_chunk(type, af.data(), a->data, 0, k, ne0, nullptr);
              }
              std::vector<float> ad((size_t) ne0*k);  // the rows as the kernel reads them
              ggml_get_type_traits(type)->to_float(a->data, ad.data(), (int64_t) ne0*k);
              ggml_tensor * b = nullptr;
              if (trans) {
                ggml_tensor * bt = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, k, n);  // softmax rows [k, n]
                b = ggml_transpose(ctx, bt);                                      // [n, k] view
                for (int64_t i = 0; i < ggml_nelements(bt); i++) ((float *) bt->data)[i] = nd(rng);
              } else {
                b = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n, k);
                for (int64_t i = 0; i < ggml_nelements(b); i++) ((float *) b->data)[i] = nd(rng);
              }
              ggml_tensor * out = ggml_out_prod(ctx, a, b);  // [ne0, n]
              ggml_cgraph * gf = ggml_new_graph(ctx);
              ggml_build_forward_expand(gf, out);
              std::vector<float> first;
              for (int nth : {1, 2, 3}) {
                memset(out->data, 0xff, ggml_nbytes(out));  // NaN everywhere: an unwritten element shows
                ggml_graph_compute_with_ctx(ctx, gf, nth);
                const float * o = (const float *) out->data;
                if (first.empty()) {
                  first.assign(o, o + ggml_nelements(out));
                } else if (memcmp(first.data(), o, ggml_nbytes(out)) != 0) {
                  differ++;
                }
              }
              for (int j = 0; j < n; j++) {
                for (int i = 0; i < ne0; i++) {
                  double sum = 0.0, mag = 0.0;
                  for (int c = 0; c < k; c++) {
                    float w = *(const float *) ((const char *) b->data + j*b->nb[0] + c*b->nb[1]);
                    if (type == GGML_TYPE_BF16) {
                      w = ggml_bf16_to_fp32(ggml_fp32_to_bf16(w));
                    }
                    sum += (double) ad[(size_t) c*ne0 + i]*w;
                    mag += fabs((double) ad[(size_t) c*ne0 + i]*w);
                  }
                  const double got = first[(size_t) j*ne0 + i];
                  const double e = std::isfinite(got) ? fabs(got - sum)/mag : INFINITY;
                  worst = std::max(worst, e);
                }
              }
              cases++;
              ggml_free(ctx);
            }
          }
        }
      }
    }
    printf("%d out_prod cases x 3 thread counts: %d differ between thread counts, largest relative difference from double %.3g\n",
           cases, differ, worst);
    // f32 sums of up to 4,096 products against double, relative to the sum of their magnitudes:
    // measured 2.9e-7 at worst; 1e-5 leaves ~30x, far below a skipped or doubled row's error (~1/sqrt(k)
    // of the magnitude, >= 0.016) or a slice converted from the wrong offset (0.85, and 264 of the 520
    // cases differing between thread counts)
    return differ != 0 || !(worst < 1e-5);
}
