"""Masked statistics: what ``mask=`` changes between the kernels.

A mask selects, per element, whether it counts in its group's statistics. The output is
computed everywhere with its group's statistics, so the backward's sums (of dy and
dy * xhat) run over every element as without a mask; only the counts change, per group,
and the dx passes add the statistics terms where the element was counted:

    dx = rstd * (g - m * (mean(g) + xhat * mean(g * xhat))),   means over the counted n

with g = w * dy and m the mask. A group with no counted element has rstd 0 (x̂ = 0, y its
bias) and passes no gradient to x.

The kernels read the mask as one byte per element in x's canonical layout
(:func:`canonical_mask`); the per-partial counts they return merge here, on either
backend's array module (:func:`finalize_counted`).
"""
from __future__ import annotations

import numpy as np

__all__ = ["canonical_mask", "merge_counted", "finalize_counted", "check_counts", "safe_counts"]


def canonical_mask(mask, plan, xp, canonical):
    """``mask`` (boolean, broadcasting to the plan's input shape) as the C-contiguous uint8
    array of ``plan.kernel_shape`` the kernels read (``canonical`` is functional's layout
    function).

    >>> from normcore.modes import get_mode
    >>> from normcore.plan import make_plan
    >>> from normcore.functional import _canonical
    >>> plan = make_plan(get_mode("batch_norm_channels_last"), (2, 3, 4))
    >>> canonical_mask(np.array([[True], [False]])[:, None], plan, np, _canonical).shape
    (6, 4)
    """
    full = mask if mask.shape == plan.shape else xp.broadcast_to(mask, plan.shape)
    return canonical(full, plan, xp).view(xp.uint8)


def merge_counted(xp, pmean, pm2, pcount):
    """Per group (column) of (K, C) partials, each over its own count: ``(mean, m2, n)``,
    the exact merge over the partial means (partials without elements contribute nothing).

    >>> merge_counted(np, np.array([[1.0], [4.0]]), np.array([[0.0], [2.0]]), np.array([[1.0], [2.0]]))
    (array([3.]), array([8.]), array([3.]))
    """
    n = pcount.sum(axis=0)
    if pmean.shape[0] == 1:
        return pmean[0], pm2[0], n
    mean = (pcount * pmean).sum(axis=0) / xp.maximum(n, 1.0)
    m2 = pm2.sum(axis=0) + (pcount * (pmean - mean) ** 2).sum(axis=0)
    return mean, m2, n


def finalize_counted(xp, pmean, pm2, pcount, center, eps, mean, var, rstd):
    """The counted version of the kernels' ``finalize_moments``: partials merged, var =
    m2 / n per group (plus mean^2, mean 0, when not ``center``), rstd = 1/sqrt(var + eps);
    a group without counted elements gets mean 0, var 0, rstd 0. Returns n (C,)."""
    mu, m2, n = merge_counted(xp, pmean, pm2, pcount)
    v = m2 / xp.maximum(n, 1.0)
    bad = ~(xp.isfinite(mu) & xp.isfinite(v))  # no representable variance: NaN, as the kernels
    if not center:
        bad |= ~xp.isfinite(v + mu * mu)
        v = v + mu * mu
        mu = xp.zeros_like(mu)
    counted = n > 0
    mean[...] = xp.where(bad, np.nan, xp.where(counted, mu, 0.0))
    var[...] = xp.where(bad, np.nan, xp.where(counted, v, 0.0))
    rstd[...] = xp.where(counted, 1.0 / xp.sqrt(var + eps), 0.0)
    return n


def check_counts(counts, be, training, has_running, describe):
    """Training with running statistics needs two counted elements in every group (the
    unbiased variance divides by n - 1): a ValueError naming the first group that has
    fewer, raised before any running statistic is written."""
    if not (training and has_running) or counts.size == 0:
        return
    low = be.to_host(counts) < 2
    if low.any():
        g = int(np.argmax(low))
        raise ValueError(f"mask: group {g} has {int(be.to_host(counts)[g])} counted element(s); training with "
                         f"running statistics needs at least 2 per group ({describe})")


def safe_counts(counts, xp):
    """Counts as divisors: a group without counted elements divides by 1 (its rstd is 0,
    so every term it feeds is 0 anyway)."""
    return xp.maximum(counts, 1.0)
