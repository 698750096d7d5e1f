"""Layer classes with torch.nn's names, arguments and attributes, on NumPy arrays.

A layer owns its parameters (``weight``, ``bias``), running statistics (``running_mean``,
``running_var``, ``num_batches_tracked``) and accumulated gradients (``grad_weight``,
``grad_bias``, summed with ``+=`` across backward calls until :meth:`zero_grad`).
``layer(x)`` runs forward and remembers the cache for ``layer.backward(dy)``.

dtype: the input dtype the layer accepts (float32 by default, as in torch); parameters and
running statistics have ``param_dtype`` (the same, or float32 beside float16 / bfloat16, the
default there). An input of another dtype raises ``TypeError`` naming both dtypes: cast the
input, or build the layer with the input's dtype. Nothing is cast silently.

The base of every layer is :class:`normcore.layer_base.Layer` (state, save/load, devices,
threads); the glue to a registered mode is :mod:`normcore.norm_layer`. The batch and
instance norm layers of each input rank (1d, 2d, 3d) are made from one definition each
(:func:`_by_rank`).
"""
from __future__ import annotations

import numpy as np

from . import checks, sync
from .backend import machine_eps
from .functional import over_trailing_axes
from .forms import normalized_shape_tuple
from .layer_base import Layer  # noqa: F401  (normcore.layers.Layer: the base user modules subclass)
from .layer_docs import document
from .norm_layer import _Norm, _residual_given

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm",
           "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "RMSNorm", "ChannelNorm",
           "EstimatedBatchNorm", "BatchChannelNorm", "SyncBatchNorm"]


_BN_PARAMS = ["num_features", "eps", "momentum", "affine", "track_running_stats", "channel_axis", "bias", "dtype",
              "param_dtype", "unbiased", "decay"]


_BN_ATTRS = ["weight", "bias", "grad_weight", "grad_bias", "running_mean", "running_var",
             "num_batches_tracked", "training", "reuse_buffers"]


_PARAM_ATTRS = ["weight", "bias", "grad_weight", "grad_bias", "training", "reuse_buffers"]


class _BatchNorm(_Norm):
    _repr_always = ("eps", "momentum", "affine", "track_running_stats")

    def __init__(self, num_features, eps=1e-5, momentum=checks.DEFAULT_MOMENTUM, affine=True, track_running_stats=True,
                 channel_axis=1, *, bias=True, dtype=np.float32, param_dtype=None, unbiased=True, decay=None):
        num_features = checks.positive_int("num_features", num_features)
        if channel_axis not in (1, -1) or isinstance(channel_axis, bool):
            raise ValueError(f"channel_axis: expected 1 (channels first) or -1 (channels last), got {channel_axis!r}")
        self.num_features = num_features
        self.affine = bool(affine)
        self.channel_axis = channel_axis
        super().__init__(features=(channel_axis, num_features, "channels (num_features)"),
                         param_shape=(num_features,), eps=eps, momentum=momentum, affine=affine,
                         bias=bias, track_running_stats=track_running_stats, dtype=dtype, param_dtype=param_dtype,
                         unbiased=unbiased, decay=decay)

    @property
    def _mode(self):
        return "batch_norm" if self.channel_axis == 1 else "batch_norm_channels_last"


# The spatial axes after (N, C) of each input rank, and the example input of its layers.
_RANKS = {1: ("L", (8, 4, 3), (2, 3, 8)), 2: ("H, W", (2, 4, 3, 3), (2, 3, 4, 4)),
          3: ("D, H, W", (2, 4, 2, 2, 2), (2, 3, 2, 2, 2))}


def _by_rank(kind, k):
    """The ``BatchNorm{k}d`` (kind "batch") or ``InstanceNorm{k}d`` (kind "instance") layer
    class: one definition for every rank k, its docstring and example made for k."""
    axes, bn_x, in_x = _RANKS[k]
    name = f"{'Batch' if kind == 'batch' else 'Instance'}Norm{k}d"
    full = f"(N, C, {axes})"
    if kind == "batch":
        inputs = f"(N, C) or {full}" if k == 1 else full
        per = f"N and {axes}" + (" (N alone for an (N, C) input)" if k == 1 else "")
        doc = f"""Batch norm over {inputs} input: statistics per channel.

        Input {inputs}, or (N, {axes}, C) with ``channel_axis=-1``; output of the same shape.
        Statistics per channel over {per}. Parameters and running statistics: shape (C,).

        Examples
        --------
        >>> import numpy as np
        >>> import normcore as nc
        >>> bn = nc.{name}(4)
        >>> x = np.random.default_rng(0).standard_normal({bn_x}).astype(np.float32)
        >>> y = bn(x)                          # batch statistics; running statistics updated
        >>> dx = bn.backward(np.ones_like(y))  # dL/dx; bn.grad_weight, bn.grad_bias accumulate
        >>> dx.shape == x.shape, bn.grad_bias.tolist(), bn.num_batches_tracked
        (True, {[float(np.prod(bn_x) // bn_x[1])] * bn_x[1]}, 1)
        >>> y_eval = bn.eval()(x)              # running statistics
        """
        # BatchNorm1d's usual input is (N, C): fold() shapes for it unless told
        body = {"_ndims": (2, 3) if k == 1 else (k + 2,), "_fold_ndim": 2 if k == 1 else k + 2}
        base, decorate = _BatchNorm, document(params=_BN_PARAMS, attributes=_BN_ATTRS, notes=["batch_statistics"])
    else:
        doc = f"""Instance norm over {full} input: statistics per sample and channel.

        Input {full}, or (C, {axes}) unbatched (a batch of one, as torch takes it); output of
        the same shape. Each (sample, channel) is normalized over its {axes.replace(", ", " x ")}
        positions. With ``affine=True``, weight and bias (C,). With
        ``track_running_stats=True``, training updates per-channel running statistics (the
        batch average of the per-instance ones, as in PyTorch) and eval uses them; otherwise
        eval also uses the instance statistics.

        Examples
        --------
        >>> import numpy as np
        >>> import normcore as nc
        >>> inorm = nc.{name}(3, affine=True)
        >>> x = np.random.default_rng(0).standard_normal({in_x}).astype(np.float32)
        >>> y = inorm(x)
        >>> dx = inorm.backward(np.ones_like(y))   # inorm.grad_weight, inorm.grad_bias accumulate
        >>> bool(abs(y.mean(axis={tuple(range(2, k + 2)) if k > 1 else 2})).max() < 1e-5), inorm.grad_bias.tolist()
        (True, {[float(np.prod(in_x) // in_x[1])] * in_x[1]})
        """
        body = {"_ndims": (k + 1, k + 2), "_fold_ndim": k + 2}
        base, decorate = _InstanceNorm, document(params=_IN_PARAMS, attributes=_BN_ATTRS)
    body.update(__doc__=doc, __module__=__name__, __qualname__=name)
    return decorate(type(name, (base,), body))


BatchNorm1d, BatchNorm2d, BatchNorm3d = (_by_rank("batch", k) for k in (1, 2, 3))


@document(params=["channels", "eps", "momentum", "affine", "bias", "dtype", "param_dtype", "unbiased", "decay"], attributes=_BN_ATTRS)
class EstimatedBatchNorm(_BatchNorm):
    """Estimated batch norm (from Batch-Channel Normalization): normalize with running statistics.

    Input (N, C, *); output of the same shape; parameters and running statistics (C,).
    Training first updates the running statistics from the batch (as batch norm does), then
    normalizes with the updated running statistics, so no gradient flows through the
    statistics: dx is ``dy * weight / sqrt(running_var + eps)``. Eval normalizes with the
    running statistics as they are.

    Examples
    --------
    >>> import numpy as np
    >>> import normcore as nc
    >>> ebn = nc.EstimatedBatchNorm(3)
    >>> x = np.random.default_rng(0).standard_normal((8, 3, 5)).astype(np.float32)
    >>> y = ebn(x)                          # running statistics updated, then used
    >>> dx = ebn.backward(np.ones_like(y))
    >>> bool(np.allclose(dx, 1 / np.sqrt(ebn.running_var + ebn.eps)[:, None]))
    True
    """
    _estimate = True

    def __init__(self, channels, eps=1e-5, momentum=checks.DEFAULT_MOMENTUM, affine=True, *, bias=True, dtype=np.float32,
                 param_dtype=None, unbiased=True, decay=None):
        super().__init__(channels, eps=eps, momentum=momentum, affine=affine, bias=bias,
                         track_running_stats=True, dtype=dtype, param_dtype=param_dtype, unbiased=unbiased, decay=decay)
        self.channels = self.num_features


@document(params=_BN_PARAMS[:6] + ["comm", "bias", "dtype", "param_dtype", "unbiased", "decay"], attributes=_BN_ATTRS)
class SyncBatchNorm(_BatchNorm):
    """Batch norm whose statistics span the whole batch split across MPI ranks.

    Each rank passes its slice of the batch, shape (N_rank, C, *) (or (N_rank, *, C) with
    ``channel_axis=-1``; any rank >= 2, N_rank may differ between ranks and be 0); forward
    and backward return what :class:`BatchNorm2d` returns for the concatenated batch, on
    this rank's slice. Training forward and backward each make one collective call on
    ``comm``; eval mode makes none. Running statistics update identically on every rank, and
    ``grad_weight`` / ``grad_bias`` receive the sums over all ranks. Every rank must call
    forward and backward in the same order. Protocol and errors: :mod:`normcore.sync`.
    Run under MPI, e.g. ``mpiexec -n 2 python examples/sync_batch_norm.py``.

    Examples
    --------
    Without MPI, :func:`normcore.testing.run_ranks` runs ranks on threads:

    >>> import numpy as np
    >>> import normcore as nc
    >>> from normcore.testing import run_ranks
    >>> x = np.random.default_rng(0).standard_normal((6, 3, 4, 4)).astype(np.float32)
    >>> def step(comm):
    ...     bn = nc.SyncBatchNorm(3, comm=comm)
    ...     y = bn(x[:2] if comm.Get_rank() == 0 else x[2:])  # uneven slices
    ...     return y, bn.backward(np.ones_like(y))
    >>> (y0, dx0), (y1, dx1) = run_ranks(2, step)
    >>> bool(np.allclose(np.concatenate([y0, y1]), nc.BatchNorm2d(3)(x), atol=1e-5))
    True
    """
    _ndims = None

    def __init__(self, num_features, eps=1e-5, momentum=checks.DEFAULT_MOMENTUM, affine=True, track_running_stats=True,
                 channel_axis=1, comm=None, *, bias=True, dtype=np.float32, param_dtype=None, unbiased=True, decay=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, bias=bias,
                         track_running_stats=track_running_stats, channel_axis=channel_axis,
                         dtype=dtype, param_dtype=param_dtype, unbiased=unbiased, decay=decay)
        if comm is not None:
            sync.check_comm(comm)
        self._comm = comm

    @property
    def comm(self):
        """The communicator (``MPI.COMM_WORLD`` unless one was given)."""
        if self._comm is None:
            try:
                from mpi4py import MPI
            except ImportError:
                raise ImportError("SyncBatchNorm with comm=None uses mpi4py's MPI.COMM_WORLD: "
                                  "pip install mpi4py mpich (or pass a communicator)") from None
            self._comm = MPI.COMM_WORLD
        return self._comm

    def _comm_or_none(self):
        return self.comm

    def _check_input(self, x, residual=()):
        # A rejected input still takes part in the exchange its peers are making, carrying
        # the error, so that they raise instead of waiting.
        comm = self.comm
        try:
            be = super()._check_input(x, residual)
            if x.ndim < 2:
                raise ValueError(f"x: SyncBatchNorm expects input of rank >= 2, got shape {x.shape}")
            return be
        except BaseException as e:
            if self.training or not self.track_running_stats:  # the peers are exchanging
                sync.Exchange(comm, "forward").fail(e)
            raise

    def backward(self, dy, dh=None, *, retain_graph=False):
        """As :meth:`BatchNorm2d.backward`; a backward before any forward (or a second one
        for the same forward) still takes part in the peers' exchange, carrying its error."""
        if self._cache is None:
            e = self._no_forward()
            sync.Exchange(self.comm, "backward").fail(e)
            raise e
        return super().backward(dy, dh, retain_graph=retain_graph)


_IN_PARAMS = ["channels=num_features", "eps", "momentum", "affine_off=affine",
              "track_running_stats_off=track_running_stats", "bias", "dtype", "param_dtype", "unbiased", "decay"]


class _InstanceNorm(_Norm):
    _mode = "instance_norm"
    _repr_always = ("eps", "momentum", "affine", "track_running_stats")

    def __init__(self, num_features, eps=1e-5, momentum=checks.DEFAULT_MOMENTUM, affine=False, track_running_stats=False,
                 *, bias=True, dtype=np.float32, param_dtype=None, unbiased=True, decay=None):
        num_features = checks.positive_int("num_features", num_features)
        self.num_features = num_features
        self.affine = bool(affine)
        super().__init__(features=(1, num_features, "channels (num_features)"),
                         param_shape=(num_features,), eps=eps, momentum=momentum, affine=affine,
                         bias=bias, track_running_stats=track_running_stats, dtype=dtype, param_dtype=param_dtype,
                         unbiased=unbiased, decay=decay)

    def _features_of(self, x):
        if x.ndim == self._ndims[0]:  # unbatched, (C, *): channels first
            return (0,) + self._features[1:]
        return self._features

    def _normalize(self, x, be, out, training, momentum, eps, residual=None, h_out=None, mask=None):
        if x.ndim != self._ndims[0]:
            return super()._normalize(x, be, out, training, momentum, eps, residual, h_out, mask)
        # unbatched input (as torch takes it): a batch of one, presented under x's shape
        batched = [None if a is None else a[None] if getattr(a, "ndim", None) == x.ndim else a
                   for a in (x, out, residual, h_out)]
        got = super()._normalize(batched[0], be, batched[1], training, momentum, eps, batched[2], batched[3], mask)
        cache = got[-1]
        cache.view = (x.shape, (self.num_features,))
        return tuple(a[0] for a in got[:-1]) + (cache,)


InstanceNorm1d, InstanceNorm2d, InstanceNorm3d = (_by_rank("instance", k) for k in (1, 2, 3))


class _LastAxesNorm(_Norm):
    _mode = "layer_norm"
    _repr_always = ("eps", "elementwise_affine")

    def __init__(self, normalized_shape, eps, affine, bias, dtype, param_dtype):
        self.normalized_shape = normalized_shape_tuple(normalized_shape)
        super().__init__(features=(None, self.normalized_shape, ""), param_shape=self.normalized_shape,
                         eps=eps, momentum=0.1, affine=affine, bias=bias, track_running_stats=False,
                         dtype=dtype, param_dtype=param_dtype)

    def _check_input(self, x, residual=()):
        be = super()._check_input(x, residual)
        checks.trailing_shape("x", x, self.normalized_shape)
        return be

    def _normalize(self, x, be, out, training, momentum, eps, residual=None, h_out=None, mask=None):
        # the mode's spec has one parameter axis: x viewed as (..., prod(shape)); _check_input
        # checked x's trailing axes
        return over_trailing_axes(x, be, self._mode, self.normalized_shape, self.weight, self.bias, eps, out,
                                  residual=residual, h_out=h_out, mask=mask)


@document(params=["normalized_shape", "eps", "elementwise_affine", "ln_bias=bias", "dtype", "param_dtype"], attributes=_PARAM_ATTRS, param_shape="normalized_shape")
class LayerNorm(_LastAxesNorm):
    """Layer norm over the trailing ``normalized_shape`` axes.

    Input (*, *normalized_shape); output of the same shape. Every position of the leading
    axes is normalized over the trailing axes with its own mean and biased variance, in
    training and eval alike (there are no running statistics); weight and bias have shape
    ``normalized_shape``.

    Examples
    --------
    >>> import numpy as np
    >>> import normcore as nc
    >>> ln = nc.LayerNorm(8)
    >>> x = np.random.default_rng(0).standard_normal((4, 5, 8)).astype(np.float32)
    >>> y = ln(x)
    >>> dx = ln.backward(np.ones_like(y))   # ln.grad_weight, ln.grad_bias accumulate
    >>> bool(abs(y.mean(axis=-1)).max() < 1e-5), ln.grad_bias.tolist() == [20.0] * 8
    (True, True)
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, *, dtype=np.float32, param_dtype=None):
        self.elementwise_affine = bool(elementwise_affine)
        super().__init__(normalized_shape, eps, elementwise_affine, bias, dtype, param_dtype)


@document(params=["normalized_shape", "eps_rms=eps", "elementwise_affine", "dtype", "param_dtype"], attributes=["weight", "grad_weight", "training", "reuse_buffers"], param_shape="normalized_shape")
class RMSNorm(_LastAxesNorm):
    """RMS norm over the trailing axes: ``y = x / sqrt(mean(x**2) + eps) * weight``.

    Input (*, *normalized_shape); output of the same shape. No centring and no bias; each
    position of the leading axes uses its own mean square, in training and eval alike.

    Examples
    --------
    >>> import numpy as np
    >>> import normcore as nc
    >>> rms = nc.RMSNorm(8)
    >>> x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    >>> y = rms(x)
    >>> dx = rms.backward(np.ones_like(y))   # rms.grad_weight accumulates
    >>> bool(abs((y ** 2).mean(axis=-1) - 1).max() < 1e-4), rms.bias is None
    (True, True)
    """
    _mode = "rms_norm"
    _eps_may_be_none = True

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, *, dtype=np.float32, param_dtype=None):
        self.elementwise_affine = bool(elementwise_affine)
        super().__init__(normalized_shape, eps, elementwise_affine, False, dtype, param_dtype)

    def _eps(self, x):
        return machine_eps(self.dtype) if self.eps is None else self.eps


class _GroupedNorm(_Norm):
    _ndims = None
    _repr_always = ("eps", "affine")

    def __init__(self, groups, channels, eps, affine, bias, param_shape, dtype, param_dtype,
                 names=("num_groups", "num_channels")):
        groups = checks.positive_int(names[0], groups)
        channels = checks.positive_int(names[1], channels)
        checks.divides(names[0], groups, names[1], channels)
        self._groups = groups
        self.affine = bool(affine)
        super().__init__(features=(1, channels, "channels"), param_shape=param_shape, eps=eps,
                         momentum=0.1, affine=affine, bias=bias, track_running_stats=False,
                         dtype=dtype, param_dtype=param_dtype)

    def _sizes(self, x):
        return {"g": self._groups}


@document(params=["num_groups", "channels=num_channels", "eps", "affine", "bias", "dtype", "param_dtype"], attributes=_PARAM_ATTRS)
class GroupNorm(_GroupedNorm):
    """Group norm over (N, C, *) input: channels split into ``num_groups`` groups.

    Input (N, C, *); output of the same shape. Each sample's group of C / G adjacent
    channels is normalized over its channels and positions, in training and eval alike;
    weight and bias are per channel, (C,).

    Examples
    --------
    >>> import numpy as np
    >>> import normcore as nc
    >>> gn = nc.GroupNorm(2, 4)
    >>> x = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
    >>> y = gn(x)
    >>> dx = gn.backward(np.ones_like(y))   # gn.grad_weight, gn.grad_bias accumulate
    >>> bool(abs(y.reshape(3, 2, 10).mean(axis=-1)).max() < 1e-5), gn.grad_bias.tolist()
    (True, [15.0, 15.0, 15.0, 15.0])
    """
    _mode = "group_norm"

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, *, bias=True, dtype=np.float32, param_dtype=None):
        self.num_groups, self.num_channels = num_groups, num_channels
        super().__init__(num_groups, num_channels, eps, affine, bias, (num_channels,), dtype, param_dtype)


@document(params=["channels", "num_groups=groups", "eps", "affine_group=affine", "bias", "dtype", "param_dtype"], attributes=_PARAM_ATTRS, param_shape="(G,)")
class ChannelNorm(_GroupedNorm):
    """Channel norm (from Batch-Channel Normalization): group norm with one weight and bias per group.

    Input (N, C, *); output of the same shape. Normalized as :class:`GroupNorm` is; the
    affine transform has one scale and shift per group, shape (G,).

    Examples
    --------
    >>> import numpy as np
    >>> import normcore as nc
    >>> cn = nc.ChannelNorm(4, 2)
    >>> x = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
    >>> y = cn(x)
    >>> dx = cn.backward(np.ones_like(y))
    >>> cn.weight.shape, cn.grad_bias.tolist()
    ((2,), [30.0, 30.0])
    """
    _mode = "channel_norm"

    def __init__(self, channels, groups, eps=1e-5, affine=True, *, bias=True, dtype=np.float32, param_dtype=None):
        self.channels, self.groups = channels, groups
        super().__init__(groups, channels, eps, affine, bias, (groups,), dtype, param_dtype, names=("groups", "channels"))


class _AnyRankBatchNorm(_BatchNorm):
    _ndims = None


@document(params=["channels", "num_groups=groups", "eps", "momentum", "estimate", "bias", "dtype", "param_dtype", "unbiased", "decay"], attributes=["batch_norm", "channel_norm", "training", "reuse_buffers"])
class BatchChannelNorm(Layer):
    """Batch-channel normalization: (estimated) batch norm, then channel norm, on (N, C, *).

    Input (N, C, *); output of the same shape. ``y = channel_norm(batch_norm(x))``; the
    parameters, gradients and running statistics live in the two sub-layers, and
    :meth:`state_dict` names them ``"batch_norm.weight"``, ``"channel_norm.weight"``, ...

    Examples
    --------
    >>> import numpy as np
    >>> import normcore as nc
    >>> bcn = nc.BatchChannelNorm(4, 2)
    >>> x = np.random.default_rng(0).standard_normal((8, 4, 3)).astype(np.float32)
    >>> y = bcn(x)
    >>> dx = bcn.backward(np.ones_like(y))
    >>> sorted(bcn.state_dict())[:3]
    ['batch_norm.bias', 'batch_norm.num_batches_tracked', 'batch_norm.running_mean']
    """

    _repr_always = ("eps", "momentum", "estimate")

    def __init__(self, channels, groups, eps=1e-5, momentum=checks.DEFAULT_MOMENTUM, estimate=True, *, bias=True,
                 dtype=np.float32, param_dtype=None, unbiased=True, decay=None):
        super().__init__()
        self.channels, self.groups, self.estimate = channels, groups, bool(estimate)
        self.channel_norm = ChannelNorm(channels, groups, eps=eps, bias=bias, dtype=dtype, param_dtype=param_dtype)
        bn = EstimatedBatchNorm if estimate else _AnyRankBatchNorm
        self.batch_norm = bn(channels, eps=eps, momentum=momentum, bias=bias, dtype=dtype, param_dtype=param_dtype,
                             unbiased=unbiased, decay=decay)

    def _children(self):
        return {"batch_norm": self.batch_norm, "channel_norm": self.channel_norm}

    @property
    def reuse_buffers(self):
        """See :attr:`BatchNorm2d.reuse_buffers`; set on both sub-layers."""
        return self.channel_norm.reuse_buffers

    @reuse_buffers.setter
    def reuse_buffers(self, value):
        self.batch_norm.reuse_buffers = self.channel_norm.reuse_buffers = bool(value)

    def forward(self, x, mask=None):
        """y = channel_norm(batch_norm(x)); x is checked once, for both. ``mask``: both
        statistics over its True elements (see :meth:`BatchNorm2d.forward`)."""
        return self._both(x, None, mask)

    def forward_add(self, x, residual, mask=None):
        """``h = x + residual``, then y = channel_norm(batch_norm(h)); returns ``(y, h)``
        (see :meth:`BatchNorm2d.forward_add`)."""
        _residual_given(residual)
        return self._both(x, residual, mask)

    def _both(self, x, residual, mask=None):
        be = self.channel_norm._check_input(x)
        bn = self.batch_norm
        # one forward is atomic: the second step failing (or interrupted) undoes the
        # first's update, under the batch norm's lock so no other thread's update is undone
        with bn._lock:
            stateful = bn.training and bn.track_running_stats
            saved = bn._snapshot() if stateful else None
            cache = bn._cache
            try:
                if residual is None:
                    return self.channel_norm._forward(bn._forward(x, be, mask=mask), be, mask=mask)
                z, h = bn._forward(x, be, residual, mask)
                return self.channel_norm._forward(z, be, mask=mask), h
            except BaseException:
                if saved is not None:
                    bn._restore(saved)
                bn._cache = cache
                raise

    def backward(self, dy, dh=None, *, retain_graph=False):
        """dx through both sub-layers (plus ``dh``, as :meth:`BatchNorm2d.backward`); their
        gradients accumulate in the sub-layers. Consumes the forward as
        :meth:`BatchNorm2d.backward` does."""
        cn, bn = self.channel_norm, self.batch_norm
        cache, bn_cache = cn._cache, bn._cache
        if cache is None or bn_cache is None:
            raise (cn if cache is None else bn)._no_forward("BatchChannelNorm")
        if dh is not None:  # checked before any gradient is touched
            checks.like_x("dh", dh, cache.shape, cache.dtype, cache.backend)
        # channel_norm.backward validates dy before it touches any gradient; if the batch
        # norm's step then fails, the channel norm's gradients are put back
        saved = [(g, g.copy()) for g in (cn.grad_weight, cn.grad_bias) if g is not None]
        try:
            dz = cn.backward(dy, retain_graph=True)
            dx = bn.backward(dz, dh, retain_graph=retain_graph)
        except BaseException:
            with cn._lock:
                for g, old in saved:
                    g[...] = old
            raise
        if not retain_graph:
            cn._consume(cache)
        return dx
