"""Where a call's kernels read and write: the execution context of one call (:class:`Run`:
backend, array module, kernels, threads) and the canonical layouts of a plan.

The kernels read x as ``plan.kernel_shape`` (C-contiguous): :func:`canonical` gives that
view, or a transposed copy when the plan permutes axes; :func:`output_rows` is where a
result is written and :func:`in_caller_layout` gives it back in the input's layout.
"""
from __future__ import annotations

import numpy as np

from .kernels import GRAIN
from .plan import Plan

__all__ = ["Run", "shaped", "canonical", "output_rows", "from_canonical", "in_caller_layout", "flat",
           "by_group", "per_row", "group_totals", "add", "group_counts", "partial_counts"]


class Run:
    """Where one call computes: the backend, its array module and kernels, the thread count."""

    __slots__ = ("be", "xp", "K", "threads")

    def __init__(self, be, threads):
        self.be, self.xp, self.K, self.threads = be, be.xp, be.K, threads

    @staticmethod
    def of(be, size):
        if size < GRAIN:  # small inputs run on one thread: one shared record per backend
            run = _SERIAL.get(be)
            if run is not None and run.K is be.K:
                return run
        threads = be.threads_for(size)
        if threads != 1:
            return Run(be, threads)
        run = _SERIAL[be] = Run(be, 1)
        return run

    def ix(self, plan, name):
        """The plan's index array ``name`` (rg, rp, rc) on this backend."""
        return self.be.index(plan, name)

    def params_ix(self, plan):
        """rp, or (no parameters) any index of the right length: it is never read then."""
        return self.be.index(plan, "rp" if plan.rp is not None else "rg")


_SERIAL: dict = {}


def group_counts(plan: Plan, be):
    """(C,) float64: the elements of each statistics group -- the counts of an unmasked
    call (a masked one counts its own), kept per plan on ``be``."""
    return be.constant(plan, "group counts", lambda: _fixed(np.full(plan.layout[1], float(plan.count))))


def partial_counts(plan: Plan, be):
    """(K, C) float64: the elements behind each of the plan's partial moments (row blocks
    of the column strategy, rows of the rows strategy, a group's rows when scattered), per
    group -- as the masked moments kernels count them."""
    return be.constant(plan, "partial counts",
                       lambda: _fixed(np.repeat(plan.partial_counts[:, None], plan.layout[1], axis=1)))


def _fixed(a):
    a.setflags(write=False)
    return a


def shaped(a, shape):
    """``a`` viewed as ``shape``: itself when it has that shape already (each reshape makes
    a view object, which small calls notice)."""
    return a if a.shape == shape else a.reshape(shape)


def canonical(a, plan: Plan, xp=np):
    """``a`` as a C-contiguous array of ``plan.kernel_shape``; a view when no copy is needed."""
    if plan.perm is None:
        if type(a) is xp.ndarray and a.flags.c_contiguous:
            return shaped(a, plan.kernel_shape)
        return xp.ascontiguousarray(a).reshape(plan.kernel_shape)  # subclasses (np.matrix) become arrays
    e = a.reshape(plan.elem_shape).transpose(plan.perm)
    return xp.ascontiguousarray(e).reshape(plan.kernel_shape)


def output_rows(out, plan: Plan, dtype, xp=np):
    """Where the kernels write y or dx: ``out``, or a new array of x's shape, when no
    transpose follows (the elementwise kernels read their output's data, not its shape);
    else a new (A, R, S) array."""
    if plan.perm is None:
        return xp.empty(plan.shape, dtype) if out is None else out
    return xp.empty(plan.rows, dtype)


def from_canonical(a3, plan: Plan, xp=np):
    if plan.perm is None:
        return a3.reshape(plan.shape)
    moved = a3.reshape([plan.elem_shape[i] for i in plan.perm])
    return xp.ascontiguousarray(moved.transpose(tuple(np.argsort(plan.perm)))).reshape(plan.shape)


def in_caller_layout(rows, plan: Plan, out, xp=np):
    """The result the kernels wrote into :func:`output_rows`'s array, in the input's layout
    (in ``out`` when given)."""
    if plan.perm is None:
        return rows
    if out is None:
        return from_canonical(rows, plan, xp)
    out[...] = from_canonical(rows, plan, xp)
    return out


def flat(a, be):
    """A parameter as the kernels read it: 1-D and C-contiguous (a view when it is)."""
    if a.ndim == 1 and a.flags.c_contiguous:
        return a
    return be.xp.ascontiguousarray(a).reshape(-1)


def by_group(p, plan: Plan, xp):
    """Per-row partials of a scattered plan reordered to (partials of a group, C)."""
    row_shape = plan.elem_shape[:len(plan.scattered)]
    return xp.ascontiguousarray(p.reshape(row_shape).transpose(plan.scattered)).reshape(-1, plan.layout[1])


def per_row(values, plan: Plan, run: Run):
    """Per-group values spread to rows (``values`` itself when each row is its group)."""
    return values if run.be.is_identity(plan, "rg", len(values)) else values[run.ix(plan, "rg")]


def group_totals(values, plan: Plan, run: Run):
    """Per-row values summed into their statistics group (bincount adds in row order)."""
    C = plan.layout[1]
    if run.be.is_identity(plan, "rg", C) and len(values) == C:
        return values
    return run.xp.bincount(run.ix(plan, "rg"), weights=values, minlength=C)


def add(be, a, b, out=None):
    """``a + b`` (arrays of backend ``be``, one shape and dtype) from the ``add`` kernel:
    rounded as NumPy's ``a + b``, on the backend's threads. Returns ``out`` (C-contiguous,
    a's shape and dtype; it may be a itself, else it overlaps neither) or a new C-contiguous
    array.

    >>> import numpy as np
    >>> from normcore.backend import CPU
    >>> add(CPU, np.ones(3, np.float32), np.arange(3, dtype=np.float32)).tolist()
    [1.0, 2.0, 3.0]
    """
    xp = be.xp
    a, b = xp.ascontiguousarray(a), xp.ascontiguousarray(b)
    if out is None:
        out = xp.empty(a.shape, a.dtype)
    run = Run.of(be, a.size)
    run.K.add(a=a, b=b, out=out, threads=run.threads)
    return out
