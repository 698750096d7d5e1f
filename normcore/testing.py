"""Property checks for any normalization mode, and an in-process communicator.

Hypothesis is imported only by the property checks (:func:`check_mode`, the strategies
:func:`mode_cases`, :func:`float_arrays`, :func:`random_modes` and :data:`PROPERTIES`),
on their first use; without it they raise ``ModuleNotFoundError`` saying
``pip install "normcore[testing]"``. :data:`TOLERANCE`, :func:`assert_close`,
:class:`ThreadComm` and :func:`run_ranks` need only NumPy.

A user who registers a mode proves it in their own suite with one call::

    import normcore, normcore.testing
    normcore.register_mode("my_norm", "b t (h d) -> b h", params="(h d)")
    def test_my_norm():
        normcore.testing.check_mode("my_norm", h=2)

:func:`check_mode` runs, on random shapes (1-sized axes included), both float dtypes and
random data (Gaussian with offsets and scales, and small integers that make ties and
constant groups):

* forward (training, eval, estimated) and running-statistic updates match the float64
  reference in :mod:`normcore.reference`;
* the normalized output has per-group mean 0 and variance var / (var + eps) (centred);
* y is invariant to adding a per-group constant (centred) and to positive per-group
  scaling of x with eps scaled alongside;
* backward matches the reference and a float64 central difference of the kernels'
  own forward; for centred modes dx sums to zero over every group;
* :func:`normcore.add_normalize` is normalize of NumPy's x + residual, bitwise (y, h, the
  running statistics), and its backward with ``dh`` is backward's dx + dh, bitwise.

Tolerances: float32 results stay within 3x the error of one rounding of the exact result
(the float32 accuracy contract, README "Numerics"), so they are held to 2e-6 of the
largest reference magnitude (about 30 float32 rounding units, covering the
spread of magnitudes within one array); float64 to 1e-10 (double accumulation over at
most a few thousand elements). Where a result is a difference of larger terms (dx, and
dweight at an offset), the magnitude is that of the terms: see
:func:`normcore.reference.term_scales`.
"""

from __future__ import annotations

import importlib
import pickle
import sys
import threading

import numpy as np

__all__ = ["TOLERANCE", "assert_close", "ThreadComm", "run_ranks",
           "mode_cases", "float_arrays", "random_modes", "check_mode", "PROPERTIES"]

# Names served by normcore._properties, which imports Hypothesis.
_LAZY = frozenset(["mode_cases", "float_arrays", "random_modes", "check_mode", "PROPERTIES",
                   "prop_forward_matches_reference", "prop_normalized_moments", "prop_invariances",
                   "prop_backward_matches_reference", "prop_central_difference", "prop_add_normalize"])


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        props = importlib.import_module("normcore._properties")
    except ModuleNotFoundError as e:
        if e.name != "hypothesis":
            raise
        raise ModuleNotFoundError(
            f"normcore.testing.{name} needs Hypothesis, which is not installed: "
            f'pip install "normcore[testing]" (or pip install hypothesis)', name="hypothesis") from None
    return getattr(props, name)


def __dir__():
    return sorted(set(globals()) | _LAZY)


def _in_hypothesis_test():
    hypothesis = sys.modules.get("hypothesis")  # not imported: certainly not in one of its tests
    return hypothesis is not None and hypothesis.currently_in_test_context()


# Relative to max(1, max|expected|, scale). The half dtypes' are twice the floor of one
# rounding to the dtype (half a unit in the last place: 2^-11 for float16, 2^-8 for bfloat16).
TOLERANCE = {np.dtype(np.float32): 2e-6, np.dtype(np.float64): 1e-10, np.dtype(np.float16): 2.0 ** -10}
try:
    import ml_dtypes

    TOLERANCE[np.dtype(ml_dtypes.bfloat16)] = 2.0 ** -7
except ImportError:  # bfloat16 exists only with ml_dtypes
    pass


def assert_close(actual, expected, dtype, what, scale=0.0):
    """Assert max|actual - expected| <= TOLERANCE[dtype] * max(1, max|expected|, scale).

    >>> assert_close(np.float32([1.0, 2.0]), np.array([1.0, 2.0000001]), np.float32, "y")
    """
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if expected.size == 0:
        return
    scale = max(1.0, float(np.abs(expected).max()), scale)
    err = float(np.abs(actual - expected).max()) / scale
    if _in_hypothesis_test():  # also usable from a plain (non-Hypothesis) test
        from hypothesis import note
        note(f"{what}: relative error {err:.3g} (tolerance {TOLERANCE[np.dtype(dtype)]:.1g})")
    assert err <= TOLERANCE[np.dtype(dtype)], f"{what}: relative error {err:.3g} for {np.dtype(dtype)}"


class ThreadComm:
    """An in-process stand-in for an mpi4py communicator, for testing ``comm=`` code
    without MPI: :func:`run_ranks` runs one function per rank in threads, each given its
    ``ThreadComm``. ``allgather`` copies payloads through pickle, as MPI does, and a rank
    that never arrives breaks the barrier after ``timeout`` seconds instead of hanging.

    >>> run_ranks(3, lambda comm: comm.allgather(comm.Get_rank()))
    [[0, 1, 2], [0, 1, 2], [0, 1, 2]]
    """

    def __init__(self, rank, size, barrier, slots):
        self._rank, self._size, self._barrier, self._slots = rank, size, barrier, slots

    def Get_rank(self):
        return self._rank

    def Get_size(self):
        return self._size

    def allgather(self, obj):
        self._slots[self._rank] = pickle.dumps(obj)
        self._barrier.wait()
        parts = [pickle.loads(b) for b in self._slots]
        self._barrier.wait()  # nobody overwrites a slot before everyone has read it
        return parts


def run_ranks(size, fn, timeout=30.0):
    """Call ``fn(comm)`` on ``size`` threads with :class:`ThreadComm` communicators; return
    the per-rank results, with an exception in place of the result of a rank that raised."""
    barrier = threading.Barrier(size, timeout=timeout)
    slots = [None] * size
    results = [None] * size

    def run(rank):
        try:
            results[rank] = fn(ThreadComm(rank, size, barrier, slots))
        except Exception as e:  # handed back to the caller, per rank
            results[rank] = e

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results
