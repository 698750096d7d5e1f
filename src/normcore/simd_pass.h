/* The float32 row passes of simd.h for one storage type, included once per type: NC_T the
 * storage type of x, y, dy, dx (float, nc_f16, nc_bf16), NC_SUF the names' suffix,
 * NC_LDX(v, p) / NC_STX(p, v) / NC_STREAMX(p, v) a vector of NC_FL elements loaded as
 * float32 / stored with one rounding / streamed, NC_GETX(p, i) / NC_PUTX(p, i, f) one
 * element, NC_STX_PART(p, v, k) the first k lanes of a vector, NC_ROUNDX(v) / NC_ROUNDF(f)
 * a vector / float rounded to NC_T and widened back (what a store and a load would give).
 * The arithmetic is the float32 passes' (simd.h, "float32 elementwise passes"), on
 * the values as loaded; weights stay float32. Streamed outputs go out in whole 64-byte
 * lines of their own type (NC_LINE_OF).
 * Every NC_ macro above is undefined at the end, for the next inclusion. */
#define NC_CAT_(a, b) a##_##b
#define NC_CAT(a, b) NC_CAT_(a, b)
#define NC_FN(name) NC_CAT(name, NC_SUF)
#define NC_IS_F32 (sizeof(NC_T) == sizeof(float))
/* v * (hi + lo) + t: the float32 contract's two-float scale; a half output's rounding
 * (2^-11 or 2^-8) dwarfs a lone float32 scale's 2^-24, so half types take hi alone */
#define NC_SCALE2(v, hi, lo, t) (NC_IS_F32 ? NC_VFMA(v, hi, NC_VFMA(v, lo, t)) : NC_VFMA(v, hi, t))
#define NC_SCALE2F(v, hi, lo, t) (NC_IS_F32 ? NC_FMAF(v, hi, NC_FMAF(v, lo, t)) : NC_FMAF(v, hi, t))

/* y = (x - mu) * s + t on one row, from the row's float32 coefficients */
static inline void NC_FN(nc_affine_row_c)(const NC_T* x, NC_T* y, ptrdiff_t n, const nc_affine_c* c, int nt,
                                          const NC_T* pf1) {
    const float m = c->m, sh = c->h, sl = c->l, tf = c->t;
    const nc_vf vm = NC_SPLAT(m), vh = NC_SPLAT(sh), vl = NC_SPLAT(sl), vt = NC_SPLAT(tf);
#define V(i, v)                                  \
    do {                                         \
        NC_LDX(v, x + (i));                      \
        v -= vm;                                 \
        v = NC_SCALE2(v, vh, vl, vt);            \
    } while (0)
#define S(i) NC_SCALE2F(NC_GETX(x, i) - m, sh, sl, tf)
    NC_PASS(y, n, nt, pf1, (const NC_T*)NULL, V, S);
#undef V
#undef S
}

/* y = (x - mu) * rs * w[i] + b[i] on one row, w and b float32. xhat is rounded once before
 * the multiply-add with w and b, so the other roundings must stay small: near a zero mean
 * (|mu * rs| <= 1/2: offsets below half a standard deviation), where x - m is inexact,
 * xhat = x * rs - mu * rs is taken from x itself, the product exact inside the FMAs and the
 * shift small; elsewhere from x - m. */
static inline void NC_FN(nc_affine_inner_row)(const NC_T* x, NC_T* y, ptrdiff_t n, double mu, double rs,
                                              const float* w, const float* b, int nt, const NC_T* pf1) {
    float rh, rl;
    NC_SPLIT(rs, rh, rl);
    const int fold = mu * rs <= 0.5 && mu * rs >= -0.5;
    const float m = fold ? 0.0f : (float)mu;
    const float c = (float)(-(mu - (double)m) * rs);
    const nc_vf vm = NC_SPLAT(m), vh = NC_SPLAT(rh), vl = NC_SPLAT(rl), vc = NC_SPLAT(c);
    nc_vf vw, vb;
#define V(i, v)                                                   \
    do {                                                          \
        NC_LDX(v, x + (i));                                       \
        NC_LOADF(vw, w + (i));                                    \
        NC_LOADF(vb, b + (i));                                    \
        v -= vm;                                                  \
        v = NC_VFMA(NC_SCALE2(v, vh, vl, vc), vw, vb);            \
    } while (0)
#define S(i) NC_FMAF(NC_SCALE2F(NC_GETX(x, i) - m, rh, rl, c), w[i], b[i])
    NC_PASS(y, n, nt, pf1, (const NC_T*)NULL, V, S);
#undef V
#undef S
}

/* dh (or NULL): added to dx after dx's rounding to NC_T and rounded again, as NumPy's
 * dx + dh (NC_ROUNDX / NC_ROUNDF: a value rounded to NC_T and widened back) */
#define NC_PLUS_DH(i, v)                          \
    do {                                          \
        if (dh) {                                 \
            nc_vf t_;                             \
            NC_LDX(t_, dh + (i));                 \
            v = NC_ROUNDX(v) + t_;                \
        }                                         \
    } while (0)
#define NC_PLUS_DHF(i, f) (dh ? NC_ROUNDF(f) + NC_GETX(dh, i) : (f))

/* dx = dy * k1 + (x - mu) * k2 + k3 (+ dh) on one row, from the row's float32 coefficients */
static inline void NC_FN(nc_dx_row_cd)(const NC_T* dy, const NC_T* x, NC_T* dx, ptrdiff_t n, const nc_dx_c* c,
                                       int nt, const NC_T* pf1, const NC_T* pf2, const NC_T* dh) {
    const float m = c->m, h = c->h, l = c->l, a2 = c->a2, a3 = c->a3;
    const nc_vf vm = NC_SPLAT(m), vh = NC_SPLAT(h), vl = NC_SPLAT(l), v2 = NC_SPLAT(a2), v3 = NC_SPLAT(a3);
    nc_vf g;
#define V(i, v)                                                        \
    do {                                                               \
        NC_LDX(g, dy + (i));                                           \
        NC_LDX(v, x + (i));                                            \
        v = NC_VFMA(g, vh, NC_VFMA(g, vl, NC_VFMA(v - vm, v2, v3)));   \
        NC_PLUS_DH(i, v);                                              \
    } while (0)
#define S(i) NC_PLUS_DHF(i, NC_FMAF(NC_GETX(dy, i), h, NC_FMAF(NC_GETX(dy, i), l, NC_FMAF(NC_GETX(x, i) - m, a2, a3))))
    NC_PASS(dx, n, nt, pf1, pf2, V, S);
#undef V
#undef S
}
static inline void NC_FN(nc_dx_row_c)(const NC_T* dy, const NC_T* x, NC_T* dx, ptrdiff_t n, const nc_dx_c* c,
                                      int nt, const NC_T* pf1, const NC_T* pf2) {
    NC_FN(nc_dx_row_cd)(dy, x, dx, n, c, nt, pf1, pf2, NULL);
}

/* dx = rs * (dy * w[i] - m1 - (x - mu) * rs * m2) (+ dh) on one row, w float32 (nc_dx_inner_1) */
static inline void NC_FN(nc_dx_inner_row_d)(const NC_T* dy, const NC_T* x, NC_T* dx, ptrdiff_t n, double mu,
                                            double rs, const float* w, double m1, double m2, int nt,
                                            const NC_T* pf1, const NC_T* pf2, const NC_T* dh) {
    const double k2 = -rs * rs * m2;
    float rh, rl;
    NC_SPLIT(rs, rh, rl);
    const float m = (float)mu, a2 = (float)k2, a3 = (float)(-rs * m1 - (mu - (double)m) * k2);
    const nc_vf vm = NC_SPLAT(m), vh = NC_SPLAT(rh), vl = NC_SPLAT(rl), v2 = NC_SPLAT(a2), v3 = NC_SPLAT(a3);
    nc_vf g, e, vw;
#define V(i, v)                                                         \
    do {                                                                \
        NC_LDX(g, dy + (i));                                            \
        NC_LDX(v, x + (i));                                             \
        NC_LOADF(vw, w + (i));                                          \
        e = g;                                                          \
        g *= vw;                                                        \
        e = NC_VFMA(e, vw, -g);                                         \
        v = NC_VFMA(v - vm, v2, v3);                                    \
        v = NC_VFMA(g, vh, NC_VFMA(g, vl, NC_VFMA(e, vh, v)));          \
        NC_PLUS_DH(i, v);                                               \
    } while (0)
#define S(i) NC_PLUS_DHF(i, nc_dx_inner_1(NC_GETX(dy, i), w[i], NC_GETX(x, i), m, rh, rl, a2, a3))
    NC_PASS(dx, n, nt, pf1, pf2, V, S);
#undef V
#undef S
}
static inline void NC_FN(nc_dx_inner_row)(const NC_T* dy, const NC_T* x, NC_T* dx, ptrdiff_t n, double mu,
                                          double rs, const float* w, double m1, double m2, int nt,
                                          const NC_T* pf1, const NC_T* pf2) {
    NC_FN(nc_dx_inner_row_d)(dy, x, dx, n, mu, rs, w, m1, m2, nt, pf1, pf2, NULL);
}

/* Masked statistics (simd.h, "masked statistics"): dx = dy * k1 + (x - mu) * k2 + k3 where
 * counted and 0 where not (masked-out positions are not data), on one row, mk one byte per
 * element (NC_MASKF zeroes the uncounted lanes); pfm (or NULL) a later group's mask, asked
 * for a line per 64 elements */
static inline void NC_FN(nc_masked_dx_row_v)(const NC_T* dy, const NC_T* x, const unsigned char* mk, NC_T* dx,
                                             ptrdiff_t n, const nc_dx_c* c, int nt, const NC_T* pf1,
                                             const NC_T* pf2, const unsigned char* pfm) {
    const float m = c->m, h = c->h, l = c->l, a2 = c->a2, a3 = c->a3;
    const nc_vf vm = NC_SPLAT(m), vh = NC_SPLAT(h), vl = NC_SPLAT(l), v2 = NC_SPLAT(a2), v3 = NC_SPLAT(a3);
    nc_vf g, t;
#define V(i, v)                                                        \
    do {                                                               \
        if (pfm && ((i) & 63) < NC_FL)                                 \
            __builtin_prefetch(pfm + (i), 0, NC_PF_HINT);              \
        NC_LDX(g, dy + (i));                                           \
        NC_LDX(v, x + (i));                                            \
        t = NC_VFMA(v - vm, v2, v3);                                   \
        v = NC_VFMA(g, vh, NC_VFMA(g, vl, t));                         \
        NC_MASKF(v, mk + (i));                                         \
    } while (0)
#define S(i) (mk[i] ? NC_FMAF(NC_GETX(dy, i), h, NC_FMAF(NC_GETX(dy, i), l, NC_FMAF(NC_GETX(x, i) - m, a2, a3))) : 0.0f)
    NC_PASS(dx, n, nt, pf1, pf2, V, S);
#undef V
#undef S
}

#undef NC_PLUS_DH
#undef NC_PLUS_DHF
#undef NC_SCALE2
#undef NC_SCALE2F
#undef NC_IS_F32
#undef NC_FN
#undef NC_CAT
#undef NC_CAT_
#undef NC_T
#undef NC_SUF
#undef NC_LDX
#undef NC_STX
#undef NC_STREAMX
#undef NC_STX_PART
#undef NC_ROUNDX
#undef NC_ROUNDF
#undef NC_GETX
#undef NC_PUTX
