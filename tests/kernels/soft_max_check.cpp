// soft_max over many shapes (one row per head, masks per head and broadcast, f32/f16, sinks, ALiBi,
// row lengths around the vector widths) on 1, 2 and 3 threads: the outputs must be the same bits on
// every thread count, and near a double-precision softmax of the same inputs. With an argument, also
// writes every output to that file (to compare two builds byte for byte).
#include "ggml.h"
#include "ggml-cpu.h"
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>
int main(int argc, char ** argv) {
    FILE * f = argc > 1 ? fopen(argv[1], "wb") : nullptr;
    int differ = 0;
    double worst = 0.0;
    std::mt19937 rng(11);
    std::normal_distribution<float> nd(0, 4);
    int cases = 0;
    for (int ne0 : {1, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 1000, 4480}) {
      for (int ne1 : {1, 3}) {
        for (int heads : {1, 9}) {
          for (int mask : {0, 1, 2}) {          // none, f32, f16
            for (int bcast : {0, 1}) {           // mask per head or one for all heads
              for (int sinks : {0, 1}) {
                for (float max_bias : {0.0f, 8.0f}) {
                  if (mask == 0 && (bcast || max_bias > 0)) continue;
                  ggml_init_params ip = { (size_t) 64*ne0*ne1*heads*4 + (16<<20), nullptr, false };
                  ggml_context * ctx = ggml_init(ip);
                  ggml_tensor * a = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, ne0, ne1, heads);
                  for (int64_t i = 0; i < ggml_nelements(a); i++) ((float *) a->data)[i] = nd(rng);
                  ggml_tensor * m = nullptr;
                  if (mask) {
                    m = ggml_new_tensor_3d(ctx, mask == 1 ? GGML_TYPE_F32 : GGML_TYPE_F16, ne0, ne1, bcast ? 1 : heads);
                    for (int64_t i = 0; i < ggml_nelements(m); i++) {
                      float v = (rng() % 5 == 0) ? -INFINITY : (float)(rng() % 3) - 1.0f;
                      if (i % ne0 == 0) v = 0.0f;
                      if (mask == 1) ((float *) m->data)[i] = v; else ((ggml_fp16_t *) m->data)[i] = ggml_fp32_to_fp16(v);
                    }
                  }
                  ggml_tensor * out = ggml_soft_max_ext(ctx, a, m, 0.125f, max_bias);
                  if (sinks) {
                    ggml_tensor * s = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, heads);
                    for (int h = 0; h < heads; h++) ((float *) s->data)[h] = nd(rng);
                    ggml_soft_max_add_sinks(out, s);
                  }
                  ggml_cgraph * gf = ggml_new_graph(ctx);
                  ggml_build_forward_expand(gf, out);
                  std::vector<float> first;
                  for (int nth : {1, 2, 3}) {
                    memset(out->data, 0, ggml_nbytes(out));
                    ggml_graph_compute_with_ctx(ctx, gf, nth);
                    if (f) fwrite(out->data, 1, ggml_nbytes(out), f);
                    const float * o = (const float *) out->data;
                    if (first.empty()) {
                      first.assign(o, o + ggml_nelements(out));
                    } else if (memcmp(first.data(), o, ggml_nbytes(out)) != 0) {
                      differ++;
                    }
                  }
                  // the reference: softmax(scale*a + slope*mask) with the sink's logit in the sum
                  const float * x = (const float *) a->data;
                  const uint32_t n_head_log2 = 1u << (uint32_t) floor(log2(heads));
                  const double m0 = pow(2.0, -(max_bias) / n_head_log2), m1 = pow(2.0, -(max_bias / 2.0) / n_head_log2);
                  for (int h = 0; h < heads; h++) {
                    const double slope = max_bias > 0 ? (h < (int) n_head_log2 ? pow(m0, h + 1) : pow(m1, 2*(h - n_head_log2) + 1)) : 1.0;
                    for (int r = 0; r < ne1; r++) {
                      std::vector<double> l(ne0);
                      double mx = -INFINITY;
                      for (int i = 0; i < ne0; i++) {
                        double v = 0.125*x[((size_t) h*ne1 + r)*ne0 + i];
                        if (m) {
                          const size_t mi = ((size_t) (bcast ? 0 : h)*ne1 + r)*ne0 + i;
                          v += slope*(mask == 1 ? ((float *) m->data)[mi] : ggml_fp16_to_fp32(((ggml_fp16_t *) m->data)[mi]));
                        }
                        l[i] = v; mx = std::max(mx, v);
                      }
                      const double sink = sinks ? (double) ((float *) out->src[2]->data)[h] : -INFINITY;
                      mx = std::max(mx, sink);
                      double sum = sinks ? exp(sink - mx) : 0.0;
                      for (int i = 0; i < ne0; i++) sum += exp(l[i] - mx);
                      for (int i = 0; i < ne0; i++) {
                        const double ref = exp(l[i] - mx)/sum;
                        worst = std::max(worst, fabs(ref - first[((size_t) h*ne1 + r)*ne0 + i]));
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
      }
    }
    if (f) fclose(f);
    printf("%d soft_max cases x 3 thread counts: %d differ between thread counts, largest difference from double %.3g\n", cases, differ, worst);
    // f32 probabilities (at most 1) against double: a few units in the last place of 0.5 (6e-8) were
    // measured as the largest difference (7e-8); 1e-6 leaves ~14x, well under a skipped or
    // doubled row's error (the row's weights, up to 1)
    return differ != 0 || !(worst < 1e-6);
}
