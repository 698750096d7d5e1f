"""Run under mpiexec by tests/test_mpi.py: SyncBatchNorm on uneven slices equals one
process on the whole batch, bad input on one rank raises everywhere, and nothing hangs.
Prints one line per check from rank 0; any failure raises and aborts the job."""
import sys

import numpy as np
from mpi4py import MPI

import normcore as nc
from normcore.reference import reference_backward, reference_forward
from normcore.testing import assert_close

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
rng = np.random.default_rng(2024)  # the same draws on every rank


def say(msg):
    if rank == 0:
        print(msg, flush=True)


def uneven_slices(n):
    cuts = np.sort(rng.integers(0, n + 1, size - 1))  # may leave a rank with no sample
    bounds = [0, *cuts, n]
    return [slice(bounds[i], bounds[i + 1]) for i in range(size)]


# 1. property over random cases: y, dx, dweight, dbias and running statistics (float64)
for case in range(25):
    channel_axis = int(rng.choice([1, -1]))
    n = int(rng.integers(2, 12))
    shape = (n, *rng.integers(1, 5, int(rng.integers(1, 4))))
    C = shape[channel_axis]
    x = rng.normal(rng.choice([0.0, 10.0, -1e3]), rng.choice([1.0, 1e-2]), shape)
    dy = rng.standard_normal(shape)
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    s = uneven_slices(n)[rank]
    bn = nc.SyncBatchNorm(C, channel_axis=channel_axis, dtype=np.float64)
    bn.weight[...], bn.bias[...] = w, b
    y = bn(x[s])
    dx = bn.backward(dy[s])
    mode = "batch_norm" if channel_axis == 1 else "batch_norm_channels_last"
    ref = reference_forward(x, mode, weight=w, bias=b, running_mean=np.zeros(C), running_var=np.ones(C))
    rdx, rdw, rdb = reference_backward(dy, ref)
    assert_close(y, ref.y[s], np.float64, "y")
    assert_close(dx, rdx[s], np.float64, "dx", scale=np.abs(dy).max() * np.abs(w).max() * 4)
    assert_close(bn.grad_weight, rdw, np.float64, "dweight", scale=np.abs(dy).sum(axis=0).max() * 4)
    assert_close(bn.grad_bias, rdb, np.float64, "dbias", scale=np.abs(dy).sum(axis=0).max())
    assert_close(bn.running_mean, ref.running_mean, np.float64, "running_mean", scale=1e3)
    assert_close(bn.running_var, ref.running_var, np.float64, "running_var")
    same = comm.allgather((bn.running_mean.tobytes(), bn.running_var.tobytes(), bn.grad_weight.tobytes()))
    assert all(t == same[0] for t in same), "ranks hold different statistics"
say(f"{size} ranks: 25 random uneven batches match one process (float64)")

# 2. float32 at offset 1e4 within the single-process accuracy bound
x = (1e4 + rng.standard_normal((4 * size + 1, 6, 5, 5))).astype(np.float32)
dy = rng.standard_normal(x.shape).astype(np.float32)
s = uneven_slices(len(x))[rank]
bn = nc.SyncBatchNorm(6)
y = bn(x[s])
dx = bn.backward(dy[s])
ref = reference_forward(x, "batch_norm", weight=np.ones(6), bias=np.zeros(6))
rdx, rdw, rdb = reference_backward(dy, ref)
for name, got, want in (("y", y, ref.y[s]), ("dx", dx, rdx[s]), ("dweight", bn.grad_weight, rdw),
                        ("dbias", bn.grad_bias, rdb)):
    if got.size:
        err = np.abs(got.astype(np.float64) - want).max() / np.abs(want).max()
        assert err < 1e-6, (name, err)
say(f"{size} ranks: float32 at offset 1e4 within 1e-6 of the float64 reference")

# 3. bad input on the last rank: it raises its own error, the others SyncError; no write
bn = nc.SyncBatchNorm(3, dtype=np.float64)
bad = rank == size - 1
try:
    bn(rng.standard_normal((4, 5 if bad else 3)))
except nc.SyncError as e:
    assert not bad and f"rank {size - 1} of {size}" in str(e), e
except ValueError as e:
    assert bad and "channels" in str(e), e
else:
    raise AssertionError("no rank may succeed when one rejects its input")
assert bn.num_batches_tracked == 0 and np.array_equal(bn.running_var, np.ones(3))
say(f"{size} ranks: bad input on rank {size - 1} raised on every rank, nothing written")

# 4. ranks that disagree on the channel count all raise ValueError
bn = nc.SyncBatchNorm(2 + rank, dtype=np.float64)
try:
    bn(rng.standard_normal((3, 2 + rank)))
except ValueError as e:
    assert "ranks disagree" in str(e), e
else:
    raise AssertionError("disagreeing ranks must raise")
say(f"{size} ranks: disagreement on channels raised on every rank")

# 5. still in step after the errors: one more good exchange
y = nc.SyncBatchNorm(3, dtype=np.float64)(rng.standard_normal((2, 3, 4)))
comm.Barrier()
say(f"{size} ranks: OK")
sys.exit(0)
