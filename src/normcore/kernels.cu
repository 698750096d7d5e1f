// normcore GPU kernels, compiled at first use by cupy.RawModule (NVRTC).
//
// The same contracts as the CPU kernels in kernels.pxi, so that one Python orchestration
// (normcore/functional.py) drives both: every array is C-contiguous; statistics and
// coefficients are float64; x, y, dy, dx are the storage type T. Two families per
// operation, chosen by the plan's canonical layout:
//   rows: (A, R, S) with S > 1 — one thread block walks one row of S contiguous elements
//         (coalesced), so the row's coefficients are loaded once per row, not per element;
//   cols: (A, C) with the statistics along columns (channels-last / per-activation batch
//         norm) — 32 columns x 8 row stripes per block, coalesced along C, per-block
//         partials over a fixed number of rows.
// Reductions combine in a fixed order (fixed block partition, fixed shuffle/shared-memory
// trees), so results are bitwise reproducible from run to run.
//
// Every kernel parameter is a pointer or a 64-bit integer (a float64 scalar travels as its
// bits, see nc_normalize_groups), so every launch passes one uniform kind of argument.
//
// Accumulation: double for float and double storage, float for float16 and bfloat16
// (converted here by hand: NVRTC needs no header). Elementwise math uses the same type.
// No headers are included, so the file compiles under NVRTC and nvcc alike (and, for the
// test suite's host emulation, under g++ with tests/cuda_emu/emu.h).

typedef long long i64;

struct nc_bf16 { unsigned short bits; };
struct nc_f16 { unsigned short bits; };

__device__ __forceinline__ i64 nc_min(i64 a, i64 b) { return a < b ? a : b; }

template <typename T> struct nc_acc { typedef double type; };
template <> struct nc_acc<nc_bf16> { typedef float type; };
template <> struct nc_acc<nc_f16> { typedef float type; };

__device__ __forceinline__ float nc_bf16_to_float(unsigned short b) {
    return __uint_as_float(((unsigned int)b) << 16);
}

__device__ __forceinline__ unsigned short nc_float_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return (unsigned short)(u >> 16);
}

#ifndef NORMCORE_HOST_EMULATION
__device__ __forceinline__ float nc_f16_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ unsigned short nc_float_to_f16(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#else  // host emulation of the kernels in the test suite (GCC's _Float16)
__device__ __forceinline__ float nc_f16_to_float(unsigned short h) {
    _Float16 v;
    __builtin_memcpy(&v, &h, 2);
    return (float)v;
}

__device__ __forceinline__ unsigned short nc_float_to_f16(float f) {
    _Float16 v = (_Float16)f;
    unsigned short h;
    __builtin_memcpy(&h, &v, 2);
    return h;
}
#endif

template <typename T, typename A> __device__ __forceinline__ A nc_ld(const T* p, i64 i) {
    return (A)p[i];
}
template <> __device__ __forceinline__ float nc_ld<nc_bf16, float>(const nc_bf16* p, i64 i) {
    return nc_bf16_to_float(p[i].bits);
}
template <> __device__ __forceinline__ float nc_ld<nc_f16, float>(const nc_f16* p, i64 i) {
    return nc_f16_to_float(p[i].bits);
}

template <typename T, typename A> __device__ __forceinline__ void nc_st(T* p, i64 i, A v) {
    p[i] = (T)v;
}
template <> __device__ __forceinline__ void nc_st<nc_bf16, float>(nc_bf16* p, i64 i, float v) {
    p[i].bits = nc_float_to_bf16(v);
}
template <> __device__ __forceinline__ void nc_st<nc_f16, float>(nc_f16* p, i64 i, float v) {
    p[i].bits = nc_float_to_f16(v);
}

// The arithmetic type of a storage type's own operations, as NumPy does them: float32 for
// the half types (float32 carries 2p + 2 bits of either: rounding twice is exact rounding).
template <typename T> struct nc_own { typedef T type; };
template <> struct nc_own<nc_bf16> { typedef float type; };
template <> struct nc_own<nc_f16> { typedef float type; };

// out[o] = a[ia] + b[ib] in T's own arithmetic (NumPy's): the one sum nc_add, the residual
// add of nc_normalize_groups and the dh of the dx kernels share
template <typename T>
__device__ __forceinline__ void nc_sum_to(T* out, i64 o, const T* a, i64 ia, const T* b, i64 ib) {
    typedef typename nc_own<T>::type F;
    nc_st<T, F>(out, o, nc_ld<T, F>(a, ia) + nc_ld<T, F>(b, ib));
}

// out = a + b over n elements (out may be a or b): the residual add and dh of add_normalize
template <typename T> __global__ void nc_add(const T* a, const T* b, i64 n, T* out) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        nc_sum_to<T>(out, i, a, i, b, i);
}

// ---------------------------------------------------------------------------------------
// Block-level building blocks (blockDim.x a multiple of 32, at most 1024)
// ---------------------------------------------------------------------------------------

template <typename A> __device__ __forceinline__ A nc_warp_sum(A v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block in a fixed tree; the result is valid in thread 0.
template <typename A> __device__ A nc_block_sum(A v, A* shared32) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = nc_warp_sum(v);
    if (lane == 0) shared32[warp] = v;
    __syncthreads();
    v = ((int)threadIdx.x < nwarps) ? shared32[lane] : (A)0;
    if (warp == 0) v = nc_warp_sum(v);
    __syncthreads();  // shared32 may be reused by the caller
    return v;
}

// Rounding can leave a centred sum of squares slightly negative: clamp it to 0, but keep a
// NaN (an overflowed sum, inf - inf) a NaN, which fmax would turn into 0.
__device__ __forceinline__ double nc_clamp0(double v) { return v < 0.0 ? 0.0 : v; }

struct nc_moments { double n, mean, m2; };

// Chan et al.'s merge of two (count, mean, centred sum of squares).
__device__ __forceinline__ nc_moments nc_merge(nc_moments a, nc_moments b) {
    if (b.n == 0.0) return a;
    if (a.n == 0.0) return b;
    const double n = a.n + b.n, d = b.mean - a.mean, f = b.n / n;
    nc_moments r;
    r.n = n;
    r.mean = a.mean + d * f;
    r.m2 = a.m2 + b.m2 + d * (a.n * f) * d;  // (d g) d: overflows only where the result does
    return r;
}

__device__ __forceinline__ nc_moments nc_shuffle_down(nc_moments m, int o) {
    nc_moments r;
    r.n = __shfl_down_sync(0xffffffffu, m.n, o);
    r.mean = __shfl_down_sync(0xffffffffu, m.mean, o);
    r.m2 = __shfl_down_sync(0xffffffffu, m.m2, o);
    return r;
}

// Merge the block's per-thread moments in a fixed tree; the result is valid in thread 0.
__device__ nc_moments nc_block_moments(nc_moments m, nc_moments* shared32) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) m = nc_merge(m, nc_shuffle_down(m, o));
    if (lane == 0) shared32[warp] = m;
    __syncthreads();
    if (warp == 0) {
        nc_moments e; e.n = 0.0; e.mean = 0.0; e.m2 = 0.0;
        m = (lane < nwarps) ? shared32[lane] : e;
        for (int o = 16; o > 0; o >>= 1) m = nc_merge(m, nc_shuffle_down(m, o));
    }
    __syncthreads();
    return m;
}

// ---------------------------------------------------------------------------------------
// rows family: x is (rows, S), one block per row (grid-stride over rows)
// ---------------------------------------------------------------------------------------

// Moments of n contiguous elements by the whole block (valid in thread 0). Each thread
// sums its elements shifted by its first one (exact to log2(n / blockDim) bits: the shift
// is a member of the data), then the threads' moments merge with Chan's formula.
template <typename T>
__device__ nc_moments nc_block_row_moments(const T* p, i64 n, nc_moments* shared32) {
    typedef typename nc_acc<T>::type A;
    nc_moments m; m.n = 0.0; m.mean = 0.0; m.m2 = 0.0;
    if (threadIdx.x < n) {
        const A k = nc_ld<T, A>(p, threadIdx.x);
        A s1 = 0, s2 = 0;
        i64 count = 0;
        for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
            const A d = nc_ld<T, A>(p, i) - k;
            s1 += d;
            s2 += d * d;
            ++count;
        }
        m.n = (double)count;
        m.mean = (double)k + (double)s1 / (double)count;
        m.m2 = nc_clamp0((double)s2 - (double)s1 * ((double)s1 / (double)count));
    }
    return nc_block_moments(m, shared32);
}

template <typename T>
__global__ void nc_moments_rows(const T* x, i64 rows, i64 S, double* pmean, double* pm2) {
    __shared__ nc_moments shared[32];
    for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const nc_moments m = nc_block_row_moments(x + row * S, S, shared);
        if (threadIdx.x == 0) {
            pmean[row] = m.mean;
            pm2[row] = m.m2;
        }
    }
}

// y = (x - mean[r]) * scale[r] + shift[r] for row (a, r) of an (A, R, S) array.
template <typename T>
__global__ void nc_affine_rows(const T* x, i64 rows, i64 R, i64 S, const double* mean,
                               const double* scale, const double* shift, T* y) {
    typedef typename nc_acc<T>::type A;
    for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const i64 r = row % R;
        const A mu = (A)mean[r], s = (A)scale[r], t = (A)shift[r];
        const i64 o = row * S;
        for (i64 i = threadIdx.x; i < S; i += blockDim.x)
            nc_st<T, A>(y, o + i, (nc_ld<T, A>(x, o + i) - mu) * s + t);
    }
}

// Block sums over one row of n elements (valid in thread 0): s1 = sum g and
// s2 = sum g * (x - mu), with g = dy * w (w null: g = dy). The backward's two row sums.
template <typename T, typename A>
__device__ void nc_block_dy_sums(const T* dy, const double* w, const T* x, i64 n, A mu, A* shared32,
                                 A& s1, A& s2) {
    s1 = 0;
    s2 = 0;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
        const A g = w ? nc_ld<T, A>(dy, i) * (A)w[i] : nc_ld<T, A>(dy, i);
        s1 += g;
        s2 += g * (nc_ld<T, A>(x, i) - mu);
    }
    s1 = nc_block_sum(s1, shared32);
    s2 = nc_block_sum(s2, shared32);
}

// Per row (a, r): p1 = sum dy, p2 = sum dy * (x - mean[r]).
template <typename T>
__global__ void nc_sums_rows(const T* dy, const T* x, i64 rows, i64 R, i64 S, const double* mean,
                             double* p1, double* p2) {
    typedef typename nc_acc<T>::type A;
    __shared__ A shared[32];
    for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
        A s1, s2;
        nc_block_dy_sums(dy + row * S, (const double*)0, x + row * S, S, (A)mean[row % R], shared, s1, s2);
        if (threadIdx.x == 0) {
            p1[row] = (double)s1;
            p2[row] = (double)s2;
        }
    }
}

// dx[i] = v, plus dh[i] when dh is not null: after v's rounding to T, in T's own arithmetic
// (nc_add's), as NumPy's dx + dh
template <typename T, typename A> __device__ __forceinline__ void nc_st_dh(T* dx, i64 i, A v, const T* dh) {
    if (!dh) {
        nc_st<T, A>(dx, i, v);
        return;
    }
    T t[1];
    nc_st<T, A>(t, 0, v);
    nc_sum_to<T>(dx, i, t, 0, dh, i);
}

// dx = dy * k1[r] + (x - mean[r]) * k2[r] + k3[r] (+ dh)
template <typename T>
__global__ void nc_dx_rows(const T* dy, const T* x, i64 rows, i64 R, i64 S, const double* mean,
                           const double* k1, const double* k2, const double* k3, const T* dh, T* dx) {
    typedef typename nc_acc<T>::type A;
    for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const i64 r = row % R;
        const A mu = (A)mean[r], a1 = (A)k1[r], a2 = (A)k2[r], a3 = (A)k3[r];
        const i64 o = row * S;
        for (i64 i = threadIdx.x; i < S; i += blockDim.x)
            nc_st_dh<T, A>(dx, o + i, nc_ld<T, A>(dy, o + i) * a1 + (nc_ld<T, A>(x, o + i) - mu) * a2 + a3, dh);
    }
}

// Parameters along S (layer norm): y = (x - mean[r]) * rstd[r] * w[rp[r] + s] + b[rp[r] + s]
template <typename T>
__global__ void nc_affine_inner(const T* x, i64 R, i64 S, const double* mean, const double* rstd,
                                const i64* rp, const double* w, const double* b, T* y) {
    typedef typename nc_acc<T>::type A;
    for (i64 r = blockIdx.x; r < R; r += gridDim.x) {
        const A mu = (A)mean[r], rs = (A)rstd[r];
        const double* wr = w + rp[r];
        const double* br = b + rp[r];
        const i64 o = r * S;
        for (i64 i = threadIdx.x; i < S; i += blockDim.x)
            nc_st<T, A>(y, o + i, (nc_ld<T, A>(x, o + i) - mu) * rs * (A)wr[i] + (A)br[i]);
    }
}

// Per row: s1 = sum dy * w, s2 = sum dy * w * (x - mean) * rstd (parameters along S).
template <typename T>
__global__ void nc_row_sums_inner(const T* dy, const T* x, i64 R, i64 S, const double* mean,
                                  const double* rstd, const i64* rp, const double* w,
                                  double* s1out, double* s2out) {
    typedef typename nc_acc<T>::type A;
    __shared__ A shared[32];
    for (i64 r = blockIdx.x; r < R; r += gridDim.x) {
        A s1, s2;
        nc_block_dy_sums(dy + r * S, w + rp[r], x + r * S, S, (A)mean[r], shared, s1, s2);
        if (threadIdx.x == 0) {
            s1out[r] = (double)s1;
            s2out[r] = (double)s2 * rstd[r];
        }
    }
}

// dweight / dbias partials of parameters along S: block (k, column tile) sums rows
// [k * rpb, (k + 1) * rpb) into pdw[k, rp[r] + s]. Parameter slices are whole rows
// (rp[r] is a multiple of S), so no two threads ever touch the same entry.
template <typename T>
__global__ void nc_param_sums_inner(const T* dy, const T* x, i64 R, i64 S, const double* mean,
                                    const double* rstd, const i64* rp, i64 rpb, i64 P,
                                    double* pdw, double* pdb) {
    typedef typename nc_acc<T>::type A;
    const i64 k = blockIdx.x;
    const i64 r0 = k * rpb, r1 = nc_min(R, r0 + rpb);
    double* dw = pdw + k * P;
    double* db = pdb + k * P;
    // grid-stride over s: the grid's y extent is capped at the device limit (65535)
    for (i64 s = (i64)blockIdx.y * blockDim.x + threadIdx.x; s < S; s += (i64)gridDim.y * blockDim.x) {
        i64 cur = -1;
        A aw = 0, ab = 0;
        for (i64 r = r0; r < r1; ++r) {
            if (rp[r] != cur) {
                if (cur >= 0) { dw[cur + s] += (double)aw; db[cur + s] += (double)ab; }
                cur = rp[r];
                aw = 0;
                ab = 0;
            }
            const A g = nc_ld<T, A>(dy, r * S + s);
            aw += g * ((nc_ld<T, A>(x, r * S + s) - (A)mean[r]) * (A)rstd[r]);
            ab += g;
        }
        if (cur >= 0) { dw[cur + s] += (double)aw; db[cur + s] += (double)ab; }
    }
}

// dx = rstd * (dy * w - c1[r] - (x - mean) * rstd * c2[r]) (+ dh)  (parameters along S)
template <typename T>
__global__ void nc_dx_inner(const T* dy, const T* x, i64 R, i64 S, const double* mean,
                            const double* rstd, const i64* rp, const double* w, const double* c1,
                            const double* c2, const T* dh, T* dx) {
    typedef typename nc_acc<T>::type A;
    for (i64 r = blockIdx.x; r < R; r += gridDim.x) {
        const A mu = (A)mean[r], rs = (A)rstd[r], m1 = (A)c1[r], m2 = (A)c2[r];
        const double* wr = w + rp[r];
        const i64 o = r * S;
        for (i64 i = threadIdx.x; i < S; i += blockDim.x)
            nc_st_dh<T, A>(dx, o + i,
                           rs * (nc_ld<T, A>(dy, o + i) * (A)wr[i] - m1 - (nc_ld<T, A>(x, o + i) - mu) * rs * m2), dh);
    }
}

// ---------------------------------------------------------------------------------------
// cols family: x is (A, C); block (32, 8) covers 32 columns of rows [k * rpb, (k+1) * rpb)
// with blockIdx.x = k and a grid-stride loop over column tiles in y
// ---------------------------------------------------------------------------------------

// NC_COL_TILE (columns per block) and NC_COL_STRIPES (row stripes per block) come from
// normcore.gpu as -D options (gpu.compile_options()), which sizes the launches with them.
#if !defined(NC_COL_TILE) || !defined(NC_COL_STRIPES)
#error "compile with normcore.gpu.compile_options(): NC_COL_TILE and NC_COL_STRIPES are set there"
#endif

// Partial moments per (row block, column), shifted by the block's first row as on the CPU.
template <typename T>
__global__ void nc_moments_cols(const T* x, i64 Arows, i64 C, i64 rpb, double* pmean, double* pm2) {
    typedef typename nc_acc<T>::type A;
    __shared__ A sh1[NC_COL_STRIPES][NC_COL_TILE + 1];
    __shared__ A sh2[NC_COL_STRIPES][NC_COL_TILE + 1];
    const i64 k = blockIdx.x, r0 = k * rpb, r1 = nc_min(Arows, r0 + rpb);
    const int tx = threadIdx.x, ty = threadIdx.y;
    for (i64 tile = blockIdx.y; tile * NC_COL_TILE < C; tile += gridDim.y) {
        const i64 c = tile * NC_COL_TILE + tx;
        A s1 = 0, s2 = 0, shift = 0;
        if (c < C) {
            shift = nc_ld<T, A>(x, r0 * C + c);
            for (i64 r = r0 + ty; r < r1; r += NC_COL_STRIPES) {
                const A d = nc_ld<T, A>(x, r * C + c) - shift;
                s1 += d;
                s2 += d * d;
            }
        }
        sh1[ty][tx] = s1;
        sh2[ty][tx] = s2;
        __syncthreads();
        if (ty == 0 && c < C) {
            double t1 = 0.0, t2 = 0.0;
            for (int j = 0; j < NC_COL_STRIPES; ++j) { t1 += (double)sh1[j][tx]; t2 += (double)sh2[j][tx]; }
            const double n = (double)(r1 - r0);
            pmean[k * C + c] = (double)shift + t1 / n;
            pm2[k * C + c] = nc_clamp0(t2 - t1 * (t1 / n));
        }
        __syncthreads();
    }
}

// Partial sums per (row block, column): p1 = sum dy, p2 = sum dy * (x - mean[c]).
template <typename T>
__global__ void nc_sums_cols(const T* dy, const T* x, i64 Arows, i64 C, i64 rpb, const double* mean,
                             double* p1, double* p2) {
    typedef typename nc_acc<T>::type A;
    __shared__ A sh1[NC_COL_STRIPES][NC_COL_TILE + 1];
    __shared__ A sh2[NC_COL_STRIPES][NC_COL_TILE + 1];
    const i64 k = blockIdx.x, r0 = k * rpb, r1 = nc_min(Arows, r0 + rpb);
    const int tx = threadIdx.x, ty = threadIdx.y;
    for (i64 tile = blockIdx.y; tile * NC_COL_TILE < C; tile += gridDim.y) {
        const i64 c = tile * NC_COL_TILE + tx;
        A s1 = 0, s2 = 0;
        if (c < C) {
            const A mu = (A)mean[c];
            for (i64 r = r0 + ty; r < r1; r += NC_COL_STRIPES) {
                const A g = nc_ld<T, A>(dy, r * C + c);
                s1 += g;
                s2 += g * (nc_ld<T, A>(x, r * C + c) - mu);
            }
        }
        sh1[ty][tx] = s1;
        sh2[ty][tx] = s2;
        __syncthreads();
        if (ty == 0 && c < C) {
            double t1 = 0.0, t2 = 0.0;
            for (int j = 0; j < NC_COL_STRIPES; ++j) { t1 += (double)sh1[j][tx]; t2 += (double)sh2[j][tx]; }
            p1[k * C + c] = t1;
            p2[k * C + c] = t2;
        }
        __syncthreads();
    }
}

// y = (x - mean[c]) * scale[c] + shift[c] on an (A, C) array; each thread keeps its
// column's coefficients in registers while it walks rows.
template <typename T>
__global__ void nc_affine_cols(const T* x, i64 Arows, i64 C, i64 rpb, const double* mean,
                               const double* scale, const double* shift, T* y) {
    typedef typename nc_acc<T>::type A;
    const i64 k = blockIdx.x, r0 = k * rpb, r1 = nc_min(Arows, r0 + rpb);
    for (i64 tile = blockIdx.y; tile * NC_COL_TILE < C; tile += gridDim.y) {
        const i64 c = tile * NC_COL_TILE + threadIdx.x;
        if (c >= C) continue;
        const A mu = (A)mean[c], s = (A)scale[c], t = (A)shift[c];
        for (i64 r = r0 + threadIdx.y; r < r1; r += NC_COL_STRIPES)
            nc_st<T, A>(y, r * C + c, (nc_ld<T, A>(x, r * C + c) - mu) * s + t);
    }
}

template <typename T>
__global__ void nc_dx_cols(const T* dy, const T* x, i64 Arows, i64 C, i64 rpb, const double* mean,
                           const double* k1, const double* k2, const double* k3, const T* dh, T* dx) {
    typedef typename nc_acc<T>::type A;
    const i64 k = blockIdx.x, r0 = k * rpb, r1 = nc_min(Arows, r0 + rpb);
    for (i64 tile = blockIdx.y; tile * NC_COL_TILE < C; tile += gridDim.y) {
        const i64 c = tile * NC_COL_TILE + threadIdx.x;
        if (c >= C) continue;
        const A mu = (A)mean[c], a1 = (A)k1[c], a2 = (A)k2[c], a3 = (A)k3[c];
        for (i64 r = r0 + threadIdx.y; r < r1; r += NC_COL_STRIPES)
            nc_st_dh<T, A>(dx, r * C + c,
                           nc_ld<T, A>(dy, r * C + c) * a1 + (nc_ld<T, A>(x, r * C + c) - mu) * a2 + a3, dh);
    }
}

// ---------------------------------------------------------------------------------------
// One-pass forward when every group is contiguous (A == 1): block c computes group c's
// moments, then normalizes its J rows of S while they are in L1/L2 (CPU normalize_groups)
// ---------------------------------------------------------------------------------------

// affine: NC_AFFINE_NONE, NC_AFFINE_ROW (one w/b per row, w[rp[r]]) or NC_AFFINE_INNER
// (w/b along S, w[rp[r] + s]); the values come from contract.h through -D options
// With a residual r (else a null pointer, and h too) the group normalized is h = x0 + r
// (nc_add's rounding), written by the block before its moments read it back.
template <typename T>
__global__ void nc_normalize_groups(const T* x0, const T* r, T* h, i64 C, i64 B, i64 J, i64 center,
                                    i64 eps_bits, i64 affine, const i64* rp, const double* w, const double* b,
                                    double* mean, double* var, double* rstd, T* y) {
    typedef typename nc_acc<T>::type A;
    const double eps = __longlong_as_double(eps_bits);
    __shared__ nc_moments shared[32];
    __shared__ double stats[2];
    const i64 S = B / J;
    const T* x = r ? (const T*)h : x0;
    for (i64 c = blockIdx.x; c < C; c += gridDim.x) {
        if (r) {
            for (i64 i = threadIdx.x; i < B; i += blockDim.x)
                nc_sum_to<T>(h, c * B + i, x0, c * B + i, r, c * B + i);
            __syncthreads();  // the block's writes of h are visible to its reads below
        }
        const nc_moments m = nc_block_row_moments(x + c * B, B, shared);
        if (threadIdx.x == 0) {
            double mu = m.mean, v = m.m2 / (double)B;
            // no representable variance (overflow): NaN, as the CPU kernels
            // (x - x == 0 exactly when x is finite; no headers for isfinite or NAN under NVRTC)
            const double mm = v + mu * mu;
            if (!(mu - mu == 0.0 && v - v == 0.0 && (center || mm - mm == 0.0)))
                mu = v = __longlong_as_double(0x7ff8000000000000LL);
            if (!center) {
                v = v + mu * mu;
                mu = 0.0;
            }
            const double rs = 1.0 / sqrt(v + eps);
            mean[c] = mu;
            var[c] = v;
            rstd[c] = rs;
            stats[0] = mu;
            stats[1] = rs;
        }
        __syncthreads();
        const A mu = (A)stats[0], rs = (A)stats[1];
        for (i64 j = 0; j < J; ++j) {
            const i64 r = c * J + j, o = c * B + j * S;
            if (affine == NC_AFFINE_INNER) {
                const double* wr = w + rp[r];
                const double* br = b + rp[r];
                for (i64 i = threadIdx.x; i < S; i += blockDim.x)
                    nc_st<T, A>(y, o + i, (nc_ld<T, A>(x, o + i) - mu) * rs * (A)wr[i] + (A)br[i]);
            } else {
                const A s = affine == NC_AFFINE_ROW ? rs * (A)w[rp[r]] : rs, t = affine == NC_AFFINE_ROW ? (A)b[rp[r]] : (A)0;
                for (i64 i = threadIdx.x; i < S; i += blockDim.x)
                    nc_st<T, A>(y, o + i, (nc_ld<T, A>(x, o + i) - mu) * s + t);
            }
        }
        __syncthreads();  // stats[] is rewritten by the next group
    }
}

// ---------------------------------------------------------------------------------------
// Masked statistics: mask bytes (nonzero: counted) by rows of the kernel's view of x, as on
// the CPU (normcore/masking.py): row r's bytes start at m[off[r]] and advance by step (0:
// one byte for the row). Moments over the counted elements, with their counts; the dx
// passes add the statistics terms only where counted (the sums of backward are the plain
// ones: y is everywhere).
// ---------------------------------------------------------------------------------------

// A thread's (count, mean, m2) of counted elements, shifted by its first counted one.
template <typename A>
__device__ __forceinline__ nc_moments nc_counted(i64 count, A shift, A s1, A s2) {
    nc_moments r;
    r.n = (double)count;
    r.mean = count ? (double)shift + (double)s1 / (double)count : 0.0;
    r.m2 = count ? nc_clamp0((double)s2 - (double)s1 * ((double)s1 / (double)count)) : 0.0;
    return r;
}

// Per group g (rows g * J .. g * J + J - 1 of S elements): block-wide moments of the
// counted elements.
template <typename T>
__global__ void nc_masked_moments_rows(const T* x, const unsigned char* m, const i64* off, i64 step, i64 groups,
                                       i64 J, i64 S, double* pmean, double* pm2, double* pcount) {
    typedef typename nc_acc<T>::type A;
    __shared__ nc_moments shared[32];
    for (i64 g = blockIdx.x; g < groups; g += gridDim.x) {
        const T* p = x + g * J * S;
        A shift = 0, s1 = 0, s2 = 0;
        i64 count = 0;
        for (i64 e = threadIdx.x; e < J * S; e += blockDim.x) {
            const i64 j = e / S, i = e - j * S;
            if (!m[off[g * J + j] + i * step]) continue;
            const A v = nc_ld<T, A>(p, e);
            if (count == 0) shift = v;
            const A d = v - shift;
            s1 += d;
            s2 += d * d;
            ++count;
        }
        const nc_moments r = nc_block_moments(nc_counted(count, shift, s1, s2), shared);
        if (threadIdx.x == 0) {
            pmean[g] = r.mean;
            pm2[g] = r.m2;
            pcount[g] = r.n;
        }
    }
}

// Per (row block, column) of (A, C), row a's bytes at m[off[a]]; each row stripe shifts by
// its first counted row, and the stripes merge in order.
template <typename T>
__global__ void nc_masked_moments_cols(const T* x, const unsigned char* m, const i64* off, i64 step, i64 Arows,
                                       i64 C, i64 rpb, double* pmean, double* pm2, double* pcount) {
    typedef typename nc_acc<T>::type A;
    __shared__ nc_moments sh[NC_COL_STRIPES][NC_COL_TILE + 1];
    const i64 k = blockIdx.x, r0 = k * rpb, r1 = nc_min(Arows, r0 + rpb);
    const int tx = threadIdx.x, ty = threadIdx.y;
    for (i64 tile = blockIdx.y; tile * NC_COL_TILE < C; tile += gridDim.y) {
        const i64 c = tile * NC_COL_TILE + tx;
        A shift = 0, s1 = 0, s2 = 0;
        i64 count = 0;
        if (c < C) {
            for (i64 r = r0 + ty; r < r1; r += NC_COL_STRIPES) {
                if (!m[off[r] + c * step]) continue;
                const A v = nc_ld<T, A>(x, r * C + c);
                if (count == 0) shift = v;
                const A d = v - shift;
                s1 += d;
                s2 += d * d;
                ++count;
            }
        }
        sh[ty][tx] = nc_counted(count, shift, s1, s2);
        __syncthreads();
        if (ty == 0 && c < C) {
            nc_moments t = sh[0][tx];
            for (int j = 1; j < NC_COL_STRIPES; ++j) t = nc_merge(t, sh[j][tx]);
            pmean[k * C + c] = t.mean;
            pm2[k * C + c] = t.m2;
            pcount[k * C + c] = t.n;
        }
        __syncthreads();
    }
}

// dx = dy * k1[r] + (x - mean[r]) * k2[r] + k3[r] where counted, 0 where not (masked-out
// positions are not data) on (A, R, S), rows of S
template <typename T>
__global__ void nc_masked_dx_rows(const T* dy, const T* x, const unsigned char* m, const i64* off, i64 step,
                                  i64 rows, i64 R, i64 S, const double* mean, const double* k1, const double* k2,
                                  const double* k3, const T* dh, T* dx) {
    typedef typename nc_acc<T>::type A;
    for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const i64 r = row % R;
        const A mu = (A)mean[r], a1 = (A)k1[r], a2 = (A)k2[r], a3 = (A)k3[r];
        const i64 o = row * S;
        const unsigned char* mr = m + off[row];
        for (i64 i = threadIdx.x; i < S; i += blockDim.x) {
            const A t = (nc_ld<T, A>(x, o + i) - mu) * a2 + a3;
            nc_st_dh<T, A>(dx, o + i, mr[i * step] ? nc_ld<T, A>(dy, o + i) * a1 + t : (A)0, dh);
        }
    }
}

// the same on (A, C), coefficients per column, row a's bytes at m[off[a]]
template <typename T>
__global__ void nc_masked_dx_cols(const T* dy, const T* x, const unsigned char* m, const i64* off, i64 step,
                                  i64 Arows, i64 C, i64 rpb, const double* mean, const double* k1,
                                  const double* k2, const double* k3, const T* dh, T* dx) {
    typedef typename nc_acc<T>::type A;
    const i64 k = blockIdx.x, r0 = k * rpb, r1 = nc_min(Arows, r0 + rpb);
    for (i64 tile = blockIdx.y; tile * NC_COL_TILE < C; tile += gridDim.y) {
        const i64 c = tile * NC_COL_TILE + threadIdx.x;
        if (c >= C) continue;
        const A mu = (A)mean[c], a1 = (A)k1[c], a2 = (A)k2[c], a3 = (A)k3[c];
        for (i64 r = r0 + threadIdx.y; r < r1; r += NC_COL_STRIPES) {
            const A t = (nc_ld<T, A>(x, r * C + c) - mu) * a2 + a3;
            nc_st_dh<T, A>(dx, r * C + c, m[off[r] + c * step] ? nc_ld<T, A>(dy, r * C + c) * a1 + t : (A)0, dh);
        }
    }
}

// dx = rstd * (dy * w - (c1[r] + xhat * c2[r])) where counted, 0 where not (parameters along S)
template <typename T>
__global__ void nc_masked_dx_inner(const T* dy, const T* x, const unsigned char* m, const i64* off, i64 step,
                                   i64 R, i64 S, const double* mean, const double* rstd, const i64* rp,
                                   const double* w, const double* c1, const double* c2, const T* dh, T* dx) {
    typedef typename nc_acc<T>::type A;
    for (i64 r = blockIdx.x; r < R; r += gridDim.x) {
        const A mu = (A)mean[r], rs = (A)rstd[r], m1 = (A)c1[r], m2 = (A)c2[r];
        const double* wr = w + rp[r];
        const i64 o = r * S;
        const unsigned char* mr = m + off[r];
        for (i64 i = threadIdx.x; i < S; i += blockDim.x) {
            const A t = m1 + (nc_ld<T, A>(x, o + i) - mu) * rs * m2;
            nc_st_dh<T, A>(dx, o + i, mr[i * step] ? rs * (nc_ld<T, A>(dy, o + i) * (A)wr[i] - t) : (A)0, dh);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Merge of K partial moments per column (two-pass over the partial means, fixed order)
// ---------------------------------------------------------------------------------------

__global__ void nc_combine_moments(const double* pmean, const double* pm2, const double* pcount,
                                   i64 K, i64 C, double* mean, double* m2, double* n) {
    // pcount (K, C): the elements behind each partial; one without elements adds nothing
    for (i64 c = (i64)blockIdx.x * blockDim.x + threadIdx.x; c < C; c += (i64)gridDim.x * blockDim.x) {
        double total = 0.0, s = 0.0;
        for (i64 k = 0; k < K; ++k) {
            total += pcount[k * C + c];
            s += pcount[k * C + c] * pmean[k * C + c];
        }
        const double mu = total != 0.0 ? s / total : 0.0;
        double q = 0.0;
        for (i64 k = 0; k < K; ++k) {
            if (pcount[k * C + c] == 0.0) continue;
            const double d = pmean[k * C + c] - mu;
            q += pm2[k * C + c] + pcount[k * C + c] * d * d;
        }
        mean[c] = mu;
        m2[c] = q;
        n[c] = total;
    }
}

#ifdef NORMCORE_INSTANTIATE
// Compile every template for every storage type (used by the build check: nvcc -c).
#define NC_INSTANTIATE(T)                                                                          \
    template __global__ void nc_moments_rows<T>(const T*, i64, i64, double*, double*);             \
    template __global__ void nc_affine_rows<T>(const T*, i64, i64, i64, const double*,             \
                                               const double*, const double*, T*);                  \
    template __global__ void nc_sums_rows<T>(const T*, const T*, i64, i64, i64, const double*,     \
                                             double*, double*);                                    \
    template __global__ void nc_dx_rows<T>(const T*, const T*, i64, i64, i64, const double*,       \
                                           const double*, const double*, const double*, const T*,  \
                                           T*);                                                    \
    template __global__ void nc_affine_inner<T>(const T*, i64, i64, const double*, const double*,  \
                                                const i64*, const double*, const double*, T*);     \
    template __global__ void nc_row_sums_inner<T>(const T*, const T*, i64, i64, const double*,     \
                                                  const double*, const i64*, const double*,        \
                                                  double*, double*);                               \
    template __global__ void nc_param_sums_inner<T>(const T*, const T*, i64, i64, const double*,   \
                                                    const double*, const i64*, i64, i64, double*,  \
                                                    double*);                                      \
    template __global__ void nc_dx_inner<T>(const T*, const T*, i64, i64, const double*,           \
                                            const double*, const i64*, const double*,              \
                                            const double*, const double*, const T*, T*);           \
    template __global__ void nc_moments_cols<T>(const T*, i64, i64, i64, double*, double*);        \
    template __global__ void nc_sums_cols<T>(const T*, const T*, i64, i64, i64, const double*,     \
                                             double*, double*);                                    \
    template __global__ void nc_affine_cols<T>(const T*, i64, i64, i64, const double*,             \
                                               const double*, const double*, T*);                  \
    template __global__ void nc_dx_cols<T>(const T*, const T*, i64, i64, i64, const double*,       \
                                           const double*, const double*, const double*, const T*,  \
                                           T*);                                                    \
    template __global__ void nc_normalize_groups<T>(const T*, const T*, T*, i64, i64, i64, i64,    \
                                                    i64, i64, const i64*, const double*,           \
                                                    const double*, double*, double*, double*, T*); \
    template __global__ void nc_add<T>(const T*, const T*, i64, T*);                                \
    template __global__ void nc_masked_moments_rows<T>(const T*, const unsigned char*, const i64*, i64, i64, \
                                                       i64, i64, double*, double*, double*);       \
    template __global__ void nc_masked_moments_cols<T>(const T*, const unsigned char*, const i64*, i64, i64, \
                                                       i64, i64, double*, double*, double*);       \
    template __global__ void nc_masked_dx_rows<T>(const T*, const T*, const unsigned char*, const i64*, \
                                                  i64, i64, i64, i64, const double*, const double*, \
                                                  const double*, const double*, const T*, T*);     \
    template __global__ void nc_masked_dx_cols<T>(const T*, const T*, const unsigned char*, const i64*, \
                                                  i64, i64, i64, i64, const double*, const double*, \
                                                  const double*, const double*, const T*, T*);     \
    template __global__ void nc_masked_dx_inner<T>(const T*, const T*, const unsigned char*, const i64*, \
                                                   i64, i64, i64, const double*, const double*,    \
                                                   const i64*, const double*, const double*,       \
                                                   const double*, const T*, T*);
NC_INSTANTIATE(float)
NC_INSTANTIATE(double)
NC_INSTANTIATE(nc_bf16)
NC_INSTANTIATE(nc_f16)
#endif
