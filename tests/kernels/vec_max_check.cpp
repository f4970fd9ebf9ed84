// ggml_vec_max_f32 against the scalar loop, every length 0..600, random/-inf/ties/rising/falling
#include "vec.h"
#include <cstdio>
#include <random>
#include <cmath>
#include <vector>
int main() {
    std::mt19937 rng(1);
    std::normal_distribution<float> nd(0, 3);
    int bad = 0, n_cases = 0;
    for (int n = 0; n <= 600; n++) {
        for (int kind = 0; kind < 6; kind++) {
            std::vector<float> x(n + 1);
            for (int i = 0; i < n; i++) {
                switch (kind) {
                    case 0: x[i] = nd(rng); break;
                    case 1: x[i] = (rng() % 3 == 0) ? -INFINITY : nd(rng); break;
                    case 2: x[i] = (float)(rng() % 4); break;
                    case 3: x[i] = (float) i; break;
                    case 4: x[i] = (float) -i; break;
                    case 5: x[i] = -INFINITY; break;
                }
            }
            float ref = -INFINITY;
            for (int i = 0; i < n; i++) ref = ref > x[i] ? ref : x[i];
            float got;
            ggml_vec_max_f32(n, &got, x.data());
            n_cases++;
            if (!(got == ref || (std::isinf(got) && std::isinf(ref) && got == ref))) { bad++; if (bad < 5) printf("n=%d kind=%d ref=%g got=%g\n", n, kind, ref, got); }
        }
    }
    printf("%d cases, %d differ\n", n_cases, bad);
    return bad != 0;
}
