"""normalize / backward: one orchestration of the kernel contract, in phases.

Forward: check the call (:func:`_check_forward`, a frozen record of the checked
arguments) → batch statistics (one pass, moments, or synchronized) → running-statistics
update → the statistics the output uses (batch, running or estimated) → apply. Backward:
check → gradient sums → (synchronized sums) → dx coefficients → dx. Every check happens in
the first phase, before any kernel runs and before any running statistic is written, so bad
input raises and leaves the caller's state exactly as it was. The kernels
(:class:`normcore.backend.Kernels`, src/normcore/kernels.pxi on the CPU) check nothing.

Numerics
--------
* Statistics accumulate in double: one pass of sums shifted by a member of each chunk or
  block, partials merged exactly (two-pass over their means, Chan); the output is
  normalized with the biased variance.
* ``running_var`` receives the unbiased variance n/(n-1) by default (PyTorch's
  convention); ``unbiased=False`` stores the biased one (Flax, Keras, CS231n).
* ``momentum`` follows PyTorch: running = (1 - m) * running + m * batch; ``decay=d``
  instead takes the TF/Keras/Flax convention, running = d * running + (1 - d) * batch (the
  update multiplies by d itself); giving both is an error.
"""
from __future__ import annotations

import weakref
from math import prod
from typing import NamedTuple

import numpy as np

from . import checks, masking, sync
from .backend import CPU, AffineKind
from .kernels import GRAIN
from .checks import describe_mode
from .modes import Mode, get_mode
from .plan import Plan, Strategy, make_plan
from .route import Capabilities, Route, resolve

__all__ = ["normalize", "add_normalize", "backward", "NormCache"]


class _Run:
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
            return _Run(be, threads)
        run = _SERIAL[be] = _Run(be, 1)
        return run

    def ix(self, plan, name):
        """The plan's index array ``name`` (rg, rp, rc) on this backend."""
        return self.be.index(plan, name)

    def params_ix(self, plan):
        """rp, or (no parameters) any index of the right length: it is never read then."""
        return self.be.index(plan, "rp" if plan.rp is not None else "rg")

    def dummy(self, plan, dtype):
        """A one-element array standing in for an absent weight or bias (never read)."""
        return self.be.constant(plan, ("dummy", dtype), lambda: np.zeros(1, dtype))


_SERIAL: dict = {}


class NormCache:
    """What backward needs from one forward call: plan, canonical x, mean and 1/std.

    When x is already C-contiguous in the canonical layout the cache holds x itself, not a
    copy (as autograd frameworks save their inputs): changing x in place between forward
    and backward changes the gradients.
    """

    __slots__ = ("mode", "plan", "x3", "dtype", "mean", "rstd", "weight", "weight64", "has_weight",
                 "has_bias", "param_dtype", "stats_grad", "count", "comm", "backend", "view", "mask", "counts",
                 "not_data", "route")

    def __init__(self, mode, plan, x3, dtype, mean, rstd, weight, has_bias, stats_grad, count,
                 comm=None, backend=CPU, param_dtype=None, route=None):
        self.mode = mode
        self.plan = plan
        self.x3 = x3                # the input in the canonical layout, plan.kernel_shape
        self.dtype = dtype
        self.mean = mean            # (C,) float64 mean used to normalize (0 when not centred)
        self.rstd = rstd            # (C,) float64 1 / sqrt(var + eps)
        self.weight = weight        # (P,) weight in its own dtype, or None
        self.weight64 = None        # the same in float64, made when a kernel needs it
        self.has_weight = weight is not None
        self.has_bias = has_bias
        # dweight and dbias have the parameters' dtype (x's, or float32 beside a half x)
        self.param_dtype = dtype if param_dtype is None else param_dtype
        self.stats_grad = stats_grad  # gradients flow through batch statistics
        self.count = count          # elements per group, all ranks
        self.comm = comm            # communicator the statistics were synchronized over
        self.backend = backend      # where x3 and the statistics live
        # (x shape, parameter shape) the caller sees when a form presented the mode's
        # arrays under other shapes (layer norm over k axes: the mode over their product)
        self.view = None
        # mask=: the mask as the kernels read it (masking.MaskRows), and, where the
        # statistics were masked, the counted elements per group (all ranks); None without
        self.mask = None
        self.counts = None
        # the caller's mask (broadcasting to plan.shape) whenever one was given, training or
        # eval: its False positions are not data, and backward leaves them out entirely
        self.not_data = None
        self.route = route          # the forward's route: which backward runs (None: empty)

    @property
    def shape(self):
        """Shape of the forward input, and of dy and dx."""
        return self.plan.shape if self.view is None else self.view[0]

    @property
    def saved_mean(self):
        """Per-group mean used by forward, shaped like the statistics axes (float64).

        >>> import numpy as np, normcore
        >>> _, cache = normcore.normalize(np.arange(6, dtype=np.float32).reshape(2, 3), "layer_norm")
        >>> cache.saved_mean.tolist()
        [1.0, 4.0]
        """
        return self.mean.reshape(self.plan.stat_shape)

    @property
    def saved_rstd(self):
        """Per-group inverse standard deviation used by forward (float64), shaped like
        :attr:`saved_mean`."""
        return self.rstd.reshape(self.plan.stat_shape)

    def weight_f64(self):
        if self.weight64 is None:
            self.weight64 = self.weight.astype(np.float64)
        return self.weight64


def _plan(mode: Mode, x, sizes) -> Plan:
    try:
        return make_plan(mode, x.shape, sizes)
    except ValueError as e:
        if str(e).startswith("sizes:"):  # the call's sizes, not x, are wrong
            raise
        raise ValueError(f"x: {e} ({describe_mode(mode)}, x.shape {x.shape})") from None


def _shaped(a, shape):
    """``a`` viewed as ``shape``: itself when it has that shape already (each reshape makes
    a view object, which small calls notice)."""
    return a if a.shape == shape else a.reshape(shape)


def _canonical(a, plan: Plan, xp=np):
    """``a`` as a C-contiguous array of ``plan.kernel_shape``; a view when no copy is needed."""
    if plan.perm is None:
        if type(a) is xp.ndarray and a.flags.c_contiguous:
            return _shaped(a, plan.kernel_shape)
        return xp.ascontiguousarray(a).reshape(plan.kernel_shape)  # subclasses (np.matrix) become arrays
    e = a.reshape(plan.elem_shape).transpose(plan.perm)
    return xp.ascontiguousarray(e).reshape(plan.kernel_shape)


def _output(out, plan: Plan, dtype, xp=np):
    """Where the kernels write y or dx: ``out``, or a new array of x's shape, when no
    transpose follows (the elementwise kernels read their output's data, not its shape);
    else a new (A, R, S) array."""
    if plan.perm is None:
        return xp.empty(plan.shape, dtype) if out is None else out
    return xp.empty(plan.rows, dtype)


def _from_canonical(a3, plan: Plan, xp=np):
    if plan.perm is None:
        return a3.reshape(plan.shape)
    moved = a3.reshape([plan.elem_shape[i] for i in plan.perm])
    return xp.ascontiguousarray(moved.transpose(tuple(np.argsort(plan.perm)))).reshape(plan.shape)


def _result(rows, plan: Plan, out, xp=np):
    """The result the kernels wrote into :func:`_output`'s array, in the input's layout
    (in ``out`` when given)."""
    if plan.perm is None:
        return rows
    if out is None:
        return _from_canonical(rows, plan, xp)
    out[...] = _from_canonical(rows, plan, xp)
    return out


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------

class _Forward(NamedTuple):
    """The checked arguments of one normalize call and what they decide."""

    mode: Mode
    plan: Plan
    be: object
    dtype: np.dtype
    weight: object          # (P,) view in x's dtype, or None
    bias: object
    running_mean: object    # the caller's arrays (written in place), or None
    running_var: object
    training: bool
    momentum: float         # running = keep * running + momentum * batch
    keep: float
    eps: float
    unbiased: bool
    estimate: bool
    out: object
    link: object            # sync.Exchange when the batch statistics are synchronized
    use_batch: bool         # batch statistics are computed (training, or no running ones)
    update: bool            # the running statistics are written
    route: Route            # the kernels the call runs (normcore.route)
    residual: object = None  # add_normalize's residual: the input is h = x + residual
    h_out: object = None     # where h is written (add_normalize's h_out), or None
    given_mask: object = None  # the caller's boolean mask (checked), or None: backward's rule

    @property
    def mask(self):
        """The mask the batch statistics use: the caller's, unless none are computed."""
        return self.given_mask if self.use_batch else None


def _check_forward(x, be, mode, weight, bias, running_mean, running_var, training, momentum, decay, eps,
                   unbiased, estimate, out, sizes, link, residual=None, h_out=None, mask=None) -> _Forward:
    """Phase 1: every rule on the arguments (x's array type already checked: ``be``)."""
    training, estimate = bool(training), bool(estimate)
    has_running = running_mean is not None
    key = (mode, x.shape, x.dtype, tuple(sizes.items()), weight is None, bias is None, has_running,
           running_var is None, training, estimate, link is None, be, mask is None, residual is None)
    try:
        fixed = _SIGNATURES.get(key)
    except TypeError:  # an unhashable argument: the rules below name it
        fixed = key = None
    plan = None if fixed is None else fixed[1]()  # held weakly: the plan cache decides its life
    if plan is None:
        m, plan, use_batch, route = _check_signature(x, be, mode, weight, bias, running_mean, running_var,
                                                     training, estimate, sizes, link, mask is not None,
                                                     residual is not None)
        if key is not None:
            if len(_SIGNATURES) >= _MAX_SIGNATURES:
                _SIGNATURES.clear()
            _SIGNATURES[key] = (m, weakref.ref(plan), use_batch, route)
    else:
        m, _, use_batch, route = fixed
    dtype = x.dtype
    for name, a, shape in (("weight", weight, plan.param_shape), ("bias", bias, plan.param_shape),
                           ("running_mean", running_mean, plan.running_shape),
                           ("running_var", running_var, plan.running_shape)):
        checks.param(name, a, shape, dtype, be)
    checks.same_dtype("weight", weight, "bias", bias)
    checks.same_dtype("running_mean", running_mean, "running_var", running_var)
    if has_running:
        if training:
            for name, a in (("running_mean", running_mean), ("running_var", running_var)):
                if not getattr(a.flags, "writeable", True):
                    raise ValueError(f"{name}: must be writeable to be updated in training")
    eps = checks.eps(eps)
    momentum, keep = checks.running_rate(momentum, decay)
    if residual is not None:
        checks.like_x("residual", residual, x.shape, dtype, be)
    if mask is not None:
        checks.mask(mask, x.shape, be)
    if h_out is not None:
        if residual is None:
            raise ValueError("h_out: only add_normalize writes h (no residual was given)")
        checks.out(h_out, x.shape, dtype, {}, be, name="h_out")
    if out is not None:
        checks.out(out, x.shape, dtype, {}, be)  # its overlaps: disjoint, below
    if out is not None or h_out is not None or (has_running and training):
        # every array the call writes is apart from every other it touches: y written over
        # weight or a running statistic, or a running statistic over x, would be read back
        # changed (backward reads x)
        writes_running = has_running and training
        checks.disjoint({"out": out, "h_out": h_out, "running_mean": running_mean if writes_running else None,
                         "running_var": running_var if writes_running else None},
                        {"x": x, "residual": residual, "weight": weight, "bias": bias,
                         "running_mean": None if writes_running else running_mean,
                         "running_var": None if writes_running else running_var}, be)
    if estimate and not (has_running and training):
        raise ValueError("estimate: needs running_mean and running_var and training=True")
    if not use_batch:
        link = None  # eval with running statistics: nothing to exchange
    if link is None and plan.count <= 1 and x.size:  # synchronized: checked once all ranks' counts are known
        _check_count(plan.count, plan.layout[1], training, m, x.shape)
    return _Forward(m, plan, be, dtype,
                    None if weight is None else _flat(weight, be),
                    None if bias is None else _flat(bias, be),
                    running_mean, running_var, training, momentum, keep, eps, bool(unbiased),
                    estimate, out, link, use_batch, route.update, route, residual, h_out, mask)


# What a call's signature (mode, x's shape and dtype, sizes, which arguments are given, the
# flags) decides, kept per signature: the rules it passed and the plan it chose.
_SIGNATURES: dict = {}
_MAX_SIGNATURES = 1024


def _check_signature(x, be, mode, weight, bias, running_mean, running_var, training, estimate, sizes,
                     link, masked=False, residual=False):
    """The rules that depend on the call's signature alone; returns (mode, plan, use_batch,
    route)."""
    m = get_mode(mode)
    if link is not None:
        sync.check_batch_mode(m, x)
    plan = _plan(m, x, sizes)
    if m.params is None and (weight is not None or bias is not None):
        raise ValueError(f"weight/bias: {describe_mode(m)} has no affine parameters")
    has_running = running_mean is not None
    if has_running != (running_var is not None):
        raise ValueError("running_mean/running_var: give both or neither")
    if has_running and m.running_stats is None:
        raise ValueError(f"running_mean: {describe_mode(m)} keeps no running statistics")
    use_batch = training or not has_running
    route = resolve(plan, Capabilities.of(be), center=m.center, use_batch=use_batch, estimate=estimate,
                    update=training and has_running and plan.layout[1] > 0, synced=link is not None,
                    masked=masked, residual=residual, affine=weight is not None or bias is not None,
                    counts_ruled=training and m.running_stats is not None)
    return m, plan, use_batch, route


def _flat(a, be):
    """A parameter as the kernels read it: 1-D and C-contiguous (a view when it is)."""
    if a.ndim == 1 and a.flags.c_contiguous:
        return a
    return be.xp.ascontiguousarray(a).reshape(-1)


def _check_count(n, C, training, m: Mode, shape):
    if n == 0 and C > 0:
        raise ValueError(f"x: cannot compute statistics over zero elements ({describe_mode(m)}, x.shape {shape})")
    if training and m.running_stats is not None and n == 1:
        raise ValueError(f"x: expected more than 1 value per statistics group in training, "
                         f"got x.shape {shape} ({describe_mode(m)})")


def _forward(call: _Forward, x):
    """Phases 2-5 of a checked call; returns (y, cache), or (y, h, cache) with a residual."""
    plan, xp, route = call.plan, call.be.xp, call.route
    # A rule that needs the statistics (the ranks' exchange, the masked counts) may still
    # refuse the call after h or a one-pass y exist: those are then made in arrays of
    # the call's own and copied to the caller's h_out / out once every rule has passed.
    late_rules = route.late_rules
    h_out = None if late_rules else call.h_out
    r3 = h3 = None
    if route.residual == "fused":  # h made by the one-pass kernel, group by group
        r3 = _canonical(call.residual, plan, xp)
        h3 = xp.empty(plan.kernel_shape, call.dtype) if h_out is None else _shaped(h_out, plan.kernel_shape)
    elif route.residual == "add":  # h first, then the forward of h
        x = add(call.be, x, call.residual, h_out)
    if route.empty:
        y, cache = _empty_forward(call, x)
        return (y, cache) if call.residual is None else (y, _deliver(x, call.h_out, late_rules), cache)
    x3 = _canonical(x, plan, xp)
    run = _Run.of(call.be, x3.size)
    out = call.out
    y_rows = _output(None if late_rules and route.output is None else out, plan, call.dtype, xp)
    count = plan.count
    mean = var = rstd = None
    # the mask as the kernels read it: for the statistics (call.mask), and for backward
    # whenever one was given (its masked-out positions are not data, in eval too)
    mask3 = None if call.given_mask is None else masking.mask_rows(call.given_mask, plan, call.be, _canonical)
    if call.use_batch:
        mean, var, rstd, count = _batch_statistics(call, x3, y_rows, run, r3, h3,
                                                   None if call.mask is None else mask3)
        if h3 is not None:
            x = x3 = h3  # what the kernel normalized, and what backward reads
    if route.update:
        _update_running(call, mean, var, count, run)
    if route.output in ("running", "running inner"):
        mean, var, rstd = _apply_running(call, x3, y_rows, run)
    elif route.output is not None:
        _apply(call, _shaped(x3, plan.rows), mean, rstd, y_rows, run)
    cache = NormCache(call.mode, plan, x3, call.dtype, mean, rstd, call.weight, call.bias is not None,
                      stats_grad=call.use_batch and not call.estimate, count=count,
                      comm=None if call.link is None else call.link.comm, backend=call.be,
                      param_dtype=_param_dtype(call), route=route)
    if call.mask is not None:
        cache.counts = count
        cache.count = int(run.be.to_host(count).sum())  # (what synchronized ranks agree on)
    cache.mask = mask3
    cache.not_data = call.given_mask
    y = _result(y_rows, plan, out, xp)
    if out is not None and y is not out:  # made apart (late rules): every rule has passed
        out[...] = y
        y = out
    if call.residual is None:
        return y, cache
    return y, _deliver(_shaped(x, plan.shape), call.h_out, late_rules), cache


def _deliver(h, h_out, made_apart):
    """h as the call returns it: the caller's ``h_out`` when given (a copy of h into it
    when h was ``made_apart`` from it), else h."""
    if h_out is None:
        return h
    if made_apart:
        h_out[...] = h
    return h_out


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
    run = _Run.of(be, a.size)
    run.K.add(a, b, out, run.threads)
    return out


def _empty_forward(call: _Forward, x):
    """An input without elements (as PyTorch): an empty output, the running statistics
    untouched, statistics that do not exist (NaN; a zero-stride view where the groups are
    many), and a cache whose backward gives an empty dx and zero parameter gradients."""
    plan, xp = call.plan, call.be.xp
    y = xp.empty(x.shape, call.dtype) if call.out is None else call.out
    C = prod(plan.stat_shape)  # (the layout's C of an empty axis can read 1)
    nan = xp.full(C, np.nan) if C <= 65536 else xp.broadcast_to(xp.asarray(np.nan), (C,))
    cache = NormCache(call.mode, plan, _canonical(x, plan, xp), call.dtype, nan, nan, call.weight,
                      call.bias is not None, stats_grad=False, count=0, backend=call.be,
                      param_dtype=_param_dtype(call))
    return y, cache


def _batch_statistics(call: _Forward, x3, y_rows, run: _Run, r3=None, h3=None, mask3=None):
    """Phase 2: per-group (mean, var, rstd) of the batch and the elements per group (all
    ranks'; with a mask, the (C,) counted elements of each group). The one-pass kernel
    also writes the output (and h = x3 + r3 into h3 when a residual is fused)."""
    plan, xp = call.plan, run.xp
    C = plan.layout[1]
    mean, var, rstd = xp.empty(C), xp.empty(C), xp.empty(C)
    statistics = call.route.statistics
    if call.route.masked:
        return _masked_statistics(call, x3, mask3, y_rows, run, mean, var, rstd)
    if statistics == "groups":
        _normalize_groups(call, x3, mean, var, rstd, y_rows, run, r3, h3)
        return mean, var, rstd, plan.count
    if statistics == "columns":
        _normalize_columns(call, x3, mean, var, rstd, y_rows, run)
        return mean, var, rstd, plan.count
    if call.route.synced:
        pmean, pm2, counts, count = sync.synced_moments(
            call.link, lambda: _moments(x3, plan, run), plan, call.mode, call.dtype, call.training, run.be,
            settings=_sync_settings(call))
        _check_count(count, C, call.training, call.mode,
                     f"{plan.shape} on this rank, {count} elements per group on all ranks")
    elif C:
        pmean, pm2, counts = _moments(x3, plan, run)
        count = plan.count
    else:
        return mean, var, rstd, plan.count
    if C:
        run.K.finalize_moments(pmean, pm2, counts, float(max(count, 1)), call.mode.center, call.eps,
                               mean, var, rstd)
    return mean, var, rstd, count


def _masked_statistics(call: _Forward, x3, mask3, y_rows, run: _Run, mean, var, rstd):
    """Phase 2 over the counted elements: (mean, var, rstd, counts), counts (C,) per group."""
    plan, xp = call.plan, run.xp
    C = plan.layout[1]
    if call.route.statistics == "groups":
        counts = xp.empty(C)
        _normalize_groups(call, x3, mean, var, rstd, y_rows, run, mask3=mask3, counts=counts)
    else:
        if call.route.synced:
            pmean, pm2, pcount = sync.synced_counted_moments(
                call.link, lambda: _masked_moments(x3, mask3, plan, run), plan, call.mode, call.dtype,
                call.training, run.be, settings=_sync_settings(call))
        else:
            pmean, pm2, pcount = _masked_moments(x3, mask3, plan, run)
        counts = masking.finalize_counted(xp, pmean, pm2, pcount, call.mode.center, call.eps, mean, var, rstd)
    masking.check_counts(counts, run.be, call.route.counts_ruled, call.update,
                         f"{describe_mode(call.mode)}, x.shape {plan.shape}")
    return mean, var, rstd, counts


def _sync_settings(call: _Forward):
    """Every setting synchronized ranks must share, because it changes what they exchange
    or what they compute from it: the normalization (centring, parameters given and their
    dtype), eps, estimate, whether running statistics are updated and how (momentum, the
    exact decay, unbiased). The mode's spec, the statistics shape, x's dtype, training and the mask's presence are
    in the signature already (:func:`normcore.sync._signature`)."""
    update = call.update
    return (("centred", call.mode.center), ("eps", call.eps), ("estimate", call.estimate),
            ("weight given", call.weight is not None), ("bias given", call.bias is not None),
            ("parameter dtype", _param_dtype(call).name),
            ("running statistics updated", update),
            ("momentum", call.momentum if update else None), ("decay", call.keep if update else None),
            ("unbiased", call.unbiased if update else None))


def _masked_moments(x3, mask3, plan: Plan, run: _Run):
    """:func:`_moments` over the counted elements (``mask3``: masking.MaskRows):
    ``(pmean, pm2, pcount)``, (K, C) each."""
    A, C, B = plan.layout
    xp = run.xp
    m = mask3
    if plan.strategy is Strategy.COLUMNS:
        parts = [xp.empty((len(plan.partial_counts), C)) for _ in range(3)]
        run.K.masked_moments_cols(x3, m.base, m.offsets, m.step, plan.rows_per_block, *parts, run.threads)
        return tuple(parts)
    R = plan.rows[1]
    scattered = plan.strategy is Strategy.SCATTERED  # per-row partials, regrouped
    parts = [xp.empty((A, R) if scattered else (A, C)) for _ in range(3)]
    run.K.masked_moments_rows(_shaped(x3, plan.rows), m.base, m.offsets, m.step, 1 if scattered else R // C,
                              *parts, run.threads)
    return tuple(_by_group(p, plan, xp) for p in parts) if scattered else tuple(parts)


def _by_group(p, plan: Plan, xp):
    """Per-row partials of a scattered plan reordered to (partials of a group, C)."""
    row_shape = plan.elem_shape[:len(plan.scattered)]
    return xp.ascontiguousarray(p.reshape(row_shape).transpose(plan.scattered)).reshape(-1, plan.layout[1])


def _moments(x3, plan: Plan, run: _Run):
    """Partial moments of the groups, ``(pmean, pm2, counts)``: (K, C) partial means and
    centred sums of squares over counts[k] elements each, from one compiled pass over x."""
    A, C, B = plan.layout
    xp = run.xp
    strategy = plan.strategy
    if strategy is Strategy.SCATTERED:
        return _scattered_moments(_shaped(x3, plan.rows), plan, run)
    if strategy is Strategy.COLUMNS:
        nb = len(plan.partial_counts)
        pmean, pm2 = xp.empty((nb, C)), xp.empty((nb, C))
        run.K.moments_cols(x3, plan.rows_per_block, pmean, pm2, run.threads)
    else:
        pmean, pm2 = xp.empty((A, C)), xp.empty((A, C))
        run.K.moments_rows(x3, pmean, pm2, run.threads)
    return pmean, pm2, run.be.constant(plan, "partial counts", lambda: plan.partial_counts)


def _scattered_moments(x_rows, plan: Plan, run: _Run):
    """Groups whose rows lie apart: per-row partials, reordered to (partials of a group, C)."""
    R = plan.rows[1]
    xp = run.xp
    pmean, pm2 = xp.empty((1, R)), xp.empty((1, R))
    run.K.moments_rows(x_rows, pmean, pm2, run.threads)
    return (_by_group(pmean, plan, xp), _by_group(pm2, plan, xp),
            run.be.constant(plan, "partial counts", lambda: plan.partial_counts))


def _normalize_groups(call: _Forward, x3, mean, var, rstd, y_rows, run: _Run, r3=None, h3=None, mask3=None,
                      counts=None):
    """The one-pass forward of an A == 1 layout (statistics and y; of h3 = x3 + r3 when
    a residual is given; over the counted elements, their number into ``counts``, with
    ``mask3``)."""
    plan, xp = call.plan, run.xp
    affine = AffineKind.NONE
    w = b = run.dummy(plan, np.dtype(np.float64))
    if call.weight is not None or call.bias is not None:
        affine = AffineKind.INNER if plan.param_inner else AffineKind.ROW
        P = plan.param_size
        w = xp.ones(P) if call.weight is None else call.weight.astype(np.float64)
        b = xp.zeros(P) if call.bias is None else call.bias.astype(np.float64)
    rp = run.params_ix(plan)
    if mask3 is not None:
        run.K.masked_normalize_groups(x3, mask3.base, mask3.offsets, mask3.step, plan.rows[1] // plan.layout[1],
                                      call.mode.center, call.eps, int(affine), rp, w, b, mean, var, rstd, counts,
                                      y_rows, run.threads)
        return
    run.K.normalize_groups(x3, r3, h3, plan.rows[1] // plan.layout[1], call.mode.center, call.eps, int(affine),
                           rp, w, b, mean, var, rstd, y_rows, run.threads)


def _normalize_columns(call: _Forward, x3, mean, var, rstd, y_rows, run: _Run):
    """The column strategy's forward from one kernel call: moments, their finalization,
    the per-column coefficients and y."""
    plan = call.plan
    w, b = _params_or_dummies(call, run)
    run.K.normalize_cols(x3, plan.rows_per_block, call.mode.center, call.eps, run.ix(plan, "rg"),
                         run.params_ix(plan), w, b, call.weight is not None, call.bias is not None, mean, var,
                         rstd, y_rows, run.threads)


def _param_dtype(call: _Forward):
    """The dtype of the call's weight and bias (x's when it has neither)."""
    given = call.weight if call.weight is not None else call.bias
    return call.dtype if given is None else given.dtype


def _params_or_dummies(call: _Forward, run: _Run):
    """(weight, bias) as the row kernels read them: absent ones replaced by a placeholder
    of the other's dtype (the kernels read both in one)."""
    w, b = call.weight, call.bias
    if w is None or b is None:
        dummy = run.dummy(call.plan, _param_dtype(call))
        return (dummy if w is None else w), (dummy if b is None else b)
    return w, b


def _update_running(call: _Forward, mean, var, count, run: _Run):
    """Phase 3: running = keep * running + momentum * batch, in place (through
    contiguous copies when the caller's arrays are strided)."""
    plan = call.plan
    rm, rv = _flat(call.running_mean, run.be), _flat(call.running_var, run.be)
    if isinstance(count, (int, float)):
        unbias = count / (count - 1) if call.unbiased else 1.0
    else:  # masked: each group's own count (at least 2: masking.check_counts)
        var, unbias = (var * (count / (count - 1)) if call.unbiased else var), 1.0
    run.K.update_running(mean, var, run.ix(plan, "rc"), float(plan.groups_per_running), call.momentum,
                         call.keep, unbias, rm, rv, run.xp.empty(2 * rm.size))
    for target, value in ((call.running_mean, rm), (call.running_var, rv)):
        if not target.flags.c_contiguous:  # _flat copied it
            target[...] = value.reshape(target.shape)


def _apply_running(call: _Forward, x3, y_rows, run: _Run):
    """Phases 4 and 5 without batch statistics (eval) or for estimated batch norm (after
    the update): per-group statistics from the stored running ones, and y from them."""
    plan, xp = call.plan, run.xp
    C = plan.layout[1]
    mean, var, rstd = xp.empty(C), xp.empty(C), xp.empty(C)
    rm, rv = _flat(call.running_mean, run.be), _flat(call.running_var, run.be)
    if plan.param_inner and (call.weight is not None or call.bias is not None):
        if C:
            run.K.running_statistics(rm, rv, run.ix(plan, "rc"), call.eps, mean, var, rstd)
        _apply(call, _shaped(x3, plan.rows), mean, rstd, y_rows, run)
    else:  # one scale and shift per row: one kernel call
        w, b = _params_or_dummies(call, run)
        x_rows = x3 if x3.ndim == 2 else _shaped(x3, plan.rows)  # the kernel takes columns as (A, C)
        run.K.normalize_running(x_rows, rm, rv, run.ix(plan, "rc"), call.eps, run.ix(plan, "rg"),
                                run.params_ix(plan), w, b, call.weight is not None, call.bias is not None,
                                plan.rows_per_block, mean, var, rstd, y_rows, run.threads)
    return mean, var, rstd


def _apply(call: _Forward, x_rows, mean, rstd, y_rows, run: _Run):
    """Phase 5: y from the per-group statistics, on the (A, R, S) view."""
    plan, xp = call.plan, run.xp
    w, b = call.weight, call.bias
    R = plan.rows[1]
    rg = run.ix(plan, "rg")
    if plan.param_inner and (w is not None or b is not None):
        P = plan.param_size
        mean_r, rstd_r = _per_row(mean, plan, run), _per_row(rstd, plan, run)
        run.K.affine_inner(x_rows, mean_r, rstd_r, run.ix(plan, "rp"),
                           xp.ones(P) if w is None else w.astype(np.float64),
                           xp.zeros(P) if b is None else b.astype(np.float64), y_rows, run.threads)
        return
    # y = (x - mean) * rstd * w + b = (x - mean) * scale + shift, with scale = rstd * w
    # and shift = b per row: one subtract and one multiply-add per element (float32 inputs:
    # in float32, within the accuracy contract; see simd.h).
    mean_r, scale, shift = xp.empty(R), xp.empty(R), xp.empty(R)
    w_, b_ = _params_or_dummies(call, run)
    run.K.row_coefficients(mean, rstd, rg, run.params_ix(plan), w_, b_, w is not None, b is not None,
                           mean_r, scale, shift)
    run.K.affine_rows(x_rows, mean_r, scale, shift, plan.rows_per_block, y_rows, run.threads)


def _per_row(values, plan: Plan, run: _Run):
    """Per-group values spread to rows (``values`` itself when each row is its group)."""
    return values if run.be.is_identity(plan, "rg", len(values)) else values[run.ix(plan, "rg")]


def forward(x, be, mode, *, weight=None, bias=None, running_mean=None, running_var=None, training=True,
            momentum=checks.DEFAULT_MOMENTUM, eps=1e-5, unbiased=True, estimate=False, out=None, comm=None,
            sizes=None, decay=None, residual=None, h_out=None, mask=None):
    """:func:`normalize` for an ``x`` whose array type the caller has checked (``be`` is
    its backend): the entry of the forms and layers, which check x once themselves. With
    ``residual``, :func:`add_normalize` (returns ``(y, h, cache)``)."""
    sizes = {} if sizes is None else sizes
    if comm is None:
        call = _check_forward(x, be, mode, weight, bias, running_mean, running_var, training, momentum,
                              decay, eps, unbiased, estimate, out, sizes, None, residual, h_out, mask)
        return _forward(call, x)
    sync.check_comm(comm)  # without a communicator there is no one to tell
    link = sync.Exchange(comm, "forward")
    try:
        call = _check_forward(x, be, mode, weight, bias, running_mean, running_var, training, momentum,
                              decay, eps, unbiased, estimate, out, sizes, link, residual, h_out, mask)
        return _forward(call, x)
    except BaseException as e:  # any failure (MemoryError too) reaches the peers, once
        if training or running_mean is None:  # this call exchanges batch statistics
            link.fail(e)
        raise


def _x_backend(x, comm, training, running_mean):
    """x's backend (checks.array); a rejected x still reaches the peers of a synchronized
    call that exchanges batch statistics, carrying the error."""
    try:
        return checks.array("x", x)
    except TypeError as e:
        if comm is not None and (training or running_mean is None):
            sync.check_comm(comm)
            sync.Exchange(comm, "forward").fail(e)
        raise


def normalize(x, mode, *, weight=None, bias=None, running_mean=None, running_var=None,
              training=True, momentum=checks.DEFAULT_MOMENTUM, eps=1e-5, unbiased=True, estimate=False,
              out=None, comm=None, decay=None, mask=None, **sizes):
    """Normalize ``x`` with a registered mode; return ``(y, cache)`` for :func:`backward`.

    Parameters
    ----------
    x : ndarray, float32, float64, float16 or bfloat16, any shape the mode's spec accepts.
    mode : str or Mode
        A name from :func:`normcore.modes` or a :class:`normcore.Mode`.
    weight, bias : ndarray of the mode's parameter shape, optional.
        In x's dtype, or float32 beside a float16 / bfloat16 x (both in one dtype);
        backward returns their gradients in it.
    running_mean, running_var : ndarray of the running-statistics shape, optional.
        Updated in place in training mode (only after every check has passed); dtypes as
        for weight and bias.
    training : bool
        True: normalize with batch statistics (and update running statistics if given).
        False: normalize with the running statistics if given, else batch statistics.
    momentum : float in [0, 1], default 0.1
        PyTorch's convention: running = (1 - momentum) * running + momentum * batch.
    decay : float in [0, 1], optional
        TF/Keras/Flax's convention instead: running = decay * running + (1 - decay) * batch
        (decay 0.99 is momentum 0.01). Giving both is a ValueError.
    eps : float > 0
    unbiased : bool
        Store the unbiased (n/(n-1)) batch variance in running_var (default) or the biased one.
    estimate : bool
        Estimated batch norm: in training, update the running statistics first, then
        normalize with them; no gradient flows through the statistics.
    out : ndarray, optional
        Where to write y (x's shape and dtype, C-contiguous, not overlapping x): reusing
        one buffer avoids a fresh allocation per call, which costs page faults for large
        outputs.
    comm : mpi4py communicator, optional
        Synchronize the batch statistics over the ranks of ``comm`` (data-parallel
        training; the mode must reduce over x's first axis): each rank passes its slice of
        the batch and gets the statistics of the whole batch; a rank may hold zero
        samples. One collective per call that computes batch statistics, none in eval mode
        with running statistics; see :mod:`normcore.sync` for the protocol and errors.
    mask : boolean ndarray broadcasting to x's shape, optional
        Statistics over the elements where ``mask`` is True only (padding left out: a
        ``(B, T, 1)`` mask for a ``(B, T, C)`` batch of sequences). y is computed
        everywhere with its group's statistics; the masked-out positions are not data:
        backward (in training and eval) gives the gradient of the call on ``x[mask]``, so
        they add nothing to any gradient sum whatever x and dy hold there, and receive
        dx = 0. Running statistics are updated from the masked ones, unbiased by each
        group's own count. In training a mode with running statistics refuses a group
        with exactly one counted element (as without a mask), and an update of running
        statistics one with none (ValueError, before anything is written). A group with
        no counted element outputs its bias (x̂ = 0). In eval with running statistics the
        mask does not change y.
    **sizes : int
        Axis sizes, e.g. ``g=32`` for group norm.

    Returns
    -------
    y : ndarray of x's shape and dtype, C-contiguous (``out`` when given).
    cache : NormCache

    Example
    -------
    >>> import numpy as np, normcore
    >>> x = np.random.default_rng(0).standard_normal((8, 3, 4, 4)).astype(np.float32)
    >>> y, cache = normcore.normalize(x, "batch_norm")
    >>> dx, dw, db = normcore.backward(np.ones_like(y), cache)
    """
    be = _x_backend(x, comm, training, running_mean)
    return forward(x, be, mode, weight=weight, bias=bias, running_mean=running_mean,
                   running_var=running_var, training=training, momentum=momentum, eps=eps,
                   unbiased=unbiased, estimate=estimate, out=out, comm=comm, sizes=sizes, decay=decay, mask=mask)


def add_normalize(x, residual, mode, *, weight=None, bias=None, running_mean=None, running_var=None,
                  training=True, momentum=checks.DEFAULT_MOMENTUM, eps=1e-5, unbiased=True, estimate=False,
                  out=None, h_out=None, comm=None, decay=None, mask=None, **sizes):
    """The residual add fused with the normalization after it: ``h = x + residual``, then
    :func:`normalize` of h; returns ``(y, h, cache)``.

    ``residual`` has x's shape and dtype; ``h`` is computed in that dtype and rounded as
    NumPy's ``x + residual`` (bitwise the same array), and is the new residual stream.
    Every other argument is :func:`normalize`'s (``out`` receives y); ``h_out`` (optional,
    the rules of ``out``) receives h, so that a training loop can keep both buffers instead
    of paying a fresh allocation's page faults per call. Where each group is
    contiguous in x (layer norm, RMS norm, group and instance norm over (N, C, ...)) one
    kernel visit per group reads x and residual once and writes h and y once; other
    layouts make h in a pass of its own first. :func:`backward` with ``dh=`` (the gradient
    arriving at h from the residual stream) returns ``dh_total``, the gradient with respect
    to h, and so to x and to residual.

    Shapes: x, residual, y, h (any shape the mode's spec accepts, all the same).

    Example
    -------
    >>> import numpy as np, normcore
    >>> rng = np.random.default_rng(0)
    >>> x, r = rng.standard_normal((2, 4, 8), dtype=np.float32), rng.standard_normal((2, 4, 8), dtype=np.float32)
    >>> y, h, cache = normcore.add_normalize(x, r, "layer_norm", weight=np.ones(8, np.float32))
    >>> bool(np.array_equal(h, x + r))
    True
    >>> dh_total, dw, db = normcore.backward(np.ones_like(y), cache, dh=np.ones_like(h))
    """
    be = _x_backend(x, comm, training, running_mean)
    if residual is None:
        raise TypeError("residual: expected an array of x's shape and dtype, got None (use normalize)")
    return forward(x, be, mode, weight=weight, bias=bias, running_mean=running_mean,
                   running_var=running_var, training=training, momentum=momentum, eps=eps,
                   unbiased=unbiased, estimate=estimate, out=out, comm=comm, sizes=sizes, decay=decay,
                   residual=residual, h_out=h_out, mask=mask)


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------

def backward(dy, cache, *, out=None, dh=None):
    """Gradients of :func:`normalize`: return ``(dx, dweight, dbias)``.

    ``dh`` (optional, x's shape and dtype): a gradient reaching the forward input by
    another path, added to dx (after dx's rounding, as NumPy's ``dx + dh``); after
    :func:`add_normalize` it is the residual stream's gradient at h, and dx is then
    ``dh_total``, the gradient with respect to h (so to x and to residual).

    ``dweight`` / ``dbias`` are None when forward had no weight / bias. In training mode
    (batch statistics) the gradient flows through the mean and variance; in eval mode
    and for estimated batch norm the statistics are constants.

    Shapes: ``dy`` has x's shape and dtype; ``dx`` too; dweight/dbias the parameter shape.
    ``out`` (optional) receives dx, under the same rules as in :func:`normalize`.

    After a forward synchronized with ``comm=``, backward makes one collective over the
    same ranks: dx is this rank's slice of the whole batch's gradient, and dweight/dbias
    are the sums over all ranks (identical on every rank: averaging them again across ranks,
    as data-parallel wrappers do for other parameters, leaves them unchanged).

    Example
    -------
    >>> import numpy as np, normcore
    >>> x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    >>> w = np.ones(6, np.float32)
    >>> y, cache = normcore.normalize(x, "layer_norm", weight=w)
    >>> dx, dw, db = normcore.backward(np.ones_like(y), cache)
    >>> db is None
    True
    """
    if not isinstance(cache, NormCache):
        raise TypeError(f"cache: expected the NormCache returned by normalize, got {type(cache).__name__}")
    if cache.comm is None:
        _check_backward(dy, cache, out, dh)
        return _backward(dy, cache, out, None, dh)
    link = sync.Exchange(cache.comm, "backward")
    try:
        _check_backward(dy, cache, out, dh)
        return _backward(dy, cache, out, link, dh)
    except BaseException as e:  # any failure (MemoryError too) reaches the peers, once
        link.fail(e)
        raise


def _check_backward(dy, cache, out, dh=None):
    be, shape = cache.backend, cache.shape
    checks.array("dy", dy, cache.dtype, be)
    if dy.shape != shape:
        raise ValueError(f"dy: expected shape {shape} (the forward input's), got {dy.shape}; "
                         "is the cache from another call?")
    if dh is not None:
        checks.like_x("dh", dh, shape, cache.dtype, be)
    if out is not None:
        checks.out(out, shape, cache.dtype, {"dy": dy, "x": cache.x3}, be)
        checks.disjoint({"out": out}, {"weight": cache.weight, "dh": dh}, be)


def _backward(dy, cache, out, link, dh=None):
    be, plan = cache.backend, cache.plan
    xp = be.xp
    view = cache.view
    if view is not None:  # a form's call on reshaped arrays: the mode's shapes inside
        dy = dy.reshape(plan.shape)
    x3 = cache.x3
    route = cache.route
    strategy = "empty" if route is None else route.backward
    if strategy != "empty" and route.leave_out:
        dy, x3 = _leave_out(dy, cache, xp)  # the backend's sums read no mask: made inert first
    dy3 = _canonical(dy, plan, xp)
    dx_rows = _output(None if out is None else _shaped(out, plan.shape), plan, cache.dtype, xp)
    run = _Run.of(be, dy3.size)
    dh3 = None
    if dh is not None and strategy != "empty" and route.dh_in_dx:  # added by the dx pass itself
        dh3, dh = _canonical(dh.reshape(plan.shape), plan, xp), None
    if strategy == "empty":  # nothing flows: zero parameter gradients
        dw = db = xp.zeros(plan.param_size if (cache.has_weight or cache.has_bias) else 0)
    elif strategy == "one visit":
        dw, db = _backward_one_visit(dy3, x3, cache, dx_rows, run, dh3)
    elif strategy == "inner":
        dw, db = _backward_inner(_shaped(dy3, plan.rows), x3, cache, dx_rows, run, link, dh3)
    elif strategy == "columns":
        dw, db = _backward_columns(dy3, x3, cache, dx_rows, run, dh3)
    else:
        dw, db = _backward_rows(_shaped(dy3, plan.rows), x3, cache, dx_rows, run, link, dh3)
    dx = _result(dx_rows, plan, out if out is None or view is None else out.reshape(plan.shape), xp)
    if view is not None:
        dx = dx.reshape(view[0]) if out is None else out
    if dh is not None:  # a transposing plan or a masked dx: dx (C-contiguous, the caller's layout) += dh
        add(be, dx, dh, dx)
    pshape = plan.param_shape if view is None else view[1]
    dweight = dbias = None
    if cache.has_weight:
        dweight = (dw if len(pshape) == 1 else dw.reshape(pshape)).astype(cache.param_dtype)
    if cache.has_bias:
        dbias = (db if len(pshape) == 1 else db.reshape(pshape)).astype(cache.param_dtype)
    return dx, dweight, dbias


def _mask_args(cache, run: _Run):
    """The sums kernels' mask arguments: the forward's mask where the backend's sums read
    one (they then leave the masked-out positions out), else none."""
    m = cache.mask
    if m is None or not run.be.masked_sums:
        return _NO_MASK
    return {"mask": m.base, "moff": m.offsets, "mstep": m.step}


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
    counted = _canonical(xp.broadcast_to(mask, plan.shape), plan, xp)
    return dy, xp.where(counted, cache.x3, xp.zeros((), cache.dtype))


def viewed(y, cache, x_shape, param_shape, out=None):
    """(y, cache) of a call made on reshaped arrays, presented under the caller's shapes:
    y and dx get ``x_shape``, dweight and dbias ``param_shape``; ``out`` (the caller's,
    given) is returned as y."""
    cache.view = (tuple(x_shape), tuple(param_shape))
    return (y.reshape(x_shape) if out is None else out), cache


def _weight_or_dummy(cache, run: _Run):
    """The forward's weight as the row kernels read it, a placeholder when there was none."""
    return cache.weight if cache.has_weight else run.dummy(cache.plan, cache.param_dtype)


def _param_grads(cache, run: _Run):
    """Zeroed (P,) dweight/dbias accumulators, or empty ones when forward had no parameters."""
    P = cache.plan.param_size if (cache.has_weight or cache.has_bias) else 0
    return run.xp.zeros(P), run.xp.zeros(P)


def _backward_one_visit(dy3, x3, cache, dx_rows, run: _Run, dh3=None):
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
    m = cache.mask
    if m is not None:
        run.K.masked_backward_groups(dy3, x3, m.base, m.offsets, m.step, cache.counts, R // C,
                                     cache.mode.center, int(affine), rp, w64, cache.mean, cache.rstd,
                                     plan.groups_per_block, row_dy, row_dyx, pdw, pdb, dx_rows, run.threads)
    else:
        run.K.backward_groups(dy3, x3, R // C, cache.mode.center, int(affine), rp, w64,
                              cache.mean, cache.rstd, plan.groups_per_block, row_dy, row_dyx, pdw, pdb,
                              dh3, dx_rows, run.threads)
    if affine is AffineKind.INNER:
        return pdw.sum(axis=0), pdb.sum(axis=0)
    if affine is AffineKind.ROW:
        dw, db = _param_grads(cache, run)
        w = _weight_or_dummy(cache, run)
        run.K.gradient_sums(row_dy.reshape(1, R), row_dyx.reshape(1, R), run.ix(plan, "rg"), rp, w, cache.has_weight,
                            cache.rstd, xp.empty(C), xp.empty(C), dw, db)
        return dw, db
    return None, None


def _backward_inner(dy_rows, x3, cache, dx_rows, run: _Run, link=None, dh3=None):
    """Parameters along the rows (layer norm) outside the one-visit case. With ``link``,
    the group sums and parameter gradients are summed over its ranks.

    Sums: row_g / row_gx per row, group_g / group_gx per group, of g = w * dy and g * xhat;
    mean_g / mean_gx their group means, per row."""
    plan, xp = cache.plan, run.xp
    R, P = plan.rows[1], plan.param_size
    x_rows = _shaped(x3, plan.rows)
    rp = run.ix(plan, "rp")
    mean_r, rstd_r = _per_row(cache.mean, plan, run), _per_row(cache.rstd, plan, run)
    w = cache.weight_f64() if cache.has_weight else xp.ones(P)
    nb = max(1, -(-R // plan.rows_per_block))
    row_g, row_gx = xp.empty(R), xp.empty(R)
    pdw, pdb = xp.zeros((nb, P)), xp.zeros((nb, P))
    run.K.sums_inner(dy_rows, x_rows, mean_r, rstd_r, rp, w, plan.rows_per_block, row_g, row_gx,
                     pdw, pdb, run.threads, **_mask_args(cache, run))
    group_g, group_gx = _group_totals(row_g, plan, run), _group_totals(row_gx, plan, run)
    dw, db = pdw.sum(axis=0), pdb.sum(axis=0)
    if link is not None:
        group_g, group_gx, dw, db = sync.sum_over_ranks(link, cache, (group_g, group_gx, dw, db), run.be)
    n = cache.count if cache.counts is None else masking.safe_counts(cache.counts, xp)
    mean_g = _per_row(group_g / n, plan, run) if cache.stats_grad and cache.mode.center else xp.zeros(R)
    mean_gx = _per_row(group_gx / n, plan, run) if cache.stats_grad else xp.zeros(R)
    m = cache.mask
    if m is not None:
        run.K.masked_dx_inner(dy_rows, x_rows, m.base, m.offsets, m.step, mean_r, rstd_r, rp, w, mean_g, mean_gx,
                              dx_rows, run.threads)
        return dw, db
    run.K.dx_inner(dy_rows, x_rows, mean_r, rstd_r, rp, w, mean_g, mean_gx,
                   None if dh3 is None else _shaped(dh3, plan.rows), dx_rows, run.threads)
    return dw, db


def _group_totals(values, plan: Plan, run: _Run):
    """Per-row values summed into their statistics group (bincount adds in row order)."""
    C = plan.layout[1]
    if run.be.is_identity(plan, "rg", C) and len(values) == C:
        return values
    return run.xp.bincount(run.ix(plan, "rg"), weights=values, minlength=C)


def _backward_columns(dy3, x3, cache, dx_rows, run: _Run, dh3=None):
    """The column strategy's backward from one kernel call: the column sums, the group
    and parameter sums, the dx coefficients and dx (what _backward_rows does in four)."""
    plan = cache.plan
    affine = cache.has_weight or cache.has_bias
    P = plan.param_size if affine else 0
    dw, db = run.xp.empty(P), run.xp.empty(P)
    w = _weight_or_dummy(cache, run)
    run.K.backward_cols(dy3, x3, cache.mean, cache.rstd, plan.rows_per_block,
                        run.ix(plan, "rg"), run.params_ix(plan), w, cache.has_weight, float(max(cache.count, 1)),
                        cache.stats_grad, cache.mode.center, dw, db, dh3, dx_rows, run.threads)
    return (dw, db) if affine else (None, None)


def _backward_rows(dy_rows, x3, cache, dx_rows, run: _Run, link=None, dh3=None):
    """One scale per row: dx = dy * k1 + (x - mean) * k2 + k3 with per-row coefficients.
    With ``link``, the group sums and parameter gradients are summed over its ranks.

    Sums: part_dy / part_dyx are partial row sums of dy and dy * (x - mean); group_g /
    group_gx the group sums of g = w * dy and g * xhat."""
    plan, xp = cache.plan, run.xp
    A, R, S = plan.rows
    C = plan.layout[1]
    x_rows = _shaped(x3, plan.rows)
    rg, rp = run.ix(plan, "rg"), run.params_ix(plan)
    mean_r = _per_row(cache.mean, plan, run)
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
    if cache.mask is not None:  # each group's own count: its sums divided here, the kernel's count 1
        n = 1.0 if cache.counts is None else masking.safe_counts(cache.counts, xp)
        run.K.dx_coefficients(group_g / n, group_gx / n, rg, rp, w, cache.has_weight, cache.rstd, 1.0,
                              cache.stats_grad, cache.mode.center, k1, k2, k3)
        m = cache.mask
        run.K.masked_dx_rows(dy_rows, x_rows, m.base, m.offsets, m.step, plan.strategy is Strategy.COLUMNS,
                             mean_r, k1, k2, k3, plan.rows_per_block, dx_rows, run.threads)
        return (dw, db) if affine else (None, None)
    run.K.dx_coefficients(group_g, group_gx, rg, rp, w, cache.has_weight, cache.rstd, float(max(cache.count, 1)),
                          cache.stats_grad, cache.mode.center, k1, k2, k3)
    run.K.dx_rows(dy_rows, x_rows, mean_r, k1, k2, k3, plan.rows_per_block,
                  None if dh3 is None else _shaped(dh3, plan.rows), dx_rows, run.threads)
    return (dw, db) if affine else (None, None)
