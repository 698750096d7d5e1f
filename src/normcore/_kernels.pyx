# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled kernels shared by every normalization mode.

Design
------
The planner (normcore/plan.py) maps every mode onto one canonical layout, a C-contiguous
array of shape (A, C, B): statistics group ``c`` reduces over the outer axis ``a`` and the
inner axis ``b``. Two memory patterns cover every case:

* rows (B > 1, or A == 1): each (a, c) row of B elements is contiguous; a row is reduced
  on its own and rows of one group are merged in order of ``a``;
* columns (B == 1): groups are the columns of an (A, C) matrix; rows are cut into fixed
  blocks, each block reduces its columns into its own row of a partial buffer (no atomics,
  no shared scratch), and partials are merged in block order.

Block boundaries depend only on the shape, never on the thread count, and partials are
merged in a fixed order, so results are bitwise identical for any number of threads.

Accumulation is always in double. Moments use two passes inside chunks of at most CHUNK
elements (the second pass reads from cache) and Chan's parallel formula across chunks,
rows and blocks: never E[x^2] - E[x]^2. The elementwise passes evaluate their per-group
coefficients in double too, so a large common offset in x does not cost float32 digits.

Parameters may live on kept axes (one scale/shift per group: the "groups" kernels) or on
reduced axes too (layer norm, group norm: the "params" kernels, on layout (1, C, B)). The
parameter index of element (c, b) is pc[c] + pb[b].

The kernels check nothing: normcore/functional.py validates shapes, dtypes and sizes.
"""
from cython.parallel cimport prange, threadid

ctypedef fused floating:
    float
    double

# Elements per two-pass chunk: 32 KiB of float64, so the second pass hits L1/L2.
cdef Py_ssize_t CHUNK = 4096


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


cdef inline void _row_moments(const floating* p, Py_ssize_t n,
                              double* out_mean, double* out_m2) noexcept nogil:
    cdef Py_ssize_t start = 0, m, i
    cdef double count = 0.0, mean = 0.0, m2 = 0.0, s, cmean, cm2, d
    while start < n:
        m = n - start
        if m > CHUNK:
            m = CHUNK
        s = 0.0
        for i in range(m):
            s = s + p[start + i]
        cmean = s / m
        cm2 = 0.0
        for i in range(m):
            d = p[start + i] - cmean
            cm2 = cm2 + d * d
        _merge(&count, &mean, &m2, <double>m, cmean, cm2)
        start = start + m
    out_mean[0] = mean
    out_m2[0] = m2


def moments_rows(const floating[:, :, ::1] x,    # IN  (A, C, B)
                 double[:, ::1] pmean,           # OUT (A, C) mean of each row
                 double[:, ::1] pm2):            # OUT (A, C) centered sum of squares
    cdef Py_ssize_t A = x.shape[0], C = x.shape[1], B = x.shape[2]
    cdef Py_ssize_t r, a, c
    with nogil:
        for r in prange(A * C, schedule='static'):
            a = r // C
            c = r - a * C
            _row_moments(&x[a, c, 0], B, &pmean[a, c], &pm2[a, c])


cdef inline void _block_col_moments(const floating* x, Py_ssize_t rows, Py_ssize_t C,
                                    double* mean, double* m2) noexcept nogil:
    cdef Py_ssize_t r, c
    cdef double d
    for c in range(C):
        mean[c] = 0.0
        m2[c] = 0.0
    for r in range(rows):
        for c in range(C):
            mean[c] += x[r * C + c]
    for c in range(C):
        mean[c] /= rows
    for r in range(rows):
        for c in range(C):
            d = x[r * C + c] - mean[c]
            m2[c] += d * d


def moments_cols(const floating[:, ::1] x,       # IN  (A, C)
                 Py_ssize_t rows_per_block,
                 double[:, ::1] pmean,           # OUT (nblocks, C)
                 double[:, ::1] pm2):            # OUT (nblocks, C)
    cdef Py_ssize_t A = x.shape[0], C = x.shape[1], nb = pmean.shape[0]
    cdef Py_ssize_t k, r0, rows
    with nogil:
        for k in prange(nb, schedule='static'):
            r0 = k * rows_per_block
            rows = _block_rows(k, rows_per_block, A)
            _block_col_moments(&x[r0, 0], rows, C, &pmean[k, 0], &pm2[k, 0])


def combine_moments(const double[:, ::1] pmean,  # IN  (K, C) partial means
                    const double[:, ::1] pm2,    # IN  (K, C) partial centered sums of squares
                    const double[::1] counts,    # IN  (K,)   elements behind each partial
                    double[::1] mean,            # OUT (C,)
                    double[::1] m2):             # OUT (C,)
    cdef Py_ssize_t K = pmean.shape[0], C = pmean.shape[1]
    cdef Py_ssize_t c, k
    cdef double n, mu, s
    with nogil:
        for c in prange(C, schedule='static'):
            n = 0.0
            mu = 0.0
            s = 0.0
            for k in range(K):
                _merge(&n, &mu, &s, counts[k], pmean[k, c], pm2[k, c])
            mean[c] = mu
            m2[c] = s


def affine_groups(const floating[:, :, ::1] x,  # IN  (A, C, B)
                  const double[::1] mean,       # IN  (C,)
                  const double[::1] scale,      # IN  (C,)
                  const double[::1] shift,      # IN  (C,)
                  floating[:, :, ::1] y):       # OUT (A, C, B)
    """y = (x - mean[c]) * scale[c] + shift[c], evaluated in double.

    Subtracting the mean first (rather than folding it into shift) keeps the rounding at
    the size of y instead of |x| * scale, which matters when x sits at a large offset.
    """
    cdef Py_ssize_t A = x.shape[0], C = x.shape[1], B = x.shape[2]
    cdef Py_ssize_t r, a, c, b
    cdef double mu, s, t
    with nogil:
        if B == 1:
            for a in prange(A, schedule='static'):
                for c in range(C):
                    y[a, c, 0] = <floating>((x[a, c, 0] - mean[c]) * scale[c] + shift[c])
        else:
            for r in prange(A * C, schedule='static'):
                a = r // C
                c = r - a * C
                mu = mean[c]
                s = scale[c]
                t = shift[c]
                for b in range(B):
                    y[a, c, b] = <floating>((x[a, c, b] - mu) * s + t)


def affine_params(const floating[:, :, ::1] x,  # IN  (1, C, B)
                  const double[::1] mean,       # IN  (C,)
                  const double[::1] rstd,       # IN  (C,)
                  const Py_ssize_t[::1] pc,     # IN  (C,) parameter offset of group c
                  const Py_ssize_t[::1] pb,     # IN  (B,) parameter offset of position b
                  const double[::1] w,          # IN  (P,)
                  const double[::1] bias,       # IN  (P,)
                  floating[:, :, ::1] y):       # OUT (1, C, B)
    """y = (x - mean[c]) * rstd[c] * w[p] + bias[p] with p = pc[c] + pb[b]."""
    cdef Py_ssize_t C = x.shape[1], B = x.shape[2]
    cdef Py_ssize_t c, b, p
    cdef double mu, r
    with nogil:
        for c in prange(C, schedule='static'):
            mu = mean[c]
            r = rstd[c]
            for b in range(B):
                p = pc[c] + pb[b]
                y[0, c, b] = <floating>((x[0, c, b] - mu) * r * w[p] + bias[p])


cdef inline void _row_sums(const floating* dy, const floating* x, Py_ssize_t n, double mu,
                           double* s1, double* s2) noexcept nogil:
    cdef Py_ssize_t i
    cdef double a = 0.0, b = 0.0
    for i in range(n):
        a = a + dy[i]
        b = b + dy[i] * (x[i] - mu)
    s1[0] = a
    s2[0] = b


def sums_rows(const floating[:, :, ::1] dy,     # IN  (A, C, B)
              const floating[:, :, ::1] x,      # IN  (A, C, B)
              const double[::1] mean,           # IN  (C,)
              double[:, ::1] p1,                # OUT (A, C) row sums of dy
              double[:, ::1] p2):               # OUT (A, C) row sums of dy * (x - mean)
    cdef Py_ssize_t A = x.shape[0], C = x.shape[1], B = x.shape[2]
    cdef Py_ssize_t r, a, c
    with nogil:
        for r in prange(A * C, schedule='static'):
            a = r // C
            c = r - a * C
            _row_sums(&dy[a, c, 0], &x[a, c, 0], B, mean[c], &p1[a, c], &p2[a, c])


cdef inline void _block_col_sums(const floating* dy, const floating* x, Py_ssize_t rows,
                                 Py_ssize_t C, const double* mean,
                                 double* s1, double* s2) noexcept nogil:
    cdef Py_ssize_t r, c
    for c in range(C):
        s1[c] = 0.0
        s2[c] = 0.0
    for r in range(rows):
        for c in range(C):
            s1[c] += dy[r * C + c]
            s2[c] += dy[r * C + c] * (x[r * C + c] - mean[c])


def sums_cols(const floating[:, ::1] dy,        # IN  (A, C)
              const floating[:, ::1] x,         # IN  (A, C)
              const double[::1] mean,           # IN  (C,)
              Py_ssize_t rows_per_block,
              double[:, ::1] p1,                # OUT (nblocks, C)
              double[:, ::1] p2):               # OUT (nblocks, C)
    cdef Py_ssize_t A = x.shape[0], C = x.shape[1], nb = p1.shape[0]
    cdef Py_ssize_t k, r0, rows
    with nogil:
        for k in prange(nb, schedule='static'):
            r0 = k * rows_per_block
            rows = _block_rows(k, rows_per_block, A)
            _block_col_sums(&dy[r0, 0], &x[r0, 0], rows, C, &mean[0], &p1[k, 0], &p2[k, 0])


cdef inline void _block_param_sums(const floating* dy, const floating* x, Py_ssize_t c0,
                                   Py_ssize_t rows, Py_ssize_t B,
                                   const double* mean, const double* rstd,
                                   const Py_ssize_t* pc, const Py_ssize_t* pb,
                                   const double* w, double* s1, double* s2,
                                   double* dw, double* db) noexcept nogil:
    cdef Py_ssize_t i, c, b, p
    cdef double g, xh, a1, a2, mu, r, d
    for i in range(rows):
        c = c0 + i
        mu = mean[c]
        r = rstd[c]
        a1 = 0.0
        a2 = 0.0
        for b in range(B):
            p = pc[c] + pb[b]
            d = dy[i * B + b]
            xh = (x[i * B + b] - mu) * r
            g = d * w[p]
            a1 += g
            a2 += g * xh
            dw[p] += d * xh
            db[p] += d
        s1[c] = a1
        s2[c] = a2


def sums_params(const floating[:, :, ::1] dy,   # IN  (1, C, B)
                const floating[:, :, ::1] x,    # IN  (1, C, B)
                const double[::1] mean,         # IN  (C,)
                const double[::1] rstd,         # IN  (C,)
                const Py_ssize_t[::1] pc,       # IN  (C,)
                const Py_ssize_t[::1] pb,       # IN  (B,)
                const double[::1] w,            # IN  (P,)
                Py_ssize_t rows_per_block,
                double[::1] s1,                 # OUT (C,) sum of g = dy * w[p]
                double[::1] s2,                 # OUT (C,) sum of g * xhat
                double[:, ::1] pdw,             # OUT (nblocks, P) zeroed: partial dweight
                double[:, ::1] pdb):            # OUT (nblocks, P) zeroed: partial dbias
    cdef Py_ssize_t C = x.shape[1], B = x.shape[2], nb = pdw.shape[0]
    cdef Py_ssize_t k, c0, rows
    with nogil:
        for k in prange(nb, schedule='static'):
            c0 = k * rows_per_block
            rows = _block_rows(k, rows_per_block, C)
            _block_param_sums(&dy[0, c0, 0], &x[0, c0, 0], c0, rows, B, &mean[0], &rstd[0],
                              &pc[0], &pb[0], &w[0], &s1[0], &s2[0], &pdw[k, 0], &pdb[k, 0])


def dx_groups(const floating[:, :, ::1] dy,     # IN  (A, C, B)
              const floating[:, :, ::1] x,      # IN  (A, C, B)
              const double[::1] mean,           # IN  (C,)
              const double[::1] k1,             # IN  (C,)
              const double[::1] k2,             # IN  (C,)
              const double[::1] k3,             # IN  (C,)
              floating[:, :, ::1] dx):          # OUT (A, C, B)
    """dx = dy * k1[c] + (x - mean[c]) * k2[c] + k3[c], evaluated in double."""
    cdef Py_ssize_t A = x.shape[0], C = x.shape[1], B = x.shape[2]
    cdef Py_ssize_t r, a, c, b
    cdef double mu, u, v, t
    with nogil:
        if B == 1:
            for a in prange(A, schedule='static'):
                for c in range(C):
                    dx[a, c, 0] = <floating>(dy[a, c, 0] * k1[c] + (x[a, c, 0] - mean[c]) * k2[c] + k3[c])
        else:
            for r in prange(A * C, schedule='static'):
                a = r // C
                c = r - a * C
                mu = mean[c]
                u = k1[c]
                v = k2[c]
                t = k3[c]
                for b in range(B):
                    dx[a, c, b] = <floating>(dy[a, c, b] * u + (x[a, c, b] - mu) * v + t)


def dx_params(const floating[:, :, ::1] dy,     # IN  (1, C, B)
              const floating[:, :, ::1] x,      # IN  (1, C, B)
              const double[::1] mean,           # IN  (C,)
              const double[::1] rstd,           # IN  (C,)
              const Py_ssize_t[::1] pc,         # IN  (C,)
              const Py_ssize_t[::1] pb,         # IN  (B,)
              const double[::1] w,              # IN  (P,)
              const double[::1] c1,             # IN  (C,) mean of g (0 when not centered)
              const double[::1] c2,             # IN  (C,) mean of g * xhat (0 in eval)
              floating[:, :, ::1] dx):          # OUT (1, C, B)
    """dx = rstd[c] * (dy * w[p] - c1[c] - xhat * c2[c]) with p = pc[c] + pb[b]."""
    cdef Py_ssize_t C = x.shape[1], B = x.shape[2]
    cdef Py_ssize_t c, b, p
    cdef double mu, r, m1, m2, xh
    with nogil:
        for c in prange(C, schedule='static'):
            mu = mean[c]
            r = rstd[c]
            m1 = c1[c]
            m2 = c2[c]
            for b in range(B):
                p = pc[c] + pb[b]
                xh = (x[0, c, b] - mu) * r
                dx[0, c, b] = <floating>(r * (dy[0, c, b] * w[p] - m1 - xh * m2))


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
