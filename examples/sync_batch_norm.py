"""Data-parallel batch norm over MPI ranks: each rank normalizes its slice of one batch.

    pip install -e . mpi4py mpich
    mpiexec -n 2 python examples/sync_batch_norm.py

Every rank draws the same global batch (same seed), keeps its own uneven slice, and runs a
few training steps of SyncBatchNorm; rank 0 then checks that its output equals its slice
of a single-process BatchNorm2d on the whole batch, and prints what was communicated.
"""
import numpy as np
from mpi4py import MPI

import normcore as nc

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()

x = np.random.default_rng(0).standard_normal((8 * size + 3, 16, 12, 12)).astype(np.float32) + 5
bounds = np.linspace(0, len(x), size + 1).astype(int) + np.r_[0, np.arange(1, size), 0]  # uneven
mine = x[bounds[rank]:bounds[rank + 1]]

sync_bn, bn = nc.SyncBatchNorm(16, comm=comm), nc.BatchNorm2d(16)
for step in range(3):
    y = sync_bn(mine)
    dx = sync_bn.backward(np.ones_like(y))
    y_all = bn(x)
    bn.backward(np.ones_like(y_all))

err = np.abs(y - y_all[bounds[rank]:bounds[rank + 1]]).max()
errs = comm.gather((len(mine), float(err), float(np.abs(sync_bn.running_var - bn.running_var).max())))
if rank == 0:
    t = nc.sync.traffic()
    for r, (n, e, ev) in enumerate(errs):
        print(f"rank {r}: {n} samples, max |y - single-process y| = {e:.1e}, running_var diff {ev:.1e}")
    print(f"per step and rank: forward sends {t['forward']['bytes'] // 3} bytes, "
          f"backward {t['backward']['bytes'] // 3} bytes, one collective each")
    assert max(e for _, e, _ in errs) < 1e-5
