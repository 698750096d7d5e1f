"""What backward needs from one forward call (:class:`NormCache`), and how a form presents a
call made on reshaped arrays under the caller's shapes (:func:`viewed`)."""
from __future__ import annotations

import numpy as np

from .backend import CPU

__all__ = ["NormCache", "viewed"]


class NormCache:
    """What backward needs from one forward call: plan, canonical x, mean and 1/std.

    When x is already C-contiguous in the canonical layout the cache holds x itself, not a
    copy (as autograd frameworks save their inputs): changing x in place between forward
    and backward changes the gradients.
    """

    __slots__ = ("mode", "plan", "x3", "dtype", "mean", "rstd", "weight", "weight64", "has_weight",
                 "has_bias", "param_dtype", "stats_grad", "count", "comm", "backend", "view", "mask", "counts",
                 "not_data", "route")

    def __init__(self, mode, plan, x3, dtype, mean, rstd, weight, has_bias, stats_grad, count,
                 comm=None, backend=CPU, param_dtype=None, route=None):
        self.mode = mode
        self.plan = plan
        self.x3 = x3                # the input in the canonical layout, plan.kernel_shape
        self.dtype = dtype
        self.mean = mean            # (C,) float64 mean used to normalize (0 when not centred)
        self.rstd = rstd            # (C,) float64 1 / sqrt(var + eps)
        self.weight = weight        # (P,) weight in its own dtype, or None
        self.weight64 = None        # the same in float64, made when a kernel needs it
        self.has_weight = weight is not None
        self.has_bias = has_bias
        # dweight and dbias have the parameters' dtype (x's, or float32 beside a half x)
        self.param_dtype = dtype if param_dtype is None else param_dtype
        self.stats_grad = stats_grad  # gradients flow through batch statistics
        self.count = count          # elements per group, all ranks
        self.comm = comm            # communicator the statistics were synchronized over
        self.backend = backend      # where x3 and the statistics live
        # (x shape, parameter shape) the caller sees when a form presented the mode's
        # arrays under other shapes (layer norm over k axes: the mode over their product)
        self.view = None
        # mask=: the mask as the kernels read it (masking.MaskRows), and, where the
        # statistics were masked, the counted elements per group (all ranks); None without
        self.mask = None
        self.counts = None
        # the caller's mask (broadcasting to plan.shape) whenever one was given, training or
        # eval: its False positions are not data, and backward leaves them out entirely
        self.not_data = None
        self.route = route          # the forward's route: which backward runs

    @property
    def shape(self):
        """Shape of the forward input, and of dy and dx."""
        return self.plan.shape if self.view is None else self.view[0]

    @property
    def saved_mean(self):
        """Per-group mean used by forward, shaped like the statistics axes (float64).

        >>> import numpy as np, normcore
        >>> _, cache = normcore.normalize(np.arange(6, dtype=np.float32).reshape(2, 3), "layer_norm")
        >>> cache.saved_mean.tolist()
        [1.0, 4.0]
        """
        return self.mean.reshape(self.plan.stat_shape)

    @property
    def saved_rstd(self):
        """Per-group inverse standard deviation used by forward (float64), shaped like
        :attr:`saved_mean`."""
        return self.rstd.reshape(self.plan.stat_shape)

    def weight_f64(self):
        if self.weight64 is None:
            self.weight64 = self.weight.astype(np.float64)
        return self.weight64


def viewed(y, cache, x_shape, param_shape, out=None):
    """(y, cache) of a call made on reshaped arrays, presented under the caller's shapes:
    y and dx get ``x_shape``, dweight and dbias ``param_shape``; ``out`` (the caller's,
    given) is returned as y."""
    cache.view = (tuple(x_shape), tuple(param_shape))
    return (y.reshape(x_shape) if out is None else out), cache
