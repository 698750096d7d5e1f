"""Masked statistics: what ``mask=`` changes between the kernels.

A mask selects, per element, whether it counts in its group's statistics. The output is
computed everywhere with its group's statistics, but the masked-out positions are not
data: backward gives the gradient of the call on ``x[mask]`` alone. Its sums run over the
counted elements only (kernels that take ``mask=``; a backend whose sums read no mask gets
dy and x made inert first, backward_route's ``_leave_out``), so masked-out positions add
nothing whatever they hold (NaN padding included), and the dx passes write 0 there; the
counts are per group and the dx passes add the statistics terms where counted:

    dx = rstd * (g - m * (mean(g) + xhat * mean(g * xhat))),   means over the counted n

with g = w * dy (0 where not counted) and m the mask. A group with no counted element has
rstd 0 (x̂ = 0, y its bias) and passes no gradient to x.

The kernels read a mask as bytes (nonzero: counted) by rows of their own view of x: rows
of S elements of the (A, R, S) layout, or of C elements of the column strategy's (A, C).
:func:`mask_rows` gives, once per (plan, mask shape), where each row's bytes start in the
caller's own (compact) mask and whether they advance along the row (step 1) or the row
shares one byte (step 0: a (B, T, 1) mask over a channels-last (B, T, C) batch); so a
mask that broadcasts is never expanded to x's size. Where no such description exists the
mask is expanded in the canonical layout (offsets r * S, step 1). The counts per partial
that the masked kernels return merge in the kernels' ``finalize_moments``, as the constant
counts of an unmasked call do: a masked call differs in its counts alone.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .bounded import PlanArrays
from .layout import canonical

__all__ = ["MaskRows", "mask_rows", "check_counts"]


class MaskRows(NamedTuple):
    """A mask as the kernels read it (their ``mask`` argument): row r's bytes start at
    ``base[offsets[r]]`` and advance by ``step`` (0 or 1) per element."""

    base: object     # uint8, C-contiguous: the caller's mask, or its expansion
    offsets: object  # intp (rows,) on the mask's backend
    step: int


# (plan, mask shape) -> (host offsets, step), or None where the mask must be expanded;
# kept while the plan lives (the plan cache decides), within LAYOUT_CACHE_BYTES in all
LAYOUT_CACHE_BYTES = 64 << 20
_LAYOUTS = PlanArrays(LAYOUT_CACHE_BYTES)


def kernel_rows(plan):
    """(rows, row length) of the plan's kernels: (A, C) for the column strategy, else
    (A * R, S)."""
    from .plan import Strategy
    A, R, S = plan.rows
    return (A, R) if plan.strategy is Strategy.COLUMNS else (A * R, S)


def _layout(plan, mshape):
    """Where each kernel row of a mask of shape ``mshape`` (broadcast to the plan's input)
    starts in the mask's C-ordered elements, and its step; None when the row's elements
    are neither consecutive nor one."""
    return _LAYOUTS.get(plan, mshape, lambda: _find_layout(plan, mshape))


def _find_layout(plan, mshape):
    n_rows, length = kernel_rows(plan)
    flat = np.arange(int(np.prod(mshape)), dtype=np.intp).reshape(mshape)
    # the mask's element indices seen through the plan's own view of x: splitting axes
    # and transposing keep a view, so only the row starts are ever materialized
    e = np.broadcast_to(flat, plan.shape).reshape(plan.elem_shape)
    if plan.perm is not None:
        e = e.transpose(plan.perm)
    tail, size = len(e.shape), 1
    while tail > 0 and size < length:
        tail -= 1
        size *= e.shape[tail]
    found = None
    if size == length:
        strides = [st // e.itemsize for d, st in zip(e.shape[tail:], e.strides[tail:]) if d > 1]
        dims = [d for d in e.shape[tail:] if d > 1]
        step = None
        if all(st == 0 for st in strides):
            step = 0
        elif all(st == int(np.prod(dims[i + 1:])) for i, st in enumerate(strides)):
            step = 1
        if step is not None:
            starts = e[(Ellipsis,) + (0,) * (len(e.shape) - tail)]
            found = (np.ascontiguousarray(starts).reshape(n_rows), step)
    return found


def mask_rows(mask, plan, be):
    """``mask`` (boolean, broadcasting to the plan's input shape) as :class:`MaskRows`.

    >>> from normcore.backend import CPU
    >>> from normcore.modes import get_mode
    >>> from normcore.plan import make_plan
    >>> plan = make_plan(get_mode("batch_norm_channels_last"), (2, 3, 4))
    >>> m = mask_rows(np.array([[True, True, False], [True, False, False]])[..., None], plan, CPU)
    >>> m.offsets.tolist(), m.step
    ([0, 1, 2, 3, 4, 5], 0)
    """
    xp = be.xp
    mshape = (1,) * (len(plan.shape) - mask.ndim) + tuple(mask.shape)
    n_rows, length = kernel_rows(plan)
    layout = None if mask.size == np.prod(plan.shape) else _layout(plan, mshape)
    if layout is None:  # expanded: the canonical layout, row r at r * length
        full = mask if mask.shape == plan.shape else xp.broadcast_to(mask, plan.shape)
        base = canonical(full, plan, xp).view(xp.uint8)
        offsets = be.constant(plan, "mask rows", lambda: np.arange(n_rows, dtype=np.intp) * length)
        return MaskRows(base, offsets, 1)
    host, step = layout
    base = xp.ascontiguousarray(mask).reshape(-1).view(xp.uint8)
    return MaskRows(base, be.constant(plan, ("mask rows", mshape), lambda: host), step)


def check_counts(counts, be, ruled, updates, describe):
    """The rule on counts that holds with or without a mask: in training, a mode with
    running statistics (``ruled``) refuses a group with exactly one counted element (its
    variance is no statistic: unmasked, x.shape's one value per group is refused the
    same way), and a call that updates running statistics (``updates``; the unbiased
    variance divides by n - 1) refuses a group with none. A ValueError naming the first
    such group, raised before any caller-visible array is written. Otherwise a group
    with no counted element is empty: mean 0, rstd 0."""
    if not ruled or counts.size == 0:
        return
    host = be.to_host(counts)
    low = (host < 2) if updates else (host == 1)
    if low.any():
        g = int(np.argmax(low))
        need = "at least 2 per group" if updates else "more than 1 per group (or none)"
        raise ValueError(f"mask: group {g} has {int(host[g])} counted element(s); training "
                         f"{'with running statistics ' if updates else ''}needs {need} ({describe})")
