"""The column strategy's passes one by one: each kernel entry's time per 1000 elements on
(A, C) float32, one thread, for comparison with bench/rates.c (the machine's own rates).

    python bench/passes.py [--rows 16,64,256,1024] [--cols 1024]

A pass whose rate stays the same from rows that fit L1/L2 to rows that do not is bound by
its arithmetic, not by memory.
"""
from __future__ import annotations

import argparse
import timeit

import numpy as np
from threadpoolctl import threadpool_limits

from normcore.kernels import K


def rates(A, C, rpb=64, number=300, repeat=7):
    """ns per 1000 elements of each pass on an (A, C) float32 array."""
    rng = np.random.default_rng(0)
    x = (3 + rng.standard_normal((A, C))).astype(np.float32)
    dy, dx, y = rng.standard_normal((A, C)).astype(np.float32), np.empty_like(x), np.empty_like(x)
    m, s = np.zeros(C), np.ones(C)
    nb = -(-A // rpb)
    pm, p2 = np.empty((nb, C)), np.empty((nb, C))
    x3, y3, dy3, dx3 = (a.reshape(A, C, 1) for a in (x, y, dy, dx))
    passes = {
        "add": lambda: K.add(a=x, b=dy, out=dx, threads=1),
        "affine_rows": lambda: K.affine_rows(x=x3, row_mean=m, row_scale=s, row_shift=m, rows_per_block=rpb, y=y3,
                                             threads=1),
        "dx_rows": lambda: K.dx_rows(dy=dy3, x=x3, row_mean=m, dy_scale=s, xc_scale=s, dx_shift=m,
                                     rows_per_block=rpb, dx=dx3, threads=1),
        "moments_cols": lambda: K.moments_cols(x=x, rows_per_block=rpb, part_mean=pm, part_m2=p2, threads=1),
        "sums_cols": lambda: K.sums_cols(dy=dy, x=x, row_mean=m, rows_per_block=rpb, sum_dy=pm, sum_dy_xc=p2,
                                         threads=1),
    }
    return {k: min(timeit.repeat(f, number=number, repeat=repeat)) / number / (A * C) * 1e12
            for k, f in passes.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="16,64,256,1024")
    p.add_argument("--cols", type=int, default=1024)
    args = p.parse_args()
    with threadpool_limits(1):
        rows = [int(r) for r in args.rows.split(",")]
        table = {A: rates(A, args.cols) for A in rows}
    names = list(next(iter(table.values())))
    print(f"ns per 1000 elements, (A, {args.cols}) float32, 1 thread ({K.__name__})")
    print("| rows A | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for A, r in table.items():
        print(f"| {A} | " + " | ".join(f"{r[n]:.0f}" for n in names) + " |")


if __name__ == "__main__":
    main()
