"""Caches of arrays that depend on a plan alone, bounded in bytes.

Some arrays are derived from a plan and an argument's shape, and are worth keeping while
the same call repeats: the per-partial counts, a broadcast mask's row offsets, a plan's
index arrays copied to a GPU. The number of distinct argument shapes is the user's (a
mask of each sequence length, say), so such a cache must not grow with them:
:class:`PlanArrays` keeps at most ``max_bytes`` of arrays, least recently used out, and
forgets a plan's arrays when the plan itself is freed (the plan cache decides a plan's
life; see :mod:`normcore.plan`).
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

__all__ = ["PlanArrays", "nbytes"]


def nbytes(value) -> int:
    """Bytes held by ``value``: an array's, the sum over a tuple's arrays, else 0."""
    if isinstance(value, tuple):
        return sum(nbytes(v) for v in value)
    return int(getattr(value, "nbytes", 0))


class PlanArrays:
    """``get(plan, key, make)``: the value made by ``make()`` for (plan, key), kept while
    the plan lives and the bytes of all values kept stay within ``max_bytes`` (the value
    just made is returned even when it alone is larger; it is then not kept).

    >>> import numpy as np
    >>> class P: pass
    >>> cache, plan = PlanArrays(100), P()
    >>> a = cache.get(plan, "k", lambda: np.zeros(10))   # 80 bytes: kept
    >>> cache.get(plan, "k", lambda: np.ones(10)) is a, cache.bytes
    (True, 80)
    >>> b = cache.get(plan, "k2", lambda: np.zeros(10))  # 160 bytes: "k" goes
    >>> cache.bytes, len(cache)
    (80, 1)
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._lru: OrderedDict = OrderedDict()  # (id(plan), key) -> (value, its bytes)
        self._keys: dict = {}                    # id(plan) -> (weakref to plan, its keys)
        # calls from several threads share it; reentrant, as a plan freed while it is held
        # (a collection inside get) calls _forget
        self._lock = threading.RLock()

    def __len__(self):
        return len(self._lru)

    def get(self, plan, key, make):
        k = (id(plan), key)
        with self._lock:
            hit = self._lru.get(k)
            if hit is not None:
                self._lru.move_to_end(k)
                return hit[0]
        value = make()
        size = nbytes(value)
        if size > self.max_bytes:
            return value
        with self._lock:
            if k in self._lru:  # another thread made it meanwhile
                return self._lru[k][0]
            entry = self._keys.get(id(plan))
            if entry is None:
                ref = weakref.ref(plan, lambda _, pid=id(plan): self._forget(pid))
                entry = self._keys[id(plan)] = (ref, set())
            entry[1].add(key)
            self._lru[k] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                (pid, old), (_, old_size) = self._lru.popitem(last=False)
                self.bytes -= old_size
                self._keys[pid][1].discard(old)
        return value

    def _forget(self, pid):
        """The plan ``pid`` was freed: drop its values."""
        with self._lock:
            _, keys = self._keys.pop(pid, (None, ()))
            for key in keys:
                _, size = self._lru.pop((pid, key), (None, 0))
                self.bytes -= size
