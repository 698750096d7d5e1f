"""A call signature's route as programs: the steps :mod:`normcore.forward_route` and
:mod:`normcore.backward_route` take for it, frozen once (which entry, with which arrays
and constants) and run by the compiled interpreter (:mod:`normcore._steady`) for every
call of the signature, the layers' warm calls included.

:func:`programs_for` builds them for the routes of the common calls on the CPU -- no mask,
communicator or transposing plan, a residual only where the statistics pass adds it; groups contiguous, columns or rows (not
scattered) -- and returns None for the others, which the route executors run
step by step. Both give bitwise the same results (tests/test_program.py compares them for
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

    def widen(self, src) -> Reg:
        r = self.reg()
        self.steps.append(Step("widen", r, src))
        return r

    def per_row(self, values) -> Reg:
        """Per-group (C,) values spread to rows (themselves when each row is its group)."""
        C = self.plan.layout[1]
        if self.be.is_identity(self.plan, "rg", C):
            return values
        r = self.reg()
        self.steps.append(Step("take", r, values, index=self.ix("rg")))
        return r

    def call(self, name, *args, out=-1):
        slots = [(i, int(a)) for i, a in enumerate(args) if isinstance(a, Reg)]
        self.steps.append(Step("call", out, name=name, args=[None if isinstance(a, Reg) else a for a in args],
                               slots=slots))

    def sum0(self, src, out):
        self.steps.append(Step("sum0", out, src))

    # the plan's constants, as the route executors take them
    def ix(self, name):
        return self.be.index(self.plan, name)

    def params_ix(self):
        return self.be.index(self.plan, "rp" if self.plan.rp is not None else "rg")

    def dummy(self, dtype):
        dtype = np.dtype(dtype)
        return self.be.constant(self.plan, ("dummy", dtype), lambda: np.zeros(1, dtype))

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


def _weight_args(b: _Builder, param_dtype, has_w, has_b):
    """(w, b) as the row kernels read them: the arrays, an absent one a placeholder of the
    other's dtype."""
    dummy = b.dummy(param_dtype)
    return (W if has_w else dummy), (B if has_b else dummy)


def _weights64(b: _Builder, has_w, has_b):
    """(w, b) in float64, as the group and inner kernels read them: ones / zeros when absent."""
    P = b.plan.param_size
    return (b.widen(W) if has_w else np.ones(P)), (b.widen(B) if has_b else np.zeros(P))


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
    if route.statistics == "groups":
        affine = AffineKind.NONE
        w = bias = b.dummy(np.float64)
        if has_w or has_b:
            affine = AffineKind.INNER if plan.param_inner else AffineKind.ROW
            w, bias = _weights64(b, has_w, has_b)
        b.call("normalize_groups", x_in, r3, h3, R // C, mode.center, EPS, int(affine), b.params_ix(), w, bias,
               mean, var, rstd, y, THREADS)
    elif route.statistics == "columns":
        w, bias = _weight_args(b, param_dtype, has_w, has_b)
        b.call("normalize_cols", x3, plan.rows_per_block, mode.center, EPS, b.ix("rg"), b.params_ix(), w, bias,
               has_w, has_b, mean, var, rstd, y, THREADS)
    elif route.statistics == "moments":
        K = len(plan.partial_counts) if plan.strategy is Strategy.COLUMNS else A
        pmean, pm2 = b.empty((K, C)), b.empty((K, C))
        if plan.strategy is Strategy.COLUMNS:
            b.call("moments_cols", x3, plan.rows_per_block, pmean, pm2, THREADS)
        else:
            b.call("moments_rows", x3, pmean, pm2, THREADS)
        b.call("finalize_moments", pmean, pm2, partial_counts(plan, b.be), mode.center, EPS, mean, var, rstd)
    if route.update:
        E = int(np.prod(plan.running_shape))
        b.call("update_running", mean, var, group_counts(plan, b.be), b.ix("rc"), float(plan.groups_per_running),
               MOMENTUM, KEEP, UNBIASED, RM, RV, b.empty((2 * E,)))
    rows = []  # x3 as (A, R, S), viewed once where a step needs it

    def x_rows():
        if not rows:
            rows.append(b.view(x3, plan.rows, plan.kernel_shape))
        return rows[0]
    if route.output in ("running", "running inner"):
        mean, var, rstd = (b.empty((C,)) for _ in range(3))
        if route.output == "running inner":
            b.call("running_statistics", RM, RV, b.ix("rc"), EPS, mean, var, rstd)
        else:
            w, bias = _weight_args(b, param_dtype, has_w, has_b)
            kernel_x = x3 if len(plan.kernel_shape) == 2 else x_rows()  # the kernel takes columns as (A, C)
            b.call("normalize_running", kernel_x, RM, RV, b.ix("rc"), EPS, b.ix("rg"), b.params_ix(), w, bias,
                   has_w, has_b, plan.rows_per_block, mean, var, rstd, y, THREADS)
    if route.output in ("inner", "running inner"):
        w, bias = _weights64(b, has_w, has_b)
        b.call("affine_inner", x_rows(), b.per_row(mean), b.per_row(rstd), b.ix("rp"), w, bias, y, THREADS)
    elif route.output == "rows":
        w, bias = _weight_args(b, param_dtype, has_w, has_b)
        mean_r, scale, shift = (b.empty((R,)) for _ in range(3))
        b.call("row_coefficients", mean, rstd, b.ix("rg"), b.params_ix(), w, bias, has_w, has_b, mean_r, scale,
               shift)
        b.call("affine_rows", x_rows(), mean_r, scale, shift, plan.rows_per_block, y, THREADS)
    return b.program(), mean, rstd


def _backward(b: _Builder, plan, route, mode, dtype, param_dtype, has_w, has_b, dh):
    """backward_route.run_backward's steps for the route (``dh``: with a dh the dx pass adds)."""
    A, C, _ = plan.layout
    R = plan.rows[1]
    dy3 = b.view(DY, plan.kernel_shape, plan.shape)
    dh3 = b.view(DH, plan.kernel_shape, plan.shape) if dh else None
    dx = b.output(dtype)
    affine = has_w or has_b
    counts = group_counts(plan, b.be)
    if route.backward == "one visit":
        kind = AffineKind.NONE
        if affine:
            kind = AffineKind.INNER if plan.param_inner else AffineKind.ROW
        P = plan.param_size if affine else 1
        row_dy, row_dyx = b.empty((R,)), b.empty((R,))
        partials = (plan.param_blocks, P) if kind is AffineKind.INNER else (1, 1)
        pdw, pdb = b.empty(partials, zeros=True), b.empty(partials, zeros=True)
        w64 = b.widen(W) if has_w else np.ones(P)
        b.call("backward_groups", dy3, X3, R // C, mode.center, int(kind), b.params_ix(), w64, MEAN, RSTD, counts,
               plan.groups_per_block, row_dy, row_dyx, pdw, pdb, dh3, dx, THREADS)
        if kind is AffineKind.INNER:
            b.sum0(pdw, DW)
            b.sum0(pdb, DB)
        elif kind is AffineKind.ROW:
            dw, db = b.empty((P,), out=DW, zeros=True), b.empty((P,), out=DB, zeros=True)
            w, _ = _weight_args(b, param_dtype, has_w, has_b)
            b.call("gradient_sums", b.view(row_dy, (1, R), (R,)), b.view(row_dyx, (1, R), (R,)), b.ix("rg"),
                   b.params_ix(), w, has_w, RSTD, b.empty((C,)), b.empty((C,)), dw, db)
    elif route.backward == "columns":
        P = plan.param_size if affine else 0
        dw = b.empty((P,), out=DW if affine else None)
        db = b.empty((P,), out=DB if affine else None)
        w, _ = _weight_args(b, param_dtype, has_w, has_b)
        b.call("backward_cols", dy3, X3, MEAN, RSTD, counts, plan.rows_per_block, b.ix("rg"), b.params_ix(), w,
               has_w, route.stats_grad, mode.center, dw, db, dh3, dx, THREADS)
    else:  # "rows", of the rows or groups strategy
        dy_rows = b.view(dy3, plan.rows, plan.kernel_shape)
        x_rows = b.view(X3, plan.rows, plan.kernel_shape)
        mean_r = b.per_row(MEAN)
        w, _ = _weight_args(b, param_dtype, has_w, has_b)
        group_g = group_gx = RSTD  # unread when no gradient flows through the statistics
        if route.stats_grad or affine:
            part_dy, part_dyx = b.empty((A, R)), b.empty((A, R))
            b.call("sums_rows", dy_rows, x_rows, mean_r, part_dy, part_dyx, THREADS)
            P = plan.param_size if affine else 0
            dw = b.empty((P,), out=DW if affine else None, zeros=True)
            db = b.empty((P,), out=DB if affine else None, zeros=True)
            group_g, group_gx = b.empty((C,)), b.empty((C,))
            b.call("gradient_sums", part_dy, part_dyx, b.ix("rg"), b.params_ix(), w, has_w, RSTD, group_g, group_gx,
                   dw, db)
        k1, k2, k3 = (b.empty((R,)) for _ in range(3))
        b.call("dx_coefficients", group_g, group_gx, counts, b.ix("rg"), b.params_ix(), w, has_w, RSTD,
               route.stats_grad, mode.center, k1, k2, k3)
        dh_rows = None if dh3 is None else b.view(dh3, plan.rows, plan.kernel_shape)
        b.call("dx_rows", dy_rows, x_rows, mean_r, k1, k2, k3, plan.rows_per_block, dh_rows, dx, THREADS)
    return b.program()
