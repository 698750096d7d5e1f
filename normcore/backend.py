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

    Conventions: every array is C-contiguous; x, y, dy, dx have the storage dtype T of x
    (float32, float64, float16 or bfloat16); w, b and running statistics marked T have T,
    or float32 beside a half T (each its own); statistics, coefficients and partials are
    float64; index arrays (rg, rp, rc) are intp. Layouts: (A, C, B) for statistics
    (group c reduces over a and b), (A, R, S) for elementwise passes (row r has one
    group rg[r] and either one parameter rp[r] or the slice w[rp[r]:rp[r] + S]).
    ``threads`` is a hint (GPU backends ignore it). Kernels check nothing: the
    orchestration has validated shapes and dtypes, and results are bitwise independent of
    ``threads``. OUT arrays are fully written unless marked "zeroed" (the caller zeroes).
    The elementwise outputs (y, dx) are written through their data alone, their shape
    unread: any C-contiguous array of the right size will do (the caller's, unreshaped).

    Every group has a count: ``counts`` (C,) float64, the elements behind each group's
    statistics -- a constant vector (``layout.group_counts``) for an unmasked call, the
    counted elements of a masked one -- and ``pcount`` (K, C) the elements behind each
    partial. The statistics algebra (finalize, running update, dx coefficients) takes them
    whatever they hold: a mask changes the counts, never the entries. A group with count
    0 has mean 0, var 0 and rstd 0 (its terms vanish; the dividing count reads as 1).

    Masks are optional keyword arguments of the entries that read them, never entries of
    their own: ``mask`` uint8 bytes (nonzero: counted) by the kernel's rows
    (masking.MaskRows), row r's bytes starting at ``mask[moff[r]]`` (moff intp) and
    advancing by ``mstep``, 1 or 0 (one byte for the row). Rows: the A * R rows of S of the
    (A, R, S) layout, or for the column strategy the A rows of C of (A, C). A masked entry
    leaves the masked-out positions out of every sum and writes dx = 0 there (they are not
    data), then adds dh everywhere when one is given.
    """

    # -- statistics ------------------------------------------------------------------------
    def moments_rows(self, x, pmean, pm2, threads, *, mask=None, moff=None, mstep=0, rows_per_group=1, pcount=None):
        """IN x (A, C, B) T; OUT pmean, pm2 (A, C): mean and centred sum of squares of each row.
        With mask (moff (A * C,)): per group of J = rows_per_group consecutive rows, over
        the counted elements, OUT pmean, pm2, pcount (A, C / J) (0, 0, 0 for none)."""

    def moments_cols(self, x, rows_per_block, pmean, pm2, threads, *, mask=None, moff=None, mstep=0, pcount=None):
        """IN x (A, C) T; OUT pmean, pm2 (ceil(A / rows_per_block), C): per row block. With
        mask (moff (A,)): over the counted elements, their number into pcount (same shape)."""

    def finalize_moments(self, pmean, pm2, pcount, center, eps, mean, var, rstd, *, counts=None):
        """IN pmean, pm2, pcount (K, C); OUT mean, var, rstd (C,), and counts (C,) when given:
        the partials merged exactly in order (an empty one adds nothing), var = m2 / n (plus
        mean^2, mean set to 0, when not ``center``), rstd = 1/sqrt(var + eps), n = the sum
        of pcount (0: mean, var, rstd 0)."""

    def running_statistics(self, running_mean, running_var, rc, eps, mean, var, rstd):
        """IN running_mean, running_var (E,) T, rc (C,); OUT mean, var, rstd (C,)."""

    def update_running(self, mean, var, counts, rc, groups_per_running, momentum, keep, unbiased,
                       running_mean, running_var, scratch):
        """IN mean, var, counts (C,), rc (C,); IN/OUT running_mean, running_var (E,) T; scratch
        (2E,): running = keep * running + momentum * (average of the entry's groups; each
        var times n / (n - 1) when ``unbiased``); keep is 1 - momentum, or the caller's decay
        exactly."""

    # -- elementwise -------------------------------------------------------------------------
    def add(self, a, b, out, threads):
        """IN a, b T (n elements each, any shape); OUT out T (n elements; may be a or b):
        a + b rounded as NumPy's (the half types through float32, which rounds them exactly)."""

    # -- forward elementwise -----------------------------------------------------------------
    def row_coefficients(self, mean, rstd, rg, rp, w, b, has_w, has_b, mean_r, scale, shift):
        """IN mean, rstd (C,), rg, rp (R,), w, b (P,) T; OUT mean_r, scale, shift (R,)."""

    def affine_rows(self, x, mean, scale, shift, rows_per_block, y, threads):
        """IN x (A, R, S) T, mean, scale, shift (R,); OUT y = (x - mean) * scale + shift."""

    def affine_inner(self, x, mean, rstd, rp, w, b, y, threads):
        """IN x (1, R, S) T, mean, rstd (R,), rp (R,), w, b (P,) float64;
        OUT y = (x - mean[r]) * rstd[r] * w[rp[r] + s] + b[rp[r] + s]."""

    def normalize_groups(self, x, residual, h, rows_per_group, center, eps, affine, rp, w, b, mean, var,
                         rstd, y, threads, *, mask=None, moff=None, mstep=0, counts=None):
        """IN x (1, C, B) T, residual (1, C, B) T or None, rp (C * J,), w, b (P,) float64,
        affine an AffineKind; OUT h (1, C, B) T (None without a residual), mean, var, rstd
        (C,), y (1, C, B): statistics and output in one visit per group, of h = x + residual
        (as ``add``) when a residual is given. With mask (moff (C * J,)): over the counted
        elements (of h with a residual), OUT also counts (C,); a group with none gets mean
        0, var 0, rstd 0 (optional: ``masked_groups``)."""

    def normalize_cols(self, x, rows_per_block, center, eps, rg, rp, w, b, has_w, has_b, mean, var, rstd, y,
                       threads):
        """IN x (A, C) T, rg, rp (C,), w, b (P,) T; OUT mean, var, rstd (C,), y (A, C): the
        column strategy's forward, moments_cols → finalize_moments → row_coefficients →
        affine_rows in one call (bitwise the same as the four)."""

    def normalize_running(self, x, running_mean, running_var, rc, eps, rg, rp, w, b, has_w, has_b,
                          rows_per_block, mean, var, rstd, y, threads):
        """IN x (A, R, S) T, running_mean, running_var (E,) T, rc (C,), rg, rp (R,), w, b (P,) T;
        OUT mean, var, rstd (C,), y (A, R, S): running_statistics → row_coefficients →
        affine_rows in one call (eval mode, estimated batch norm)."""

    # -- backward ----------------------------------------------------------------------------
    def sums_rows(self, dy, x, mean, p1, p2, threads, mask=None, moff=None, mstep=0):
        """IN dy, x (A, R, S) T, mean (R,); OUT p1, p2 (A, R): row sums of dy, dy * (x - mean).
        mask, moff, mstep (as dx_rows reads them; optional: ``masked_sums``): over the
        counted elements only, whatever the others hold."""

    def sums_cols(self, dy, x, mean, rows_per_block, p1, p2, threads, mask=None, moff=None, mstep=0):
        """IN dy, x (A, C) T, mean (C,); OUT p1, p2 (ceil(A / rows_per_block), C). mask as in
        ``sums_rows``, for the A rows of C."""

    def gradient_sums(self, p1, p2, rg, rp, w, has_w, rstd, g1, g2, dw, db):
        """IN p1, p2 (K, R), rg, rp (R,), w (P,) T, rstd (C,); OUT g1, g2 (C,) group sums of
        w dy and w dy xhat; dw, db (P,) zeroed, or empty to skip them."""

    def dx_coefficients(self, g1, g2, counts, rg, rp, w, has_w, rstd, stats_grad, center, k1, k2, k3):
        """IN g1, g2, counts (C,), rg, rp (R,), w (P,) T, rstd (C,); OUT k1, k2, k3 (R,) of
        dx_rows (the group means of g and g xhat over counts)."""

    def dx_rows(self, dy, x, mean, k1, k2, k3, rows_per_block, dh, dx, threads, *, mask=None, moff=None, mstep=0,
                cols=False):
        """IN dy, x (A, R, S) T, mean, k1, k2, k3 (R,), dh (A, R, S) T or None; OUT dx = dy k1 +
        (x - mean) k2 + k3, plus dh after dx's rounding (as ``add``) when given. With mask
        (cols: the A rows of R, S == 1; else the A * R rows of S): 0 where not counted, then dh."""

    def sums_inner(self, dy, x, mean, rstd, rp, w, rows_per_block, s1, s2, pdw, pdb, threads, mask=None,
                   moff=None, mstep=0):
        """IN dy, x (1, R, S) T, mean, rstd, rp (R,), w (P,) float64; OUT s1, s2 (R,) sums of
        g = dy w[rp + s] and g xhat; pdw, pdb (ceil(R / rows_per_block), P) zeroed partials.
        mask as in ``sums_rows``, for the R rows of S."""

    def dx_inner(self, dy, x, mean, rstd, rp, w, c1, c2, dh, dx, threads, *, mask=None, moff=None, mstep=0):
        """IN dy, x (1, R, S) T, mean, rstd, rp, c1, c2 (R,), w (P,) float64, dh (1, R, S) T or
        None; OUT dx = rstd (dy w - c1 - xhat c2), plus dh as in ``dx_rows``. With mask
        (moff (R,)): 0 where not counted, then dh."""

    def backward_groups(self, dy, x, rows_per_group, center, affine, rp, w, mean, rstd, counts,
                        groups_per_block, t1, t2, pdw, pdb, dh, dx, threads, *, mask=None, moff=None, mstep=0):
        """IN dy, x (1, C, B) T, rp (C * J,), w (P,) float64, mean, rstd, counts (C,), dh
        (1, C, B) T or None; OUT t1, t2 (C * J,) row sums (affine NONE/ROW), pdw, pdb (blocks, P)
        zeroed partials (INNER), dx (1, C, B), plus dh when given (as ``add``, after dx's
        rounding): training backward in one visit per group (optional: ``fused_backward``).
        With mask (as normalize_groups took it, counts from it): the sums over the counted
        elements, dx 0 where not counted, then dh (optional: ``masked_groups``)."""

    def backward_cols(self, dy, x, mean, rstd, counts, rows_per_block, rg, rp, w, has_w, stats_grad, center,
                      dw, db, dh, dx, threads):
        """IN dy, x (A, C) T, mean, rstd, counts (C,), rg, rp (C,), w (P,) T; OUT dw, db (P,) (empty:
        skipped), dx (A, C) (plus dh, (A, C) T or None): the column strategy's backward,
        sums_cols → gradient_sums → dx_coefficients → dx_rows in one call."""



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
