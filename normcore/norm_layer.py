"""The glue between a layer and one registered mode (:class:`_Norm`): the input rules of the
layer, the running-statistics snapshot and lock around a training forward, backward's
gradient accumulation, kept buffers (``reuse_buffers``) and folding."""
from __future__ import annotations

import numpy as np

from . import _steady, checks, folding
from .backend import backend_of
from .functional import backward, forward
from .layer_base import Layer, _layer_dtype, _layer_param_dtype
from .modes import get_mode

__all__ = []


_NO_SIZES = {}  # read only


def _residual_given(residual):
    """forward_add's residual is required, as :func:`normcore.add_normalize`'s is."""
    if residual is None:
        raise TypeError("residual: expected an array of x's shape and dtype, got None (use forward)")


class _Norm(Layer):
    """A layer over one registered mode."""

    _mode = None            # mode name or Mode
    _ndims = None           # accepted input ranks (None: any the spec accepts)
    _estimate = False
    _eps_may_be_none = False  # eps=None has a meaning (RMSNorm: the dtype's machine epsilon)
    #: True: forward and backward write into arrays the layer keeps and reuses while the
    #: input shape and dtype repeat, so large outputs cost no allocation (and no page
    #: faults) per call; each call then overwrites the arrays the previous call returned.
    reuse_buffers = False

    def __init__(self, *, features, param_shape, eps, momentum, affine, bias, track_running_stats,
                 running_shape=None, dtype=np.float32, param_dtype=None, unbiased=True, decay=None):
        super().__init__()
        self.dtype = _layer_dtype(dtype)
        self.param_dtype = _layer_param_dtype(self.dtype, param_dtype)
        self.eps = checks.eps(eps) if eps is not None or not self._eps_may_be_none else None
        # decay (TF/Keras/Flax) or momentum (PyTorch), not both; momentum then holds the
        # equivalent 1 - decay, and the update uses decay itself
        self.momentum, keep = checks.running_rate(momentum, decay, allow_none=True)
        self.decay = None if decay is None else keep
        self.unbiased = bool(unbiased)
        self.track_running_stats = bool(track_running_stats)
        self._features = features
        self.weight = np.ones(param_shape, self.param_dtype) if affine else None
        self.bias = np.zeros(param_shape, self.param_dtype) if (affine and bias) else None
        self.grad_weight = None if self.weight is None else np.zeros_like(self.weight)
        self.grad_bias = None if self.bias is None else np.zeros_like(self.bias)
        rshape = param_shape if running_shape is None else running_shape
        self.running_mean = np.zeros(rshape, self.param_dtype) if self.track_running_stats else None
        self.running_var = np.ones(rshape, self.param_dtype) if self.track_running_stats else None
        self.num_batches_tracked = 0 if self.track_running_stats else None

    def _sizes(self, x) -> dict:
        return _NO_SIZES

    def _features_of(self, x):
        """(axis, size, what) of the feature axis x must have."""
        return self._features

    def _check_input(self, x, residual=()):
        """Every rule on x for this layer (and, from :meth:`forward_add`, that a residual
        was given); returns x's backend."""
        _residual_given(residual)
        be = checks.array("x", x)
        if x.dtype != self.dtype:
            raise TypeError(f"x: dtype {x.dtype} does not match the layer's dtype {self.dtype}; "
                            f"cast x or build the layer with dtype=np.{x.dtype}")
        if self._ndims is not None and x.ndim not in self._ndims:
            want = " or ".join(f"{d}-D" for d in self._ndims)
            raise ValueError(f"x: {type(self).__name__} expects {want} input, got shape {x.shape}")
        axis, count, what = self._features_of(x)
        if axis is not None:
            if x.ndim <= max(axis, -axis - 1) or x.shape[axis] != count:
                got = x.shape[axis] if x.ndim > max(axis, -axis - 1) else "none"
                raise ValueError(f"x: expected {count} {what} on axis {axis}, got {got} (shape {x.shape})")
        return be

    def _eps(self, x):
        return self.eps

    def forward(self, x, mask=None):
        """Normalize ``x`` (same shape and dtype out) and keep the cache for backward.
        ``mask`` (boolean, broadcasting to x): statistics over its True elements only, the
        output everywhere (:func:`normcore.normalize`); :meth:`backward` uses it too.

        >>> import numpy as np
        >>> import normcore as nc
        >>> x = np.random.default_rng(0).standard_normal((2, 5, 3)).astype(np.float32)
        >>> real = np.arange(5)[None, :, None] < np.array([5, 3])[:, None, None]  # lengths 5, 3
        >>> y = nc.BatchNorm1d(3, channel_axis=-1)(x, mask=real)
        """
        if mask is None:
            y = _steady.layer_forward(self, x)  # a warm call: compiled, or None
            if y is not None:
                return y
        return self._forward(x, self._check_input(x), mask=mask)

    def forward_add(self, x, residual, mask=None):
        """``h = x + residual`` (x's dtype, rounded as NumPy's), then the layer's forward of
        h; returns ``(y, h)``. :meth:`backward` with ``dh=`` (the residual stream's
        gradient at h) then returns the gradient with respect to h, so to x and residual.
        With ``reuse_buffers``, h is written into a kept buffer as y is (the next call
        overwrites both).

        >>> import numpy as np
        >>> import normcore as nc
        >>> ln = nc.LayerNorm(8)
        >>> x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
        >>> y, h = ln.forward_add(x, x)
        >>> dh_total = ln.backward(np.ones_like(y), dh=np.ones_like(h))
        """
        if mask is None and residual is not None:
            got = _steady.layer_forward(self, x, residual)  # a warm call: compiled, or None
            if got is not None:
                return got
        return self._forward(x, self._check_input(x, residual), residual, mask)

    def _normalize(self, x, be, out, training, momentum, eps, residual=None, h_out=None, mask=None):
        track = self.track_running_stats
        return forward(x, be, self._mode, weight=self.weight, bias=self.bias, out=out,
                       running_mean=self.running_mean if track else None,
                       running_var=self.running_var if track else None, training=training,
                       momentum=checks.DEFAULT_MOMENTUM if self.decay is not None else momentum,
                       decay=self.decay, eps=eps, unbiased=self.unbiased,
                       estimate=self._estimate and training, sizes=self._sizes(x), comm=self._comm_or_none(),
                       residual=residual, h_out=h_out, mask=mask)

    def _comm_or_none(self):
        return None

    #: the input rank ``fold()`` shapes its arrays for when not told (None: any rank, so
    #: channels-first layers must be told)
    _fold_ndim = None

    def fold(self, ndim=None):
        """``(scale, shift)`` such that the eval-mode output is ``x * scale + shift``:
        ``scale = weight / sqrt(running_var + eps)``, ``shift = bias - running_mean * scale``.

        ``ndim``: the rank of the x they broadcast against: scale and shift are (C,) followed
        by ``ndim - 2`` axes of 1 (default: the layer's usual input rank, 4 for
        ``BatchNorm2d``, 2 for ``BatchNorm1d`` (pass 3 for (N, C, L)); layers of any rank,
        ``EstimatedBatchNorm`` and ``SyncBatchNorm``, need it); channels-last layers give (C,)
        for any rank.
        Computed in float64, returned in the layer's ``param_dtype`` (the running
        statistics' dtype: float32 beside a half-precision layer). The folded form multiplies x
        before it subtracts, so where x sits far from zero its rounding is that of
        ``|x| * scale``, not of the output: less accurate than the layer itself at large
        offsets (:mod:`normcore.folding`). Layers without running statistics, and layers in
        training mode (call ``.eval()`` first), raise ValueError.

        >>> import numpy as np
        >>> import normcore as nc
        >>> bn = nc.BatchNorm2d(3, dtype=np.float64)
        >>> x = np.random.default_rng(0).standard_normal((8, 3, 4, 4))
        >>> _ = bn(x)                                    # training: running statistics move
        >>> scale, shift = bn.eval().fold()
        >>> scale.shape
        (3, 1, 1)
        >>> bool(np.allclose(x * scale + shift, bn(x)))
        True
        """
        if self.running_mean is None:
            return super().fold(ndim)
        if self.training:  # as torch's fuse_conv_bn_eval: a training layer's output is not this
            raise ValueError(f"fold: {type(self).__name__} is in training mode, where it normalizes with batch "
                             f"statistics, not x * scale + shift; call .eval() first")
        scale, shift = folding.fold(self.running_mean, self.running_var, self.weight, self.bias, self.eps,
                                    center=get_mode(self._mode).center)
        shape = self._fold_shape(scale.shape, ndim)
        return scale.reshape(shape), shift.reshape(shape)

    def _fold_shape(self, param_shape, ndim):
        axis = self._features[0]
        if axis in (None, -1):
            return param_shape
        ndim = self._fold_ndim if ndim is None else checks.positive_int("ndim", ndim)
        if ndim is None:
            raise ValueError(f"ndim: {type(self).__name__} takes (N, C, *) inputs of any rank; "
                             f"pass the rank of x to shape scale and shift for it")
        if ndim < axis + 1:
            raise ValueError(f"ndim: an input of {ndim} dimensions has no channel axis {axis}")
        return param_shape + (1,) * (ndim - axis - 1)

    def _why_not_affine(self):
        if get_mode(self._mode).running_stats is not None:
            return ("keeps no running statistics (track_running_stats=False): in eval it "
                    "normalizes each input with that input's statistics")
        return super()._why_not_affine()

    def _forward(self, x, be, residual=None, mask=None):
        """forward for an x that :meth:`_check_input` accepted (``be``: its backend); with
        ``residual``, forward_add's (y, h).

        A training call that updates running statistics holds the layer's lock from the
        update to the new ``num_batches_tracked``, and undoes the update if anything (an
        error, a ``KeyboardInterrupt``) stops it before its end: the layer is left as it
        was before the call or as it is after it, never between."""
        if not (self.training and self.track_running_stats):
            got = self._run_forward(x, be, residual, mask, self.momentum)
            self._cache = got[-1]
            if mask is None:
                self._remember(x, got[-1], residual is not None)
            return got[0] if residual is None else (got[0], got[1])
        with self._lock:
            saved = self._snapshot()
            try:
                momentum = self.momentum
                if momentum is None:
                    momentum = 1.0 / (self.num_batches_tracked + 1)  # cumulative average
                got = self._run_forward(x, be, residual, mask, momentum)
                if x.size or self._comm_or_none() is not None:
                    self.num_batches_tracked = saved[2] + 1  # an empty batch (on its own) is not one
                self._cache = got[-1]
            except BaseException:
                self._restore(saved)
                raise
        if mask is None:
            self._remember(x, got[-1], residual is not None)
        return got[0] if residual is None else (got[0], got[1])

    def _remember(self, x, cache, residual):
        """After a call the signature's programs ran: keep what the next warm calls of this
        layer (forward, or forward_add with ``residual``) check against
        (:func:`normcore._steady.layer_forward`), or drop it."""
        ps = cache.programs
        if ps is None or self.reuse_buffers or self._comm_or_none() is not None or type(x) is not np.ndarray:
            _steady.forget(self, residual)
            return
        update = ps.route.update
        if self.decay is not None:
            momentum, keep = checks.running_rate(checks.DEFAULT_MOMENTUM, self.decay)
        elif self.momentum is None:
            momentum = keep = None  # the cumulative average: from num_batches_tracked per call
        else:
            momentum, keep = checks.running_rate(self.momentum, None)
        track = self.track_running_stats
        _steady.remember(self, residual, ps, cache.plan, cache.view, x, self.training, self.weight, self.bias,
                         self.running_mean if track else None, self.running_var if track else None, update,
                         self.eps, self.momentum, self.decay, self.unbiased, track, checks.eps(self._eps(x)),
                         momentum, keep)

    def _snapshot(self):
        """The running statistics and count a training forward may have to put back."""
        return self.running_mean.copy(), self.running_var.copy(), self.num_batches_tracked

    def _restore(self, saved):
        """Put back what :meth:`_snapshot` saved."""
        for a, old in ((self.running_mean, saved[0]), (self.running_var, saved[1])):
            if a.flags.writeable:  # (a read-only one was not written; the call's error says so)
                a[...] = old
        self.num_batches_tracked = saved[2]

    def _run_forward(self, x, be, residual, mask, momentum):
        out = h_out = None
        if self.reuse_buffers:
            inputs = (x,) if residual is None else (x, residual)
            out = self._buffer("_y_buffer", x.shape, x.dtype, *inputs)
            if isinstance(residual, type(x)) and residual.shape == x.shape:  # else the call says what is wrong
                h_out = self._buffer("_h_buffer", x.shape, x.dtype, *inputs)
        return self._normalize(x, be, out, self.training, 0.0 if momentum is None else momentum, self._eps(x),
                               residual, h_out, mask)

    def backward(self, dy, dh=None, *, retain_graph=False):
        """Return dx for this thread's last forward; add dweight/dbias into grad_weight /
        grad_bias. ``dh``: a gradient reaching the input by another path (after
        :meth:`forward_add`, the residual stream's at h), added to dx.

        A backward consumes its forward, as PyTorch's frees its graph: a second backward
        of the same forward raises RuntimeError (it would add the gradients twice) unless
        the first was given ``retain_graph=True``."""
        dx = _steady.layer_backward(self, dy, dh, retain_graph)  # a warm call's: compiled, or None
        if dx is not None:
            return dx
        cache = self._cache
        if cache is None:
            raise self._no_forward()
        out = None
        if self.reuse_buffers and hasattr(dy, "shape") and hasattr(dy, "dtype"):
            out = self._buffer("_dx_buffer", cache.shape, cache.dtype, dy, cache.x3,
                               *(() if dh is None or not hasattr(dh, "shape") else (dh,)))
        dx, dw, db = backward(dy, cache, out=out, dh=dh)
        self._accumulate(((self.grad_weight, dw), (self.grad_bias, db)), None if retain_graph else cache)
        return dx

    def _accumulate(self, pairs, consumed):
        """``grad += d`` for each (grad, d) pair, and the cache ``consumed`` dropped, as one
        step under the layer's lock (all of it or, when interrupted, none)."""
        pairs = [(g, d) for g, d in pairs if d is not None]
        with self._lock:
            saved = [g.copy() for g, _ in pairs]
            try:
                for g, d in pairs:
                    g += d
                if consumed is not None:
                    self._consume(consumed)
            except BaseException:
                for (g, _), old in zip(pairs, saved):
                    g[...] = old
                raise

    def _buffer(self, name, shape, dtype, *inputs):
        """This thread's kept array ``name`` if it still fits and overlaps no input, else a
        new one."""
        xp = backend_of(inputs[0]).xp
        tls = self._tls
        buf = getattr(tls, name, None)
        if buf is None or type(buf) is not type(inputs[0]) or buf.shape != shape or buf.dtype != dtype \
                or any(xp.may_share_memory(buf, a) for a in inputs):
            buf = xp.empty(shape, dtype)
            setattr(tls, name, buf)
        return buf
