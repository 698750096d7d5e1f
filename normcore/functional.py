"""normalize / add_normalize / backward: the public entries, and the relay of a failure to
synchronized ranks.

A call runs in phases over modules of their own: :mod:`normcore.signature` checks every
argument (once per signature what depends on the signature alone, with the plan and the
route it decides), :mod:`normcore.forward_route` runs the forward phases the route lists
(batch statistics → running-statistics update → the statistics the output uses → apply)
and :mod:`normcore.backward_route` the backward (gradient sums → synchronized sums → dx
coefficients → dx); :mod:`normcore.cache` holds what backward reads. Every check happens
before any kernel runs and before any running statistic is written, so bad input raises
and leaves the caller's state exactly as it was. The kernels
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

from math import prod

from . import checks, sync
from .backward_route import run_backward
from .cache import NormCache, viewed
from .forward_route import run_forward
from .signature import check_backward, check_forward

__all__ = ["normalize", "add_normalize", "backward", "NormCache"]


def forward(x, be, mode, *, weight=None, bias=None, running_mean=None, running_var=None, training=True,
            momentum=checks.DEFAULT_MOMENTUM, eps=1e-5, unbiased=True, estimate=False, out=None, comm=None,
            sizes=None, decay=None, residual=None, h_out=None, mask=None):
    """:func:`normalize` for an ``x`` whose array type the caller has checked (``be`` is
    its backend): the entry of the forms and layers, which check x once themselves. With
    ``residual``, :func:`add_normalize` (returns ``(y, h, cache)``)."""
    sizes = {} if sizes is None else sizes
    if comm is None:
        call = check_forward(x, be, mode, weight, bias, running_mean, running_var, training, momentum,
                              decay, eps, unbiased, estimate, out, sizes, None, residual, h_out, mask)
        return run_forward(call, x)
    sync.check_comm(comm)  # without a communicator there is no one to tell
    link = sync.Exchange(comm, "forward")
    try:
        call = check_forward(x, be, mode, weight, bias, running_mean, running_var, training, momentum,
                              decay, eps, unbiased, estimate, out, sizes, link, residual, h_out, mask)
        return run_forward(call, x)
    except BaseException as e:  # any failure (MemoryError too) reaches the peers, once
        if training or running_mean is None:  # this call exchanges batch statistics
            link.fail(e)
        raise


def over_trailing_axes(x, be, mode, shape, weight, bias, eps, out, residual=None, h_out=None, mask=None):
    """:func:`forward` of layer norm / RMS norm over the trailing axes ``shape`` of x (which
    the caller has checked x ends with): the mode ("... d -> ...", one parameter axis) on x
    viewed as (..., prod(shape)), results presented under the caller's shapes. With
    ``residual``, returns ``(y, h, cache)`` (h into ``h_out`` when given). ``mask``
    broadcasts to x (so to the flat view once broadcast).

    Shapes: x (..., *shape); weight, bias ``shape``; y (and h) x's.

    >>> import numpy as np
    >>> from normcore.backend import CPU
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 4), dtype=np.float32)
    >>> y, cache = over_trailing_axes(x, CPU, "layer_norm", (3, 4), None, None, 1e-5, None)
    >>> y.shape, cache.saved_mean.shape
    ((2, 3, 4), (2,))
    """
    k = len(shape)
    if k == 1:
        return forward(x, be, mode, weight=weight, bias=bias, eps=eps, out=out, residual=residual, h_out=h_out,
                       mask=mask)
    checks.param("weight", weight, shape, x.dtype, be)
    checks.param("bias", bias, shape, x.dtype, be)
    if out is not None:
        checks.out(out, x.shape, x.dtype, {}, be)  # overlaps: checked by forward on the views
    if residual is not None:
        checks.like_x("residual", residual, x.shape, x.dtype, be)
    if h_out is not None:
        checks.out(h_out, x.shape, x.dtype, {}, be, name="h_out")  # overlaps: as out's
    flat = x.shape[:x.ndim - k] + (prod(shape),)
    if mask is not None:
        checks.mask(mask, x.shape, be)
        mask = be.xp.broadcast_to(mask, x.shape).reshape(flat)
    got = forward(x.reshape(flat), be, mode, eps=eps,
                  weight=None if weight is None else weight.reshape(-1),
                  bias=None if bias is None else bias.reshape(-1),
                  out=None if out is None else out.reshape(flat),
                  residual=None if residual is None else residual.reshape(flat),
                  h_out=None if h_out is None else h_out.reshape(flat), mask=mask)
    y, cache = viewed(got[0], got[-1], x.shape, shape, out)
    if residual is None:
        return y, cache
    return y, (got[1].reshape(x.shape) if h_out is None else h_out), cache


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
        check_backward(dy, cache, out, dh)
        return run_backward(dy, cache, out, None, dh)
    link = sync.Exchange(cache.comm, "backward")
    try:
        check_backward(dy, cache, out, dh)
        return run_backward(dy, cache, out, link, dh)
    except BaseException as e:  # any failure (MemoryError too) reaches the peers, once
        link.fail(e)
        raise
