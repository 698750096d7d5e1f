"""The checks of one call, and what its signature decides, kept per signature.

:func:`check_forward` runs every rule on a forward call's arguments before any kernel runs
and before anything is written, and freezes the checked call (:class:`Call`). The rules
that depend on the call's signature alone (mode, x's shape and dtype, sizes, which
arguments are given, the flags, the backend) run once per signature: their outcome, the
plan and the route (:mod:`normcore.route`) are kept in ``_SIGNATURES``.
:func:`check_backward` is backward's.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple

import numpy as np

from . import checks, program, sync
from .checks import describe_mode
from .layout import flat
from .modes import Mode, get_mode
from .plan import Plan, make_plan
from .route import Capabilities, Route, resolve

__all__ = ["Call", "check_forward", "check_count", "param_dtype_of", "check_backward"]


class Call(NamedTuple):
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
    route: Route            # the kernels the call runs (normcore.route)
    programs: object        # the route as programs (normcore.program), or None: run step by step
    residual: object = None  # add_normalize's residual: the input is h = x + residual
    h_out: object = None     # where h is written (add_normalize's h_out), or None
    given_mask: object = None  # the caller's boolean mask (checked), or None (route.masked:
    #                            the batch statistics use it; backward leaves it out always)


def check_forward(x, be, mode, weight, bias, running_mean, running_var, training, momentum, decay, eps,
                   unbiased, estimate, out, sizes, link, residual=None, h_out=None, mask=None) -> Call:
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
    programs = None if fixed is None else fixed[3]()
    fresh = plan is None or (programs is None and fixed[4])
    if fresh:
        m, plan, route = _check_signature(x, be, mode, weight, bias, running_mean, running_var, training,
                                          estimate, sizes, link, mask is not None, residual is not None)
    else:
        m, _, route = fixed[:3]
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
    if (out is not None or h_out is not None or (has_running and training)) and not checks.apart(
            out, h_out, x, residual, weight, bias, running_mean, running_var):
        # every array the call writes is apart from every other it touches: y written over
        # weight or a running statistic, or a running statistic over x, would be read back
        # changed (backward reads x)
        writes_running = has_running and training
        checks.disjoint({"out": out, "h_out": h_out, "running_mean": running_mean if writes_running else None,
                         "running_var": running_var if writes_running else None},
                        {"x": x, "residual": residual, "weight": weight, "bias": bias,
                         "running_mean": None if writes_running else running_mean,
                         "running_var": None if writes_running else running_var}, be)
    if fresh:  # the route as programs, kept with the plan (and held weakly here, as the plan is)
        given = weight if weight is not None else bias
        programs = program.programs_for(plan, route, be, m, dtype, dtype if given is None else given.dtype,
                                        weight is not None, bias is not None)
        if key is not None:
            if len(_SIGNATURES) >= _MAX_SIGNATURES:
                _SIGNATURES.clear()
            _SIGNATURES[key] = (m, weakref.ref(plan), route, _NONE if programs is None else weakref.ref(programs),
                                programs is not None)
    return Call(m, plan, be, dtype,
                None if weight is None else flat(weight, be),
                None if bias is None else flat(bias, be),
                running_mean, running_var, training, momentum, keep, eps, bool(unbiased),
                estimate, out, link if route.synced else None,  # (eval with running statistics: no exchange)
                route, programs, residual, h_out, mask)


def _NONE():
    return None


# What a call's signature (mode, x's shape and dtype, sizes, which arguments are given, the
# flags) decides, kept per signature: the rules it passed and the plan it chose.
_SIGNATURES: dict = {}


_MAX_SIGNATURES = 1024


def _check_signature(x, be, mode, weight, bias, running_mean, running_var, training, estimate, sizes,
                     link, masked=False, residual=False):
    """The rules that depend on the call's signature alone; returns (mode, plan, route)."""
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
    if estimate and not (has_running and training):
        raise ValueError("estimate: needs running_mean and running_var and training=True")
    use_batch = training or not has_running
    if (link is None or not use_batch) and plan.count <= 1 and x.size:
        # (synchronized: checked once all ranks' counts are known)
        check_count(plan.count, plan.layout[1], training, m, x.shape)
    route = resolve(plan, Capabilities.of(be), use_batch=use_batch, estimate=estimate,
                    update=training and has_running and plan.layout[1] > 0, synced=link is not None,
                    masked=masked, residual=residual, affine=weight is not None or bias is not None,
                    counts_ruled=training and m.running_stats is not None)
    return m, plan, route


def _plan(mode: Mode, x, sizes) -> Plan:
    try:
        return make_plan(mode, x.shape, sizes)
    except ValueError as e:
        if str(e).startswith("sizes:"):  # the call's sizes, not x, are wrong
            raise
        raise ValueError(f"x: {e} ({describe_mode(mode)}, x.shape {x.shape})") from None


def check_count(n, C, training, m: Mode, shape):
    if n == 0 and C > 0:
        raise ValueError(f"x: cannot compute statistics over zero elements ({describe_mode(m)}, x.shape {shape})")
    if training and m.running_stats is not None and n == 1:
        raise ValueError(f"x: expected more than 1 value per statistics group in training, "
                         f"got x.shape {shape} ({describe_mode(m)})")


def param_dtype_of(call: Call):
    """The dtype of the call's weight and bias (x's when it has neither)."""
    given = call.weight if call.weight is not None else call.bias
    return call.dtype if given is None else given.dtype


def check_backward(dy, cache, out, dh=None):
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
