"""The CUDA backend: the CPU kernels' contracts implemented with CuPy RawModule kernels.

``src/normcore/kernels.cu`` (installed as ``normcore/kernels.cu``) is compiled at first use
by NVRTC through ``cupy.RawModule``: one module per (kernel family, storage dtype) from a
memoized factory, its templates selected by ``name_expressions``. Families follow the
plan's canonical layouts — ``rows`` ((A, R, S) with one block per row of S contiguous
elements), ``cols`` ((A, C) with statistics along columns), ``inner`` (parameters along
S, as in layer norm), ``groups`` (the one-pass forward when every group is contiguous)
and ``merge`` (partial moments) — never one kernel per mode.

Storage dtypes: float32, float64 (statistics accumulated in float64), float16 and
bfloat16 (``ml_dtypes.bfloat16`` arrays; accumulated in float32, as PyTorch does for mixed
precision). Indices are 64-bit throughout.

>>> available() in (True, False)
True
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from . import backend
from .backend import AffineKind, Backend
from .bounded import PlanArrays
from .composites import Composites, xp_of as _xp_of

__all__ = ["available", "unavailable_reason", "cuda_backend", "kernel_source", "storage_dtypes",
           "compile_options", "kernel_names", "CudaKernels"]

_CTYPES = {"float32": "float", "float64": "double", "float16": "nc_f16", "bfloat16": "nc_bf16"}
_FAMILIES = {
    "rows": ("nc_moments_rows", "nc_affine_rows", "nc_sums_rows", "nc_dx_rows"),
    "cols": ("nc_moments_cols", "nc_sums_cols", "nc_affine_cols", "nc_dx_cols"),
    "inner": ("nc_affine_inner", "nc_row_sums_inner", "nc_param_sums_inner", "nc_dx_inner"),
    "groups": ("nc_normalize_groups",),
    "add": ("nc_add",),
    "masked": ("nc_masked_moments_rows", "nc_masked_moments_cols", "nc_masked_dx_rows", "nc_masked_dx_cols",
               "nc_masked_dx_inner"),
}
# Columns and row stripes per block of the cols family: defined here, passed to the compiler.
_COL_TILE, _COL_STRIPES = 32, 8


def compile_options() -> tuple:
    """The -D options every compilation of kernels.cu takes (NVRTC here, nvcc and the host
    emulator in the tests): tile constants and the contract's affine kinds.

    >>> "-DNC_COL_TILE=32" in compile_options()
    True
    """
    defines = {"NC_COL_TILE": _COL_TILE, "NC_COL_STRIPES": _COL_STRIPES}
    defines.update({f"NC_AFFINE_{k.name}": int(k) for k in AffineKind})
    return tuple(f"-D{k}={v}" for k, v in defines.items())


def kernel_names() -> list:
    """Every kernel of kernels.cu as CuPy names it: templates per storage type, and the
    untemplated float64 merge."""
    return [f"{k}<{t}>" for ks in _FAMILIES.values() for k in ks for t in _CTYPES.values()] + ["nc_combine_moments"]
_MAX_GRID_Y = 65535


def kernel_source() -> Path:
    """Path of kernels.cu: shipped in the package, or in the source tree of a checkout."""
    here = Path(__file__).resolve().parent
    for p in (here / "kernels.cu", here.parent / "src" / "normcore" / "kernels.cu"):
        if p.is_file():
            return p
    raise FileNotFoundError("normcore/kernels.cu is missing from this installation")


@functools.lru_cache(maxsize=None)
def unavailable_reason():
    """Why the GPU path cannot run here (a sentence), or None when it can."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install 'normcore[gpu]')"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy found no CUDA device"
    except Exception as e:  # no driver, no device: CuPy raises its runtime error
        return f"CuPy cannot reach a CUDA device ({type(e).__name__}: {e})"
    return None


def available() -> bool:
    """True when CuPy is installed and sees a CUDA device."""
    return unavailable_reason() is None


@functools.lru_cache(maxsize=None)
def _module(family: str, dtype_name: str):
    """The compiled module of one kernel family for one storage dtype (memoized)."""
    import cupy
    names = [f"{k}<{_CTYPES[dtype_name]}>" for k in _FAMILIES[family]] if family != "merge" \
        else ["nc_combine_moments"]
    mod = cupy.RawModule(code=kernel_source().read_text(), options=("--std=c++17",) + compile_options(),
                         name_expressions=names)
    return {n.split("<")[0]: mod.get_function(n) for n in names}


def _cupy_kernel(family, name, dtype_name):
    """The compiled kernel ``name`` of ``family`` for storage dtype ``dtype_name``; called
    as ``kernel(grid, block, args)``."""
    return _module(family, dtype_name)[name]


def storage_dtypes():
    """The dtypes the CUDA kernels store: float32, float64, float16, and bfloat16 when
    ml_dtypes (which gives NumPy and CuPy the bfloat16 dtype) is installed (the CPU's)."""
    return backend.storage_dtypes()


def _i(v):
    return np.int64(v)


def _row_block(S):
    """Threads per block of a rows-family kernel: enough to cover S, at most 256."""
    for t in (32, 64, 128):
        if S <= 2 * t:
            return t
    return 256


def _row_grid(rows):
    return (int(max(1, min(rows, 1 << 20))),)


def _col_grid(A, C, rpb):
    nb = -(-A // rpb)
    return (int(max(1, nb)), int(max(1, min(-(-C // _COL_TILE), _MAX_GRID_Y))))


class CudaKernels(Composites):
    """Same names and arguments as normcore._kernels (``threads`` is ignored; the composed
    entries are :class:`normcore.composites.Composites`'); launches go through
    ``lookup(family, name, dtype_name) -> kernel(grid, block, args)``."""

    def __init__(self, lookup=_cupy_kernel):
        self._lookup = lookup

    def _fn(self, family, name, dtype):
        return self._lookup(family, name, np.dtype(dtype).name)

    # masks are masking.MaskRows: bytes by rows, base[offsets[r]] with step 0 or 1
    def moments_rows(self, *, x, part_mean, part_m2, threads, mask=None, rows_per_group=1, part_count=None):
        A, C, B = x.shape
        if mask is not None:
            groups = A * (C // max(rows_per_group, 1))
            if groups:
                self._fn("masked", "nc_masked_moments_rows", x.dtype)(
                    _row_grid(groups), (_row_block(rows_per_group * B),),
                    (x, mask.base, mask.offsets, _i(mask.step), _i(groups), _i(rows_per_group), _i(B), part_mean,
                     part_m2, part_count))
            return
        if A * C == 0:
            return
        self._fn("rows", "nc_moments_rows", x.dtype)(_row_grid(A * C), (_row_block(B),),
                                                     (x, _i(A * C), _i(B), part_mean, part_m2))

    def moments_cols(self, *, x, rows_per_block, part_mean, part_m2, threads, mask=None, part_count=None):
        A, C = x.shape
        if A * C == 0:
            return
        rpb = rows_per_block
        if mask is not None:
            self._fn("masked", "nc_masked_moments_cols", x.dtype)(
                _col_grid(A, C, rpb), (_COL_TILE, _COL_STRIPES),
                (x, mask.base, mask.offsets, _i(mask.step), _i(A), _i(C), _i(rpb), part_mean, part_m2, part_count))
            return
        self._fn("cols", "nc_moments_cols", x.dtype)(_col_grid(A, C, rpb), (_COL_TILE, _COL_STRIPES),
                                                     (x, _i(A), _i(C), _i(rpb), part_mean, part_m2))

    def _combine(self, pmean, pm2, pcount, mean, m2, n):
        """(K, C) partials merged per column, in order, a partial without elements adding
        nothing: mean, m2 and the elements n (C,) each."""
        K, C = pmean.shape
        self._fn("merge", "nc_combine_moments", np.float64)((int(min(-(-C // 256), 4096)),), (256,),
                                                          (pmean, pm2, pcount, _i(K), _i(C), mean, m2, n))

    def affine_rows(self, *, x, row_mean, row_scale, row_shift, rows_per_block, y, threads):
        A, R, S = x.shape
        if x.size == 0:
            return
        if S == 1:
            self._fn("cols", "nc_affine_cols", x.dtype)(
                _col_grid(A, R, rows_per_block), (_COL_TILE, _COL_STRIPES),
                (x, _i(A), _i(R), _i(rows_per_block), row_mean, row_scale, row_shift, y))
        else:
            self._fn("rows", "nc_affine_rows", x.dtype)(_row_grid(A * R), (_row_block(S),),
                                                        (x, _i(A * R), _i(R), _i(S), row_mean, row_scale, row_shift,
                                                         y))

    def sums_rows(self, *, dy, x, row_mean, sum_dy, sum_dy_xc, threads, mask=None):
        A, R, S = x.shape
        if mask is not None:  # (CudaBackend.masked_sums is False: routes make dy and x inert instead)
            raise NotImplementedError("sums_rows: the CUDA kernels take no mask here")
        if A * R == 0:
            return
        self._fn("rows", "nc_sums_rows", x.dtype)(_row_grid(A * R), (_row_block(S),),
                                                  (dy, x, _i(A * R), _i(R), _i(S), row_mean, sum_dy, sum_dy_xc))

    def sums_cols(self, *, dy, x, row_mean, rows_per_block, sum_dy, sum_dy_xc, threads, mask=None):
        A, C = x.shape
        if mask is not None:
            raise NotImplementedError("sums_cols: the CUDA kernels take no mask here")
        if A * C == 0:
            return
        self._fn("cols", "nc_sums_cols", x.dtype)(_col_grid(A, C, rows_per_block), (_COL_TILE, _COL_STRIPES),
                                                  (dy, x, _i(A), _i(C), _i(rows_per_block), row_mean, sum_dy,
                                                   sum_dy_xc))

    def dx_rows(self, *, dy, x, row_mean, dy_scale, xc_scale, dx_shift, rows_per_block, dx, threads, dh=None,
                mask=None, cols=False):
        A, R, S = x.shape
        if x.size == 0:
            return
        rpb = rows_per_block
        dh = _i(0) if dh is None else dh  # a null pointer: no dh
        coefs = (row_mean, dy_scale, xc_scale, dx_shift)
        if mask is not None:
            m = (mask.base, mask.offsets, _i(mask.step))
            if cols:
                self._fn("masked", "nc_masked_dx_cols", x.dtype)(
                    _col_grid(A, R, rpb), (_COL_TILE, _COL_STRIPES), (dy, x) + m + (_i(A), _i(R), _i(rpb)) + coefs
                    + (dh, dx))
            else:
                self._fn("masked", "nc_masked_dx_rows", x.dtype)(
                    _row_grid(A * R), (_row_block(S),), (dy, x) + m + (_i(A * R), _i(R), _i(S)) + coefs + (dh, dx))
            return
        if S == 1:
            self._fn("cols", "nc_dx_cols", x.dtype)(_col_grid(A, R, rpb), (_COL_TILE, _COL_STRIPES),
                                                    (dy, x, _i(A), _i(R), _i(rpb)) + coefs + (dh, dx))
        else:
            self._fn("rows", "nc_dx_rows", x.dtype)(_row_grid(A * R), (_row_block(S),),
                                                    (dy, x, _i(A * R), _i(R), _i(S)) + coefs + (dh, dx))

    def affine_inner(self, *, x, row_mean, row_rstd, rp, weight=None, bias=None, y, threads):
        _, R, S = x.shape
        if x.size == 0:
            return
        w, b = _params64(weight, bias, rp, S)
        self._fn("inner", "nc_affine_inner", x.dtype)(_row_grid(R), (_row_block(S),),
                                                      (x, _i(R), _i(S), row_mean, row_rstd, rp, w, b, y))

    def sums_inner(self, *, dy, x, row_mean, row_rstd, rp, weight=None, rows_per_block, row_sums, part_grads,
                   threads, mask=None):
        _, R, S = x.shape
        if mask is not None:
            raise NotImplementedError("sums_inner: the CUDA kernels take no mask here")
        if x.size == 0:
            return
        _, nb, P = part_grads.shape
        w, _ = _params64(weight, None, rp, S, P)
        self._fn("inner", "nc_row_sums_inner", x.dtype)(_row_grid(R), (_row_block(S),),
                                                        (dy, x, _i(R), _i(S), row_mean, row_rstd, rp, w, row_sums[0],
                                                         row_sums[1]))
        grid = (int(nb), int(max(1, min(-(-S // 256), _MAX_GRID_Y))))  # the kernel strides over the rest
        self._fn("inner", "nc_param_sums_inner", x.dtype)(
            grid, (256,), (dy, x, _i(R), _i(S), row_mean, row_rstd, rp, _i(rows_per_block), _i(P), part_grads[0],
                           part_grads[1]))

    def add(self, *, a, b, out, threads):
        n = a.size
        if n == 0:
            return
        self._fn("add", "nc_add", a.dtype)((int(min(-(-n // 256), 1 << 16)),), (256,), (a, b, _i(n), out))

    def normalize_groups(self, *, x, rows_per_group, center, eps, affine, rp, weight=None, bias=None, mean, var,
                         rstd, y, threads, residual=None, h=None, mask=None, counts=None):
        if mask is not None:  # (CudaBackend.masked_groups is False: routes take the moments instead)
            raise NotImplementedError("normalize_groups: the CUDA kernels take no mask here")
        _, C, B = x.shape
        if x.size == 0:
            return
        eps_bits = np.float64(eps).view(np.int64)  # kernels take 64-bit integers and pointers
        if residual is None:  # null pointers: no residual add
            residual = h = _i(0)
        w = b = _i(0)  # unread with affine NONE
        if affine != AffineKind.NONE:
            w, b = _params64(weight, bias, rp, B // rows_per_group)
        self._fn("groups", "nc_normalize_groups", x.dtype)(
            _row_grid(C), (_row_block(B),),
            (x, residual, h, _i(C), _i(B), _i(rows_per_group), _i(bool(center)), eps_bits, _i(affine), rp, w, b,
             mean, var, rstd, y))

    def dx_inner(self, *, dy, x, row_mean, row_rstd, rp, weight=None, group_means, dx, threads, dh=None, mask=None):
        _, R, S = x.shape
        if x.size == 0:
            return
        w, _ = _params64(weight, None, rp, S)
        dh = _i(0) if dh is None else dh  # a null pointer: no dh
        if mask is not None:
            self._fn("masked", "nc_masked_dx_inner", x.dtype)(
                _row_grid(R), (_row_block(S),),
                (dy, x, mask.base, mask.offsets, _i(mask.step), _i(R), _i(S), row_mean, row_rstd, rp, w,
                 group_means[0], group_means[1], dh, dx))
            return
        self._fn("inner", "nc_dx_inner", x.dtype)(_row_grid(R), (_row_block(S),),
                                                  (dy, x, _i(R), _i(S), row_mean, row_rstd, rp, w, group_means[0],
                                                   group_means[1], dh, dx))

    # -- per-group algebra: array operations on the device (small, O(C + R) each) --------
    def finalize_moments(self, *, part_mean, part_m2, part_count, center, eps, mean, var, rstd, counts=None):
        K, C = part_mean.shape
        if C == 0:
            return
        xp = _xp_of(part_mean)
        if K == 1:
            mu, m2, n = part_mean[0], part_m2[0], part_count[0]
        else:
            mu, m2, n = xp.empty(C), xp.empty(C), xp.empty(C)
            self._combine(part_mean, part_m2, part_count, mu, m2, n)
        counted = n > 0
        v = m2 / xp.where(counted, n, 1.0)
        # no representable variance (overflow): NaN, as the CPU kernels
        bad = ~(xp.isfinite(mu) & xp.isfinite(v))
        if not center:
            bad |= ~xp.isfinite(v + mu * mu)
        v = xp.where(bad, np.nan, v)
        mu = xp.where(bad, np.nan, mu)
        if not center:
            v = v + mu * mu
            mu = xp.where(bad, np.nan, 0.0)
        # a group without elements: mean 0, var 0, rstd 0 (and no 1 / sqrt(0) taken for it)
        mean[...] = xp.where(counted, mu, 0.0)
        var[...] = xp.where(counted, v, 0.0)
        rstd[...] = xp.where(counted, 1.0 / xp.sqrt(xp.where(counted, v, 1.0) + eps), 0.0)
        if counts is not None:
            counts[...] = n

    def running_statistics(self, *, running_mean, running_var, rc, eps, mean, var, rstd):
        xp = _xp_of(mean)
        mean[...] = running_mean.astype(np.float64)[rc]
        var[...] = running_var.astype(np.float64)[rc]
        rstd[...] = 1.0 / xp.sqrt(var + eps)

    def update_running(self, *, mean, var, counts, rc, groups_per_running, momentum, keep, unbiased, running_mean,
                       running_var):
        xp = _xp_of(mean)
        E = running_mean.shape[0]
        sm = xp.bincount(rc, weights=mean, minlength=E)
        unbias = xp.where(counts > 1, counts / (counts - 1), 1.0) if unbiased else 1.0
        sv = xp.bincount(rc, weights=var * unbias, minlength=E)
        if groups_per_running != 1.0:
            sm, sv = sm / groups_per_running, sv / groups_per_running
        running_mean[...] = keep * running_mean.astype(np.float64) + momentum * sm
        running_var[...] = keep * running_var.astype(np.float64) + momentum * sv

    def row_coefficients(self, *, mean, rstd, rg, rp, weight=None, bias=None, row_mean, row_scale, row_shift):
        row_mean[...] = mean[rg]
        row_scale[...] = rstd[rg] * weight.astype(np.float64)[rp] if weight is not None else rstd[rg]
        row_shift[...] = bias.astype(np.float64)[rp] if bias is not None else 0.0

    def gradient_sums(self, *, sums, rg, rp, weight=None, rstd, group_sums, param_grads):
        xp = _xp_of(sums)
        C, P = group_sums.shape[1], param_grads.shape[1]
        t1, t2 = sums[0].sum(axis=0), sums[1].sum(axis=0)
        rs = rstd[rg]
        if P:
            param_grads[0] += xp.bincount(rp, weights=rs * t2, minlength=P)
            param_grads[1] += xp.bincount(rp, weights=t1, minlength=P)
        gamma = weight.astype(np.float64)[rp] if weight is not None else 1.0
        group_sums[0] = xp.bincount(rg, weights=gamma * t1, minlength=C)
        group_sums[1] = xp.bincount(rg, weights=gamma * (rs * t2), minlength=C)

    def dx_coefficients(self, *, group_sums, counts, rg, rp, weight=None, rstd, stats_grad, center, dy_scale,
                        xc_scale, dx_shift):
        xp = _xp_of(group_sums)
        rs = rstd[rg]
        n = xp.where(counts != 0, counts, 1.0)  # a group without elements has rstd 0
        dy_scale[...] = rs * weight.astype(np.float64)[rp] if weight is not None else rs
        xc_scale[...] = -rs * rs * (group_sums[1] / n)[rg] if stats_grad else 0.0
        dx_shift[...] = -rs * (group_sums[0] / n)[rg] if stats_grad and center else 0.0


def _params64(weight, bias, rp, S, P=None):
    """(weight, bias) as the double vectors the inner and group kernels read: an absent
    weight as ones, an absent bias as zeros (of the other's length, else P, else max(rp) +
    S)."""
    given = weight if weight is not None else bias
    xp = _xp_of(rp)
    if given is not None:
        P = given.shape[0]
    elif P is None:
        P = int(rp.max()) + S if rp.size else 0
    w = weight.astype(np.float64) if weight is not None else xp.ones(P)
    b = bias.astype(np.float64) if bias is not None else xp.zeros(P)
    return w, b


class CudaBackend(Backend):
    name = "cuda"
    place = "GPU"
    fused_forward = True
    fused_backward = False  # its per-block parameter partials would need one block per group
    masked_groups = False   # masked statistics take the moments kernels and the dx passes
    masked_sums = False     # backward's sums read no mask: dy and x are made inert first
    array_name = "cupy.ndarray"

    def __init__(self):
        import cupy
        self.xp = cupy
        self.K = CudaKernels()
        self.array_type = cupy.ndarray
        self.dtypes = storage_dtypes()
        self._constants = PlanArrays(backend.CONSTANT_CACHE_BYTES)

    def threads_for(self, size):
        return 1

    def index(self, plan, name):
        """The plan's index array on the current device, copied once per plan and device."""
        return self.constant(plan, name, lambda: getattr(plan, name))

    def device_id(self):
        return self.xp.cuda.Device().id

    def to_host(self, a):
        return self.xp.asnumpy(a)

    def from_host(self, a):
        return self.xp.asarray(a)


@functools.lru_cache(maxsize=None)
def cuda_backend() -> CudaBackend:
    """The CUDA backend (CuPy imported here, on first use)."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"normcore's GPU path cannot run: {reason}")
    return CudaBackend()
