"""A float64 NumPy reference for every mode, written from the formulas.

It shares only the spec parser with the library (its own code splits the axes): axes are reduced with NumPy's
``mean(axis=...)`` on the elementary view of x, parameters broadcast by reshaping, and the
gradients follow the closed form of the batch-norm derivation. No canonical layout, no
merged axes, no compiled code: it is the oracle the property tests compare against.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .modes import get_mode
from .spec import ELLIPSIS, parse_axes

__all__ = ["ReferenceResult", "reference_forward", "reference_backward", "term_scales"]


@dataclass
class ReferenceResult:
    y: np.ndarray                  # float64, x's shape
    mean: np.ndarray               # float64, per-group mean used (broadcastable elementary shape)
    var: np.ndarray                # float64, per-group variance used (mean square if not centred)
    running_mean: np.ndarray | None  # float64 updated running statistics (training), else None
    running_var: np.ndarray | None
    stats_grad: bool               # gradients flow through the statistics
    context: tuple                 # what reference_backward needs


def _split(mode, shape, sizes):
    """Elementary axis names and sizes of x: each input axis of the spec, parenthesised
    groups split by the given sizes (one member may be left to infer), the ellipsis
    expanded to "...0", "...1", ... (inputs are valid: the library has checked them)."""
    lhs = mode.parsed.lhs
    n_ell = len(shape) - (len(lhs) - 1) if (ELLIPSIS,) in lhs else 0
    names, dims, dim = [], [], iter(shape)
    for group in lhs:
        if group == (ELLIPSIS,):
            for i in range(n_ell):
                names.append(f"{ELLIPSIS}{i}")
                dims.append(next(dim))
            continue
        size = next(dim)
        known = int(np.prod([sizes[n] for n in group if n in sizes]))
        for n in group:
            names.append(n)
            dims.append(sizes[n] if n in sizes else size // known)
    return names, dims


def _members(axes_text, mode, what, allowed, names):
    """The elementary names of an axis list (the ellipsis standing for its expansion)."""
    out = []
    for group in parse_axes(axes_text, mode.spec, what, allowed):
        for n in group:
            out += [m for m in names if m.startswith(ELLIPSIS)] if n == ELLIPSIS else [n]
    return out


def _axes(mode, shape, sizes):
    names, dims = _split(mode, tuple(shape), {**dict(mode.sizes), **sizes})
    kept_names = set(mode.parsed.kept)
    kept = [n in kept_names or (n.startswith(ELLIPSIS) and ELLIPSIS in kept_names) for n in names]
    reduced = tuple(i for i, k in enumerate(kept) if not k)
    return names, dims, kept, reduced


def _broadcast(a, axes_text, what, allowed, mode, names, dims):
    """Reshape a parameter / running array onto the elementary view (1 on other axes)."""
    members = _members(axes_text, mode, what, allowed, names)
    shape = [dims[i] if n in members else 1 for i, n in enumerate(names)]
    return np.asarray(a, np.float64).reshape(shape)


def reference_forward(x, mode, *, weight=None, bias=None, running_mean=None, running_var=None,
                      training=True, momentum=0.1, eps=1e-5, unbiased=True, estimate=False, mask=None,
                      **sizes) -> ReferenceResult:
    """float64 forward of ``mode`` (same keywords as :func:`normcore.normalize`; with
    ``mask``, statistics over its True elements, a group without any giving x̂ = 0).

    >>> x = np.arange(6.0).reshape(2, 3)
    >>> reference_forward(x, "layer_norm", eps=0.0).y.round(4)
    array([[-1.2247,  0.    ,  1.2247],
           [-1.2247,  0.    ,  1.2247]])
    """
    m = get_mode(mode)
    names, dims, kept, reduced = _axes(m, x.shape, sizes)
    xe = np.asarray(x, np.float64).reshape(dims)
    n = int(np.prod([dims[i] for i in reduced]))
    has_running = running_mean is not None
    allowed = m.parsed.names
    new_rm = new_rv = None
    counted = None
    if training or not has_running:
        if mask is not None:
            counted = np.broadcast_to(np.asarray(mask, bool), x.shape).reshape(dims)
            n = counted.sum(axis=reduced, keepdims=True).astype(np.float64)  # per group
            safe = np.maximum(n, 1.0)
            xc = np.where(counted, xe, 0.0)
            if m.center:
                mean = xc.sum(axis=reduced, keepdims=True) / safe
                var = (np.where(counted, xe - mean, 0.0) ** 2).sum(axis=reduced, keepdims=True) / safe
            else:
                mean = np.zeros([1 if i in reduced else d for i, d in enumerate(dims)])
                var = (xc ** 2).sum(axis=reduced, keepdims=True) / safe
        elif m.center:
            mean = xe.mean(axis=reduced, keepdims=True)
            var = ((xe - mean) ** 2).mean(axis=reduced, keepdims=True)
        else:
            mean = np.zeros([1 if i in reduced else d for i, d in enumerate(dims)])
            var = (xe ** 2).mean(axis=reduced, keepdims=True)
        if training and has_running:
            rm = _broadcast(running_mean, m.running_stats, "running_stats", m.parsed.kept, m, names, dims)
            rv = _broadcast(running_var, m.running_stats, "running_stats", m.parsed.kept, m, names, dims)
            bvar = var * n / (n - 1) if unbiased else var
            # average the per-group statistics over kept axes that the running stats lack
            other = tuple(i for i in range(len(dims)) if rm.shape[i] == 1 and i not in reduced)
            new_rm = (1 - momentum) * rm + momentum * mean.mean(axis=other, keepdims=True)
            new_rv = (1 - momentum) * rv + momentum * bvar.mean(axis=other, keepdims=True)
    if has_running and (estimate or not training):
        src_m, src_v = (new_rm, new_rv) if estimate else (running_mean, running_var)
        dt = np.asarray(running_mean).dtype
        mean = _broadcast(np.asarray(src_m, dt), m.running_stats, "running_stats", m.parsed.kept, m, names, dims)
        var = _broadcast(np.asarray(src_v, dt), m.running_stats, "running_stats", m.parsed.kept, m, names, dims)
    rstd = 1.0 / np.sqrt(var + eps)
    if counted is not None:
        rstd = np.where(n > 0, rstd, 0.0)
    xhat = (xe - mean) * rstd
    w = 1.0 if weight is None else _broadcast(weight, m.params, "params", allowed, m, names, dims)
    b = 0.0 if bias is None else _broadcast(bias, m.params, "params", allowed, m, names, dims)
    y = xhat * w + b
    if new_rm is not None:
        new_rm = new_rm.reshape(np.shape(running_mean))
        new_rv = new_rv.reshape(np.shape(running_var))
    stats_grad = (training or not has_running) and not estimate
    given = None if mask is None else np.broadcast_to(np.asarray(mask, bool), x.shape).reshape(dims)
    ctx = (m, names, dims, reduced, xhat, rstd, w, weight is not None, bias is not None, x.shape, xe,
           None if counted is None else (counted, n), given)
    return ReferenceResult(y.reshape(x.shape), mean, var, new_rm, new_rv, stats_grad, ctx)


def reference_backward(dy, result: ReferenceResult):
    """float64 (dx, dweight, dbias) from the closed form; None where there is no parameter.

    >>> x = np.arange(6.0).reshape(2, 3)
    >>> dx, dw, db = reference_backward(np.ones((2, 3)), reference_forward(x, "layer_norm", bias=np.zeros(3)))
    >>> db, dw is None
    (array([2., 2., 2.]), True)
    """
    m, names, dims, reduced, xhat, rstd, w, has_w, has_b, shape, _, masked, given = result.context
    d = np.asarray(dy, np.float64).reshape(dims)
    if given is not None:
        # masked-out positions are not data: the gradient of the call on x[mask], so they
        # add nothing to any sum (whatever x and dy hold there) and receive dx = 0
        d = np.where(given, d, 0.0)
        xhat = np.where(given, xhat, 0.0)
    g = d * w
    if result.stats_grad and masked is not None:
        counted, n = masked
        safe = np.maximum(n, 1.0)
        mg = g.sum(axis=reduced, keepdims=True) / safe if m.center else 0.0
        mgx = (g * xhat).sum(axis=reduced, keepdims=True) / safe
        dx = rstd * (g - mg - xhat * mgx)
    elif result.stats_grad:
        mg = g.mean(axis=reduced, keepdims=True) if m.center else 0.0
        mgx = (g * xhat).mean(axis=reduced, keepdims=True)
        dx = rstd * (g - mg - xhat * mgx)
    else:
        dx = rstd * g
    if given is not None:
        dx = np.where(given, dx, 0.0)
    dweight = dbias = None
    if has_w or has_b:
        members = _members(m.params, m, "params", m.parsed.names, names)
        summed = tuple(i for i, nm in enumerate(names) if nm not in members)
        groups = parse_axes(m.params, m.spec, "params", m.parsed.names)
        pshape = tuple(int(np.prod([dims[names.index(a)] for a in _members(" ".join(g), m, "params",
                                                                          m.parsed.names, names)]))
                       for g in groups)
        if has_w:
            dweight = (d * xhat).sum(axis=summed).reshape(pshape)
        if has_b:
            dbias = d.sum(axis=summed).reshape(pshape)
    return dx.reshape(shape), dweight, dbias


def term_scales(dy, result: ReferenceResult) -> dict:
    """Magnitudes of the terms that cancel inside each result, keyed "dx" and "dweight".

    Any float implementation rounds at these magnitudes: dx is a difference of terms of
    size |rstd * weight * dy| (a one-element group has dx = 0 from such terms), and
    dweight sums dy * (x - mean) * rstd, whose subtraction costs digits in proportion to
    |x| * rstd when x sits at an offset far from zero. Comparisons are judged against
    these, never against a hand-widened tolerance.
    """
    m, names, dims, reduced, xhat, rstd, w, has_w, has_b, shape, xe, _, given = result.context
    d = np.abs(np.asarray(dy, np.float64).reshape(dims))
    if given is not None:  # left out entirely (reference_backward)
        d, xe = np.where(given, d, 0.0), np.where(given, xe, 0.0)
    out = {"dx": float((d * np.abs(w) * rstd).max()) if d.size else 0.0, "dweight": 0.0}
    if has_w and d.size:
        members = _members(m.params, m, "params", m.parsed.names, names)
        summed = tuple(i for i, nm in enumerate(names) if nm not in members)
        out["dweight"] = float((d * np.abs(xe) * rstd).sum(axis=summed).max())
    return out
