"""The kernel contract's composed entries, built from its primitives once for every backend.

``normalize_cols``, ``normalize_running`` and ``backward_cols`` are sequences of primitive
entries (moments → finalize → coefficients → affine; running statistics → coefficients →
affine; sums → group sums → dx coefficients → dx) that a small call wants as one. A
backend inherits them from :class:`Composites` and implements only the primitives; it may
override a composite with one compiled call for speed (the CPU kernels do), as long as the
result is bitwise the one of these sequences (tests/test_functional.py checks it).
"""
from __future__ import annotations

import numpy as np

__all__ = ["Composites", "xp_of"]


def xp_of(a):
    """The array module of ``a``: NumPy's for host arrays (the CUDA kernels' host emulation
    included), else CuPy's.

    >>> xp_of(np.zeros(2)) is np
    True
    """
    if isinstance(a, np.ndarray):
        return np
    import cupy
    return cupy


class Composites:
    """The composed entries of :class:`normcore.backend.Kernels`, over ``self``'s primitives."""

    def normalize_cols(self, *, x, rows_per_block, center, eps, rg, rp, weight=None, bias=None, mean, var, rstd, y,
                       threads):
        A, C = x.shape
        if C == 0:
            return
        xp = xp_of(x)
        nb = -(-A // rows_per_block)
        counts = np.full((nb, C), float(rows_per_block))
        counts[-1] = A - rows_per_block * (nb - 1)
        pmean, pm2 = xp.empty((nb, C)), xp.empty((nb, C))
        self.moments_cols(x=x, rows_per_block=rows_per_block, part_mean=pmean, part_m2=pm2, threads=threads)
        self.finalize_moments(part_mean=pmean, part_m2=pm2, part_count=xp.asarray(counts), center=center, eps=eps,
                              mean=mean, var=var, rstd=rstd)
        row_mean, row_scale, row_shift = xp.empty(C), xp.empty(C), xp.empty(C)
        self.row_coefficients(mean=mean, rstd=rstd, rg=rg, rp=rp, weight=weight, bias=bias, row_mean=row_mean,
                              row_scale=row_scale, row_shift=row_shift)
        self.affine_rows(x=x.reshape(A, C, 1), row_mean=row_mean, row_scale=row_scale, row_shift=row_shift,
                         rows_per_block=rows_per_block, y=y.reshape(A, C, 1), threads=threads)

    def normalize_running(self, *, x, running_mean, running_var, rc, eps, rg, rp, weight=None, bias=None,
                          rows_per_block, mean, var, rstd, y, threads):
        if mean.shape[0] == 0:
            return
        xp = xp_of(x)
        if x.ndim == 2:
            x = x.reshape(x.shape + (1,))
        R = x.shape[1]
        self.running_statistics(running_mean=running_mean, running_var=running_var, rc=rc, eps=eps, mean=mean,
                                var=var, rstd=rstd)
        row_mean, row_scale, row_shift = xp.empty(R), xp.empty(R), xp.empty(R)
        self.row_coefficients(mean=mean, rstd=rstd, rg=rg, rp=rp, weight=weight, bias=bias, row_mean=row_mean,
                              row_scale=row_scale, row_shift=row_shift)
        self.affine_rows(x=x, row_mean=row_mean, row_scale=row_scale, row_shift=row_shift,
                         rows_per_block=rows_per_block, y=y.reshape(x.shape), threads=threads)

    def backward_cols(self, *, dy, x, mean, rstd, counts, rows_per_block, rg, rp, weight=None, stats_grad, center,
                      param_grads, dx, threads, dh=None):
        A, C = x.shape
        param_grads[...] = 0.0
        if C == 0:
            return
        xp = xp_of(x)
        group_sums = xp.zeros((2, C))  # unread when no sums are taken
        if stats_grad or param_grads.shape[1] > 0:
            sums = xp.empty((2, -(-A // rows_per_block), C))
            self.sums_cols(dy=dy, x=x, row_mean=mean, rows_per_block=rows_per_block, sum_dy=sums[0],
                           sum_dy_xc=sums[1], threads=threads)
            self.gradient_sums(sums=sums, rg=rg, rp=rp, weight=weight, rstd=rstd, group_sums=group_sums,
                               param_grads=param_grads)
        dy_scale, xc_scale, dx_shift = xp.empty(C), xp.empty(C), xp.empty(C)
        self.dx_coefficients(group_sums=group_sums, counts=counts, rg=rg, rp=rp, weight=weight, rstd=rstd,
                             stats_grad=stats_grad, center=center, dy_scale=dy_scale, xc_scale=xc_scale,
                             dx_shift=dx_shift)
        self.dx_rows(dy=dy.reshape(A, C, 1), x=x.reshape(A, C, 1), row_mean=mean, dy_scale=dy_scale,
                     xc_scale=xc_scale, dx_shift=dx_shift, rows_per_block=rows_per_block, dx=dx.reshape(A, C, 1),
                     threads=threads, dh=None if dh is None else dh.reshape(A, C, 1))
