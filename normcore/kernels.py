"""Which build of the compiled kernels runs: the widest the CPU has of AVX-512 (F, BW, VL),
AVX2 with FMA and F16C (float16 conversions), and the baseline. All come from the same
source (src/normcore/kernels.pxi); within a build results do not depend on the thread count, and across builds they differ
at most in the last bits, within the float32 accuracy contract (README, Numerics).
``NORMCORE_KERNELS=baseline``, ``avx2`` or ``avx512`` forces one (an error when the CPU or
the installation lacks it); ``auto`` (the default, also when the variable is empty) chooses.
"""
from __future__ import annotations

import importlib
import os

from .plan import GRAIN  # below it a kernel runs on one thread (see there)

__all__ = ["K", "VARIANT", "VARIANTS", "available_variants", "set_num_threads", "get_num_threads",
           "threads_for"]

# widest first: (name, module, the CPU features it needs, as NumPy names them)
VARIANTS = (("avx512", "_kernels_avx512", ("AVX512F", "AVX512BW", "AVX512VL", "AVX2", "FMA3", "F16C")),
            ("avx2", "_kernels_avx2", ("AVX2", "FMA3", "F16C")),
            ("baseline", "_kernels", ()))


def _cpu_features():
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # NumPy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as features
    return features


def _import(module):
    try:
        return importlib.import_module(f"{__package__}.{module}")
    except ImportError:  # not built on this platform
        return None


def available_variants():
    """The builds this CPU can run and this installation has, widest first.

    >>> from normcore.kernels import available_variants
    >>> available_variants()[-1]
    'baseline'
    """
    features = _cpu_features()
    return [name for name, module, needs in VARIANTS
            if all(features.get(f) for f in needs) and _import(module) is not None]


def _load():
    # an empty (or blank) value is unset, as for other such variables
    wanted = os.environ.get("NORMCORE_KERNELS", "").strip() or "auto"
    names = [name for name, _, _ in VARIANTS]
    if wanted not in names + ["auto"]:
        raise ImportError(f"NORMCORE_KERNELS: expected one of auto, {', '.join(names)}, got {wanted!r}")
    if _import("_kernels") is None:
        raise ImportError(_not_built_message())
    usable = available_variants()
    if wanted == "auto":
        wanted = usable[0]
    elif wanted not in usable:
        raise ImportError(f"NORMCORE_KERNELS={wanted}: this CPU or installation cannot run that build "
                          f"(available: {', '.join(usable)})")
    return _import(dict((n, m) for n, m, _ in VARIANTS)[wanted]), wanted


def _not_built_message():
    """What to do when the compiled kernels are missing beside this package's sources."""
    here = os.path.dirname(os.path.abspath(__file__))
    msg = f"normcore's compiled kernels (_kernels*.so) are not built in {here}, so this copy of normcore cannot run."
    if os.path.isfile(os.path.join(os.path.dirname(here), "src", "normcore", "kernels.pxi")):
        # the usual case: Python found the source checkout first (it searches the current
        # directory before site-packages), not the normcore that pip installed
        msg += (" This is a source checkout: build the kernels in place with "
                "'pip install -e .' from its root, or run Python from another directory to "
                "use the installed normcore.")
    else:
        msg += " Reinstall normcore ('pip install --force-reinstall normcore') to rebuild them."
    return msg


K, VARIANT = _load()



_requested = None  # set_num_threads; None: OpenMP's limit

# GNU OpenMP is not fork-safe: a child forked after the parent ran a parallel region waits
# forever for the parent's worker threads, which the child does not have. A forked child
# therefore runs every kernel on one thread (results are the same for any thread count);
# processes started with "spawn" or "forkserver" keep the default.
_forked = False


def _after_fork_in_child():
    global _forked
    _forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def set_num_threads(n):
    """Run large inputs on at most ``n`` threads; ``None`` restores the default.

    The default, and the cap on ``n``, is OpenMP's current limit: all cores unless
    ``OMP_NUM_THREADS`` or ``threadpoolctl.threadpool_limits(..., user_api="openmp")``
    lowers it. Inputs below 2**18 elements always run on one thread. Results do not depend
    on the thread count. A child process forked (``fork()``, multiprocessing's "fork"
    context) runs on one thread: GNU OpenMP's threads do not survive a fork.

    >>> import normcore
    >>> normcore.set_num_threads(1); normcore.get_num_threads()
    1
    >>> normcore.set_num_threads(None)
    """
    global _requested
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n: expected an int or None, got {type(n).__name__}")
        if n < 1:
            raise ValueError(f"n: expected at least 1 thread, got {n}")
    _requested = n


def get_num_threads():
    """Threads a large input runs on now (see :func:`set_num_threads`)."""
    if _forked:
        return 1
    limit = K.max_threads()
    return limit if _requested is None else min(_requested, limit)


def threads_for(size):
    """Threads for a kernel call over ``size`` elements."""
    return 1 if size < GRAIN else get_num_threads()
