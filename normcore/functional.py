"""normalize / backward: thin validating wrappers around the compiled kernels.

Every check happens here, before any kernel runs and before any running statistic is
written, so bad input raises and leaves the caller's state exactly as it was. The kernels
(src/normcore/_kernels.pyx) check nothing.

Numerics
--------
* Statistics accumulate in double (one pass of sums shifted by a member of each chunk or
  block, Chan merges); the output is normalized with the biased variance.
* ``running_var`` receives the unbiased variance n/(n-1) by default (PyTorch, seed 000);
  ``unbiased=False`` stores the biased one (Flax, Keras, CS231n).
* ``momentum`` follows PyTorch: running = (1 - m) * running + m * batch. Decay-style
  conventions map as momentum = 1 - decay (decay 0.99 -> momentum 0.01, CS231n's 0.9 -> 0.1).
"""
from __future__ import annotations

import math

import numpy as np

from . import sync
from .backend import CPU, backend_of
from .modes import Mode, get_mode
from .plan import PARAM_BLOCKS, Plan, make_plan

__all__ = ["normalize", "backward", "NormCache"]



class _Run:
    """Where one call computes: the backend's array module and kernels, and the thread count."""

    __slots__ = ("be", "xp", "K", "threads")

    def __init__(self, be, size):
        self.be, self.xp, self.K, self.threads = be, be.xp, be.K, be.threads_for(size)

    def ix(self, plan, name):
        return self.be.index(plan, name)

    def take(self, a, plan, name):
        """``a[plan.<name>]``: per-group (rg), per-parameter (rp) or per-running-entry (rc)
        values spread to rows (groups); ``a`` itself when the index is the identity."""
        return a if self.be.is_identity(plan, name, len(a)) else a[self.ix(plan, name)]

    def totals(self, values, plan, name, n):
        """Per-row values summed into n bins through plan.<name>, in row order."""
        if self.be.is_identity(plan, name, n) and len(values) == n:
            return values
        return self.xp.bincount(self.ix(plan, name), weights=values, minlength=n)


class NormCache:
    """What backward needs from one forward call: plan, canonical x, mean and 1/std.

    When x is already C-contiguous in the canonical layout the cache holds x itself, not a
    copy (as autograd frameworks save their inputs): changing x in place between forward
    and backward changes the gradients.
    """

    __slots__ = ("mode", "plan", "x3", "dtype", "mean", "rstd", "weight", "has_weight",
                 "has_bias", "stats_grad", "count", "comm", "backend")

    def __init__(self, mode, plan, x3, dtype, mean, rstd, weight, has_weight, has_bias, stats_grad,
                 count=None, comm=None, backend=CPU):
        self.mode = mode
        self.plan = plan
        self.x3 = x3                # (A, C, B) input in the canonical layout
        self.dtype = dtype
        self.mean = mean            # (C,) float64 mean used to normalize (0 when not centred)
        self.rstd = rstd            # (C,) float64 1 / sqrt(var + eps)
        self.weight = weight        # (P,) float64 weight, or None
        self.has_weight = has_weight
        self.has_bias = has_bias
        self.stats_grad = stats_grad  # gradients flow through batch statistics
        self.count = plan.count if count is None else count  # elements per group, all ranks
        self.comm = comm            # communicator the statistics were synchronized over
        self.backend = backend      # where x3 and the statistics live

    @property
    def shape(self):
        return self.plan.shape

    @property
    def saved_mean(self):
        """Per-group mean used by forward, shaped like the statistics axes (float64)."""
        return self.mean.reshape(self.plan.stat_shape)

    @property
    def saved_rstd(self):
        """Per-group inverse standard deviation used by forward (float64)."""
        return self.rstd.reshape(self.plan.stat_shape)


def _describe(mode: Mode) -> str:
    return f"mode {mode.name!r} (spec {mode.spec!r})" if mode.name else f"spec {mode.spec!r}"


def _type_name(a):
    t = type(a)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__.split('.')[0]}.{t.__name__}"


def _check_array(name, a, dtype=None, be=None):
    """``a`` must be a float array of backend ``be`` (x's; by default the one ``a`` itself
    selects: NumPy on the CPU, CuPy on the GPU) and, when given, of x's ``dtype``.
    Returns the backend."""
    if be is None:
        be = backend_of(a)
        if not isinstance(a, be.array_type):
            raise TypeError(f"{name}: expected a numpy.ndarray (or a cupy.ndarray for the GPU), "
                            f"got {_type_name(a)}")
    elif not isinstance(a, be.array_type):
        raise TypeError(f"{name}: expected a {be.array_name} like x (x is on the {be.place}), "
                        f"got {_type_name(a)}; move it with {'cupy.asarray' if be.name == 'cuda' else 'cupy.asnumpy'}")
    if a.dtype not in be.dtypes:
        names = " or ".join(d.name for d in be.dtypes)
        raise TypeError(f"{name}: expected {names} on the {be.place}, got dtype {a.dtype}")
    if dtype is not None and a.dtype != dtype:
        raise TypeError(f"{name}: dtype {a.dtype} does not match x's dtype {dtype}")
    return be


def _check_param(name, a, shape, dtype, be=None):
    if a is None:
        return
    _check_array(name, a, dtype, be)
    if a.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {a.shape}")


def _check_scalar(name, value, lo, hi, lo_open):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    v = float(value)
    bad_lo = v <= lo if lo_open else v < lo
    if not math.isfinite(v) or bad_lo or v > hi:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ValueError(f"{name}: expected a finite value in {interval}, got {value!r}")
    return v


_NO_INDEX = np.zeros(1, np.intp)  # a placeholder index array for kernels given no parameters


def _check_out(out, shape, dtype, inputs, be=CPU):
    """``out=`` must be a writeable C-contiguous array of the result's shape and dtype that
    shares no memory with the inputs (backward reads x after forward has written y)."""
    if not isinstance(out, be.array_type):
        raise TypeError(f"out: expected a {be.array_name} like x, got {_type_name(out)}")
    if out.dtype != dtype:
        raise TypeError(f"out: dtype {out.dtype} does not match the result's dtype {dtype}")
    if out.shape != shape:
        raise ValueError(f"out: expected shape {shape}, got {out.shape}")
    if not (out.flags.c_contiguous and getattr(out.flags, "writeable", True)):
        raise ValueError("out: must be C-contiguous and writeable")
    for name, a in inputs.items():
        if be.xp.may_share_memory(out, a):
            raise ValueError(f"out: must not share memory with {name}")


def _plan(mode: Mode, x: np.ndarray, sizes) -> Plan:
    try:
        return make_plan(mode, x.shape, sizes)
    except ValueError as e:
        raise ValueError(f"x: {e} ({_describe(mode)}, x.shape {x.shape})") from None


def _canonical(a, plan: Plan, xp=np):
    """``a`` as a C-contiguous (A, C, B) array; a view when no copy is needed."""
    e = a.reshape(plan.elem_shape)
    if plan.perm is not None:
        e = e.transpose(plan.perm)
    return xp.ascontiguousarray(e).reshape(plan.layout)


def _from_canonical(a3, plan: Plan, xp=np):
    if plan.perm is None:
        return a3.reshape(plan.shape)
    moved = a3.reshape([plan.elem_shape[i] for i in plan.perm])
    return xp.ascontiguousarray(moved.transpose(tuple(np.argsort(plan.perm)))).reshape(plan.shape)


def _moments(x3, plan: Plan, run: _Run):
    """Per-group (mean, biased variance) in float64, from one compiled pass over x."""
    A, C, B = plan.layout
    xp = run.xp
    if plan.scattered is not None:
        return _scattered_moments(x3.reshape(plan.rows), plan, run)
    if plan.columns:
        rpb = plan.rows_per_block
        nb = -(-A // rpb)
        pmean = xp.empty((nb, C))
        pm2 = xp.empty((nb, C))
        run.K.moments_cols(x3.reshape(A, C), rpb, pmean, pm2, run.threads)

        def counts():
            c = np.full(nb, float(rpb))
            c[-1] = A - rpb * (nb - 1)
            return c
    else:
        pmean = xp.empty((A, C))
        pm2 = xp.empty((A, C))
        run.K.moments_rows(x3, pmean, pm2, run.threads)

        def counts():
            return np.full(A, float(B))
    return _merge_partials(pmean, pm2, counts, plan, run)


def _merge_partials(pmean, pm2, counts, plan: Plan, run: _Run):
    """(K, C) partial moments, ``counts()[k]`` elements each -> per-group (mean, biased var)."""
    if pmean.shape[0] == 1:
        return pmean[0], pm2[0] / plan.count
    mean, m2 = run.xp.empty(pmean.shape[1]), run.xp.empty(pmean.shape[1])
    run.K.combine_moments(pmean, pm2, run.be.constant(plan, "partial counts", counts), mean, m2, run.threads)
    return mean, m2 / plan.count


def _scattered_moments(x_rows, plan: Plan, run: _Run):
    """Moments of groups whose rows lie apart: per-row partials, reordered to
    (partials of a group, C), merged like row partials."""
    _, R, S = plan.rows
    C = plan.layout[1]
    xp = run.xp
    pmean, pm2 = xp.empty((1, R)), xp.empty((1, R))
    run.K.moments_rows(x_rows, pmean, pm2, run.threads)
    row_shape = plan.elem_shape[:len(plan.scattered)]

    def by_group(p):
        return xp.ascontiguousarray(p.reshape(row_shape).transpose(plan.scattered)).reshape(-1, C)

    pmean, pm2 = by_group(pmean), by_group(pm2)
    return _merge_partials(pmean, pm2, lambda: np.full(pmean.shape[0], float(S)), plan, run)


def _normalize_groups(x3, plan: Plan, center, eps, w, b, y_rows, run: _Run):
    """One-pass forward of an A == 1 layout; returns per-group (mean, var, rstd)."""
    C = plan.layout[1]
    xp = run.xp
    mean, var, rstd = xp.empty(C), xp.empty(C), xp.empty(C)
    affine, P = 0, 1
    if w is not None or b is not None:
        affine, P = (2 if plan.param_inner else 1), math.prod(plan.param_shape)
    rp = run.ix(plan, "rp") if affine else run.be.constant(plan, "no index", lambda: _NO_INDEX)
    run.K.normalize_groups(x3, plan.rows[1] // C, center, eps, affine, rp,
                           xp.ones(P) if w is None else w, xp.zeros(P) if b is None else b,
                           mean, var, rstd, y_rows.reshape(plan.layout), run.threads)
    return mean, var, rstd


def _affine(x_rows, plan: Plan, mean, rstd, w, b, y_rows, run: _Run):
    """y from given per-group statistics, on the (A, R, S) view (rows share their group's)."""
    xp = run.xp
    mean_r, rstd_r = run.take(mean, plan, "rg"), run.take(rstd, plan, "rg")
    if plan.param_inner and (w is not None or b is not None):
        P = math.prod(plan.param_shape)
        run.K.affine_inner(x_rows, mean_r, rstd_r, run.ix(plan, "rp"), xp.ones(P) if w is None else w,
                           xp.zeros(P) if b is None else b, y_rows, run.threads)
    else:
        # y = (x - mean) * rstd * w + b = (x - mean) * scale + shift, with scale = rstd * w
        # and shift = b per row: one subtract and one multiply-add per element, in double.
        scale = rstd_r if w is None else rstd_r * run.take(w, plan, "rp")
        shift = xp.zeros(len(mean_r)) if b is None else run.take(b, plan, "rp")
        run.K.affine_rows(x_rows, mean_r, scale, shift, plan.rows_per_block, y_rows, run.threads)


def _check_count(n, C, training, m: Mode, shape):
    if n == 0 and C > 0:
        raise ValueError(f"x: cannot compute statistics over zero elements ({_describe(m)}, x.shape {shape})")
    if training and m.running_stats is not None and n == 1:
        raise ValueError(f"x: expected more than 1 value per statistics group in training, "
                         f"got x.shape {shape} ({_describe(m)})")


def _check_batch_mode(m: Mode, x):
    """Synchronizing needs statistics that reduce over x's first (batch) axis."""
    first = m.parsed.lhs[0]
    if any(a in m.parsed.kept for a in first) or (first == ("...",) and x.ndim < len(m.parsed.lhs)):
        raise ValueError(f"comm: {_describe(m)} keeps x's first axis in its statistics, so there is "
                         "no batch to synchronize; pass comm only to modes that reduce over it")


def _synced_moments(link, x3, plan: Plan, m: Mode, dtype, training, run: _Run):
    """Per-group (mean, biased var, count) of the batch split across ``link``'s ranks: each
    rank's (count, mean, centred sum of squares), merged in rank order in float64 by the
    same exact two-pass merge as the partial moments of one process. The few numbers per
    group travel through host memory (GPU arrays included)."""
    C = plan.layout[1]
    n = plan.count
    if n and C:
        mean, var = _moments(x3, plan, run)
        local = (n, run.be.to_host(mean), run.be.to_host(var * n))
    else:
        local = (0, np.zeros(C), np.zeros(C))
    parts = link.gather((("mode", m.spec), ("statistics shape", plan.stat_shape),
                         ("dtype", dtype.name), ("training", bool(training))), local)
    counts = np.array([p[0] for p in parts], np.float64)
    total = int(counts.sum())
    if total == 0 or C == 0:
        return run.xp.zeros(C), run.xp.zeros(C), total
    mean, m2 = np.empty(C), np.empty(C)
    CPU.K.combine_moments(np.stack([p[1] for p in parts]), np.stack([p[2] for p in parts]),
                          counts, mean, m2, 1)
    return run.be.from_host(mean), run.be.from_host(m2 / total), total


def _per_running(values, plan: Plan, run: _Run):
    """Average per-group values into running-statistic entries (identity for batch norm)."""
    size = math.prod(plan.running_shape)
    out = run.totals(values, plan, "rc", size)
    if plan.groups_per_running != 1:
        out = out / plan.groups_per_running
    return out.reshape(plan.running_shape)


def normalize(x, mode, *, weight=None, bias=None, running_mean=None, running_var=None,
              training=True, momentum=0.1, eps=1e-5, unbiased=True, estimate=False, out=None,
              comm=None, **sizes):
    """Normalize ``x`` with a registered mode; return ``(y, cache)`` for :func:`backward`.

    Parameters
    ----------
    x : ndarray, float32 or float64, any shape the mode's spec accepts.
    mode : str or Mode
        A name from :func:`normcore.modes` or a :class:`normcore.Mode`.
    weight, bias : ndarray of the mode's parameter shape and x's dtype, optional.
    running_mean, running_var : ndarray of the running-statistics shape, optional.
        Updated in place in training mode (only after every check has passed).
    training : bool
        True: normalize with batch statistics (and update running statistics if given).
        False: normalize with the running statistics if given, else batch statistics.
    momentum : float in [0, 1]
        running = (1 - momentum) * running + momentum * batch.
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
    args = dict(weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
                training=training, momentum=momentum, eps=eps, unbiased=unbiased, estimate=estimate,
                out=out, sizes=sizes)
    if comm is None:
        return _normalize(x, mode, link=None, **args)
    sync.check_comm(comm)  # without a communicator there is no one to tell
    link = sync.Exchange(comm, "forward")
    try:
        return _normalize(x, mode, link=link, **args)
    except (ValueError, TypeError) as e:
        if training or running_mean is None:  # this call exchanges batch statistics
            link.fail(e)
        raise


def _normalize(x, mode, *, weight, bias, running_mean, running_var, training, momentum, eps,
               unbiased, estimate, out, sizes, link):
    m = get_mode(mode)
    be = _check_array("x", x)
    if link is not None:
        _check_batch_mode(m, x)
    plan = _plan(m, x, sizes)
    dtype = x.dtype
    if m.params is None and (weight is not None or bias is not None):
        raise ValueError(f"weight/bias: {_describe(m)} has no affine parameters")
    if m.params is not None:
        _check_param("weight", weight, plan.param_shape, dtype, be)
        _check_param("bias", bias, plan.param_shape, dtype, be)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean/running_var: give both or neither")
    has_running = running_mean is not None
    if has_running:
        if m.running_stats is None:
            raise ValueError(f"running_mean: {_describe(m)} keeps no running statistics")
        _check_param("running_mean", running_mean, plan.running_shape, dtype, be)
        _check_param("running_var", running_var, plan.running_shape, dtype, be)
        for name, a in (("running_mean", running_mean), ("running_var", running_var)):
            if training and not getattr(a.flags, "writeable", True):
                raise ValueError(f"{name}: must be writeable to be updated in training")
    eps = _check_scalar("eps", eps, 0.0, math.inf, lo_open=True)
    if momentum is None:
        raise ValueError("momentum: None (cumulative average) needs a batch count; "
                         "use a layer, or pass momentum=1/num_batches")
    momentum = _check_scalar("momentum", momentum, 0.0, 1.0, lo_open=False)
    if out is not None:
        _check_out(out, x.shape, dtype, {"x": x}, be)
    if estimate and not (has_running and training):
        raise ValueError("estimate: needs running_mean and running_var and training=True")
    n = plan.count
    C = plan.layout[1]
    use_batch = training or not has_running
    link = link if use_batch else None  # eval with running statistics: nothing to exchange
    if link is None:  # synchronized: the counts are checked once all ranks' are known
        _check_count(n, C, training, m, x.shape)

    xp = be.xp
    x3 = _canonical(x, plan, xp)
    run = _Run(be, x3.size)
    y_rows = out.reshape(plan.rows) if out is not None and plan.perm is None else xp.empty(plan.rows, dtype)
    w = None if weight is None else weight.astype(np.float64).reshape(-1)
    b = None if bias is None else bias.astype(np.float64).reshape(-1)
    # With A == 1 every group is contiguous: statistics and output in one pass over x.
    one_pass = (use_batch and not estimate and plan.layout[0] == 1 and plan.scattered is None and C > 0
                and link is None and be.fused_forward)
    if one_pass:
        mean, var, rstd = _normalize_groups(x3, plan, m.center, eps, w, b, y_rows, run)
    elif use_batch and (C or link is not None):
        if link is not None:
            mean, var, n = _synced_moments(link, x3, plan, m, dtype, training, run)
            _check_count(n, C, training, m, f"{x.shape} on this rank, {n} elements per group on all ranks")
        else:
            mean, var = _moments(x3, plan, run)
        if not m.center:
            var = var + mean * mean  # mean of squares: no cancellation, all terms >= 0
            mean = xp.zeros_like(mean)
    new_running = None
    if use_batch and C and training and has_running:
        bvar = var * (n / (n - 1)) if unbiased else var
        new_running = (
            (1 - momentum) * running_mean.astype(np.float64) + momentum * _per_running(mean, plan, run),
            (1 - momentum) * running_var.astype(np.float64) + momentum * _per_running(bvar, plan, run),
        )
    if (not use_batch or estimate) and C:
        rm, rv = new_running if estimate else (running_mean, running_var)
        # Statistics must be the ones the output is rounded with: stored-dtype values.
        mean = run.take(xp.asarray(rm, dtype).astype(np.float64).reshape(-1), plan, "rc")
        var = run.take(xp.asarray(rv, dtype).astype(np.float64).reshape(-1), plan, "rc")
    if not C:
        mean = var = xp.zeros(0)
    if not one_pass:
        rstd = 1.0 / xp.sqrt(var + eps)
        _affine(x3.reshape(plan.rows), plan, mean, rstd, w, b, y_rows, run)

    if new_running is not None:
        running_mean[...] = new_running[0]
        running_var[...] = new_running[1]
    cache = NormCache(m, plan, x3, dtype, mean, rstd, w, weight is not None, bias is not None,
                      stats_grad=use_batch and not estimate, count=n,
                      comm=None if link is None else link.comm, backend=be)
    return _result(y_rows, plan, out, xp), cache


def _result(rows, plan: Plan, out, xp=np):
    """The (A, R, S) result in the input's layout, in ``out`` when given."""
    if out is None:
        return _from_canonical(rows, plan, xp)
    if plan.perm is not None:
        out[...] = _from_canonical(rows, plan, xp)
    return out


def backward(dy, cache, *, out=None):
    """Gradients of :func:`normalize`: return ``(dx, dweight, dbias)``.

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
        return _backward(dy, cache, out, None)
    link = sync.Exchange(cache.comm, "backward")
    try:
        return _backward(dy, cache, out, link)
    except (ValueError, TypeError) as e:
        link.fail(e)
        raise


def _backward(dy, cache, out, link):
    be = cache.backend
    _check_array("dy", dy, cache.dtype, be)
    plan = cache.plan
    if dy.shape != plan.shape:
        raise ValueError(f"dy: expected shape {plan.shape} (the forward input's), got {dy.shape}; "
                         "is the cache from another call?")
    if out is not None:
        _check_out(out, plan.shape, cache.dtype, {"dy": dy, "x": cache.x3}, be)
    xp = be.xp
    dy_rows = _canonical(dy, plan, xp).reshape(plan.rows)
    dx_rows = out.reshape(plan.rows) if out is not None and plan.perm is None else xp.empty(plan.rows, cache.dtype)
    run = _Run(be, dy_rows.size)
    if cache.stats_grad and plan.layout[0] == 1 and plan.scattered is None and plan.layout[1] \
            and link is None and be.fused_backward:
        dw, db = _backward_one_visit(dy_rows, cache, dx_rows, run)
    elif plan.param_inner and (cache.has_weight or cache.has_bias):
        dw, db = _backward_inner(dy_rows, cache, dx_rows, run, link)
    else:
        dw, db = _backward_rows(dy_rows, cache, dx_rows, run, link)

    dx = _result(dx_rows, plan, out, xp)
    dweight = dw.reshape(plan.param_shape).astype(cache.dtype) if cache.has_weight else None
    dbias = db.reshape(plan.param_shape).astype(cache.dtype) if cache.has_bias else None
    return dx, dweight, dbias


def _group_totals(values, plan: Plan, run: _Run):
    """Per-row values summed into their statistics group (bincount adds in row order)."""
    return run.totals(values, plan, "rg", plan.layout[1])


def _row_param_grads(t1, t2, rstd_r, plan: Plan, run: _Run):
    """dweight, dbias from per-row sums when each row has one parameter."""
    P = math.prod(plan.param_shape)
    return run.totals(rstd_r * t2, plan, "rp", P), run.totals(t1, plan, "rp", P)


def _backward_one_visit(dy_rows, cache, dx_rows, run: _Run):
    """Training backward when every group is contiguous (CPU): its sums and its dx in one visit."""
    plan = cache.plan
    R, C = plan.rows[1], plan.layout[1]
    affine = cache.has_weight or cache.has_bias
    P = math.prod(plan.param_shape) if affine else 1
    kind = 0 if not affine else (2 if plan.param_inner else 1)
    t1, t2 = np.empty(R), np.empty(R)
    partials = (-(-C // _groups_per_block(plan)), P) if kind == 2 else (1, 1)
    pdw, pdb = np.zeros(partials), np.zeros(partials)
    run.K.backward_groups(dy_rows.reshape(plan.layout), cache.x3, R // C, cache.mode.center, kind,
                          plan.rp if affine else _NO_INDEX,
                          cache.weight if cache.weight is not None else np.ones(P),
                          cache.mean, cache.rstd, _groups_per_block(plan), t1, t2, pdw, pdb,
                          dx_rows.reshape(plan.layout), run.threads)
    if kind == 2:
        return pdw.sum(axis=0), pdb.sum(axis=0)
    if kind == 1:
        return _row_param_grads(t1, t2, cache.rstd[plan.rg], plan, run)
    return None, None


def _backward_inner(dy_rows, cache, dx_rows, run: _Run, link=None):
    """Parameters along the rows (layer norm) outside the one-visit case. With ``link``,
    the group sums and parameter gradients are summed over its ranks."""
    plan = cache.plan
    xp = run.xp
    R, P = plan.rows[1], math.prod(plan.param_shape)
    x_rows = cache.x3.reshape(plan.rows)
    rp = run.ix(plan, "rp")
    mean_r, rstd_r = run.take(cache.mean, plan, "rg"), run.take(cache.rstd, plan, "rg")
    w = xp.ones(P) if cache.weight is None else cache.weight
    nb = max(1, -(-R // plan.rows_per_block))
    s1, s2 = xp.empty(R), xp.empty(R)
    pdw, pdb = xp.zeros((nb, P)), xp.zeros((nb, P))
    run.K.sums_inner(dy_rows, x_rows, mean_r, rstd_r, rp, w, plan.rows_per_block, s1, s2,
                     pdw, pdb, run.threads)
    g1, g2 = _group_totals(s1, plan, run), _group_totals(s2, plan, run)
    dw, db = pdw.sum(axis=0), pdb.sum(axis=0)
    if link is not None:
        g1, g2, dw, db = _sum_over_ranks(link, cache, (g1, g2, dw, db), run)
    c1 = run.take(g1 / cache.count, plan, "rg") if cache.stats_grad and cache.mode.center else xp.zeros(R)
    c2 = run.take(g2 / cache.count, plan, "rg") if cache.stats_grad else xp.zeros(R)
    run.K.dx_inner(dy_rows, x_rows, mean_r, rstd_r, rp, w, c1, c2, dx_rows, run.threads)
    return dw, db


def _backward_rows(dy_rows, cache, dx_rows, run: _Run, link=None):
    """One scale per row: dx = dy * k1 + (x - mean) * k2 + k3 with per-row coefficients.
    With ``link``, the group sums and parameter gradients are summed over its ranks."""
    plan = cache.plan
    xp = run.xp
    R = plan.rows[1]
    x_rows = cache.x3.reshape(plan.rows)
    mean_r, rstd_r = run.take(cache.mean, plan, "rg"), run.take(cache.rstd, plan, "rg")
    affine = cache.has_weight or cache.has_bias
    gamma = xp.ones(R) if cache.weight is None else run.take(cache.weight, plan, "rp")
    k1 = rstd_r * gamma
    k2 = k3 = xp.zeros(R)
    dw = db = None
    if cache.stats_grad or affine or link is not None:
        t1, t2 = _row_sums(dy_rows, x_rows, mean_r, plan, run)  # sum dy, sum dy * (x - mean)
        if affine:
            dw, db = _row_param_grads(t1, t2, rstd_r, plan, run)
        # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = gamma * dy,
        # xhat = (x - mean) * rstd, regrouped as dy * k1 + (x - mean) * k2 + k3.
        g1, g2 = _group_totals(gamma * t1, plan, run), _group_totals(gamma * (rstd_r * t2), plan, run)
        if link is not None:
            g1, g2, dw, db = _sum_over_ranks(link, cache, (g1, g2, dw, db), run)
        if cache.stats_grad:
            k2 = -rstd_r * rstd_r * run.take(g2 / cache.count, plan, "rg")
            if cache.mode.center:
                k3 = -rstd_r * run.take(g1 / cache.count, plan, "rg")
    run.K.dx_rows(dy_rows, x_rows, mean_r, k1, k2, k3, plan.rows_per_block, dx_rows, run.threads)
    return dw, db


def _sum_over_ranks(link, cache, arrays, run: _Run):
    """Element-wise sums of ``arrays`` (None entries stay None) over the ranks, added in
    rank order on the host so that every rank holds the same bits."""
    local = tuple(None if a is None else run.be.to_host(a) for a in arrays)
    parts = link.gather((("mode", cache.mode.spec), ("statistics shape", cache.plan.stat_shape),
                         ("dtype", cache.dtype.name), ("elements per group", cache.count)), local)
    return tuple(None if a is None else run.be.from_host(np.sum([p[i] for p in parts], axis=0))
                 for i, a in enumerate(arrays))


def _groups_per_block(plan: Plan) -> int:
    """Groups per block of the one-visit backward: as many partial blocks as the plan's."""
    return max(1, -(-plan.layout[1] // PARAM_BLOCKS))


def _row_sums(dy_rows, x_rows, mean_r, plan: Plan, run: _Run):
    """Per-row (sum dy, sum dy * (x - mean)) on the (A, R, S) view, summed over A."""
    A, R, S = plan.rows
    xp = run.xp
    if plan.columns:
        rpb = plan.rows_per_block
        nb = -(-A // rpb)
        p1, p2 = xp.empty((nb, R)), xp.empty((nb, R))
        run.K.sums_cols(dy_rows.reshape(A, R), x_rows.reshape(A, R), mean_r, rpb, p1, p2, run.threads)
    else:
        p1, p2 = xp.empty((A, R)), xp.empty((A, R))
        run.K.sums_rows(dy_rows, x_rows, mean_r, p1, p2, run.threads)
    # The partial rows are summed in a fixed order: deterministic for any thread count.
    return p1.sum(axis=0), p2.sum(axis=0)
