"""The forward phases of a checked call (:class:`normcore.signature.Call`), as its route
says: batch statistics (one pass, moments, masked or synchronized) → running-statistics
update → the statistics the output uses (batch, running or estimated) → apply; and the
cache backward reads."""
from __future__ import annotations

from math import prod

import numpy as np

from . import _steady, masking, program, sync
from .backend import AffineKind
from .cache import NormCache
from .checks import describe_mode
from .layout import (Run, add, by_group, canonical, flat, group_counts, in_caller_layout, output_rows,
                     partial_counts, per_row, shaped)
from .plan import Plan, Strategy
from .signature import Call, check_count, param_dtype_of

__all__ = ["run_forward"]


def run_forward(call: Call, x):
    """Phases 2-5 of a checked call; returns (y, cache), or (y, h, cache) with a residual."""
    ps = call.programs
    if ps is not None and _programs_take(call, ps, x):
        return _steady.run_forward(ps, call.plan, x, call.weight, call.bias, call.running_mean, call.running_var,
                                   call.eps, call.momentum, 0.0 if call.keep is None else call.keep, call.unbiased,
                                   call.out, call.residual, call.h_out)
    plan, xp, route = call.plan, call.be.xp, call.route
    # A rule that needs the statistics (the ranks' exchange, the masked counts) may still
    # refuse the call after h or a one-pass y exist: those are then made in arrays of
    # the call's own and copied to the caller's h_out / out once every rule has passed.
    late_rules = route.late_rules
    h_out = None if late_rules else call.h_out
    r3 = h3 = None
    if route.residual == "fused":  # h made by the one-pass kernel, group by group
        r3 = canonical(call.residual, plan, xp)
        h3 = xp.empty(plan.kernel_shape, call.dtype) if h_out is None else shaped(h_out, plan.kernel_shape)
    elif route.residual == "add":  # h first, then the forward of h
        x = add(call.be, x, call.residual, h_out)
    if route.empty:
        y, cache = _empty_forward(call, x)
        return (y, cache) if call.residual is None else (y, _deliver(x, call.h_out, late_rules), cache)
    x3 = canonical(x, plan, xp)
    run = Run.of(call.be, x3.size)
    out = call.out
    y_rows = output_rows(None if late_rules and route.output is None else out, plan, call.dtype, xp)
    mean = var = rstd = None
    # the mask as the kernels read it: for the statistics (route.masked), and for backward
    # whenever one was given (its masked-out positions are not data, in eval too)
    mask3 = None if call.given_mask is None else masking.mask_rows(call.given_mask, plan, call.be)
    if route.statistics is not None:
        mean, var, rstd, counts, count = _batch_statistics(call, x3, y_rows, run, r3, h3, mask3)
        if h3 is not None:
            x = x3 = h3  # what the kernel normalized, and what backward reads
    else:  # statistics from the running ones: every element of a group counts
        counts, count = group_counts(plan, call.be), plan.count
    if route.update:
        _update_running(call, mean, var, counts, run)
    if route.output in ("running", "running inner"):
        mean, var, rstd = _apply_running(call, x3, y_rows, run)
    elif route.output is not None:
        _apply(call, shaped(x3, plan.rows), mean, rstd, y_rows, run)
    cache = NormCache(call.mode, plan, x3, call.dtype, mean, rstd, call.weight, call.bias is not None,
                      stats_grad=route.stats_grad, count=count,
                      comm=None if call.link is None else call.link.comm, backend=call.be,
                      param_dtype=param_dtype_of(call), route=route)
    cache.counts = counts
    cache.mask = mask3
    cache.not_data = call.given_mask
    y = in_caller_layout(y_rows, plan, out, xp)
    if out is not None and y is not out:  # made apart (late rules): every rule has passed
        out[...] = y
        y = out
    if call.residual is None:
        return y, cache
    return y, _deliver(shaped(x, plan.shape), call.h_out, late_rules), cache


def _programs_take(call: Call, ps, x) -> bool:
    """Whether the signature's programs (normcore.program) run this call: they take x and
    the running statistics as the kernels read them (no copies) and one parameter dtype."""
    r = call.residual
    return (program.ENABLED and type(x) is np.ndarray and x.flags.c_contiguous
            and (r is None or (type(r) is np.ndarray and r.flags.c_contiguous))
            and ps.param_dtype == param_dtype_of(call)
            and (call.running_mean is None or (call.running_mean.ndim == 1 and call.running_mean.flags.c_contiguous
                                               and call.running_var.ndim == 1 and call.running_var.flags.c_contiguous)))


def _deliver(h, h_out, made_apart):
    """h as the call returns it: the caller's ``h_out`` when given (a copy of h into it
    when h was ``made_apart`` from it), else h."""
    if h_out is None:
        return h
    if made_apart:
        h_out[...] = h
    return h_out


def _empty_forward(call: Call, x):
    """An input without elements (as PyTorch): an empty output, the running statistics
    untouched, statistics that do not exist (NaN; a zero-stride view where the groups are
    many), and a cache whose backward gives an empty dx and zero parameter gradients."""
    plan, xp = call.plan, call.be.xp
    y = xp.empty(x.shape, call.dtype) if call.out is None else call.out
    C = prod(plan.stat_shape)  # (the layout's C of an empty axis can read 1)
    nan = xp.full(C, np.nan) if C <= 65536 else xp.broadcast_to(xp.asarray(np.nan), (C,))
    cache = NormCache(call.mode, plan, canonical(x, plan, xp), call.dtype, nan, nan, call.weight,
                      call.bias is not None, stats_grad=False, count=0, backend=call.be,
                      param_dtype=param_dtype_of(call), route=call.route)
    return y, cache


def _batch_statistics(call: Call, x3, y_rows, run: Run, r3=None, h3=None, mask3=None):
    """Phase 2: per-group (mean, var, rstd) of the batch, the (C,) elements of each group
    (all ranks'; with a mask, the counted ones) and their number as ranks agree on it
    (elements per group; with a mask, all counted elements). The one-pass kernel also
    writes the output (and h = x3 + r3 into h3 when a residual is fused)."""
    plan, xp, route = call.plan, run.xp, call.route
    C = plan.layout[1]
    mean, var, rstd = xp.empty(C), xp.empty(C), xp.empty(C)
    counts, count = group_counts(plan, run.be), plan.count
    if route.masked or route.synced:
        counts = xp.empty(C)  # the kernels count
    if route.statistics == "groups":
        _normalize_groups(call, x3, mean, var, rstd, y_rows, run, r3, h3, mask3, counts)
    elif route.statistics == "columns":
        _normalize_columns(call, x3, mean, var, rstd, y_rows, run)
    elif route.synced:
        pmean, pm2, pcount, count = sync.synced_moments(
            call.link, lambda: _moments(x3, plan, run, mask3), plan, call.mode, call.dtype, call.training, run.be,
            masked=route.masked, settings=_sync_settings(call))
        run.K.finalize_moments(part_mean=pmean, part_m2=pm2, part_count=pcount, center=call.mode.center, eps=call.eps,
                               mean=mean, var=var, rstd=rstd, counts=counts)
        if not route.masked:
            check_count(count, C, call.training, call.mode,
                        f"{plan.shape} on this rank, {count} elements per group on all ranks")
    elif C:
        pmean, pm2, pcount = _moments(x3, plan, run, mask3)
        run.K.finalize_moments(part_mean=pmean, part_m2=pm2, part_count=pcount, center=call.mode.center, eps=call.eps,
                               mean=mean, var=var, rstd=rstd, counts=counts if route.masked else None)
    if route.masked:
        masking.check_counts(counts, run.be, route.counts_ruled, route.update,
                             f"{describe_mode(call.mode)}, x.shape {plan.shape}")
        count = int(run.be.to_host(counts).sum())
    return mean, var, rstd, counts, count


def _sync_settings(call: Call):
    """Every setting synchronized ranks must share, because it changes what they exchange
    or what they compute from it: the normalization (centring, parameters given and their
    dtype), eps, estimate, whether running statistics are updated and how (momentum, the
    exact decay, unbiased). The mode's spec, the statistics shape, x's dtype, training and the mask's presence are
    in the signature already (:func:`normcore.sync._signature`)."""
    update = call.route.update
    return (("centred", call.mode.center), ("eps", call.eps), ("estimate", call.estimate),
            ("weight given", call.weight is not None), ("bias given", call.bias is not None),
            ("parameter dtype", param_dtype_of(call).name),
            ("running statistics updated", update),
            ("momentum", call.momentum if update else None), ("decay", call.keep if update else None),
            ("unbiased", call.unbiased if update else None))


def _moments(x3, plan: Plan, run: Run, mask3=None):
    """Partial moments of the groups, ``(pmean, pm2, pcount)``: (K, C) partial means and
    centred sums of squares over pcount elements each, from one compiled pass over x (over
    the counted elements with ``mask3``, masking.MaskRows, which also counts them)."""
    A, C, B = plan.layout
    xp = run.xp
    if plan.strategy is Strategy.COLUMNS:
        parts = [xp.empty((len(plan.partial_counts), C)) for _ in range(2 if mask3 is None else 3)]
        run.K.moments_cols(x=x3, rows_per_block=plan.rows_per_block, part_mean=parts[0], part_m2=parts[1],
                           threads=run.threads, mask=mask3, part_count=parts[2] if mask3 is not None else None)
    else:
        R = plan.rows[1]
        scattered = plan.strategy is Strategy.SCATTERED  # per-row partials, regrouped
        parts = [xp.empty((A, R) if scattered else (A, C)) for _ in range(2 if mask3 is None else 3)]
        if mask3 is None:
            run.K.moments_rows(x=shaped(x3, plan.rows) if scattered else x3, part_mean=parts[0], part_m2=parts[1],
                               threads=run.threads)
        else:  # the mask's rows: J = R / C of them per group
            run.K.moments_rows(x=shaped(x3, plan.rows), part_mean=parts[0], part_m2=parts[1], threads=run.threads,
                               mask=mask3, rows_per_group=1 if scattered else R // C, part_count=parts[2])
        if scattered:
            parts = [by_group(p, plan, xp) for p in parts]
    return parts[0], parts[1], parts[2] if mask3 is not None else partial_counts(plan, run.be)


def _normalize_groups(call: Call, x3, mean, var, rstd, y_rows, run: Run, r3=None, h3=None, mask3=None,
                      counts=None):
    """The one-pass forward of an A == 1 layout (statistics and y; of h3 = x3 + r3 when
    a residual is given; over the counted elements, their number into ``counts``, with
    ``mask3``)."""
    plan = call.plan
    affine = AffineKind.NONE
    if call.weight is not None or call.bias is not None:
        affine = AffineKind.INNER if plan.param_inner else AffineKind.ROW
    extra = {} if r3 is None else {"residual": r3, "h": h3}
    if mask3 is not None:
        extra.update(mask=mask3, counts=counts)
    run.K.normalize_groups(x=x3, rows_per_group=plan.rows[1] // plan.layout[1], center=call.mode.center, eps=call.eps,
                           affine=int(affine), rp=run.params_ix(plan), weight=call.weight, bias=call.bias, mean=mean,
                           var=var, rstd=rstd, y=y_rows, threads=run.threads, **extra)


def _normalize_columns(call: Call, x3, mean, var, rstd, y_rows, run: Run):
    """The column strategy's forward from one kernel call: moments, their finalization,
    the per-column coefficients and y."""
    plan = call.plan
    run.K.normalize_cols(x=x3, rows_per_block=plan.rows_per_block, center=call.mode.center, eps=call.eps,
                         rg=run.ix(plan, "rg"), rp=run.params_ix(plan), weight=call.weight, bias=call.bias, mean=mean,
                         var=var, rstd=rstd, y=y_rows, threads=run.threads)


def _update_running(call: Call, mean, var, counts, run: Run):
    """Phase 3: running = keep * running + momentum * batch, in place (through
    contiguous copies when the caller's arrays are strided)."""
    plan = call.plan
    rm, rv = flat(call.running_mean, run.be), flat(call.running_var, run.be)
    run.K.update_running(mean=mean, var=var, counts=counts, rc=run.ix(plan, "rc"),
                         groups_per_running=float(plan.groups_per_running), momentum=call.momentum, keep=call.keep,
                         unbiased=call.unbiased, running_mean=rm, running_var=rv)
    for target, value in ((call.running_mean, rm), (call.running_var, rv)):
        if not target.flags.c_contiguous:  # flat copied it
            target[...] = value.reshape(target.shape)


def _apply_running(call: Call, x3, y_rows, run: Run):
    """Phases 4 and 5 without batch statistics (eval) or for estimated batch norm (after
    the update): per-group statistics from the stored running ones, and y from them."""
    plan, xp = call.plan, run.xp
    C = plan.layout[1]
    mean, var, rstd = xp.empty(C), xp.empty(C), xp.empty(C)
    rm, rv = flat(call.running_mean, run.be), flat(call.running_var, run.be)
    if plan.param_inner and (call.weight is not None or call.bias is not None):
        if C:
            run.K.running_statistics(running_mean=rm, running_var=rv, rc=run.ix(plan, "rc"), eps=call.eps, mean=mean,
                                     var=var, rstd=rstd)
        _apply(call, shaped(x3, plan.rows), mean, rstd, y_rows, run)
    else:  # one scale and shift per row: one kernel call
        x_rows = x3 if x3.ndim == 2 else shaped(x3, plan.rows)  # the kernel takes columns as (A, C)
        run.K.normalize_running(x=x_rows, running_mean=rm, running_var=rv, rc=run.ix(plan, "rc"), eps=call.eps,
                                rg=run.ix(plan, "rg"), rp=run.params_ix(plan), weight=call.weight, bias=call.bias,
                                rows_per_block=plan.rows_per_block, mean=mean, var=var, rstd=rstd, y=y_rows,
                                threads=run.threads)
    return mean, var, rstd


def _apply(call: Call, x_rows, mean, rstd, y_rows, run: Run):
    """Phase 5: y from the per-group statistics, on the (A, R, S) view."""
    plan, xp = call.plan, run.xp
    w, b = call.weight, call.bias
    R = plan.rows[1]
    if plan.param_inner and (w is not None or b is not None):
        run.K.affine_inner(x=x_rows, row_mean=per_row(mean, plan, run), row_rstd=per_row(rstd, plan, run),
                           rp=run.ix(plan, "rp"), weight=w, bias=b, y=y_rows, threads=run.threads)
        return
    # y = (x - mean) * rstd * w + b = (x - mean) * scale + shift, with scale = rstd * w
    # and shift = b per row: one subtract and one multiply-add per element (float32 inputs:
    # in float32, within the accuracy contract; see simd.h).
    row_mean, row_scale, row_shift = xp.empty(R), xp.empty(R), xp.empty(R)
    run.K.row_coefficients(mean=mean, rstd=rstd, rg=run.ix(plan, "rg"), rp=run.params_ix(plan), weight=w, bias=b,
                           row_mean=row_mean, row_scale=row_scale, row_shift=row_shift)
    run.K.affine_rows(x=x_rows, row_mean=row_mean, row_scale=row_scale, row_shift=row_shift,
                      rows_per_block=plan.rows_per_block, y=y_rows, threads=run.threads)
