"""Thread scaling of normcore alone: each pass timed at 1 and at 2 threads, alternating
call by call in one process (no other library in the loop to disturb the thread teams).

    python bench/scaling.py [--repeats 15]
"""
from __future__ import annotations

import argparse

import numpy as np

import normcore as nc
from bench_cpu import CASES, _normcore, interleaved_medians


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    print(f"float32, out= buffers, median of {args.repeats} alternating calls, ms")
    print("| case | shape | pass | 1 thread | 2 threads | speed-up |")
    print("|---|---|---|---|---|---|")
    for label, shape, mode, sizes, _, _ in CASES:
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        fns = {}
        for k, f in _normcore(x, mode, sizes).items():
            if "out=" in k:
                for threads in (1, 2):
                    def run(f=f, threads=threads):
                        nc.set_num_threads(threads)
                        f()
                    fns[(k.split()[0], threads)] = run
        med = interleaved_medians(fns, args.repeats)
        nc.set_num_threads(None)
        for pas in ("fwd", "bwd", "infer"):
            if (pas, 1) in med:
                one, two = med[(pas, 1)], med[(pas, 2)]
                print(f"| {label} | {shape} | {pas} | {one:.2f} | {two:.2f} | {one / two:.2f} |")


if __name__ == "__main__":
    main()
