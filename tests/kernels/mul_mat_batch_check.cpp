// mul_mat of batches of small matrices (f16, f32 and q8_0 src0; LoRC's latent scores are 17-65
// matrices of 256 rows of 32-64 against the 9 query heads), on 1, 2 and 3 threads: each thread takes
// whole matrices where the batch has at least 4 per thread. Every output must be the same bits on every
// thread count and as each matrix multiplied alone (a 2-d product, whose rows the threads split), and
// near a double-precision sum over the values the kernel reads (src1 rounded to the vec_dot type).
#include "ggml.h"
#include "ggml-cpu.h"
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>
static std::vector<float> compute(ggml_context * ctx, ggml_tensor * out, int nth) {
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);
    memset(out->data, 0xff, ggml_nbytes(out));  // NaN everywhere: an unwritten element shows
    ggml_graph_compute_with_ctx(ctx, gf, nth);
    return std::vector<float>((const float *) out->data, (const float *) out->data + ggml_nelements(out));
}
int main() {
    int differ = 0, alone_differ = 0, cases = 0;
    double worst = 0.0;
    std::mt19937 rng(11);
    std::normal_distribution<float> nd(0, 1);
    for (ggml_type type : {GGML_TYPE_F16, GGML_TYPE_F32, GGML_TYPE_Q8_0}) {
      const ggml_type vdt = ggml_get_type_traits_cpu(type)->vec_dot_type;
      for (int k : {32, 64, 96}) {
        for (int m : {32, 256}) {
          for (int n : {1, 2, 9, 16}) {
            // {src0 matrices, src1 matrices per src0 matrix (broadcast), src1 batches in dim 3}
            for (auto bs : std::vector<std::array<int, 3>>{{1, 1, 1}, {3, 1, 1}, {17, 1, 1}, {65, 1, 1}, {3, 3, 1}, {4, 1, 3}}) {
              const int nb0 = bs[0], r2 = bs[1], nb3 = bs[2], nb2 = nb0*r2;
              ggml_init_params ip = { (size_t) 8*(m + n)*k*nb2*nb3*4 + (16 << 20), nullptr, false };
              ggml_context * ctx = ggml_init(ip);
              std::vector<float> af((size_t) k*m*nb0*nb3);
              for (float & v : af) v = nd(rng);
              ggml_tensor * a = ggml_new_tensor_4d(ctx, type, k, m, nb0, nb3);
              if (type == GGML_TYPE_F16) {
                ggml_fp32_to_fp16_row(af.data(), (ggml_fp16_t *) a->data, (int64_t) af.size());
              } else if (type == GGML_TYPE_F32) {
                memcpy(a->data, af.data(), af.size()*sizeof(float));
              } else {
                ggml_quantize_chunk(type, af.data(), a->data, 0, (int64_t) m*nb0*nb3, k, nullptr);
              }
              std::vector<float> ad(af.size());  // the rows as the kernel reads them
              if (type == GGML_TYPE_F32) {
                ad = af;
              } else {
                ggml_get_type_traits(type)->to_float(a->data, ad.data(), (int64_t) ad.size());
              }
              ggml_tensor * b = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, k, n, nb2, nb3);
              std::vector<float> bd((size_t) ggml_nelements(b));  // src1 as the kernel reads it
              for (int64_t i = 0; i < ggml_nelements(b); i++) ((float *) b->data)[i] = nd(rng);
              if (vdt == GGML_TYPE_F32) {
                memcpy(bd.data(), b->data, ggml_nbytes(b));
              } else if (vdt == GGML_TYPE_F16) {
                for (size_t i = 0; i < bd.size(); i++) bd[i] = ggml_fp16_to_fp32(ggml_fp32_to_fp16(((float *) b->data)[i]));
              } else {  // q8_0 / q8_1: rows quantized and read back
                std::vector<uint8_t> q(ggml_row_size(vdt, k)*(bd.size()/k));
                ggml_quantize_chunk(vdt == GGML_TYPE_Q8_1 ? GGML_TYPE_Q8_0 : vdt, (float *) b->data, q.data(), 0, (int64_t) bd.size()/k, k, nullptr);
                ggml_get_type_traits(vdt == GGML_TYPE_Q8_1 ? GGML_TYPE_Q8_0 : vdt)->to_float(q.data(), bd.data(), (int64_t) bd.size());
              }
              ggml_tensor * out = ggml_mul_mat(ctx, a, b);  // [m, n, nb2, nb3]
              std::vector<float> first;
              for (int nth : {1, 2, 3}) {
                std::vector<float> o = compute(ctx, out, nth);
                if (first.empty()) {
                  first = o;
                } else if (memcmp(first.data(), o.data(), o.size()*sizeof(float)) != 0) {
                  differ++;
                }
              }
              // each matrix alone on 2 threads (views of one src0 and one src1 matrix)
              for (int i3 = 0; i3 < nb3; i3++) {
                for (int i2 = 0; i2 < nb2; i2++) {
                  ggml_tensor * a1 = ggml_view_2d(ctx, a, k, m, a->nb[1], (i2/r2)*a->nb[2] + i3*a->nb[3]);
                  ggml_tensor * b1 = ggml_view_2d(ctx, b, k, n, b->nb[1], i2*b->nb[2] + i3*b->nb[3]);
                  std::vector<float> o = compute(ctx, ggml_mul_mat(ctx, a1, b1), 2);
                  if (memcmp(o.data(), first.data() + ((size_t) i3*nb2 + i2)*m*n, o.size()*sizeof(float)) != 0) {
                    alone_differ++;
                  }
                }
              }
              for (int i3 = 0; i3 < nb3; i3++) {
                for (int i2 = 0; i2 < nb2; i2++) {
                  for (int j = 0; j < n; j++) {
                    for (int i = 0; i < m; i++) {
                      const float * x = ad.data() + (((size_t) i3*nb0 + i2/r2)*m + i)*k;
                      const float * y = bd.data() + (((size_t) i3*nb2 + i2)*n + j)*k;
                      double sum = 0.0, mag = 0.0;
                      for (int c = 0; c < k; c++) {
                        sum += (double) x[c]*y[c];
                        mag += fabs((double) x[c]*y[c]);
                      }
                      const double got = first[(((size_t) i3*nb2 + i2)*n + j)*m + i];
                      worst = std::max(worst, std::isfinite(got) ? fabs(got - sum)/mag : INFINITY);
                    }
                  }
                }
              }
              cases++;
              ggml_free(ctx);
            }
          }
        }
      }
    }
    printf("%d mul_mat cases x 3 thread counts: %d differ between thread counts, %d matrices differ from the matrix alone, largest relative difference from double %.3g\n",
           cases, differ, alone_differ, worst);
    // f32 sums of up to 96 products of the values the kernel reads, against double, relative to the
    // sum of their magnitudes: measured 2.35e-7 at worst; 1e-5 leaves ~40x, far below a wrong or
    // unwritten matrix (another matrix's products: O(1); NaN)
    return differ != 0 || alone_differ != 0 || !(worst < 1e-5);
}
