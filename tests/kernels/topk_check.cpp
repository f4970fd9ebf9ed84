// ggml_top_k on the CPU against a full sort: the k selected values must be the k largest (as a
// multiset), with no repeated index, on random, rising, falling, tied and masked rows.
#include "ggml.h"
#include "ggml-cpu.h"
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

int main(int argc, char ** argv) {
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0, 2);
    int bad = 0, rows = 0;
    for (int n : {65, 257, 1000, 4096, 4480, 16384}) {
        for (int k : {1, 2, 16, 64, 100, 256}) {
            if (k > n) continue;
            const int nr = 12;
            ggml_init_params ip = { (size_t) 64*n*nr + (64<<20), nullptr, false };
            ggml_context * ctx = ggml_init(ip);
            ggml_tensor * a = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n, nr);
            float * x = (float *) a->data;
            for (int r = 0; r < nr; r++) {
                float * row = x + (size_t) r*n;
                const int kind = r % 6;
                for (int i = 0; i < n; i++) {
                    switch (kind) {
                        case 0: row[i] = nd(rng); break;
                        case 1: row[i] = (float) i; break;                       // rising: the best at the end
                        case 2: row[i] = (float) -i; break;                      // falling: the best at the start
                        case 3: row[i] = (float) (rng() % 5); break;             // ties
                        case 4: row[i] = (rng() % 4 == 0) ? nd(rng) : -INFINITY; break; // mostly masked
                        case 5: row[i] = (i % 7 == 0) ? -INFINITY : nd(rng) + 0.001f*i; break;
                    }
                }
            }
            ggml_tensor * t = ggml_top_k(ctx, a, k);
            ggml_cgraph * gf = ggml_new_graph(ctx);
            ggml_build_forward_expand(gf, t);
            ggml_graph_compute_with_ctx(ctx, gf, 2);
            const int32_t * idx = (const int32_t *) t->data;
            for (int r = 0; r < nr; r++) {
                const float * row = x + (size_t) r*n;
                std::vector<float> ref(row, row + n);
                std::sort(ref.begin(), ref.end(), std::greater<float>());
                std::vector<float> got;
                std::vector<int> ids(idx + (size_t) r*k, idx + (size_t) r*k + k);
                bool ok = true;
                for (int id : ids) { if (id < 0 || id >= n) { ok = false; break; } got.push_back(row[id]); }
                if (ok) {
                    std::sort(got.begin(), got.end(), std::greater<float>());
                    for (int i = 0; i < k; i++) if (!(got[i] == ref[i])) ok = false;
                    std::sort(ids.begin(), ids.end());
                    if (std::adjacent_find(ids.begin(), ids.end()) != ids.end()) ok = false;
                }
                rows++;
                if (!ok) { bad++; if (bad < 5) printf("bad: n=%d k=%d kind=%d\n", n, k, r % 6); }
            }
            ggml_free(ctx);
        }
    }
    printf("%d rows, %d bad\n", rows, bad);
    return bad != 0;
}
