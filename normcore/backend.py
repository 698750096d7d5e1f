"""Where an array's computation runs: the CPU (NumPy + the Cython/OpenMP kernels) or a
CUDA GPU (CuPy + the RawModule kernels in normcore.gpu).

Both backends implement one kernel contract, :class:`Kernels` below (the text a new
backend implements), so :mod:`normcore.functional` holds one orchestration written against
``backend.xp`` (``numpy`` or ``cupy``) and ``backend.K``; it never reaches into one
backend's details. The backend is
the input's: a ``cupy.ndarray`` runs on its GPU, a ``numpy.ndarray`` on the CPU, and every
other array argument must live on the same side (mixing raises ``TypeError``; nothing is
copied between host and device behind the caller's back).

CuPy is imported only when a CuPy array arrives, so importing normcore never needs it.
"""
from __future__ import annotations

import enum
import sys
from typing import Protocol

import numpy as np

from . import kernels
from .bounded import PlanArrays

__all__ = ["Backend", "Kernels", "AffineKind", "backend_of", "backend_named", "CPU", "machine_eps",
           "storage_dtypes", "HALF_NAMES", "is_half"]

# The half-precision storage dtypes: computed in float32 (statistics in double on the CPU,
# float32 on the GPU), their weight, bias and running statistics either in x's dtype or
# float32.
HALF_NAMES = ("float16", "bfloat16")


def storage_dtypes():
    """The dtypes x may have on either backend: float32, float64, float16, and bfloat16
    once ml_dtypes (which gives NumPy and CuPy the bfloat16 dtype) is imported -- whoever
    holds a bfloat16 array has imported it; normcore does not import it itself, as that
    takes most of a second.

    >>> [d.name for d in storage_dtypes()][:3]
    ['float32', 'float64', 'float16']
    """
    dtypes = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)]
    ml_dtypes = sys.modules.get("ml_dtypes")
    if ml_dtypes is not None:
        dtypes.append(np.dtype(ml_dtypes.bfloat16))
    return tuple(dtypes)


_F16 = np.dtype(np.float16)


def is_half(dtype) -> bool:
    """Whether ``dtype`` (a numpy dtype) is float16 or bfloat16 (cheap: no lookup by name
    unless the dtype is a user-defined one, as ml_dtypes' bfloat16 is).

    >>> is_half(np.dtype(np.float16)), is_half(np.dtype(np.float32))
    (True, False)
    """
    return dtype == _F16 or (dtype.kind == "V" and dtype.name == "bfloat16")

# The affine kinds of normalize_groups / backward_groups, defined once in
# src/normcore/contract.h and read here from the compiled kernels.
AffineKind = enum.IntEnum("AffineKind", {k.upper(): v for k, v in kernels.K.AFFINE_KINDS.items()})
AffineKind.__doc__ = """Where a row's weight and bias live: NONE (no parameters), ROW (one w/b
per row, w[rp[r]]) or INNER (along the row, w[rp[r] + s])."""


class Kernels(Protocol):
    """The kernel contract: what ``Backend.K`` provides, on the backend's arrays.

    Every argument is passed by name (the entries are keyword-only). Conventions: every
    array is C-contiguous; x, y, dy, dx have the storage dtype T of x (float32, float64,
    float16 or bfloat16); running statistics marked T have T, or float32 beside a half T;
    statistics, coefficients, sums and partials are float64; index arrays (rg, rp, rc)
    are intp. Layouts: (A, C, B) for statistics (group c reduces over a and b), (A, R, S)
    for elementwise passes (row r has one group rg[r] and either one parameter rp[r] or the
    slice w[rp[r]:rp[r] + S]). ``threads`` is a hint (GPU backends ignore it). Kernels
    check nothing: the orchestration has validated shapes and dtypes, and results are
    bitwise independent of ``threads``. OUT arrays are fully written unless marked
    "zeroed" (the caller zeroes). The elementwise outputs (y, dx) are written through
    their data alone, their shape unread: any C-contiguous array of the right size will do
    (the caller's, unreshaped).

    Parameters have one encoding: ``weight`` and ``bias`` (P,) in the caller's own dtype
    (T, or float32 beside a half T), or None when absent (an absent weight reads as ones,
    an absent bias as zeros); the kernels widen them themselves. Where they live is the
    plan's: one per row (``rp[r]``) or along the row (``AffineKind``, for the entries
    that serve both). Sums that travel together are stacked: ``sums`` (2, K, R) the
    partial row sums of dy and dy * (x - mean), ``group_sums`` (2, C) of g = w dy and g
    xhat, ``param_grads`` (2, P) dweight and dbias, ``part_grads`` (2, blocks, P) their
    partials, ``row_sums`` (2, R) per row.

    Every group has a count: ``counts`` (C,) float64, the elements behind each group's
    statistics -- a constant vector (``layout.group_counts``) for an unmasked call, the
    counted elements of a masked one -- and ``part_count`` (K, C) the elements behind each
    partial. The statistics algebra (finalize, running update, dx coefficients) takes them
    whatever they hold: a mask changes the counts, never the entries. A group with count
    0 has mean 0, var 0 and rstd 0 (its terms vanish; the dividing count reads as 1).

    ``mask`` is an optional argument of the entries that read one, never an entry of its
    own: a masking.MaskRows, bytes (nonzero: counted) by the kernel's rows, row r's
    starting at ``base[offsets[r]]`` and advancing by ``step``, 1 or 0 (one byte for the
    row). Rows: the A * R rows of S of the (A, R, S) layout, or for the column strategy
    the A rows of C of (A, C). A masked entry leaves the masked-out positions out of every
    sum and writes dx = 0 there (they are not data), then adds dh everywhere when given.

    The composed entries (normalize_cols, normalize_running, backward_cols) are sequences
    of the primitives: a backend inherits them from :class:`normcore.composites.Composites`
    and may override one with a single compiled call giving the same bits.
    """

    # -- statistics ------------------------------------------------------------------------
    def moments_rows(self, *, x, part_mean, part_m2, threads, mask=None, rows_per_group=1, part_count=None):
        """IN x (A, C, B) T; OUT part_mean, part_m2 (A, C): mean and centred sum of squares of
        each row. With mask (for the A * R rows of x as (A, R, S)): per group of J =
        rows_per_group consecutive rows, over the counted elements, OUT part_mean, part_m2,
        part_count (A, R / J) (0, 0, 0 for none)."""

    def moments_cols(self, *, x, rows_per_block, part_mean, part_m2, threads, mask=None, part_count=None):
        """IN x (A, C) T; OUT part_mean, part_m2 (ceil(A / rows_per_block), C): per row block.
        With mask (the A rows of C): over the counted elements, their number into
        part_count (same shape)."""

    def finalize_moments(self, *, part_mean, part_m2, part_count, center, eps, mean, var, rstd, counts=None):
        """IN part_mean, part_m2, part_count (K, C); OUT mean, var, rstd (C,), and counts (C,)
        when given: the partials merged exactly in order (an empty one adds nothing), var =
        m2 / n (plus mean^2, mean set to 0, when not ``center``), rstd = 1/sqrt(var + eps),
        n = the sum of part_count (0: mean, var, rstd 0)."""

    def running_statistics(self, *, running_mean, running_var, rc, eps, mean, var, rstd):
        """IN running_mean, running_var (E,) T, rc (C,); OUT mean, var, rstd (C,)."""

    def update_running(self, *, mean, var, counts, rc, groups_per_running, momentum, keep, unbiased, running_mean,
                       running_var):
        """IN mean, var, counts (C,), rc (C,); IN/OUT running_mean, running_var (E,) T:
        running = keep * running + momentum * (average of the entry's groups; each
        var times n / (n - 1) when ``unbiased``); keep is 1 - momentum, or the caller's decay
        exactly."""

    # -- elementwise -------------------------------------------------------------------------
    def add(self, *, a, b, out, threads):
        """IN a, b T (n elements each, any shape); OUT out T (n elements; may be a or b):
        a + b rounded as NumPy's (the half types through float32, which rounds them exactly)."""

    # -- forward elementwise -----------------------------------------------------------------
    def row_coefficients(self, *, mean, rstd, rg, rp, weight=None, bias=None, row_mean, row_scale, row_shift):
        """IN mean, rstd (C,), rg, rp (R,), weight, bias (P,); OUT row_mean, row_scale,
        row_shift (R,): mean[rg], rstd[rg] * weight[rp], bias[rp]."""

    def affine_rows(self, *, x, row_mean, row_scale, row_shift, rows_per_block, y, threads):
        """IN x (A, R, S) T, row_mean, row_scale, row_shift (R,); OUT y = (x - mean) * scale +
        shift."""

    def affine_inner(self, *, x, row_mean, row_rstd, rp, weight=None, bias=None, y, threads):
        """IN x (1, R, S) T, row_mean, row_rstd (R,), rp (R,), weight, bias (P,);
        OUT y = (x - mean[r]) * rstd[r] * w[rp[r] + s] + b[rp[r] + s]."""

    def normalize_groups(self, *, x, rows_per_group, center, eps, affine, rp, weight=None, bias=None, mean, var,
                         rstd, y, threads, residual=None, h=None, mask=None, counts=None):
        """IN x (1, C, B) T, residual (1, C, B) T or None, rp (C * J,), weight, bias (P,),
        affine an AffineKind; OUT mean, var, rstd (C,), y (1, C, B), and h (1, C, B) T with
        a residual: statistics and output in one visit per group, of h = x + residual (as
        ``add``) when a residual is given. With mask (the C * J rows of S): over the counted
        elements (of h with a residual), OUT also counts (C,); a group with none gets mean
        0, var 0, rstd 0 (optional: ``masked_groups``)."""

    # -- backward ----------------------------------------------------------------------------
    def sums_rows(self, *, dy, x, row_mean, sum_dy, sum_dy_xc, threads, mask=None):
        """IN dy, x (A, R, S) T, row_mean (R,); OUT sum_dy, sum_dy_xc (A, R): row sums of dy,
        dy * (x - mean). With mask (as dx_rows reads it; optional: ``masked_sums``): over
        the counted elements only, whatever the others hold."""

    def sums_cols(self, *, dy, x, row_mean, rows_per_block, sum_dy, sum_dy_xc, threads, mask=None):
        """IN dy, x (A, C) T, row_mean (C,); OUT sum_dy, sum_dy_xc (ceil(A / rows_per_block),
        C). mask as in ``sums_rows``, for the A rows of C."""

    def gradient_sums(self, *, sums, rg, rp, weight=None, rstd, group_sums, param_grads):
        """IN sums (2, K, R), rg, rp (R,), weight (P,), rstd (C,); OUT group_sums (2, C) of w
        dy and w dy xhat; param_grads (2, P) dweight, dbias (zeroed), or (2, 0) to skip."""

    def dx_coefficients(self, *, group_sums, counts, rg, rp, weight=None, rstd, stats_grad, center, dy_scale,
                        xc_scale, dx_shift):
        """IN group_sums (2, C), counts (C,), rg, rp (R,), weight (P,), rstd (C,); OUT
        dy_scale, xc_scale, dx_shift (R,) of dx_rows (the group means of g and g xhat over
        counts)."""

    def dx_rows(self, *, dy, x, row_mean, dy_scale, xc_scale, dx_shift, rows_per_block, dx, threads, dh=None,
                mask=None, cols=False):
        """IN dy, x (A, R, S) T, row_mean, dy_scale, xc_scale, dx_shift (R,), dh (A, R, S) T or
        None; OUT dx = dy dy_scale + (x - mean) xc_scale + dx_shift, plus dh after dx's
        rounding (as ``add``) when given. With mask (cols: the A rows of R, S == 1; else the
        A * R rows of S): 0 where not counted, then dh."""

    def sums_inner(self, *, dy, x, row_mean, row_rstd, rp, weight=None, rows_per_block, row_sums, part_grads,
                   threads, mask=None):
        """IN dy, x (1, R, S) T, row_mean, row_rstd, rp (R,), weight (P,); OUT row_sums (2, R)
        of g = dy w[rp + s] and g xhat; part_grads (2, ceil(R / rows_per_block), P) zeroed
        partials. mask as in ``sums_rows``, for the R rows of S."""

    def dx_inner(self, *, dy, x, row_mean, row_rstd, rp, weight=None, group_means, dx, threads, dh=None, mask=None):
        """IN dy, x (1, R, S) T, row_mean, row_rstd, rp (R,), group_means (2, R), weight (P,),
        dh (1, R, S) T or None; OUT dx = rstd (dy w - mean_g - xhat mean_gx), plus dh as in
        ``dx_rows``. With mask (the R rows of S): 0 where not counted, then dh."""

    def backward_groups(self, *, dy, x, rows_per_group, center, rp, weight=None, mean, rstd, counts,
                        groups_per_block, dx, threads, row_sums=None, part_grads=None, dh=None, mask=None):
        """IN dy, x (1, C, B) T, rp (C * J,), weight (P,), mean, rstd, counts (C,), dh (1, C,
        B) T or None; OUT dx (1, C, B), plus dh when given (as ``add``, after dx's
        rounding), and either row_sums (2, C * J) (one weight per row) or part_grads (2,
        blocks, P) zeroed (parameters along the rows): training backward in one visit per
        group (optional: ``fused_backward``). With mask (as normalize_groups took it,
        counts from it): the sums over the counted elements, dx 0 where not counted, then
        dh (optional: ``masked_groups``)."""

    # -- composed (normcore.composites) ------------------------------------------------------
    def normalize_cols(self, *, x, rows_per_block, center, eps, rg, rp, weight=None, bias=None, mean, var, rstd, y,
                       threads):
        """IN x (A, C) T, rg, rp (C,), weight, bias (P,); OUT mean, var, rstd (C,), y (A, C):
        the column strategy's forward, moments_cols → finalize_moments → row_coefficients →
        affine_rows."""

    def normalize_running(self, *, x, running_mean, running_var, rc, eps, rg, rp, weight=None, bias=None,
                          rows_per_block, mean, var, rstd, y, threads):
        """IN x (A, R, S) T, running_mean, running_var (E,) T, rc (C,), rg, rp (R,), weight,
        bias (P,); OUT mean, var, rstd (C,), y (A, R, S): running_statistics →
        row_coefficients → affine_rows (eval mode, estimated batch norm)."""

    def backward_cols(self, *, dy, x, mean, rstd, counts, rows_per_block, rg, rp, weight=None, stats_grad, center,
                      param_grads, dx, threads, dh=None):
        """IN dy, x (A, C) T, mean, rstd, counts (C,), rg, rp (C,), weight (P,); OUT
        param_grads (2, P) ((2, 0): skipped), dx (A, C) (plus dh, (A, C) T or None): the
        column strategy's backward, sums_cols → gradient_sums → dx_coefficients → dx_rows."""


def machine_eps(dtype) -> float:
    """Machine epsilon of a float dtype, bfloat16 (ml_dtypes, which NumPy's finfo does not
    know) included.

    >>> machine_eps(np.float32) == float(np.finfo(np.float32).eps)
    True
    """
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":
        import ml_dtypes
        return float(ml_dtypes.finfo(dtype).eps)
    return float(np.finfo(dtype).eps)


class Backend:
    """One place computations run. ``xp`` is its array module, ``K`` its kernels."""

    name = "cpu"
    place = "CPU"  # for messages: "x is on the CPU"
    fused_forward = True   # K.normalize_groups: one-pass forward of contiguous groups
    fused_backward = True  # K.backward_groups: one-visit training backward (optional)
    masked_groups = True   # K.normalize_groups / backward_groups take mask= (optional)
    masked_sums = True     # K.sums_rows / sums_cols / sums_inner take mask= (optional)
    array_type = np.ndarray
    array_name = "numpy.ndarray"

    def __init__(self):
        self.xp = np
        self.K = kernels.K
        self.dtypes = storage_dtypes()
        self._constants = PlanArrays(CONSTANT_CACHE_BYTES)

    def accepts(self, dtype) -> bool:
        """Whether x may have ``dtype`` here (bfloat16 joins once ml_dtypes is imported)."""
        if dtype in self.dtypes:
            return True
        if dtype.kind == "V" and dtype.name == "bfloat16":  # ml_dtypes imported since
            self.dtypes = storage_dtypes()
        return dtype in self.dtypes

    def threads_for(self, size):
        return kernels.threads_for(size)

    def index(self, plan, name):
        """The plan's index array ``name`` (rg, rp, rc) as an array of this backend."""
        return getattr(plan, name)

    def constant(self, plan, name, make):
        """An array that depends on the plan (and ``name``) alone, built on the host by
        ``make()`` and placed on this backend; kept while the plan lives, within
        :data:`CONSTANT_CACHE_BYTES` of such arrays per backend (least recently used out)."""
        return self._constants.get(plan, (name, self.device_id()), lambda: self.from_host(make()))

    def device_id(self):
        """Which device of this backend is current (constants are kept per device)."""
        return 0

    def is_identity(self, plan, name, n):
        """True when the plan's index ``name`` maps n entries onto themselves (a gather or
        bincount through it would only copy): one group per row, one parameter per row."""
        return name in plan.identities and len(getattr(plan, name)) == n

    def to_host(self, a):
        return a

    def from_host(self, a):
        return a

    def __repr__(self):
        return f"<normcore backend {self.name}>"

    def __reduce__(self):
        # a backend holds its array module: pickles and copies (of a layer, of the cache it
        # keeps for backward) name the backend instead, and get the process's own
        return backend_named, (self.name,)


#: The most bytes of plan-derived arrays (:meth:`Backend.constant`: per-partial counts, a
#: broadcast mask's row offsets, index arrays copied to a GPU) a backend keeps.
CONSTANT_CACHE_BYTES = 64 << 20

CPU = Backend()


def _is_cupy_array(a):
    t = type(a)
    return t.__module__.split(".")[0] == "cupy" and t.__name__ == "ndarray"


def backend_named(device):
    """The backend of a device name: ``"cpu"`` or ``"cuda"`` (CuPy imported here)."""
    if device == "cuda":
        from .gpu import cuda_backend
        return cuda_backend()
    return CPU


def backend_of(x):
    """The backend of array ``x`` (CPU for anything that is not a CuPy array; the caller's
    type checks then say what was expected)."""
    if type(x) is np.ndarray:
        return CPU
    if _is_cupy_array(x):
        from .gpu import cuda_backend
        return cuda_backend()
    return CPU
