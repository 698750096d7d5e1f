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
  itself raises its own ``ValueError``/``TypeError``. Ranks that disagree on the group
  structure, the dtype or the mode raise ``ValueError`` on every rank, after the one
  exchange. Nothing (running statistics included) is written when any rank fails.
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

    def fail(self, exc: Exception) -> None:
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
