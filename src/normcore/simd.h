/* Vector-typed inner loops the Cython kernels call where GCC's auto-vectorizer gives up
 * (a loop carrying two accumulators). GCC/Clang vector extensions: elementwise IEEE
 * operations, lowered to SSE2 in the baseline build and to AVX in the AVX2 build, with the
 * same results (no contraction into FMA: the AVX2 build uses -ffp-contract=off). */
#ifndef NORMCORE_SIMD_H
#define NORMCORE_SIMD_H

#include <stddef.h>
#include <string.h>

typedef double nc_v4d __attribute__((vector_size(32)));
typedef float nc_v4f __attribute__((vector_size(16)));

/* The 8 lanes of a and b added in a fixed order. (Macros, not functions: no vector ever
 * crosses a call, so the baseline build's ABI is never involved.) */
#define NC_TOTAL(a, b) (((a[0] + a[1]) + (a[2] + a[3])) + ((b[0] + b[1]) + (b[2] + b[3])))

/* dst = 4 elements at p, converted to double */
#define NC_LOAD4_float(dst, p)                   \
    do {                                         \
        nc_v4f v_;                               \
        memcpy(&v_, (p), sizeof v_);             \
        dst = __builtin_convertvector(v_, nc_v4d); \
    } while (0)
#define NC_LOAD4_double(dst, p) memcpy(&dst, (p), sizeof dst)

/* Sums of d = p[i] - k and d * d over n elements, 8 lanes then the tail in order. With k a
 * member of the data, sum d^2 <= (n + 1) * m2, so m2 = sum d^2 - (sum d)^2 / n loses at most
 * log2(n + 1) bits of double. */
#define NC_SHIFTED_SUMS(NAME, T)                                                          \
    static inline void NAME(const T* p, ptrdiff_t n, double k, double* s1, double* s2) {   \
        const nc_v4d kk = {k, k, k, k};                                                    \
        nc_v4d a1 = {0, 0, 0, 0}, b1 = a1, a2 = a1, b2 = a1, d0, d1;                       \
        ptrdiff_t i = 0;                                                                   \
        for (; i + 8 <= n; i += 8) {                                                       \
            NC_LOAD4_##T(d0, p + i);                                                       \
            NC_LOAD4_##T(d1, p + i + 4);                                                   \
            d0 -= kk;                                                                      \
            d1 -= kk;                                                                      \
            a1 += d0;                                                                      \
            b1 += d1;                                                                      \
            a2 += d0 * d0;                                                                 \
            b2 += d1 * d1;                                                                 \
        }                                                                                  \
        double t1 = NC_TOTAL(a1, b1), t2 = NC_TOTAL(a2, b2);                               \
        for (; i < n; ++i) {                                                               \
            const double d = (double)p[i] - k;                                             \
            t1 += d;                                                                       \
            t2 += d * d;                                                                   \
        }                                                                                  \
        *s1 = t1;                                                                          \
        *s2 = t2;                                                                          \
    }

NC_SHIFTED_SUMS(nc_shifted_sums_f32, float)
NC_SHIFTED_SUMS(nc_shifted_sums_f64, double)

/* s1 = sum dy[i] * w[i], s2 = sum dy[i] * w[i] * (x[i] - mu): the backward's two row sums
 * in one pass; w = NULL means w = 1. 8 lanes, then the tail in order. */
#define NC_DY_SUMS(NAME, T)                                                                  \
    static inline void NAME(const T* dy, const double* w, const T* x, ptrdiff_t n, double mu, \
                            double* s1, double* s2) {                                         \
        const nc_v4d mm = {mu, mu, mu, mu};                                                   \
        nc_v4d a1 = {0, 0, 0, 0}, b1 = a1, a2 = a1, b2 = a1, g0, g1, x0, x1, w0, w1;          \
        ptrdiff_t i = 0;                                                                      \
        for (; i + 8 <= n; i += 8) {                                                          \
            NC_LOAD4_##T(g0, dy + i);                                                         \
            NC_LOAD4_##T(g1, dy + i + 4);                                                     \
            if (w) {                                                                          \
                NC_LOAD4_double(w0, w + i);                                                   \
                NC_LOAD4_double(w1, w + i + 4);                                               \
                g0 *= w0;                                                                     \
                g1 *= w1;                                                                     \
            }                                                                                 \
            NC_LOAD4_##T(x0, x + i);                                                          \
            NC_LOAD4_##T(x1, x + i + 4);                                                      \
            a1 += g0;                                                                         \
            b1 += g1;                                                                         \
            a2 += g0 * (x0 - mm);                                                             \
            b2 += g1 * (x1 - mm);                                                             \
        }                                                                                     \
        double t1 = NC_TOTAL(a1, b1), t2 = NC_TOTAL(a2, b2);                                  \
        for (; i < n; ++i) {                                                                  \
            const double g = w ? (double)dy[i] * w[i] : (double)dy[i];                        \
            t1 += g;                                                                          \
            t2 += g * ((double)x[i] - mu);                                                    \
        }                                                                                     \
        *s1 = t1;                                                                             \
        *s2 = t2;                                                                             \
    }

NC_DY_SUMS(nc_dy_sums_f32, float)
NC_DY_SUMS(nc_dy_sums_f64, double)

/* y = (x - mean[c]) * scale[c] + shift[c] on a (rows, tw) tile with row stride ld: four
 * rows per sweep share each coefficient load (wide tiles keep their coefficients in L2,
 * not L1). Same per-element operations as the scalar form. */
#define NC_STORE4_float(p, v)                          \
    do {                                               \
        nc_v4f s_ = __builtin_convertvector(v, nc_v4f); \
        memcpy((p), &s_, sizeof s_);                   \
    } while (0)
#define NC_STORE4_double(p, v) memcpy((p), &(v), sizeof(v))

#define NC_AFFINE_TILE(NAME, T)                                                                \
    static inline void NAME(const T* x, T* y, ptrdiff_t rows, ptrdiff_t ld, ptrdiff_t tw,       \
                            const double* mean, const double* scale, const double* shift) {     \
        ptrdiff_t a = 0, c;                                                                    \
        nc_v4d m, s, t, v;                                                                     \
        for (; a + 4 <= rows; a += 4) {                                                        \
            for (c = 0; c + 4 <= tw; c += 4) {                                                 \
                NC_LOAD4_double(m, mean + c);                                                  \
                NC_LOAD4_double(s, scale + c);                                                 \
                NC_LOAD4_double(t, shift + c);                                                 \
                for (int j = 0; j < 4; ++j) {                                                  \
                    NC_LOAD4_##T(v, x + (a + j) * ld + c);                                     \
                    v = (v - m) * s + t;                                                       \
                    NC_STORE4_##T(y + (a + j) * ld + c, v);                                    \
                }                                                                              \
            }                                                                                  \
            for (; c < tw; ++c)                                                                \
                for (int j = 0; j < 4; ++j)                                                    \
                    y[(a + j) * ld + c] = (T)(((double)x[(a + j) * ld + c] - mean[c]) * scale[c] + shift[c]); \
        }                                                                                      \
        for (; a < rows; ++a)                                                                  \
            for (c = 0; c < tw; ++c)                                                           \
                y[a * ld + c] = (T)(((double)x[a * ld + c] - mean[c]) * scale[c] + shift[c]);  \
    }

NC_AFFINE_TILE(nc_affine_tile_f32, float)
NC_AFFINE_TILE(nc_affine_tile_f64, double)

/* dx = dy * k1[c] + (x - mean[c]) * k2[c] + k3[c] on a (rows, tw) tile, two rows per
 * coefficient load: with four, the twelve streams of a power-of-two row stride map to the
 * same L1 sets and evict each other (measured slower at 4096 columns). */
#define NC_DX_TILE(NAME, T)                                                                     \
    static inline void NAME(const T* dy, const T* x, T* dx, ptrdiff_t rows, ptrdiff_t ld,        \
                            ptrdiff_t tw, const double* mean, const double* k1, const double* k2, \
                            const double* k3) {                                                  \
        ptrdiff_t a = 0, c;                                                                     \
        nc_v4d m, a1, a2, a3, g, v;                                                             \
        for (; a + 2 <= rows; a += 2) {                                                         \
            for (c = 0; c + 4 <= tw; c += 4) {                                                  \
                NC_LOAD4_double(m, mean + c);                                                   \
                NC_LOAD4_double(a1, k1 + c);                                                    \
                NC_LOAD4_double(a2, k2 + c);                                                    \
                NC_LOAD4_double(a3, k3 + c);                                                    \
                for (int j = 0; j < 2; ++j) {                                                   \
                    NC_LOAD4_##T(g, dy + (a + j) * ld + c);                                     \
                    NC_LOAD4_##T(v, x + (a + j) * ld + c);                                      \
                    v = g * a1 + (v - m) * a2 + a3;                                             \
                    NC_STORE4_##T(dx + (a + j) * ld + c, v);                                    \
                }                                                                               \
            }                                                                                   \
            for (; c < tw; ++c)                                                                 \
                for (int j = 0; j < 2; ++j) {                                                   \
                    const ptrdiff_t o = (a + j) * ld + c;                                       \
                    dx[o] = (T)((double)dy[o] * k1[c] + ((double)x[o] - mean[c]) * k2[c] + k3[c]); \
                }                                                                               \
        }                                                                                       \
        for (; a < rows; ++a)                                                                   \
            for (c = 0; c < tw; ++c) {                                                          \
                const ptrdiff_t o = a * ld + c;                                                 \
                dx[o] = (T)((double)dy[o] * k1[c] + ((double)x[o] - mean[c]) * k2[c] + k3[c]);  \
            }                                                                                   \
    }

NC_DX_TILE(nc_dx_tile_f32, float)
NC_DX_TILE(nc_dx_tile_f64, double)

/* Column accumulations on a (rows, tw) tile with row stride ld, several rows per load and
 * store of the accumulators (wide tiles keep them in L2). Each column still adds its rows
 * one by one, in row order: the same sums as one row at a time.
 * NC_COL_SHIFTED_SUMS: s1[c] += d, s2[c] += d * d with d = x[r, c] - x[0, c], rows 1.. */
#define NC_COL_SHIFTED_SUMS(NAME, T)                                                           \
    static inline void NAME(const T* x, ptrdiff_t rows, ptrdiff_t ld, ptrdiff_t tw,            \
                            double* s1, double* s2) {                                          \
        ptrdiff_t r = 1, c;                                                                    \
        nc_v4d k, a, b, d;                                                                     \
        for (; r + 4 <= rows; r += 4) {                                                        \
            for (c = 0; c + 4 <= tw; c += 4) {                                                 \
                NC_LOAD4_##T(k, x + c);                                                        \
                NC_LOAD4_double(a, s1 + c);                                                    \
                NC_LOAD4_double(b, s2 + c);                                                    \
                for (int j = 0; j < 4; ++j) {                                                  \
                    NC_LOAD4_##T(d, x + (r + j) * ld + c);                                     \
                    d -= k;                                                                    \
                    a += d;                                                                    \
                    b += d * d;                                                                \
                }                                                                              \
                NC_STORE4_double(s1 + c, a);                                                   \
                NC_STORE4_double(s2 + c, b);                                                   \
            }                                                                                  \
            for (; c < tw; ++c)                                                                \
                for (int j = 0; j < 4; ++j) {                                                  \
                    const double e = (double)x[(r + j) * ld + c] - (double)x[c];               \
                    s1[c] += e;                                                                \
                    s2[c] += e * e;                                                            \
                }                                                                              \
        }                                                                                      \
        for (; r < rows; ++r)                                                                  \
            for (c = 0; c < tw; ++c) {                                                         \
                const double e = (double)x[r * ld + c] - (double)x[c];                         \
                s1[c] += e;                                                                    \
                s2[c] += e * e;                                                                \
            }                                                                                  \
    }

/* NC_COL_DY_SUMS: s1[c] += dy[r, c], s2[c] += dy[r, c] * (x[r, c] - mean[c]), two rows per
 * sweep (more would put too many power-of-two-strided streams in one L1 set). */
#define NC_COL_DY_SUMS(NAME, T)                                                                \
    static inline void NAME(const T* dy, const T* x, ptrdiff_t rows, ptrdiff_t ld, ptrdiff_t tw,\
                            const double* mean, double* s1, double* s2) {                      \
        ptrdiff_t r = 0, c;                                                                    \
        nc_v4d m, a, b, g, v;                                                                  \
        for (; r + 2 <= rows; r += 2) {                                                        \
            for (c = 0; c + 4 <= tw; c += 4) {                                                 \
                NC_LOAD4_double(m, mean + c);                                                  \
                NC_LOAD4_double(a, s1 + c);                                                    \
                NC_LOAD4_double(b, s2 + c);                                                    \
                for (int j = 0; j < 2; ++j) {                                                  \
                    NC_LOAD4_##T(g, dy + (r + j) * ld + c);                                    \
                    NC_LOAD4_##T(v, x + (r + j) * ld + c);                                     \
                    a += g;                                                                    \
                    b += g * (v - m);                                                          \
                }                                                                              \
                NC_STORE4_double(s1 + c, a);                                                   \
                NC_STORE4_double(s2 + c, b);                                                   \
            }                                                                                  \
            for (; c < tw; ++c)                                                                \
                for (int j = 0; j < 2; ++j) {                                                  \
                    const ptrdiff_t o = (r + j) * ld + c;                                      \
                    s1[c] += (double)dy[o];                                                    \
                    s2[c] += (double)dy[o] * ((double)x[o] - mean[c]);                         \
                }                                                                              \
        }                                                                                      \
        for (; r < rows; ++r)                                                                  \
            for (c = 0; c < tw; ++c) {                                                         \
                const ptrdiff_t o = r * ld + c;                                                \
                s1[c] += (double)dy[o];                                                        \
                s2[c] += (double)dy[o] * ((double)x[o] - mean[c]);                             \
            }                                                                                  \
    }

NC_COL_SHIFTED_SUMS(nc_col_shifted_sums_f32, float)
NC_COL_SHIFTED_SUMS(nc_col_shifted_sums_f64, double)
NC_COL_DY_SUMS(nc_col_dy_sums_f32, float)
NC_COL_DY_SUMS(nc_col_dy_sums_f64, double)

#endif
