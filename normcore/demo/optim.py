"""Optimizers that update ``named_parameters()`` in place from their accumulated gradients."""
from __future__ import annotations

import numpy as np

__all__ = ["SGD", "Adam"]


class SGD:
    """SGD with (heavy-ball) momentum: v = momentum * v + g; p -= lr * v."""

    def __init__(self, named_parameters, lr, momentum=0.9):
        self.params = [(p, g) for _, p, g in named_parameters]
        self.lr, self.momentum = lr, momentum
        self.velocity = [np.zeros_like(p) for p, _ in self.params]

    def step(self):
        for (p, g), v in zip(self.params, self.velocity):
            v *= self.momentum
            v += g
            p -= self.lr * v


class Adam:
    """Adam (Kingma and Ba) with bias correction."""

    def __init__(self, named_parameters, lr, betas=(0.9, 0.999), eps=1e-8):
        self.params = [(p, g) for _, p, g in named_parameters]
        self.lr, self.betas, self.eps, self.t = lr, betas, eps, 0
        self.m = [np.zeros_like(p) for p, _ in self.params]
        self.v = [np.zeros_like(p) for p, _ in self.params]

    def step(self):
        self.t += 1
        b1, b2 = self.betas
        for (p, g), m, v in zip(self.params, self.m, self.v):
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            m_hat = m / (1 - b1 ** self.t)
            v_hat = v / (1 - b2 ** self.t)
            p -= self.lr * m_hat / (np.sqrt(v_hat) + self.eps)
