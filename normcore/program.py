"""A call signature's route as programs: the steps :mod:`normcore.forward_route` and
:mod:`normcore.backward_route` take for it, frozen once (which entry, with which arrays
and constants) and run by the compiled interpreter (:mod:`normcore._steady`) for every
call of the signature, the layers' warm calls included.

:func:`programs_for` builds them for the routes of the common calls on the CPU -- no mask,
communicator or transposing plan, a residual only where the statistics pass adds it;
groups contiguous, columns or rows (not scattered) -- and returns None for the others,
which the route executors run step by step. The entries are called by keyword, as the
contract has them. Both give bitwise the same results (tests/test_program.py compares them for
every built-in mode).

>>> import numpy as np
>>> from normcore.backend import CPU
>>> from normcore.modes import get_mode
>>> from normcore.plan import make_plan
>>> from normcore.route import Capabilities, resolve
>>> plan = make_plan(get_mode("batch_norm"), (8, 4))
>>> route = resolve(plan, Capabilities(), use_batch=True, estimate=False, update=True, synced=False,
...                 masked=False, residual=False, affine=True, counts_ruled=True)
>>> ps = programs_for(plan, route, CPU, get_mode("batch_norm"), np.dtype(np.float32),
...                   np.dtype(np.float32), True, True)
>>> ps.forward.entries, ps.backward.entries
(('normalize_cols', 'update_running'), ('backward_cols',))
"""
from __future__ import annotations

import numpy as np

from ._steady import FIXED_REGISTERS, REGISTERS, Program, Programs, Step
from .backend import CPU, AffineKind
from .plan import GRAIN, Plan, Strategy
from .layout import group_counts, partial_counts
from .route import Route

__all__ = ["programs_for", "ENABLED"]

#: False: every call runs the route executors step by step (the tests' reference path).
ENABLED = True


class Reg(int):
    """A register number in a call's arguments (a plain int there is a constant)."""


X, W, B, RM, RV, EPS, MOMENTUM, KEEP, UNBIASED, THREADS, DY, DH, MEAN, RSTD, X3, OUT, DW, DB, RESIDUAL, H = (
    Reg(REGISTERS[n]) for n in ("x", "weight", "bias", "running_mean", "running_var", "eps", "momentum", "keep",
                                "unbiased", "threads", "dy", "dh", "mean", "rstd", "x3", "out", "dweight",
                                "dbias", "residual", "h"))


def covers(plan: Plan, route: Route, be) -> bool:
    """Whether :func:`programs_for` builds programs for this signature."""
    return (be is CPU and not route.empty and route.residual in (None, "fused") and not route.mask_given
            and not route.synced and plan.perm is None and plan.strategy is not Strategy.SCATTERED
            and (route.backward != "rows" or plan.strategy is not Strategy.COLUMNS)
            and route.backward in ("one visit", "columns", "rows"))


def programs_for(plan: Plan, route: Route, be, mode, dtype, param_dtype, has_weight: bool, has_bias: bool):
    """The signature's :class:`normcore._steady.Programs` (kept while the plan lives), or
    None where the route executors run it (not :func:`covers`, or :data:`ENABLED` off).
    ``param_dtype``: the weight's or bias's dtype (x's when neither is given)."""
    if not ENABLED or not covers(plan, route, be):
        return None
    key = ("programs", mode, route, dtype, param_dtype, has_weight, has_bias)
    return be.constant(plan, key, lambda: _build(plan, route, be, mode, dtype, param_dtype, has_weight,
                                                  has_bias))


class _Builder:
    """Steps and registers of one program."""

    def __init__(self, be, plan: Plan):
        self.be, self.plan, self.steps, self.n = be, plan, [], FIXED_REGISTERS

    def reg(self) -> Reg:
        self.n += 1
        return Reg(self.n - 1)

    def empty(self, shape, dtype=np.float64, out=None, zeros=False) -> Reg:
        r = self.reg() if out is None else out
        self.steps.append(Step("zeros" if zeros else "empty", r, shape=shape, dtype=dtype))
        return r

    def output(self, dtype, reg=OUT):
        """OUT (or H): the caller's array, else a new one of x's shape (the kernels write
        its data)."""
        self.steps.append(Step("output", reg, shape=self.plan.shape, dtype=dtype))
        return reg

    def view(self, src, shape, shape_of_src, out=None):
        """``src`` as ``shape`` (src itself when it has that shape already, in ``out`` when
        given)."""
        if tuple(shape) == tuple(shape_of_src):
            if out is not None:
                self.steps.append(Step("alias", out, src))
            return src
        r = self.reg() if out is None else out
        self.steps.append(Step("view", r, src, shape=shape))
        return r

    def per_row(self, values) -> Reg:
        """Per-group (C,) values spread to rows (themselves when each row is its group)."""
        C = self.plan.layout[1]
        if self.be.is_identity(self.plan, "rg", C):
            return values
        r = self.reg()
        self.steps.append(Step("take", r, values, index=self.ix("rg")))
        return r

    def call(self, name, **kwargs):
        """The entry ``name`` called with these keyword arguments (a Reg: that register)."""
        args = list(kwargs.values())
        slots = [(i, int(a)) for i, a in enumerate(args) if isinstance(a, Reg)]
        self.steps.append(Step("call", -1, name=name, args=[None if isinstance(a, Reg) else a for a in args],
                               slots=slots, keywords=tuple(kwargs)))

    def sum_of(self, src, axis) -> Reg:
        r = self.reg()
        self.steps.append(Step("sum0", r, src, axis=axis))
        return r

    def part(self, src, item, out=None) -> Reg:
        """One of the arrays stacked in ``src`` (a view)."""
        r = self.reg() if out is None else out
        self.steps.append(Step("part", r, src, item=item))
        return r

    # the plan's constants, as the route executors take them
    def ix(self, name):
        return self.be.index(self.plan, name)

    def params_ix(self):
        return self.be.index(self.plan, "rp" if self.plan.rp is not None else "rg")

    def program(self) -> Program:
        return Program(self.be, self.steps, self.n)


def _build(plan, route, be, mode, dtype, param_dtype, has_w, has_b) -> Programs:
    fwd, mean, rstd = _forward(_Builder(be, plan), plan, route, mode, dtype, param_dtype, has_w, has_b)
    bwd = _backward(_Builder(be, plan), plan, route, mode, dtype, param_dtype, has_w, has_b, False)
    bwd_dh = _backward(_Builder(be, plan), plan, route, mode, dtype, param_dtype, has_w, has_b, True) \
        if route.dh_in_dx else None
    size = int(np.prod(plan.kernel_shape))
    return Programs(be, mode, route, dtype, param_dtype, plan.count, group_counts(plan, be), has_w, has_b, size,
                    size < GRAIN, fwd, bwd, bwd_dh, int(mean), int(rstd))


def _forward(b: _Builder, plan, route, mode, dtype, param_dtype, has_w, has_b):
    """forward_route.run_forward's steps for the route; returns (program, mean, rstd)
    where mean / rstd are the registers of the statistics the output used."""
    A, C, _ = plan.layout
    R = plan.rows[1]
    r3 = h3 = None
    if route.residual == "fused":  # the statistics pass makes h = x + residual: what backward reads
        x_in = b.view(X, plan.kernel_shape, plan.shape)
        r3 = b.view(RESIDUAL, plan.kernel_shape, plan.shape)
        h3 = x3 = b.view(b.output(dtype, H), plan.kernel_shape, plan.shape, out=X3)
    else:
        x_in = x3 = b.view(X, plan.kernel_shape, plan.shape, out=X3)
    y = b.output(dtype)
    mean = var = rstd = None
    if route.statistics is not None:
        mean, var, rstd = MEAN, b.reg(), RSTD
        for r in (mean, var, rstd):
            b.empty((C,), out=r)
    w = W if has_w else None
    bias = B if has_b else None
    if route.statistics == "groups":
        affine = AffineKind.NONE
        if has_w or has_b:
            affine = AffineKind.INNER if plan.param_inner else AffineKind.ROW
        extra = {} if r3 is None else {"residual": r3, "h": h3}
        b.call("normalize_groups", x=x_in, rows_per_group=R // C, center=mode.center, eps=EPS, affine=int(affine),
               rp=b.params_ix(), weight=w, bias=bias, mean=mean, var=var, rstd=rstd, y=y, threads=THREADS, **extra)
    elif route.statistics == "columns":
        b.call("normalize_cols", x=x3, rows_per_block=plan.rows_per_block, center=mode.center, eps=EPS, rg=b.ix("rg"),
               rp=b.params_ix(), weight=w, bias=bias, mean=mean, var=var, rstd=rstd, y=y, threads=THREADS)
    elif route.statistics == "moments":
        K = len(plan.partial_counts) if plan.strategy is Strategy.COLUMNS else A
        pmean, pm2 = b.empty((K, C)), b.empty((K, C))
        if plan.strategy is Strategy.COLUMNS:
            b.call("moments_cols", x=x3, rows_per_block=plan.rows_per_block, part_mean=pmean, part_m2=pm2,
                   threads=THREADS)
        else:
            b.call("moments_rows", x=x3, part_mean=pmean, part_m2=pm2, threads=THREADS)
        b.call("finalize_moments", part_mean=pmean, part_m2=pm2, part_count=partial_counts(plan, b.be),
               center=mode.center, eps=EPS, mean=mean, var=var, rstd=rstd)
    if route.update:
        b.call("update_running", mean=mean, var=var, counts=group_counts(plan, b.be), rc=b.ix("rc"),
               groups_per_running=float(plan.groups_per_running), momentum=MOMENTUM, keep=KEEP, unbiased=UNBIASED,
               running_mean=RM, running_var=RV)
    rows = []  # x3 as (A, R, S), viewed once where a step needs it

    def x_rows():
        if not rows:
            rows.append(b.view(x3, plan.rows, plan.kernel_shape))
        return rows[0]
    if route.output in ("running", "running inner"):
        mean, var, rstd = (b.empty((C,)) for _ in range(3))
        if route.output == "running inner":
            b.call("running_statistics", running_mean=RM, running_var=RV, rc=b.ix("rc"), eps=EPS, mean=mean, var=var,
                   rstd=rstd)
        else:
            kernel_x = x3 if len(plan.kernel_shape) == 2 else x_rows()  # the kernel takes columns as (A, C)
            b.call("normalize_running", x=kernel_x, running_mean=RM, running_var=RV, rc=b.ix("rc"), eps=EPS,
                   rg=b.ix("rg"), rp=b.params_ix(), weight=w, bias=bias, rows_per_block=plan.rows_per_block,
                   mean=mean, var=var, rstd=rstd, y=y, threads=THREADS)
    if route.output in ("inner", "running inner"):
        b.call("affine_inner", x=x_rows(), row_mean=b.per_row(mean), row_rstd=b.per_row(rstd), rp=b.ix("rp"),
               weight=w, bias=bias, y=y, threads=THREADS)
    elif route.output == "rows":
        row_mean, row_scale, row_shift = (b.empty((R,)) for _ in range(3))
        b.call("row_coefficients", mean=mean, rstd=rstd, rg=b.ix("rg"), rp=b.params_ix(), weight=w, bias=bias,
               row_mean=row_mean, row_scale=row_scale, row_shift=row_shift)
        b.call("affine_rows", x=x_rows(), row_mean=row_mean, row_scale=row_scale, row_shift=row_shift,
               rows_per_block=plan.rows_per_block, y=y, threads=THREADS)
    return b.program(), mean, rstd


def _split_grads(b: _Builder, grads):
    """The (2, P) parameter gradients as the dweight / dbias registers."""
    b.part(grads, 0, out=DW)
    b.part(grads, 1, out=DB)


def _backward(b: _Builder, plan, route, mode, dtype, param_dtype, has_w, has_b, dh):
    """backward_route.run_backward's steps for the route (``dh``: with a dh the dx pass adds)."""
    A, C, _ = plan.layout
    R = plan.rows[1]
    dy3 = b.view(DY, plan.kernel_shape, plan.shape)
    extra = {"dh": b.view(DH, plan.kernel_shape, plan.shape)} if dh else {}
    dx = b.output(dtype)
    affine = has_w or has_b
    w = W if has_w else None
    counts = group_counts(plan, b.be)
    P = plan.param_size if affine else 0
    if route.backward == "one visit":
        inner = affine and plan.param_inner
        if inner:
            grads = b.empty((2, plan.param_blocks, P), zeros=True)
            extra["part_grads"] = grads
        else:
            row_sums = b.empty((2, R))
            extra["row_sums"] = row_sums
        b.call("backward_groups", dy=dy3, x=X3, rows_per_group=R // C, center=mode.center, rp=b.params_ix(),
               weight=w, mean=MEAN, rstd=RSTD, counts=counts, groups_per_block=plan.groups_per_block, dx=dx,
               threads=THREADS, **extra)
        if inner:
            _split_grads(b, b.sum_of(grads, axis=1))
        elif affine:
            grads = b.empty((2, P), zeros=True)
            b.call("gradient_sums", sums=b.view(row_sums, (2, 1, R), (2, R)), rg=b.ix("rg"), rp=b.params_ix(),
                   weight=w, rstd=RSTD, group_sums=b.empty((2, C)), param_grads=grads)
            _split_grads(b, grads)
    elif route.backward == "columns":
        grads = b.empty((2, P), zeros=True)
        b.call("backward_cols", dy=dy3, x=X3, mean=MEAN, rstd=RSTD, counts=counts, rows_per_block=plan.rows_per_block,
               rg=b.ix("rg"), rp=b.params_ix(), weight=w, stats_grad=route.stats_grad, center=mode.center,
               param_grads=grads, dx=dx, threads=THREADS, **extra)
        if affine:
            _split_grads(b, grads)
    else:  # "rows", of the rows or groups strategy
        dy_rows = b.view(dy3, plan.rows, plan.kernel_shape)
        x_rows = b.view(X3, plan.rows, plan.kernel_shape)
        mean_r = b.per_row(MEAN)
        group_sums = b.empty((2, C), zeros=True)  # unread when no gradient flows through the statistics
        if route.stats_grad or affine:
            sums = b.empty((2, A, R))
            b.call("sums_rows", dy=dy_rows, x=x_rows, row_mean=mean_r, sum_dy=b.part(sums, 0),
                   sum_dy_xc=b.part(sums, 1), threads=THREADS)
            grads = b.empty((2, P), zeros=True)
            b.call("gradient_sums", sums=sums, rg=b.ix("rg"), rp=b.params_ix(), weight=w, rstd=RSTD,
                   group_sums=group_sums, param_grads=grads)
            if affine:
                _split_grads(b, grads)
        dy_scale, xc_scale, dx_shift = (b.empty((R,)) for _ in range(3))
        b.call("dx_coefficients", group_sums=group_sums, counts=counts, rg=b.ix("rg"), rp=b.params_ix(), weight=w,
               rstd=RSTD, stats_grad=route.stats_grad, center=mode.center, dy_scale=dy_scale, xc_scale=xc_scale,
               dx_shift=dx_shift)
        if dh:
            extra["dh"] = b.view(extra["dh"], plan.rows, plan.kernel_shape)
        b.call("dx_rows", dy=dy_rows, x=x_rows, row_mean=mean_r, dy_scale=dy_scale, xc_scale=xc_scale,
               dx_shift=dx_shift, rows_per_block=plan.rows_per_block, dx=dx, threads=THREADS, **extra)
    return b.program()
