"""Where an array's computation runs: the CPU (NumPy + the Cython/OpenMP kernels) or a
CUDA GPU (CuPy + the RawModule kernels in normcore.gpu).

Both backends implement the same kernel contracts (the functions of
``normcore._kernels``), so :mod:`normcore.functional` holds one orchestration — plans,
validation, statistics merges, running statistics, gradients' small per-group algebra —
written against ``backend.xp`` (``numpy`` or ``cupy``) and ``backend.K``. The backend is
the input's: a ``cupy.ndarray`` runs on its GPU, a ``numpy.ndarray`` on the CPU, and every
other array argument must live on the same side (mixing raises ``TypeError``; nothing is
copied between host and device behind the caller's back).

CuPy is imported only when a CuPy array arrives, so importing normcore never needs it.
"""
from __future__ import annotations

import numpy as np

from . import kernels

__all__ = ["Backend", "backend_of", "CPU", "machine_eps"]


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
    fused_backward = True  # K.backward_groups: one-visit training backward
    array_type = np.ndarray
    array_name = "numpy.ndarray"
    dtypes = (np.dtype(np.float32), np.dtype(np.float64))

    def __init__(self):
        self.xp = np
        self.K = kernels.K

    def threads_for(self, size):
        return kernels.threads_for(size)

    def index(self, plan, name):
        """The plan's index array ``name`` (rg, rp, rc) as an array of this backend."""
        return getattr(plan, name)

    def constant(self, plan, name, make):
        """An array that depends on the plan alone, built on the host by ``make()``; in
        host memory rebuilt per call, which costs less than looking it up."""
        return make()

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


CPU = Backend()


def _is_cupy_array(a):
    t = type(a)
    return t.__module__.split(".")[0] == "cupy" and t.__name__ == "ndarray"


def backend_of(x):
    """The backend of array ``x`` (CPU for anything that is not a CuPy array; the caller's
    type checks then say what was expected)."""
    if _is_cupy_array(x):
        from .gpu import cuda_backend
        return cuda_backend()
    return CPU
