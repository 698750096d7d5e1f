"""The backward of a forward call, as its route says: gradient sums → (sums over ranks) →
dx coefficients → dx, or one visit per group; dh added by the dx pass or after it."""
from __future__ import annotations

import numpy as np

from . import _steady, program, sync
from .backend import AffineKind
from .layout import Run, add, canonical, group_totals, in_caller_layout, output_rows, per_row, shaped
from .plan import Strategy

__all__ = ["run_backward"]


def run_backward(dy, cache, out, link, dh=None):
    be, plan = cache.backend, cache.plan
    xp = be.xp
    view = cache.view
    if view is not None:  # a form's call on reshaped arrays: the mode's shapes inside
        dy = dy.reshape(plan.shape)
    ps = cache.programs
    if ps is not None and _programs_take(ps, dy, dh, out):
        dx, dw, db = _steady.run_backward(cache, dy, None if dh is None else dh.reshape(plan.shape),
                                          None if out is None else shaped(out, plan.shape))
        if view is not None:
            dx = dx.reshape(view[0]) if out is None else out
        return (dx,) + _param_gradients(cache, dw, db)
    x3 = cache.x3
    route = cache.route
    strategy = route.backward
    if route.leave_out:
        dy, x3 = _leave_out(dy, cache, xp)  # the backend's sums read no mask: made inert first
    dy3 = canonical(dy, plan, xp)
    dx_rows = output_rows(None if out is None else shaped(out, plan.shape), plan, cache.dtype, xp)
    run = Run.of(be, dy3.size)
    dh3 = None
    if dh is not None and route.dh_in_dx:  # added by the dx pass itself
        dh3, dh = canonical(dh.reshape(plan.shape), plan, xp), None
    if strategy == "empty":  # nothing flows: zero parameter gradients
        dw = db = xp.zeros(plan.param_size if (cache.has_weight or cache.has_bias) else 0)
    elif strategy == "one visit":
        dw, db = _backward_one_visit(dy3, x3, cache, dx_rows, run, dh3)
    elif strategy == "inner":
        dw, db = _backward_inner(shaped(dy3, plan.rows), x3, cache, dx_rows, run, link, dh3)
    elif strategy == "columns":
        dw, db = _backward_columns(dy3, x3, cache, dx_rows, run, dh3)
    else:
        dw, db = _backward_rows(shaped(dy3, plan.rows), x3, cache, dx_rows, run, link, dh3)
    dx = in_caller_layout(dx_rows, plan, out if out is None or view is None else out.reshape(plan.shape), xp)
    if view is not None:
        dx = dx.reshape(view[0]) if out is None else out
    if dh is not None:  # a transposing plan: dx (C-contiguous, the caller's layout) += dh
        add(be, dx, dh, dx)
    return (dx,) + _param_gradients(cache, dw, db)


def _param_gradients(cache, dw, db):
    """(dweight, dbias) from the (P,) float64 sums: the parameters' shape and dtype, None
    for one the forward did not have."""
    pshape = cache.plan.param_shape if cache.view is None else cache.view[1]
    dweight = dbias = None
    if cache.has_weight:
        dweight = (dw if len(pshape) == 1 else dw.reshape(pshape)).astype(cache.param_dtype)
    if cache.has_bias:
        dbias = (db if len(pshape) == 1 else db.reshape(pshape)).astype(cache.param_dtype)
    return dweight, dbias


def _programs_take(ps, dy, dh, out) -> bool:
    """Whether the forward's programs (normcore.program) run this backward: the arrays as
    the kernels read them, a program for dh when one is given."""
    return (program.ENABLED and type(dy) is np.ndarray and dy.flags.c_contiguous
            and (dh is None or (ps.backward_dh is not None and type(dh) is np.ndarray and dh.flags.c_contiguous))
            and (out is None or type(out) is np.ndarray))


def _mask_args(cache, run: Run):
    """The sums kernels' mask arguments: the forward's mask where the backend's sums read
    one (they then leave the masked-out positions out), else none."""
    m = cache.mask
    if m is None or cache.route.leave_out:
        return _NO_MASK
    return m.kernel_args()


_NO_MASK: dict = {}  # read only


def _leave_out(dy, cache, xp):
    """(dy, x3) with the positions the forward's mask left out made inert: dy 0 there and
    x 0, so that they add exactly nothing to any gradient sum (whatever x holds there, NaN
    padding included) and receive dx = 0 -- the gradient of the call on ``x[mask]``. dy
    comes back in the forward input's layout (plan.shape), x3 in the canonical one."""
    plan = cache.plan
    mask = cache.not_data
    dy = xp.where(mask, dy.reshape(plan.shape), xp.zeros((), cache.dtype))
    if plan.perm is None:  # the canonical layout is a view of plan.shape: broadcast there
        x = xp.where(mask, cache.x3.reshape(plan.shape), xp.zeros((), cache.dtype))
        return dy, x.reshape(plan.kernel_shape)
    counted = canonical(xp.broadcast_to(mask, plan.shape), plan, xp)
    return dy, xp.where(counted, cache.x3, xp.zeros((), cache.dtype))


def _weight_or_dummy(cache, run: Run):
    """The forward's weight as the row kernels read it, a placeholder when there was none."""
    return cache.weight if cache.has_weight else run.dummy(cache.plan, cache.param_dtype)


def _param_grads(cache, run: Run):
    """Zeroed (P,) dweight/dbias accumulators, or empty ones when forward had no parameters."""
    P = cache.plan.param_size if (cache.has_weight or cache.has_bias) else 0
    return run.xp.zeros(P), run.xp.zeros(P)


def _backward_one_visit(dy3, x3, cache, dx_rows, run: Run, dh3=None):
    """Training backward when every group is contiguous: its sums and its dx (plus dh3
    when given) in one visit."""
    plan, xp = cache.plan, run.xp
    R, C = plan.rows[1], plan.layout[1]
    affine = AffineKind.NONE
    if cache.has_weight or cache.has_bias:
        affine = AffineKind.INNER if plan.param_inner else AffineKind.ROW
    P = plan.param_size if affine else 1
    row_dy, row_dyx = xp.empty(R), xp.empty(R)
    partials = (plan.param_blocks, P) if affine is AffineKind.INNER else (1, 1)
    pdw, pdb = xp.zeros(partials), xp.zeros(partials)
    rp = run.params_ix(plan)
    w64 = cache.weight_f64() if cache.has_weight else xp.ones(P)
    masked = _NO_MASK if cache.mask is None else cache.mask.kernel_args()
    run.K.backward_groups(dy3, x3, R // C, cache.mode.center, int(affine), rp, w64, cache.mean, cache.rstd,
                          cache.counts, plan.groups_per_block, row_dy, row_dyx, pdw, pdb, dh3, dx_rows, run.threads,
                          **masked)
    if affine is AffineKind.INNER:
        return pdw.sum(axis=0), pdb.sum(axis=0)
    if affine is AffineKind.ROW:
        dw, db = _param_grads(cache, run)
        w = _weight_or_dummy(cache, run)
        run.K.gradient_sums(row_dy.reshape(1, R), row_dyx.reshape(1, R), run.ix(plan, "rg"), rp, w, cache.has_weight,
                            cache.rstd, xp.empty(C), xp.empty(C), dw, db)
        return dw, db
    return None, None


def _backward_inner(dy_rows, x3, cache, dx_rows, run: Run, link=None, dh3=None):
    """Parameters along the rows (layer norm) outside the one-visit case. With ``link``,
    the group sums and parameter gradients are summed over its ranks.

    Sums: row_g / row_gx per row, group_g / group_gx per group, of g = w * dy and g * xhat;
    mean_g / mean_gx their group means, per row."""
    plan, xp = cache.plan, run.xp
    R, P = plan.rows[1], plan.param_size
    x_rows = shaped(x3, plan.rows)
    rp = run.ix(plan, "rp")
    mean_r, rstd_r = per_row(cache.mean, plan, run), per_row(cache.rstd, plan, run)
    w = cache.weight_f64() if cache.has_weight else xp.ones(P)
    nb = max(1, -(-R // plan.rows_per_block))
    row_g, row_gx = xp.empty(R), xp.empty(R)
    pdw, pdb = xp.zeros((nb, P)), xp.zeros((nb, P))
    run.K.sums_inner(dy_rows, x_rows, mean_r, rstd_r, rp, w, plan.rows_per_block, row_g, row_gx,
                     pdw, pdb, run.threads, **_mask_args(cache, run))
    group_g, group_gx = group_totals(row_g, plan, run), group_totals(row_gx, plan, run)
    dw, db = pdw.sum(axis=0), pdb.sum(axis=0)
    if link is not None:
        group_g, group_gx, dw, db = sync.sum_over_ranks(link, cache, (group_g, group_gx, dw, db), run.be)
    n = xp.maximum(cache.counts, 1.0)  # a group without elements has rstd 0: any divisor will do
    mean_g = per_row(group_g / n, plan, run) if cache.stats_grad and cache.mode.center else xp.zeros(R)
    mean_gx = per_row(group_gx / n, plan, run) if cache.stats_grad else xp.zeros(R)
    run.K.dx_inner(dy_rows, x_rows, mean_r, rstd_r, rp, w, mean_g, mean_gx,
                   None if dh3 is None else shaped(dh3, plan.rows), dx_rows, run.threads,
                   **(_NO_MASK if cache.mask is None else cache.mask.kernel_args()))
    return dw, db


def _backward_columns(dy3, x3, cache, dx_rows, run: Run, dh3=None):
    """The column strategy's backward from one kernel call: the column sums, the group
    and parameter sums, the dx coefficients and dx (what _backward_rows does in four)."""
    plan = cache.plan
    affine = cache.has_weight or cache.has_bias
    P = plan.param_size if affine else 0
    dw, db = run.xp.empty(P), run.xp.empty(P)
    w = _weight_or_dummy(cache, run)
    run.K.backward_cols(dy3, x3, cache.mean, cache.rstd, cache.counts, plan.rows_per_block, run.ix(plan, "rg"),
                        run.params_ix(plan), w, cache.has_weight, cache.stats_grad, cache.mode.center, dw, db, dh3,
                        dx_rows, run.threads)
    return (dw, db) if affine else (None, None)


def _backward_rows(dy_rows, x3, cache, dx_rows, run: Run, link=None, dh3=None):
    """One scale per row: dx = dy * k1 + (x - mean) * k2 + k3 with per-row coefficients.
    With ``link``, the group sums and parameter gradients are summed over its ranks.

    Sums: part_dy / part_dyx are partial row sums of dy and dy * (x - mean); group_g /
    group_gx the group sums of g = w * dy and g * xhat."""
    plan, xp = cache.plan, run.xp
    A, R, S = plan.rows
    C = plan.layout[1]
    x_rows = shaped(x3, plan.rows)
    rg, rp = run.ix(plan, "rg"), run.params_ix(plan)
    mean_r = per_row(cache.mean, plan, run)
    w = _weight_or_dummy(cache, run)
    affine = cache.has_weight or cache.has_bias
    dw = db = None
    group_g = group_gx = cache.rstd  # unread when no gradient flows through the statistics
    if cache.stats_grad or affine or link is not None:
        if plan.strategy is Strategy.COLUMNS:
            nb = len(plan.partial_counts)
            part_dy, part_dyx = xp.empty((nb, R)), xp.empty((nb, R))
            run.K.sums_cols(dy_rows.reshape(A, R), x_rows.reshape(A, R), mean_r, plan.rows_per_block, part_dy,
                            part_dyx, run.threads, **_mask_args(cache, run))
        else:
            part_dy, part_dyx = xp.empty((A, R)), xp.empty((A, R))
            run.K.sums_rows(dy_rows, x_rows, mean_r, part_dy, part_dyx, run.threads, **_mask_args(cache, run))
        # partial rows, groups and parameters are summed in a fixed order: deterministic
        # for any thread count
        dw, db = _param_grads(cache, run)
        group_g, group_gx = xp.empty(C), xp.empty(C)
        run.K.gradient_sums(part_dy, part_dyx, rg, rp, w, cache.has_weight, cache.rstd, group_g, group_gx, dw, db)
        if link is not None:
            group_g, group_gx, dw, db = sync.sum_over_ranks(link, cache, (group_g, group_gx, dw, db), run.be)
    k1, k2, k3 = xp.empty(R), xp.empty(R), xp.empty(R)
    run.K.dx_coefficients(group_g, group_gx, cache.counts, rg, rp, w, cache.has_weight, cache.rstd, cache.stats_grad,
                          cache.mode.center, k1, k2, k3)
    masked = _NO_MASK if cache.mask is None else dict(cache.mask.kernel_args(), cols=plan.strategy is Strategy.COLUMNS)
    run.K.dx_rows(dy_rows, x_rows, mean_r, k1, k2, k3, plan.rows_per_block,
                  None if dh3 is None else shaped(dh3, plan.rows), dx_rows, run.threads, **masked)
    return (dw, db) if affine else (None, None)
    run.K.dx_coefficients(group_g, group_gx, rg, rp, w, cache.has_weight, cache.rstd, float(max(cache.count, 1)),
                          cache.stats_grad, cache.mode.center, k1, k2, k3)
    run.K.dx_rows(dy_rows, x_rows, mean_r, k1, k2, k3, plan.rows_per_block,
                  None if dh3 is None else shaped(dh3, plan.rows), dx_rows, run.threads)
    return (dw, db) if affine else (None, None)
