"""Which build of the compiled kernels runs: the AVX2 one where the CPU has AVX2 and FMA,
else the baseline one. Both come from the same source (src/normcore/kernels.pxi) and give
bitwise identical results; ``NORMCORE_KERNELS=baseline`` forces the baseline build.
"""
from __future__ import annotations

import os

__all__ = ["K", "VARIANT"]


def _cpu_has_avx2():
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # NumPy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as features
    return bool(features.get("AVX2") and features.get("FMA3"))


def _load():
    if os.environ.get("NORMCORE_KERNELS", "auto") != "baseline" and _cpu_has_avx2():
        try:
            from . import _kernels_avx2
            return _kernels_avx2, "avx2"
        except ImportError:  # built on a platform without the AVX2 variant
            pass
    from . import _kernels
    return _kernels, "baseline"


K, VARIANT = _load()
