"""The base of every layer (:class:`Layer`): train/eval, named parameters and gradients,
state_dict and ``.npz`` save/load, moves between devices, per-thread caches and the lock
that serializes writes to a layer's state. It knows nothing of normalization: the demo's
Linear layers and containers subclass it too."""
from __future__ import annotations

import functools
import inspect
import os
import threading
import zipfile

import numpy as np

from . import checks
from .backend import backend_named, backend_of

__all__ = ["Layer"]


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
        # (nor does the warm call's memo, normcore._steady: a copy's first call makes its own)
        state = {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_tls", "_steady", "_steady_add")}
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

        >>> from normcore import BatchNorm1d
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

        >>> from normcore import BatchNorm1d
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
            self.__dict__.pop("_steady", None)
            self.__dict__.pop("_steady_add", None)
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

        >>> from normcore import BatchNorm1d
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
