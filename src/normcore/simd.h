/* Vector-typed inner loops the Cython kernels call where GCC's auto-vectorizer gives up
 * (a loop carrying two accumulators) or where the arithmetic is float32. GCC/Clang vector
 * extensions, lowered to SSE2 in the baseline build, to AVX2 and to AVX-512 in theirs.
 * No build contracts a multiply and an add on its own (-ffp-contract=off): where a kernel
 * fuses, it says so (NC_VFMA), and only builds with FMA fuse; so a build's results never
 * depend on the compiler's choices, and builds differ only where their vector width or
 * FMA does (within the float32 accuracy contract, README "Numerics"). */
#ifndef NORMCORE_SIMD_H
#define NORMCORE_SIMD_H

#include <stddef.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#if defined(__FMA__) || defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

/* Reductions accumulate in double, NC_DL lanes per vector, NC_ACC vectors per step. */
#if defined(__AVX512F__)
#define NC_DL 8
#else
#define NC_DL 4
#endif
typedef double nc_v4d __attribute__((vector_size(NC_DL * 8)));
typedef float nc_v4f __attribute__((vector_size(NC_DL * 4)));

/* The 2 * NC_DL lanes of a and b added in a fixed order. (Macros, not functions: no vector
 * ever crosses a call, so the baseline build's ABI is never involved.) */
#if NC_DL == 8
#define NC_LANES(a) ((((a)[0] + (a)[1]) + ((a)[2] + (a)[3])) + (((a)[4] + (a)[5]) + ((a)[6] + (a)[7])))
#else
#define NC_LANES(a) (((a)[0] + (a)[1]) + ((a)[2] + (a)[3]))
#endif
#define NC_TOTAL(a, b) (NC_LANES(a) + NC_LANES(b))

/* float32 elementwise passes: NC_FL float lanes, fused multiply-adds where the build has FMA. */
#if defined(__AVX512F__)
#define NC_FL 16
#define NC_VFMA(a, b, c) ((nc_vf)_mm512_fmadd_ps((__m512)(a), (__m512)(b), (__m512)(c)))
#elif defined(__FMA__)
#define NC_FL 8
#define NC_VFMA(a, b, c) ((nc_vf)_mm256_fmadd_ps((__m256)(a), (__m256)(b), (__m256)(c)))
#else
#define NC_FL 4
#define NC_VFMA(a, b, c) ((a) * (b) + (c))
#endif
#if defined(__FMA__)
#define NC_FMAF(a, b, c) __builtin_fmaf((a), (b), (c))
#else
#define NC_FMAF(a, b, c) ((a) * (b) + (c))
#endif
typedef float nc_vf __attribute__((vector_size(NC_FL * 4)));
#define NC_LOADF(v, p) memcpy(&(v), (p), sizeof(nc_vf))
#define NC_STOREF(p, v) memcpy((p), &(v), sizeof(nc_vf))

/* dst = NC_DL elements at p, converted to double (one conversion instruction where the
 * build has one: GCC splits __builtin_convertvector into halves). */
#if defined(__AVX512F__)
#define NC_LOAD4_float(dst, p) dst = (nc_v4d)_mm512_cvtps_pd(_mm256_loadu_ps(p))
#define NC_VFMAD(a, b, c) ((nc_v4d)_mm512_fmadd_pd((__m512d)(a), (__m512d)(b), (__m512d)(c)))
#elif defined(__FMA__)
#define NC_LOAD4_float(dst, p) dst = (nc_v4d)_mm256_cvtps_pd(_mm_loadu_ps(p))
#define NC_VFMAD(a, b, c) ((nc_v4d)_mm256_fmadd_pd((__m256d)(a), (__m256d)(b), (__m256d)(c)))
#else
#define NC_LOAD4_float(dst, p)                   \
    do {                                         \
        nc_v4f v_;                               \
        memcpy(&v_, (p), sizeof v_);             \
        dst = __builtin_convertvector(v_, nc_v4d); \
    } while (0)
#define NC_VFMAD(a, b, c) ((a) * (b) + (c))
#endif
#define NC_LOAD4_double(dst, p) memcpy(&dst, (p), sizeof dst)
#define NC_STORE4_double(p, v) memcpy((p), &(v), sizeof(v))

/* ---- half-precision storage ------------------------------------------------------------
 * float16 and bfloat16 are storage types only: every kernel reads them into float32 (or
 * double, in the reductions) and rounds once on the way out. Each is a 16-bit pattern in a
 * struct of its own, so the Cython kernels' fused types tell them apart. bfloat16 is the
 * upper half of a float32 (a shift each way, round to nearest even going down); float16
 * converts through the F16C instructions where the build has them (both vector builds),
 * through the compiler's _Float16 elsewhere. */
#include <stdint.h>
typedef struct { uint16_t u; } nc_f16;
typedef struct { uint16_t u; } nc_bf16;

static inline float nc_bf16_f(nc_bf16 v) {
    const uint32_t u = (uint32_t)v.u << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline nc_bf16 nc_f_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: stays a (quiet) NaN */
        return (nc_bf16){(uint16_t)((u >> 16) | 0x40u)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return (nc_bf16){(uint16_t)(u >> 16)};
}
/* double to bfloat16 with one rounding: to float32 rounding to odd (a sticky last bit),
 * then to nearest even; rounding twice to nearest could land a tie the wrong way. */
static inline nc_bf16 nc_d_bf16(double d) {
    float f = (float)d;
    if ((double)f != d && d == d) {
        uint32_t u;
        memcpy(&u, &f, 4);
        if (fabs((double)f) > fabs(d))
            u -= 1; /* toward zero: the float below d in magnitude */
        u |= 1u;
        memcpy(&f, &u, 4);
    }
    return nc_f_bf16(f);
}
#if defined(__F16C__)
static inline float nc_f16_f(nc_f16 v) { return _cvtsh_ss(v.u); }
static inline nc_f16 nc_f_f16(float f) { return (nc_f16){(uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT)}; }
#else
static inline float nc_f16_f(nc_f16 v) {
    _Float16 h;
    memcpy(&h, &v, 2);
    return (float)h;
}
static inline nc_f16 nc_f_f16(float f) {
    const _Float16 h = (_Float16)f;
    nc_f16 r;
    memcpy(&r, &h, 2);
    return r;
}
#endif
static inline nc_f16 nc_d_f16(double d) { /* one rounding (_Float16 from double) */
    const _Float16 h = (_Float16)d;
    nc_f16 r;
    memcpy(&r, &h, 2);
    return r;
}

/* Scalar reads as double in the reduction macros' tails (NC_TOD_##T). */
#define NC_TOD_float(v) ((double)(v))
#define NC_TOD_double(v) (v)
#define NC_TOD_nc_f16(v) ((double)nc_f16_f(v))
#define NC_TOD_nc_bf16(v) ((double)nc_bf16_f(v))

/* Any storage type read as, or written from, double: the scalar accesses of the Cython
 * kernels, dispatched on the pointer's type. Writes round once. */
static inline double nc_get_f32(const float* p, ptrdiff_t i) { return p[i]; }
static inline double nc_get_f64(const double* p, ptrdiff_t i) { return p[i]; }
static inline double nc_get_h16(const nc_f16* p, ptrdiff_t i) { return nc_f16_f(p[i]); }
static inline double nc_get_b16(const nc_bf16* p, ptrdiff_t i) { return nc_bf16_f(p[i]); }
static inline void nc_put_f32(float* p, ptrdiff_t i, double v) { p[i] = (float)v; }
static inline void nc_put_f64(double* p, ptrdiff_t i, double v) { p[i] = v; }
static inline void nc_put_h16(nc_f16* p, ptrdiff_t i, double v) { p[i] = nc_d_f16(v); }
static inline void nc_put_b16(nc_bf16* p, ptrdiff_t i, double v) { p[i] = nc_d_bf16(v); }
#define NC_BY_TYPE(p, f)                                                                   \
    _Generic((p), float*: f##_f32, const float*: f##_f32, double*: f##_f64, const double*: f##_f64, \
             nc_f16*: f##_h16, const nc_f16*: f##_h16, nc_bf16*: f##_b16, const nc_bf16*: f##_b16)
#define nc_get(p, i) NC_BY_TYPE(p, nc_get)((p), (i))
#define nc_put(p, i, v) NC_BY_TYPE(p, nc_put)((p), (i), (v))

/* NC_DL elements converted to double (the reductions' loads). */
#if defined(__AVX512F__)
#define NC_LOAD4_nc_f16(dst, p) dst = (nc_v4d)_mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p))))
#define NC_LOAD4_nc_bf16(dst, p) \
    dst = (nc_v4d)_mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(p))), 16)))
#elif defined(__AVX2__)
#define NC_LOAD4_nc_f16(dst, p) dst = (nc_v4d)_mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(p))))
#define NC_LOAD4_nc_bf16(dst, p) \
    dst = (nc_v4d)_mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i*)(p))), 16)))
#else
#define NC_LOAD4_nc_f16(dst, p)                          \
    do {                                                 \
        for (int l_ = 0; l_ < NC_DL; ++l_)               \
            (dst)[l_] = (double)nc_f16_f((p)[l_]);       \
    } while (0)
#define NC_LOAD4_nc_bf16(dst, p)                         \
    do {                                                 \
        for (int l_ = 0; l_ < NC_DL; ++l_)               \
            (dst)[l_] = (double)nc_bf16_f((p)[l_]);      \
    } while (0)
#endif

/* n elements between half storage and float32 (the column tiles' staging). */
static inline void nc_load_h16(const nc_f16* p, float* out, ptrdiff_t n) {
    ptrdiff_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p + i))));
#elif defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + i))));
#endif
    for (; i < n; ++i)
        out[i] = nc_f16_f(p[i]);
}
static inline void nc_store_h16(const float* v, nc_f16* p, ptrdiff_t n) {
    ptrdiff_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i*)(p + i), _mm512_cvtps_ph(_mm512_loadu_ps(v + i), _MM_FROUND_TO_NEAREST_INT));
#elif defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i*)(p + i), _mm256_cvtps_ph(_mm256_loadu_ps(v + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; ++i)
        p[i] = nc_f_f16(v[i]);
}
/* bfloat16: plain integer loops, which the compiler vectorizes in every build */
static inline void nc_load_b16(const nc_bf16* p, float* out, ptrdiff_t n) {
    const uint16_t* q = (const uint16_t*)p;
    uint32_t* o = (uint32_t*)out;
    for (ptrdiff_t i = 0; i < n; ++i)
        o[i] = (uint32_t)q[i] << 16;
}
static inline void nc_store_b16(const float* v, nc_bf16* p, ptrdiff_t n) {
    const uint32_t* u = (const uint32_t*)v;
    uint16_t* q = (uint16_t*)p;
    for (ptrdiff_t i = 0; i < n; ++i) {
        const uint32_t b = u[i], nan = (b & 0x7fffffffu) > 0x7f800000u;
        q[i] = (uint16_t)(nan ? (b >> 16) | 0x40u : (b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
    }
}

/* out = a + b over n elements, rounded as NumPy rounds it: in the storage type for float32
 * and float64, through float32 for the half types (float32 carries 2p + 2 bits of either, so
 * rounding twice gives the correctly rounded sum). out may be a or b. The residual add of
 * add_normalize and the dh of its backward. */
static inline void nc_add_f32(const float* a, const float* b, float* out, ptrdiff_t n) {
    for (ptrdiff_t i = 0; i < n; ++i)
        out[i] = a[i] + b[i];
}
static inline void nc_add_f64(const double* a, const double* b, double* out, ptrdiff_t n) {
    for (ptrdiff_t i = 0; i < n; ++i)
        out[i] = a[i] + b[i];
}
#define NC_HALF_ADD(SUF, T, LOAD, STORE)                                          \
    static inline void nc_add_##SUF(const T* a, const T* b, T* out, ptrdiff_t n) { \
        float fa[256], fb[256];                                                   \
        for (ptrdiff_t i = 0; i < n; i += 256) {                                  \
            const ptrdiff_t m = n - i < 256 ? n - i : 256;                        \
            LOAD(a + i, fa, m);                                                   \
            LOAD(b + i, fb, m);                                                   \
            for (ptrdiff_t k = 0; k < m; ++k)                                     \
                fa[k] += fb[k];                                                   \
            STORE(fa, out + i, m);                                                \
        }                                                                         \
    }
NC_HALF_ADD(h16, nc_f16, nc_load_h16, nc_store_h16)
NC_HALF_ADD(b16, nc_bf16, nc_load_b16, nc_store_b16)
#define nc_add(a, b, out, n) NC_BY_TYPE(a, nc_add)((a), (b), (out), (n))

/* n bytes from src to dst; with nt, the whole 64-byte lines of dst are streamed (a group
 * staged in a thread's scratch, written out without a read for ownership) */
static inline void nc_copy_bytes(const void* src, void* dst, size_t n, int nt) {
    (void)nt;
#if defined(__FMA__) /* the builds whose nc_sfence fences; the baseline copies plainly */
    if (nt) {
        const unsigned char* s = (const unsigned char*)src;
        unsigned char* d = (unsigned char*)dst;
        size_t head = (64 - ((size_t)d & 63)) & 63;
        if (head > n)
            head = n;
        memcpy(d, s, head);
        d += head, s += head, n -= head;
        for (; n >= 64; n -= 64, d += 64, s += 64) {
#if defined(__AVX512F__)
            _mm512_stream_si512((__m512i*)d, _mm512_loadu_si512((const void*)s));
#else
            _mm256_stream_si256((__m256i*)d, _mm256_loadu_si256((const __m256i*)s));
            _mm256_stream_si256((__m256i*)(d + 32), _mm256_loadu_si256((const __m256i*)(s + 32)));
#endif
        }
        memcpy(d, s, n);
        return;
    }
#endif
    memcpy(dst, src, n);
}

/* The widest column tile the kernels pass (kernels.pxi's TILE). */
#define NC_TILE_MAX 4096

/* Accumulator vectors per sum in the row reductions: enough independent chains to hide the
 * add latency, as many as the build's registers hold. */
#if defined(__AVX2__) || defined(__AVX512F__)
#define NC_ACC 4
#else
#define NC_ACC 2
#endif

/* The NC_ACC accumulators of a sum added in a fixed order, then their lanes. */
#if NC_ACC == 4
#define NC_ACC_TOTAL(a) NC_TOTAL((a)[0] + (a)[1], (a)[2] + (a)[3])
#else
#define NC_ACC_TOTAL(a) NC_TOTAL((a)[0], (a)[1])
#endif

/* Sums of d = p[i] - k and d * d over n elements: NC_ACC * NC_DL lanes, then whole vectors
 * into the first accumulator, then the tail in order. With k a member of the data,
 * sum d^2 <= (n + 1) * m2, so m2 = sum d^2 - (sum d)^2 / n loses at most log2(n + 1) bits
 * of double. */
#define NC_SHIFTED_SUMS(NAME, T)                                                          \
    static inline void NAME(const T* p, ptrdiff_t n, double k, double* s1, double* s2) {   \
        const nc_v4d kk = (nc_v4d){0} + k;                                                 \
        nc_v4d a1[NC_ACC], a2[NC_ACC], d;                                                  \
        ptrdiff_t i = 0;                                                                   \
        for (int j = 0; j < NC_ACC; ++j)                                                   \
            a1[j] = a2[j] = (nc_v4d){0};                                                   \
        for (; i + NC_ACC * NC_DL <= n; i += NC_ACC * NC_DL) {                             \
            _Pragma("GCC unroll 4") for (int j = 0; j < NC_ACC; ++j) {                     \
                NC_LOAD4_##T(d, p + i + j * NC_DL);                                        \
                d -= kk;                                                                   \
                a1[j] += d;                                                                \
                a2[j] = NC_VFMAD(d, d, a2[j]);                                             \
            }                                                                              \
        }                                                                                  \
        for (; i + NC_DL <= n; i += NC_DL) {                                               \
            NC_LOAD4_##T(d, p + i);                                                        \
            d -= kk;                                                                       \
            a1[0] += d;                                                                    \
            a2[0] = NC_VFMAD(d, d, a2[0]);                                                 \
        }                                                                                  \
        double t1 = NC_ACC_TOTAL(a1), t2 = NC_ACC_TOTAL(a2);                               \
        for (; i < n; ++i) {                                                               \
            const double e = NC_TOD_##T(p[i]) - k;                                             \
            t1 += e;                                                                       \
            t2 += e * e;                                                                   \
        }                                                                                  \
        *s1 = t1;                                                                          \
        *s2 = t2;                                                                          \
    }

NC_SHIFTED_SUMS(nc_shifted_sums_f32, float)
NC_SHIFTED_SUMS(nc_shifted_sums_f64, double)
NC_SHIFTED_SUMS(nc_shifted_sums_h16, nc_f16)
NC_SHIFTED_SUMS(nc_shifted_sums_b16, nc_bf16)

/* s1 = sum dy[i] * w[i], s2 = sum dy[i] * w[i] * (x[i] - mu): the backward's two row sums
 * in one pass; w = NULL means w = 1. Lanes and order as NC_SHIFTED_SUMS. */
#define NC_DY_SUMS(NAME, T)                                                                  \
    static inline void NAME(const T* dy, const double* w, const T* x, ptrdiff_t n, double mu, \
                            double* s1, double* s2) {                                         \
        const nc_v4d mm = (nc_v4d){0} + mu;                                                   \
        nc_v4d a1[NC_ACC], a2[NC_ACC], g, v, ww;                                              \
        ptrdiff_t i = 0;                                                                      \
        for (int j = 0; j < NC_ACC; ++j)                                                      \
            a1[j] = a2[j] = (nc_v4d){0};                                                      \
        for (; i + NC_ACC * NC_DL <= n; i += NC_ACC * NC_DL) {                                \
            _Pragma("GCC unroll 4") for (int j = 0; j < NC_ACC; ++j) {                        \
                NC_LOAD4_##T(g, dy + i + j * NC_DL);                                          \
                if (w) {                                                                      \
                    NC_LOAD4_double(ww, w + i + j * NC_DL);                                   \
                    g *= ww;                                                                  \
                }                                                                             \
                NC_LOAD4_##T(v, x + i + j * NC_DL);                                           \
                a1[j] += g;                                                                   \
                a2[j] = NC_VFMAD(g, v - mm, a2[j]);                                           \
            }                                                                                 \
        }                                                                                     \
        for (; i + NC_DL <= n; i += NC_DL) {                                                  \
            NC_LOAD4_##T(g, dy + i);                                                          \
            if (w) {                                                                          \
                NC_LOAD4_double(ww, w + i);                                                   \
                g *= ww;                                                                      \
            }                                                                                 \
            NC_LOAD4_##T(v, x + i);                                                           \
            a1[0] += g;                                                                       \
            a2[0] = NC_VFMAD(g, v - mm, a2[0]);                                               \
        }                                                                                     \
        double t1 = NC_ACC_TOTAL(a1), t2 = NC_ACC_TOTAL(a2);                                  \
        for (; i < n; ++i) {                                                                  \
            const double e = w ? NC_TOD_##T(dy[i]) * w[i] : NC_TOD_##T(dy[i]);                        \
            t1 += e;                                                                          \
            t2 += e * (NC_TOD_##T(x[i]) - mu);                                                    \
        }                                                                                     \
        *s1 = t1;                                                                             \
        *s2 = t2;                                                                             \
    }

NC_DY_SUMS(nc_dy_sums_f32, float)
NC_DY_SUMS(nc_dy_sums_f64, double)
NC_DY_SUMS(nc_dy_sums_h16, nc_f16)
NC_DY_SUMS(nc_dy_sums_b16, nc_bf16)

/* The training backward's row work for parameters along the row (layer norm), in one pass:
 * s1, s2 exactly as NC_DY_SUMS with w (same lanes, same order), and the row's parameter
 * gradients added in, dw[i] += dy[i] * ((x[i] - mu) * rs), db[i] += dy[i], as
 * _row_param_sums adds them: dy and x are read and converted once for both. */
#define NC_INNER_STEP(T, o, J)                                                               \
    do {                                                                                     \
        nc_v4d sg_, sv_, sw_, sc_;                                                               \
        NC_LOAD4_##T(sg_, dy + (o));                                                          \
        NC_LOAD4_##T(sv_, x + (o));                                                           \
        sv_ -= mm;                                                                            \
        NC_LOAD4_double(sc_, dw + (o));                                                       \
        sc_ += sg_ * (sv_ * rr);                                                                \
        NC_STORE4_double(dw + (o), sc_);                                                      \
        NC_LOAD4_double(sc_, db + (o));                                                       \
        sc_ += sg_;                                                                            \
        NC_STORE4_double(db + (o), sc_);                                                      \
        NC_LOAD4_double(sw_, w + (o));                                                        \
        sg_ *= sw_;                                                                            \
        a1[J] += sg_;                                                                         \
        a2[J] = NC_VFMAD(sg_, sv_, a2[J]);                                                     \
    } while (0)
#define NC_INNER_ROW_SUMS(NAME, T)                                                           \
    static inline void NAME(const T* dy, const double* w, const T* x, ptrdiff_t n, double mu, \
                            double rs, double* s1, double* s2, double* dw, double* db) {      \
        const nc_v4d mm = (nc_v4d){0} + mu, rr = (nc_v4d){0} + rs;                            \
        nc_v4d a1[NC_ACC], a2[NC_ACC];                                                        \
        ptrdiff_t i = 0;                                                                      \
        for (int j = 0; j < NC_ACC; ++j)                                                      \
            a1[j] = a2[j] = (nc_v4d){0};                                                      \
        for (; i + NC_ACC * NC_DL <= n; i += NC_ACC * NC_DL) {                                \
            _Pragma("GCC unroll 4") for (int j = 0; j < NC_ACC; ++j)                          \
                NC_INNER_STEP(T, i + j * NC_DL, j);                                           \
        }                                                                                     \
        for (; i + NC_DL <= n; i += NC_DL)                                                    \
            NC_INNER_STEP(T, i, 0);                                                           \
        double t1 = NC_ACC_TOTAL(a1), t2 = NC_ACC_TOTAL(a2);                                  \
        for (; i < n; ++i) {                                                                  \
            const double e = NC_TOD_##T(dy[i]), d = NC_TOD_##T(x[i]) - mu, g = e * w[i];              \
            dw[i] += e * (d * rs);                                                            \
            db[i] += e;                                                                       \
            t1 += g;                                                                          \
            t2 += g * d;                                                                      \
        }                                                                                     \
        *s1 = t1;                                                                             \
        *s2 = t2;                                                                             \
    }

NC_INNER_ROW_SUMS(nc_inner_row_sums_f32, float)
NC_INNER_ROW_SUMS(nc_inner_row_sums_f64, double)
NC_INNER_ROW_SUMS(nc_inner_row_sums_h16, nc_f16)
NC_INNER_ROW_SUMS(nc_inner_row_sums_b16, nc_bf16)

/* Two rows that share their parameters (consecutive layer-norm rows) in one pass: each row's
 * s1, s2 as NC_INNER_ROW_SUMS gives them, and dw, db loaded and stored once for both, the
 * first row's terms added before the second's (so the same sums as two single-row passes). */
#define NC_INNER2_STEP(T, o, J)                                                              \
    do {                                                                                     \
        nc_v4d sg_, sv_, sw_, sd_, sb_;                                                      \
        NC_LOAD4_double(sd_, dw + (o));                                                      \
        NC_LOAD4_double(sb_, db + (o));                                                      \
        NC_LOAD4_double(sw_, w + (o));                                                       \
        NC_LOAD4_##T(sg_, dy0 + (o));                                                        \
        NC_LOAD4_##T(sv_, x0 + (o));                                                         \
        sv_ -= mm0;                                                                          \
        sd_ += sg_ * (sv_ * rr0);                                                            \
        sb_ += sg_;                                                                          \
        sg_ *= sw_;                                                                          \
        a1[J] += sg_;                                                                        \
        a2[J] = NC_VFMAD(sg_, sv_, a2[J]);                                                   \
        NC_LOAD4_##T(sg_, dy1 + (o));                                                        \
        NC_LOAD4_##T(sv_, x1 + (o));                                                         \
        sv_ -= mm1;                                                                          \
        sd_ += sg_ * (sv_ * rr1);                                                            \
        sb_ += sg_;                                                                          \
        sg_ *= sw_;                                                                          \
        b1[J] += sg_;                                                                        \
        b2[J] = NC_VFMAD(sg_, sv_, b2[J]);                                                   \
        NC_STORE4_double(dw + (o), sd_);                                                     \
        NC_STORE4_double(db + (o), sb_);                                                     \
    } while (0)
#define NC_INNER_ROWS2_SUMS(NAME, T)                                                         \
    static inline void NAME(const T* dy0, const T* dy1, const double* w, const T* x0,        \
                            const T* x1, ptrdiff_t n, double mu0, double mu1, double rs0,    \
                            double rs1, double* s1, double* s2, double* o1, double* o2,      \
                            double* dw, double* db) {                                        \
        const nc_v4d mm0 = (nc_v4d){0} + mu0, rr0 = (nc_v4d){0} + rs0;                       \
        const nc_v4d mm1 = (nc_v4d){0} + mu1, rr1 = (nc_v4d){0} + rs1;                       \
        nc_v4d a1[NC_ACC], a2[NC_ACC], b1[NC_ACC], b2[NC_ACC];                                \
        ptrdiff_t i = 0;                                                                      \
        for (int j = 0; j < NC_ACC; ++j)                                                      \
            a1[j] = a2[j] = b1[j] = b2[j] = (nc_v4d){0};                                      \
        for (; i + NC_ACC * NC_DL <= n; i += NC_ACC * NC_DL) {                                \
            _Pragma("GCC unroll 4") for (int j = 0; j < NC_ACC; ++j)                          \
                NC_INNER2_STEP(T, i + j * NC_DL, j);                                          \
        }                                                                                     \
        for (; i + NC_DL <= n; i += NC_DL)                                                    \
            NC_INNER2_STEP(T, i, 0);                                                          \
        double t1 = NC_ACC_TOTAL(a1), t2 = NC_ACC_TOTAL(a2);                                  \
        double u1 = NC_ACC_TOTAL(b1), u2 = NC_ACC_TOTAL(b2);                                  \
        for (; i < n; ++i) {                                                                  \
            const double e = NC_TOD_##T(dy0[i]), d = NC_TOD_##T(x0[i]) - mu0, g = e * w[i];           \
            const double f = NC_TOD_##T(dy1[i]), h = NC_TOD_##T(x1[i]) - mu1, q = f * w[i];           \
            dw[i] = (dw[i] + e * (d * rs0)) + f * (h * rs1);                                  \
            db[i] = (db[i] + e) + f;                                                          \
            t1 += g;                                                                          \
            t2 += g * d;                                                                      \
            u1 += q;                                                                          \
            u2 += q * h;                                                                      \
        }                                                                                     \
        *s1 = t1;                                                                             \
        *s2 = t2;                                                                             \
        *o1 = u1;                                                                             \
        *o2 = u2;                                                                             \
    }

NC_INNER_ROWS2_SUMS(nc_inner_rows2_sums_f32, float)
NC_INNER_ROWS2_SUMS(nc_inner_rows2_sums_f64, double)
NC_INNER_ROWS2_SUMS(nc_inner_rows2_sums_h16, nc_f16)
NC_INNER_ROWS2_SUMS(nc_inner_rows2_sums_b16, nc_bf16)

/* y = (x - mean[c]) * scale[c] + shift[c] on a (rows, tw) tile with row stride ld: four
 * rows per sweep share each coefficient load (wide tiles keep their coefficients in L2,
 * not L1). Same per-element operations as the scalar form. */
#define NC_STORE4_float(p, v)                          \
    do {                                               \
        nc_v4f s_ = __builtin_convertvector(v, nc_v4f); \
        memcpy((p), &s_, sizeof s_);                   \
    } while (0)

#define NC_AFFINE_TILE(NAME, T)                                                                \
    static inline void NAME(const T* x, T* y, ptrdiff_t rows, ptrdiff_t ld, ptrdiff_t tw,       \
                            const double* mean, const double* scale, const double* shift) {     \
        ptrdiff_t a = 0, c;                                                                    \
        nc_v4d m, s, t, v;                                                                     \
        for (; a + 4 <= rows; a += 4) {                                                        \
            for (c = 0; c + NC_DL <= tw; c += NC_DL) {                                                 \
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
            for (c = 0; c + NC_DL <= tw; c += NC_DL) {                                                  \
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
            for (c = 0; c + NC_DL <= tw; c += NC_DL) {                                                 \
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
                    const double e = NC_TOD_##T(x[(r + j) * ld + c]) - NC_TOD_##T(x[c]);               \
                    s1[c] += e;                                                                \
                    s2[c] += e * e;                                                            \
                }                                                                              \
        }                                                                                      \
        for (; r < rows; ++r)                                                                  \
            for (c = 0; c < tw; ++c) {                                                         \
                const double e = NC_TOD_##T(x[r * ld + c]) - NC_TOD_##T(x[c]);                         \
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
            for (c = 0; c + NC_DL <= tw; c += NC_DL) {                                                 \
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
                    s1[c] += NC_TOD_##T(dy[o]);                                                    \
                    s2[c] += NC_TOD_##T(dy[o]) * (NC_TOD_##T(x[o]) - mean[c]);                         \
                }                                                                              \
        }                                                                                      \
        for (; r < rows; ++r)                                                                  \
            for (c = 0; c < tw; ++c) {                                                         \
                const ptrdiff_t o = r * ld + c;                                                \
                s1[c] += NC_TOD_##T(dy[o]);                                                        \
                s2[c] += NC_TOD_##T(dy[o]) * (NC_TOD_##T(x[o]) - mean[c]);                             \
            }                                                                                  \
    }

NC_COL_SHIFTED_SUMS(nc_col_shifted_sums_f32, float)
NC_COL_SHIFTED_SUMS(nc_col_shifted_sums_f64, double)
NC_COL_DY_SUMS(nc_col_dy_sums_f32, float)
NC_COL_DY_SUMS(nc_col_dy_sums_f64, double)
NC_COL_SHIFTED_SUMS(nc_col_shifted_sums_h16, nc_f16)
NC_COL_SHIFTED_SUMS(nc_col_shifted_sums_b16, nc_bf16)
NC_COL_DY_SUMS(nc_col_dy_sums_h16, nc_f16)
NC_COL_DY_SUMS(nc_col_dy_sums_b16, nc_bf16)


/* ---- float32 elementwise passes --------------------------------------------------------
 * The contract (README "Numerics"): y, dx within 3x the floor error, the floor being
 * float64 arithmetic with the mean rounded to float32, then rounded to float32. Each pass
 * subtracts the float32-rounded mean m first -- exact by Sterbenz's lemma whenever x lies
 * within a factor two of m, the large-offset case where it matters -- and folds the
 * rounding of the mean, mu - m, into a shift computed in double, so the mean's rounding
 * costs nothing. The scale that multiplies the largest term travels as two floats, hi + lo
 * (hi = the scale rounded, lo = the rest rounded): a lone float32 scale would put a
 * relative error of up to 2^-24 on a whole row or column, as much as the final rounding
 * itself. What is left is that final rounding, the subtraction's where x is not near m
 * (offset 0, where d is as large as x), and the small terms' roundings.
 *
 * Every pass takes nt: store the output with non-temporal (streaming) stores. An output
 * too large to stay in cache for its reader is written straight to memory instead of
 * being read in first (the read-for-ownership of a normal store), which saves a third of
 * a memory-bound pass's traffic; the kernels choose it by output size (STREAM_BYTES in
 * kernels.pxi) and fence after. The values stored are the same either way. */

#if defined(__FMA__)

#define NC_SPLAT(v) ((nc_vf){0} + (float)(v))
#define NC_SPLIT(v, hi, lo)                 \
    do {                                    \
        hi = (float)(v);                    \
        lo = (float)((v) - (double)(hi));   \
    } while (0)

#if NC_FL == 16
#define NC_STREAMF(p, v) _mm512_stream_ps((p), (__m512)(v))
#else
#define NC_STREAMF(p, v) _mm256_stream_ps((p), (__m256)(v))
#endif

/* Streaming stores write whole 64-byte lines: a line that is part streamed, part stored
 * normally (a row's head or tail) would leave the write-combining buffer half full and go to
 * memory as a partial write. NC_LINE floats per line. */
#define NC_LINE 16
#define NC_LINE_OF(p) ((ptrdiff_t)(64 / sizeof(*(p))))
#define NC_LINE_ALIGNED(p) (((size_t)(p) & 63) == 0)
/* whole elements from p to the next line; 0 within an element of it (an output not aligned
 * to its element size, whose rows then go in part vectors or element by element) */
#define NC_TO_LINE(p) ((ptrdiff_t)((64 - ((size_t)(p) & 63)) / sizeof(*(p))))

/* the first k of v's lanes stored (0 < k <= NC_FL), through a vector on the stack: AVX-512's
 * masked store measured 25-30 % slower on rows of 196 floats (AMD EPYC, Zen 4) */
#define NC_STX_PART_VIA(T, ST, p, v, k)               \
    do {                                              \
        T t_[NC_FL];                                  \
        ST(t_, v);                                    \
        memcpy((p), t_, (size_t)(k) * sizeof(T));     \
    } while (0)

/* out[i] = SCALAR(i) for i in [0, n), NC_FL lanes at a time through VECTOR(i, v) (which
 * sets v); with nt, the head up to a line-aligned out + i is stored in part vectors
 * (NC_STX_PART: a large array's data sits 16 bytes past a line, so every row of one has such
 * a head, up to 31 elements of a half type, which is then stored by one or two part vectors
 * rather than element by element), the whole lines
 * after it are streamed, and what is left is stored normally (NC_STX, NC_PUTX, NC_STREAMX: the
 * output's storage type, simd_pass.h). pf1, pf2 (or NULL): inputs the next pass will read,
 * asked for in step with this one, a line per vector (the caller's next group: while this pass reads
 * from L1 no demand stream keeps the hardware prefetcher going). */
#ifndef NC_PF_HINT
#define NC_PF_HINT 2
#endif
#define NC_PASS(out, n, nt, pf1, pf2, VECTOR, SCALAR)                               \
    do {                                                                            \
        ptrdiff_t i_ = 0;                                                           \
        nc_vf v_;                                                                   \
        ptrdiff_t e_ = 0; /* streamed below e_: whole cache lines */               \
        if (nt) {                                                                   \
            while (i_ < (n) && !NC_LINE_ALIGNED((out) + i_)) {                      \
                const ptrdiff_t k_ = NC_TO_LINE((out) + i_);                        \
                if (k_ > 0 && i_ + NC_FL <= (n)) {                                  \
                    VECTOR(i_, v_);                                                 \
                    NC_STX_PART((out) + i_, v_, k_ < NC_FL ? k_ : NC_FL);           \
                    i_ += k_ < NC_FL ? k_ : NC_FL;                                  \
                } else {                                                            \
                    NC_PUTX(out, i_, SCALAR(i_));                                   \
                    ++i_;                                                           \
                }                                                                   \
            }                                                                       \
            e_ = i_ + ((n) - i_) / NC_LINE_OF(out) * NC_LINE_OF(out);               \
        }                                                                           \
        for (; i_ + NC_FL <= (n); i_ += NC_FL) {                                    \
            if (pf1)                                                                \
                __builtin_prefetch((pf1) + i_, 0, NC_PF_HINT);                      \
            if (pf2)                                                                \
                __builtin_prefetch((pf2) + i_, 0, NC_PF_HINT);                      \
            VECTOR(i_, v_);                                                         \
            if (i_ < e_)                                                            \
                NC_STREAMX((out) + i_, v_);                                         \
            else                                                                    \
                NC_STX((out) + i_, v_);                                             \
        }                                                                           \
        for (; i_ < (n); ++i_)                                                      \
            NC_PUTX(out, i_, SCALAR(i_));                                           \
    } while (0)

static inline void nc_sfence(void) { _mm_sfence(); }

/* t's lanes whose mask byte (of NC_FL at m) is 0 set to 0: the masked dx passes */
#if NC_FL == 16
#define NC_MASKF(t, m)                                                                   \
    do {                                                                                 \
        const __m128i b_ = _mm_loadu_si128((const __m128i*)(m));                         \
        (t) = (nc_vf)_mm512_maskz_mov_ps(_mm_test_epi8_mask(b_, b_), (__m512)(t));       \
    } while (0)
#else
#define NC_MASKF(t, m)                                                                        \
    do {                                                                                      \
        const __m256i w_ = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(m)));       \
        (t) = (nc_vf)_mm256_and_ps((__m256)(t), _mm256_castsi256_ps(_mm256_cmpgt_epi32(w_, _mm256_setzero_si256()))); \
    } while (0)
#endif

/* y = (x - mu) * s + t on one row. The per-row float32 coefficients come first (nc_affine_c):
 * made once per channel and shared by its rows where rows are short (nc_affine_coefs). */
typedef struct { float m, h, l, t; } nc_affine_c;

static inline nc_affine_c nc_affine_coef(double mu, double s, double t) {
    nc_affine_c c;
    NC_SPLIT(s, c.h, c.l);
    c.m = (float)mu;
    c.t = (float)(t - (mu - (double)c.m) * s);
    return c;
}

/* dx = dy * k1 + (x - mu) * k2 + k3 on one row; coefficients as for the affine pass */
typedef struct { float m, h, l, a2, a3; } nc_dx_c;

static inline nc_dx_c nc_dx_coef(double mu, double k1, double k2, double k3) {
    nc_dx_c c;
    NC_SPLIT(k1, c.h, c.l);
    c.m = (float)mu;
    c.a2 = (float)k2;
    c.a3 = (float)(k3 - (mu - (double)c.m) * k2);
    return c;
}

/* g = dy * w is the large term of the inner dx: its rounding error is recovered exactly
 * (fma(dy, w, -g)) and multiplied in, so g * rs is as if unrounded. */
static inline float nc_dx_inner_1(float dy, float w, float x, float m, float rh, float rl, float a2,
                                  float a3) {
    const float g = dy * w, e = NC_FMAF(dy, w, -g);
    return NC_FMAF(g, rh, NC_FMAF(g, rl, NC_FMAF(e, rh, NC_FMAF(x - m, a2, a3))));
}

/* The four row passes, once per storage type (simd_pass.h): float32, and the half types,
 * which load and convert NC_FL elements per vector and round once on the store. */
static inline nc_vf nc_ld_h16(const nc_f16* p) {
#if NC_FL == 16
    return (nc_vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
#else
    return (nc_vf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
#endif
}
static inline void nc_st_h16(nc_f16* p, nc_vf v) {
#if NC_FL == 16
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT));
#else
    _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
#endif
}
/* streamed: p 32-byte aligned (16 lanes) or 16-byte aligned (8), as NC_PASS's line-aligned
 * runs give it */
static inline void nc_stream_h16(nc_f16* p, nc_vf v) {
#if NC_FL == 16
    _mm256_stream_si256((__m256i*)p, _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT));
#else
    _mm_stream_si128((__m128i*)p, _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
#endif
}
static inline nc_vf nc_ld_b16(const nc_bf16* p) {
#if NC_FL == 16
    return (nc_vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16);
#else
    return (nc_vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16);
#endif
}
/* the 16 (8) bfloat16 of v, rounded to nearest even on the upper 16 bits; NaN stays a quiet
 * NaN (as nc_f_bf16) */
#if NC_FL == 16
typedef __m256i nc_vh;
#else
typedef __m128i nc_vh;
#endif
static inline nc_vh nc_round_b16(nc_vf v) {
#if NC_FL == 16
    const __m512i u = (__m512i)v, hi = _mm512_srli_epi32(u, 16);
    const __m512i odd = _mm512_and_si512(hi, _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask((__m512)v, (__m512)v, _CMP_UNORD_Q),
                              _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
    /* the upper halves, in order: one word permute rather than a shift and a narrowing move */
    const __m512i odd_words = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33,
                                               31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    return _mm512_castsi512_si256(_mm512_permutexvar_epi16(odd_words, r));
#else
    const __m256i u = (__m256i)v, hi = _mm256_srli_epi32(u, 16);
    const __m256i odd = _mm256_and_si256(hi, _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    r = _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)),
                           (__m256i)_mm256_cmp_ps((__m256)v, (__m256)v, _CMP_UNORD_Q));
    r = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8); /* the 8 halves in order */
    return _mm256_castsi256_si128(r);
#endif
}
static inline void nc_st_b16(nc_bf16* p, nc_vf v) {
#if NC_FL == 16
    _mm256_storeu_si256((__m256i*)p, nc_round_b16(v));
#else
    _mm_storeu_si128((__m128i*)p, nc_round_b16(v));
#endif
}
static inline void nc_stream_b16(nc_bf16* p, nc_vf v) {
#if NC_FL == 16
    _mm256_stream_si256((__m256i*)p, nc_round_b16(v));
#else
    _mm_stream_si128((__m128i*)p, nc_round_b16(v));
#endif
}

/* v rounded to the half type and widened back (the rounding of a stored value, in registers) */
static inline nc_vf nc_round_h16(nc_vf v) {
#if NC_FL == 16
    return (nc_vf)_mm512_cvtph_ps(_mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT));
#else
    return (nc_vf)_mm256_cvtph_ps(_mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
#endif
}
static inline nc_vf nc_widen_b16(nc_vh h) {
#if NC_FL == 16
    return (nc_vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
#else
    return (nc_vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
#endif
}

#define NC_T float
#define NC_SUF f32
#define NC_LDX(v, p) NC_LOADF(v, p)
#define NC_STX(p, v) NC_STOREF(p, v)
#define NC_STREAMX(p, v) NC_STREAMF(p, v)
#define NC_STX_PART(p, v, k) NC_STX_PART_VIA(float, NC_STOREF, p, v, k)
#define NC_ROUNDX(v) (v)
#define NC_ROUNDF(f) (f)
#define NC_GETX(p, i) ((p)[i])
#define NC_PUTX(p, i, v) ((p)[i] = (v))
#include "simd_pass.h"

#define NC_T nc_f16
#define NC_SUF h16
#define NC_LDX(v, p) ((v) = nc_ld_h16(p))
#define NC_STX(p, v) nc_st_h16((p), (v))
#define NC_STREAMX(p, v) nc_stream_h16((p), (v))
#define NC_STX_PART(p, v, k) NC_STX_PART_VIA(nc_f16, nc_st_h16, p, v, k)
#define NC_ROUNDX(v) nc_round_h16(v)
#define NC_ROUNDF(f) nc_f16_f(nc_f_f16(f))
#define NC_GETX(p, i) nc_f16_f((p)[i])
#define NC_PUTX(p, i, v) ((p)[i] = nc_f_f16(v))
#include "simd_pass.h"

#define NC_T nc_bf16
#define NC_SUF b16
#define NC_LDX(v, p) ((v) = nc_ld_b16(p))
#define NC_STX(p, v) nc_st_b16((p), (v))
#define NC_STREAMX(p, v) nc_stream_b16((p), (v))
#define NC_STX_PART(p, v, k) NC_STX_PART_VIA(nc_bf16, nc_st_b16, p, v, k)
#define NC_ROUNDX(v) nc_widen_b16(nc_round_b16(v))
#define NC_ROUNDF(f) nc_bf16_f(nc_f_bf16(f))
#define NC_GETX(p, i) nc_bf16_f((p)[i])
#define NC_PUTX(p, i, v) ((p)[i] = nc_f_bf16(v))
#include "simd_pass.h"


/* Tiles of a column layout, (rows, tw) with row stride ld, tw <= NC_TILE_MAX: the per-column
 * float32 coefficients are made once per tile, on the stack, then every row streams. A tile
 * that spans whole rows (ld == tw) is one contiguous run of rows * tw elements, walked as
 * such: narrow rows (channels-last with a few dozen channels) would otherwise spend most of
 * their time in lane tails and alignment heads. Along the run the column of a vector's first
 * lane wraps around; the coefficient arrays repeat their first NC_FL columns past tw, so the
 * lanes of any vector starting at a column < tw read contiguous coefficients. */
#define NC_TILE_COEF (NC_TILE_MAX + NC_FL)

/* Fill the repeated tail of a coefficient array of tw columns. */
static inline void nc_repeat_cols(float* a, ptrdiff_t tw) {
    for (ptrdiff_t c = tw; c < tw + NC_FL; ++c)
        a[c] = a[(c - tw) % tw];
}

/* Walk (rows, tw) at ld: the contiguous form when ld == tw, else row by row. For each vector
 * of NC_FL elements at out + o whose first column is c, VECTOR(o, c, v); for single
 * elements SCALAR(o, c). */
#define NC_TILE_PASS(out, rows, ld, tw, nt, VECTOR, SCALAR)                                 \
    do {                                                                                    \
        if ((ld) == (tw) && (rows) > 1) {                                                   \
            const ptrdiff_t n_ = (rows) * (tw);                                             \
            ptrdiff_t o_ = 0, c_ = 0, e_ = 0;                                               \
            nc_vf v_;                                                                       \
            if (nt) {                                                                       \
                for (; o_ < n_ && !NC_LINE_ALIGNED((out) + o_); ++o_) {                     \
                    (out)[o_] = SCALAR(o_, c_);                                             \
                    if (++c_ == (tw))                                                       \
                        c_ = 0;                                                             \
                }                                                                           \
                e_ = o_ + (n_ - o_) / NC_LINE * NC_LINE;                                    \
            }                                                                               \
            for (; o_ + NC_FL <= n_; o_ += NC_FL) {                                         \
                VECTOR(o_, c_, v_);                                                         \
                if (o_ < e_)                                                                \
                    NC_STREAMF((out) + o_, v_);                                             \
                else                                                                        \
                    NC_STOREF((out) + o_, v_);                                              \
                c_ += NC_FL;                                                                \
                while (c_ >= (tw))                                                          \
                    c_ -= (tw);                                                             \
            }                                                                               \
            for (; o_ < n_; ++o_) {                                                         \
                (out)[o_] = SCALAR(o_, c_);                                                 \
                if (++c_ == (tw))                                                           \
                    c_ = 0;                                                                 \
            }                                                                               \
        } else {                                                                            \
            for (ptrdiff_t a_ = 0; a_ < (rows); ++a_) {                                     \
                const ptrdiff_t base_ = a_ * (ld);                                          \
                ptrdiff_t c_ = 0, e_ = 0;                                                   \
                nc_vf v_;                                                                   \
                if (nt) {                                                                   \
                    for (; c_ < (tw) && !NC_LINE_ALIGNED((out) + base_ + c_); ++c_)         \
                        (out)[base_ + c_] = SCALAR(base_ + c_, c_);                         \
                    e_ = c_ + ((tw) - c_) / NC_LINE * NC_LINE;                              \
                }                                                                           \
                for (; c_ + NC_FL <= (tw); c_ += NC_FL) {                                   \
                    VECTOR(base_ + c_, c_, v_);                                             \
                    if (c_ < e_)                                                            \
                        NC_STREAMF((out) + base_ + c_, v_);                                 \
                    else                                                                    \
                        NC_STOREF((out) + base_ + c_, v_);                                  \
                }                                                                           \
                for (; c_ < (tw); ++c_)                                                     \
                    (out)[base_ + c_] = SCALAR(base_ + c_, c_);                             \
            }                                                                               \
        }                                                                                   \
    } while (0)

/* y = (x - mean[c]) * scale[c] + shift[c] */
static inline void nc_affine_tile_f32(const float* x, float* y, ptrdiff_t rows, ptrdiff_t ld,
                                      ptrdiff_t tw, const double* mean, const double* scale,
                                      const double* shift, int nt) {
    float m[NC_TILE_COEF], sh[NC_TILE_COEF], sl[NC_TILE_COEF], t[NC_TILE_COEF];
    nc_vf vm, vh, vl, vt;
    for (ptrdiff_t c = 0; c < tw; ++c) {
        m[c] = (float)mean[c];
        NC_SPLIT(scale[c], sh[c], sl[c]);
        t[c] = (float)(shift[c] - (mean[c] - (double)m[c]) * scale[c]);
    }
    nc_repeat_cols(m, tw);
    nc_repeat_cols(sh, tw);
    nc_repeat_cols(sl, tw);
    nc_repeat_cols(t, tw);
#define V(o, c, v)                               \
    do {                                         \
        NC_LOADF(v, x + (o));                    \
        NC_LOADF(vm, m + (c));                   \
        NC_LOADF(vh, sh + (c));                  \
        NC_LOADF(vl, sl + (c));                  \
        NC_LOADF(vt, t + (c));                   \
        v -= vm;                                 \
        v = NC_VFMA(v, vh, NC_VFMA(v, vl, vt));  \
    } while (0)
#define S(o, c) NC_FMAF(x[o] - m[c], sh[c], NC_FMAF(x[o] - m[c], sl[c], t[c]))
    NC_TILE_PASS(y, rows, ld, tw, nt, V, S);
#undef V
#undef S
}

/* dx = dy * k1[c] + (x - mean[c]) * k2[c] + k3[c] */
static inline void nc_dx_tile_f32(const float* dy, const float* x, float* dx, ptrdiff_t rows,
                                  ptrdiff_t ld, ptrdiff_t tw, const double* mean, const double* k1,
                                  const double* k2, const double* k3, int nt) {
    float m[NC_TILE_COEF], h[NC_TILE_COEF], l[NC_TILE_COEF], a2[NC_TILE_COEF], a3[NC_TILE_COEF];
    nc_vf g, vm, vh, vl, v2, v3;
    for (ptrdiff_t c = 0; c < tw; ++c) {
        m[c] = (float)mean[c];
        NC_SPLIT(k1[c], h[c], l[c]);
        a2[c] = (float)k2[c];
        a3[c] = (float)(k3[c] - (mean[c] - (double)m[c]) * k2[c]);
    }
    nc_repeat_cols(m, tw);
    nc_repeat_cols(h, tw);
    nc_repeat_cols(l, tw);
    nc_repeat_cols(a2, tw);
    nc_repeat_cols(a3, tw);
#define V(o, c, v)                                                     \
    do {                                                               \
        NC_LOADF(g, dy + (o));                                         \
        NC_LOADF(v, x + (o));                                          \
        NC_LOADF(vm, m + (c));                                         \
        NC_LOADF(vh, h + (c));                                         \
        NC_LOADF(vl, l + (c));                                         \
        NC_LOADF(v2, a2 + (c));                                        \
        NC_LOADF(v3, a3 + (c));                                        \
        v = NC_VFMA(g, vh, NC_VFMA(g, vl, NC_VFMA(v - vm, v2, v3)));   \
    } while (0)
#define S(o, c) NC_FMAF(dy[o], h[c], NC_FMAF(dy[o], l[c], NC_FMAF(x[o] - m[c], a2[c], a3[c])))
    NC_TILE_PASS(dx, rows, ld, tw, nt, V, S);
#undef V
#undef S
}

#else /* no FMA: float32 arithmetic would round once more per step than the contract allows
       * room for, so the baseline build evaluates these passes in double, as before, and
       * stores normally */

static inline void nc_sfence(void) {}

typedef struct { double mu, s, t; } nc_affine_c;
static inline nc_affine_c nc_affine_coef(double mu, double s, double t) {
    nc_affine_c c = {mu, s, t};
    return c;
}

static inline void nc_affine_row_c_f32(const float* x, float* y, ptrdiff_t n, const nc_affine_c* c, int nt,
                                       const float* pf1) {
    (void)nt, (void)pf1;
    for (ptrdiff_t i = 0; i < n; ++i)
        y[i] = (float)(((double)x[i] - c->mu) * c->s + c->t);
}

static inline void nc_affine_inner_row_f32(const float* x, float* y, ptrdiff_t n, double mu,
                                           double rs, const float* w, const float* b, int nt,
                                           const float* pf1) {
    (void)nt, (void)pf1;
    for (ptrdiff_t i = 0; i < n; ++i)
        y[i] = (float)(((double)x[i] - mu) * rs * (double)w[i] + (double)b[i]);
}

typedef struct { double mu, k1, k2, k3; } nc_dx_c;
static inline nc_dx_c nc_dx_coef(double mu, double k1, double k2, double k3) {
    nc_dx_c c = {mu, k1, k2, k3};
    return c;
}

static inline void nc_dx_row_c_f32(const float* dy, const float* x, float* dx, ptrdiff_t n, const nc_dx_c* c,
                                   int nt, const float* pf1, const float* pf2) {
    (void)nt, (void)pf1, (void)pf2;
    for (ptrdiff_t i = 0; i < n; ++i)
        dx[i] = (float)((double)dy[i] * c->k1 + ((double)x[i] - c->mu) * c->k2 + c->k3);
}

static inline void nc_dx_inner_row_f32(const float* dy, const float* x, float* dx, ptrdiff_t n,
                                       double mu, double rs, const float* w, double m1, double m2,
                                       int nt, const float* pf1, const float* pf2) {
    (void)nt, (void)pf1, (void)pf2;
    for (ptrdiff_t i = 0; i < n; ++i)
        dx[i] = (float)(rs * ((double)dy[i] * (double)w[i] - m1 - ((double)x[i] - mu) * rs * m2));
}

/* the half types' row passes likewise in double, rounded once (nc_put) */
#define NC_BASELINE_HALF_ROWS(SUF, T)                                                                   \
    static inline void nc_affine_row_c_##SUF(const T* x, T* y, ptrdiff_t n, const nc_affine_c* c, int nt, \
                                             const T* pf1) {                                          \
        (void)nt, (void)pf1;                                                                          \
        for (ptrdiff_t i = 0; i < n; ++i)                                                             \
            nc_put(y, i, (nc_get(x, i) - c->mu) * c->s + c->t);                                       \
    }                                                                                                 \
    static inline void nc_affine_inner_row_##SUF(const T* x, T* y, ptrdiff_t n, double mu, double rs,   \
                                                 const float* w, const float* b, int nt, const T* pf1) { \
        (void)nt, (void)pf1;                                                                          \
        for (ptrdiff_t i = 0; i < n; ++i)                                                             \
            nc_put(y, i, (nc_get(x, i) - mu) * rs * (double)w[i] + (double)b[i]);                     \
    }                                                                                                 \
    static inline void nc_dx_row_c_##SUF(const T* dy, const T* x, T* dx, ptrdiff_t n, const nc_dx_c* c,  \
                                         int nt, const T* pf1, const T* pf2) {                        \
        (void)nt, (void)pf1, (void)pf2;                                                               \
        for (ptrdiff_t i = 0; i < n; ++i)                                                             \
            nc_put(dx, i, nc_get(dy, i) * c->k1 + (nc_get(x, i) - c->mu) * c->k2 + c->k3);            \
    }                                                                                                 \
    static inline void nc_dx_inner_row_##SUF(const T* dy, const T* x, T* dx, ptrdiff_t n, double mu,     \
                                             double rs, const float* w, double m1, double m2, int nt, \
                                             const T* pf1, const T* pf2) {                            \
        (void)nt, (void)pf1, (void)pf2;                                                               \
        for (ptrdiff_t i = 0; i < n; ++i)                                                             \
            nc_put(dx, i, rs * (nc_get(dy, i) * (double)w[i] - m1 - (nc_get(x, i) - mu) * rs * m2));  \
    }
NC_BASELINE_HALF_ROWS(h16, nc_f16)
NC_BASELINE_HALF_ROWS(b16, nc_bf16)

/* the dx passes plus dh (simd_pass.h's in the vector builds): dx, then NumPy's dx + dh */
#define NC_BASELINE_DX_DH(SUF, T)                                                                        \
    static inline void nc_dx_row_cd_##SUF(const T* dy, const T* x, T* dx, ptrdiff_t n, const nc_dx_c* c,  \
                                          int nt, const T* pf1, const T* pf2, const T* dh) {             \
        nc_dx_row_c_##SUF(dy, x, dx, n, c, nt, pf1, pf2);                                              \
        if (dh)                                                                                        \
            nc_add_##SUF(dx, dh, dx, n);                                                               \
    }                                                                                                  \
    static inline void nc_dx_inner_row_d_##SUF(const T* dy, const T* x, T* dx, ptrdiff_t n, double mu,   \
                                               double rs, const float* w, double m1, double m2, int nt, \
                                               const T* pf1, const T* pf2, const T* dh) {               \
        nc_dx_inner_row_##SUF(dy, x, dx, n, mu, rs, w, m1, m2, nt, pf1, pf2);                          \
        if (dh)                                                                                        \
            nc_add_##SUF(dx, dh, dx, n);                                                               \
    }
NC_BASELINE_DX_DH(f32, float)
NC_BASELINE_DX_DH(h16, nc_f16)
NC_BASELINE_DX_DH(b16, nc_bf16)

NC_AFFINE_TILE(nc_affine_tile_f32d, float)
NC_DX_TILE(nc_dx_tile_f32d, float)
static inline void nc_affine_tile_f32(const float* x, float* y, ptrdiff_t rows, ptrdiff_t ld, ptrdiff_t tw,
                                      const double* mean, const double* scale, const double* shift, int nt) {
    (void)nt;
    nc_affine_tile_f32d(x, y, rows, ld, tw, mean, scale, shift);
}
static inline void nc_dx_tile_f32(const float* dy, const float* x, float* dx, ptrdiff_t rows, ptrdiff_t ld,
                                  ptrdiff_t tw, const double* mean, const double* k1, const double* k2,
                                  const double* k3, int nt) {
    (void)nt;
    nc_dx_tile_f32d(dy, x, dx, rows, ld, tw, mean, k1, k2, k3);
}

#endif /* __FMA__ */

/* The row passes with their coefficients made on the spot, and with row r's of a set made once
 * (nc_affine_coefs, nc_dx_coefs below), for each storage type of the float32 passes. */
#define NC_ROW_WRAPPERS(SUF, T)                                                                       \
    static inline void nc_affine_row_##SUF(const T* x, T* y, ptrdiff_t n, double mu, double s, double t, \
                                           int nt, const T* pf1) {                                    \
        const nc_affine_c c = nc_affine_coef(mu, s, t);                                               \
        nc_affine_row_c_##SUF(x, y, n, &c, nt, pf1);                                                  \
    }                                                                                                 \
    static inline void nc_dx_row_##SUF(const T* dy, const T* x, T* dx, ptrdiff_t n, double mu, double k1,\
                                       double k2, double k3, int nt, const T* pf1, const T* pf2) {    \
        const nc_dx_c c = nc_dx_coef(mu, k1, k2, k3);                                                 \
        nc_dx_row_c_##SUF(dy, x, dx, n, &c, nt, pf1, pf2);                                            \
    }                                                                                                 \
    static inline void nc_dx_row_d_##SUF(const T* dy, const T* x, T* dx, ptrdiff_t n, double mu,      \
                                         double k1, double k2, double k3, int nt, const T* pf1,       \
                                         const T* pf2, const T* dh) {                                 \
        const nc_dx_c c = nc_dx_coef(mu, k1, k2, k3);                                                 \
        nc_dx_row_cd_##SUF(dy, x, dx, n, &c, nt, pf1, pf2, dh);                                       \
    }                                                                                                 \
    static inline void nc_affine_row_r_##SUF(const T* x, T* y, ptrdiff_t n, const void* coefs, ptrdiff_t r, \
                                             int nt) {                                                \
        nc_affine_row_c_##SUF(x, y, n, (const nc_affine_c*)coefs + r, nt, NULL);                      \
    }                                                                                                 \
    static inline void nc_dx_row_r_##SUF(const T* dy, const T* x, T* dx, ptrdiff_t n, const void* coefs, \
                                         ptrdiff_t r, int nt) {                                       \
        nc_dx_row_c_##SUF(dy, x, dx, n, (const nc_dx_c*)coefs + r, nt, NULL, NULL);                   \
    }
NC_ROW_WRAPPERS(f32, float)
NC_ROW_WRAPPERS(h16, nc_f16)
NC_ROW_WRAPPERS(b16, nc_bf16)

/* Per-row coefficients of R rows made once (malloc'd; NULL when out of memory), and the row
 * passes that take row r's: for (A, R, S) layouts whose A * R rows share R channels. */
static inline void* nc_affine_coefs(const double* mean, const double* scale, const double* shift,
                                    ptrdiff_t R) {
    nc_affine_c* c = (nc_affine_c*)malloc((size_t)(R > 0 ? R : 1) * sizeof(nc_affine_c));
    if (c)
        for (ptrdiff_t r = 0; r < R; ++r)
            c[r] = nc_affine_coef(mean[r], scale[r], shift[r]);
    return c;
}


static inline void* nc_dx_coefs(const double* mean, const double* k1, const double* k2, const double* k3,
                                ptrdiff_t R) {
    nc_dx_c* c = (nc_dx_c*)malloc((size_t)(R > 0 ? R : 1) * sizeof(nc_dx_c));
    if (c)
        for (ptrdiff_t r = 0; r < R; ++r)
            c[r] = nc_dx_coef(mean[r], k1[r], k2[r], k3[r]);
    return c;
}


/* ---- half-precision column tiles -------------------------------------------------------
 * The float32 tile passes run on blocks of whole tile rows staged through float32 buffers on
 * the stack: the half input converted in (vectorized), the float32 pass on the buffer, the
 * result converted out with one rounding. (The row passes convert in registers instead:
 * simd_pass.h.) Streaming stores are a float32 matter and are not taken here. */
#define NC_TILE_STAGE 16384  /* floats per staged block: at least one row of the widest tile (4096) */
#define NC_MIN(a, b) ((a) < (b) ? (a) : (b))

#define NC_HALF_TILES(SUF, T, LOAD, STORE)                                                      \
    /* blocks of whole tile rows, contiguous in the buffer (ld == tw there) */                 \
    static inline void nc_stage_rows_##SUF(const T* x, float* b, ptrdiff_t rows, ptrdiff_t ld, ptrdiff_t tw) { \
        if (ld == tw)                                                                           \
            LOAD(x, b, rows * tw);                                                              \
        else                                                                                    \
            for (ptrdiff_t j = 0; j < rows; ++j)                                                \
                LOAD(x + j * ld, b + j * tw, tw);                                               \
    }                                                                                           \
    static inline void nc_unstage_rows_##SUF(const float* b, T* y, ptrdiff_t rows, ptrdiff_t ld, ptrdiff_t tw) { \
        if (ld == tw)                                                                           \
            STORE(b, y, rows * tw);                                                             \
        else                                                                                    \
            for (ptrdiff_t j = 0; j < rows; ++j)                                                \
                STORE(b + j * tw, y + j * ld, tw);                                              \
    }                                                                                           \
    static inline void nc_affine_tile_##SUF(const T* x, T* y, ptrdiff_t rows, ptrdiff_t ld, ptrdiff_t tw, \
                                            const double* mean, const double* scale, const double* shift, \
                                            int nt) {                                           \
        float b_[NC_TILE_STAGE];                                                                \
        const ptrdiff_t k = tw > 0 ? NC_TILE_STAGE / tw : 1;                                    \
        (void)nt;                                                                               \
        for (ptrdiff_t a = 0; a < rows; a += k) {                                               \
            const ptrdiff_t kk = NC_MIN(k, rows - a);                                           \
            nc_stage_rows_##SUF(x + a * ld, b_, kk, ld, tw);                                    \
            nc_affine_tile_f32(b_, b_, kk, tw, tw, mean, scale, shift, 0);                      \
            nc_unstage_rows_##SUF(b_, y + a * ld, kk, ld, tw);                                  \
        }                                                                                       \
    }                                                                                           \
    static inline void nc_dx_tile_##SUF(const T* dy, const T* x, T* dx, ptrdiff_t rows, ptrdiff_t ld,       \
                                        ptrdiff_t tw, const double* mean, const double* k1,     \
                                        const double* k2, const double* k3, int nt) {           \
        float g_[NC_TILE_STAGE], v_[NC_TILE_STAGE];                                             \
        const ptrdiff_t k = tw > 0 ? NC_TILE_STAGE / tw : 1;                                    \
        (void)nt;                                                                               \
        for (ptrdiff_t a = 0; a < rows; a += k) {                                               \
            const ptrdiff_t kk = NC_MIN(k, rows - a);                                           \
            nc_stage_rows_##SUF(dy + a * ld, g_, kk, ld, tw);                                   \
            nc_stage_rows_##SUF(x + a * ld, v_, kk, ld, tw);                                    \
            nc_dx_tile_f32(g_, v_, v_, kk, tw, tw, mean, k1, k2, k3, 0);                        \
            nc_unstage_rows_##SUF(v_, dx + a * ld, kk, ld, tw);                                 \
        }                                                                                       \
    }

NC_HALF_TILES(h16, nc_f16, nc_load_h16, nc_store_h16)
NC_HALF_TILES(b16, nc_bf16, nc_load_b16, nc_store_b16)

/* The names the Cython kernels call, dispatched on the storage pointer's type: every type
 * for the reductions, float32 and the half types for the float32 elementwise passes (float64
 * passes are the Cython kernels' own loops). */
#define NC_BY_STORAGE(p, f)                                                                    \
    _Generic((p), float*: f##_f32, const float*: f##_f32, nc_f16*: f##_h16, const nc_f16*: f##_h16, \
             nc_bf16*: f##_b16, const nc_bf16*: f##_b16)
#define nc_shifted_sums(p, ...) NC_BY_TYPE(p, nc_shifted_sums)((p), __VA_ARGS__)
#define nc_dy_sums(p, ...) NC_BY_TYPE(p, nc_dy_sums)((p), __VA_ARGS__)
#define nc_inner_row_sums(p, ...) NC_BY_TYPE(p, nc_inner_row_sums)((p), __VA_ARGS__)
#define nc_inner_rows2_sums(p, ...) NC_BY_TYPE(p, nc_inner_rows2_sums)((p), __VA_ARGS__)
#define nc_col_shifted_sums(p, ...) NC_BY_TYPE(p, nc_col_shifted_sums)((p), __VA_ARGS__)
#define nc_col_dy_sums(p, ...) NC_BY_TYPE(p, nc_col_dy_sums)((p), __VA_ARGS__)
#define nc_affine_row(p, ...) NC_BY_STORAGE(p, nc_affine_row)((p), __VA_ARGS__)
#define nc_affine_row_r(p, ...) NC_BY_STORAGE(p, nc_affine_row_r)((p), __VA_ARGS__)
#define nc_affine_inner_row(p, ...) NC_BY_STORAGE(p, nc_affine_inner_row)((p), __VA_ARGS__)
#define nc_affine_tile(p, ...) NC_BY_STORAGE(p, nc_affine_tile)((p), __VA_ARGS__)
#define nc_dx_row(p, ...) NC_BY_STORAGE(p, nc_dx_row)((p), __VA_ARGS__)
#define nc_dx_row_r(p, ...) NC_BY_STORAGE(p, nc_dx_row_r)((p), __VA_ARGS__)
#define nc_dx_inner_row(p, ...) NC_BY_STORAGE(p, nc_dx_inner_row)((p), __VA_ARGS__)
#define nc_dx_row_d(p, ...) NC_BY_STORAGE(p, nc_dx_row_d)((p), __VA_ARGS__)
#define nc_dx_inner_row_d(p, ...) NC_BY_STORAGE(p, nc_dx_inner_row_d)((p), __VA_ARGS__)
#define nc_dx_tile(p, ...) NC_BY_STORAGE(p, nc_dx_tile)((p), __VA_ARGS__)

/* float32 copy of n doubles (parameters for the float32 passes); NULL when malloc fails */
static inline float* nc_to_f32(const double* p, ptrdiff_t n) {
    float* out = (float*)malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    if (out)
        for (ptrdiff_t i = 0; i < n; ++i)
            out[i] = (float)p[i];
    return out;
}


/* Whether the n bytes at p are memory the process already has (its pages resident), judged
 * by a few pages spread over it. An output freshly allocated by a large malloc (mmap, or a
 * heap the allocator has just grown) is not: its pages arrive on first touch, zero-filled by
 * the kernel and so already in cache, where streaming stores lose to normal ones. Where the
 * platform cannot tell, the answer is yes. */
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
static inline int nc_resident(const void* p, ptrdiff_t n) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t start = (size_t)p & ~(page - 1), end = (size_t)p + (size_t)n;
    for (int k = 0; k < 4; ++k) {
        size_t at = start + (end - start) / 4 * (size_t)k;
        unsigned char v = 0;
        at &= ~(page - 1);
        if (mincore((void*)at, page, &v) != 0 || !(v & 1))
            return 0;
    }
    return 1;
}
#else
static inline int nc_resident(const void* p, ptrdiff_t n) {
    (void)p, (void)n;
    return 1;
}
#endif

/* ---- masked statistics ------------------------------------------------------------------
 * Mask bytes (nonzero: counted) by the kernel's rows (normcore/masking.py). Reductions select
 * the counted lanes, never multiply by the mask: an uncounted NaN or inf (padding) must not
 * reach a sum. The elementwise dx passes compute in float for float32 and the half types
 * (as the plain passes), in double for float64.
 * d = counted lanes ? d - kk : 0 and cnt += the counted lanes (a scalar: NC_MASK_SHIFTED),
 * or n += 1.0 in the counted lanes (a vector: NC_MASK_SHIFTED_N), NC_DL bytes at m. */
typedef long long nc_v4l __attribute__((vector_size(NC_DL * 8)));
#if defined(__AVX512F__)
/* a lane mask register from one widening load and one test */
#define NC_KMASK_OF(k, m)                                                              \
    do {                                                                               \
        const __m512i w_ = _mm512_cvtepu8_epi64(_mm_loadl_epi64((const __m128i*)(m))); \
        k = _mm512_test_epi64_mask(w_, w_);                                            \
    } while (0)
#define NC_MASK_SHIFTED(d, kk, m, cnt)                                          \
    do {                                                                        \
        __mmask8 k_;                                                            \
        NC_KMASK_OF(k_, m);                                                     \
        (d) = (nc_v4d)_mm512_maskz_sub_pd(k_, (__m512d)(d), (__m512d)(kk));     \
        (cnt) += __builtin_popcount((unsigned)k_);                              \
    } while (0)
#define NC_MASK_SHIFTED_N(d, kk, m, n)                                          \
    do {                                                                        \
        __mmask8 k_;                                                            \
        NC_KMASK_OF(k_, m);                                                     \
        (d) = (nc_v4d)_mm512_maskz_sub_pd(k_, (__m512d)(d), (__m512d)(kk));     \
        (n) = (nc_v4d)_mm512_mask_add_pd((__m512d)(n), k_, (__m512d)(n), _mm512_set1_pd(1.0)); \
    } while (0)
#else
/* dst = all ones in the lanes whose mask byte is nonzero: AVX2 by one widening load (GCC's
 * generic byte-to-quadword conversion goes element by element), the baseline per lane */
#if defined(__AVX2__)
static inline int nc_load_u32(const unsigned char* m) {
    int v;
    memcpy(&v, m, sizeof v);
    return v;
}
#define NC_LANES_OF(dst, m) \
    dst = ((nc_v4l)_mm256_cvtepu8_epi64(_mm_cvtsi32_si128(nc_load_u32(m))) != (nc_v4l){0})
#else
#define NC_LANES_OF(dst, m)                       \
    do {                                          \
        for (int l_ = 0; l_ < NC_DL; ++l_)        \
            (dst)[l_] = (m)[l_] ? -1 : 0;         \
    } while (0)
#endif
#define NC_MASK_SHIFTED(d, kk, m, cnt)                       \
    do {                                                     \
        nc_v4l s_;                                           \
        NC_LANES_OF(s_, m);                                  \
        (d) = (nc_v4d)((nc_v4l)((d) - (kk)) & s_);           \
        for (int l_ = 0; l_ < NC_DL; ++l_)                   \
            (cnt) -= s_[l_];                                 \
    } while (0)
#define NC_MASK_SHIFTED_N(d, kk, m, n)                                  \
    do {                                                                \
        nc_v4l s_;                                                      \
        NC_LANES_OF(s_, m);                                             \
        (d) = (nc_v4d)((nc_v4l)((d) - (kk)) & s_);                      \
        (n) += (nc_v4d)(s_ & (nc_v4l)((nc_v4d){0} + 1.0));              \
    } while (0)
#endif

/* The backward's masked-out positions are not data: dy and x copied with the lanes whose
 * mask byte is 0 set to +0 (all-zero bits in every storage type), so that the plain sums
 * of dy and dy * (x - mu) over the copy add exactly nothing for them, whatever they held
 * (NaN padding included). Both values are loaded unconditionally: the select vectorizes. */
#define NC_INERT_COPY(NAME, T)                                                              \
    static inline void NAME(const T* dy, const T* x, const unsigned char* m, ptrdiff_t n,    \
                            T* bdy, T* bx) {                                                  \
        T z;                                                                                  \
        memset(&z, 0, sizeof z);                                                              \
        for (ptrdiff_t i = 0; i < n; ++i) {                                                   \
            const T g = dy[i], v = x[i];                                                      \
            bdy[i] = m[i] ? g : z;                                                            \
            bx[i] = m[i] ? v : z;                                                             \
        }                                                                                     \
    }
NC_INERT_COPY(nc_inert_copy_f32, float)
NC_INERT_COPY(nc_inert_copy_f64, double)
NC_INERT_COPY(nc_inert_copy_h16, nc_f16)
NC_INERT_COPY(nc_inert_copy_b16, nc_bf16)
#define nc_inert_copy(dy, ...) NC_BY_TYPE(dy, nc_inert_copy)((dy), __VA_ARGS__)

/* Whether any of the n mask bytes at m is nonzero (a padded row is skipped at this cost). */
static inline int nc_any_counted(const unsigned char* m, ptrdiff_t n) {
    unsigned char any = 0;
    for (ptrdiff_t i = 0; i < n; ++i)
        any |= m[i];
    return any != 0;
}

/* Over the counted elements of p[0:n]: s1 = sum d, s2 = sum d * d with d = p[i] - k, and
 * their count; lanes and order as NC_SHIFTED_SUMS (k is a counted member: same bound). */
#define NC_MASKED_SUMS(NAME, T)                                                               \
    static inline void NAME(const T* p, const unsigned char* m, ptrdiff_t n, double k,         \
                            double* s1, double* s2, double* cnt) {                             \
        const nc_v4d kk = (nc_v4d){0} + k;                                                     \
        nc_v4d a1[NC_ACC], a2[NC_ACC], d;                                                      \
        ptrdiff_t i = 0;                                                                       \
        long long c = 0;                                                                       \
        for (int j = 0; j < NC_ACC; ++j)                                                       \
            a1[j] = a2[j] = (nc_v4d){0};                                                       \
        for (; i + NC_ACC * NC_DL <= n; i += NC_ACC * NC_DL) {                                 \
            _Pragma("GCC unroll 4") for (int j = 0; j < NC_ACC; ++j) {                         \
                NC_LOAD4_##T(d, p + i + j * NC_DL);                                            \
                NC_MASK_SHIFTED(d, kk, m + i + j * NC_DL, c);                                  \
                a1[j] += d;                                                                    \
                a2[j] = NC_VFMAD(d, d, a2[j]);                                                 \
            }                                                                                  \
        }                                                                                      \
        for (; i + NC_DL <= n; i += NC_DL) {                                                   \
            NC_LOAD4_##T(d, p + i);                                                            \
            NC_MASK_SHIFTED(d, kk, m + i, c);                                                  \
            a1[0] += d;                                                                        \
            a2[0] = NC_VFMAD(d, d, a2[0]);                                                     \
        }                                                                                      \
        double t1 = NC_ACC_TOTAL(a1), t2 = NC_ACC_TOTAL(a2);                                   \
        for (; i < n; ++i)                                                                     \
            if (m[i]) {                                                                        \
                const double e = NC_TOD_##T(p[i]) - k;                                         \
                t1 += e;                                                                       \
                t2 += e * e;                                                                   \
                ++c;                                                                           \
            }                                                                                  \
        *s1 = t1;                                                                              \
        *s2 = t2;                                                                              \
        *cnt = (double)c;                                                                      \
    }
NC_MASKED_SUMS(nc_masked_sums_f32, float)
NC_MASKED_SUMS(nc_masked_sums_f64, double)
NC_MASKED_SUMS(nc_masked_sums_h16, nc_f16)
NC_MASKED_SUMS(nc_masked_sums_b16, nc_bf16)
#define nc_masked_sums(p, ...) NC_BY_TYPE(p, nc_masked_sums)((p), __VA_ARGS__)

/* a wholly counted row's lanes into the column accumulators a, b, n (kk: the shifts) */
#define NC_COL_COUNTED_ROW(T, px) \
    do {                          \
        NC_LOAD4_##T(d, (px));    \
        d -= kk;                  \
        a += d;                   \
        b += d * d;               \
        n += one;                 \
    } while (0)
/* one counted element v of column c (the lane tails) */
#define NC_COL_COUNTED_1(T, v)                         \
    do {                                               \
        const double e_ = NC_TOD_##T(v) - k[c];        \
        s1[c] += e_;                                   \
        s2[c] += e_ * e_;                              \
        cnt[c] += 1.0;                                 \
    } while (0)
/* one row's lanes into the column accumulators a, b, n (kk: the shifts), as one row at a time */
#define NC_COL_MASKED_ROW(T, px, pm)          \
    do {                                      \
        NC_LOAD4_##T(d, (px));                \
        NC_MASK_SHIFTED_N(d, kk, (pm), n);    \
        a += d;                               \
        b += d * d;                           \
    } while (0)

/* Column tile (rows, tw), row stride ld; row r's mask bytes at m + off[r], advancing by
 * step (0: one byte for the row): over each column's counted rows, s1[c] += d, s2[c] += d * d
 * with d = x[r, c] - k[c], cnt[c] += 1; rows in order, two per load of the accumulators. */
#define NC_COL_MASKED_SUMS(NAME, T)                                                            \
    static inline void NAME(const T* x, const unsigned char* m, const ptrdiff_t* off, int step, \
                            ptrdiff_t rows, ptrdiff_t ld, ptrdiff_t tw, const double* k,       \
                            double* s1, double* s2, double* cnt) {                             \
        const nc_v4d one = (nc_v4d){0} + 1.0;                                                  \
        for (ptrdiff_t r = 0; r < rows; r += 2) {                                              \
            const int both = r + 1 < rows;                                                     \
            const unsigned char* m0 = m + off[r];                                              \
            const unsigned char* m1 = both ? m + off[r + 1] : m0;                              \
            const T* x0 = x + r * ld;                                                          \
            const T* x1 = both ? x0 + ld : x0;                                                 \
            ptrdiff_t c = 0;                                                                   \
            if (step == 0) { /* whole rows counted or not: the plain sums of those counted */  \
                const int f0 = m0[0] != 0, f1 = both && m1[0] != 0;                            \
                if (!f0 && !f1)                                                                \
                    continue;                                                                  \
                for (; c + NC_DL <= tw; c += NC_DL) {                                          \
                    nc_v4d kk, a, b, n, d;                                                     \
                    NC_LOAD4_double(kk, k + c);                                                \
                    NC_LOAD4_double(a, s1 + c);                                                \
                    NC_LOAD4_double(b, s2 + c);                                                \
                    NC_LOAD4_double(n, cnt + c);                                               \
                    if (f0)                                                                    \
                        NC_COL_COUNTED_ROW(T, x0 + c);                                         \
                    if (f1)                                                                    \
                        NC_COL_COUNTED_ROW(T, x1 + c);                                         \
                    NC_STORE4_double(s1 + c, a);                                               \
                    NC_STORE4_double(s2 + c, b);                                               \
                    NC_STORE4_double(cnt + c, n);                                              \
                }                                                                              \
                for (; c < tw; ++c)                                                            \
                    for (int j = 0; j < 2; ++j)                                                \
                        if (j == 0 ? f0 : f1)                                                  \
                            NC_COL_COUNTED_1(T, (j == 0 ? x0 : x1)[c]);                        \
                continue;                                                                      \
            }                                                                                  \
            if (r + 4 <= rows) { /* four rows per load of the accumulators where there are */  \
                const unsigned char* m2 = m + off[r + 2];                                      \
                const unsigned char* m3 = m + off[r + 3];                                      \
                for (; c + NC_DL <= tw; c += NC_DL) {                                          \
                    nc_v4d kk, a, b, n, d;                                                     \
                    NC_LOAD4_double(kk, k + c);                                                \
                    NC_LOAD4_double(a, s1 + c);                                                \
                    NC_LOAD4_double(b, s2 + c);                                                \
                    NC_LOAD4_double(n, cnt + c);                                               \
                    NC_COL_MASKED_ROW(T, x0 + c, m0 + c);                                      \
                    NC_COL_MASKED_ROW(T, x1 + c, m1 + c);                                      \
                    NC_COL_MASKED_ROW(T, x1 + ld + c, m2 + c);                                 \
                    NC_COL_MASKED_ROW(T, x1 + 2 * ld + c, m3 + c);                             \
                    NC_STORE4_double(s1 + c, a);                                               \
                    NC_STORE4_double(s2 + c, b);                                               \
                    NC_STORE4_double(cnt + c, n);                                              \
                }                                                                              \
                for (; c < tw; ++c)                                                            \
                    for (int j = 0; j < 4; ++j)                                                \
                        if ((m + off[r + j])[c])                                               \
                            NC_COL_COUNTED_1(T, x0[j * ld + c]);                               \
                r += 2; /* with the loop's 2: four rows */                                     \
                continue;                                                                      \
            }                                                                                  \
            for (; c + NC_DL <= tw; c += NC_DL) {                                              \
                nc_v4d kk, a, b, n, d;                                                         \
                NC_LOAD4_double(kk, k + c);                                                    \
                NC_LOAD4_double(a, s1 + c);                                                    \
                NC_LOAD4_double(b, s2 + c);                                                    \
                NC_LOAD4_double(n, cnt + c);                                                   \
                NC_COL_MASKED_ROW(T, x0 + c, m0 + c);                                          \
                if (both)                                                                      \
                    NC_COL_MASKED_ROW(T, x1 + c, m1 + c);                                      \
                NC_STORE4_double(s1 + c, a);                                                   \
                NC_STORE4_double(s2 + c, b);                                                   \
                NC_STORE4_double(cnt + c, n);                                                  \
            }                                                                                  \
            for (; c < tw; ++c)                                                                \
                for (int j = 0; j <= both; ++j)                                                \
                    if ((j == 0 ? m0 : m1)[c])                                                 \
                        NC_COL_COUNTED_1(T, (j == 0 ? x0 : x1)[c]);                            \
        }                                                                                      \
    }
NC_COL_MASKED_SUMS(nc_col_masked_sums_f32, float)
NC_COL_MASKED_SUMS(nc_col_masked_sums_f64, double)
NC_COL_MASKED_SUMS(nc_col_masked_sums_h16, nc_f16)
NC_COL_MASKED_SUMS(nc_col_masked_sums_b16, nc_bf16)
#define nc_col_masked_sums(x, ...) NC_BY_TYPE(x, nc_col_masked_sums)((x), __VA_ARGS__)

/* dx = dy * k1 + (counted ? (x - mu) * k2 + k3 : 0), the plain dx passes' arithmetic
 * (nc_dx_coef: in the FMA builds float32 with the mean rounded to m, its rounding folded
 * into a3 and k1 as hi + lo; in the baseline double), on one row with scalar coefficients
 * (_row) or a column tile with per-column ones (_cols: nc_masked_dx_coefs' R columns,
 * the tile's first at c0). */
#if defined(__FMA__)
typedef float nc_mdx_t;
#define NC_MDX_STAT(xv, m, a2, a3) NC_FMAF((xv) - (m), (a2), (a3))
#define NC_MDX(g, h, l, t) NC_FMAF((g), (h), NC_FMAF((g), (l), (t)))
#define NC_MDX_OF(c) (c).m, (c).h, (c).l, (c).a2, (c).a3
#else
typedef double nc_mdx_t;
#define NC_MDX_STAT(xv, m, a2, a3) (((xv) - (m)) * (a2) + (a3))
#define NC_MDX(g, h, l, t) ((g) * (h) + (t))
#define NC_MDX_OF(c) (c).mu, (c).k1, 0.0, (c).k2, (c).k3
#endif

static inline void* nc_masked_dx_coefs(const double* mean, const double* k1, const double* k2,
                                       const double* k3, ptrdiff_t R) {
    nc_mdx_t* c = (nc_mdx_t*)malloc((size_t)(R > 0 ? R : 1) * 5 * sizeof(nc_mdx_t));
    if (c)
        for (ptrdiff_t r = 0; r < R; ++r) {
            const nc_dx_c d = nc_dx_coef(mean[r], k1[r], k2[r], k3[r]);
            const nc_mdx_t v[5] = {NC_MDX_OF(d)};
            for (int j = 0; j < 5; ++j)
                c[j * R + r] = v[j];
        }
    return c;
}

/* the same five arrays in double, for float64 storage (mu, k1, 0, k2, k3) */
static inline void* nc_masked_dx_coefs64(const double* mean, const double* k1, const double* k2,
                                         const double* k3, ptrdiff_t R) {
    double* c = (double*)malloc((size_t)(R > 0 ? R : 1) * 5 * sizeof(double));
    if (c)
        for (ptrdiff_t r = 0; r < R; ++r) {
            c[r] = mean[r];
            c[R + r] = k1[r];
            c[2 * R + r] = 0.0;
            c[3 * R + r] = k2[r];
            c[4 * R + r] = k3[r];
        }
    return c;
}

/* The row pass runs in runs of NC_MDX_RUN elements (one mask line), each asking for the
 * same run of a later group's x, dy and mask when given (the one-visit backward's next
 * groups: its sums phase then finds them in cache). */
#define NC_MDX_RUN 64
#ifndef NC_PF_HINT
#define NC_PF_HINT 2
#endif
#define NC_MDX_PREFETCH(a, b, m, size)                                      \
    do {                                                                    \
        for (size_t o_ = 0; o_ < NC_MDX_RUN * (size); o_ += 64) {           \
            __builtin_prefetch((const char*)(a) + o_, 0, NC_PF_HINT);       \
            __builtin_prefetch((const char*)(b) + o_, 0, NC_PF_HINT);       \
        }                                                                   \
        __builtin_prefetch((m), 0, NC_PF_HINT);                             \
    } while (0)

/* A: the arithmetic; COEF: the row's five coefficients from (mu, k1, k2, k3); STAT, DX as
 * NC_MDX_STAT, NC_MDX */
#define NC_MASKED_DX(SUF, T, A, COEF, STAT, DX)                                                   \
    static inline void nc_masked_dx_row_##SUF(const T* dy, const T* x, const unsigned char* m,    \
                                              T* dx, ptrdiff_t n, double mu, double k1, double k2, \
                                              double k3, int nt, const T* pf1, const T* pf2,      \
                                              const unsigned char* pfm) {                         \
        A c[5];                                                                                   \
        (void)nt; /* (streamed by the vector builds' float32 and half passes) */                 \
        COEF(c, mu, k1, k2, k3);                                                                  \
        for (ptrdiff_t i0 = 0; i0 < n; i0 += NC_MDX_RUN) {                                        \
            const ptrdiff_t e = i0 + NC_MDX_RUN < n ? i0 + NC_MDX_RUN : n;                        \
            if (pf1) /* a later group's lines, as the plain passes ask for them */               \
                NC_MDX_PREFETCH(pf1 + i0, pf2 + i0, pfm + i0, sizeof(T));                         \
            for (ptrdiff_t i = i0; i < e; ++i) {                                                  \
                const A t = STAT((A)NC_TOD_##T(x[i]), c[0], c[3], c[4]);                          \
                const A g = (A)NC_TOD_##T(dy[i]);                                                 \
                nc_put_##SUF(dx, i, m[i] ? DX(g, c[1], c[2], t) : (A)0);                          \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
    static inline void nc_masked_dx_cols_##SUF(const T* dy, const T* x, const unsigned char* m,   \
                                               const ptrdiff_t* off, int step, T* dx, ptrdiff_t rows, \
                                               ptrdiff_t ld, ptrdiff_t tw, const void* coefs,      \
                                               ptrdiff_t R, ptrdiff_t c0, int nt) {                \
        const A* cm = (const A*)coefs + c0;                                                       \
        const A *ch = cm + R, *cl = cm + 2 * R, *c2 = cm + 3 * R, *c3 = cm + 4 * R;               \
        T buf[NC_TILE_MAX]; /* nt: a row made here, then streamed out whole */                \
        (void)cl; /* (a lo part only where the scale travels as hi + lo) */                     \
        for (ptrdiff_t r = 0; r < rows; ++r) {                                                    \
            const ptrdiff_t o = r * ld;                                                           \
            const unsigned char* mr = m + off[r] + (step ? c0 : 0);                               \
            T* out = nt ? buf : dx + o;                                                           \
            if (step == 0) { /* the row counted, or left out: dx 0 */                           \
                for (ptrdiff_t c = 0; c < tw; ++c) {                                              \
                    const A t = STAT((A)NC_TOD_##T(x[o + c]), cm[c], c2[c], c3[c]);               \
                    const A g = (A)NC_TOD_##T(dy[o + c]);                                         \
                    nc_put_##SUF(out, c, mr[0] ? DX(g, ch[c], cl[c], t) : (A)0);                  \
                }                                                                                 \
            } else {                                                                              \
                for (ptrdiff_t c = 0; c < tw; ++c) {                                              \
                    const A t = STAT((A)NC_TOD_##T(x[o + c]), cm[c], c2[c], c3[c]);               \
                    const A g = (A)NC_TOD_##T(dy[o + c]);                                         \
                    nc_put_##SUF(out, c, mr[c] ? DX(g, ch[c], cl[c], t) : (A)0);                  \
                }                                                                                 \
            }                                                                                     \
            if (nt)                                                                               \
                nc_copy_bytes(buf, dx + o, (size_t)tw * sizeof(T), 1);                            \
        }                                                                                         \
    }
#define NC_MDX_COEF(c, mu, k1, k2, k3)                       \
    do {                                                     \
        const nc_dx_c d_ = nc_dx_coef((mu), (k1), (k2), (k3)); \
        const nc_mdx_t v_[5] = {NC_MDX_OF(d_)};              \
        memcpy((c), v_, sizeof v_);                          \
    } while (0)
#define NC_MDX64_COEF(c, mu, k1, k2, k3) \
    do {                                 \
        (c)[0] = (mu);                   \
        (c)[1] = (k1);                   \
        (c)[2] = 0.0;                    \
        (c)[3] = (k2);                   \
        (c)[4] = (k3);                   \
    } while (0)
#define NC_MDX64_STAT(xv, m, a2, a3) (((xv) - (m)) * (a2) + (a3))
#define NC_MDX64(g, h, l, t) ((g) * (h) + (t))
NC_MASKED_DX(f32, float, nc_mdx_t, NC_MDX_COEF, NC_MDX_STAT, NC_MDX)
NC_MASKED_DX(h16, nc_f16, nc_mdx_t, NC_MDX_COEF, NC_MDX_STAT, NC_MDX)
NC_MASKED_DX(b16, nc_bf16, nc_mdx_t, NC_MDX_COEF, NC_MDX_STAT, NC_MDX)
NC_MASKED_DX(f64, double, double, NC_MDX64_COEF, NC_MDX64_STAT, NC_MDX64)
#if defined(__FMA__)
/* the rows of the float32 and half types through simd_pass.h's vector pass */
#define NC_MASKED_DX_V(SUF, T)                                                                       \
    static inline void nc_masked_dx_rowv_##SUF(const T* dy, const T* x, const unsigned char* m, T* dx,  \
                                               ptrdiff_t n, double mu, double k1, double k2, double k3, \
                                               int nt, const T* pf1, const T* pf2,                      \
                                               const unsigned char* pfm) {                              \
        const nc_dx_c c = nc_dx_coef(mu, k1, k2, k3);                                                 \
        nc_masked_dx_row_v_##SUF(dy, x, m, dx, n, &c, nt, pf1, pf2, pfm);                             \
    }
NC_MASKED_DX_V(f32, float)
NC_MASKED_DX_V(h16, nc_f16)
NC_MASKED_DX_V(b16, nc_bf16)
#define nc_masked_dx_rowv_f64 nc_masked_dx_row_f64
#define nc_masked_dx_row(dy, ...) NC_BY_TYPE(dy, nc_masked_dx_rowv)((dy), __VA_ARGS__)
#else
#define nc_masked_dx_row(dy, ...) NC_BY_TYPE(dy, nc_masked_dx_row)((dy), __VA_ARGS__)
#endif
#define nc_masked_dx_cols(dy, ...) NC_BY_TYPE(dy, nc_masked_dx_cols)((dy), __VA_ARGS__)

/* Parameters along the row: dx = rs * (dy * w - (m1 + xhat * m2)) where counted, 0 where
 * not, in double; the mask bytes at m advance by step (0: one for the row). */
#define NC_MASKED_DX_INNER(SUF, T)                                                                \
    static inline void nc_masked_dx_inner_row_##SUF(const T* dy, const T* x, const unsigned char* m, \
                                                    int step, T* dx, ptrdiff_t n, double mu,      \
                                                    double rs, const double* w, double m1,        \
                                                    double m2) {                                  \
        for (ptrdiff_t i = 0; i < n; ++i) {                                                       \
            const double t = m1 + (NC_TOD_##T(x[i]) - mu) * rs * m2;                              \
            nc_put_##SUF(dx, i, m[i * step] ? rs * (NC_TOD_##T(dy[i]) * w[i] - t) : 0.0);         \
        }                                                                                         \
    }
NC_MASKED_DX_INNER(f32, float)
NC_MASKED_DX_INNER(f64, double)
NC_MASKED_DX_INNER(h16, nc_f16)
NC_MASKED_DX_INNER(b16, nc_bf16)
#define nc_masked_dx_inner_row(dy, ...) NC_BY_TYPE(dy, nc_masked_dx_inner_row)((dy), __VA_ARGS__)


#endif
