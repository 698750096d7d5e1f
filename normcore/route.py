"""Which kernels a call runs: decided once per call signature, as one :class:`Route`.

A call signature is what the route depends on and nothing else: the mode and its plan (x's
shape, the sizes), the flags (training, estimate, running statistics updated), which
optional arguments are present (weight or bias, mask, residual, a communicator) and what
the backend offers (:class:`Capabilities`). :func:`resolve` turns it into a frozen
``Route``; :mod:`normcore.functional` keeps it with the plan for the signature, executes
its steps and decides nothing else per call. :meth:`Route.kernels` lists the contract
entries each phase runs (the route snapshot test keeps that list for every built-in mode).

Forward steps, in order: ``residual`` (h = x + residual: fused into the statistics pass, or
an add pass of its own first), ``statistics`` (the batch statistics: with the output in
one pass, or as moments merged afterwards), ``update`` (the running statistics), ``output``
(y, where the statistics pass did not write it). Backward: one ``backward`` strategy, and
where ``dh`` joins (in the dx pass, or an add pass after it).
"""
from __future__ import annotations

from math import prod
from typing import NamedTuple

from .plan import Plan, Strategy

__all__ = ["Capabilities", "Route", "resolve"]


class Capabilities(NamedTuple):
    """The optional entries of the kernel contract a backend implements."""

    fused_forward: bool = True   # normalize_groups / normalize_cols: statistics and y in one pass
    fused_backward: bool = True  # backward_groups: one visit per group in training backward
    masked_groups: bool = True   # normalize_groups / backward_groups take mask=
    masked_sums: bool = True     # the sums kernels take mask=

    @classmethod
    def of(cls, be) -> "Capabilities":
        """The capabilities backend ``be`` declares (its class attributes of these names)."""
        return cls(*(bool(getattr(be, f)) for f in cls._fields))


class Route(NamedTuple):
    """The steps one call signature runs (see the module docstring); :meth:`kernels` names
    each entry, with " (mask)" where it reads the mask."""

    empty: bool             # x has no elements (and nothing is exchanged): no kernel runs
    residual: str | None    # None, "fused" (by the statistics pass) or "add" (a pass first)
    statistics: str | None  # None (running statistics only), "groups", "columns" (one pass
    #                         writing y too) or "moments" (moments, then finalized)
    masked: bool            # the batch statistics count the mask's True elements only
    synced: bool            # the moments are exchanged with the other ranks
    counts_ruled: bool      # the masked counts are ruled on (masking.check_counts)
    update: bool            # the running statistics are written
    output: str | None      # None (the statistics pass wrote y), "rows", "inner",
    #                         "running" (from running statistics) or "running inner"
    affine: bool            # a weight or a bias was given
    stats_grad: bool        # backward: the gradient flows through the batch statistics
    backward: str           # "empty", "one visit", "inner", "columns" or "rows"
    mask_given: bool        # backward leaves the mask's False positions out
    leave_out: bool         # ... through inert copies of dy and x (no masked sums)
    dh_in_dx: bool          # backward's dh joins the dx pass (else an add pass after)

    @property
    def late_rules(self) -> bool:
        """A rule needs the statistics (the ranks' exchange, the masked counts): y and h are
        made apart and copied to the caller's arrays once it has passed."""
        return self.synced or self.counts_ruled

    def kernels(self, plan: Plan, dh: bool = False) -> dict:
        """``{"forward": [...], "backward": [...]}``: the contract entries each phase
        calls, in order (``dh``: backward is given one)."""
        return {"forward": _forward_kernels(self, plan), "backward": _backward_kernels(self, plan, dh)}


def resolve(plan: Plan, caps: Capabilities, *, use_batch: bool, estimate: bool,
            update: bool, synced: bool, masked: bool, residual: bool, affine: bool,
            counts_ruled: bool) -> Route:
    """The route of one call signature.

    ``use_batch``: batch statistics are computed (training, or no running statistics);
    ``update``: the running statistics are written; ``synced``: the batch statistics are
    exchanged (a communicator, batch statistics); ``masked``: a mask was given;
    ``affine``: a weight or a bias was given; ``counts_ruled``: masked counts are ruled on
    (training, a mode with running statistics).

    >>> from normcore.plan import make_plan
    >>> from normcore.modes import get_mode
    >>> plan = make_plan(get_mode("batch_norm"), (8, 4))
    >>> r = resolve(plan, Capabilities(), use_batch=True, estimate=False, update=True,
    ...             synced=False, masked=False, residual=False, affine=True, counts_ruled=True)
    >>> r.kernels(plan)["forward"]
    ['normalize_cols', 'update_running']
    """
    strategy = plan.strategy
    synced = synced and use_batch  # eval with running statistics exchanges nothing
    empty = prod(plan.shape) == 0 and not synced
    stats_masked = masked and use_batch
    one_pass = (use_batch and not estimate and not synced and caps.fused_forward
                and (strategy is Strategy.GROUPS or (strategy is Strategy.COLUMNS and not plan.param_inner)))
    if stats_masked:  # the masked one pass takes contiguous groups, where the backend has it
        one_pass = one_pass and strategy is Strategy.GROUPS and caps.masked_groups
    statistics = None
    if use_batch:
        statistics = ("groups" if strategy is Strategy.GROUPS else "columns") if one_pass else "moments"
    residual_step = None
    if residual:
        fused = one_pass and strategy is Strategy.GROUPS and plan.perm is None and not empty
        residual_step = "fused" if fused else "add"
    if not use_batch or estimate:
        output = "running inner" if plan.param_inner and affine else "running"
    elif one_pass:
        output = None
    else:
        output = "inner" if plan.param_inner and affine else "rows"
    stats_grad = use_batch and not estimate
    one_visit = caps.masked_groups if masked else caps.fused_backward
    if empty:
        backward = "empty"
    elif stats_grad and strategy is Strategy.GROUPS and not synced and one_visit:
        backward = "one visit"
    elif plan.param_inner and affine:
        backward = "inner"
    elif strategy is Strategy.COLUMNS and not synced and not masked:
        backward = "columns"
    else:
        backward = "rows"
    return Route(empty=empty, residual=residual_step, statistics=statistics if not empty else None,
                 masked=stats_masked, synced=synced, counts_ruled=stats_masked and counts_ruled,
                 update=update, output=output if not empty else None, affine=affine, stats_grad=stats_grad,
                 backward=backward, mask_given=masked, leave_out=masked and not caps.masked_sums and not empty,
                 dh_in_dx=plan.perm is None and prod(plan.shape) > 0)


_ONE_PASS = {"groups": "normalize_groups", "columns": "normalize_cols"}


def _forward_kernels(r: Route, plan: Plan) -> list:
    ks = []
    if r.residual == "add":
        ks.append("add")
    if r.statistics in ("groups", "columns"):
        ks.append(_ONE_PASS[r.statistics] + (" (mask)" if r.masked else ""))
    elif r.statistics == "moments":
        kind = "cols" if plan.strategy is Strategy.COLUMNS else "rows"
        ks.append("moments_" + kind + (" (mask)" if r.masked else ""))
        if r.synced:  # this rank's moments merged before they travel, the ranks' after
            ks += ["finalize_moments", "(exchange)"]
        ks.append("finalize_moments")
    if r.update:
        ks.append("update_running")
    if r.output in ("running", "running inner"):
        ks += ["running_statistics", "affine_inner"] if r.output == "running inner" else ["normalize_running"]
    elif r.output == "inner":
        ks.append("affine_inner")
    elif r.output == "rows":
        ks += ["row_coefficients", "affine_rows"]
    return ks


def _backward_kernels(r: Route, plan: Plan, dh: bool) -> list:
    ks = []
    b = r.backward
    if b == "empty":
        return ks
    if r.leave_out:
        ks.append("(inert copies)")
    masked = r.mask_given
    sums_mask = " (mask)" if masked and not r.leave_out else ""  # the sums read the mask themselves
    if b == "one visit":
        ks.append("backward_groups" + (" (mask)" if masked else ""))
        if r.affine and not plan.param_inner:
            ks.append("gradient_sums")
    elif b == "inner":
        ks.append("sums_inner" + sums_mask)
        if r.synced:
            ks.append("(exchange)")
        ks.append("dx_inner" + (" (mask)" if masked else ""))
    elif b == "columns":
        ks.append("backward_cols")
    else:
        if r.stats_grad or r.affine or r.synced:  # else no sum is read: dx = dy * rstd
            ks += [("sums_cols" if plan.strategy is Strategy.COLUMNS else "sums_rows") + sums_mask, "gradient_sums"]
        if r.synced:
            ks.append("(exchange)")
        ks += ["dx_coefficients", "dx_rows" + (" (mask)" if masked else "")]
    if dh and not r.dh_in_dx:
        ks.append("add")
    return ks
