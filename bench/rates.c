/* What one core of this machine does per element, without normcore: a float32 add and the
 * column moments of an (A, 1024) float32 array with shifted sums in double (normcore's
 * arithmetic) and in float32, AVX-512, the best of a few thousand passes.
 *
 *     gcc -O3 -mavx512f -mfma bench/rates.c -o /tmp/rates && /tmp/rates 256
 *
 * Compare with the kernels' own rates (bench/RESULTS.md, "Where the (256, 1024) time goes"):
 * a pass that matches these is bound by the machine, not by its code. */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define C 1024

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char** argv) {
    const long A = argc > 1 ? atol(argv[1]) : 256, n = A * C;
    const int reps = 2000;
    float* x = aligned_alloc(64, n * 4);
    float* y = aligned_alloc(64, n * 4);
    float* z = aligned_alloc(64, n * 4);
    static double s1[C], s2[C];
    static float f1[C], f2[C];
    for (long i = 0; i < n; i++) {
        x[i] = (float)(i % 7);
        y[i] = (float)(i % 5);
    }
    double t0 = now();
    for (int r = 0; r < reps; r++) {
        for (long i = 0; i < n; i += 16)
            _mm512_store_ps(z + i, _mm512_add_ps(_mm512_load_ps(x + i), _mm512_load_ps(y + i)));
        __asm__ volatile("" ::"r"(z) : "memory");
    }
    printf("float32 add:                 %.0f ns per 1000 elements\n", (now() - t0) / reps / n * 1e12);
    t0 = now();
    for (int r = 0; r < reps; r++) {
        for (int c = 0; c < C; c++) s1[c] = s2[c] = 0.0;
        for (long a = 1; a < A; a++)
            for (int c = 0; c < C; c += 8) {
                __m512d d = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_load_ps(x + a * C + c)),
                                          _mm512_cvtps_pd(_mm256_load_ps(x + c)));
                _mm512_storeu_pd(s1 + c, _mm512_add_pd(_mm512_loadu_pd(s1 + c), d));
                _mm512_storeu_pd(s2 + c, _mm512_fmadd_pd(d, d, _mm512_loadu_pd(s2 + c)));
            }
        __asm__ volatile("" ::"r"(s1), "r"(s2) : "memory");
    }
    printf("column moments, in double:   %.0f ns per 1000 elements\n", (now() - t0) / reps / n * 1e12);
    t0 = now();
    for (int r = 0; r < reps; r++) {
        for (int c = 0; c < C; c++) f1[c] = f2[c] = 0.0f;
        for (long a = 1; a < A; a++)
            for (int c = 0; c < C; c += 16) {
                __m512 d = _mm512_sub_ps(_mm512_load_ps(x + a * C + c), _mm512_load_ps(x + c));
                _mm512_storeu_ps(f1 + c, _mm512_add_ps(_mm512_loadu_ps(f1 + c), d));
                _mm512_storeu_ps(f2 + c, _mm512_fmadd_ps(d, d, _mm512_loadu_ps(f2 + c)));
            }
        __asm__ volatile("" ::"r"(f1), "r"(f2) : "memory");
    }
    printf("column moments, in float32: %.0f ns per 1000 elements\n", (now() - t0) / reps / n * 1e12);
    return 0;
}
