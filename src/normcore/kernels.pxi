"""Compiled kernels shared by every normalization mode (included by _kernels*.pyx).

Design
------
The planner (normcore/plan.py) maps every mode onto C-contiguous canonical arrays:

* statistics layout (A, C, B): group ``c`` reduces over the outer axis ``a`` and the inner
  axis ``b``;
* elementwise layout (A, R, S), a finer view of the same memory: each row ``r`` belongs to
  one statistics group, and either has one parameter value for all its S elements
  ("row" kernels: per-row scale and shift) or walks a contiguous parameter slice
  w[rp[r] : rp[r] + S] ("inner" kernels: layer norm, RMS norm).

Reductions come in two memory patterns:

* rows (B > 1, or A == 1): a contiguous row is reduced on its own and rows of one group
  are merged in order;
* columns (B == 1): groups are the columns of an (A, C) matrix; rows are cut into fixed
  blocks, each block reduces its columns into its own row of a partial buffer (no atomics,
  no shared scratch), and partials are merged in block order.

Block boundaries depend only on the shape, never on the thread count, and partials are
merged in a fixed order, so results are bitwise identical for any number of threads.

Accumulation is always in double. Row sums run in simd.h: 8 independent lanes of vector
types (GCC's auto-vectorizer will not take a loop carrying two accumulators), combined in a
fixed order, IEEE semantics kept (no -ffast-math), the order never depending on threads.
Never E[x^2] - E[x]^2: row moments sum deviations from the chunk's first element in one
pass over chunks of at most CHUNK elements, merged by Chan's formula; column tiles use
sums shifted by one of their own rows (see _tile_col_moments); with the shift a member of
the data, the subtraction loses at most log2(count + 1) bits of double. Partial moments of
rows and blocks merge by the two-pass formula over their means. The elementwise passes subtract the mean first and evaluate in double, so a
large common offset in x does not cost float32 digits.

When A == 1 every group is contiguous, and normalize_groups computes a group's statistics
and writes its output in one visit, while the group is in cache.

The kernels check nothing: normcore/functional.py validates shapes, dtypes and sizes.
"""
from cython.parallel cimport prange, threadid
from libc.math cimport sqrt

ctypedef fused floating:
    float
    double

cdef extern from "contract.h":
    cdef enum nc_affine_kind:
        NC_AFFINE_NONE
        NC_AFFINE_ROW
        NC_AFFINE_INNER

# The contract's affine kinds, read by normcore.contract (one definition: contract.h).
AFFINE_KINDS = {"none": NC_AFFINE_NONE, "row": NC_AFFINE_ROW, "inner": NC_AFFINE_INNER}

cdef enum:
    # tiles at least this wide: their float64 coefficient vectors (3-4 x 8 bytes per
    # column) no longer fit in L1 beside the streamed rows
    WIDE_TILE = 1024
    # the same for column reductions, whose two accumulator vectors stay in L1 up to here
    # (measured: at 1024 columns the per-row form is faster, at 4096 the sweeps are)
    WIDE_REDUCTION = 2048
    TILE = 4096  # columns per tile in column kernels (measured: wider tiles stream rows better)
    CACHED_ELEMS = 65536  # elements of a block of rows re-read from L2 by a second pass

# Elements per chunk of row moments: bounds the bits a shifted sum can lose (12).
cdef Py_ssize_t CHUNK = 4096


# ---------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------

cdef inline Py_ssize_t _block_rows(Py_ssize_t k, Py_ssize_t rows_per_block,
                                   Py_ssize_t total) noexcept nogil:
    # Rows in block k: blocks are full but the last.
    cdef Py_ssize_t rows = total - k * rows_per_block
    return rows_per_block if rows > rows_per_block else rows


cdef inline void _merge(double* n, double* mean, double* m2,
                        double nb, double meanb, double m2b) noexcept nogil:
    # Chan et al.: exact merge of two (count, mean, centered sum of squares) triples.
    cdef double tot = n[0] + nb
    cdef double d = meanb - mean[0]
    if nb == 0:
        return
    mean[0] = mean[0] + d * nb / tot
    m2[0] = m2[0] + m2b + d * d * n[0] * nb / tot
    n[0] = tot


cdef extern from "simd.h" nogil:
    void nc_shifted_sums_f32(const float* p, Py_ssize_t n, double k, double* s1, double* s2)
    void nc_shifted_sums_f64(const double* p, Py_ssize_t n, double k, double* s1, double* s2)
    void nc_dy_sums_f32(const float* dy, const double* w, const float* x, Py_ssize_t n, double mu,
                        double* s1, double* s2)
    void nc_dy_sums_f64(const double* dy, const double* w, const double* x, Py_ssize_t n, double mu,
                        double* s1, double* s2)
    void nc_affine_tile_f32(const float* x, float* y, Py_ssize_t rows, Py_ssize_t ld, Py_ssize_t tw,
                            const double* mean, const double* scale, const double* shift)
    void nc_affine_tile_f64(const double* x, double* y, Py_ssize_t rows, Py_ssize_t ld, Py_ssize_t tw,
                            const double* mean, const double* scale, const double* shift)
    void nc_col_shifted_sums_f32(const float* x, Py_ssize_t rows, Py_ssize_t ld, Py_ssize_t tw,
                                 double* s1, double* s2)
    void nc_col_shifted_sums_f64(const double* x, Py_ssize_t rows, Py_ssize_t ld, Py_ssize_t tw,
                                 double* s1, double* s2)
    void nc_col_dy_sums_f32(const float* dy, const float* x, Py_ssize_t rows, Py_ssize_t ld,
                            Py_ssize_t tw, const double* mean, double* s1, double* s2)
    void nc_col_dy_sums_f64(const double* dy, const double* x, Py_ssize_t rows, Py_ssize_t ld,
                            Py_ssize_t tw, const double* mean, double* s1, double* s2)
    void nc_dx_tile_f32(const float* dy, const float* x, float* dx, Py_ssize_t rows, Py_ssize_t ld,
                        Py_ssize_t tw, const double* mean, const double* k1, const double* k2,
                        const double* k3)
    void nc_dx_tile_f64(const double* dy, const double* x, double* dx, Py_ssize_t rows, Py_ssize_t ld,
                        Py_ssize_t tw, const double* mean, const double* k1, const double* k2,
                        const double* k3)


cdef inline void _row_moments(const floating* p, Py_ssize_t n,
                              double* out_mean, double* out_m2) noexcept nogil:
    # Per chunk, one pass of sums shifted by the chunk's first element (see simd.h for the
    # error bound), then Chan merges across chunks.
    cdef Py_ssize_t start = 0, m
    cdef double count = 0.0, mean = 0.0, m2 = 0.0, k, s1, s2
    while start < n:
        m = n - start
        if m > CHUNK:
            m = CHUNK
        k = p[start]
        if floating is float:
            nc_shifted_sums_f32(p + start, m, k, &s1, &s2)
        else:
            nc_shifted_sums_f64(p + start, m, k, &s1, &s2)
        _merge(&count, &mean, &m2, <double>m, k + s1 / m, max(s2 - s1 * s1 / m, 0.0))
        start = start + m
    out_mean[0] = mean
    out_m2[0] = m2


# ---------------------------------------------------------------------------------------
# Forward statistics on the (A, C, B) layout
# ---------------------------------------------------------------------------------------

def moments_rows(const floating[:, :, ::1] x,    # IN  (A, C, B)
                 double[:, ::1] pmean,           # OUT (A, C) mean of each row
                 double[:, ::1] pm2,            # OUT (A, C) centered sum of squares
                 int threads):                 # OpenMP threads for this call
    cdef Py_ssize_t A = x.shape[0], C = x.shape[1], B = x.shape[2]
    cdef Py_ssize_t r, a, c
    with nogil:
        for r in prange(A * C, schedule='static', num_threads=threads, use_threads_if=threads > 1):
            a = r // C
            c = r - a * C
            _row_moments(&x[a, c, 0], B, &pmean[a, c], &pm2[a, c])


cdef inline void _tile_col_moments(const floating* x, Py_ssize_t rows, Py_ssize_t ld,
                                   Py_ssize_t tw, double* mean, double* m2) noexcept nogil:
    # One pass of sums shifted by the tile's first row k: with d = x - k,
    # m2 = sum d^2 - (sum d)^2 / rows. As k is a member of the block, (k - mean)^2 is at
    # most (rows - 1) / rows * m2, so sum d^2 <= rows * m2 and the subtraction loses at
    # most log2(rows) bits of double (rows <= 128): exact enough for any input. Columns are
    # independent lanes, so the loops vectorize across c.
    cdef Py_ssize_t r, c
    cdef const floating* row
    cdef double d, s
    for c in range(tw):
        mean[c] = 0.0
        m2[c] = 0.0
    if tw >= WIDE_REDUCTION:  # simd.h: several rows per load and store of the accumulators
        if floating is float:
            nc_col_shifted_sums_f32(x, rows, ld, tw, mean, m2)
        else:
            nc_col_shifted_sums_f64(x, rows, ld, tw, mean, m2)
    else:
        for r in range(1, rows):
            row = x + r * ld
            for c in range(tw):
                d = row[c] - x[c]
                mean[c] += d
                m2[c] += d * d
    for c in range(tw):
        s = mean[c]
        mean[c] = x[c] + s / rows
        m2[c] = max(m2[c] - s * s / rows, 0.0)


def moments_cols(const floating[:, ::1] x,       # IN  (A, C)
                 Py_ssize_t rows_per_block,
                 double[:, ::1] pmean,           # OUT (nblocks, C)
                 double[:, ::1] pm2,            # OUT (nblocks, C)
                 int threads):                 # OpenMP threads for this call
    cdef Py_ssize_t A = x.shape[0], C = x.shape[1], nb = pmean.shape[0]
    cdef Py_ssize_t k, c0, r0, t
    with nogil:
        for k in prange(nb, schedule='static', num_threads=threads, use_threads_if=threads > 1):
            r0 = k * rows_per_block
            for t in range((C + TILE - 1) // TILE):
                c0 = t * TILE
                _tile_col_moments(&x[r0, c0], _block_rows(k, rows_per_block, A), C,
                                  _block_rows(t, TILE, C), &pmean[k, c0], &pm2[k, c0])


def combine_moments(const double[:, ::1] pmean,  # IN  (K, C) partial means
                    const double[:, ::1] pm2,    # IN  (K, C) partial centered sums of squares
                    const double[::1] counts,    # IN  (K,)   elements behind each partial
                    double[::1] mean,            # OUT (C,)
                    double[::1] m2,             # OUT (C,)
                    int threads):                 # OpenMP threads for this call
    """Exact merge of K partials per column: the two-pass formula over the partial means,
    mean = sum(n_k mean_k) / N, m2 = sum(m2_k + n_k (mean_k - mean)^2), in a fixed order.
    (Chan's pairwise merge gives the same result but divides twice per partial.)"""
    cdef Py_ssize_t K = pmean.shape[0], C = pmean.shape[1]
    cdef Py_ssize_t k, t
    cdef double total = 0.0
    for k in range(K):
        total = total + counts[k]
    with nogil:
        # column tiles in parallel; within a tile the partial rows are read contiguously
        for t in prange((C + TILE - 1) // TILE, schedule='static', num_threads=threads, use_threads_if=threads > 1):
            _combine_tile(&pmean[0, t * TILE], &pm2[0, t * TILE], &counts[0], K, C,
                          _block_rows(t, TILE, C), total, &mean[t * TILE], &m2[t * TILE])


cdef inline void _combine_tile(const double* pmean, const double* pm2, const double* counts,
                               Py_ssize_t K, Py_ssize_t ld, Py_ssize_t tw, double total,
                               double* mean, double* m2) noexcept nogil:
    cdef Py_ssize_t k, c
    cdef double d
    for c in range(tw):
        mean[c] = 0.0
        m2[c] = 0.0
    for k in range(K):
        for c in range(tw):
            mean[c] += counts[k] * pmean[k * ld + c]
    for c in range(tw):
        mean[c] /= total
    for k in range(K):
        for c in range(tw):
            d = pmean[k * ld + c] - mean[c]
            m2[c] += pm2[k * ld + c] + counts[k] * d * d


# ---------------------------------------------------------------------------------------
# Elementwise passes and backward sums on the (A, R, S) layout, one scale/shift per row
# ---------------------------------------------------------------------------------------

cdef inline void _affine_row(const floating* x, floating* y, Py_ssize_t n,
                             double mu, double s, double t) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        y[i] = <floating>((x[i] - mu) * s + t)


cdef inline void _affine_tile(const floating* x, floating* y, Py_ssize_t rows, Py_ssize_t ld,
                              Py_ssize_t tw, const double* mean, const double* scale,
                              const double* shift) noexcept nogil:
    # (rows, tw) tile of a column layout. Narrow tiles keep their coefficients in L1 and
    # the compiler vectorizes along c; wide ones would reload them from L2 for every row,
    # so there four rows share each coefficient load (simd.h).
    cdef Py_ssize_t a, c
    if tw >= WIDE_TILE:
        if floating is float:
            nc_affine_tile_f32(x, y, rows, ld, tw, mean, scale, shift)
        else:
            nc_affine_tile_f64(x, y, rows, ld, tw, mean, scale, shift)
        return
    for a in range(rows):
        for c in range(tw):
            y[a * ld + c] = <floating>((x[a * ld + c] - mean[c]) * scale[c] + shift[c])


def affine_rows(const floating[:, :, ::1] x,    # IN  (A, R, S)
                const double[::1] mean,         # IN  (R,)
                const double[::1] scale,        # IN  (R,)
                const double[::1] shift,        # IN  (R,)
                Py_ssize_t rows_per_block,      # row blocks of the S == 1 (column) layout
                floating[:, :, ::1] y,         # OUT (A, R, S)
                int threads):                 # OpenMP threads for this call
    """y = (x - mean[r]) * scale[r] + shift[r], evaluated in double.

    Subtracting the mean first (rather than folding it into shift) keeps the rounding at
    the size of y instead of |x| * scale, which matters when x sits at a large offset.
    """
    cdef Py_ssize_t A = x.shape[0], R = x.shape[1], S = x.shape[2]
    cdef Py_ssize_t i, a, r, t
    with nogil:
        if S == 1:
            for i in prange((A + rows_per_block - 1) // rows_per_block, schedule='static', num_threads=threads, use_threads_if=threads > 1):
                a = i * rows_per_block
                for t in range((R + TILE - 1) // TILE):
                    r = t * TILE
                    _affine_tile(&x[a, r, 0], &y[a, r, 0], _block_rows(i, rows_per_block, A), R,
                                 _block_rows(t, TILE, R), &mean[r], &scale[r], &shift[r])
        else:
            for i in prange(A * R, schedule='static', num_threads=threads, use_threads_if=threads > 1):
                a = i // R
                r = i - a * R
                _affine_row(&x[a, r, 0], &y[a, r, 0], S, mean[r], scale[r], shift[r])


cdef inline void _dy_sums(const floating* dy, const double* w, const floating* x, Py_ssize_t n,
                          double mu, double* s1, double* s2) noexcept nogil:
    # s1 = sum g, s2 = sum g * (x - mu) with g = dy * w (w NULL: g = dy), in one pass
    if floating is float:
        nc_dy_sums_f32(dy, w, x, n, mu, s1, s2)
    else:
        nc_dy_sums_f64(dy, w, x, n, mu, s1, s2)


cdef inline void _row_sums(const floating* dy, const floating* x, Py_ssize_t n, double mu,
                           double* s1, double* s2) noexcept nogil:
    _dy_sums(dy, NULL, x, n, mu, s1, s2)


def sums_rows(const floating[:, :, ::1] dy,     # IN  (A, R, S)
              const floating[:, :, ::1] x,      # IN  (A, R, S)
              const double[::1] mean,           # IN  (R,)
              double[:, ::1] p1,                # OUT (A, R) row sums of dy
              double[:, ::1] p2,               # OUT (A, R) row sums of dy * (x - mean)
              int threads):                 # OpenMP threads for this call
    cdef Py_ssize_t A = x.shape[0], R = x.shape[1], S = x.shape[2]
    cdef Py_ssize_t i, a, r, t
    with nogil:
        for i in prange(A * R, schedule='static', num_threads=threads, use_threads_if=threads > 1):
            a = i // R
            r = i - a * R
            _row_sums(&dy[a, r, 0], &x[a, r, 0], S, mean[r], &p1[a, r], &p2[a, r])


cdef inline void _tile_col_sums(const floating* dy, const floating* x, Py_ssize_t rows,
                                Py_ssize_t ld, Py_ssize_t tw, const double* mean,
                                double* s1, double* s2) noexcept nogil:
    cdef Py_ssize_t r, c
    for c in range(tw):
        s1[c] = 0.0
        s2[c] = 0.0
    if tw >= WIDE_REDUCTION:  # simd.h: several rows per load and store of the accumulators
        if floating is float:
            nc_col_dy_sums_f32(dy, x, rows, ld, tw, mean, s1, s2)
        else:
            nc_col_dy_sums_f64(dy, x, rows, ld, tw, mean, s1, s2)
        return
    for r in range(rows):
        for c in range(tw):
            s1[c] += dy[r * ld + c]
            s2[c] += dy[r * ld + c] * (x[r * ld + c] - mean[c])


def sums_cols(const floating[:, ::1] dy,        # IN  (A, C)
              const floating[:, ::1] x,         # IN  (A, C)
              const double[::1] mean,           # IN  (C,)
              Py_ssize_t rows_per_block,
              double[:, ::1] p1,                # OUT (nblocks, C)
              double[:, ::1] p2,               # OUT (nblocks, C)
              int threads):                 # OpenMP threads for this call
    cdef Py_ssize_t A = x.shape[0], C = x.shape[1], nb = p1.shape[0]
    cdef Py_ssize_t k, r0, c0, t
    with nogil:
        for k in prange(nb, schedule='static', num_threads=threads, use_threads_if=threads > 1):
            r0 = k * rows_per_block
            for t in range((C + TILE - 1) // TILE):
                c0 = t * TILE
                _tile_col_sums(&dy[r0, c0], &x[r0, c0], _block_rows(k, rows_per_block, A), C,
                               _block_rows(t, TILE, C), &mean[c0], &p1[k, c0], &p2[k, c0])


cdef inline void _dx_row(const floating* dy, const floating* x, floating* dx, Py_ssize_t n,
                         double mu, double k1, double k2, double k3) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dx[i] = <floating>(dy[i] * k1 + (x[i] - mu) * k2 + k3)


cdef inline void _dx_tile(const floating* dy, const floating* x, floating* dx, Py_ssize_t rows,
                          Py_ssize_t ld, Py_ssize_t tw, const double* mean, const double* k1,
                          const double* k2, const double* k3) noexcept nogil:
    # as _affine_tile: rows share coefficient loads only where the tile is wide
    cdef Py_ssize_t a, c
    if tw >= WIDE_TILE:
        if floating is float:
            nc_dx_tile_f32(dy, x, dx, rows, ld, tw, mean, k1, k2, k3)
        else:
            nc_dx_tile_f64(dy, x, dx, rows, ld, tw, mean, k1, k2, k3)
        return
    for a in range(rows):
        for c in range(tw):
            dx[a * ld + c] = <floating>(dy[a * ld + c] * k1[c] + (x[a * ld + c] - mean[c]) * k2[c] + k3[c])


def dx_rows(const floating[:, :, ::1] dy,       # IN  (A, R, S)
            const floating[:, :, ::1] x,        # IN  (A, R, S)
            const double[::1] mean,             # IN  (R,)
            const double[::1] k1,               # IN  (R,)
            const double[::1] k2,               # IN  (R,)
            const double[::1] k3,               # IN  (R,)
            Py_ssize_t rows_per_block,          # row blocks of the S == 1 (column) layout
            floating[:, :, ::1] dx,            # OUT (A, R, S)
            int threads):                 # OpenMP threads for this call
    """dx = dy * k1[r] + (x - mean[r]) * k2[r] + k3[r], evaluated in double."""
    cdef Py_ssize_t A = x.shape[0], R = x.shape[1], S = x.shape[2]
    cdef Py_ssize_t i, a, r, t
    with nogil:
        if S == 1:
            for i in prange((A + rows_per_block - 1) // rows_per_block, schedule='static', num_threads=threads, use_threads_if=threads > 1):
                a = i * rows_per_block
                for t in range((R + TILE - 1) // TILE):
                    r = t * TILE
                    _dx_tile(&dy[a, r, 0], &x[a, r, 0], &dx[a, r, 0],
                             _block_rows(i, rows_per_block, A), R, _block_rows(t, TILE, R),
                             &mean[r], &k1[r], &k2[r], &k3[r])
        else:
            for i in prange(A * R, schedule='static', num_threads=threads, use_threads_if=threads > 1):
                a = i // R
                r = i - a * R
                _dx_row(&dy[a, r, 0], &x[a, r, 0], &dx[a, r, 0], S, mean[r], k1[r], k2[r], k3[r])


# ---------------------------------------------------------------------------------------
# Elementwise passes and backward sums on (1, R, S) with parameters along S
# (row r uses w[rp[r] : rp[r] + S])
# ---------------------------------------------------------------------------------------

cdef inline void _affine_inner_row(const floating* x, floating* y, Py_ssize_t n, double mu,
                                   double rs, const double* w, const double* b) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        y[i] = <floating>((x[i] - mu) * rs * w[i] + b[i])


def affine_inner(const floating[:, :, ::1] x,   # IN  (1, R, S)
                 const double[::1] mean,        # IN  (R,)
                 const double[::1] rstd,        # IN  (R,)
                 const Py_ssize_t[::1] rp,      # IN  (R,) offset of row r's parameters
                 const double[::1] w,           # IN  (P,)
                 const double[::1] bias,        # IN  (P,)
                 floating[:, :, ::1] y,        # OUT (1, R, S)
                 int threads):                 # OpenMP threads for this call
    """y = (x - mean[r]) * rstd[r] * w[rp[r] + s] + bias[rp[r] + s]."""
    cdef Py_ssize_t R = x.shape[1], S = x.shape[2]
    cdef Py_ssize_t r
    with nogil:
        for r in prange(R, schedule='static', num_threads=threads, use_threads_if=threads > 1):
            _affine_inner_row(&x[0, r, 0], &y[0, r, 0], S, mean[r], rstd[r], &w[rp[r]], &bias[rp[r]])


# ---------------------------------------------------------------------------------------
# One-pass forward for A == 1: each group is contiguous, so its statistics and its
# normalized rows come from one read of x while the group is in cache.
# ---------------------------------------------------------------------------------------


def normalize_groups(const floating[:, :, ::1] x,   # IN  (1, C, B): group c is x[0, c]
                     Py_ssize_t rows_per_group,     # J: the group's B elements are J rows of S
                     bint center,
                     double eps,
                     int affine,                    # nc_affine_kind (contract.h)
                     const Py_ssize_t[::1] rp,      # IN  (C * J,) parameter offset of each row
                     const double[::1] w,           # IN  (P,)
                     const double[::1] bias,        # IN  (P,)
                     double[::1] mean,              # OUT (C,) mean used (0 when not centred)
                     double[::1] var,               # OUT (C,) biased variance (mean square if not centred)
                     double[::1] rstd,              # OUT (C,) 1 / sqrt(var + eps)
                     floating[:, :, ::1] y,         # OUT (1, C, B)
                     int threads):                  # OpenMP threads for this call
    """Statistics of each group, then its rows normalized, as the separate kernels do."""
    cdef Py_ssize_t C = x.shape[1], B = x.shape[2], J = rows_per_group, S = B // rows_per_group
    cdef Py_ssize_t c, j, r
    cdef double mu, m2, v, rs
    with nogil:
        for c in prange(C, schedule='static', num_threads=threads, use_threads_if=threads > 1):
            # Cython makes a prange variable thread-private only if the body assigns it;
            # a write through a pointer does not count, so assign first.
            mu = 0.0
            m2 = 0.0
            _row_moments(&x[0, c, 0], B, &mu, &m2)
            v = m2 / B
            if not center:
                v = v + mu * mu
                mu = 0.0
            rs = 1.0 / sqrt(v + eps)
            mean[c] = mu
            var[c] = v
            rstd[c] = rs
            for j in range(J):
                r = c * J + j
                if affine == NC_AFFINE_INNER:
                    _affine_inner_row(&x[0, c, j * S], &y[0, c, j * S], S, mu, rs, &w[rp[r]], &bias[rp[r]])
                elif affine == NC_AFFINE_ROW:
                    _affine_row(&x[0, c, j * S], &y[0, c, j * S], S, mu, rs * w[rp[r]], bias[rp[r]])
                else:
                    _affine_row(&x[0, c, j * S], &y[0, c, j * S], S, mu, rs, 0.0)


cdef inline void _row_param_sums(const floating* dy, const floating* x, Py_ssize_t n,
                                 double mu, double rs, double* dw, double* db) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dw[i] += dy[i] * ((x[i] - mu) * rs)
        db[i] += dy[i]


def backward_groups(const floating[:, :, ::1] dy,   # IN  (1, C, B): group c is dy[0, c]
                    const floating[:, :, ::1] x,    # IN  (1, C, B)
                    Py_ssize_t rows_per_group,      # J: the group's B elements are J rows of S
                    bint center,
                    int affine,                     # nc_affine_kind (contract.h)
                    const Py_ssize_t[::1] rp,       # IN  (C * J,) parameter offset of each row
                    const double[::1] w,            # IN  (P,)
                    const double[::1] mean,         # IN  (C,)
                    const double[::1] rstd,         # IN  (C,)
                    Py_ssize_t groups_per_block,
                    double[::1] t1,                 # OUT (C * J,) row sums of dy (affine 0, 1)
                    double[::1] t2,                 # OUT (C * J,) row sums of dy * (x - mean)
                    double[:, ::1] pdw,             # OUT (nblocks, P) zeroed (affine 2)
                    double[:, ::1] pdb,             # OUT (nblocks, P) zeroed (affine 2)
                    floating[:, :, ::1] dx,         # OUT (1, C, B)
                    int threads):                   # OpenMP threads for this call
    """Training-mode backward of an A == 1 layout in one visit per group: the group's sums,
    then its dx while dy and x are still in cache (same formulas as dx_rows / dx_inner)."""
    cdef Py_ssize_t C = x.shape[1], B = x.shape[2], J = rows_per_group, S = B // rows_per_group
    cdef Py_ssize_t nb = (C + groups_per_block - 1) // groups_per_block
    cdef Py_ssize_t k, c, j, r, o
    cdef double mu, rs, a1, a2, m1, m2, g, q1, q2
    with nogil:
        for k in prange(nb, schedule='static', num_threads=threads, use_threads_if=threads > 1):
            for c in range(k * groups_per_block, k * groups_per_block + _block_rows(k, groups_per_block, C)):
                mu = mean[c]
                rs = rstd[c]
                a1 = 0.0
                a2 = 0.0
                for j in range(J):
                    r = c * J + j
                    o = j * S
                    if affine == NC_AFFINE_INNER:
                        q1 = 0.0  # assigned, so private to the thread (see normalize_groups)
                        q2 = 0.0
                        _dy_sums(&dy[0, c, o], &w[rp[r]], &x[0, c, o], S, mu, &q1, &q2)
                        a1 = a1 + q1
                        a2 = a2 + q2 * rs
                        _row_param_sums(&dy[0, c, o], &x[0, c, o], S, mu, rs, &pdw[k, rp[r]], &pdb[k, rp[r]])
                    else:
                        _row_sums(&dy[0, c, o], &x[0, c, o], S, mu, &t1[r], &t2[r])
                        g = w[rp[r]] if affine == NC_AFFINE_ROW else 1.0
                        a1 = a1 + g * t1[r]
                        a2 = a2 + g * (rs * t2[r])
                m1 = a1 / B if center else 0.0
                m2 = a2 / B
                for j in range(J):
                    r = c * J + j
                    o = j * S
                    if affine == NC_AFFINE_INNER:
                        _dx_inner_row(&dy[0, c, o], &x[0, c, o], &dx[0, c, o], S, mu, rs, &w[rp[r]], m1, m2)
                    else:
                        g = w[rp[r]] if affine == NC_AFFINE_ROW else 1.0
                        _dx_row(&dy[0, c, o], &x[0, c, o], &dx[0, c, o], S, mu, rs * g, -rs * rs * m2, -rs * m1)


cdef inline void _tile_param_sums(const floating* dy, const floating* x, Py_ssize_t rows,
                                  Py_ssize_t ld, Py_ssize_t tw, const double* mean,
                                  const double* rstd, const Py_ssize_t* rp, Py_ssize_t c0,
                                  double* dw, double* db) noexcept nogil:
    # dweight / dbias partials of a block's column tile; rows add into their parameter
    # slice, which stays in L1 across the rows (one slice for layer norm).
    cdef Py_ssize_t i
    for i in range(rows):
        _row_param_sums(dy + i * ld, x + i * ld, tw, mean[i], rstd[i], dw + rp[i] + c0, db + rp[i] + c0)


def sums_inner(const floating[:, :, ::1] dy,    # IN  (1, R, S)
               const floating[:, :, ::1] x,     # IN  (1, R, S)
               const double[::1] mean,          # IN  (R,)
               const double[::1] rstd,          # IN  (R,)
               const Py_ssize_t[::1] rp,        # IN  (R,)
               const double[::1] w,             # IN  (P,)
               Py_ssize_t rows_per_block,
               double[::1] s1,                  # OUT (R,) sum of g = dy * w
               double[::1] s2,                  # OUT (R,) sum of g * xhat
               double[:, ::1] pdw,              # OUT (nblocks, P) zeroed: partial dweight
               double[:, ::1] pdb,              # OUT (nblocks, P) zeroed: partial dbias
               int threads):                    # OpenMP threads for this call
    """Per-row sums for dx, and per-block dweight/dbias partials, in one pass over a block
    of rows: the row sums first, then the block's column tiles while it is in cache."""
    cdef Py_ssize_t R = x.shape[1], S = x.shape[2], nb = pdw.shape[0]
    cdef Py_ssize_t k, r, rows, t, q, sub, in_block
    # sub-blocks of rows small enough to stay in L2 between their two passes
    cdef Py_ssize_t sub_rows = max(1, <Py_ssize_t>CACHED_ELEMS // max(S, 1))
    with nogil:
        for k in prange(nb, schedule='static', num_threads=threads, use_threads_if=threads > 1):
            in_block = _block_rows(k, rows_per_block, R)
            for q in range((in_block + sub_rows - 1) // sub_rows):
                sub = k * rows_per_block + q * sub_rows
                rows = _block_rows(q, sub_rows, in_block)
                for r in range(sub, sub + rows):
                    _dy_sums(&dy[0, r, 0], &w[rp[r]], &x[0, r, 0], S, mean[r], &s1[r], &s2[r])
                    s2[r] = s2[r] * rstd[r]
                for t in range((S + TILE - 1) // TILE):
                    _tile_param_sums(&dy[0, sub, t * TILE], &x[0, sub, t * TILE], rows, S,
                                     _block_rows(t, TILE, S), &mean[sub], &rstd[sub], &rp[sub], t * TILE,
                                     &pdw[k, 0], &pdb[k, 0])


cdef inline void _dx_inner_row(const floating* dy, const floating* x, floating* dx, Py_ssize_t n,
                               double mu, double rs, const double* w,
                               double m1, double m2) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dx[i] = <floating>(rs * (dy[i] * w[i] - m1 - (x[i] - mu) * rs * m2))


def dx_inner(const floating[:, :, ::1] dy,      # IN  (1, R, S)
             const floating[:, :, ::1] x,       # IN  (1, R, S)
             const double[::1] mean,            # IN  (R,)
             const double[::1] rstd,            # IN  (R,)
             const Py_ssize_t[::1] rp,          # IN  (R,)
             const double[::1] w,               # IN  (P,)
             const double[::1] c1,              # IN  (R,) group mean of g (0 when not centred)
             const double[::1] c2,              # IN  (R,) group mean of g * xhat (0 in eval)
             floating[:, :, ::1] dx,           # OUT (1, R, S)
             int threads):                 # OpenMP threads for this call
    """dx = rstd[r] * (dy * w[rp[r] + s] - c1[r] - xhat * c2[r])."""
    cdef Py_ssize_t R = x.shape[1], S = x.shape[2]
    cdef Py_ssize_t r
    with nogil:
        for r in prange(R, schedule='static', num_threads=threads, use_threads_if=threads > 1):
            _dx_inner_row(&dy[0, r, 0], &x[0, r, 0], &dx[0, r, 0], S, mean[r], rstd[r],
                          &w[rp[r]], c1[r], c2[r])


# ---------------------------------------------------------------------------------------
# Per-group algebra between the passes over x: statistics finalized, running statistics
# updated, per-row coefficients. O(C + R) work each, one call instead of a chain of small
# array operations (which dominate small inputs); serial, in a fixed order.
# ---------------------------------------------------------------------------------------

def finalize_moments(const double[:, ::1] pmean,  # IN  (K, C) partial means
                     const double[:, ::1] pm2,    # IN  (K, C) partial centred sums of squares
                     const double[::1] counts,    # IN  (K,) elements behind each partial
                     double count,                # elements per group (sum of counts)
                     bint center,
                     double eps,
                     double[::1] mean,            # OUT (C,) mean used (0 when not centred)
                     double[::1] var,             # OUT (C,) biased variance (mean square if not centred)
                     double[::1] rstd):           # OUT (C,) 1 / sqrt(var + eps)
    """Merge K partials per group (two-pass formula over the partial means, as
    combine_moments; K == 1 passes through), divide by the count, apply the non-centred
    transform (var + mean^2: the mean of squares without cancellation) and take rstd."""
    cdef Py_ssize_t K = pmean.shape[0], C = pmean.shape[1]
    cdef Py_ssize_t k, c
    cdef double mu, m2, d, v, total = 0.0
    for k in range(K):
        total = total + counts[k]
    with nogil:
        for c in range(C):
            if K == 1:
                mu = pmean[0, c]
                m2 = pm2[0, c]
            else:
                mu = 0.0
                for k in range(K):
                    mu += counts[k] * pmean[k, c]
                mu = mu / total
                m2 = 0.0
                for k in range(K):
                    d = pmean[k, c] - mu
                    m2 += pm2[k, c] + counts[k] * d * d
            v = m2 / count
            if not center:
                v = v + mu * mu
                mu = 0.0
            mean[c] = mu
            var[c] = v
            rstd[c] = 1.0 / sqrt(v + eps)


def update_running(const double[::1] mean,        # IN  (C,) batch mean per group
                   const double[::1] var,         # IN  (C,) batch biased variance per group
                   const Py_ssize_t[::1] rc,      # IN  (C,) running entry of each group
                   double groups_per_running,     # groups averaged into one entry
                   double momentum,
                   double unbias,                 # n / (n - 1), or 1 for the biased variance
                   floating[::1] running_mean,    # IN/OUT (E,)
                   floating[::1] running_var,     # IN/OUT (E,)
                   double[::1] scratch):          # (2 E,) work space
    """running = (1 - momentum) * running + momentum * batch, each entry's batch value the
    average over its groups (summed in group order) and the variance unbiased by
    ``unbias``; evaluated in double, stored once."""
    cdef Py_ssize_t C = mean.shape[0], E = running_mean.shape[0]
    cdef Py_ssize_t c, e
    cdef double keep = 1.0 - momentum
    cdef double* sm = &scratch[0]
    cdef double* sv = &scratch[E]
    with nogil:
        for e in range(E):
            sm[e] = 0.0
            sv[e] = 0.0
        for c in range(C):
            sm[rc[c]] += mean[c]
            sv[rc[c]] += var[c] * unbias
        for e in range(E):
            if groups_per_running != 1.0:
                sm[e] = sm[e] / groups_per_running
                sv[e] = sv[e] / groups_per_running
            running_mean[e] = <floating>(keep * running_mean[e] + momentum * sm[e])
            running_var[e] = <floating>(keep * running_var[e] + momentum * sv[e])


def running_statistics(const floating[::1] running_mean,  # IN (E,)
                       const floating[::1] running_var,   # IN (E,)
                       const Py_ssize_t[::1] rc,          # IN (C,) running entry of each group
                       double eps,
                       double[::1] mean,                  # OUT (C,)
                       double[::1] var,                   # OUT (C,)
                       double[::1] rstd):                 # OUT (C,) 1 / sqrt(var + eps)
    """Per-group statistics read from the running ones (the stored values, so the output
    is normalized with exactly what the running statistics hold)."""
    cdef Py_ssize_t C = mean.shape[0], c
    cdef double v
    with nogil:
        for c in range(C):
            mean[c] = running_mean[rc[c]]
            v = running_var[rc[c]]
            var[c] = v
            rstd[c] = 1.0 / sqrt(v + eps)


def row_coefficients(const double[::1] mean,      # IN  (C,)
                     const double[::1] rstd,      # IN  (C,)
                     const Py_ssize_t[::1] rg,    # IN  (R,) statistics group of each row
                     const Py_ssize_t[::1] rp,    # IN  (R,) parameter of each row
                     const floating[::1] w,       # IN  (P,) weight (ignored unless has_w)
                     const floating[::1] b,       # IN  (P,) bias (ignored unless has_b)
                     bint has_w,
                     bint has_b,
                     double[::1] mean_r,          # OUT (R,)
                     double[::1] scale,           # OUT (R,) rstd * w
                     double[::1] shift):          # OUT (R,) b
    """Per-row coefficients of affine_rows: y = (x - mean_r) * scale + shift."""
    cdef Py_ssize_t R = rg.shape[0], r
    cdef double s
    with nogil:
        for r in range(R):
            mean_r[r] = mean[rg[r]]
            s = rstd[rg[r]]
            if has_w:
                s = s * <double>w[rp[r]]
            scale[r] = s
            shift[r] = <double>b[rp[r]] if has_b else 0.0


def gradient_sums(const double[:, ::1] p1,        # IN  (K, R) partial row sums of dy
                  const double[:, ::1] p2,        # IN  (K, R) partial row sums of dy * (x - mean)
                  const Py_ssize_t[::1] rg,       # IN  (R,)
                  const Py_ssize_t[::1] rp,       # IN  (R,)
                  const floating[::1] w,          # IN  (P,) weight (ignored unless has_w)
                  bint has_w,
                  const double[::1] rstd,         # IN  (C,)
                  double[::1] g1,                 # OUT (C,) group sums of g = w * dy
                  double[::1] g2,                 # OUT (C,) group sums of g * xhat
                  double[::1] dw,                 # OUT (P,) zeroed by the caller, or empty
                  double[::1] db):                # OUT (P,) zeroed by the caller, or empty
    """Row partials summed over K in order, then into groups and parameters in row order:
    the sums behind dx (g1, g2) and dweight/dbias (when dw/db are not empty)."""
    cdef Py_ssize_t K = p1.shape[0], R = p1.shape[1], C = g1.shape[0]
    cdef Py_ssize_t k, r, c
    cdef double t1, t2, gamma, rs
    cdef bint params = dw.shape[0] > 0
    with nogil:
        for c in range(C):
            g1[c] = 0.0
            g2[c] = 0.0
        for r in range(R):
            t1 = 0.0  # K may be 0: a rank holding no samples
            t2 = 0.0
            for k in range(K):
                t1 = t1 + p1[k, r]
                t2 = t2 + p2[k, r]
            rs = rstd[rg[r]]
            if params:
                dw[rp[r]] += rs * t2
                db[rp[r]] += t1
            gamma = <double>w[rp[r]] if has_w else 1.0
            g1[rg[r]] += gamma * t1
            g2[rg[r]] += gamma * (rs * t2)


def dx_coefficients(const double[::1] g1,         # IN  (C,) group sums of g = w * dy
                    const double[::1] g2,         # IN  (C,) group sums of g * xhat
                    const Py_ssize_t[::1] rg,     # IN  (R,)
                    const Py_ssize_t[::1] rp,     # IN  (R,)
                    const floating[::1] w,        # IN  (P,) weight (ignored unless has_w)
                    bint has_w,
                    const double[::1] rstd,       # IN  (C,)
                    double count,                 # elements per group (all ranks)
                    bint stats_grad,              # gradients flow through the statistics
                    bint center,
                    double[::1] k1,               # OUT (R,)
                    double[::1] k2,               # OUT (R,)
                    double[::1] k3):              # OUT (R,)
    """Coefficients of dx_rows: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with
    g = w * dy and xhat = (x - mean) * rstd, regrouped as dy * k1 + (x - mean) * k2 + k3."""
    cdef Py_ssize_t R = rg.shape[0], r
    cdef double rs
    with nogil:
        for r in range(R):
            rs = rstd[rg[r]]
            k1[r] = rs * (<double>w[rp[r]] if has_w else 1.0)
            k2[r] = -rs * rs * (g2[rg[r]] / count) if stats_grad else 0.0
            k3[r] = -rs * (g1[rg[r]] / count) if stats_grad and center else 0.0


cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int normcore_max_threads(void) { return omp_get_max_threads(); }
    #else
    static int normcore_max_threads(void) { return 1; }
    #endif
    """
    int normcore_max_threads() nogil


def max_threads():
    """OpenMP's current thread limit (what threadpoolctl and OMP_NUM_THREADS set); 1 without OpenMP."""
    return normcore_max_threads()


def openmp_probe():
    """Threads seen in a two-thread parallel region: 2 with OpenMP compiled in, else 1."""
    cdef int i, n = 0
    cdef int seen[2]
    seen[0] = 0
    seen[1] = 0
    with nogil:
        for i in prange(2, schedule='static', num_threads=2):
            seen[threadid()] = 1
    for i in range(2):
        n = n + seen[i]
    return n
