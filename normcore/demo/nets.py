"""Small networks written by hand in NumPy, with normcore's layers for normalization.

Every module is a :class:`normcore.layers.Layer`: ``forward(x)``, ``backward(dy) -> dx``
(gradients accumulate with ``+=`` until ``zero_grad``), ``named_parameters()``,
``train()`` / ``eval()``, ``state_dict()`` / ``load_state_dict()`` and ``save`` / ``load``
come from the same base as normcore's own layers, so a :class:`Sequential` mixes both.
"""
from __future__ import annotations

import numpy as np

import normcore as nc
from normcore.layers import Layer

__all__ = ["Linear", "Conv2d", "MaxPool2d", "ReLU", "Flatten", "Sequential", "softmax_cross_entropy",
           "build", "VARIANTS"]


class Linear(Layer):
    """y = x @ weight + bias, weight (n_in, n_out) with He initialisation."""

    def __init__(self, n_in, n_out, rng, dtype):
        super().__init__()
        self.weight = (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(dtype)
        self.bias = np.zeros(n_out, dtype)
        self.grad_weight = np.zeros_like(self.weight)
        self.grad_bias = np.zeros_like(self.bias)

    def forward(self, x):
        self._x = x
        return x @ self.weight + self.bias

    def backward(self, dy):
        self.grad_weight += self._x.T @ dy
        self.grad_bias += dy.sum(axis=0)
        return dy @ self.weight.T


class Conv2d(Layer):
    """3x3 convolution, stride 1, padding 1, by im2col; NCHW in and out.

    ``standardize=True`` convolves with ``normcore.weight_standardize(weight)`` (weight standardization)
    and back-propagates through it.
    """

    def __init__(self, c_in, c_out, rng, dtype, standardize=False):
        super().__init__()
        fan_in = c_in * 9
        self.weight = (rng.standard_normal((c_out, c_in, 3, 3)) * np.sqrt(2.0 / fan_in)).astype(dtype)
        self.bias = np.zeros(c_out, dtype)
        self.grad_weight = np.zeros_like(self.weight)
        self.grad_bias = np.zeros_like(self.bias)
        self.standardize = standardize

    @staticmethod
    def _im2col(x):
        n, c, h, w = x.shape
        padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        # (n, h, w, c, 3, 3): every 3x3 window as a row
        windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
        return np.ascontiguousarray(windows.transpose(0, 2, 3, 1, 4, 5)).reshape(n * h * w, c * 9)

    def forward(self, x):
        n, _, h, w = x.shape
        if self.standardize:
            kernel, self._ws_cache = nc.weight_standardize(self.weight)
        else:
            kernel = self.weight
        self._shape = x.shape
        self._cols = self._im2col(x)
        self._kernel2d = kernel.reshape(kernel.shape[0], -1)
        out = self._cols @ self._kernel2d.T + self.bias
        return np.ascontiguousarray(out.reshape(n, h, w, -1).transpose(0, 3, 1, 2))

    def backward(self, dy):
        n, c, h, w = self._shape
        d2 = dy.transpose(0, 2, 3, 1).reshape(n * h * w, -1)
        dkernel = (d2.T @ self._cols).reshape(self.weight.shape)
        if self.standardize:
            dkernel = nc.weight_standardize_backward(dkernel, self._ws_cache)
        self.grad_weight += dkernel
        self.grad_bias += d2.sum(axis=0)
        dcols = (d2 @ self._kernel2d).reshape(n, h, w, c, 3, 3)
        dpad = np.zeros((n, c, h + 2, w + 2), dy.dtype)
        for i in range(3):
            for j in range(3):
                dpad[:, :, i:i + h, j:j + w] += dcols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
        return dpad[:, :, 1:-1, 1:-1]


class MaxPool2d(Layer):
    """2x2 max pooling, stride 2 (even H and W)."""

    def forward(self, x):
        n, c, h, w = x.shape
        blocks = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
        self._arg = blocks.argmax(axis=-1)
        self._shape = x.shape
        return np.take_along_axis(blocks, self._arg[..., None], axis=-1)[..., 0]

    def backward(self, dy):
        n, c, h, w = self._shape
        blocks = np.zeros((n, c, h // 2, w // 2, 4), dy.dtype)
        np.put_along_axis(blocks, self._arg[..., None], dy[..., None], axis=-1)
        return blocks.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)


class ReLU(Layer):
    def forward(self, x):
        self._mask = x > 0
        return x * self._mask

    def backward(self, dy):
        return dy * self._mask


class Flatten(Layer):
    def forward(self, x):
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        return dy.reshape(self._shape)


class Sequential(Layer):
    """Modules applied in order; parameters and state keyed ``"<index>.<name>"``."""

    def __init__(self, *modules):
        super().__init__()
        self.modules = list(modules)

    def _children(self):
        return {str(i): m for i, m in enumerate(self.modules)}

    def forward(self, x):
        for m in self.modules:
            x = m.forward(x)
        return x

    def backward(self, dy):
        for m in reversed(self.modules):
            dy = m.backward(dy)
        return dy


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of integer ``labels`` under ``softmax(logits)``; returns (loss, dlogits)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = logits.shape[0]
    loss = -log_p[np.arange(n), labels].mean()
    d = np.exp(log_p)
    d[np.arange(n), labels] -= 1
    return float(loss), (d / n).astype(logits.dtype)


def _mlp(norm, sizes, rng, dtype):
    layers = []
    for n_in, n_out in zip(sizes[:-2], sizes[1:-1]):
        layers.append(Linear(n_in, n_out, rng, dtype))
        if norm is not None:
            layers.append(norm(n_out))
        layers.append(ReLU())
    layers.append(Linear(sizes[-2], sizes[-1], rng, dtype))
    return Sequential(*layers)


def _cnn(norm, standardize, rng, dtype):
    layers = []
    for c_in, c_out in ((1, 16), (16, 32)):
        layers.append(Conv2d(c_in, c_out, rng, dtype, standardize=standardize))
        if norm is not None:
            layers.append(norm(c_out))
        layers += [ReLU(), MaxPool2d()]
    return Sequential(*layers, Flatten(), Linear(32 * 2 * 2, 10, rng, dtype))


# variant -> (description, builder(rng, dtype, sizes)); MLP sizes default to 64-128-128-10
VARIANTS = {
    "mlp": ("MLP, no normalization",
            lambda rng, dt, sizes: _mlp(None, sizes, rng, dt)),
    "mlp+bn": ("MLP, BatchNorm1d",
               lambda rng, dt, sizes: _mlp(lambda c: nc.BatchNorm1d(c, dtype=dt), sizes, rng, dt)),
    "mlp+ln": ("MLP, LayerNorm",
               lambda rng, dt, sizes: _mlp(lambda c: nc.LayerNorm(c, dtype=dt), sizes, rng, dt)),
    "mlp+bcn": ("MLP, BatchChannelNorm (8 groups)",
                lambda rng, dt, sizes: _mlp(lambda c: nc.BatchChannelNorm(c, 8, dtype=dt), sizes, rng, dt)),
    "cnn": ("CNN, no normalization",
            lambda rng, dt, sizes: _cnn(None, False, rng, dt)),
    "cnn+bn": ("CNN, BatchNorm2d",
               lambda rng, dt, sizes: _cnn(lambda c: nc.BatchNorm2d(c, dtype=dt), False, rng, dt)),
    "cnn+bn+ws": ("CNN, BatchNorm2d + weight standardization",
                  lambda rng, dt, sizes: _cnn(lambda c: nc.BatchNorm2d(c, dtype=dt), True, rng, dt)),
}


def build(variant, seed=0, dtype=np.float32, sizes=(64, 128, 128, 10)):
    """A fresh network of ``variant`` (a key of :data:`VARIANTS`), initialised from ``seed``.

    >>> net = build("mlp+bn")
    >>> net.forward(np.zeros((4, 64), np.float32)).shape
    (4, 10)
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {', '.join(VARIANTS)}, got {variant!r}")
    return VARIANTS[variant][1](np.random.default_rng(seed), np.dtype(dtype), tuple(sizes))
