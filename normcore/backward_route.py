"""The backward of a forward call, as its route says: gradient sums → (sums over ranks) →
dx coefficients → dx, or one visit per group; dh added by the dx pass or after it."""
from __future__ import annotations

import numpy as np

from . import _steady, program, sync
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


def _sums_mask(cache):
    """The sums kernels' mask: the forward's where the backend's sums read one (they then
    leave the masked-out positions out), else none."""
    return None if cache.route.leave_out else cache.mask


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


def _param_grads(cache, run: Run):
    """Zeroed (2, P) dweight / dbias accumulators; (2, 0) when forward had no parameters."""
    return run.xp.zeros((2, cache.plan.param_size if (cache.has_weight or cache.has_bias) else 0))


def _gradients(param_grads, cache):
    """(dweight, dbias) sums from the (2, P) accumulators, None without parameters."""
    return (param_grads[0], param_grads[1]) if (cache.has_weight or cache.has_bias) else (None, None)


def _backward_one_visit(dy3, x3, cache, dx_rows, run: Run, dh3=None):
    """Training backward when every group is contiguous: its sums and its dx (plus dh3
    when given) in one visit."""
    plan, xp = cache.plan, run.xp
    R, C = plan.rows[1], plan.layout[1]
    affine = cache.has_weight or cache.has_bias
    inner = affine and plan.param_inner
    if inner:
        sums = {"part_grads": xp.zeros((2, plan.param_blocks, plan.param_size))}
    else:
        sums = {"row_sums": xp.empty((2, R))}
    rp = run.params_ix(plan)
    run.K.backward_groups(dy=dy3, x=x3, rows_per_group=R // C, center=cache.mode.center, rp=rp, weight=cache.weight,
                          mean=cache.mean, rstd=cache.rstd, counts=cache.counts, groups_per_block=plan.groups_per_block,
                          dx=dx_rows, threads=run.threads, dh=dh3, mask=cache.mask, **sums)
    if inner:
        grads = sums["part_grads"].sum(axis=1)
        return grads[0], grads[1]
    if affine:
        grads = _param_grads(cache, run)
        run.K.gradient_sums(sums=sums["row_sums"].reshape(2, 1, R), rg=run.ix(plan, "rg"), rp=rp, weight=cache.weight,
                            rstd=cache.rstd, group_sums=xp.empty((2, C)), param_grads=grads)
        return grads[0], grads[1]
    return None, None


def _backward_inner(dy_rows, x3, cache, dx_rows, run: Run, link=None, dh3=None):
    """Parameters along the rows (layer norm) outside the one-visit case. With ``link``,
    the group sums and parameter gradients are summed over its ranks.

    Sums: row_sums per row, group_sums per group, of g = w * dy and g * xhat;
    group_means their group means, per row."""
    plan, xp = cache.plan, run.xp
    R, P = plan.rows[1], plan.param_size
    x_rows = shaped(x3, plan.rows)
    rp = run.ix(plan, "rp")
    mean_r, rstd_r = per_row(cache.mean, plan, run), per_row(cache.rstd, plan, run)
    nb = max(1, -(-R // plan.rows_per_block))
    row_sums, part_grads = xp.empty((2, R)), xp.zeros((2, nb, P))
    run.K.sums_inner(dy=dy_rows, x=x_rows, row_mean=mean_r, row_rstd=rstd_r, rp=rp, weight=cache.weight,
                     rows_per_block=plan.rows_per_block, row_sums=row_sums, part_grads=part_grads, threads=run.threads,
                     mask=_sums_mask(cache))
    group_sums = xp.stack([group_totals(row_sums[0], plan, run), group_totals(row_sums[1], plan, run)])
    grads = part_grads.sum(axis=1)
    if link is not None:
        group_sums, grads = sync.sum_over_ranks(link, cache, (group_sums, grads), run.be)
    n = xp.maximum(cache.counts, 1.0)  # a group without elements has rstd 0: any divisor will do
    group_means = xp.zeros((2, R))
    if cache.stats_grad:
        if cache.mode.center:
            group_means[0] = per_row(group_sums[0] / n, plan, run)
        group_means[1] = per_row(group_sums[1] / n, plan, run)
    run.K.dx_inner(dy=dy_rows, x=x_rows, row_mean=mean_r, row_rstd=rstd_r, rp=rp, weight=cache.weight,
                   group_means=group_means, dx=dx_rows, threads=run.threads,
                   dh=None if dh3 is None else shaped(dh3, plan.rows), mask=cache.mask)
    return grads[0], grads[1]


def _backward_columns(dy3, x3, cache, dx_rows, run: Run, dh3=None):
    """The column strategy's backward from one kernel call: the column sums, the group
    and parameter sums, the dx coefficients and dx (what _backward_rows does in four)."""
    plan = cache.plan
    grads = _param_grads(cache, run)
    run.K.backward_cols(dy=dy3, x=x3, mean=cache.mean, rstd=cache.rstd, counts=cache.counts,
                        rows_per_block=plan.rows_per_block, rg=run.ix(plan, "rg"), rp=run.params_ix(plan),
                        weight=cache.weight, stats_grad=cache.stats_grad, center=cache.mode.center, param_grads=grads,
                        dx=dx_rows, threads=run.threads, dh=dh3)
    return _gradients(grads, cache)


def _backward_rows(dy_rows, x3, cache, dx_rows, run: Run, link=None, dh3=None):
    """One scale per row: dx = dy * dy_scale + (x - mean) * xc_scale + dx_shift with
    per-row coefficients. With ``link``, the group sums and parameter gradients are summed
    over its ranks.

    Sums: the partial row sums of dy and dy * (x - mean), then group_sums, the group sums
    of g = w * dy and g * xhat."""
    plan, xp = cache.plan, run.xp
    A, R, S = plan.rows
    C = plan.layout[1]
    x_rows = shaped(x3, plan.rows)
    rg, rp = run.ix(plan, "rg"), run.params_ix(plan)
    mean_r = per_row(cache.mean, plan, run)
    affine = cache.has_weight or cache.has_bias
    grads = None
    group_sums = xp.zeros((2, C))  # unread when no gradient flows through the statistics
    if cache.stats_grad or affine or link is not None:
        if plan.strategy is Strategy.COLUMNS:
            sums = xp.empty((2, len(plan.partial_counts), R))
            run.K.sums_cols(dy=dy_rows.reshape(A, R), x=x_rows.reshape(A, R), row_mean=mean_r,
                            rows_per_block=plan.rows_per_block, sum_dy=sums[0], sum_dy_xc=sums[1],
                            threads=run.threads, mask=_sums_mask(cache))
        else:
            sums = xp.empty((2, A, R))
            run.K.sums_rows(dy=dy_rows, x=x_rows, row_mean=mean_r, sum_dy=sums[0], sum_dy_xc=sums[1],
                            threads=run.threads, mask=_sums_mask(cache))
        # partial rows, groups and parameters are summed in a fixed order: deterministic
        # for any thread count
        grads = _param_grads(cache, run)
        run.K.gradient_sums(sums=sums, rg=rg, rp=rp, weight=cache.weight, rstd=cache.rstd, group_sums=group_sums,
                            param_grads=grads)
        if link is not None:
            group_sums, grads = sync.sum_over_ranks(link, cache, (group_sums, grads), run.be)
    dy_scale, xc_scale, dx_shift = xp.empty(R), xp.empty(R), xp.empty(R)
    run.K.dx_coefficients(group_sums=group_sums, counts=cache.counts, rg=rg, rp=rp, weight=cache.weight,
                          rstd=cache.rstd, stats_grad=cache.stats_grad, center=cache.mode.center, dy_scale=dy_scale,
                          xc_scale=xc_scale, dx_shift=dx_shift)
    run.K.dx_rows(dy=dy_rows, x=x_rows, row_mean=mean_r, dy_scale=dy_scale, xc_scale=xc_scale, dx_shift=dx_shift,
                  rows_per_block=plan.rows_per_block, dx=dx_rows, threads=run.threads,
                  dh=None if dh3 is None else shaped(dh3, plan.rows), mask=cache.mask,
                  cols=plan.strategy is Strategy.COLUMNS)
    return _gradients(grads, cache) if grads is not None else (None, None)
