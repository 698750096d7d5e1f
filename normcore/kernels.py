"""Which build of the compiled kernels runs: the AVX2 one where the CPU has AVX2 and FMA,
else the baseline one. Both come from the same source (src/normcore/kernels.pxi) and give
bitwise identical results; ``NORMCORE_KERNELS=baseline`` forces the baseline build.
"""
from __future__ import annotations

import os

__all__ = ["K", "VARIANT", "set_num_threads", "get_num_threads", "threads_for"]


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
    try:
        from . import _kernels
    except ImportError:
        raise ImportError(_not_built_message()) from None
    return _kernels, "baseline"


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


# Below this many elements a kernel runs on one thread: the work (tens of microseconds)
# does not repay waking a team, and OpenMP workers busy-waiting after it would compete
# with the caller's BLAS threads between calls (small-batch training interleaves both).
GRAIN = 1 << 18

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
