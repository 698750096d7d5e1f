"""Inference folding: an eval-mode normalization as ``x * scale + shift``, and folded into the
linear or convolution layer before it (what deployed models do with a batch norm).

An eval-mode batch norm is affine in x: ``y = (x - running_mean) / sqrt(running_var + eps)
* weight + bias = x * scale + shift`` per channel. :func:`fold` gives that pair from the
statistics and parameters, :meth:`BatchNorm2d.fold` (and the other layers whose eval output
uses running statistics) from a layer, and :func:`fold_into` the weight and bias of the
preceding layer with the normalization folded in.

The folded form computes ``x * scale`` before adding ``shift``: where x sits at a large
offset from zero, that product is large and its rounding is that of ``|x| * scale``, not of
the output, so the folded output is less accurate than the layer's (which subtracts the
mean first). The pair itself is computed in float64 and rounded once.
"""
from __future__ import annotations

import numpy as np

from . import checks

__all__ = ["fold", "fold_into"]


def fold(running_mean, running_var, weight=None, bias=None, eps=1e-5, *, center=True):
    """``(scale, shift)`` per channel such that eval-mode normalization is ``x * scale + shift``.

    running_mean, running_var, weight, bias : arrays of one shape (C,) (weight / bias
    optional: 1 and 0); eps > 0. ``center=False`` (a mode that does not centre, whose
    running_var is a mean square) gives ``shift = bias``. Computed in float64, returned in
    running_var's dtype, in running_var's shape.

    >>> import numpy as np
    >>> scale, shift = fold(np.array([1.0, 2.0]), np.array([4.0, 1.0]))
    >>> scale.round(4).tolist(), shift.round(4).tolist()
    ([0.5, 1.0], [-0.5, -2.0])
    """
    be = checks.array("running_var", running_var)
    dtype = running_var.dtype
    shape = running_var.shape
    if center:
        checks.param("running_mean", running_mean, shape, dtype, be)
        if running_mean is None:
            raise ValueError("running_mean: needed to fold a centred normalization")
    checks.param("weight", weight, shape, dtype, be)
    checks.param("bias", bias, shape, dtype, be)
    eps = checks.eps(eps)
    xp = be.xp
    scale = 1.0 / xp.sqrt(running_var.astype(np.float64) + eps)
    if weight is not None:
        scale = scale * weight.astype(np.float64)
    shift = xp.zeros(shape, np.float64) if bias is None else bias.astype(np.float64)
    if center:
        shift = shift - running_mean.astype(np.float64) * scale
    return scale.astype(dtype), shift.astype(dtype)


def fold_into(weight, bias, norm, axis=0):
    """The ``(weight, bias)`` of a linear or convolution layer followed by ``norm`` in eval
    mode, with ``norm`` folded in: ``layer'(x) == norm(layer(x))`` up to rounding.

    weight : array whose ``axis`` runs over the layer's output channels (C of them): (C_out,
        C_in, kH, kW) for a convolution (axis 0), (n_in, n_out) for ``x @ weight`` (axis 1).
    bias : (C,) array or None (no bias: 0).
    norm : a layer with running statistics (``BatchNorm2d``, ``EstimatedBatchNorm``, ...),
        or its ``(scale, shift)`` from :func:`fold` or ``layer.fold()``.
    Returns new arrays in weight's dtype (the new bias in weight's dtype too), computed in
    float64.

    >>> import numpy as np
    >>> import normcore as nc
    >>> bn = nc.BatchNorm1d(3, dtype=np.float64).eval()
    >>> bn.running_mean[:] = [1.0, 0.0, -1.0]
    >>> w, b = fold_into(np.ones((2, 3)), None, bn, axis=1)
    >>> x = np.ones((4, 2))
    >>> bool(np.allclose(x @ w + b, bn(x @ np.ones((2, 3)))))
    True
    """
    be = checks.array("weight", weight)
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -weight.ndim <= axis < weight.ndim:
        raise ValueError(f"axis: expected an axis of weight (ndim {weight.ndim}), got {axis!r}")
    axis = int(axis) % weight.ndim
    if isinstance(norm, tuple) and len(norm) == 2:
        scale, shift = norm
    elif hasattr(norm, "fold"):
        scale, shift = norm.fold(ndim=2)  # (C,): flattened below
    else:
        raise TypeError(f"norm: expected a normalization layer or its (scale, shift), got {type(norm).__name__}")
    xp = be.xp
    scale, shift = xp.asarray(scale).reshape(-1), xp.asarray(shift).reshape(-1)
    channels = weight.shape[axis]
    if scale.shape != (channels,) or shift.shape != (channels,):
        raise ValueError(f"weight: axis {axis} has {channels} output channels, but norm has "
                         f"{scale.size} (pass the axis of weight that runs over the outputs)")
    if bias is not None:
        checks.array("bias", bias, None, be)
        if bias.shape != (channels,):
            raise ValueError(f"bias: expected shape ({channels},), got {bias.shape}")
    s64 = scale.astype(np.float64)
    view = [1] * weight.ndim
    view[axis] = channels
    new_weight = (weight.astype(np.float64) * s64.reshape(view)).astype(weight.dtype)
    b64 = xp.zeros(channels, np.float64) if bias is None else bias.astype(np.float64)
    new_bias = (b64 * s64 + shift.astype(np.float64)).astype(weight.dtype)
    return new_weight, new_bias
