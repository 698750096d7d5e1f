"""Is a pass compute-bound or memory-bound? Time per element, cache-resident vs streaming.

    python bench/bound.py [--threads 1] [--repeats 15]

For each benchmark case, the same pass is timed on the benchmark shape (streams from DRAM)
and on a shape of the same structure whose arrays stay in cache (1.5-2 MiB each), both less
the per-call overhead measured on a tiny shape. A kernel whose nanoseconds per element barely change between the two is limited
by arithmetic, not by memory: more bandwidth would not help it, fewer or cheaper
instructions would. Reported for normcore and PyTorch side by side, timed round-robin in one
process (hardware counters are not available on every machine; this needs none).
"""
from __future__ import annotations

import argparse

import numpy as np
from threadpoolctl import threadpool_limits

from bench_cpu import CASES, _normcore, _torch, interleaved_medians, torch

# benchmark shape -> (a cache-resident shape of the same per-group structure, a tiny shape
# whose time is the per-call overhead subtracted from both)
SMALL = {
    (32, 64, 56, 56): ((4, 32, 56, 56), (2, 2, 2, 2)),
    (64, 256, 14, 14): ((8, 256, 14, 14), (2, 2, 2, 2)),
    (1024, 4096): ((128, 4096), (2, 8)),
    (32, 56, 56, 64): ((4, 28, 56, 64), (2, 2, 2, 8)),
    (8192, 768): ((512, 768), (2, 768)),
    (2048, 4096): ((128, 4096), (2, 4096)),
    (32, 256, 28, 28): ((2, 256, 28, 28), (1, 32, 2, 2)),
    (16, 64, 64, 64): ((2, 64, 64, 64), (1, 2, 2, 2)),
    (64, 128, 768): ((4, 128, 768), (1, 2, 768)),
}


def _times(shape, mode, sizes, kind, repeats):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    fns = {f"normcore {k}": f for k, f in _normcore(x, mode, sizes).items() if "out=" in k}
    if torch is not None and kind is not None:
        channels = shape[-1] if kind in ("bn_cl", "ln") else shape[1]
        fns.update({f"torch {k}": f for k, f in _torch(x, kind, channels).items()})
    return {k.replace(" out=", ""): v * 1e6 for k, v in interleaved_medians(fns, repeats).items()}  # ns


def per_element(shape, tiny, mode, sizes, kind, repeats):
    """ns per element of each pass on ``shape``, less the per-call overhead (time on ``tiny``)."""
    big, small = _times(shape, mode, sizes, kind, repeats), _times(tiny, mode, sizes, kind, repeats * 4)
    return {k: (v - small[k]) / np.prod(shape) for k, v in big.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    if torch is not None:
        torch.set_num_threads(args.threads)
    print(f"float32, {args.threads} thread(s), ns per element: streaming (benchmark shape) / "
          "cache-resident (same structure), per-call overhead subtracted")
    print("| case | pass | normcore stream / cached | torch stream / cached |")
    print("|---|---|---|---|")
    with threadpool_limits(args.threads, user_api="openmp"), threadpool_limits(1, user_api="blas"):
        for label, shape, mode, sizes, kind, _ in CASES:
            cached, tiny = SMALL[shape]
            big = per_element(shape, tiny, mode, sizes, kind, args.repeats)
            small = per_element(cached, tiny, mode, sizes, kind, args.repeats * 2)
            for pas in ("fwd", "bwd", "infer"):
                ours = f"normcore {pas}"
                if ours not in big:
                    continue
                theirs = f"torch {pas}"
                t = f"{big[theirs]:.3f} / {small[theirs]:.3f}" if theirs in big else "—"
                print(f"| {label} {shape} | {pas} | {big[ours]:.3f} / {small[ours]:.3f} | {t} |")


if __name__ == "__main__":
    main()
