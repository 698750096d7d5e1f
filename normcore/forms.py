"""torch.nn.functional-style forms over :func:`normcore.normalize`, each returning (y, cache).

Keyword names follow PyTorch so that its users know them at once; gradients come from
:func:`normcore.backward` with the returned cache. Every form takes ``out=`` (see
:func:`normcore.normalize`) and ``mask=`` (statistics over its True elements; see
:func:`normcore.normalize`); every form of activations takes ``residual=`` too.
"""
from __future__ import annotations


import numpy as np

from . import checks
from .backend import machine_eps
from .functional import backward, forward, over_trailing_axes

__all__ = ["batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm",
           "weight_standardize", "weight_standardize_backward"]


def _channel_mode(x, channel_axis):
    checks.min_ndim("input", x, 2, "(N, C, ...)")
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, (int, np.integer)):
        raise TypeError(f"channel_axis: expected 1 or -1, got {channel_axis!r}")
    if channel_axis == 1 or (x.ndim == 2 and channel_axis == -1):
        return "batch_norm"
    if channel_axis in (-1, x.ndim - 1):
        return "batch_norm_channels_last"
    raise ValueError(f"channel_axis: expected 1 (channels first) or -1 (channels last), got {channel_axis}")


def batch_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
               training=False, momentum=checks.DEFAULT_MOMENTUM, eps=1e-5, *, channel_axis=1, unbiased=True,
               out=None, decay=None, residual=None, mask=None):
    """Batch norm over every axis but the channel axis; returns ``(y, cache)``.

    ``input`` is (N, C, *) or, with ``channel_axis=-1``, (N, *, C). weight, bias and the
    running statistics have shape (C,). ``momentum`` is PyTorch's (running = (1 - m) *
    running + m * batch); ``decay`` instead is TF/Keras/Flax's (running = d * running +
    (1 - d) * batch); not both.
    ``residual`` (x's shape and dtype): normalize ``h = input + residual`` instead and
    return ``(y, h, cache)`` (:func:`normcore.add_normalize`). ``mask`` (boolean,
    broadcasting to input): statistics over its True elements only, e.g. a (N, T, 1) mask
    of the real time steps of a channels-last (N, T, C) batch of padded sequences.

    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((16, 3, 5, 5)).astype(np.float32)
    >>> rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    >>> y, cache = batch_norm(x, rm, rv, training=True)
    """
    be = checks.array("input", input)
    mode = _channel_mode(input, channel_axis)
    return forward(input, be, mode, weight=weight, bias=bias, running_mean=running_mean,
                   running_var=running_var, training=training, momentum=momentum, eps=eps,
                   unbiased=unbiased, out=out, decay=decay, residual=residual, mask=mask)


def normalized_shape_tuple(normalized_shape) -> tuple:
    """``normalized_shape`` (an int or a sequence of them) as a tuple of positive ints."""
    if isinstance(normalized_shape, (int, np.integer)) and not isinstance(normalized_shape, bool):
        normalized_shape = (normalized_shape,)
    elif isinstance(normalized_shape, (str, bytes)) or not hasattr(normalized_shape, "__iter__"):
        raise TypeError(f"normalized_shape: expected an int or a sequence of ints, got "
                        f"{type(normalized_shape).__name__} {normalized_shape!r}")
    shape = tuple(checks.positive_int("normalized_shape", s) for s in normalized_shape)
    if not shape:
        raise ValueError("normalized_shape: expected at least one axis")
    return shape


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None, residual=None, mask=None):
    """Layer norm over the trailing ``normalized_shape`` axes; returns ``(y, cache)``.

    weight and bias have shape ``normalized_shape``.
    ``residual`` (x's shape and dtype): normalize ``h = input + residual`` instead and
    return ``(y, h, cache)`` (:func:`normcore.add_normalize`).

    >>> import numpy as np
    >>> x = np.ones((4, 10, 8), np.float32)
    >>> y, cache = layer_norm(x, (8,))
    """
    be = checks.array("input", input)
    shape = normalized_shape_tuple(normalized_shape)
    checks.trailing_shape("normalized_shape", input, shape)
    return over_trailing_axes(input, be, "layer_norm", shape, weight, bias, eps, out,
                              residual=residual, mask=mask)


def rms_norm(input, normalized_shape, weight=None, eps=None, *, out=None, residual=None, mask=None):
    """RMS norm, y = x / sqrt(mean(x^2) + eps) * weight, over the trailing axes.

    ``eps=None`` uses the machine epsilon of input's dtype (as PyTorch does).
    ``residual`` (x's shape and dtype): normalize ``h = input + residual`` instead and
    return ``(y, h, cache)`` (:func:`normcore.add_normalize`).

    >>> import numpy as np
    >>> y, cache = rms_norm(np.ones((2, 8), np.float32), 8)
    """
    be = checks.array("input", input)
    shape = normalized_shape_tuple(normalized_shape)
    checks.trailing_shape("normalized_shape", input, shape)
    return over_trailing_axes(input, be, "rms_norm", shape, weight, None,
                              machine_eps(input.dtype) if eps is None else eps, out, residual=residual, mask=mask)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *, out=None, residual=None, mask=None):
    """Group norm: (N, C, *) with channels split into ``num_groups`` groups; weight (C,).
    ``residual`` (x's shape and dtype): normalize ``h = input + residual`` instead and
    return ``(y, h, cache)`` (:func:`normcore.add_normalize`).

    >>> import numpy as np
    >>> y, cache = group_norm(np.ones((2, 8, 3), np.float32) * np.arange(3), 4)
    """
    be = checks.array("input", input)
    checks.min_ndim("input", input, 2, "(N, C, ...)")
    num_groups = checks.positive_int("num_groups", num_groups)
    checks.divides("num_groups", num_groups, "input's channels", input.shape[1])
    return forward(input, be, "group_norm", weight=weight, bias=bias, eps=eps, out=out,
                   sizes={"g": num_groups}, residual=residual, mask=mask)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=checks.DEFAULT_MOMENTUM, eps=1e-5, *, out=None, decay=None,
                  residual=None, mask=None):
    """Instance norm: statistics per (sample, channel) over the spatial axes of (N, C, *).

    Running statistics, when given, are per channel (the batch average of the instance
    statistics), as in PyTorch; ``momentum`` or ``decay`` as in :func:`batch_norm`.
    ``residual`` (x's shape and dtype): normalize ``h = input + residual`` instead and
    return ``(y, h, cache)`` (:func:`normcore.add_normalize`).

    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 16)).astype(np.float32)
    >>> y, cache = instance_norm(x)
    """
    be = checks.array("input", input)
    checks.min_ndim("input", input, 3, "(N, C, L, ...)")
    return forward(input, be, "instance_norm", weight=weight, bias=bias, running_mean=running_mean,
                   running_var=running_var, training=use_input_stats, momentum=momentum, eps=eps,
                   out=out, decay=decay, residual=residual, mask=mask)


def weight_standardize(w, eps=1e-5, *, out=None, mask=None):
    """Weight standardization: each output filter w[o] to zero mean, unit (biased) variance.

    ``w`` is (O, ...) e.g. a conv kernel (O, I, kH, kW); returns ``(w_hat, cache)``.
    ``mask`` (boolean, broadcasting to w): each filter's statistics over its True elements
    only (the weights a pruning mask keeps).

    >>> import numpy as np
    >>> w = np.random.default_rng(0).standard_normal((4, 3, 3, 3))
    >>> w_hat, cache = weight_standardize(w)
    >>> bool(np.allclose(w_hat.reshape(4, -1).mean(1), 0))
    True
    """
    be = checks.array("w", w)
    checks.min_ndim("w", w, 2, "(out, in, ...)")
    return forward(w, be, "weight_standardize", eps=eps, out=out, mask=mask)


def weight_standardize_backward(dw_hat, cache, *, out=None):
    """Gradient of :func:`weight_standardize` with respect to ``w``.

    >>> import numpy as np
    >>> w_hat, cache = weight_standardize(np.random.default_rng(0).standard_normal((4, 6)))
    >>> weight_standardize_backward(np.ones_like(w_hat), cache).shape
    (4, 6)
    """
    return backward(dw_hat, cache, out=out)[0]
