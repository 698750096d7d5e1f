"""The CS231n assignment's normalization API, running on normcore's kernels.

Conventions are the assignment's, not PyTorch's:

* ``bn_param`` is a dict: ``mode`` ('train' or 'test', required), ``eps`` (1e-5),
  ``momentum`` (0.9), ``running_mean`` / ``running_var`` (zeros of shape (D,) when absent,
  written back into the dict after every training call);
* running = momentum * running + (1 - momentum) * sample, with the *biased* sample
  variance: normcore's ``decay=bn_param['momentum']`` and ``unbiased=False``;
* ``gamma`` / ``beta`` are (D,) for batch and layer norm, (C,) for spatial batch norm and
  (1, C, 1, 1) for spatial group norm, and their gradients come back in the same shapes.

Every function returns ``(out, cache)`` or ``(dx, dgamma, dbeta)``.
"""
from __future__ import annotations

import numpy as np

from . import checks
from .functional import backward, normalize
from .forms import group_norm, layer_norm

__all__ = ["batchnorm_forward", "batchnorm_backward", "batchnorm_backward_alt",
           "layernorm_forward", "layernorm_backward", "spatial_batchnorm_forward",
           "spatial_batchnorm_backward", "spatial_groupnorm_forward", "spatial_groupnorm_backward"]


def _x(x, ndim, axes):
    """x must be a float array of ``ndim`` dimensions (``axes`` names them)."""
    checks.array("x", x)
    if x.ndim != ndim:
        raise ValueError(f"x: expected {ndim} dimensions {axes}, got shape {x.shape}")


def _params(name, d):
    """``bn_param`` / ``ln_param`` / ``gn_param`` must be a dict."""
    if not isinstance(d, dict):
        raise TypeError(f"{name}: expected a dict, got {checks.type_name(d)}")
    return d


def _batchnorm(x, gamma, beta, bn_param, mode_name, ndim, axes):
    _params("bn_param", bn_param)
    if "mode" not in bn_param:
        raise ValueError("bn_param: needs 'mode' ('train' or 'test')")
    mode = bn_param["mode"]
    if mode not in ("train", "test"):
        raise ValueError(f'Invalid forward batchnorm mode "{mode}"')
    eps = bn_param.get("eps", 1e-5)
    momentum = bn_param.get("momentum", 0.9)
    _x(x, ndim, axes)
    try:  # the assignment's momentum is a decay: rule on it as such
        checks.momentum(momentum)
    except (TypeError, ValueError) as e:
        raise type(e)(f"bn_param['momentum']: {str(e).partition(': ')[2]} (the running average's decay)") from None
    channels = x.shape[1]
    running_mean = np.array(bn_param.get("running_mean", np.zeros(channels, dtype=x.dtype)), dtype=x.dtype)
    running_var = np.array(bn_param.get("running_var", np.zeros(channels, dtype=x.dtype)), dtype=x.dtype)
    out, cache = normalize(x, mode_name, weight=gamma, bias=beta, running_mean=running_mean,
                           running_var=running_var, training=mode == "train", decay=momentum,
                           eps=eps, unbiased=False)
    bn_param["running_mean"] = running_mean
    bn_param["running_var"] = running_var
    return out, cache


def batchnorm_forward(x, gamma, beta, bn_param):
    """Batch norm of x (N, D) with gamma, beta (D,); ``bn_param`` as in the module doc.

    >>> x = np.random.default_rng(0).standard_normal((8, 3))
    >>> bn_param = {"mode": "train"}
    >>> out, cache = batchnorm_forward(x, np.ones(3), np.zeros(3), bn_param)
    >>> sorted(bn_param)
    ['mode', 'running_mean', 'running_var']
    """
    return _batchnorm(x, gamma, beta, bn_param, "batch_norm", 2, "(N, D)")


def batchnorm_backward(dout, cache):
    """(dx, dgamma, dbeta) of :func:`batchnorm_forward`, shapes (N, D), (D,), (D,)."""
    return backward(dout, cache)


def batchnorm_backward_alt(dout, cache):
    """The assignment's simplified closed form; normcore's backward is that form already."""
    return backward(dout, cache)


def layernorm_forward(x, gamma, beta, ln_param):
    """Layer norm of each row of x (N, D); ``ln_param`` may hold ``eps`` (1e-5).

    >>> out, cache = layernorm_forward(np.eye(3), np.ones(3), np.zeros(3), {})
    """
    _params("ln_param", ln_param)
    _x(x, 2, "(N, D)")
    return layer_norm(x, x.shape[-1:], weight=gamma, bias=beta, eps=ln_param.get("eps", 1e-5))


def layernorm_backward(dout, cache):
    """(dx, dgamma, dbeta) of :func:`layernorm_forward`."""
    return backward(dout, cache)


def spatial_batchnorm_forward(x, gamma, beta, bn_param):
    """Batch norm of x (N, C, H, W) per channel; gamma, beta (C,).

    >>> out, cache = spatial_batchnorm_forward(np.ones((2, 3, 4, 4)), np.ones(3), np.zeros(3),
    ...                                        {"mode": "train"})
    """
    return _batchnorm(x, gamma, beta, bn_param, "batch_norm", 4, "(N, C, H, W)")


def spatial_batchnorm_backward(dout, cache):
    """(dx, dgamma, dbeta) of :func:`spatial_batchnorm_forward`."""
    return backward(dout, cache)


def spatial_groupnorm_forward(x, gamma, beta, G, gn_param):
    """Group norm of x (N, C, H, W) in G groups; gamma, beta (1, C, 1, 1).

    >>> x = np.random.default_rng(0).standard_normal((2, 4, 3, 3))
    >>> out, cache = spatial_groupnorm_forward(x, np.ones((1, 4, 1, 1)), np.zeros((1, 4, 1, 1)), 2, {})
    """
    _params("gn_param", gn_param)
    _x(x, 4, "(N, C, H, W)")
    shapes = ((1, x.shape[1], 1, 1), (x.shape[1],))
    for name, a in (("gamma", gamma), ("beta", beta)):
        checks.array(name, a)
        if a.shape not in shapes:
            raise ValueError(f"{name}: expected shape {shapes[0]} (or {shapes[1]}), got {a.shape}")
    out, cache = group_norm(x, G, weight=np.ascontiguousarray(gamma).reshape(-1),
                            bias=np.ascontiguousarray(beta).reshape(-1), eps=gn_param.get("eps", 1e-5))
    return out, (cache, np.shape(gamma))


def spatial_groupnorm_backward(dout, cache):
    """(dx, dgamma, dbeta) of :func:`spatial_groupnorm_forward`; dgamma, dbeta (1, C, 1, 1)."""
    if not (isinstance(cache, tuple) and len(cache) == 2):
        raise TypeError(f"cache: expected the cache spatial_groupnorm_forward returned, got {checks.type_name(cache)}")
    norm_cache, param_shape = cache
    dx, dgamma, dbeta = backward(dout, norm_cache)
    return dx, dgamma.reshape(param_shape), dbeta.reshape(param_shape)
