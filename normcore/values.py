"""Rules on scalar and shape arguments (sizes, eps, momentum, names and messages): the part
of normcore's argument checks that needs no array backend, so that the spec parser, the
registry and the planner import without the compiled kernels. :mod:`normcore.checks`
holds the array rules and re-exports these."""
from __future__ import annotations

import math
import numbers

__all__ = ["type_name", "describe_mode", "min_ndim", "trailing_shape", "positive_int", "axis_size", "divides", "eps",
           "momentum", "running_rate", "DEFAULT_MOMENTUM"]


def type_name(a) -> str:
    t = type(a)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__.split('.')[0]}.{t.__name__}"


def describe_mode(mode) -> str:
    return f"mode {mode.name!r} (spec {mode.spec!r})" if mode.name else f"spec {mode.spec!r}"


def min_ndim(name, a, ndim, axes):
    """``a`` has at least ``ndim`` dimensions, described by ``axes`` (e.g. "(N, C, ...)")."""
    if a.ndim < ndim:
        raise ValueError(f"{name}: expected at least {ndim} dimensions {axes}, got shape {a.shape}")


def trailing_shape(name, x, shape):
    """x's trailing axes are ``shape`` (layer norm's normalized_shape); ``name`` is the
    argument blamed: the input ("x") or the shape ("normalized_shape")."""
    k = len(shape)
    if x.ndim < k or x.shape[x.ndim - k:] != shape:
        if name == "normalized_shape":
            raise ValueError(f"normalized_shape: {shape} does not match the trailing axes of input shape {x.shape}")
        raise ValueError(f"{name}: trailing axes of shape {x.shape} do not match normalized_shape {shape}")


def positive_int(name, value) -> int:
    """An int >= 1 (bool excluded); returns it as a Python int.

    >>> positive_int("num_features", 3)
    3
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a positive int, got {type_name(value)} {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def axis_size(axis, value) -> int:
    """A fixed axis size (``sizes`` of a mode or a call): a positive int.

    >>> axis_size("g", 4)
    4
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        if isinstance(value, (numbers.Number, str)):
            raise ValueError(f"sizes: {axis}={value!r} must be a positive int")
        # an array or other object: its type, not a dump of its values
        raise ValueError(f"sizes: {axis} must be a positive int, got {type_name(value)}")
    return int(value)


def divides(name, value, other_name, other):
    """``value`` divides ``other``: "num_groups (3) does not divide num_channels (8)"."""
    if other % value:
        raise ValueError(f"{name} ({value}) does not divide {other_name} ({other})")


def _real(name, value) -> float:
    if type(value) is float:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type_name(value)} {value!r}")
    return float(value)


def eps(value) -> float:
    """A finite float > 0.

    >>> eps(1e-5)
    1e-05
    """
    if type(value) is float and 0.0 < value < math.inf:
        return value  # the common case
    v = _real("eps", value)
    if not (math.isfinite(v) and v > 0.0):
        raise ValueError(f"eps: expected a finite float > 0, got {value!r}")
    return v


class _DefaultMomentum(float):
    """The default momentum, 0.1: told apart (by identity) from a momentum the caller gave,
    so that giving ``decay`` as well is an error only when both were given."""

    def __repr__(self):
        return "0.1"

    def __reduce__(self):  # a pickled layer's default stays the default
        return (_default_momentum, ())


def _default_momentum():
    return DEFAULT_MOMENTUM


DEFAULT_MOMENTUM = _DefaultMomentum(0.1)


def running_rate(momentum_value, decay, allow_none=False):
    """``(momentum, keep)`` of ``running = keep * running + momentum * batch`` from either
    convention: PyTorch's ``momentum`` (keep = 1 - momentum) or TF/Keras/Flax's ``decay``
    (keep = decay, momentum = 1 - decay); giving both is an error.

    >>> running_rate(0.1, None)
    (0.1, 0.9)
    >>> running_rate(DEFAULT_MOMENTUM, 0.99)
    (0.010000000000000009, 0.99)
    """
    if decay is None:
        m = momentum(momentum_value, allow_none)
        return m, (None if m is None else 1.0 - m)
    if momentum_value is not DEFAULT_MOMENTUM:
        raise ValueError(f"momentum, decay: give one of them, not both (momentum={momentum_value!r}, "
                         f"decay={decay!r}): momentum m is PyTorch's, running = (1 - m) * running + m * batch; "
                         f"decay d is TF/Keras/Flax's, running = d * running + (1 - d) * batch")
    d = _real("decay", decay)
    if not 0.0 <= d <= 1.0:
        raise ValueError(f"decay: expected a float in [0, 1], got {decay!r}")
    return 1.0 - d, d


def momentum(value, allow_none=False):
    """A float in [0, 1]; None too where ``allow_none`` (a layer's cumulative average).

    >>> momentum(0.1)
    0.1
    """
    if type(value) is float and 0.0 <= value <= 1.0:
        return value  # the common case
    if value is None:
        if allow_none:
            return None
        raise ValueError("momentum: None (cumulative average) needs a batch count; "
                         "use a layer, or pass momentum=1/num_batches")
    v = _real("momentum", value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"momentum: expected a float in [0, 1], got {value!r}")
    return v
