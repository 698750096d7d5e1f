"""Synchronized statistics (``comm=``, SyncBatchNorm), in one process: ranks are threads
talking through normcore.testing.ThreadComm, which copies payloads through pickle as MPI
does and breaks a barrier (instead of hanging) when a rank never arrives. The same checks
under a real MPI launch are in tests/test_mpi.py."""
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import normcore as nc
from layer_cases import _x
from normcore.reference import reference_backward, reference_forward
from normcore.testing import assert_close, run_ranks

RNG = np.random.default_rng(11)


def _splits(n, parts, cuts):
    bounds = [0, *sorted(cuts), n]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


def _run_layer(x, dy, slices, dtype, channel_axis=1, seed_w=1, steps=1, **kw):
    """SyncBatchNorm forward + backward on each rank's slice; per-rank (y, dx, layer)."""
    C = x.shape[channel_axis]
    w = np.random.default_rng(seed_w).standard_normal(C).astype(dtype)

    def rank(comm):
        bn = nc.SyncBatchNorm(C, channel_axis=channel_axis, comm=comm, dtype=dtype, **kw)
        bn.weight[...] = w
        bn.bias[...] = w[::-1]
        s = slices[comm.Get_rank()]
        for _ in range(steps):
            y = bn(x[s])
            dx = bn.backward(dy[s])
        return y, dx, bn

    out = run_ranks(len(slices), rank)
    for r in out:
        if isinstance(r, Exception):
            raise r
    return out, w


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_synced_batch_norm_equals_one_batch(data):
    ranks = data.draw(st.integers(2, 3), label="ranks")
    ndim = data.draw(st.integers(2, 4), label="ndim")
    channel_axis = data.draw(st.sampled_from([1, -1]), label="channel_axis")
    n = data.draw(st.integers(2, 9), label="batch")
    shape = (n, *data.draw(st.lists(st.integers(1, 4), min_size=ndim - 1, max_size=ndim - 1), label="rest"))
    cuts = data.draw(st.lists(st.integers(0, n), min_size=ranks - 1, max_size=ranks - 1), label="cuts")
    slices = _splits(n, ranks, cuts)  # uneven; a rank may hold no sample
    offset = data.draw(st.sampled_from([0.0, 3.0, -50.0]), label="offset")
    x = offset + RNG.standard_normal(shape)
    dy = RNG.standard_normal(shape)
    out, w = _run_layer(x, dy, slices, np.float64, channel_axis)

    mode = "batch_norm" if channel_axis == 1 else "batch_norm_channels_last"
    C = x.shape[channel_axis]
    rm, rv = np.zeros(C), np.ones(C)
    ref = reference_forward(x, mode, weight=w, bias=w[::-1], running_mean=rm, running_var=rv)
    rdx, rdw, rdb = reference_backward(dy, ref)
    y = np.concatenate([o[0] for o in out])
    dx = np.concatenate([o[1] for o in out])
    assert_close(y, ref.y, np.float64, "y")
    assert_close(dx, rdx, np.float64, "dx", scale=np.abs(dy).max() * np.abs(w).max() * 4)
    for _, _, bn in out:
        assert_close(bn.grad_weight, rdw, np.float64, "dweight", scale=np.abs(dy).sum(axis=0).max() * 4)
        assert_close(bn.grad_bias, rdb, np.float64, "dbias", scale=np.abs(dy).sum(axis=0).max())
        assert_close(bn.running_mean, ref.running_mean, np.float64, "running_mean", scale=abs(offset))
        assert_close(bn.running_var, ref.running_var, np.float64, "running_var")
    # every rank holds the same bits
    for _, _, bn in out[1:]:
        for name in ("running_mean", "running_var", "grad_weight", "grad_bias"):
            assert np.array_equal(getattr(bn, name), getattr(out[0][2], name)), name


def test_float32_at_offset_1e4_stays_accurate():
    shape = (12, 5, 6, 6)
    x = (1e4 + RNG.standard_normal(shape)).astype(np.float32)
    dy = RNG.standard_normal(shape).astype(np.float32)
    out, w = _run_layer(x, dy, _splits(12, 3, [2, 7]), np.float32)
    ref = reference_forward(x, "batch_norm", weight=w, bias=w[::-1])
    rdx, rdw, rdb = reference_backward(dy, ref)
    got = {"y": np.concatenate([o[0] for o in out]), "dx": np.concatenate([o[1] for o in out]),
           "dweight": out[0][2].grad_weight, "dbias": out[0][2].grad_bias}
    for name, want in (("y", ref.y), ("dx", rdx), ("dweight", rdw), ("dbias", rdb)):
        err = np.abs(got[name].astype(np.float64) - want).max() / np.abs(want).max()
        assert err < 1e-6, name  # same bound as the single-process test at 1e4


def test_one_exchange_per_forward_and_backward_none_in_eval():
    x = RNG.standard_normal((6, 4, 3))

    def rank(comm):
        bn = nc.SyncBatchNorm(4, comm=comm, dtype=np.float64)
        s = slice(0, 2) if comm.Get_rank() == 0 else slice(2, 6)
        y = bn(x[s])
        bn.backward(np.ones_like(y))
        bn.eval()
        bn(x[s])
        return True

    nc.sync.reset_traffic()
    assert run_ranks(2, rank) == [True, True]
    t = nc.sync.traffic()
    assert t["forward"]["calls"] == 2 and t["backward"]["calls"] == 2  # one per rank and pass
    # forward sends (count, mean, m2) per channel; backward four per-channel sums
    assert 2 * (1 + 2 * 4 * 8) < t["forward"]["bytes"] < 2 * 1000
    assert 2 * 4 * 4 * 8 < t["backward"]["bytes"] < 2 * 1000


def test_eval_without_running_stats_uses_the_whole_batch():
    x = RNG.standard_normal((5, 3, 4))
    out, _ = _run_layer(x, np.ones_like(x), _splits(5, 2, [3]), np.float64, track_running_stats=False)
    ref = reference_forward(x, "batch_norm", weight=out[0][2].weight.astype(np.float64),
                            bias=out[0][2].bias.astype(np.float64))
    assert_close(np.concatenate([o[0] for o in out]), ref.y, np.float64, "y")


def test_repeated_steps_keep_ranks_identical():
    x = RNG.standard_normal((7, 3, 5))
    out, _ = _run_layer(x, RNG.standard_normal(x.shape), _splits(7, 3, [1, 4]), np.float64, steps=3,
                        momentum=None)
    for _, _, bn in out[1:]:
        assert bn.num_batches_tracked == 3
        assert np.array_equal(bn.running_var, out[0][2].running_var)


def test_user_registered_mode_is_synchronized():
    if "sync_group_batch" not in nc.modes():
        nc.register_mode("sync_group_batch", "n (g k) t -> g", params="(g k)", g=2)
    x = 4 + RNG.standard_normal((6, 4, 5))
    dy = RNG.standard_normal(x.shape)
    w = RNG.standard_normal(4)
    slices = _splits(6, 2, [5])

    def rank(comm):
        s = slices[comm.Get_rank()]
        y, cache = nc.normalize(x[s], "sync_group_batch", weight=w, comm=comm)
        return (y, *nc.backward(dy[s], cache))

    out = run_ranks(2, rank)
    ref = reference_forward(x, "sync_group_batch", weight=w)
    rdx, rdw, _ = reference_backward(dy, ref)
    assert_close(np.concatenate([o[0] for o in out]), ref.y, np.float64, "y")
    assert_close(np.concatenate([o[1] for o in out]), rdx, np.float64, "dx", scale=40)
    for o in out:
        assert_close(o[2], rdw, np.float64, "dweight", scale=40)


def _states(out):
    return [(bn.running_mean.copy(), bn.running_var.copy()) for bn in out]


def test_bad_input_on_one_rank_raises_everywhere_without_deadlock():
    layers = {}

    def rank(comm):
        bn = layers[comm.Get_rank()] = nc.SyncBatchNorm(3, comm=comm, dtype=np.float64)
        x = RNG.standard_normal((4, 5 if comm.Get_rank() == 1 else 3, 2))  # rank 1: wrong channels
        return bn(x)

    out = run_ranks(3, rank, timeout=10)
    assert isinstance(out[1], ValueError) and not isinstance(out[1], nc.SyncError)
    assert "channels" in str(out[1])
    for r in (0, 2):
        assert isinstance(out[r], nc.SyncError) and "rank 1 of 3" in str(out[r])
    for bn in layers.values():  # nothing written anywhere
        assert np.array_equal(bn.running_mean, np.zeros(3)) and bn.num_batches_tracked == 0


def test_bad_dy_on_one_rank_raises_everywhere_in_backward():
    def rank(comm):
        bn = nc.SyncBatchNorm(3, comm=comm, dtype=np.float64)
        y = bn(RNG.standard_normal((4, 3)))
        dy = np.ones((5, 3)) if comm.Get_rank() == 0 else np.ones_like(y)
        bn.backward(dy)
        return bn.grad_weight.copy()

    out = run_ranks(2, rank, timeout=10)
    assert isinstance(out[0], ValueError) and "dy" in str(out[0])
    assert isinstance(out[1], nc.SyncError)


def test_ranks_that_disagree_raise_on_every_rank():
    def rank(comm):
        C = 3 + comm.Get_rank()  # each rank's own input is valid for its own layer
        bn = nc.SyncBatchNorm(C, comm=comm, dtype=np.float64)
        try:
            bn(RNG.standard_normal((4, C)))
        finally:
            assert np.array_equal(bn.running_var, np.ones(C))

    out = run_ranks(2, rank, timeout=10)
    for e in out:
        assert isinstance(e, ValueError) and "ranks disagree" in str(e) and "statistics shape" in str(e)


def test_whole_batch_of_one_sample_is_rejected_on_every_rank():
    def rank(comm):
        bn = nc.SyncBatchNorm(2, comm=comm, dtype=np.float64)
        bn(np.ones((1 if comm.Get_rank() == 0 else 0, 2)))

    out = run_ranks(2, rank, timeout=10)
    for e in out:
        assert isinstance(e, ValueError) and "more than 1 value" in str(e)


def test_modes_that_keep_the_batch_axis_cannot_be_synchronized():
    out = run_ranks(2, lambda comm: nc.normalize(np.ones((2, 8)), "layer_norm", comm=comm), timeout=10)
    for e in out:
        assert isinstance(e, ValueError) and str(e).startswith("comm:")


def test_comm_must_be_a_communicator():
    with pytest.raises(TypeError, match="comm: expected an mpi4py communicator"):
        nc.normalize(np.ones((4, 3)), "batch_norm", comm=object())
    with pytest.raises(TypeError, match="comm"):
        nc.SyncBatchNorm(3, comm="world")


def test_missing_rank_breaks_the_barrier_instead_of_hanging():
    # the test harness itself: a rank that skips the collective must not hang the suite
    def rank(comm):
        if comm.Get_rank() == 0:
            return nc.normalize(np.ones((2, 3)), "batch_norm", comm=comm)
        return None

    out = run_ranks(2, rank, timeout=0.5)
    assert isinstance(out[0], threading.BrokenBarrierError)


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_any_failure_on_one_rank_reaches_every_rank(where, monkeypatch):
    # not only input errors: a MemoryError in a kernel is carried through the exchange too
    from normcore import backward_route, forward_route
    real = forward_route._moments if where == "forward" else backward_route._backward_rows
    state = {}

    def rank(comm):
        state[threading.get_ident()] = comm.Get_rank()
        bn = nc.SyncBatchNorm(3, comm=comm, dtype=np.float64)
        y = bn(RNG.standard_normal((4, 3)))
        bn.backward(np.ones_like(y))

    def by_rank(*args, **kwargs):
        if state.get(threading.get_ident()) == 1:
            raise MemoryError("out of memory on this rank")
        return real(*args, **kwargs)

    if where == "forward":
        monkeypatch.setattr(forward_route, "_moments", by_rank)
    else:
        monkeypatch.setattr(backward_route, "_backward_rows", by_rank)
    out = run_ranks(2, rank, timeout=10)
    assert isinstance(out[1], MemoryError)
    assert isinstance(out[0], nc.SyncError) and "MemoryError" in str(out[0]) and "rank 1 of 2" in str(out[0])


def test_backward_before_forward_on_one_rank_reaches_every_rank():
    def rank(comm):
        bn = nc.SyncBatchNorm(3, comm=comm, dtype=np.float64)
        if comm.Get_rank() == 0:
            y = bn(RNG.standard_normal((4, 3)))  # rank 1 skipped forward: a bug, not a hang
        else:
            y = np.ones((4, 3))
            bn._cache = None
            return bn.backward(y)
        return bn.backward(np.ones_like(y))

    out = run_ranks(2, rank, timeout=10)
    assert isinstance(out[1], RuntimeError) and "before forward" in str(out[1])
    assert isinstance(out[0], nc.SyncError) and "RuntimeError" in str(out[0])


@pytest.mark.parametrize("setting, values", [("eps", (1e-5, 1e-3)), ("momentum", (0.1, 0.2)),
                                             ("unbiased", (True, False))])
def test_ranks_that_disagree_on_settings_raise_on_every_rank(setting, values):
    def rank(comm):
        bn = nc.SyncBatchNorm(3, comm=comm, dtype=np.float64, **{setting: values[comm.Get_rank()]})
        try:
            bn(RNG.standard_normal((4, 3)))
        finally:
            assert np.array_equal(bn.running_var, np.ones(3)) and bn.num_batches_tracked == 0

    out = run_ranks(2, rank, timeout=10)
    for e in out:
        assert isinstance(e, ValueError) and "ranks disagree" in str(e) and setting in str(e)


# -- synchronized ranks that disagree -----------------------------------------------------

RUN = {"running_mean": None, "running_var": None}


@pytest.mark.parametrize("setting, values", [
    ("estimate", (True, False)),
    ("eps", (1e-5, 1e-3)),
    ("momentum", (0.1, 0.2)),
    ("decay", (None, 0.9)),
    ("unbiased", (True, False)),
    ("weight", (True, False)),
    ("bias", (True, False)),
    ("running", (True, False)),
    ("mask", (True, False)),
    ("training", (True, False)),
])
def test_synchronized_ranks_that_disagree_on_a_setting_raise_on_every_rank(setting, values):
    x = _x((8, 3, 4))

    def rank(comm):
        r = comm.Get_rank()
        v = values[r]
        kw = {"running_mean": np.zeros(3, np.float32), "running_var": np.ones(3, np.float32),
              "weight": np.ones(3, np.float32), "bias": np.zeros(3, np.float32)}
        if setting in ("weight", "bias") and not v:
            del kw[setting]
        elif setting == "running" and not v:
            del kw["running_mean"], kw["running_var"]
        elif setting == "mask":
            kw["mask"] = np.ones((4, 1, 4), bool) if v else None
        elif setting == "decay":
            kw["momentum" if v is None else "decay"] = 0.1 if v is None else v
        elif setting == "training":
            kw["training"] = v
            if not v:
                del kw["running_mean"], kw["running_var"]  # eval without running ones still exchanges
        elif setting not in ("running", "weight", "bias"):
            kw[setting] = v
        state = (kw.get("running_mean", np.zeros(3)).copy(),)
        try:
            nc.normalize(x[:4] if r == 0 else x[4:], "batch_norm", comm=comm, **kw)
        except ValueError as e:
            assert "running_mean" not in kw or np.array_equal(kw["running_mean"], state[0])
            return e
        return None

    out = run_ranks(2, rank, timeout=10)
    assert all(isinstance(e, ValueError) and "ranks disagree" in str(e) for e in out), out


def test_synchronized_backward_ranks_that_disagree_on_parameters_raise():
    x = _x((8, 3, 4))

    def rank(comm):
        r = comm.Get_rank()
        kw = {"weight": np.ones(3, np.float32)} if r == 0 else {}
        y, cache = nc.normalize(x[:4] if r == 0 else x[4:], "batch_norm", comm=comm,
                                bias=np.zeros(3, np.float32), **kw)
        return y, cache

    out = run_ranks(2, rank, timeout=10)  # the forward's settings differ already
    assert all(isinstance(e, ValueError) and "weight given" in str(e) for e in out)
