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
merged in a fixed order, so within one build results are bitwise identical for any number
of threads (the baseline, AVX2 and AVX-512 builds differ in vector width and FMA).

Storage types T: float32, float64, float16 and bfloat16 (the half types are 16-bit
patterns, simd.h: converted on load in vector registers -- F16C, or a shift -- and rounded
once on store; their elementwise passes are the float32 ones, their reductions the double
ones). Accumulation is always in double. Row sums run in simd.h: independent lanes of vector
types in several chains (GCC's auto-vectorizer will not take a loop carrying two
accumulators), combined in a fixed order, IEEE semantics kept (no -ffast-math), the order
never depending on threads.
Never E[x^2] - E[x]^2: row moments sum deviations from the chunk's first element in one
pass over chunks of at most CHUNK elements, merged by Chan's formula; column tiles use
sums shifted by one of their own rows (see _tile_col_moments); with the shift a member of
the data, the subtraction loses at most log2(count + 1) bits of double. Partial moments of
rows and blocks merge by the two-pass formula over their means. The elementwise passes
subtract the mean first, so a large common offset in x does not cost float32 digits;
float64 ones evaluate in double, float32 ones in float32 within the accuracy contract
(simd.h, "float32 elementwise passes"; double in the baseline build, which lacks FMA).

When A == 1 every group is contiguous, and normalize_groups computes a group's statistics
and writes its output in one visit, while the group is in cache.

The kernels check nothing beyond what costs nanoseconds (see Arguments): normcore/checks.py
validates the caller's arguments, normcore/functional.py builds the kernels' arrays.
"""
cimport numpy as cnp
from cython.parallel cimport prange, threadid
from libc.math cimport NAN, isfinite, sqrt
from libc.stdlib cimport abort, calloc, free, malloc
from libc.string cimport memset

cnp.import_array()

cdef extern from "simd.h" nogil:
    # half-precision storage (simd.h): 16-bit patterns the kernels convert on load and store
    ctypedef struct nc_f16:
        pass
    ctypedef struct nc_bf16:
        pass

# The storage types T of x: float32 and float64, and the half types, which every kernel
# widens to float32 (elementwise) or double (reductions) and rounds once on the way out.
ctypedef fused floating:
    float
    double
    nc_f16
    nc_bf16

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
    # column reductions from this width run as sweeps of several rows per load and store of
    # the accumulators (simd.h); narrower ones row by row (measured on the AVX-512 and AVX2
    # builds: the sweeps are faster from 64 columns up, channels-last backward 1.1x)
    WIDE_REDUCTION = 16
    TILE = 4096  # columns per tile in column kernels (measured: wider tiles stream rows better): NC_TILE_MAX
    CACHED_ELEMS = 65536  # elements of a block of rows re-read from L2 by a second pass
    # float32 outputs at least this large are written with streaming stores (simd.h): past
    # the caches a reader would find them in, a normal store's read-for-ownership is waste
    STREAM_BYTES = 8388608
    PF_AHEAD = 2
    # runs of at least this many wholly counted (or uncounted) rows of a masked column
    # layout take the plain tile passes (each call makes its tile's coefficients)
    LIKE_ROWS = 16
    # elements of the stack copies a masked backward sum makes of a row (8 KB each)
    INERT_ROW = 1024

# Elements per chunk of row moments: bounds the bits a shifted sum can lose (12).
cdef Py_ssize_t CHUNK = 4096


# ---------------------------------------------------------------------------------------
# Arguments. The Python entries take the arrays themselves and read their data pointers:
# a typed memoryview costs about a third of a microsecond per argument, which dominates
# the small calls this library mostly serves. What is cheap to check is checked (an
# ndarray of the contract's dtype, C-contiguous, writeable for OUT), so a wrong direct
# call raises instead of reading the wrong memory; shapes are the caller's promise.
# ---------------------------------------------------------------------------------------

cdef inline Py_ssize_t* _shape(object a, int ndim) except NULL:
    if not cnp.PyArray_Check(a) or cnp.PyArray_NDIM(<cnp.ndarray>a) != ndim:
        raise TypeError(f"kernel argument: expected a {ndim}-D ndarray, got {type(a).__name__} "
                        f"of shape {getattr(a, 'shape', None)}")
    return <Py_ssize_t*>cnp.PyArray_DIMS(<cnp.ndarray>a)


cdef inline void* _in(object a, int typenum) except? NULL:
    if not cnp.PyArray_Check(a) or cnp.PyArray_TYPE(<cnp.ndarray>a) != typenum \
            or not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a):
        raise TypeError(f"kernel argument: expected a C-contiguous ndarray of "
                        f"{cnp.PyArray_DescrFromType(typenum)}, got {getattr(a, 'dtype', type(a).__name__)}")
    return cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline void* _out(object a, int typenum) except? NULL:
    cdef void* p = _in(a, typenum)
    if not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>a):
        raise TypeError("kernel argument: an OUT array must be writeable")
    return p


cdef int HALF = cnp.NPY_FLOAT16
# NumPy's type number of bfloat16 (ml_dtypes registers it at run time): learned from the
# first bfloat16 array seen
cdef int BF16 = -2


cdef inline int _storage(object a) except -1:
    # the storage type T of an array: float32, float64, float16 or bfloat16 (anything else
    # reads as float64, which _in then refuses by name)
    global BF16
    cdef int t
    if not cnp.PyArray_Check(a):
        return cnp.NPY_FLOAT64
    t = cnp.PyArray_TYPE(<cnp.ndarray>a)
    if t == cnp.NPY_FLOAT32 or t == cnp.NPY_FLOAT64 or t == HALF or t == BF16:
        return t
    if t >= 256 and a.dtype.name == "bfloat16" and a.dtype.itemsize == 2:
        BF16 = t  # (256: NPY_USERDEF, the first type number given at run time)
        return t
    return cnp.NPY_FLOAT64


# shorthands for the contract's fixed dtypes
cdef int F64 = cnp.NPY_FLOAT64
cdef int IDX = cnp.NPY_INTP
cdef int U8 = cnp.NPY_UINT8


cdef struct nc_mask:
    const unsigned char* bytes   # NULL: no mask
    const Py_ssize_t* off
    int step


cdef inline int _mask_of(object mask, nc_mask* m) except -1:
    # a masking.MaskRows (base bytes, row offsets, step) or None
    if mask is None:
        m.bytes, m.off, m.step = NULL, NULL, 0
        return 0
    base, offsets, step = mask
    m.bytes = <const unsigned char*>_in(base, U8)
    m.off = <const Py_ssize_t*>_in(offsets, IDX)
    m.step = step
    return 0


# Parameters arrive in their own storage dtype (x's, or float32 beside a half x), or None
# when absent. The kernels read them as double (and the float32 passes as float32):
# borrowed where the caller's array already is one, else widened or narrowed into
# scratch of the call's own; an absent weight reads as ones, an absent bias as zeros.
cdef struct nc_params:
    const double* w
    const double* b
    const float* wf      # float32 views: only when asked for
    const float* bf
    bint has_w, has_b
    void* own[4]


cdef int _params_of(object weight, object bias, Py_ssize_t P, bint f32, nc_params* p) except -1:
    # P: the parameters' length (read from weight or bias when given; else the caller's)
    p.own[0] = p.own[1] = p.own[2] = p.own[3] = NULL
    p.wf = p.bf = NULL
    p.has_w, p.has_b = weight is not None, bias is not None
    if weight is not None:
        P = _shape(weight, 1)[0]
    elif bias is not None:
        P = _shape(bias, 1)[0]
    p.w = _as_double(weight, P, 1.0, &p.own[0])
    p.b = _as_double(bias, P, 0.0, &p.own[1])
    if f32:
        p.wf = _as_float(weight, p.w, P, &p.own[2])
        p.bf = _as_float(bias, p.b, P, &p.own[3])
    return 0


cdef inline void _params_free(nc_params* p) noexcept:
    cdef int i
    for i in range(4):
        free(p.own[i])
        p.own[i] = NULL


cdef const double* _as_double(object a, Py_ssize_t P, double fill, void** own) except NULL:
    cdef double* out
    cdef Py_ssize_t i
    if a is not None and cnp.PyArray_Check(a) and cnp.PyArray_TYPE(<cnp.ndarray>a) == F64:
        return <const double*>_in(a, F64)
    out = <double*>malloc(max(P, 1) * sizeof(double))
    if out == NULL:
        raise MemoryError("normcore: no memory for the parameters in double")
    own[0] = out
    if a is None:
        for i in range(P):
            out[i] = fill
        return out
    return _widen(a, out)


cdef const float* _as_float(object a, const double* wide, Py_ssize_t P, void** own) except NULL:
    cdef float* out
    if a is not None and cnp.PyArray_Check(a) and cnp.PyArray_TYPE(<cnp.ndarray>a) == cnp.NPY_FLOAT32:
        return <const float*>_in(a, cnp.NPY_FLOAT32)
    out = nc_to_f32(wide, P)
    if out == NULL:
        raise MemoryError("normcore: no memory for a float32 copy of the parameters")
    own[0] = out
    return out


cdef Py_ssize_t _inner_size(object rp, Py_ssize_t S) except -1:
    # the parameters rows of S read at offsets rp: max(rp) + S
    cdef Py_ssize_t R = _shape(rp, 1)[0], r, top = 0
    cdef const Py_ssize_t* o = <const Py_ssize_t*>_in(rp, IDX)
    for r in range(R):
        if o[r] > top:
            top = o[r]
    return top + S if R else 0


# ---------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------

cdef inline Py_ssize_t _block_rows(Py_ssize_t k, Py_ssize_t rows_per_block,
                                   Py_ssize_t total) noexcept nogil:
    # Rows in block k: blocks are full but the last.
    cdef Py_ssize_t rows = total - k * rows_per_block
    return rows_per_block if rows > rows_per_block else rows


cdef inline bint _streams(const void* out, Py_ssize_t n, Py_ssize_t itemsize) noexcept nogil:
    # Whether an output of n elements is written with streaming stores: from STREAM_BYTES
    # on, unless its memory is fresh from the OS (not yet resident: simd.h, nc_resident).
    # The kernel that streams fences once after its loop; its worker threads' stores are
    # ordered by the barrier that ends the parallel region (a locked instruction, which
    # drains them).
    return n * itemsize >= STREAM_BYTES and nc_resident(out, n * itemsize)


cdef inline double _clamp0(double v) noexcept nogil:
    # rounding can leave a centred sum of squares slightly negative; an overflowed one
    # (inf - inf) is NaN and stays NaN (max(v, 0.0) would make it 0)
    return 0.0 if v < 0.0 else v


cdef inline double _representable(double mean, double var, bint center) noexcept nogil:
    # A group whose statistics overflow double (|x| near the float64 maximum) has no
    # representable variance: NaN, never a clamped or infinite one that would give a
    # finite wrong output (var = inf makes rstd 0 and y the bias).
    if not (isfinite(mean) and isfinite(var)) or (not center and not isfinite(var + mean * mean)):
        return NAN
    return var


cdef inline void _merge(double* n, double* mean, double* m2,
                        double nb, double meanb, double m2b) noexcept nogil:
    # Chan et al.: exact merge of two (count, mean, centered sum of squares) triples. The
    # first merge takes b as it is (d would be b's mean itself, whose square may overflow
    # where the variance does not), and d^2 n nb / tot is formed as (d * g) * d with
    # g = n nb / tot, which overflows only where the result does.
    cdef double tot = n[0] + nb
    cdef double d = meanb - mean[0]
    if nb == 0:
        return
    if n[0] == 0:
        n[0], mean[0], m2[0] = nb, meanb, m2b
        return
    mean[0] = mean[0] + d * nb / tot
    m2[0] = m2[0] + m2b + d * (n[0] * nb / tot) * d
    n[0] = tot


cdef extern from "simd.h" nogil:
    # storage-generic names (simd.h dispatches on the pointer's type; Cython passes the
    # typed pointer through unconverted)
    double nc_get(const void* p, Py_ssize_t i)
    void nc_put(void* p, Py_ssize_t i, double v)
    void nc_add(const void* a, const void* b, void* out, Py_ssize_t n)
    void nc_copy_bytes(const void* src, void* dst, size_t n, int nt)
    void nc_shifted_sums(const void* p, Py_ssize_t n, double k, double* s1, double* s2)
    void nc_dy_sums(const void* dy, const double* w, const void* x, Py_ssize_t n, double mu,
                    double* s1, double* s2)
    void nc_inner_row_sums(const void* dy, const double* w, const void* x, Py_ssize_t n, double mu,
                           double rs, double* s1, double* s2, double* dw, double* db)
    void nc_inner_rows2_sums(const void* dy0, const void* dy1, const double* w, const void* x0,
                             const void* x1, Py_ssize_t n, double mu0, double mu1, double rs0, double rs1,
                             double* s1, double* s2, double* u1, double* u2, double* dw, double* db)
    void nc_col_shifted_sums(const void* x, Py_ssize_t rows, Py_ssize_t ld, Py_ssize_t tw,
                             double* s1, double* s2)
    void nc_col_dy_sums(const void* dy, const void* x, Py_ssize_t rows, Py_ssize_t ld,
                        Py_ssize_t tw, const double* mean, double* s1, double* s2)
    # float32 and half storage: the float32 elementwise passes
    void nc_affine_row(const void* x, void* y, Py_ssize_t n, double mu, double s, double t, int nt,
                       const void* pf1)
    void nc_affine_row_r(const void* x, void* y, Py_ssize_t n, const void* coefs, Py_ssize_t r, int nt)
    void nc_affine_inner_row(const void* x, void* y, Py_ssize_t n, double mu, double rs,
                             const float* w, const float* b, int nt, const void* pf1)
    void nc_affine_tile(const void* x, void* y, Py_ssize_t rows, Py_ssize_t ld, Py_ssize_t tw,
                        const double* mean, const double* scale, const double* shift, int nt)
    void nc_dx_row(const void* dy, const void* x, void* dx, Py_ssize_t n, double mu,
                   double k1, double k2, double k3, int nt, const void* pf1, const void* pf2)
    void nc_dx_row_r(const void* dy, const void* x, void* dx, Py_ssize_t n, const void* coefs, Py_ssize_t r,
                     int nt)
    void nc_dx_inner_row(const void* dy, const void* x, void* dx, Py_ssize_t n, double mu,
                         double rs, const float* w, double m1, double m2, int nt, const void* pf1,
                         const void* pf2)
    # the same plus dh (NULL: none), added after dx's rounding, as NumPy's dx + dh
    void nc_dx_row_d(const void* dy, const void* x, void* dx, Py_ssize_t n, double mu,
                     double k1, double k2, double k3, int nt, const void* pf1, const void* pf2, const void* dh)
    void nc_dx_inner_row_d(const void* dy, const void* x, void* dx, Py_ssize_t n, double mu,
                           double rs, const float* w, double m1, double m2, int nt, const void* pf1,
                           const void* pf2, const void* dh)
    void nc_dx_tile(const void* dy, const void* x, void* dx, Py_ssize_t rows, Py_ssize_t ld,
                    Py_ssize_t tw, const double* mean, const double* k1, const double* k2,
                    const double* k3, int nt)


cdef extern from "simd.h" nogil:
    void nc_sfence()
    void* nc_affine_coefs(const double* mean, const double* scale, const double* shift, Py_ssize_t R)
    void* nc_dx_coefs(const double* mean, const double* k1, const double* k2, const double* k3, Py_ssize_t R)
    bint nc_resident(const void* p, Py_ssize_t n)
    float* nc_to_f32(const double* p, Py_ssize_t n)
    void nc_affine_tile_f64(const double* x, double* y, Py_ssize_t rows, Py_ssize_t ld, Py_ssize_t tw,
                            const double* mean, const double* scale, const double* shift)
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
        k = nc_get(p, start)
        nc_shifted_sums(p + start, m, k, &s1, &s2)
        _merge(&count, &mean, &m2, <double>m, k + s1 / m, _clamp0(s2 - s1 * (s1 / m)))
        start = start + m
    out_mean[0] = mean
    out_m2[0] = m2


# ---------------------------------------------------------------------------------------
# Forward statistics on the (A, C, B) layout
# ---------------------------------------------------------------------------------------

def add(*, a, b, out, int threads):
    """IN a, b (n,) T; OUT out (n,) T: out = a + b, rounded as NumPy's a + b (the half
    types through float32); out may be a or b. Any shapes of n elements, C-contiguous."""
    cdef int T = _storage(a)
    cdef const void* pa = _in(a, T)
    cdef const void* pb = _in(b, T)
    cdef void* po = _out(out, T)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(<cnp.ndarray>a)
    if T == cnp.NPY_FLOAT32:
        _add(<const float*>pa, <const float*>pb, <float*>po, n, threads)
    elif T == HALF:
        _add(<const nc_f16*>pa, <const nc_f16*>pb, <nc_f16*>po, n, threads)
    elif T == BF16:
        _add(<const nc_bf16*>pa, <const nc_bf16*>pb, <nc_bf16*>po, n, threads)
    else:
        _add(<const double*>pa, <const double*>pb, <double*>po, n, threads)


cdef void _add(const floating* a, const floating* b, floating* out, Py_ssize_t n, int threads) noexcept nogil:
    cdef Py_ssize_t k, o
    cdef Py_ssize_t nb = (n + CACHED_ELEMS - 1) // CACHED_ELEMS
    for k in prange(nb, schedule='static', num_threads=threads, use_threads_if=threads > 1):
        o = k * CACHED_ELEMS
        nc_add(a + o, b + o, out + o, _block_rows(k, CACHED_ELEMS, n))


def moments_rows(*, x, part_mean, part_m2, int threads, mask=None, Py_ssize_t rows_per_group=1, part_count=None):
    """IN x (A, C, B) T; OUT part_mean, part_m2 (A, C) float64: mean and centred sum of
    squares of each row. With ``mask`` (masking.MaskRows for the A * R rows of x viewed
    as (A, R, S)): over the counted elements of each group of ``rows_per_group`` rows
    only, OUT part_mean, part_m2, part_count (A, R / J) float64 (0, 0, 0 for a group
    with none)."""
    if mask is not None:
        return _masked_moments_rows_entry(x, mask, rows_per_group, part_mean,
                                          part_m2, part_count, threads)
    cdef Py_ssize_t* d = _shape(x, 3)
    cdef int T = _storage(x)
    cdef double* pm = <double*>_out(part_mean, F64)
    cdef double* p2 = <double*>_out(part_m2, F64)
    if T == cnp.NPY_FLOAT32:
        _moments_rows(<const float*>_in(x, T), d[0] * d[1], d[2], pm, p2, threads)
    elif T == HALF:
        _moments_rows(<const nc_f16*>_in(x, T), d[0] * d[1], d[2], pm, p2, threads)
    elif T == BF16:
        _moments_rows(<const nc_bf16*>_in(x, T), d[0] * d[1], d[2], pm, p2, threads)
    else:
        _moments_rows(<const double*>_in(x, T), d[0] * d[1], d[2], pm, p2, threads)


cdef void _moments_rows(const floating* x, Py_ssize_t rows, Py_ssize_t B, double* pmean,
                        double* pm2, int threads) noexcept nogil:
    cdef Py_ssize_t r
    for r in prange(rows, schedule='static', num_threads=threads, use_threads_if=threads > 1):
        _row_moments(x + r * B, B, pmean + r, pm2 + r)


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
        nc_col_shifted_sums(x, rows, ld, tw, mean, m2)
    else:
        for r in range(1, rows):
            row = x + r * ld
            for c in range(tw):
                d = nc_get(row, c) - nc_get(x, c)  # widened first: float32 x - x can overflow
                mean[c] += d
                m2[c] += d * d
    for c in range(tw):
        s = mean[c]
        mean[c] = nc_get(x, c) + s / rows
        m2[c] = _clamp0(m2[c] - s * (s / rows))


def moments_cols(*, x, Py_ssize_t rows_per_block, part_mean, part_m2, int threads, mask=None, part_count=None):
    """IN x (A, C) T; OUT part_mean, part_m2 (ceil(A / rows_per_block), C) float64:
    moments of each column over each block of rows. With ``mask`` (masking.MaskRows for
    the A rows of C): over the counted elements only, their number per block and column
    into part_count (same shape)."""
    if mask is not None:
        return _masked_moments_cols_entry(x, mask, rows_per_block, part_mean,
                                          part_m2, part_count, threads)
    cdef Py_ssize_t* d = _shape(x, 2)
    cdef Py_ssize_t nb = _shape(part_mean, 2)[0]
    cdef int T = _storage(x)
    cdef double* pm = <double*>_out(part_mean, F64)
    cdef double* p2 = <double*>_out(part_m2, F64)
    if T == cnp.NPY_FLOAT32:
        _moments_cols(<const float*>_in(x, T), d[0], d[1], rows_per_block, nb, pm, p2, threads)
    elif T == HALF:
        _moments_cols(<const nc_f16*>_in(x, T), d[0], d[1], rows_per_block, nb, pm, p2, threads)
    elif T == BF16:
        _moments_cols(<const nc_bf16*>_in(x, T), d[0], d[1], rows_per_block, nb, pm, p2, threads)
    else:
        _moments_cols(<const double*>_in(x, T), d[0], d[1], rows_per_block, nb, pm, p2, threads)


cdef void _moments_cols(const floating* x, Py_ssize_t A, Py_ssize_t C, Py_ssize_t rpb, Py_ssize_t nb,
                        double* pmean, double* pm2, int threads) noexcept nogil:
    cdef Py_ssize_t k, c0, r0, t
    for k in prange(nb, schedule='static', num_threads=threads, use_threads_if=threads > 1):
        r0 = k * rpb
        for t in range((C + TILE - 1) // TILE):
            c0 = t * TILE
            _tile_col_moments(x + r0 * C + c0, _block_rows(k, rpb, A), C, _block_rows(t, TILE, C),
                              pmean + k * C + c0, pm2 + k * C + c0)


# ---------------------------------------------------------------------------------------
# Elementwise passes and backward sums on the (A, R, S) layout, one scale/shift per row
# ---------------------------------------------------------------------------------------

cdef inline void _affine_row(const floating* x, floating* y, Py_ssize_t n,
                             double mu, double s, double t, bint nt, const floating* pf) noexcept nogil:
    # nt: streaming stores (see _streams); pf: the next group's input, prefetched alongside
    # (or NULL)
    cdef Py_ssize_t i
    if floating is not double:  # float32 arithmetic within the contract (simd.h)
        nc_affine_row(x, y, n, mu, s, t, nt, pf)
        return
    for i in range(n):
        y[i] = <floating>((x[i] - mu) * s + t)


cdef inline void _affine_tile(const floating* x, floating* y, Py_ssize_t rows, Py_ssize_t ld,
                              Py_ssize_t tw, const double* mean, const double* scale,
                              const double* shift, bint nt) noexcept nogil:
    # (rows, tw) tile of a column layout. Narrow tiles keep their coefficients in L1 and
    # the compiler vectorizes along c; wide ones would reload them from L2 for every row,
    # so there four rows share each coefficient load (simd.h).
    cdef Py_ssize_t a, c
    if floating is not double:  # float32 coefficients and arithmetic (simd.h)
        nc_affine_tile(x, y, rows, ld, tw, mean, scale, shift, nt)
        return
    if tw >= WIDE_TILE:
        nc_affine_tile_f64(x, y, rows, ld, tw, mean, scale, shift)
        return
    for a in range(rows):
        for c in range(tw):
            y[a * ld + c] = <floating>((x[a * ld + c] - mean[c]) * scale[c] + shift[c])


def affine_rows(*, x, row_mean, row_scale, row_shift, Py_ssize_t rows_per_block, y, int threads):
    """IN x (A, R, S) T, row_mean, row_scale, row_shift (R,) float64; OUT y (A, R, S) T:
    y = (x - mean[r]) * scale[r] + shift[r] (float32 within the accuracy contract, see
    simd.h); ``rows_per_block`` cuts the rows of the S == 1 (column) layout.

    Subtracting the mean first (rather than folding it into shift) keeps the rounding at
    the size of y instead of |x| * scale, which matters when x sits at a large offset.
    """
    cdef Py_ssize_t* d = _shape(x, 3)
    cdef int T = _storage(x)
    cdef const double* mu = <const double*>_in(row_mean, F64)
    cdef const double* sc = <const double*>_in(row_scale, F64)
    cdef const double* sh = <const double*>_in(row_shift, F64)
    if T == cnp.NPY_FLOAT32:
        _affine_rows(<const float*>_in(x, T), d[0], d[1], d[2], mu, sc, sh, rows_per_block,
                     <float*>_out(y, T), threads)
    elif T == HALF:
        _affine_rows(<const nc_f16*>_in(x, T), d[0], d[1], d[2], mu, sc, sh, rows_per_block,
                     <nc_f16*>_out(y, T), threads)
    elif T == BF16:
        _affine_rows(<const nc_bf16*>_in(x, T), d[0], d[1], d[2], mu, sc, sh, rows_per_block,
                     <nc_bf16*>_out(y, T), threads)
    else:
        _affine_rows(<const double*>_in(x, T), d[0], d[1], d[2], mu, sc, sh, rows_per_block,
                     <double*>_out(y, T), threads)


cdef void _affine_rows(const floating* x, Py_ssize_t A, Py_ssize_t R, Py_ssize_t S, const double* mean,
                       const double* scale, const double* shift, Py_ssize_t rpb, floating* y,
                       int threads) noexcept nogil:
    cdef Py_ssize_t i, a, r, t
    cdef void* coefs = NULL
    cdef bint nt = _streams(y, A * R * S, sizeof(floating))
    if S == 1:
        for i in prange((A + rpb - 1) // rpb, schedule='static', num_threads=threads, use_threads_if=threads > 1):
            a = i * rpb
            for t in range((R + TILE - 1) // TILE):
                r = t * TILE
                _affine_tile(x + a * R + r, y + a * R + r, _block_rows(i, rpb, A), R,
                             _block_rows(t, TILE, R), mean + r, scale + r, shift + r, nt)
    else:
        # float32 coefficients made once per channel rather than once per row (rows may be
        # short: a 4 x 4 feature map)
        coefs = nc_affine_coefs(mean, scale, shift, R) if floating is not double else NULL
        for i in prange(A * R, schedule='static', num_threads=threads, use_threads_if=threads > 1):
            a = i // R
            r = i - a * R
            if floating is not double:
                if coefs != NULL:
                    nc_affine_row_r(x + i * S, y + i * S, S, coefs, r, nt)
                    continue
            _affine_row(x + i * S, y + i * S, S, mean[r], scale[r], shift[r], nt, NULL)
        free(coefs)
    if nt:
        nc_sfence()


cdef inline void _dy_sums(const floating* dy, const double* w, const floating* x, Py_ssize_t n,
                          double mu, double* s1, double* s2) noexcept nogil:
    # s1 = sum g, s2 = sum g * (x - mu) with g = dy * w (w NULL: g = dy), in one pass
    nc_dy_sums(dy, w, x, n, mu, s1, s2)


cdef inline void _row_sums(const floating* dy, const floating* x, Py_ssize_t n, double mu,
                           double* s1, double* s2) noexcept nogil:
    _dy_sums(dy, NULL, x, n, mu, s1, s2)


cdef extern from "simd.h" nogil:
    void nc_inert_copy(const void* dy, const void* x, const unsigned char* m, Py_ssize_t n, void* bdy, void* bx)


cdef inline void _masked_row_sums(const floating* dy, const floating* x, const unsigned char* m, int step,
                                  Py_ssize_t n, const double* w, double mu, double rs, double* s1, double* s2,
                                  double* dw, double* db) noexcept nogil:
    # The backward's row sums over the counted elements only (the others are not data):
    # s1 = sum g, s2 = sum g * (x - mu), g = dy * w (w NULL: dy); with dw (parameters
    # along the row, w given) also dw += dy * (x - mu) * rs and db += dy, as
    # nc_inner_row_sums adds them. A row of step 0 is counted whole or not at all; a row
    # of step 1 is summed through stack copies with its uncounted lanes made 0.
    cdef double bdy[INERT_ROW]
    cdef double bx[INERT_ROW]  # (room for INERT_ROW elements of any storage type)
    cdef Py_ssize_t start = 0, k
    cdef double a = 0.0, b = 0.0, t1 = 0.0, t2 = 0.0
    if step == 0:
        if m[0] == 0:
            s1[0] = 0.0
            s2[0] = 0.0
        elif dw != NULL:
            nc_inner_row_sums(dy, w, x, n, mu, rs, s1, s2, dw, db)
        else:
            _dy_sums(dy, w, x, n, mu, s1, s2)
        return
    while start < n:
        k = n - start
        if k > INERT_ROW:
            k = INERT_ROW
        nc_inert_copy(dy + start, x + start, m + start, k, <floating*>bdy, <floating*>bx)
        if dw != NULL:
            nc_inner_row_sums(<floating*>bdy, w + start, <floating*>bx, k, mu, rs, &a, &b, dw + start, db + start)
        else:
            _dy_sums(<floating*>bdy, w, <floating*>bx, k, mu, &a, &b)  # (w NULL here: rows of one parameter)
        t1 = t1 + a
        t2 = t2 + b
        start = start + k
    s1[0] = t1
    s2[0] = t2


cdef inline void _masked_tile_col_sums(const floating* dy, const floating* x, const unsigned char* m,
                                       const Py_ssize_t* off, int step, Py_ssize_t c0, Py_ssize_t rows,
                                       Py_ssize_t ld, Py_ssize_t tw, const double* mean, double* s1,
                                       double* s2) noexcept nogil:
    # _tile_col_sums over the counted rows (step 0: runs of whole rows counted, through the
    # plain sweep) or elements (step 1: each row's tile through stack copies with its
    # uncounted lanes made 0); row r's mask bytes at m + off[r] (+ c0 when step 1)
    cdef double bdy[TILE]
    cdef double bx[TILE]
    cdef Py_ssize_t r = 0, e, c
    for c in range(tw):
        s1[c] = 0.0
        s2[c] = 0.0
    while r < rows:
        if step == 0:
            e = r + 1
            while e < rows and (m[off[e]] != 0) == (m[off[r]] != 0):
                e = e + 1
            if m[off[r]] != 0:
                _col_dy_sums(dy + r * ld, x + r * ld, e - r, ld, tw, mean, s1, s2)
            r = e
        else:
            nc_inert_copy(dy + r * ld, x + r * ld, m + off[r] + c0, tw, <floating*>bdy, <floating*>bx)
            _col_dy_sums(<floating*>bdy, <floating*>bx, 1, tw, tw, mean, s1, s2)
            r = r + 1


def sums_rows(*, dy, x, row_mean, sum_dy, sum_dy_xc, int threads, mask=None):
    """IN dy, x (A, R, S) T, row_mean (R,) float64; OUT sum_dy, sum_dy_xc (A, R) float64:
    row sums of dy and of dy * (x - mean). With ``mask`` (masking.MaskRows for the A * R
    rows of S, as dx_rows reads it): over the counted elements only."""
    cdef Py_ssize_t* d = _shape(x, 3)
    cdef int T = _storage(x)
    cdef const double* mu = <const double*>_in(row_mean, F64)
    cdef double* q1 = <double*>_out(sum_dy, F64)
    cdef double* q2 = <double*>_out(sum_dy_xc, F64)
    cdef nc_mask mk
    _mask_of(mask, &mk)
    cdef const unsigned char* m = mk.bytes
    cdef const Py_ssize_t* off = mk.off
    cdef int mstep = mk.step
    if T == cnp.NPY_FLOAT32:
        _sums_rows(<const float*>_in(dy, T), <const float*>_in(x, T), d[0], d[1], d[2], mu, q1, q2, threads,
                   m, off, mstep)
    elif T == HALF:
        _sums_rows(<const nc_f16*>_in(dy, T), <const nc_f16*>_in(x, T), d[0], d[1], d[2], mu, q1, q2, threads,
                   m, off, mstep)
    elif T == BF16:
        _sums_rows(<const nc_bf16*>_in(dy, T), <const nc_bf16*>_in(x, T), d[0], d[1], d[2], mu, q1, q2, threads,
                   m, off, mstep)
    else:
        _sums_rows(<const double*>_in(dy, T), <const double*>_in(x, T), d[0], d[1], d[2], mu, q1, q2, threads,
                   m, off, mstep)


cdef void _sums_rows(const floating* dy, const floating* x, Py_ssize_t A, Py_ssize_t R, Py_ssize_t S,
                     const double* mean, double* p1, double* p2, int threads, const unsigned char* m=NULL,
                     const Py_ssize_t* off=NULL, int step=0) noexcept nogil:
    cdef Py_ssize_t i, a, r
    for i in prange(A * R, schedule='static', num_threads=threads, use_threads_if=threads > 1):
        a = i // R
        r = i - a * R
        if m != NULL:
            _masked_row_sums(dy + i * S, x + i * S, m + off[i], step, S, NULL, mean[r], 0.0, p1 + i, p2 + i,
                             NULL, NULL)
        else:
            _row_sums(dy + i * S, x + i * S, S, mean[r], p1 + i, p2 + i)


cdef inline void _col_dy_sums(const floating* dy, const floating* x, Py_ssize_t rows, Py_ssize_t ld,
                              Py_ssize_t tw, const double* mean, double* s1, double* s2) noexcept nogil:
    # s1[c] += dy, s2[c] += dy * (x - mean[c]) over the rows, added to what s1, s2 hold
    cdef Py_ssize_t r, c
    cdef double g
    if tw >= WIDE_REDUCTION:  # simd.h: several rows per load and store of the accumulators
        nc_col_dy_sums(dy, x, rows, ld, tw, mean, s1, s2)
        return
    for r in range(rows):
        for c in range(tw):
            g = nc_get(dy, r * ld + c)
            s1[c] += g
            s2[c] += g * (nc_get(x, r * ld + c) - mean[c])


cdef inline void _tile_col_sums(const floating* dy, const floating* x, Py_ssize_t rows,
                                Py_ssize_t ld, Py_ssize_t tw, const double* mean,
                                double* s1, double* s2) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(tw):
        s1[c] = 0.0
        s2[c] = 0.0
    _col_dy_sums(dy, x, rows, ld, tw, mean, s1, s2)


def sums_cols(*, dy, x, row_mean, Py_ssize_t rows_per_block, sum_dy, sum_dy_xc, int threads, mask=None):
    """IN dy, x (A, C) T, row_mean (C,) float64; OUT sum_dy, sum_dy_xc (ceil(A /
    rows_per_block), C) float64: per block of rows, column sums of dy and of dy * (x -
    mean). With ``mask`` (masking.MaskRows for the A rows of C): over the counted elements."""
    cdef Py_ssize_t* d = _shape(x, 2)
    cdef Py_ssize_t nb = _shape(sum_dy, 2)[0]
    cdef int T = _storage(x)
    cdef const double* mu = <const double*>_in(row_mean, F64)
    cdef double* q1 = <double*>_out(sum_dy, F64)
    cdef double* q2 = <double*>_out(sum_dy_xc, F64)
    cdef nc_mask mk
    _mask_of(mask, &mk)
    cdef const unsigned char* m = mk.bytes
    cdef const Py_ssize_t* off = mk.off
    cdef int mstep = mk.step
    if T == cnp.NPY_FLOAT32:
        _sums_cols(<const float*>_in(dy, T), <const float*>_in(x, T), d[0], d[1], rows_per_block, nb,
                   mu, q1, q2, threads, m, off, mstep)
    elif T == HALF:
        _sums_cols(<const nc_f16*>_in(dy, T), <const nc_f16*>_in(x, T), d[0], d[1], rows_per_block, nb,
                   mu, q1, q2, threads, m, off, mstep)
    elif T == BF16:
        _sums_cols(<const nc_bf16*>_in(dy, T), <const nc_bf16*>_in(x, T), d[0], d[1], rows_per_block, nb,
                   mu, q1, q2, threads, m, off, mstep)
    else:
        _sums_cols(<const double*>_in(dy, T), <const double*>_in(x, T), d[0], d[1], rows_per_block, nb,
                   mu, q1, q2, threads, m, off, mstep)


cdef void _sums_cols(const floating* dy, const floating* x, Py_ssize_t A, Py_ssize_t C, Py_ssize_t rpb,
                     Py_ssize_t nb, const double* mean, double* p1, double* p2, int threads,
                     const unsigned char* m=NULL, const Py_ssize_t* off=NULL, int step=0) noexcept nogil:
    cdef Py_ssize_t k, r0, c0, t
    for k in prange(nb, schedule='static', num_threads=threads, use_threads_if=threads > 1):
        r0 = k * rpb
        for t in range((C + TILE - 1) // TILE):
            c0 = t * TILE
            if m != NULL:
                _masked_tile_col_sums(dy + r0 * C + c0, x + r0 * C + c0, m, off + r0, step, c0,
                                      _block_rows(k, rpb, A), C, _block_rows(t, TILE, C), mean + c0,
                                      p1 + k * C + c0, p2 + k * C + c0)
            else:
                _tile_col_sums(dy + r0 * C + c0, x + r0 * C + c0, _block_rows(k, rpb, A), C,
                               _block_rows(t, TILE, C), mean + c0, p1 + k * C + c0, p2 + k * C + c0)


cdef inline void _dx_row(const floating* dy, const floating* x, floating* dx, Py_ssize_t n,
                         double mu, double k1, double k2, double k3, bint nt, const floating* pf1,
                         const floating* pf2, const floating* dh=NULL) noexcept nogil:
    # dh (or NULL): added to each dx after its rounding, in the same pass
    cdef Py_ssize_t i
    if floating is not double:
        if dh != NULL:
            nc_dx_row_d(dy, x, dx, n, mu, k1, k2, k3, nt, pf1, pf2, dh)
        else:
            nc_dx_row(dy, x, dx, n, mu, k1, k2, k3, nt, pf1, pf2)
        return
    for i in range(n):
        dx[i] = <floating>(dy[i] * k1 + (x[i] - mu) * k2 + k3)
        if dh != NULL:
            dx[i] = dx[i] + dh[i]


cdef inline void _dx_tile(const floating* dy, const floating* x, floating* dx, Py_ssize_t rows,
                          Py_ssize_t ld, Py_ssize_t tw, const double* mean, const double* k1,
                          const double* k2, const double* k3, bint nt) noexcept nogil:
    # as _affine_tile: rows share coefficient loads only where the tile is wide
    cdef Py_ssize_t a, c
    if floating is not double:
        nc_dx_tile(dy, x, dx, rows, ld, tw, mean, k1, k2, k3, nt)
        return
    if tw >= WIDE_TILE:
        nc_dx_tile_f64(dy, x, dx, rows, ld, tw, mean, k1, k2, k3)
        return
    for a in range(rows):
        for c in range(tw):
            dx[a * ld + c] = <floating>(dy[a * ld + c] * k1[c] + (x[a * ld + c] - mean[c]) * k2[c] + k3[c])


def dx_rows(*, dy, x, row_mean, dy_scale, xc_scale, dx_shift, Py_ssize_t rows_per_block, dx, int threads, dh=None,
            mask=None, bint cols=False):
    """IN dy, x (A, R, S) T, row_mean, dy_scale, xc_scale, dx_shift (R,) float64, dh
    (A, R, S) T or None; OUT dx (A, R, S) T: dx = dy * dy_scale[r] + (x - mean[r]) *
    xc_scale[r] + dx_shift[r] (float32 as in affine_rows), plus dh after dx's rounding (as
    add) when given. With ``mask`` (masking.MaskRows for the kernel's rows: ``cols``, the
    A rows of R elements of the column strategy, S == 1; else the A * R rows of S): dx
    where counted, 0 elsewhere (not data), then dh everywhere when given."""
    if mask is not None:
        return _masked_dx_rows_entry(dy, x, mask, cols, row_mean, dy_scale,
                                     xc_scale, dx_shift, rows_per_block, dh, dx, threads)
    cdef Py_ssize_t* d = _shape(x, 3)
    cdef int T = _storage(x)
    cdef const double* mu = <const double*>_in(row_mean, F64)
    cdef const double* c1 = <const double*>_in(dy_scale, F64)
    cdef const double* c2 = <const double*>_in(xc_scale, F64)
    cdef const double* c3 = <const double*>_in(dx_shift, F64)
    cdef const void* pdh = NULL if dh is None else _in(dh, T)
    if T == cnp.NPY_FLOAT32:
        _dx_rows(<const float*>_in(dy, T), <const float*>_in(x, T), d[0], d[1], d[2], mu, c1, c2, c3,
                 rows_per_block, <const float*>pdh, <float*>_out(dx, T), threads)
    elif T == HALF:
        _dx_rows(<const nc_f16*>_in(dy, T), <const nc_f16*>_in(x, T), d[0], d[1], d[2], mu, c1, c2, c3,
                 rows_per_block, <const nc_f16*>pdh, <nc_f16*>_out(dx, T), threads)
    elif T == BF16:
        _dx_rows(<const nc_bf16*>_in(dy, T), <const nc_bf16*>_in(x, T), d[0], d[1], d[2], mu, c1, c2, c3,
                 rows_per_block, <const nc_bf16*>pdh, <nc_bf16*>_out(dx, T), threads)
    else:
        _dx_rows(<const double*>_in(dy, T), <const double*>_in(x, T), d[0], d[1], d[2], mu, c1, c2, c3,
                 rows_per_block, <const double*>pdh, <double*>_out(dx, T), threads)


cdef void _dx_rows(const floating* dy, const floating* x, Py_ssize_t A, Py_ssize_t R, Py_ssize_t S,
                   const double* mean, const double* k1, const double* k2, const double* k3,
                   Py_ssize_t rpb, const floating* dh, floating* dx, int threads) noexcept nogil:
    cdef Py_ssize_t i, a, r, t, o, j, rows, tw
    cdef void* coefs = NULL
    cdef bint nt = _streams(dx, A * R * S, sizeof(floating))
    if S == 1:
        for i in prange((A + rpb - 1) // rpb, schedule='static', num_threads=threads, use_threads_if=threads > 1):
            a = i * rpb
            rows = _block_rows(i, rpb, A)
            for t in range((R + TILE - 1) // TILE):
                r = t * TILE
                o = a * R + r
                tw = _block_rows(t, TILE, R)
                # with dh the tile's rows are added to while in cache, so not streamed
                _dx_tile(dy + o, x + o, dx + o, rows, R, tw, mean + r, k1 + r, k2 + r, k3 + r, nt and dh == NULL)
                if dh != NULL:
                    for j in range(rows):
                        nc_add(dx + o + j * R, dh + o + j * R, dx + o + j * R, tw)
    else:
        # float32 coefficients made once per channel (as in _affine_rows); with dh, the
        # pass that adds it makes its own per row
        coefs = nc_dx_coefs(mean, k1, k2, k3, R) if floating is not double and dh == NULL else NULL
        for i in prange(A * R, schedule='static', num_threads=threads, use_threads_if=threads > 1):
            a = i // R
            r = i - a * R
            if floating is not double:
                if coefs != NULL:
                    nc_dx_row_r(dy + i * S, x + i * S, dx + i * S, S, coefs, r, nt)
                    continue
            _dx_row(dy + i * S, x + i * S, dx + i * S, S, mean[r], k1[r], k2[r], k3[r], nt, NULL, NULL,
                    dh + i * S if dh != NULL else NULL)
        free(coefs)
    if nt:
        nc_sfence()


# ---------------------------------------------------------------------------------------
# Elementwise passes and backward sums on (1, R, S) with parameters along S
# (row r uses w[rp[r] : rp[r] + S])
# ---------------------------------------------------------------------------------------

cdef inline void _affine_inner_row(const floating* x, floating* y, Py_ssize_t n, double mu,
                                   double rs, const double* w, const double* b, const float* wf,
                                   const float* bf, bint nt, const floating* pf) noexcept nogil:
    # wf, bf: float32 views of w, b for the float32 pass (see _params_of)
    cdef Py_ssize_t i
    if floating is not double:
        nc_affine_inner_row(x, y, n, mu, rs, wf, bf, nt, pf)
        return
    for i in range(n):
        y[i] = <floating>((x[i] - mu) * rs * w[i] + b[i])


def affine_inner(*, x, row_mean, row_rstd, rp, weight=None, bias=None, y, int threads):
    """IN x (1, R, S) T, row_mean, row_rstd (R,) float64, rp (R,) intp offset of row r's
    parameters, weight, bias (P,) in their own dtype or None (ones, zeros); OUT y (1, R, S)
    T: y = (x - mean[r]) * rstd[r] * weight[rp[r] + s] + bias[rp[r] + s]."""
    cdef Py_ssize_t* d = _shape(x, 3)
    cdef int T = _storage(x)
    cdef const double* mu = <const double*>_in(row_mean, F64)
    cdef const double* rs = <const double*>_in(row_rstd, F64)
    cdef const Py_ssize_t* p = <const Py_ssize_t*>_in(rp, IDX)
    cdef void* py = _out(y, T)
    cdef const void* px = _in(x, T)
    cdef nc_params q
    try:
        _params_of(weight, bias, 0 if weight is not None or bias is not None else _inner_size(rp, d[2]),
                   T != F64, &q)
        if T == cnp.NPY_FLOAT32:
            _affine_inner(<const float*>px, d[1], d[2], mu, rs, p, q.w, q.b, q.wf, q.bf, <float*>py, threads)
        elif T == HALF:
            _affine_inner(<const nc_f16*>px, d[1], d[2], mu, rs, p, q.w, q.b, q.wf, q.bf, <nc_f16*>py, threads)
        elif T == BF16:
            _affine_inner(<const nc_bf16*>px, d[1], d[2], mu, rs, p, q.w, q.b, q.wf, q.bf, <nc_bf16*>py, threads)
        else:
            _affine_inner(<const double*>px, d[1], d[2], mu, rs, p, q.w, q.b, NULL, NULL, <double*>py, threads)
    finally:
        _params_free(&q)


cdef void _affine_inner(const floating* x, Py_ssize_t R, Py_ssize_t S, const double* mean, const double* rstd,
                        const Py_ssize_t* rp, const double* w, const double* b, const float* wf,
                        const float* bf, floating* y, int threads) noexcept nogil:
    cdef Py_ssize_t r
    cdef bint nt = _streams(y, R * S, sizeof(floating))
    for r in prange(R, schedule='static', num_threads=threads, use_threads_if=threads > 1):
        _affine_inner_row(x + r * S, y + r * S, S, mean[r], rstd[r], w + rp[r], b + rp[r],
                          wf + rp[r] if wf != NULL else NULL, bf + rp[r] if bf != NULL else NULL, nt, NULL)
    if nt:
        nc_sfence()


# ---------------------------------------------------------------------------------------
# One-pass forward for A == 1: each group is contiguous, so its statistics and its
# normalized rows come from one read of x while the group is in cache.
# ---------------------------------------------------------------------------------------


def normalize_groups(*, x, Py_ssize_t rows_per_group, bint center, double eps, int affine, rp, weight=None,
                     bias=None, mean, var, rstd, y, int threads, residual=None, h=None, mask=None, counts=None):
    """IN x (1, C, B) T (group c is x[0, c], J = rows_per_group rows of S), rp (C * J,) intp
    parameter offset of each row, weight, bias (P,) in their own dtype or None (ones,
    zeros; unread with affine NONE), affine an nc_affine_kind (contract.h), residual (1, C,
    B) T or None; OUT mean (C,) (0 when not centred), var (C,) (mean square when not
    centred), rstd (C,) float64, y (1, C, B) T and h (1, C, B) T (with a residual):
    statistics of each group, then its rows normalized, as the separate kernels do, while
    the group is in cache. With a residual the group normalized is h = x + residual (as
    add), made in the same visit. With ``mask`` (masking.MaskRows for the C * J rows of
    S): over the counted elements (of h with a residual) only, OUT counts (C,) float64
    counted elements per group; a group without counted elements gets mean 0, var 0 and
    rstd 0 (y is its bias)."""
    cdef Py_ssize_t* d = _shape(x, 3)
    cdef int T = _storage(x)
    cdef nc_mask mk
    _mask_of(mask, &mk)
    cdef const unsigned char* m = mk.bytes
    cdef const Py_ssize_t* off = mk.off
    cdef int mstep = mk.step
    cdef double* n = NULL if mask is None else <double*>_out(counts, F64)
    cdef const void* pr = NULL if residual is None else _in(residual, T)
    cdef void* ph = NULL if residual is None else _out(h, T)
    cdef const Py_ssize_t* p = <const Py_ssize_t*>_in(rp, IDX)
    cdef double* mu = <double*>_out(mean, F64)
    cdef double* v = <double*>_out(var, F64)
    cdef double* rs = <double*>_out(rstd, F64)
    cdef nc_params q
    q.own[0] = q.own[1] = q.own[2] = q.own[3] = NULL
    q.w = q.b = NULL
    q.wf = q.bf = NULL
    cdef const double* pw
    cdef const double* pb
    cdef const float* wf
    cdef const float* bf
    cdef void* scratch = NULL
    cdef Py_ssize_t item = cnp.PyArray_ITEMSIZE(<cnp.ndarray>x)
    try:
        if residual is not None:  # a group's h per thread (see _normalize_groups)
            scratch = malloc(<size_t>(max(threads, 1) * max(d[2], 1) * item))
            if scratch == NULL:
                raise MemoryError()
        if affine != NC_AFFINE_NONE:
            _params_of(weight, bias, 0, affine == NC_AFFINE_INNER and T != F64, &q)
        pw, pb, wf, bf = q.w, q.b, q.wf, q.bf
        if T == cnp.NPY_FLOAT32:
            _normalize_groups(<const float*>_in(x, T), <const float*>pr, <float*>ph, d[1], d[2], rows_per_group,
                              center, eps, affine, p, pw, pb, wf, bf, mu, v, rs, <float*>_out(y, T), threads,
                              <float*>scratch, m, off, mstep, n)
        elif T == HALF:
            _normalize_groups(<const nc_f16*>_in(x, T), <const nc_f16*>pr, <nc_f16*>ph, d[1], d[2],
                              rows_per_group, center, eps, affine, p, pw, pb, wf, bf, mu, v, rs,
                              <nc_f16*>_out(y, T), threads, <nc_f16*>scratch, m, off, mstep, n)
        elif T == BF16:
            _normalize_groups(<const nc_bf16*>_in(x, T), <const nc_bf16*>pr, <nc_bf16*>ph, d[1], d[2],
                              rows_per_group, center, eps, affine, p, pw, pb, wf, bf, mu, v, rs,
                              <nc_bf16*>_out(y, T), threads, <nc_bf16*>scratch, m, off, mstep, n)
        else:
            _normalize_groups(<const double*>_in(x, T), <const double*>pr, <double*>ph, d[1], d[2],
                              rows_per_group, center, eps, affine, p, pw, pb, NULL, NULL, mu, v, rs,
                              <double*>_out(y, T), threads, <double*>scratch, m, off, mstep, n)
    finally:
        _params_free(&q)
        free(scratch)


cdef void _normalize_groups(const floating* x, const floating* residual, floating* h, Py_ssize_t C,
                            Py_ssize_t B, Py_ssize_t J, bint center,
                            double eps, int affine, const Py_ssize_t* rp, const double* w, const double* bias,
                            const float* wf, const float* bf, double* mean, double* var, double* rstd,
                            floating* y, int threads, floating* scratch, const unsigned char* mask=NULL,
                            const Py_ssize_t* moff=NULL, int mstep=0, double* counts=NULL) noexcept nogil:
    # With a residual, scratch holds B elements per thread: the group's h = x + residual is
    # made there (in L1 for rows up to a few thousand), normalized from there and streamed
    # out to h, so x and residual are read once and h and y written once, without a read
    # for ownership of h.
    cdef Py_ssize_t S = B // J
    cdef bint nt = _streams(y, C * B, sizeof(floating))
    cdef bint nt_h = residual != NULL and _streams(h, C * B, sizeof(floating))
    cdef Py_ssize_t c, j, r, o
    cdef double mu, m2, v, rs, n
    cdef const floating* pf
    cdef const floating* g
    cdef floating* stage
    for c in prange(C, schedule='static', num_threads=threads, use_threads_if=threads > 1):
        # Cython makes a prange variable thread-private only if the body assigns it;
        # a write through a pointer does not count, so assign first.
        mu = 0.0
        m2 = 0.0
        g = x + c * B
        stage = NULL
        if residual != NULL:
            stage = scratch + threadid() * B
            nc_add(g, residual + c * B, stage, B)
            g = stage
        n = <double>B
        if mask != NULL:  # the counted elements' moments, row by row; counts[c] of them
            _group_moments_masked(g, mask, moff, mstep, c * J, J, S, &mu, &m2, &n)
            counts[c] = n
        else:
            _row_moments(g, B, &mu, &m2)
        if n > 0:
            v = _representable(mu, m2 / n, center)
            mu = v - v + mu  # NaN with v
            if not center:
                v = v + mu * mu
                mu = 0.0
            rs = 1.0 / sqrt(v + eps)
        else:  # nothing counted: xhat = 0, y the bias
            mu = 0.0
            v = 0.0
            rs = 0.0
        mean[c] = mu
        var[c] = v
        rstd[c] = rs
        for j in range(J):
            r = c * J + j
            o = c * B + j * S
            pf = x + o + PF_AHEAD * B if c + PF_AHEAD < C else NULL  # a later group, while this one is in L1
            if affine == NC_AFFINE_INNER:
                _affine_inner_row(g + j * S, y + o, S, mu, rs, w + rp[r], bias + rp[r],
                                  wf + rp[r] if wf != NULL else NULL, bf + rp[r] if bf != NULL else NULL,
                                  nt, pf)
            elif affine == NC_AFFINE_ROW:
                _affine_row(g + j * S, y + o, S, mu, rs * w[rp[r]], bias[rp[r]], nt, pf)
            else:
                _affine_row(g + j * S, y + o, S, mu, rs, 0.0, nt, pf)
        if stage != NULL:
            nc_copy_bytes(stage, h + c * B, B * sizeof(floating), nt_h)
    if nt or nt_h:
        nc_sfence()


cdef inline void _row_param_sums(const floating* dy, const floating* x, Py_ssize_t n,
                                 double mu, double rs, double* dw, double* db) noexcept nogil:
    cdef Py_ssize_t i
    cdef double g
    for i in range(n):
        g = nc_get(dy, i)
        dw[i] += g * ((nc_get(x, i) - mu) * rs)
        db[i] += g


def backward_groups(*, dy, x, Py_ssize_t rows_per_group, bint center, rp, weight=None, mean, rstd, counts,
                    Py_ssize_t groups_per_block, dx, int threads, row_sums=None, part_grads=None, dh=None, mask=None):
    """IN dy, x (1, C, B) T (group c is x[0, c], J = rows_per_group rows of S), rp
    (C * J,) intp, weight (P,) in its own dtype or None (ones), mean, rstd, counts (C,)
    float64 (the elements of each group; 0 reads as 1: such a group's rstd is 0), dh (1,
    C, B) T or None; OUT dx (1, C, B) T, and either row_sums (2, C * J) float64, the row
    sums of dy and dy * (x - mean) (one weight per row, w[rp[r]]), or part_grads (2,
    ceil(C / groups_per_block), P) float64 zeroed, the dweight / dbias partials (the
    parameters along the rows, w[rp[r] + s]).
    Training-mode backward in one visit per group: the group's sums, then its dx while dy
    and x are still in cache (same formulas as dx_rows / dx_inner), plus dh (as add, after
    dx's rounding) in the same visit. With ``mask`` (as normalize_groups takes it, counts
    from it): the sums run over the counted elements only (the others are not data), and
    dx is 0 where not counted (then dh is added everywhere, to those zeros too)."""
    cdef Py_ssize_t* d = _shape(x, 3)
    cdef Py_ssize_t R = _shape(rp, 1)[0]
    cdef int affine = NC_AFFINE_INNER if part_grads is not None else (
        NC_AFFINE_ROW if weight is not None else NC_AFFINE_NONE)
    cdef Py_ssize_t nb = 1, P = 0
    cdef double* dw = NULL
    cdef double* db = NULL
    if part_grads is not None:
        nb, P = _shape(part_grads, 3)[1], _shape(part_grads, 3)[2]
        dw = <double*>_out(part_grads, F64)
        db = dw + nb * P
    cdef int T = _storage(x)
    cdef nc_mask mk
    _mask_of(mask, &mk)
    cdef const double* n = <const double*>_in(counts, F64)
    cdef const Py_ssize_t* p = <const Py_ssize_t*>_in(rp, IDX)
    cdef const double* mu = <const double*>_in(mean, F64)
    cdef const double* rs = <const double*>_in(rstd, F64)
    cdef double* q1 = NULL if row_sums is None else <double*>_out(row_sums, F64)
    cdef double* q2 = NULL if row_sums is None else q1 + R
    cdef const void* pdh = NULL if dh is None else _in(dh, T)
    cdef const void* pdy = _in(dy, T)
    cdef const void* px = _in(x, T)
    cdef void* pdx = _out(dx, T)
    cdef nc_params q
    q.own[0] = q.own[1] = q.own[2] = q.own[3] = NULL
    q.w = q.wf = NULL
    try:
        if affine != NC_AFFINE_NONE:  # (the masked pass reads w in double)
            _params_of(weight, None, P if weight is None else 0, affine == NC_AFFINE_INNER and T != F64
                       and mask is None, &q)
        if T == cnp.NPY_FLOAT32:
            _backward_groups(<const float*>pdy, <const float*>px, d[1], d[2], rows_per_group, center, affine, p,
                             q.w, q.wf, mu, rs, groups_per_block, q1, q2, P, dw, db, <const float*>pdh,
                             <float*>pdx, threads, mk.bytes, mk.off, mk.step, n)
        elif T == HALF:
            _backward_groups(<const nc_f16*>pdy, <const nc_f16*>px, d[1], d[2], rows_per_group, center, affine,
                             p, q.w, q.wf, mu, rs, groups_per_block, q1, q2, P, dw, db, <const nc_f16*>pdh,
                             <nc_f16*>pdx, threads, mk.bytes, mk.off, mk.step, n)
        elif T == BF16:
            _backward_groups(<const nc_bf16*>pdy, <const nc_bf16*>px, d[1], d[2], rows_per_group, center, affine,
                             p, q.w, q.wf, mu, rs, groups_per_block, q1, q2, P, dw, db, <const nc_bf16*>pdh,
                             <nc_bf16*>pdx, threads, mk.bytes, mk.off, mk.step, n)
        else:
            _backward_groups(<const double*>pdy, <const double*>px, d[1], d[2], rows_per_group, center, affine,
                             p, q.w, NULL, mu, rs, groups_per_block, q1, q2, P, dw, db, <const double*>pdh,
                             <double*>pdx, threads, mk.bytes, mk.off, mk.step, n)
    finally:
        _params_free(&q)


cdef inline void _group_dx(const floating* dy, const floating* x, floating* dx, Py_ssize_t c, Py_ssize_t C,
                           Py_ssize_t B, Py_ssize_t J, int affine, const Py_ssize_t* rp, const double* w,
                           const float* wf, double mu, double rs, double m1, double m2, bint nt,
                           const floating* dh, const unsigned char* mask=NULL, const Py_ssize_t* moff=NULL,
                           int mstep=0) noexcept nogil:
    # dx of group c from its mean, rstd and the two gradient means m1, m2; plus dh (or
    # NULL) in the same pass, after dx's rounding (as NumPy's dx + dh)
    cdef Py_ssize_t S = B // J
    cdef Py_ssize_t j, r, o
    cdef double g
    cdef const floating* pf
    cdef const floating* pg
    for j in range(J):
        r = c * J + j
        o = c * B + j * S
        pf = x + o + PF_AHEAD * B if c + PF_AHEAD < C else NULL  # as in _normalize_groups
        pg = dy + o + PF_AHEAD * B if c + PF_AHEAD < C else NULL
        if mask != NULL:  # the statistics terms only where counted
            g = w[rp[r]] if affine == NC_AFFINE_ROW else 1.0
            if affine == NC_AFFINE_INNER:
                nc_masked_dx_inner_row(dy + o, x + o, mask + moff[r], mstep, dx + o, S, mu, rs, w + rp[r], m1, m2)
            else:
                _masked_dx_row(dy + o, x + o, dx + o, S, mu, rs * g, -rs * rs * m2, -rs * m1, nt, pf, pg,
                               mask + moff[r], mstep, mask + moff[r + PF_AHEAD * J] if pf != NULL else NULL)
            if dh != NULL:  # the row just written, still in cache: + dh after dx's rounding, as add
                nc_add(dx + o, dh + o, dx + o, S)
        elif affine == NC_AFFINE_INNER:
            _dx_inner_row(dy + o, x + o, dx + o, S, mu, rs, w + rp[r],
                          wf + rp[r] if wf != NULL else NULL, m1, m2, nt, pf, pg,
                          dh + o if dh != NULL else NULL)
        else:
            g = w[rp[r]] if affine == NC_AFFINE_ROW else 1.0
            _dx_row(dy + o, x + o, dx + o, S, mu, rs * g, -rs * rs * m2, -rs * m1, nt, pf, pg,
                    dh + o if dh != NULL else NULL)


cdef inline void _group_sums(const floating* dy, const floating* x, Py_ssize_t c, Py_ssize_t B, Py_ssize_t J,
                             int affine, const Py_ssize_t* rp, const double* w, double mu, double rs,
                             double* t1, double* t2, double* dw, double* db, double* a0,
                             double* a1, const unsigned char* mask=NULL, const Py_ssize_t* moff=NULL,
                             int mstep=0) noexcept nogil:
    # a0, a1 = sums of g and of g * xhat over group c (g = dy * w); its rows' sums in
    # t1, t2 (affine NONE, ROW) or its dweight / dbias partials added to dw, db (INNER);
    # with mask, over the counted elements only
    cdef Py_ssize_t S = B // J
    cdef Py_ssize_t j, r, o
    cdef double g, q1, q2
    a0[0] = 0.0
    a1[0] = 0.0
    for j in range(J):
        r = c * J + j
        o = c * B + j * S
        if mask != NULL:
            if affine == NC_AFFINE_INNER:
                _masked_row_sums(dy + o, x + o, mask + moff[r], mstep, S, w + rp[r], mu, rs, &q1, &q2,
                                 dw + rp[r], db + rp[r])
                a0[0] = a0[0] + q1
                a1[0] = a1[0] + q2 * rs
            else:
                _masked_row_sums(dy + o, x + o, mask + moff[r], mstep, S, NULL, mu, rs, t1 + r, t2 + r, NULL, NULL)
                g = w[rp[r]] if affine == NC_AFFINE_ROW else 1.0
                a0[0] = a0[0] + g * t1[r]
                a1[0] = a1[0] + g * (rs * t2[r])
        elif affine == NC_AFFINE_INNER:
            # the row sums and its dweight / dbias partials in one pass
            nc_inner_row_sums(dy + o, w + rp[r], x + o, S, mu, rs, &q1, &q2, dw + rp[r], db + rp[r])
            a0[0] = a0[0] + q1
            a1[0] = a1[0] + q2 * rs
        else:
            _row_sums(dy + o, x + o, S, mu, t1 + r, t2 + r)
            g = w[rp[r]] if affine == NC_AFFINE_ROW else 1.0
            a0[0] = a0[0] + g * t1[r]
            a1[0] = a1[0] + g * (rs * t2[r])


cdef void _backward_groups(const floating* dy, const floating* x, Py_ssize_t C, Py_ssize_t B, Py_ssize_t J,
                           bint center, int affine, const Py_ssize_t* rp, const double* w, const float* wf,
                           const double* mean,
                           const double* rstd, Py_ssize_t gpb, double* t1, double* t2, Py_ssize_t P,
                           double* pdw, double* pdb, const floating* dh, floating* dx,
                           int threads, const unsigned char* mask, const Py_ssize_t* moff, int mstep,
                           const double* counts) noexcept nogil:
    # the statistics terms of dx over counts[c] elements; mask (or NULL): only where counted
    # (a masked row with dh reads its dx back to add dh: not streamed past the cache)
    cdef bint nt = _streams(dx, C * B, sizeof(floating)) and not (mask != NULL and dh != NULL)
    cdef Py_ssize_t nb = (C + gpb - 1) // gpb
    cdef Py_ssize_t k, c, end
    cdef double q0, q1, q2, q3, n0, n1
    # two consecutive one-row groups with the same parameters (layer norm) share a pass,
    # which loads and stores their dweight / dbias partials once: the same sums
    cdef bint pairs = J == 1 and affine == NC_AFFINE_INNER and mask == NULL
    for k in prange(nb, schedule='static', num_threads=threads, use_threads_if=threads > 1):
        c = k * gpb
        end = c + _block_rows(k, gpb, C)
        while c < end:
            q0 = 0.0  # assigned, so private to the thread (see _normalize_groups)
            q1 = 0.0
            q2 = 0.0
            q3 = 0.0
            n0 = counts[c]
            n1 = counts[c + 1] if c + 1 < C else 1.0
            if n0 == 0.0:  # nothing counted: rstd is 0, and so is every term
                n0 = 1.0
            if n1 == 0.0:
                n1 = 1.0
            if pairs and c + 1 < end and rp[c] == rp[c + 1]:
                nc_inner_rows2_sums(dy + c * B, dy + (c + 1) * B, w + rp[c], x + c * B, x + (c + 1) * B,
                                    B, mean[c], mean[c + 1], rstd[c], rstd[c + 1], &q0, &q1, &q2, &q3,
                                    pdw + k * P + rp[c], pdb + k * P + rp[c])
                _group_dx(dy, x, dx, c, C, B, J, affine, rp, w, wf, mean[c], rstd[c],
                          (0.0 + q0) / n0 if center else 0.0, (0.0 + q1 * rstd[c]) / n0, nt, dh, mask, moff, mstep)
                _group_dx(dy, x, dx, c + 1, C, B, J, affine, rp, w, wf, mean[c + 1], rstd[c + 1],
                          (0.0 + q2) / n1 if center else 0.0, (0.0 + q3 * rstd[c + 1]) / n1, nt, dh, mask, moff, mstep)
                c = c + 2
            else:
                _group_sums(dy, x, c, B, J, affine, rp, w, mean[c], rstd[c], t1, t2, pdw + k * P, pdb + k * P,
                            &q0, &q1, mask, moff, mstep)
                _group_dx(dy, x, dx, c, C, B, J, affine, rp, w, wf, mean[c], rstd[c],
                          q0 / n0 if center else 0.0, q1 / n0, nt, dh, mask, moff, mstep)
                c = c + 1
    if nt:
        nc_sfence()


cdef inline void _tile_param_sums(const floating* dy, const floating* x, Py_ssize_t rows,
                                  Py_ssize_t ld, Py_ssize_t tw, const double* mean,
                                  const double* rstd, const Py_ssize_t* rp, Py_ssize_t c0,
                                  double* dw, double* db) noexcept nogil:
    # dweight / dbias partials of a block's column tile; rows add into their parameter
    # slice, which stays in L1 across the rows (one slice for layer norm).
    cdef Py_ssize_t i
    for i in range(rows):
        _row_param_sums(dy + i * ld, x + i * ld, tw, mean[i], rstd[i], dw + rp[i] + c0, db + rp[i] + c0)


def sums_inner(*, dy, x, row_mean, row_rstd, rp, weight=None, Py_ssize_t rows_per_block, row_sums, part_grads,
               int threads, mask=None):
    """IN dy, x (1, R, S) T, row_mean, row_rstd (R,) float64, rp (R,) intp, weight (P,) in
    its own dtype or None (ones); OUT row_sums (2, R) float64 sums of g = dy * w and of
    g * xhat; part_grads (2, ceil(R / rows_per_block), P) float64 zeroed partial dweight /
    dbias. One pass over a block of rows: the row sums first, then the block's column tiles
    while it is in cache. With ``mask`` (masking.MaskRows for the rows of S): over the
    counted elements only, row by row."""
    cdef Py_ssize_t* d = _shape(x, 3)
    cdef Py_ssize_t* pd = _shape(part_grads, 3)
    cdef int T = _storage(x)
    cdef const double* mu = <const double*>_in(row_mean, F64)
    cdef const double* rs = <const double*>_in(row_rstd, F64)
    cdef const Py_ssize_t* p = <const Py_ssize_t*>_in(rp, IDX)
    cdef double* q1 = <double*>_out(row_sums, F64)
    cdef double* q2 = q1 + d[1]
    cdef double* dw = <double*>_out(part_grads, F64)
    cdef double* db = dw + pd[1] * pd[2]
    cdef nc_mask mk
    _mask_of(mask, &mk)
    cdef const void* pdy = _in(dy, T)
    cdef const void* px = _in(x, T)
    cdef nc_params q
    try:
        _params_of(weight, None, pd[2], False, &q)
        if T == cnp.NPY_FLOAT32:
            _sums_inner(<const float*>pdy, <const float*>px, d[1], d[2], mu, rs, p, q.w, rows_per_block, q1, q2,
                        pd[1], pd[2], dw, db, threads, mk.bytes, mk.off, mk.step)
        elif T == HALF:
            _sums_inner(<const nc_f16*>pdy, <const nc_f16*>px, d[1], d[2], mu, rs, p, q.w, rows_per_block, q1, q2,
                        pd[1], pd[2], dw, db, threads, mk.bytes, mk.off, mk.step)
        elif T == BF16:
            _sums_inner(<const nc_bf16*>pdy, <const nc_bf16*>px, d[1], d[2], mu, rs, p, q.w, rows_per_block, q1, q2,
                        pd[1], pd[2], dw, db, threads, mk.bytes, mk.off, mk.step)
        else:
            _sums_inner(<const double*>pdy, <const double*>px, d[1], d[2], mu, rs, p, q.w, rows_per_block, q1, q2,
                        pd[1], pd[2], dw, db, threads, mk.bytes, mk.off, mk.step)
    finally:
        _params_free(&q)


cdef void _sums_inner(const floating* dy, const floating* x, Py_ssize_t R, Py_ssize_t S, const double* mean,
                      const double* rstd, const Py_ssize_t* rp, const double* w, Py_ssize_t rpb,
                      double* s1, double* s2, Py_ssize_t nb, Py_ssize_t P, double* pdw, double* pdb,
                      int threads, const unsigned char* m=NULL, const Py_ssize_t* off=NULL,
                      int step=0) noexcept nogil:
    cdef Py_ssize_t k, r, rows, t, q, sub, in_block
    # sub-blocks of rows small enough to stay in L2 between their two passes
    cdef Py_ssize_t sub_rows = max(1, <Py_ssize_t>CACHED_ELEMS // max(S, 1))
    for k in prange(nb, schedule='static', num_threads=threads, use_threads_if=threads > 1):
        in_block = _block_rows(k, rpb, R)
        if m != NULL:  # over the counted elements: each row's sums and its parameter partials at once
            for r in range(k * rpb, k * rpb + in_block):
                _masked_row_sums(dy + r * S, x + r * S, m + off[r], step, S, w + rp[r], mean[r], rstd[r],
                                 s1 + r, s2 + r, pdw + k * P + rp[r], pdb + k * P + rp[r])
                s2[r] = s2[r] * rstd[r]
            continue
        for q in range((in_block + sub_rows - 1) // sub_rows):
            sub = k * rpb + q * sub_rows
            rows = _block_rows(q, sub_rows, in_block)
            for r in range(sub, sub + rows):
                _dy_sums(dy + r * S, w + rp[r], x + r * S, S, mean[r], s1 + r, s2 + r)
                s2[r] = s2[r] * rstd[r]
            for t in range((S + TILE - 1) // TILE):
                _tile_param_sums(dy + sub * S + t * TILE, x + sub * S + t * TILE, rows, S,
                                 _block_rows(t, TILE, S), mean + sub, rstd + sub, rp + sub, t * TILE,
                                 pdw + k * P, pdb + k * P)


cdef inline void _dx_inner_row(const floating* dy, const floating* x, floating* dx, Py_ssize_t n,
                               double mu, double rs, const double* w, const float* wf,
                               double m1, double m2, bint nt, const floating* pf1,
                               const floating* pf2, const floating* dh=NULL) noexcept nogil:
    cdef Py_ssize_t i
    if floating is not double:
        if dh != NULL:
            nc_dx_inner_row_d(dy, x, dx, n, mu, rs, wf, m1, m2, nt, pf1, pf2, dh)
        else:
            nc_dx_inner_row(dy, x, dx, n, mu, rs, wf, m1, m2, nt, pf1, pf2)
        return
    for i in range(n):
        dx[i] = <floating>(rs * (dy[i] * w[i] - m1 - (x[i] - mu) * rs * m2))
        if dh != NULL:
            dx[i] = dx[i] + dh[i]


def dx_inner(*, dy, x, row_mean, row_rstd, rp, weight=None, group_means, dx, int threads, dh=None, mask=None):
    """IN dy, x (1, R, S) T, row_mean, row_rstd (R,) float64, rp (R,) intp, weight (P,) in
    its own dtype or None (ones), group_means (2, R) float64 per row: the group mean of g
    (0 when not centred) and of g * xhat (0 in eval), dh (1, R, S) T or None; OUT dx (1, R,
    S) T: dx = rstd[r] * (dy * w[rp[r] + s] - mean_g[r] - xhat * mean_gx[r]), plus dh
    after dx's rounding (as add) when given. With ``mask`` (masking.MaskRows for the rows
    of S): dx where counted, 0 elsewhere, then dh."""
    cdef Py_ssize_t* d = _shape(x, 3)
    cdef int T = _storage(x)
    cdef const void* pdh = NULL if dh is None else _in(dh, T)
    cdef const double* mu = <const double*>_in(row_mean, F64)
    cdef const double* rs = <const double*>_in(row_rstd, F64)
    cdef const Py_ssize_t* p = <const Py_ssize_t*>_in(rp, IDX)
    cdef const double* q1 = <const double*>_in(group_means, F64)
    cdef const double* q2 = q1 + d[1]
    cdef const void* pdy = _in(dy, T)
    cdef const void* px = _in(x, T)
    cdef void* pdx = _out(dx, T)
    cdef nc_params q
    try:
        _params_of(weight, None, 0 if weight is not None else _inner_size(rp, d[2]), T != F64 and mask is None, &q)
        if mask is not None:
            _masked_dx_inner_entry(dy, x, mask, row_mean, row_rstd, rp, q.w, q1, q2,
                                   dh, dx, threads)
        elif T == cnp.NPY_FLOAT32:
            _dx_inner(<const float*>pdy, <const float*>px, d[1], d[2], mu, rs, p, q.w, q.wf, q1, q2,
                      <const float*>pdh, <float*>pdx, threads)
        elif T == HALF:
            _dx_inner(<const nc_f16*>pdy, <const nc_f16*>px, d[1], d[2], mu, rs, p, q.w, q.wf, q1, q2,
                      <const nc_f16*>pdh, <nc_f16*>pdx, threads)
        elif T == BF16:
            _dx_inner(<const nc_bf16*>pdy, <const nc_bf16*>px, d[1], d[2], mu, rs, p, q.w, q.wf, q1, q2,
                      <const nc_bf16*>pdh, <nc_bf16*>pdx, threads)
        else:
            _dx_inner(<const double*>pdy, <const double*>px, d[1], d[2], mu, rs, p, q.w, NULL, q1, q2,
                      <const double*>pdh, <double*>pdx, threads)
    finally:
        _params_free(&q)


cdef void _dx_inner(const floating* dy, const floating* x, Py_ssize_t R, Py_ssize_t S, const double* mean,
                    const double* rstd, const Py_ssize_t* rp, const double* w, const float* wf,
                    const double* c1, const double* c2, const floating* dh, floating* dx,
                    int threads) noexcept nogil:
    cdef Py_ssize_t r
    cdef bint nt = _streams(dx, R * S, sizeof(floating))
    for r in prange(R, schedule='static', num_threads=threads, use_threads_if=threads > 1):
        _dx_inner_row(dy + r * S, x + r * S, dx + r * S, S, mean[r], rstd[r], w + rp[r],
                      wf + rp[r] if wf != NULL else NULL, c1[r], c2[r], nt, NULL, NULL,
                      dh + r * S if dh != NULL else NULL)
    if nt:
        nc_sfence()


# ---------------------------------------------------------------------------------------
# Per-group algebra between the passes over x: statistics finalized, running statistics
# updated, per-row coefficients. O(C + R) work each, one call instead of a chain of small
# array operations (which dominate small inputs); serial, in a fixed order.
# ---------------------------------------------------------------------------------------

def finalize_moments(*, part_mean, part_m2, part_count, bint center, double eps, mean, var, rstd, counts=None):
    """IN part_mean, part_m2 (K, C) partial means and centred sums of squares, part_count
    (K, C) elements behind each (all float64); OUT mean (C,) (0 when not centred), var (C,) biased
    variance (mean square when not centred), rstd (C,) 1 / sqrt(var + eps), and counts (C,)
    the elements of each group when given. Partials merge exactly, in order, by the
    two-pass formula over the partial means, mean = sum(n_k mean_k) / n, m2 = sum(m2_k +
    n_k (mean_k - mean)^2), a partial without elements adding nothing (K == 1 passes
    through); then n divides, the non-centred transform applies (var + mean^2: the mean of
    squares without cancellation) and rstd is taken. A group without elements gets mean 0,
    var 0, rstd 0."""
    cdef Py_ssize_t* d = _shape(part_mean, 2)
    _finalize_moments(<const double*>_in(part_mean, F64), <const double*>_in(part_m2, F64),
                      <const double*>_in(part_count, F64), d[1], 1, d[0], d[1], center, eps,
                      <double*>_out(mean, F64), <double*>_out(var, F64), <double*>_out(rstd, F64),
                      NULL if counts is None else <double*>_out(counts, F64))


cdef void _finalize_moments(const double* pmean, const double* pm2, const double* pcount, Py_ssize_t ks,
                            Py_ssize_t cs, Py_ssize_t K, Py_ssize_t C, bint center, double eps, double* mean,
                            double* var, double* rstd, double* counts) noexcept nogil:
    # The count of partial k, group c is pcount[k * ks + c * cs]: (C, 1) for a (K, C) array,
    # (1, 0) for one count per partial (the composed calls' row blocks). Partials are read
    # row by row (k outer): K rows C apart, walked down a column, would map to a few cache
    # sets when C * 8 is a multiple of 4096. mean, var and the totals (in rstd until the
    # end) accumulate.
    cdef Py_ssize_t k, c
    cdef double dev, v, mu, n
    if K == 1:
        for c in range(C):
            mean[c] = pmean[c]
            var[c] = pm2[c]
            rstd[c] = pcount[c * cs]
    else:
        for c in range(C):
            mean[c] = 0.0
            var[c] = 0.0
            rstd[c] = 0.0
        for k in range(K):
            for c in range(C):
                n = pcount[k * ks + c * cs]
                rstd[c] = rstd[c] + n
                mean[c] += n * pmean[k * C + c]
        for c in range(C):
            if rstd[c] != 0.0:
                mean[c] = mean[c] / rstd[c]
        for k in range(K):
            for c in range(C):
                n = pcount[k * ks + c * cs]
                if n != 0.0:  # (an empty partial adds exactly nothing, at any mean)
                    dev = pmean[k * C + c] - mean[c]
                    var[c] += pm2[k * C + c] + n * dev * dev
    for c in range(C):
        n = rstd[c]
        if counts != NULL:
            counts[c] = n
        if n == 0.0:  # nothing counted: an empty group
            mean[c] = 0.0
            var[c] = 0.0
            rstd[c] = 0.0
            continue
        mu = mean[c]
        v = _representable(mu, var[c] / n, center)
        if not center:
            v = v + mu * mu
            mean[c] = 0.0
        else:
            mean[c] = v - v + mu  # NaN with v
        var[c] = v
        rstd[c] = 1.0 / sqrt(v + eps)


def update_running(*, mean, var, counts, rc, double groups_per_running, double momentum, double keep,
                   bint unbiased, running_mean, running_var):
    """IN mean, var, counts (C,) float64 batch statistics and elements of each group, rc (C,)
    intp running entry of each group; IN/OUT running_mean, running_var (E,) T:
    running = keep * running + momentum * batch (keep: 1 - momentum, or the caller's decay
    exactly), each entry's batch value the
    average over its groups (summed in group order), each group's variance times n / (n - 1)
    when ``unbiased`` (n its count; 1 for n <= 1); evaluated in double, stored once."""
    cdef Py_ssize_t C = _shape(mean, 1)[0], E = _shape(running_mean, 1)[0]
    cdef int T = _storage(running_mean)
    cdef const double* mu = <const double*>_in(mean, F64)
    cdef const double* v = <const double*>_in(var, F64)
    cdef const double* n = <const double*>_in(counts, F64)
    cdef const Py_ssize_t* c = <const Py_ssize_t*>_in(rc, IDX)
    cdef double* work = _scratch(2 * E)  # the entries' sums
    try:
        if T == cnp.NPY_FLOAT32:
            _update_running(mu, v, n, c, C, groups_per_running, momentum, keep, unbiased,
                            <float*>_out(running_mean, T), <float*>_out(running_var, T), E, work)
        elif T == HALF:
            _update_running(mu, v, n, c, C, groups_per_running, momentum, keep, unbiased,
                            <nc_f16*>_out(running_mean, T), <nc_f16*>_out(running_var, T), E, work)
        elif T == BF16:
            _update_running(mu, v, n, c, C, groups_per_running, momentum, keep, unbiased,
                            <nc_bf16*>_out(running_mean, T), <nc_bf16*>_out(running_var, T), E, work)
        else:
            _update_running(mu, v, n, c, C, groups_per_running, momentum, keep, unbiased,
                            <double*>_out(running_mean, T), <double*>_out(running_var, T), E, work)
    finally:
        free(work)


cdef void _update_running(const double* mean, const double* var, const double* counts, const Py_ssize_t* rc,
                          Py_ssize_t C, double groups_per_running, double momentum, double keep, bint unbiased,
                          floating* running_mean,
                          floating* running_var, Py_ssize_t E, double* scratch) noexcept nogil:
    cdef Py_ssize_t c, e
    cdef double* sm = scratch
    cdef double* sv = scratch + E
    for e in range(E):
        sm[e] = 0.0
        sv[e] = 0.0
    for c in range(C):
        sm[rc[c]] += mean[c]
        sv[rc[c]] += var[c] * (counts[c] / (counts[c] - 1.0) if unbiased and counts[c] > 1.0 else 1.0)
    for e in range(E):
        if groups_per_running != 1.0:
            sm[e] = sm[e] / groups_per_running
            sv[e] = sv[e] / groups_per_running
        nc_put(running_mean, e, keep * nc_get(running_mean, e) + momentum * sm[e])
        nc_put(running_var, e, keep * nc_get(running_var, e) + momentum * sv[e])


def running_statistics(*, running_mean, running_var, rc, double eps, mean, var, rstd):
    """IN running_mean, running_var (E,) T, rc (C,) intp running entry of each group;
    OUT mean, var, rstd (C,) float64: per-group statistics read from the running ones (the
    stored values, so the output is normalized with exactly what they hold)."""
    cdef Py_ssize_t C = _shape(mean, 1)[0]
    cdef int T = _storage(running_mean)
    cdef const Py_ssize_t* c = <const Py_ssize_t*>_in(rc, IDX)
    cdef double* mu = <double*>_out(mean, F64)
    cdef double* v = <double*>_out(var, F64)
    cdef double* rs = <double*>_out(rstd, F64)
    if T == cnp.NPY_FLOAT32:
        _running_statistics(<const float*>_in(running_mean, T), <const float*>_in(running_var, T), c, C, eps,
                            mu, v, rs)
    elif T == HALF:
        _running_statistics(<const nc_f16*>_in(running_mean, T), <const nc_f16*>_in(running_var, T), c, C, eps,
                            mu, v, rs)
    elif T == BF16:
        _running_statistics(<const nc_bf16*>_in(running_mean, T), <const nc_bf16*>_in(running_var, T), c, C, eps,
                            mu, v, rs)
    else:
        _running_statistics(<const double*>_in(running_mean, T), <const double*>_in(running_var, T), c, C, eps,
                            mu, v, rs)


cdef void _running_statistics(const floating* running_mean, const floating* running_var, const Py_ssize_t* rc,
                              Py_ssize_t C, double eps, double* mean, double* var, double* rstd) noexcept nogil:
    cdef Py_ssize_t c
    cdef double v
    for c in range(C):
        mean[c] = nc_get(running_mean, rc[c])
        v = nc_get(running_var, rc[c])
        var[c] = v
        rstd[c] = 1.0 / sqrt(v + eps)


def row_coefficients(*, mean, rstd, rg, rp, weight=None, bias=None, row_mean, row_scale, row_shift):
    """IN mean, rstd (C,) float64, rg (R,) intp statistics group of each row, rp (R,) intp
    parameter of each row, weight, bias (P,) in their own dtype or None; OUT row_mean,
    row_scale, row_shift (R,) float64, the coefficients of affine_rows:
    y = (x - mean) * scale + shift with scale = rstd * weight and shift = bias."""
    cdef Py_ssize_t R = _shape(rg, 1)[0]
    cdef const double* mu = <const double*>_in(mean, F64)
    cdef const double* rs = <const double*>_in(rstd, F64)
    cdef const Py_ssize_t* g = <const Py_ssize_t*>_in(rg, IDX)
    cdef const Py_ssize_t* p = <const Py_ssize_t*>_in(rp, IDX)
    cdef double* m = <double*>_out(row_mean, F64)
    cdef double* sc = <double*>_out(row_scale, F64)
    cdef double* sh = <double*>_out(row_shift, F64)
    cdef nc_params q
    try:
        _params_of(weight, bias, 0, False, &q)
        _row_coefficients(mu, rs, g, p, q.w, q.b, q.has_w, q.has_b, R, m, sc, sh)
    finally:
        _params_free(&q)


cdef void _row_coefficients(const double* mean, const double* rstd, const Py_ssize_t* rg, const Py_ssize_t* rp,
                            const floating* w, const floating* b, bint has_w, bint has_b, Py_ssize_t R,
                            double* mean_r, double* scale, double* shift) noexcept nogil:
    cdef Py_ssize_t r
    cdef double s
    for r in range(R):
        mean_r[r] = mean[rg[r]]
        s = rstd[rg[r]]
        if has_w:
            s = s * nc_get(w, rp[r])
        scale[r] = s
        shift[r] = nc_get(b, rp[r]) if has_b else 0.0


def gradient_sums(*, sums, rg, rp, weight=None, rstd, group_sums, param_grads):
    """IN sums (2, K, R) float64 partial row sums of dy and dy * (x - mean), rg, rp (R,)
    intp, weight (P,) in its own dtype or None, rstd (C,) float64; OUT group_sums (2, C)
    float64 group sums of g = weight * dy and g * xhat; param_grads (2, P) float64 dweight
    and dbias, zeroed by the caller, or (2, 0) to skip them. Partials are summed over K in
    order, then into groups and parameters in row order."""
    cdef Py_ssize_t* d = _shape(sums, 3)
    cdef Py_ssize_t C = _shape(group_sums, 2)[1], P = _shape(param_grads, 2)[1]
    cdef const double* q1 = <const double*>_in(sums, F64)
    cdef const Py_ssize_t* g = <const Py_ssize_t*>_in(rg, IDX)
    cdef const Py_ssize_t* p = <const Py_ssize_t*>_in(rp, IDX)
    cdef const double* rs = <const double*>_in(rstd, F64)
    cdef double* o1 = <double*>_out(group_sums, F64)
    cdef double* ow = <double*>_out(param_grads, F64)
    cdef nc_params q
    try:
        _params_of(weight, None, 0, False, &q)
        _gradient_sums(q1, q1 + d[1] * d[2], d[1], d[2], g, p, q.w, q.has_w, rs, C, o1, o1 + C, P, ow, ow + P)
    finally:
        _params_free(&q)


cdef void _gradient_sums(const double* p1, const double* p2, Py_ssize_t K, Py_ssize_t R, const Py_ssize_t* rg,
                         const Py_ssize_t* rp, const floating* w, bint has_w, const double* rstd, Py_ssize_t C,
                         double* g1, double* g2, Py_ssize_t P, double* dw, double* db) noexcept nogil:
    # The partial rows are summed row by row (k outer) into per-row totals, then scattered.
    cdef Py_ssize_t k, r, c
    cdef double t1, t2, gamma, rs
    cdef double* tot = <double*>malloc(2 * max(R, 1) * sizeof(double))
    if tot == NULL:
        abort()
    for r in range(2 * R):
        tot[r] = 0.0  # K may be 0: a rank holding no samples
    for k in range(K):
        for r in range(R):
            tot[r] += p1[k * R + r]
            tot[R + r] += p2[k * R + r]
    for c in range(C):
        g1[c] = 0.0
        g2[c] = 0.0
    for r in range(R):
        t1 = tot[r]
        t2 = tot[R + r]
        rs = rstd[rg[r]]
        if P > 0:
            dw[rp[r]] += rs * t2
            db[rp[r]] += t1
        gamma = nc_get(w, rp[r]) if has_w else 1.0
        g1[rg[r]] += gamma * t1
        g2[rg[r]] += gamma * (rs * t2)
    free(tot)


def dx_coefficients(*, group_sums, counts, rg, rp, weight=None, rstd, bint stats_grad, bint center, dy_scale,
                    xc_scale, dx_shift):
    """IN group_sums (2, C) float64 group sums of g = weight * dy and g * xhat, counts (C,)
    float64 elements of each group (all ranks; 0 reads as 1: such a group's rstd is 0),
    rg, rp (R,) intp, weight (P,) in its own dtype or None, rstd (C,) float64, stats_grad
    (gradients flow through the statistics), center; OUT dy_scale, xc_scale, dx_shift (R,)
    float64, the coefficients of dx_rows:
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with xhat = (x - mean) * rstd,
    regrouped as dy * dy_scale + (x - mean) * xc_scale + dx_shift."""
    cdef Py_ssize_t R = _shape(rg, 1)[0], C = _shape(group_sums, 2)[1]
    cdef const double* q1 = <const double*>_in(group_sums, F64)
    cdef const double* n = <const double*>_in(counts, F64)
    cdef const Py_ssize_t* g = <const Py_ssize_t*>_in(rg, IDX)
    cdef const Py_ssize_t* p = <const Py_ssize_t*>_in(rp, IDX)
    cdef const double* rs = <const double*>_in(rstd, F64)
    cdef double* o1 = <double*>_out(dy_scale, F64)
    cdef double* o2 = <double*>_out(xc_scale, F64)
    cdef double* o3 = <double*>_out(dx_shift, F64)
    cdef nc_params q
    try:
        _params_of(weight, None, 0, False, &q)
        _dx_coefficients(q1, q1 + C, n, g, p, q.w, q.has_w, rs, R, stats_grad, center, o1, o2, o3)
    finally:
        _params_free(&q)


cdef void _dx_coefficients(const double* g1, const double* g2, const double* counts, const Py_ssize_t* rg,
                           const Py_ssize_t* rp, const floating* w, bint has_w, const double* rstd, Py_ssize_t R,
                           bint stats_grad, bint center, double* k1, double* k2, double* k3) noexcept nogil:
    cdef Py_ssize_t r
    cdef double rs, n
    for r in range(R):
        rs = rstd[rg[r]]
        n = counts[rg[r]] if counts[rg[r]] != 0.0 else 1.0
        k1[r] = rs * (nc_get(w, rp[r]) if has_w else 1.0)
        k2[r] = -rs * rs * (g2[rg[r]] / n) if stats_grad else 0.0
        k3[r] = -rs * (g1[rg[r]] / n) if stats_grad and center else 0.0


# ---------------------------------------------------------------------------------------
# Composed calls: a sequence of the kernels above in one entry, on scratch of its own. A
# small call's fixed cost is per kernel entry and per scratch array (about a microsecond
# each), not per element; these run the same building blocks in the same order as the
# separate entries, so their results are bitwise the same.
# ---------------------------------------------------------------------------------------

cdef inline double* _scratch(Py_ssize_t n) except NULL:
    cdef double* p = <double*>malloc(max(n, 1) * sizeof(double))
    if p == NULL:
        raise MemoryError()
    return p


cdef void _widen_typed(const floating* p, Py_ssize_t n, double* out) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = nc_get(p, i)


cdef inline double* _widen(object a, double* out) except NULL:
    # a parameter vector of any storage type into out (double, a.size elements), so the
    # composed calls take weight, bias and running statistics in their own dtypes
    cdef int P = _storage(a)
    cdef Py_ssize_t n = _shape(a, 1)[0]
    if P == cnp.NPY_FLOAT32:
        _widen_typed(<const float*>_in(a, P), n, out)
    elif P == cnp.NPY_FLOAT64:
        _widen_typed(<const double*>_in(a, P), n, out)
    elif P == HALF:
        _widen_typed(<const nc_f16*>_in(a, P), n, out)
    else:
        _widen_typed(<const nc_bf16*>_in(a, P), n, out)
    return out


def normalize_cols(*, x, Py_ssize_t rows_per_block, bint center, double eps, rg, rp, weight=None, bias=None, mean,
                   var, rstd, y, int threads):
    """IN x (A, C) T (A > 1: the column strategy, group c is column c), rg, rp (C,) intp,
    weight, bias (P,) in their own dtype or None; OUT mean, var, rstd (C,)
    float64 as finalize_moments gives them, y (A, C) T: moments_cols, finalize_moments,
    row_coefficients and affine_rows in one call."""
    cdef Py_ssize_t* d = _shape(x, 2)
    cdef Py_ssize_t A = d[0], C = d[1], k
    cdef Py_ssize_t nb = (A + rows_per_block - 1) // rows_per_block
    cdef int T = _storage(x)
    cdef const Py_ssize_t* g = <const Py_ssize_t*>_in(rg, IDX)
    cdef const Py_ssize_t* p = <const Py_ssize_t*>_in(rp, IDX)
    cdef double* mu = <double*>_out(mean, F64)
    cdef double* v = <double*>_out(var, F64)
    cdef double* rs = <double*>_out(rstd, F64)
    cdef const void* px = _in(x, T)
    cdef void* py = _out(y, T)
    if C == 0:
        return
    # partial means and sums of squares (nb, C), block counts (nb,), scale and shift (C,)
    cdef nc_params q
    _params_of(weight, bias, 0, False, &q)
    cdef const double* pw = q.w
    cdef const double* pb = q.b
    cdef bint has_w = q.has_w, has_b = q.has_b
    cdef double* work
    try:
        work = _scratch(2 * nb * C + nb + 2 * C)
    except BaseException:
        _params_free(&q)
        raise
    cdef double* pmean = work
    cdef double* pm2 = work + nb * C
    cdef double* counts = work + 2 * nb * C
    cdef double* scale = counts + nb
    cdef double* shift = scale + C
    for k in range(nb):
        counts[k] = <double>_block_rows(k, rows_per_block, A)
    with nogil:
        if T == cnp.NPY_FLOAT32:
            _moments_cols(<const float*>px, A, C, rows_per_block, nb, pmean, pm2, threads)
            _finalize_moments(pmean, pm2, counts, 1, 0, nb, C, center, eps, mu, v, rs, NULL)
            _row_coefficients(mu, rs, g, p, pw, pb, has_w, has_b, C, pmean, scale, shift)
            _affine_rows(<const float*>px, A, C, 1, pmean, scale, shift, rows_per_block, <float*>py, threads)
        elif T == HALF:
            _moments_cols(<const nc_f16*>px, A, C, rows_per_block, nb, pmean, pm2, threads)
            _finalize_moments(pmean, pm2, counts, 1, 0, nb, C, center, eps, mu, v, rs, NULL)
            _row_coefficients(mu, rs, g, p, pw, pb, has_w, has_b, C, pmean, scale, shift)
            _affine_rows(<const nc_f16*>px, A, C, 1, pmean, scale, shift, rows_per_block, <nc_f16*>py, threads)
        elif T == BF16:
            _moments_cols(<const nc_bf16*>px, A, C, rows_per_block, nb, pmean, pm2, threads)
            _finalize_moments(pmean, pm2, counts, 1, 0, nb, C, center, eps, mu, v, rs, NULL)
            _row_coefficients(mu, rs, g, p, pw, pb, has_w, has_b, C, pmean, scale, shift)
            _affine_rows(<const nc_bf16*>px, A, C, 1, pmean, scale, shift, rows_per_block, <nc_bf16*>py, threads)
        else:
            _moments_cols(<const double*>px, A, C, rows_per_block, nb, pmean, pm2, threads)
            _finalize_moments(pmean, pm2, counts, 1, 0, nb, C, center, eps, mu, v, rs, NULL)
            _row_coefficients(mu, rs, g, p, pw, pb, has_w, has_b, C, pmean, scale, shift)
            _affine_rows(<const double*>px, A, C, 1, pmean, scale, shift, rows_per_block, <double*>py, threads)
    free(work)
    _params_free(&q)


def normalize_running(*, x, running_mean, running_var, rc, double eps, rg, rp, weight=None, bias=None,
                      Py_ssize_t rows_per_block, mean, var, rstd, y, int threads):
    """IN x (A, R, S) T, or (A, R) for S == 1 (the column strategy's x as it is read),
    running_mean, running_var (E,), rc (C,) intp, rg, rp (R,) intp, weight, bias (P,) (any
    storage type each) or None; OUT mean, var, rstd (C,) float64 as running_statistics gives
    them, y (A, R, S) T: running_statistics, row_coefficients and affine_rows in one call
    (the output of eval mode and of estimated batch norm)."""
    cdef Py_ssize_t* d = _shape(x, 2 if cnp.PyArray_Check(x) and cnp.PyArray_NDIM(<cnp.ndarray>x) == 2 else 3)
    cdef Py_ssize_t A = d[0], R = d[1]
    cdef Py_ssize_t S = d[2] if cnp.PyArray_NDIM(<cnp.ndarray>x) == 3 else 1
    cdef Py_ssize_t C = _shape(mean, 1)[0]
    cdef int T = _storage(x)
    cdef const Py_ssize_t* c = <const Py_ssize_t*>_in(rc, IDX)
    cdef const Py_ssize_t* g = <const Py_ssize_t*>_in(rg, IDX)
    cdef const Py_ssize_t* p = <const Py_ssize_t*>_in(rp, IDX)
    cdef double* mu = <double*>_out(mean, F64)
    cdef double* v = <double*>_out(var, F64)
    cdef double* rs = <double*>_out(rstd, F64)
    cdef const void* px = _in(x, T)
    cdef void* py = _out(y, T)
    cdef Py_ssize_t E = _shape(running_mean, 1)[0]
    if C == 0:
        return
    # mean, scale and shift per row; the running statistics in double
    cdef nc_params q
    _params_of(weight, bias, 0, False, &q)
    cdef const double* pw = q.w
    cdef const double* pb = q.b
    cdef bint has_w = q.has_w, has_b = q.has_b
    cdef double* work = NULL
    cdef const double* prm
    cdef const double* prv
    try:
        work = _scratch(3 * R + 2 * E)
        prm = _widen(running_mean, work + 3 * R)
        prv = _widen(running_var, work + 3 * R + E)
    except BaseException:
        free(work)
        _params_free(&q)
        raise
    with nogil:
        if T == cnp.NPY_FLOAT32:
            _running_statistics(prm, prv, c, C, eps, mu, v, rs)
            _row_coefficients(mu, rs, g, p, pw, pb, has_w, has_b, R, work, work + R, work + 2 * R)
            _affine_rows(<const float*>px, A, R, S, work, work + R, work + 2 * R, rows_per_block, <float*>py,
                         threads)
        elif T == HALF:
            _running_statistics(prm, prv, c, C, eps, mu, v, rs)
            _row_coefficients(mu, rs, g, p, pw, pb, has_w, has_b, R, work, work + R, work + 2 * R)
            _affine_rows(<const nc_f16*>px, A, R, S, work, work + R, work + 2 * R, rows_per_block, <nc_f16*>py,
                         threads)
        elif T == BF16:
            _running_statistics(prm, prv, c, C, eps, mu, v, rs)
            _row_coefficients(mu, rs, g, p, pw, pb, has_w, has_b, R, work, work + R, work + 2 * R)
            _affine_rows(<const nc_bf16*>px, A, R, S, work, work + R, work + 2 * R, rows_per_block, <nc_bf16*>py,
                         threads)
        else:
            _running_statistics(prm, prv, c, C, eps, mu, v, rs)
            _row_coefficients(mu, rs, g, p, pw, pb, has_w, has_b, R, work, work + R, work + 2 * R)
            _affine_rows(<const double*>px, A, R, S, work, work + R, work + 2 * R, rows_per_block, <double*>py,
                         threads)
    free(work)
    _params_free(&q)


def backward_cols(*, dy, x, mean, rstd, counts, Py_ssize_t rows_per_block, rg, rp, weight=None, bint stats_grad,
                  bint center, param_grads, dx, int threads, dh=None):
    """IN dy, x (A, C) T (the column strategy), mean, rstd, counts (C,) float64, rg, rp (C,)
    intp, weight (P,) in its own dtype or None, stats_grad, center; OUT param_grads (2, P)
    float64 dweight and dbias ((2, 0) to skip them), dx (A, C) T: sums_cols,
    gradient_sums, dx_coefficients and dx_rows (with dh, (A, C) T or None) in one call."""
    cdef Py_ssize_t* d = _shape(x, 2)
    cdef Py_ssize_t A = d[0], C = d[1], P = _shape(param_grads, 2)[1], k
    cdef Py_ssize_t nb = (A + rows_per_block - 1) // rows_per_block
    cdef int T = _storage(x)
    cdef const void* pdh = NULL if dh is None else _in(dh, T)
    cdef const double* mu = <const double*>_in(mean, F64)
    cdef const double* rs = <const double*>_in(rstd, F64)
    cdef const double* n = <const double*>_in(counts, F64)
    cdef const Py_ssize_t* g = <const Py_ssize_t*>_in(rg, IDX)
    cdef const Py_ssize_t* p = <const Py_ssize_t*>_in(rp, IDX)
    cdef double* ow = <double*>_out(param_grads, F64)
    cdef double* ob = ow + P
    cdef const void* pdy = _in(dy, T)
    cdef const void* px = _in(x, T)
    cdef void* pdx = _out(dx, T)
    for k in range(P):
        ow[k] = 0.0
        ob[k] = 0.0
    if C == 0:
        return
    # partial sums (nb, C) twice, group sums (C,) twice, dx coefficients (C,) three times
    cdef nc_params q
    _params_of(weight, None, 0, False, &q)
    cdef const double* pw = q.w
    cdef bint has_w = q.has_w
    cdef double* work
    try:
        work = _scratch(2 * nb * C + 5 * C)
    except BaseException:
        _params_free(&q)
        raise
    cdef double* part_dy = work
    cdef double* part_dyx = work + nb * C
    cdef double* group_g = work + 2 * nb * C
    cdef double* group_gx = group_g + C
    cdef double* k1 = group_gx + C
    cdef double* k2 = k1 + C
    cdef double* k3 = k2 + C
    cdef bint sums = stats_grad or P > 0
    with nogil:
        if T == cnp.NPY_FLOAT32:
            if sums:
                _sums_cols(<const float*>pdy, <const float*>px, A, C, rows_per_block, nb, mu, part_dy, part_dyx,
                           threads)
                _gradient_sums(part_dy, part_dyx, nb, C, g, p, pw, has_w, rs, C, group_g, group_gx,
                               P, ow, ob)
            _dx_coefficients(group_g, group_gx, n, g, p, pw, has_w, rs, C, stats_grad, center,
                             k1, k2, k3)
            _dx_rows(<const float*>pdy, <const float*>px, A, C, 1, mu, k1, k2, k3, rows_per_block,
                     <const float*>pdh, <float*>pdx, threads)
        elif T == HALF:
            if sums:
                _sums_cols(<const nc_f16*>pdy, <const nc_f16*>px, A, C, rows_per_block, nb, mu, part_dy, part_dyx,
                           threads)
                _gradient_sums(part_dy, part_dyx, nb, C, g, p, pw, has_w, rs, C, group_g, group_gx,
                               P, ow, ob)
            _dx_coefficients(group_g, group_gx, n, g, p, pw, has_w, rs, C, stats_grad, center,
                             k1, k2, k3)
            _dx_rows(<const nc_f16*>pdy, <const nc_f16*>px, A, C, 1, mu, k1, k2, k3, rows_per_block,
                     <const nc_f16*>pdh, <nc_f16*>pdx, threads)
        elif T == BF16:
            if sums:
                _sums_cols(<const nc_bf16*>pdy, <const nc_bf16*>px, A, C, rows_per_block, nb, mu, part_dy, part_dyx,
                           threads)
                _gradient_sums(part_dy, part_dyx, nb, C, g, p, pw, has_w, rs, C, group_g, group_gx,
                               P, ow, ob)
            _dx_coefficients(group_g, group_gx, n, g, p, pw, has_w, rs, C, stats_grad, center,
                             k1, k2, k3)
            _dx_rows(<const nc_bf16*>pdy, <const nc_bf16*>px, A, C, 1, mu, k1, k2, k3, rows_per_block,
                     <const nc_bf16*>pdh, <nc_bf16*>pdx, threads)
        else:
            if sums:
                _sums_cols(<const double*>pdy, <const double*>px, A, C, rows_per_block, nb, mu, part_dy, part_dyx,
                           threads)
                _gradient_sums(part_dy, part_dyx, nb, C, g, p, pw, has_w, rs, C, group_g,
                               group_gx, P, ow, ob)
            _dx_coefficients(group_g, group_gx, n, g, p, pw, has_w, rs, C, stats_grad, center,
                             k1, k2, k3)
            _dx_rows(<const double*>pdy, <const double*>px, A, C, 1, mu, k1, k2, k3, rows_per_block,
                     <const double*>pdh, <double*>pdx, threads)
    free(work)
    _params_free(&q)


# ---------------------------------------------------------------------------------------
# Masked statistics. A mask arrives as bytes (nonzero: counted) by rows of the kernel's view
# of x (normcore/masking.py): row r's bytes start at mask[moff[r]] and advance by mstep, 1
# (one byte per element) or 0 (the whole row counted or not). Statistics are taken over the
# counted elements (their count per partial beside them); the sums of backward are the plain
# ones (y is computed everywhere), and the dx passes add the statistics terms only where
# counted. Rows of step 0 take the plain passes, or the direct term alone.
# ---------------------------------------------------------------------------------------

cdef extern from "simd.h" nogil:
    bint nc_any_counted(const unsigned char* m, Py_ssize_t n)
    void nc_masked_sums(const void* p, const unsigned char* m, Py_ssize_t n, double k, double* s1,
                        double* s2, double* cnt)
    void nc_col_masked_sums(const void* x, const unsigned char* m, const Py_ssize_t* off, int step,
                            Py_ssize_t rows, Py_ssize_t ld, Py_ssize_t tw, const double* k, double* s1,
                            double* s2, double* cnt)
    void nc_masked_dx_row(const void* dy, const void* x, const unsigned char* m, void* dx, Py_ssize_t n,
                          double mu, double k1, double k2, double k3, int nt, const void* pf1, const void* pf2,
                          const unsigned char* pfm)
    void nc_masked_dx_cols(const void* dy, const void* x, const unsigned char* m, const Py_ssize_t* off,
                           int step, void* dx, Py_ssize_t rows, Py_ssize_t ld, Py_ssize_t tw, const void* coefs,
                           Py_ssize_t R, Py_ssize_t c0, int nt)
    void* nc_masked_dx_coefs(const double* mean, const double* k1, const double* k2, const double* k3,
                             Py_ssize_t R)
    void* nc_masked_dx_coefs64(const double* mean, const double* k1, const double* k2, const double* k3,
                               Py_ssize_t R)
    void nc_masked_dx_inner_row(const void* dy, const void* x, const unsigned char* m, int step, void* dx,
                                Py_ssize_t n, double mu, double rs, const double* w, double m1, double m2)

cdef inline void _row_moments_masked(const floating* p, const unsigned char* m, Py_ssize_t n,
                                     double* out_mean, double* out_m2, double* out_n) noexcept nogil:
    # _row_moments over the counted elements: per chunk, sums shifted by its first counted
    # element, then Chan merges; a row without counted elements gives (0, 0, 0)
    cdef Py_ssize_t start = 0, m_len, j
    cdef double count = 0.0, mean = 0.0, m2 = 0.0, k, s1, s2, c
    while start < n:
        m_len = n - start
        if m_len > CHUNK:
            m_len = CHUNK
        j = start
        while j < start + m_len and m[j] == 0:
            j = j + 1
        if j < start + m_len:
            k = nc_get(p, j)
            nc_masked_sums(p + start, m + start, m_len, k, &s1, &s2, &c)
            _merge(&count, &mean, &m2, c, k + s1 / c, _clamp0(s2 - s1 * (s1 / c)))
        start = start + m_len
    out_mean[0] = mean
    out_m2[0] = m2
    out_n[0] = count


cdef inline void _row_moments_step(const floating* p, const unsigned char* m, int step, Py_ssize_t n,
                                   double* mean, double* m2, double* count) noexcept nogil:
    # one row of n elements whose mask bytes start at m (step 0: one byte for the row)
    if step != 0:
        _row_moments_masked(p, m, n, mean, m2, count)
    elif m[0] != 0:
        _row_moments(p, n, mean, m2)
        count[0] = <double>n
    else:
        mean[0] = 0.0
        m2[0] = 0.0
        count[0] = 0.0


cdef inline void _group_moments_masked(const floating* g, const unsigned char* mask, const Py_ssize_t* moff,
                                       int mstep, Py_ssize_t r0, Py_ssize_t J, Py_ssize_t S, double* mean,
                                       double* m2, double* count) noexcept nogil:
    # the J rows r0.. of S elements at g, their moments merged in order
    cdef Py_ssize_t j
    cdef double a, b, k
    mean[0] = 0.0
    m2[0] = 0.0
    count[0] = 0.0
    for j in range(J):
        _row_moments_step(g + j * S, mask + moff[r0 + j], mstep, S, &a, &b, &k)
        _merge(count, mean, m2, k, a, b)


cdef inline void _zero_rows(floating* dx, Py_ssize_t rows, Py_ssize_t ld, Py_ssize_t n) noexcept nogil:
    # dx = 0 on rows without counted elements: they are not data (+0 is all-zero bits in
    # every storage type)
    cdef Py_ssize_t r
    for r in range(rows):
        memset(dx + r * ld, 0, n * sizeof(floating))


cdef inline void _masked_dx_row(const floating* dy, const floating* x, floating* dx, Py_ssize_t n, double mu,
                                double k1, double k2, double k3, bint nt, const floating* pf1,
                                const floating* pf2, const unsigned char* m, int step,
                                const unsigned char* pfm) noexcept nogil:
    # dx = dy * k1 + (x - mu) * k2 + k3 where counted, 0 where not, on one row
    if step == 0:
        if m[0] != 0:
            _dx_row(dy, x, dx, n, mu, k1, k2, k3, nt, pf1, pf2)
        else:
            _zero_rows(dx, 1, n, n)
    else:
        nc_masked_dx_row(dy, x, m, dx, n, mu, k1, k2, k3, nt, pf1, pf2, pfm)


cdef _masked_moments_rows_entry(x, mask, Py_ssize_t rows_per_group, pmean, pm2, pcount, int threads):
    """IN x (A, R, S) T (group c of block a: rows c * J .. c * J + J - 1 of block a, J =
    rows_per_group), mask a masking.MaskRows for the A * R rows (see above);
    OUT pmean, pm2, pcount (A, R / J) float64: mean, centred sum of squares and number of
    each group's counted elements in each block (0, 0, 0 for none)."""
    cdef Py_ssize_t* d = _shape(x, 3)
    cdef int T = _storage(x)
    cdef nc_mask mk
    _mask_of(mask, &mk)
    cdef const unsigned char* m = mk.bytes
    cdef const Py_ssize_t* off = mk.off
    cdef int mstep = mk.step
    cdef double* pm = <double*>_out(pmean, F64)
    cdef double* p2 = <double*>_out(pm2, F64)
    cdef double* pn = <double*>_out(pcount, F64)
    cdef Py_ssize_t groups = d[0] * (d[1] // max(rows_per_group, 1))
    if T == cnp.NPY_FLOAT32:
        _masked_moments_rows(<const float*>_in(x, T), m, off, mstep, groups, rows_per_group, d[2], pm, p2, pn,
                             threads)
    elif T == HALF:
        _masked_moments_rows(<const nc_f16*>_in(x, T), m, off, mstep, groups, rows_per_group, d[2], pm, p2, pn,
                             threads)
    elif T == BF16:
        _masked_moments_rows(<const nc_bf16*>_in(x, T), m, off, mstep, groups, rows_per_group, d[2], pm, p2, pn,
                             threads)
    else:
        _masked_moments_rows(<const double*>_in(x, T), m, off, mstep, groups, rows_per_group, d[2], pm, p2, pn,
                             threads)


cdef void _masked_moments_rows(const floating* x, const unsigned char* m, const Py_ssize_t* off, int step,
                               Py_ssize_t groups, Py_ssize_t J, Py_ssize_t S, double* pmean, double* pm2,
                               double* pcount, int threads) noexcept nogil:
    cdef Py_ssize_t g
    for g in prange(groups, schedule='static', num_threads=threads, use_threads_if=threads > 1):
        _group_moments_masked(x + g * J * S, m, off, step, g * J, J, S, pmean + g, pm2 + g, pcount + g)


cdef _masked_moments_cols_entry(x, mask, Py_ssize_t rows_per_block, pmean, pm2, pcount, int threads):
    """IN x (A, C) T, mask a masking.MaskRows for the A rows of C; OUT
    pmean, pm2, pcount (ceil(A / rows_per_block), C) float64: moments and count of each
    column's counted elements in each row block."""
    cdef Py_ssize_t* d = _shape(x, 2)
    cdef Py_ssize_t nb = _shape(pmean, 2)[0]
    cdef int T = _storage(x)
    cdef nc_mask mk
    _mask_of(mask, &mk)
    cdef const unsigned char* m = mk.bytes
    cdef const Py_ssize_t* off = mk.off
    cdef int mstep = mk.step
    cdef double* pm = <double*>_out(pmean, F64)
    cdef double* p2 = <double*>_out(pm2, F64)
    cdef double* pn = <double*>_out(pcount, F64)
    cdef double* shift = _scratch(nb * d[1])
    try:
        if T == cnp.NPY_FLOAT32:
            _masked_moments_cols(<const float*>_in(x, T), m, off, mstep, d[0], d[1], rows_per_block, nb, pm, p2,
                                 pn, shift, threads)
        elif T == HALF:
            _masked_moments_cols(<const nc_f16*>_in(x, T), m, off, mstep, d[0], d[1], rows_per_block, nb, pm, p2,
                                 pn, shift, threads)
        elif T == BF16:
            _masked_moments_cols(<const nc_bf16*>_in(x, T), m, off, mstep, d[0], d[1], rows_per_block, nb, pm, p2,
                                 pn, shift, threads)
        else:
            _masked_moments_cols(<const double*>_in(x, T), m, off, mstep, d[0], d[1], rows_per_block, nb, pm, p2,
                                 pn, shift, threads)
    finally:
        free(shift)


cdef void _masked_moments_cols(const floating* x, const unsigned char* m, const Py_ssize_t* off, int step,
                               Py_ssize_t A, Py_ssize_t C, Py_ssize_t rpb, Py_ssize_t nb, double* pmean,
                               double* pm2, double* pcount, double* shift, int threads) noexcept nogil:
    # Each column of a block is shifted by its first counted row there (a member of the
    # data, as in _tile_col_moments); shift holds those values, one row per block.
    cdef Py_ssize_t k, c, r, rows, r0, left
    cdef double s, n
    cdef const unsigned char* mr
    for k in prange(nb, schedule='static', num_threads=threads, use_threads_if=threads > 1):
        r0 = k * rpb
        rows = _block_rows(k, rpb, A)
        for c in range(C):  # pcount: 1 once the column's shift is found (rows in order)
            shift[k * C + c] = 0.0
            pcount[k * C + c] = 0.0
        left = C
        r = 0
        while r < rows and left > 0:
            mr = m + off[r0 + r]
            if step == 0 and mr[0] != 0:
                for c in range(C):
                    if pcount[k * C + c] == 0.0:
                        pcount[k * C + c] = 1.0
                        shift[k * C + c] = nc_get(x, (r0 + r) * C + c)
                left = 0
            elif step != 0 and nc_any_counted(mr, C):
                for c in range(C):
                    if pcount[k * C + c] == 0.0 and mr[c] != 0:
                        pcount[k * C + c] = 1.0
                        shift[k * C + c] = nc_get(x, (r0 + r) * C + c)
                        left = left - 1
            r = r + 1
        for c in range(C):
            pmean[k * C + c] = 0.0
            pm2[k * C + c] = 0.0
            pcount[k * C + c] = 0.0
        nc_col_masked_sums(x + r0 * C, m, off + r0, step, rows, C, C, shift + k * C, pmean + k * C, pm2 + k * C,
                           pcount + k * C)
        for c in range(C):
            s = pmean[k * C + c]
            n = pcount[k * C + c]
            if n > 0:
                pmean[k * C + c] = shift[k * C + c] + s / n
                pm2[k * C + c] = _clamp0(pm2[k * C + c] - s * (s / n))


cdef _masked_dx_rows_entry(dy, x, mask, bint cols, mean, k1, k2, k3, Py_ssize_t rows_per_block, dh,
                           dx, int threads):
    """IN dy, x (A, R, S) T, mask a masking.MaskRows for the kernel's rows
    (cols: the A rows of R elements of the column strategy, S == 1; else the A * R rows of
    S), mean, k1, k2, k3 (R,) float64; OUT dx (A, R, S) T: dx = dy * k1[r] + (x - mean[r])
    * k2[r] + k3[r] where counted, 0 elsewhere (not data), in dx_rows' arithmetic; plus dh
    (A, R, S) T or None after dx's rounding (as add), row by row while in cache."""
    cdef Py_ssize_t* d = _shape(x, 3)
    cdef int T = _storage(x)
    cdef const void* pdh = NULL if dh is None else _in(dh, T)
    cdef nc_mask mk
    _mask_of(mask, &mk)
    cdef const unsigned char* m = mk.bytes
    cdef const Py_ssize_t* off = mk.off
    cdef int mstep = mk.step
    cdef const double* mu = <const double*>_in(mean, F64)
    cdef const double* c1 = <const double*>_in(k1, F64)
    cdef const double* c2 = <const double*>_in(k2, F64)
    cdef const double* c3 = <const double*>_in(k3, F64)
    cdef void* coefs = NULL
    try:
        if cols:  # the column tiles' coefficients, once
            coefs = nc_masked_dx_coefs64(mu, c1, c2, c3, d[1]) if T == F64 else \
                nc_masked_dx_coefs(mu, c1, c2, c3, d[1])
            if coefs == NULL:
                raise MemoryError()

        if T == cnp.NPY_FLOAT32:
            _masked_dx_rows(<const float*>_in(dy, T), <const float*>_in(x, T), m, off, mstep, cols, d[0], d[1], d[2],
                            mu, c1, c2, c3, coefs, rows_per_block, <const float*>pdh, <float*>_out(dx, T), threads)
        elif T == HALF:
            _masked_dx_rows(<const nc_f16*>_in(dy, T), <const nc_f16*>_in(x, T), m, off, mstep, cols, d[0], d[1],
                            d[2], mu, c1, c2, c3, coefs, rows_per_block, <const nc_f16*>pdh,
                            <nc_f16*>_out(dx, T), threads)
        elif T == BF16:
            _masked_dx_rows(<const nc_bf16*>_in(dy, T), <const nc_bf16*>_in(x, T), m, off, mstep, cols, d[0], d[1],
                            d[2], mu, c1, c2, c3, coefs, rows_per_block, <const nc_bf16*>pdh,
                            <nc_bf16*>_out(dx, T), threads)
        else:
            _masked_dx_rows(<const double*>_in(dy, T), <const double*>_in(x, T), m, off, mstep, cols, d[0], d[1],
                            d[2], mu, c1, c2, c3, coefs, rows_per_block, <const double*>pdh,
                            <double*>_out(dx, T), threads)
    finally:
        free(coefs)


cdef void _masked_dx_rows(const floating* dy, const floating* x, const unsigned char* m, const Py_ssize_t* off,
                          int step, bint cols, Py_ssize_t A, Py_ssize_t R, Py_ssize_t S, const double* mean,
                          const double* k1, const double* k2, const double* k3, const void* coefs,
                          Py_ssize_t rpb, const floating* dh, floating* dx, int threads) noexcept nogil:
    cdef Py_ssize_t i, a, r, t, o, j, e, q, rows, tw
    # with dh, each tile or row is added to while in cache, so not streamed
    cdef bint nt = _streams(dx, A * R * S, sizeof(floating)) and dh == NULL
    if cols and step == 0:
        # whole rows counted or not: long runs of like rows through the plain column pass
        # (or zeroed: rows left out); short ones row by row
        for i in prange((A + rpb - 1) // rpb, schedule='static', num_threads=threads, use_threads_if=threads > 1):
            a = i * rpb
            rows = _block_rows(i, rpb, A)
            j = 0
            while j < rows:
                e = j + 1
                while e < rows and (m[off[a + e]] != 0) == (m[off[a + j]] != 0):
                    e = e + 1
                for t in range((R + TILE - 1) // TILE):
                    r = t * TILE
                    o = (a + j) * R + r
                    tw = _block_rows(t, TILE, R)
                    if e - j < LIKE_ROWS:
                        nc_masked_dx_cols(dy + o, x + o, m, off + a + j, step, dx + o, e - j, R, tw, coefs, R, r, nt)
                    elif m[off[a + j]] != 0:
                        _dx_tile(dy + o, x + o, dx + o, e - j, R, tw, mean + r, k1 + r, k2 + r, k3 + r, nt)
                    else:
                        _zero_rows(dx + o, e - j, R, tw)
                    if dh != NULL:
                        for q in range(e - j):
                            nc_add(dx + o + q * R, dh + o + q * R, dx + o + q * R, tw)
                j = e
    elif cols:
        for i in prange((A + rpb - 1) // rpb, schedule='static', num_threads=threads, use_threads_if=threads > 1):
            a = i * rpb
            rows = _block_rows(i, rpb, A)
            for t in range((R + TILE - 1) // TILE):
                r = t * TILE
                o = a * R + r
                tw = _block_rows(t, TILE, R)
                nc_masked_dx_cols(dy + o, x + o, m, off + a, step, dx + o, rows, R, tw, coefs, R, r, nt)
                if dh != NULL:
                    for q in range(rows):
                        nc_add(dx + o + q * R, dh + o + q * R, dx + o + q * R, tw)
    else:
        for i in prange(A * R, schedule='static', num_threads=threads, use_threads_if=threads > 1):
            r = i % R
            _masked_dx_row(dy + i * S, x + i * S, dx + i * S, S, mean[r], k1[r], k2[r], k3[r], nt, NULL, NULL,
                           m + off[i], step, NULL)
            if dh != NULL:
                nc_add(dx + i * S, dh + i * S, dx + i * S, S)
    if nt:
        nc_sfence()


cdef _masked_dx_inner_entry(dy, x, mask, mean, rstd, rp, const double* pw, const double* q1,
                            const double* q2, dh, dx, int threads):
    """IN dy, x (1, R, S) T, mask a masking.MaskRows for the R rows, mean, rstd, c1,
    c2 (R,) float64, rp (R,) intp, w (P,) float64; OUT dx (1, R, S) T: dx = rstd[r] * (dy *
    w[rp[r] + s] - (c1[r] + xhat * c2[r])) with the bracket only where counted (in double);
    plus dh (1, R, S) T or None after dx's rounding (as add), row by row while in cache."""
    cdef Py_ssize_t* d = _shape(x, 3)
    cdef int T = _storage(x)
    cdef const void* pdh = NULL if dh is None else _in(dh, T)
    cdef nc_mask mk
    _mask_of(mask, &mk)
    cdef const unsigned char* m = mk.bytes
    cdef const Py_ssize_t* off = mk.off
    cdef int mstep = mk.step
    cdef const double* mu = <const double*>_in(mean, F64)
    cdef const double* rs = <const double*>_in(rstd, F64)
    cdef const Py_ssize_t* p = <const Py_ssize_t*>_in(rp, IDX)
    if T == cnp.NPY_FLOAT32:
        _masked_dx_inner(<const float*>_in(dy, T), <const float*>_in(x, T), m, off, mstep, d[1], d[2], mu, rs, p,
                         pw, q1, q2, <const float*>pdh, <float*>_out(dx, T), threads)
    elif T == HALF:
        _masked_dx_inner(<const nc_f16*>_in(dy, T), <const nc_f16*>_in(x, T), m, off, mstep, d[1], d[2], mu, rs,
                         p, pw, q1, q2, <const nc_f16*>pdh, <nc_f16*>_out(dx, T), threads)
    elif T == BF16:
        _masked_dx_inner(<const nc_bf16*>_in(dy, T), <const nc_bf16*>_in(x, T), m, off, mstep, d[1], d[2], mu, rs,
                         p, pw, q1, q2, <const nc_bf16*>pdh, <nc_bf16*>_out(dx, T), threads)
    else:
        _masked_dx_inner(<const double*>_in(dy, T), <const double*>_in(x, T), m, off, mstep, d[1], d[2], mu, rs,
                         p, pw, q1, q2, <const double*>pdh, <double*>_out(dx, T), threads)


cdef void _masked_dx_inner(const floating* dy, const floating* x, const unsigned char* m, const Py_ssize_t* off,
                           int step, Py_ssize_t R, Py_ssize_t S, const double* mean, const double* rstd,
                           const Py_ssize_t* rp, const double* w, const double* c1, const double* c2,
                           const floating* dh, floating* dx, int threads) noexcept nogil:
    cdef Py_ssize_t r
    for r in prange(R, schedule='static', num_threads=threads, use_threads_if=threads > 1):
        nc_masked_dx_inner_row(dy + r * S, x + r * S, m + off[r], step, dx + r * S, S, mean[r], rstd[r],
                               w + rp[r], c1[r], c2[r])
        if dh != NULL:
            nc_add(dx + r * S, dh + r * S, dx + r * S, S)


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


def streaming(out):
    """Whether an output array ``out`` (any storage type) would be written with streaming
    stores now (large enough, and its memory resident rather than fresh from the OS); a
    diagnostic."""
    cdef int T = _storage(out)
    cdef void* p = _out(out, T)
    return bool(_streams(p, out.size, out.itemsize))


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
