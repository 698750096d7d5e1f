"""Batch statistics synchronized across processes: the exchange behind ``comm=``.

Data-parallel training splits a batch across processes (MPI ranks). A mode whose
statistics reduce over the batch axis can then be normalized with the statistics of the
whole batch: ``normalize(x, mode, comm=comm)`` and ``backward`` exchange a few numbers per
statistics group, and every rank gets exactly what one process would compute on the
concatenated batch (up to floating-point rounding of the merge).

Protocol
--------
* One collective per forward and one per backward, each an ``allgather`` of a small
  payload (count, mean and centred sum of squares per group forward; the per-group sums
  of dy and dy * xhat and the parameter gradients backward), merged on every rank in rank
  order, in float64, so all ranks hold bit-identical statistics and running statistics.
* Eval mode with running statistics communicates nothing.
* Input errors do not deadlock: every check runs before the exchange, and a rank whose
  check fails still takes part in the collective, carrying its error instead of data.
  Its peers then raise :class:`SyncError` naming the rank and its message, and the rank
  itself raises its own error. Any failure before or inside the exchange is carried this
  way (a ``MemoryError``, a ``RuntimeError`` such as a backward before any forward), not
  only input errors. Ranks that disagree on the group structure, the dtype, the mode,
  ``eps``, ``estimate``, the parameters given, whether running statistics are given and
  updated (and then ``momentum`` / ``decay`` and ``unbiased``) raise ``ValueError`` on
  every rank, after the one exchange (backward: the parameters given and the mask). Nothing (running statistics included) is written when any rank fails.
* What cannot be detected: ranks that make *different collective calls* (one in training
  mode with ``comm``, another in eval mode or without ``comm``) wait for each other forever,
  as in any MPI program. Call the layers in the same order on every rank.

``comm`` is any object with mpi4py's ``allgather(obj) -> list`` (an ``mpi4py.MPI.Comm``);
normcore never imports mpi4py itself except for :class:`normcore.SyncBatchNorm`'s default
communicator.
"""
from __future__ import annotations

import pickle
import time

import numpy as np

from .checks import describe_mode

__all__ = ["SyncError", "traffic", "reset_traffic"]


class SyncError(ValueError):
    """Another rank rejected its input, so this collective call cannot complete."""


_TRAFFIC = {"forward": [0, 0, 0.0], "backward": [0, 0, 0.0]}  # calls, bytes sent, seconds


def traffic() -> dict:
    """Exchanges made by this process so far: ``{"forward": {"calls", "bytes", "seconds"},
    "backward": {...}}``. Bytes are what this rank sent (its pickled payload); each call
    receives that much from every other rank.

    >>> traffic()["forward"]["calls"] >= 0
    True
    """
    return {k: {"calls": c, "bytes": b, "seconds": s} for k, (c, b, s) in _TRAFFIC.items()}


def reset_traffic() -> None:
    """Zero the counters of :func:`traffic`."""
    for v in _TRAFFIC.values():
        v[:] = [0, 0, 0.0]


def check_comm(comm):
    if not callable(getattr(comm, "allgather", None)) or not callable(getattr(comm, "Get_rank", None)):
        raise TypeError(f"comm: expected an mpi4py communicator (with allgather and Get_rank), "
                        f"got {type(comm).__name__}")


class Exchange:
    """The single collective of one forward or backward call."""

    def __init__(self, comm, direction: str):
        self.comm = comm
        self.direction = direction
        self.done = False

    def _allgather(self, payload):
        self.done = True
        counters = _TRAFFIC[self.direction]
        counters[0] += 1
        counters[1] += len(pickle.dumps(payload, pickle.HIGHEST_PROTOCOL))
        t0 = time.perf_counter()
        parts = self.comm.allgather(payload)
        counters[2] += time.perf_counter() - t0
        return parts

    def fail(self, exc: BaseException) -> None:
        """Take part in the collective carrying ``exc`` (once, and only if not done)."""
        if not self.done:
            self._allgather(("error", type(exc).__name__, str(exc)))

    def gather(self, signature, arrays):
        """Every rank's ``arrays``, in rank order, after checking that no rank failed and
        that all ranks agree on ``signature`` (a tuple of (name, value) pairs)."""
        parts = self._allgather(("ok", signature, arrays))
        failed = [(r, p) for r, p in enumerate(parts) if p[0] == "error"]
        if failed:
            rank, (_, kind, msg) = failed[0]
            raise SyncError(f"rank {rank} of {len(parts)} rejected its input ({kind}: {msg}); "
                            f"no statistics were exchanged in this {self.direction} call")
        for r, p in enumerate(parts):
            if p[1] != signature:
                diff = [f"{name} {mine!r} here (rank {self.comm.Get_rank()}) but {theirs!r} on rank {r}"
                        for (name, mine), (_, theirs) in zip(signature, p[1]) if mine != theirs]
                raise ValueError(f"comm: ranks disagree: {'; '.join(diff) or p[1]}")
        return [p[2] for p in parts]


# ---------------------------------------------------------------------------------------
# The exchanges of normcore.functional
# ---------------------------------------------------------------------------------------

def check_batch_mode(mode, x):
    """Synchronizing needs statistics that reduce over x's first (batch) axis."""
    first = mode.parsed.lhs[0]
    if any(a in mode.parsed.kept for a in first) or (first == ("...",) and x.ndim < len(mode.parsed.lhs)):
        raise ValueError(f"comm: {describe_mode(mode)} keeps x's first axis in its statistics, so there "
                         "is no batch to synchronize; pass comm only to modes that reduce over it")


def synced_moments(link, local_moments, plan, mode, dtype, training, be, masked, settings=()):
    """Moments of the batch split across ``link``'s ranks, as ``(pmean, pm2, pcount,
    total)`` with one partial row (C,) per rank, in rank order, for the kernels'
    ``finalize_moments`` to merge (exactly, in float64, as the partials of one process:
    every rank gets the same bits): each rank's per-group elements, mean and centred sum
    of squares, its own partials merged first by ``local_moments()``'s finalize. Without a
    mask a rank's elements per group are one number and ``total`` is their sum over the
    ranks; with one, each rank counts per group (ranks may mask differently; all pass a
    mask, or none) and ``total`` is None. The few numbers per group travel through host
    memory (GPU arrays included)."""
    C = plan.layout[1]
    if plan.count and C:
        pmean, pm2, pcount = local_moments()
        mean, var, rstd, n = (be.xp.empty(C) for _ in range(4))
        be.K.finalize_moments(part_mean=pmean, part_m2=pm2, part_count=pcount, center=True, eps=1.0, mean=mean,
                              var=var, rstd=rstd, counts=n)
        n = be.to_host(n) if masked else plan.count
        local = (n, be.to_host(mean), be.to_host(var) * n)
    else:
        local = (np.zeros(C) if masked else 0, np.zeros(C), np.zeros(C))
    parts = link.gather(_signature(mode, plan, dtype, training, settings, masked=masked), local)
    pcount = np.stack([np.broadcast_to(np.asarray(p[0], np.float64), (C,)) for p in parts])
    pmean, pm2 = np.stack([p[1] for p in parts]), np.stack([p[2] for p in parts])
    total = None if masked else int(sum(p[0] for p in parts))
    return be.from_host(pmean), be.from_host(pm2), be.from_host(pcount), total


def _signature(mode, plan, dtype, training, settings, masked):
    return (("mode", mode.spec), ("statistics shape", plan.stat_shape), ("dtype", dtype.name),
            ("training", bool(training)), ("mask given", masked)) + tuple(settings)


def sum_over_ranks(link, cache, arrays, be):
    """Element-wise sums of ``arrays`` over the ranks, added in rank order on the host so
    that every rank holds the same bits."""
    local = tuple(be.to_host(a) for a in arrays)
    parts = link.gather((("mode", cache.mode.spec), ("centred", cache.mode.center),
                         ("statistics shape", cache.plan.stat_shape), ("dtype", cache.dtype.name),
                         ("elements per group", cache.count), ("weight given", cache.has_weight),
                         ("bias given", cache.has_bias), ("gradient through the statistics", cache.stats_grad),
                         ("mask given", cache.mask is not None)), local)
    return tuple(be.from_host(np.sum([p[i] for p in parts], axis=0)) for i in range(len(arrays)))
