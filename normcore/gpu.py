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


class CudaKernels:
    """Same names and arguments as normcore._kernels (``threads`` is ignored); launches
    go through ``lookup(family, name, dtype_name) -> kernel(grid, block, args)``."""

    def __init__(self, lookup=_cupy_kernel):
        self._lookup = lookup

    def _fn(self, family, name, dtype):
        return self._lookup(family, name, np.dtype(dtype).name)

    # masks are bytes by rows, m[off[r]] with step 0 or 1 (masking.MaskRows): moments and dx
    # passes take them as optional arguments
    def moments_rows(self, x, pmean, pm2, threads, *, mask=None, moff=None, mstep=0, rows_per_group=1, pcount=None):
        A, C, B = x.shape
        if mask is not None:
            groups = A * (C // max(rows_per_group, 1))
            if groups:
                self._fn("masked", "nc_masked_moments_rows", x.dtype)(
                    _row_grid(groups), (_row_block(rows_per_group * B),),
                    (x, mask, moff, _i(mstep), _i(groups), _i(rows_per_group), _i(B), pmean, pm2, pcount))
            return
        if A * C == 0:
            return
        self._fn("rows", "nc_moments_rows", x.dtype)(_row_grid(A * C), (_row_block(B),),
                                                     (x, _i(A * C), _i(B), pmean, pm2))

    def moments_cols(self, x, rpb, pmean, pm2, threads, *, mask=None, moff=None, mstep=0, pcount=None):
        A, C = x.shape
        if A * C == 0:
            return
        if mask is not None:
            self._fn("masked", "nc_masked_moments_cols", x.dtype)(
                _col_grid(A, C, rpb), (_COL_TILE, _COL_STRIPES),
                (x, mask, moff, _i(mstep), _i(A), _i(C), _i(rpb), pmean, pm2, pcount))
            return
        self._fn("cols", "nc_moments_cols", x.dtype)(_col_grid(A, C, rpb), (_COL_TILE, _COL_STRIPES),
                                                     (x, _i(A), _i(C), _i(rpb), pmean, pm2))

    def _combine(self, pmean, pm2, pcount, mean, m2, n):
        """(K, C) partials merged per column, in order, a partial without elements adding
        nothing: mean, m2 and the elements n (C,) each."""
        K, C = pmean.shape
        self._fn("merge", "nc_combine_moments", np.float64)((int(min(-(-C // 256), 4096)),), (256,),
                                                          (pmean, pm2, pcount, _i(K), _i(C), mean, m2, n))

    def affine_rows(self, x, mean, scale, shift, rpb, y, threads):
        A, R, S = x.shape
        if x.size == 0:
            return
        if S == 1:
            self._fn("cols", "nc_affine_cols", x.dtype)(_col_grid(A, R, rpb), (_COL_TILE, _COL_STRIPES),
                                                        (x, _i(A), _i(R), _i(rpb), mean, scale, shift, y))
        else:
            self._fn("rows", "nc_affine_rows", x.dtype)(_row_grid(A * R), (_row_block(S),),
                                                        (x, _i(A * R), _i(R), _i(S), mean, scale, shift, y))

    def sums_rows(self, dy, x, mean, p1, p2, threads):
        A, R, S = x.shape
        if A * R == 0:
            return
        self._fn("rows", "nc_sums_rows", x.dtype)(_row_grid(A * R), (_row_block(S),),
                                                  (dy, x, _i(A * R), _i(R), _i(S), mean, p1, p2))

    def sums_cols(self, dy, x, mean, rpb, p1, p2, threads):
        A, C = x.shape
        if A * C == 0:
            return
        self._fn("cols", "nc_sums_cols", x.dtype)(_col_grid(A, C, rpb), (_COL_TILE, _COL_STRIPES),
                                                  (dy, x, _i(A), _i(C), _i(rpb), mean, p1, p2))

    def dx_rows(self, dy, x, mean, k1, k2, k3, rpb, dh, dx, threads, *, mask=None, moff=None, mstep=0, cols=False):
        A, R, S = x.shape
        if x.size == 0:
            return
        dh = _i(0) if dh is None else dh  # a null pointer: no dh
        if mask is not None:
            if cols:
                self._fn("masked", "nc_masked_dx_cols", x.dtype)(
                    _col_grid(A, R, rpb), (_COL_TILE, _COL_STRIPES),
                    (dy, x, mask, moff, _i(mstep), _i(A), _i(R), _i(rpb), mean, k1, k2, k3, dh, dx))
            else:
                self._fn("masked", "nc_masked_dx_rows", x.dtype)(
                    _row_grid(A * R), (_row_block(S),),
                    (dy, x, mask, moff, _i(mstep), _i(A * R), _i(R), _i(S), mean, k1, k2, k3, dh, dx))
            return
        if S == 1:
            self._fn("cols", "nc_dx_cols", x.dtype)(_col_grid(A, R, rpb), (_COL_TILE, _COL_STRIPES),
                                                    (dy, x, _i(A), _i(R), _i(rpb), mean, k1, k2, k3, dh, dx))
        else:
            self._fn("rows", "nc_dx_rows", x.dtype)(_row_grid(A * R), (_row_block(S),),
                                                    (dy, x, _i(A * R), _i(R), _i(S), mean, k1, k2, k3, dh, dx))

    def affine_inner(self, x, mean, rstd, rp, w, b, y, threads):
        _, R, S = x.shape
        if x.size == 0:
            return
        self._fn("inner", "nc_affine_inner", x.dtype)(_row_grid(R), (_row_block(S),),
                                                      (x, _i(R), _i(S), mean, rstd, rp, w, b, y))

    def sums_inner(self, dy, x, mean, rstd, rp, w, rpb, s1, s2, pdw, pdb, threads):
        _, R, S = x.shape
        if x.size == 0:
            return
        self._fn("inner", "nc_row_sums_inner", x.dtype)(_row_grid(R), (_row_block(S),),
                                                        (dy, x, _i(R), _i(S), mean, rstd, rp, w, s1, s2))
        nb, P = pdw.shape
        grid = (int(nb), int(max(1, min(-(-S // 256), _MAX_GRID_Y))))  # the kernel strides over the rest
        self._fn("inner", "nc_param_sums_inner", x.dtype)(
            grid, (256,), (dy, x, _i(R), _i(S), mean, rstd, rp, _i(rpb), _i(P), pdw, pdb))

    def add(self, a, b, out, threads):
        n = a.size
        if n == 0:
            return
        self._fn("add", "nc_add", a.dtype)((int(min(-(-n // 256), 1 << 16)),), (256,), (a, b, _i(n), out))

    def normalize_groups(self, x, residual, h, J, center, eps, affine, rp, w, b, mean, var, rstd, y, threads, *,
                         mask=None, moff=None, mstep=0, counts=None):
        if mask is not None:  # (CudaBackend.masked_groups is False: routes take the moments instead)
            raise NotImplementedError("normalize_groups: the CUDA kernels take no mask here")
        _, C, B = x.shape
        if x.size == 0:
            return
        eps_bits = np.float64(eps).view(np.int64)  # kernels take 64-bit integers and pointers
        if residual is None:  # null pointers: no residual add
            residual = h = _i(0)
        self._fn("groups", "nc_normalize_groups", x.dtype)(
            _row_grid(C), (_row_block(B),),
            (x, residual, h, _i(C), _i(B), _i(J), _i(bool(center)), eps_bits, _i(affine), rp, w, b, mean, var,
             rstd, y))

    def dx_inner(self, dy, x, mean, rstd, rp, w, c1, c2, dh, dx, threads, *, mask=None, moff=None, mstep=0):
        _, R, S = x.shape
        if x.size == 0:
            return
        dh = _i(0) if dh is None else dh  # a null pointer: no dh
        if mask is not None:
            self._fn("masked", "nc_masked_dx_inner", x.dtype)(
                _row_grid(R), (_row_block(S),),
                (dy, x, mask, moff, _i(mstep), _i(R), _i(S), mean, rstd, rp, w, c1, c2, dh, dx))
            return
        self._fn("inner", "nc_dx_inner", x.dtype)(_row_grid(R), (_row_block(S),),
                                                  (dy, x, _i(R), _i(S), mean, rstd, rp, w, c1, c2, dh, dx))

    # -- per-group algebra: array operations on the device (small, O(C + R) each) --------
    def finalize_moments(self, pmean, pm2, pcount, center, eps, mean, var, rstd, *, counts=None):
        K, C = pmean.shape
        if C == 0:
            return
        xp = _xp_of(pmean)
        if K == 1:
            mu, m2, n = pmean[0], pm2[0], pcount[0]
        else:
            mu, m2, n = xp.empty(C), xp.empty(C), xp.empty(C)
            self._combine(pmean, pm2, pcount, mu, m2, n)
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

    def running_statistics(self, running_mean, running_var, rc, eps, mean, var, rstd):
        xp = _xp_of(mean)
        mean[...] = running_mean.astype(np.float64)[rc]
        var[...] = running_var.astype(np.float64)[rc]
        rstd[...] = 1.0 / xp.sqrt(var + eps)

    def update_running(self, mean, var, counts, rc, groups_per_running, momentum, keep, unbiased, running_mean,
                       running_var, scratch):
        xp = _xp_of(mean)
        E = running_mean.shape[0]
        sm = xp.bincount(rc, weights=mean, minlength=E)
        unbias = xp.where(counts > 1, counts / (counts - 1), 1.0) if unbiased else 1.0
        sv = xp.bincount(rc, weights=var * unbias, minlength=E)
        if groups_per_running != 1.0:
            sm, sv = sm / groups_per_running, sv / groups_per_running
        running_mean[...] = keep * running_mean.astype(np.float64) + momentum * sm
        running_var[...] = keep * running_var.astype(np.float64) + momentum * sv

    def row_coefficients(self, mean, rstd, rg, rp, w, b, has_w, has_b, mean_r, scale, shift):
        mean_r[...] = mean[rg]
        scale[...] = rstd[rg] * w.astype(np.float64)[rp] if has_w else rstd[rg]
        shift[...] = b.astype(np.float64)[rp] if has_b else 0.0

    def gradient_sums(self, p1, p2, rg, rp, w, has_w, rstd, g1, g2, dw, db):
        xp = _xp_of(p1)
        C, P = g1.shape[0], dw.shape[0]
        t1, t2 = p1.sum(axis=0), p2.sum(axis=0)
        rs = rstd[rg]
        if P:
            dw += xp.bincount(rp, weights=rs * t2, minlength=P)
            db += xp.bincount(rp, weights=t1, minlength=P)
        gamma = w.astype(np.float64)[rp] if has_w else 1.0
        g1[...] = xp.bincount(rg, weights=gamma * t1, minlength=C)
        g2[...] = xp.bincount(rg, weights=gamma * (rs * t2), minlength=C)

    def dx_coefficients(self, g1, g2, counts, rg, rp, w, has_w, rstd, stats_grad, center, k1, k2, k3):
        xp = _xp_of(g1)
        rs = rstd[rg]
        n = xp.where(counts != 0, counts, 1.0)  # a group without elements has rstd 0
        k1[...] = rs * w.astype(np.float64)[rp] if has_w else rs
        k2[...] = -rs * rs * (g2 / n)[rg] if stats_grad else 0.0
        k3[...] = -rs * (g1 / n)[rg] if stats_grad and center else 0.0


    # -- composed calls: the same sequences as the CPU's composed kernels ----------------
    def normalize_cols(self, x, rpb, center, eps, rg, rp, w, b, has_w, has_b, mean, var, rstd, y, threads):
        A, C = x.shape
        if C == 0:
            return
        xp = _xp_of(x)
        nb = -(-A // rpb)
        counts = np.full((nb, C), float(rpb))
        counts[-1] = A - rpb * (nb - 1)
        pmean, pm2 = xp.empty((nb, C)), xp.empty((nb, C))
        self.moments_cols(x, rpb, pmean, pm2, threads)
        self.finalize_moments(pmean, pm2, xp.asarray(counts), center, eps, mean, var, rstd)
        mean_r, scale, shift = xp.empty(C), xp.empty(C), xp.empty(C)
        self.row_coefficients(mean, rstd, rg, rp, w, b, has_w, has_b, mean_r, scale, shift)
        self.affine_rows(x.reshape(A, C, 1), mean_r, scale, shift, rpb, y.reshape(A, C, 1), threads)

    def normalize_running(self, x, running_mean, running_var, rc, eps, rg, rp, w, b, has_w, has_b, rpb,
                          mean, var, rstd, y, threads):
        if mean.shape[0] == 0:
            return
        xp = _xp_of(x)
        if x.ndim == 2:
            x = x.reshape(x.shape + (1,))
        R = x.shape[1]
        self.running_statistics(running_mean, running_var, rc, eps, mean, var, rstd)
        mean_r, scale, shift = xp.empty(R), xp.empty(R), xp.empty(R)
        self.row_coefficients(mean, rstd, rg, rp, w, b, has_w, has_b, mean_r, scale, shift)
        self.affine_rows(x, mean_r, scale, shift, rpb, y.reshape(x.shape), threads)

    def backward_cols(self, dy, x, mean, rstd, counts, rpb, rg, rp, w, has_w, stats_grad, center, dw, db, dh, dx,
                      threads):
        A, C = x.shape
        dw[...] = 0.0
        db[...] = 0.0
        if C == 0:
            return
        xp = _xp_of(x)
        group_g = group_gx = rstd  # unread when no sums are taken
        if stats_grad or dw.shape[0] > 0:
            nb = -(-A // rpb)
            p1, p2 = xp.empty((nb, C)), xp.empty((nb, C))
            self.sums_cols(dy, x, mean, rpb, p1, p2, threads)
            group_g, group_gx = xp.empty(C), xp.empty(C)
            self.gradient_sums(p1, p2, rg, rp, w, has_w, rstd, group_g, group_gx, dw, db)
        k1, k2, k3 = xp.empty(C), xp.empty(C), xp.empty(C)
        self.dx_coefficients(group_g, group_gx, counts, rg, rp, w, has_w, rstd, stats_grad, center, k1, k2, k3)
        self.dx_rows(dy.reshape(A, C, 1), x.reshape(A, C, 1), mean, k1, k2, k3, rpb,
                     None if dh is None else dh.reshape(A, C, 1), dx.reshape(A, C, 1), threads)


def _xp_of(a):
    """The array module of ``a``: CuPy's on the GPU, NumPy's for the host emulation."""
    if isinstance(a, np.ndarray):
        return np
    import cupy
    return cupy



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
