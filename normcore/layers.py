"""Layer classes with torch.nn's names, arguments and attributes, on NumPy arrays.

A layer owns its parameters (``weight``, ``bias``), running statistics (``running_mean``,
``running_var``, ``num_batches_tracked``) and accumulated gradients (``grad_weight``,
``grad_bias``, summed with ``+=`` across backward calls until :meth:`zero_grad`).
``layer(x)`` runs forward and remembers the cache for ``layer.backward(dy)``.

dtype: the input dtype the layer accepts (float32 by default, as in torch); parameters and
running statistics have ``param_dtype`` (the same, or float32 beside float16 / bfloat16, the
default there). An input of another dtype raises ``TypeError`` naming both dtypes: cast the
input, or build the layer with the input's dtype. Nothing is cast silently.
"""
from __future__ import annotations

import functools
import inspect
import os
import threading
import zipfile

import numpy as np

from . import checks, sync
from .backend import backend_named, backend_of, machine_eps
from .forms import last_axes, normalized_shape_tuple
from .functional import backward, forward
from . import folding
from .layer_docs import document
from .modes import get_mode

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm",
           "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "RMSNorm", "ChannelNorm",
           "EstimatedBatchNorm", "BatchChannelNorm", "SyncBatchNorm"]

_NO_SIZES = {}  # read only
_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_ARRAYS = ("weight", "bias", "grad_weight", "grad_bias", "running_mean", "running_var")


def _layer_dtype(dtype, name="dtype"):
    expected = "float32, float64, float16 or bfloat16, in native byte order"
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name}: expected {expected}, got {dtype!r}") from None
    if dt.name not in ("float32", "float64", "float16", "bfloat16") or not dt.isnative:
        # a byte-swapped dtype would be refused by every forward: refuse it here
        raise TypeError(f"{name}: expected {expected}, got {dt.str if not dt.isnative else dt}")
    return dt


def _layer_param_dtype(dtype, param_dtype):
    """The dtype of a layer's parameters and running statistics: ``param_dtype``, by default
    float32 beside a half-precision ``dtype`` (mixed precision, as PyTorch's CPU kernels and
    Flax's ``param_dtype`` keep them) and ``dtype`` itself otherwise; one of
    :func:`normcore.checks.param_dtypes`."""
    allowed = checks.param_dtypes(dtype)
    if param_dtype is None:
        return allowed[-1]
    pd = _layer_dtype(param_dtype, "param_dtype")
    if pd not in allowed:
        raise TypeError(f"param_dtype: expected {' or '.join(d.name for d in allowed)} "
                        f"(the layer's dtype {dtype}), got {pd}")
    return pd


class _Shown(str):
    """A string a repr shows without quotes (a dtype's name, a communicator's type)."""

    def __repr__(self):
        return str(self)


def _same(a, b):
    """``a`` is the default ``b`` (1 for 1.0 is not: the repr shows what was given)."""
    try:
        return a is b or (type(a) is type(b) and bool(a == b))
    except (TypeError, ValueError):  # an array-like argument
        return False


def _npz_path(path):
    """``path`` as :meth:`Layer.save` writes it: with ``.npz`` appended when missing."""
    p = os.fspath(path)
    return p if p.endswith(".npz") else p + ".npz"


def _host_copy(a):
    """A NumPy copy of a NumPy or CuPy array (or of anything NumPy reads as one)."""
    return a.get() if backend_of(a).name == "cuda" else np.array(a, copy=True)


def _named_init(init, name):
    """``init`` whose argument errors name ``name`` (the public class called): an inherited
    ``__init__`` would name the private base it is defined on."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        try:
            signature.bind(self, *args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{name}(): {e}") from None
        init(self, *args, **kwargs)
    return __init__


def _residual_given(residual):
    """forward_add's residual is required, as :func:`normcore.add_normalize`'s is."""
    if residual is None:
        raise TypeError("residual: expected an array of x's shape and dtype, got None (use forward)")


class _PerThread(threading.local):
    """What one thread's calls of a layer keep: the cache its next backward consumes and
    the ``reuse_buffers`` arrays its calls write (``_y_buffer``, ``_h_buffer``, ``_dx_buffer``)."""

    cache = None
    consumed = False  # the last forward's cache was consumed by a backward


class Layer:
    """Base of every layer: train/eval, named parameters and gradients, state_dict and
    ``.npz`` save/load. Attributes ``weight``/``bias`` (with ``grad_weight``/``grad_bias``)
    and ``running_mean``/``running_var``/``num_batches_tracked`` are picked up by name;
    sub-layers come from :meth:`_children`. User modules (a Linear layer, a Sequential
    container) can subclass it to share the same protocol.

    Threads: one layer may be called from several threads. Each thread's ``backward``
    pairs with that thread's last forward (caches and kept buffers are per thread), and the
    writes to the layer's state (running statistics with ``num_batches_tracked``, the
    ``+=`` of the gradients) are serialized by the layer's lock, so none is lost."""

    #: constructor arguments the repr shows even at their defaults (those torch's repr shows);
    #: the required ones and any given a non-default value are always shown
    _repr_always = ()

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        # the arguments as given, for the repr (unpickling calls __new__ with none)
        try:
            bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
        except TypeError:
            self._init_args = {}
        else:
            # a communicator is shown by its type, and not kept alive by the repr
            self._init_args = {k: _Shown(type(v).__name__) if k == "comm" and v is not None else v
                               for k, v in list(bound.arguments.items())[1:]}
        # made here, not in __init__: unpickling and copying call __new__ alone
        self._lock = threading.RLock()
        self._tls = _PerThread()
        return self

    def __init__(self):
        self.training = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):  # errors name the class called, not a private base
            cls.__init__ = _named_init(cls.__init__, cls.__name__)

    @property
    def _cache(self):
        """The calling thread's last forward's cache (None: none, or consumed by backward)."""
        return self._tls.cache

    @_cache.setter
    def _cache(self, value):
        self._tls.cache = value
        self._tls.consumed = False

    def _no_forward(self, name=None):
        """The RuntimeError of a backward without a forward to pair with (on this thread),
        naming ``name`` (the layer's class by default)."""
        name = name or type(self).__name__
        if self._tls.consumed:
            return RuntimeError(f"{name}.backward: this thread's last forward was already consumed by a "
                                f"backward (a second one would add its gradients again); pass "
                                f"retain_graph=True to the first backward to call it again, or run forward")
        return RuntimeError(f"{name}.backward called before forward (on this thread)")

    def _consume(self, cache):
        """This thread's cache dropped as consumed, if it is still ``cache``."""
        if self._tls.cache is cache:
            self._tls.cache, self._tls.consumed = None, True

    def __getstate__(self):
        # the lock and the per-thread record do not pickle: the copy gets fresh ones, and
        # the calling thread's cache (a pickled layer can still run its backward)
        state = {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_tls")}
        state["_cache"], state["_consumed"] = self._tls.cache, self._tls.consumed
        return state

    def __setstate__(self, state):
        state = dict(state)
        cache, consumed = state.pop("_cache", None), state.pop("_consumed", False)
        self.__dict__.update(state)
        self._tls.cache, self._tls.consumed = cache, consumed

    def __repr__(self):
        """The class and its constructor arguments: the required ones, those given a
        non-default value, and those torch's repr always shows (``eps``, ``momentum``, ...).

        >>> BatchNorm1d(64, momentum=0.01, dtype=np.float64)
        BatchNorm1d(64, eps=1e-05, momentum=0.01, affine=True, track_running_stats=True, dtype=float64)
        """
        given = getattr(self, "_init_args", {})
        parts = []
        for name, param in list(inspect.signature(type(self).__init__).parameters.items())[1:]:
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if name == "momentum" and given.get("decay") is not None:
                continue  # the layer was given the other convention: decay shows instead
            required = param.default is param.empty
            value = given.get(name, None if required else param.default)
            if name in ("normalized_shape", "eps") and name in self.__dict__:
                value = self.__dict__[name]  # as checked: (8,) for 8
            if name == "dtype":
                value = _Shown(np.dtype(value).name)
                changed = np.dtype(given.get(name, param.default)) != np.dtype(param.default)
            elif name == "param_dtype":
                changed = given.get(name) is not None
                value = _Shown(np.dtype(value).name) if changed else value
            else:
                changed = name in given and not _same(given[name], param.default)
            if required and param.kind != param.KEYWORD_ONLY:
                parts.append(repr(value))
            elif required or changed or name in self._repr_always:
                parts.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    # -- modes ---------------------------------------------------------------------
    def train(self, mode: bool = True):
        """Switch to training (batch statistics) or, with ``mode=False``, eval; return self."""
        self.training = bool(mode)
        for child in self._children().values():
            child.train(mode)
        return self

    def eval(self):
        """Switch to eval mode (running statistics where the layer tracks them); return self."""
        return self.train(False)

    # -- folding -------------------------------------------------------------------
    def fold(self, ndim=None):
        """``(scale, shift)`` such that the eval-mode output is ``x * scale + shift``.

        Only for layers whose eval output is affine in x (those normalizing with running
        statistics: batch norms, ``EstimatedBatchNorm``, ``SyncBatchNorm``, instance norms
        with ``track_running_stats=True``); any other raises ValueError saying why. See
        :class:`BatchNorm2d` for the shapes and :mod:`normcore.folding` for the accuracy.
        """
        raise ValueError(f"fold: {type(self).__name__} {self._why_not_affine()}, so its eval output "
                         f"is not x * scale + shift")

    def _why_not_affine(self):
        return "normalizes each input with statistics of that input"

    def __call__(self, x, **kwargs):
        return self.forward(x, **kwargs)

    # -- device --------------------------------------------------------------------
    def to(self, device):
        """Move parameters, gradients and running statistics to ``"cuda"`` (the current
        CuPy device) or ``"cpu"``; return self. A layer computes where its arrays live, and
        its input must live there too.

        >>> BatchNorm1d(3).to("cpu").device
        'cpu'
        """
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
        move = backend_named(device).xp.asarray if device == "cuda" else _host_copy
        with self._lock:
            for name in _ARRAYS:
                value = getattr(self, name, None)
                if value is not None:
                    setattr(self, name, move(value))
            # every thread's caches and kept buffers (y, h, dx) live on the old device
            self._tls = _PerThread()
        for child in self._children().values():
            child.to(device)
        return self

    def cuda(self):
        """``self.to("cuda")``."""
        return self.to("cuda")

    def cpu(self):
        """``self.to("cpu")``."""
        return self.to("cpu")

    @property
    def device(self):
        """``"cuda"`` when the layer's arrays are CuPy arrays, else ``"cpu"``."""
        for name in _ARRAYS:
            value = getattr(self, name, None)
            if value is not None:
                return "cpu" if isinstance(value, np.ndarray) else "cuda"
        for child in self._children().values():
            return child.device
        return "cpu"

    def _children(self) -> dict:
        return {}

    # -- gradients -----------------------------------------------------------------
    def named_parameters(self):
        """``[(name, parameter, accumulated gradient), ...]`` for an optimizer, children
        prefixed as in :meth:`state_dict`; parameters are updated in place.

        >>> [name for name, p, g in BatchNorm1d(3).named_parameters()]
        ['weight', 'bias']
        """
        out = []
        for name, grad in (("weight", "grad_weight"), ("bias", "grad_bias")):
            p = getattr(self, name, None)
            if p is not None:
                out.append((name, p, getattr(self, grad)))
        for prefix, child in self._children().items():
            out += [(f"{prefix}.{n}", p, g) for n, p, g in child.named_parameters()]
        return out

    def zero_grad(self):
        """Reset the accumulated ``grad_weight`` / ``grad_bias`` to zero."""
        for name in ("grad_weight", "grad_bias"):
            g = getattr(self, name, None)
            if g is not None:
                g[...] = 0
        for child in self._children().values():
            child.zero_grad()

    # -- state ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """NumPy copies of the parameters and buffers (GPU ones copied to the host), keyed
        as in torch (``"weight"``, ...)."""
        out = {}
        for name in _STATE:
            value = getattr(self, name, None)
            if value is not None:
                out[name] = _host_copy(value)
        for prefix, child in self._children().items():
            out.update({f"{prefix}.{k}": v for k, v in child.state_dict().items()})
        return out

    def load_state_dict(self, state: dict):
        """Load a :meth:`state_dict`. Keys and shapes must match; values are cast to the
        layer's dtype. Everything is checked before anything is written."""
        if not isinstance(state, dict):
            raise TypeError(f"state: expected a dict, got {type(state).__name__}")
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"state: missing keys {missing}, unexpected keys {unexpected}")
        # every entry is checked before any is written: a load applies all of them or none
        values = {}
        for key, value in state.items():
            value = _host_copy(value)  # a copy: what is checked is what is written
            if value.shape != own[key].shape:
                raise ValueError(f"state[{key!r}]: expected shape {own[key].shape}, got {value.shape}")
            if value.dtype.kind not in "fiu":
                raise TypeError(f"state[{key!r}]: expected a numeric array, got dtype {value.dtype}")
            if key.rpartition(".")[2] == "num_batches_tracked":
                n = value.item()
                if not (np.isfinite(n) and n >= 0 and n == int(n)):
                    raise ValueError(f"state[{key!r}]: expected a count >= 0, got {n!r}")
            values[key] = value
        for key, value in values.items():
            self._assign(key, value)

    def _assign(self, key, value):
        head, _, rest = key.partition(".")
        if rest:
            self._children()[head]._assign(rest, value)
        elif key == "num_batches_tracked":
            self.num_batches_tracked = int(value)
        else:
            target = getattr(self, key)
            if isinstance(target, np.ndarray):
                target[...] = value
            else:  # a GPU array: copy the host value over
                target[...] = backend_of(target).xp.asarray(value, dtype=target.dtype)

    def save(self, path):
        """Write :meth:`state_dict` to an ``.npz`` file at ``path`` (``.npz`` appended when
        missing, as NumPy does); return the path written."""
        path = _npz_path(path)
        np.savez(path, **self.state_dict())
        return path

    def load(self, path):
        """Load parameters and buffers saved by :meth:`save` (the same ``path``, with or
        without ``.npz``); return self. A file that is not such an archive is a
        ValueError naming it; nothing is written unless every entry loads."""
        path = _npz_path(path)
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):  # a .npy payload: one bare array
                raise ValueError(f"it holds a single {type(data).__name__} (a .npy payload), not an .npz archive")
            with data:
                state = {k: data[k] for k in data.files}
        except FileNotFoundError:
            raise
        except (ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
            raise ValueError(f"path: {path!r} is not a normcore checkpoint (.npz): {e}") from None
        self.load_state_dict(state)
        return self


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
        return got[0] if residual is None else (got[0], got[1])

    def _snapshot(self):
        """The running statistics and count a training forward may have to put back."""
        return self.running_mean.copy(), self.running_var.copy(), self.num_batches_tracked

    def _restore(self, saved):
        """Put back what :meth:`_snapshot` saved."""
        self.running_mean[...], self.running_var[...] = saved[0], saved[1]
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


@document(params=_BN_PARAMS, attributes=_BN_ATTRS, notes=["batch_statistics"])
class BatchNorm1d(_BatchNorm):
    """Batch norm over (N, C) or (N, C, L) input: statistics per channel.

    Input (N, C) or (N, C, L), or (N, L, C) with ``channel_axis=-1``; output of the same shape.
    Statistics per channel over N (and L). Parameters and running statistics: shape (C,).

    Examples
    --------
    >>> import numpy as np
    >>> import normcore as nc
    >>> bn = nc.BatchNorm1d(4)
    >>> x = np.random.default_rng(0).standard_normal((8, 4, 3)).astype(np.float32)
    >>> y = bn(x)                          # batch statistics; running statistics updated
    >>> dx = bn.backward(np.ones_like(y))  # dL/dx; bn.grad_weight, bn.grad_bias accumulate
    >>> dx.shape == x.shape, bn.grad_bias.tolist(), bn.num_batches_tracked
    (True, [24.0, 24.0, 24.0, 24.0], 1)
    >>> y_eval = bn.eval()(x)              # running statistics
    """
    _fold_ndim = 2
    _ndims = (2, 3)


@document(params=_BN_PARAMS, attributes=_BN_ATTRS, notes=["batch_statistics"])
class BatchNorm2d(_BatchNorm):
    """Batch norm over (N, C, H, W) input: statistics per channel (spatial batch norm).

    Input (N, C, H, W), or (N, H, W, C) with ``channel_axis=-1``; output of the same shape.
    Statistics per channel over N, H and W. Parameters and running statistics: shape (C,).

    Examples
    --------
    >>> import numpy as np
    >>> import normcore as nc
    >>> bn = nc.BatchNorm2d(4)
    >>> x = np.random.default_rng(0).standard_normal((2, 4, 3, 3)).astype(np.float32)
    >>> y = bn(x)                          # batch statistics; running statistics updated
    >>> dx = bn.backward(np.ones_like(y))  # dL/dx; bn.grad_weight, bn.grad_bias accumulate
    >>> dx.shape == x.shape, bn.grad_bias.tolist(), bn.num_batches_tracked
    (True, [18.0, 18.0, 18.0, 18.0], 1)
    >>> y_eval = bn.eval()(x)              # running statistics
    """
    _fold_ndim = 4
    _ndims = (4,)


@document(params=_BN_PARAMS, attributes=_BN_ATTRS, notes=["batch_statistics"])
class BatchNorm3d(_BatchNorm):
    """Batch norm over (N, C, D, H, W) input: statistics per channel.

    Input (N, C, D, H, W), or (N, D, H, W, C) with ``channel_axis=-1``; output of the same
    shape. Statistics per channel over N, D, H, W. Parameters and running statistics: (C,).

    Examples
    --------
    >>> import numpy as np
    >>> import normcore as nc
    >>> bn = nc.BatchNorm3d(4)
    >>> x = np.random.default_rng(0).standard_normal((2, 4, 2, 2, 2)).astype(np.float32)
    >>> y = bn(x)                          # batch statistics; running statistics updated
    >>> dx = bn.backward(np.ones_like(y))  # dL/dx; bn.grad_weight, bn.grad_bias accumulate
    >>> dx.shape == x.shape, bn.grad_bias.tolist(), bn.num_batches_tracked
    (True, [16.0, 16.0, 16.0, 16.0], 1)
    >>> y_eval = bn.eval()(x)              # running statistics
    """
    _fold_ndim = 5
    _ndims = (5,)


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


@document(params=_IN_PARAMS, attributes=_BN_ATTRS)
class InstanceNorm1d(_InstanceNorm):
    """Instance norm over (N, C, L) input: statistics per sample and channel.

    Input (N, C, L), or (C, L) unbatched (a batch of one, as torch takes it); output of the
    same shape. Each (sample, channel) is normalized over its
    L positions. With ``affine=True``, weight and bias (C,). With
    ``track_running_stats=True``, training updates per-channel running statistics (the
    batch average of the per-instance ones, as in PyTorch) and eval uses them; otherwise
    eval also uses the instance statistics.

    Examples
    --------
    >>> import numpy as np
    >>> import normcore as nc
    >>> inorm = nc.InstanceNorm1d(3, affine=True)
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    >>> y = inorm(x)
    >>> dx = inorm.backward(np.ones_like(y))   # inorm.grad_weight, inorm.grad_bias accumulate
    >>> bool(abs(y.mean(axis=2)).max() < 1e-5), inorm.grad_bias.tolist()
    (True, [16.0, 16.0, 16.0])
    """
    _fold_ndim = 3
    _ndims = (2, 3)


@document(params=_IN_PARAMS, attributes=_BN_ATTRS)
class InstanceNorm2d(_InstanceNorm):
    """Instance norm over (N, C, H, W) input: statistics per sample and channel.

    Input (N, C, H, W), or (C, H, W) unbatched (a batch of one, as torch takes it); output
    of the same shape. Each (sample, channel) is normalized over its
    H x W positions. With ``affine=True``, weight and bias (C,). With
    ``track_running_stats=True``, training updates per-channel running statistics (the
    batch average of the per-instance ones, as in PyTorch) and eval uses them; otherwise
    eval also uses the instance statistics.

    Examples
    --------
    >>> import numpy as np
    >>> import normcore as nc
    >>> inorm = nc.InstanceNorm2d(3, affine=True)
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    >>> y = inorm(x)
    >>> dx = inorm.backward(np.ones_like(y))   # inorm.grad_weight, inorm.grad_bias accumulate
    >>> bool(abs(y.mean(axis=(2, 3))).max() < 1e-5), inorm.grad_bias.tolist()
    (True, [32.0, 32.0, 32.0])
    """
    _fold_ndim = 4
    _ndims = (3, 4)


@document(params=_IN_PARAMS, attributes=_BN_ATTRS)
class InstanceNorm3d(_InstanceNorm):
    """Instance norm over (N, C, D, H, W) input: statistics per sample and channel.

    Input (N, C, D, H, W), or (C, D, H, W) unbatched (a batch of one, as torch takes it);
    output of the same shape. Each (sample, channel) is normalized over its
    D x H x W positions. With ``affine=True``, weight and bias (C,). With
    ``track_running_stats=True``, training updates per-channel running statistics (the
    batch average of the per-instance ones, as in PyTorch) and eval uses them; otherwise
    eval also uses the instance statistics.

    Examples
    --------
    >>> import numpy as np
    >>> import normcore as nc
    >>> inorm = nc.InstanceNorm3d(3, affine=True)
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 2, 2, 2)).astype(np.float32)
    >>> y = inorm(x)
    >>> dx = inorm.backward(np.ones_like(y))   # inorm.grad_weight, inorm.grad_bias accumulate
    >>> bool(abs(y.mean(axis=(2, 3, 4))).max() < 1e-5), inorm.grad_bias.tolist()
    (True, [16.0, 16.0, 16.0])
    """
    _fold_ndim = 5
    _ndims = (4, 5)


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
        # the mode's spec has one parameter axis: last_axes views x as (..., prod(shape))
        return last_axes(x, be, self._mode, self.normalized_shape, self.weight, self.bias, eps, out, blame="x",
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
