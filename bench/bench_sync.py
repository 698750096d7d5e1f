"""SyncBatchNorm vs BatchNorm on each rank's slice, and the time spent communicating.

    pip install -e ".[bench,mpi]"
    mpiexec -n 2 python bench/bench_sync.py [--threads 1] [--repeats 30]

Each rank holds its own slice of the batch (the shapes below are per rank) and times,
round-robin, forward + backward in training mode of SyncBatchNorm (statistics of the whole
batch, one allgather per pass) and of plain BatchNorm (statistics of the slice). Rank 0
prints the median ms of both (the slower rank's), the median time inside the two
collectives (from ``normcore.sync.traffic()``; it includes waiting for the slower rank),
and the bytes each rank sent per step (pickled payloads). With several ranks on
one machine, set --threads so that ranks x threads <= cores.
"""
import argparse
import platform
import statistics
import time

import numpy as np
from mpi4py import MPI
from threadpoolctl import threadpool_limits

import normcore as nc

CASES = [  # per-rank input, channel_axis
    ((16, 64, 56, 56), 1),
    ((32, 256, 14, 14), 1),
    ((512, 4096), 1),
    ((16, 56, 56, 64), -1),
    ((8, 32, 8, 8), 1),  # small: communication dominates
]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if rank == 0:
        print(f"normcore {nc.__version__}, {MPI.Get_library_version().splitlines()[0].strip()}, "
              f"{size} ranks x {args.threads} thread(s), {platform.machine()}, float32, "
              f"median of {args.repeats} round-robin steps (forward + backward, training)")
        print("| per-rank shape | BatchNorm ms | SyncBatchNorm ms | in collectives ms | "
              "bytes sent per step (fwd + bwd) |")
        print("|---|---|---|---|---|")
    with threadpool_limits(args.threads, user_api="openmp"):
        for shape, axis in CASES:
            x = np.random.default_rng(rank).standard_normal(shape).astype(np.float32)
            C = shape[axis]
            plain = nc.BatchNorm1d if len(shape) == 2 else nc.BatchNorm2d
            layers = {"bn": plain(C, channel_axis=axis), "sync": nc.SyncBatchNorm(C, channel_axis=axis)}
            for layer in layers.values():
                layer.reuse_buffers = True
            times = {"bn": [], "sync": [], "comm": []}
            for i in range(args.repeats + 2):
                for name, layer in layers.items():
                    comm.Barrier()
                    before = nc.sync.traffic()
                    t0 = time.perf_counter()
                    layer.backward(layer(x))
                    dt = time.perf_counter() - t0
                    after = nc.sync.traffic()
                    if i >= 2:  # warm-up
                        times[name].append(dt * 1e3)
                        if name == "sync":
                            times["comm"].append(sum(after[d]["seconds"] - before[d]["seconds"]
                                                     for d in after) * 1e3)
                            sent = sum(after[d]["bytes"] - before[d]["bytes"] for d in after)
            med = {k: statistics.median(v) for k, v in times.items()}
            worst = comm.reduce(med, op=lambda a, b: {k: max(a[k], b[k]) for k in a}, root=0)
            if rank == 0:
                print(f"| {shape} | {worst['bn']:.2f} | {worst['sync']:.2f} | {worst['comm']:.3f} | {sent} |")


if __name__ == "__main__":
    main()
