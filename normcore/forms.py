"""torch.nn.functional-style forms over :func:`normcore.normalize`, each returning (y, cache).

Keyword names follow PyTorch so that its users know them at once; gradients come from
:func:`normcore.backward` with the returned cache. Every form takes ``out=`` (see
:func:`normcore.normalize`).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .backend import machine_eps
from .functional import _check_array, backward, normalize
from .modes import Mode

__all__ = ["batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm",
           "weight_standardize", "weight_standardize_backward"]


def _channel_mode(x, channel_axis):
    _check_array("input", x)
    if x.ndim < 2:
        raise ValueError(f"input: expected at least 2 dimensions (N, C, ...), got shape {x.shape}")
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, (int, np.integer)):
        raise TypeError(f"channel_axis: expected 1 or -1, got {channel_axis!r}")
    if channel_axis == 1 or (x.ndim == 2 and channel_axis == -1):
        return "batch_norm"
    if channel_axis in (-1, x.ndim - 1):
        return "batch_norm_channels_last"
    raise ValueError(f"channel_axis: expected 1 (channels first) or -1 (channels last), got {channel_axis}")


def batch_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
               training=False, momentum=0.1, eps=1e-5, *, channel_axis=1, unbiased=True, out=None):
    """Batch norm over every axis but the channel axis; returns ``(y, cache)``.

    ``input`` is (N, C, *) or, with ``channel_axis=-1``, (N, *, C). weight, bias and the
    running statistics have shape (C,).

    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((16, 3, 5, 5)).astype(np.float32)
    >>> rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    >>> y, cache = batch_norm(x, rm, rv, training=True)
    """
    mode = _channel_mode(input, channel_axis)
    return normalize(input, mode, weight=weight, bias=bias, running_mean=running_mean,
                     running_var=running_var, training=training, momentum=momentum, eps=eps,
                     unbiased=unbiased, out=out)


@lru_cache(maxsize=None)
def _last_axes_mode(k: int, center: bool) -> Mode:
    names = " ".join(f"d{i}" for i in range(k))
    label = "layer_norm" if center else "rms_norm"
    return Mode(f"... {names} -> ...", params=names, center=center, name=f"{label}[{k}d]")


def _normalized_shape(x, normalized_shape):
    _check_array("input", x)
    if isinstance(normalized_shape, (int, np.integer)):
        normalized_shape = (int(normalized_shape),)
    shape = tuple(int(s) for s in normalized_shape)
    k = len(shape)
    if k == 0 or x.ndim < k or x.shape[x.ndim - k:] != shape:
        raise ValueError(f"normalized_shape: {shape} does not match the trailing axes of input shape {x.shape}")
    return shape


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None):
    """Layer norm over the trailing ``normalized_shape`` axes; returns ``(y, cache)``.

    weight and bias have shape ``normalized_shape``.

    >>> import numpy as np
    >>> x = np.ones((4, 10, 8), np.float32)
    >>> y, cache = layer_norm(x, (8,))
    """
    shape = _normalized_shape(input, normalized_shape)
    return normalize(input, _last_axes_mode(len(shape), True), weight=weight, bias=bias, eps=eps, out=out)


def rms_norm(input, normalized_shape, weight=None, eps=None, *, out=None):
    """RMS norm, y = x / sqrt(mean(x^2) + eps) * weight, over the trailing axes.

    ``eps=None`` uses the machine epsilon of input's dtype (as PyTorch does).

    >>> import numpy as np
    >>> y, cache = rms_norm(np.ones((2, 8), np.float32), 8)
    """
    shape = _normalized_shape(input, normalized_shape)
    if eps is None:
        eps = machine_eps(input.dtype)
    return normalize(input, _last_axes_mode(len(shape), False), weight=weight, eps=eps, out=out)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *, out=None):
    """Group norm: (N, C, *) with channels split into ``num_groups`` groups; weight (C,).

    >>> import numpy as np
    >>> y, cache = group_norm(np.ones((2, 8, 3), np.float32) * np.arange(3), 4)
    """
    _check_array("input", input)
    if input.ndim < 2:
        raise ValueError(f"input: expected at least 2 dimensions (N, C, ...), got shape {input.shape}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
        raise ValueError(f"num_groups: expected a positive int, got {num_groups!r}")
    if input.shape[1] % num_groups:
        raise ValueError(f"num_groups ({num_groups}) does not divide the {input.shape[1]} channels of input")
    return normalize(input, "group_norm", weight=weight, bias=bias, eps=eps, out=out, g=int(num_groups))


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, *, out=None):
    """Instance norm: statistics per (sample, channel) over the spatial axes of (N, C, *).

    Running statistics, when given, are per channel (the batch average of the instance
    statistics), as in PyTorch.

    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 16)).astype(np.float32)
    >>> y, cache = instance_norm(x)
    """
    _check_array("input", input)
    if input.ndim < 3:
        raise ValueError(f"input: expected at least 3 dimensions (N, C, L, ...), got shape {input.shape}")
    return normalize(input, "instance_norm", weight=weight, bias=bias, running_mean=running_mean,
                     running_var=running_var, training=use_input_stats, momentum=momentum, eps=eps,
                     out=out)


def weight_standardize(w, eps=1e-5, *, out=None):
    """Weight standardization: each output filter w[o] to zero mean, unit (biased) variance.

    ``w`` is (O, ...) e.g. a conv kernel (O, I, kH, kW); returns ``(w_hat, cache)``.

    >>> import numpy as np
    >>> w = np.random.default_rng(0).standard_normal((4, 3, 3, 3))
    >>> w_hat, cache = weight_standardize(w)
    >>> bool(np.allclose(w_hat.reshape(4, -1).mean(1), 0))
    True
    """
    _check_array("w", w)
    if w.ndim < 2:
        raise ValueError(f"w: expected at least 2 dimensions (out, in, ...), got shape {w.shape}")
    return normalize(w, "weight_standardize", eps=eps, out=out)


def weight_standardize_backward(dw_hat, cache, *, out=None):
    """Gradient of :func:`weight_standardize` with respect to ``w``.

    >>> import numpy as np
    >>> w_hat, cache = weight_standardize(np.random.default_rng(0).standard_normal((4, 6)))
    >>> weight_standardize_backward(np.ones_like(w_hat), cache).shape
    (4, 6)
    """
    return backward(dw_hat, cache, out=out)[0]
