"""A layer's state: pickles and copies at any time, checkpoints, threads sharing a layer, calls
interrupted half-way, and a backward that consumes its forward."""
import copy
import os
import pickle
import signal
import threading
import time

import numpy as np
import pytest

import normcore as nc
from layer_cases import _x, LAYERS, IDS, _state, _same_state, _grads
from normcore import forward_route, program
from normcore.backend import CPU
from normcore.testing import run_ranks

RNG = np.random.default_rng(12)


# -- pickling and copies (every layer, at any time) -----------------------------------------

PICKLED_LAYERS = [(lambda: nc.BatchNorm1d(3), (6, 3)), (lambda: nc.BatchNorm2d(3, channel_axis=-1), (2, 4, 4, 3)),
                  (lambda: nc.LayerNorm((3, 5)), (4, 3, 5)), (lambda: nc.GroupNorm(2, 4), (2, 4, 5)),
                  (lambda: nc.InstanceNorm2d(3, track_running_stats=True), (2, 3, 4, 4)), (lambda: nc.RMSNorm(5), (3, 5)),
                  (lambda: nc.ChannelNorm(4, 2), (2, 4, 3)), (lambda: nc.EstimatedBatchNorm(3), (6, 3, 2)),
                  (lambda: nc.BatchChannelNorm(4, 2), (6, 4, 3)), (lambda: nc.SyncBatchNorm(3), (6, 3))]


@pytest.mark.parametrize("make, shape", PICKLED_LAYERS)
@pytest.mark.parametrize("duplicate", [lambda l: pickle.loads(pickle.dumps(l)), copy.deepcopy],
                         ids=["pickle", "deepcopy"])
def test_layers_pickle_and_copy_at_any_time(make, shape, duplicate):
    x = RNG.standard_normal(shape).astype(np.float32)
    dy = RNG.standard_normal(shape).astype(np.float32)
    layer = make()
    duplicate(layer)  # fresh
    layer(x)
    twin = duplicate(layer)  # holding a forward's cache
    np.testing.assert_array_equal(twin.backward(dy), layer.backward(dy))
    twin = duplicate(layer)  # after backward
    for a, b in ((twin(x), layer(x)), (twin.backward(dy), layer.backward(dy))):
        np.testing.assert_array_equal(a, b)
    for (name, p, g), (_, p2, g2) in zip(layer.named_parameters(), twin.named_parameters(), strict=True):
        np.testing.assert_array_equal(p, p2, err_msg=name)
        np.testing.assert_array_equal(g, g2, err_msg=name)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, twin.state_dict()[k], err_msg=k)


def test_normalize_cache_pickles():
    x = RNG.standard_normal((4, 6)).astype(np.float32)
    y, cache = nc.normalize(x, "layer_norm", weight=np.ones(6, np.float32))
    dy = np.ones_like(y)
    got, want = nc.backward(dy, pickle.loads(pickle.dumps(cache))), nc.backward(dy, cache)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


# -- files and state ------------------------------------------------------------------------

def test_save_and_load_take_the_same_names(tmp_path):
    layer = nc.BatchNorm1d(3)
    layer(RNG.standard_normal((5, 3)).astype(np.float32))
    for name in ("ckpt", "ckpt.npz"):
        written = layer.save(tmp_path / name)
        assert written.endswith("ckpt.npz")
        back = nc.BatchNorm1d(3).load(tmp_path / name)
        for k, v in layer.state_dict().items():
            np.testing.assert_array_equal(back.state_dict()[k], v)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", b"\x93NUMPY not an archive"])
def test_a_bad_checkpoint_names_its_path(tmp_path, content):
    path = tmp_path / "bad.npz"
    path.write_bytes(content)
    layer = nc.BatchNorm1d(3)
    with pytest.raises(ValueError, match="bad.npz"):
        layer.load(path)
    np.testing.assert_array_equal(layer.weight, np.ones(3))


@pytest.mark.parametrize("make, shape", [(lambda: nc.BatchNorm1d(3), (6, 3)),
                                         (lambda: nc.BatchChannelNorm(4, 2), (6, 4, 3))])
@pytest.mark.parametrize("count", [np.nan, np.inf, -1, 2.5])
def test_a_failed_load_writes_nothing(make, shape, count):
    layer = make()
    layer(RNG.standard_normal(shape).astype(np.float32))
    before = layer.state_dict()
    state = {k: np.asarray(v) + 1 if k.rpartition(".")[2] != "num_batches_tracked" else np.asarray(count)
             for k, v in before.items()}
    with pytest.raises(ValueError, match="num_batches_tracked"):
        layer.load_state_dict(state)
    for k, v in before.items():
        np.testing.assert_array_equal(layer.state_dict()[k], v, err_msg=k)


def test_batch_channel_norm_forward_is_atomic(monkeypatch):
    layer = nc.BatchChannelNorm(4, 2, estimate=False)
    x = RNG.standard_normal((6, 4, 3)).astype(np.float32)
    layer(x)
    before = layer.state_dict()

    def fail(*args, **kwargs):
        raise MemoryError("the second step failed")
    monkeypatch.setattr(layer.channel_norm, "_forward", fail)
    with pytest.raises(MemoryError):
        layer(x)
    for k, v in before.items():
        np.testing.assert_array_equal(layer.state_dict()[k], v, err_msg=k)


# -- one layer, several threads -------------------------------------------------------------

@pytest.mark.parametrize("reuse", [False, True], ids=["fresh", "reuse_buffers"])
@pytest.mark.parametrize("name, make, shape", LAYERS, ids=IDS)
def test_threads_sharing_a_layer_each_get_their_own_backward(name, make, shape, reuse):
    n_threads, steps = 4, 25
    layer = make()
    # estimated batch norm normalizes with the running statistics of the moment, so its y
    # and dx depend on the order of the steps: only its totals are checked
    stateful_output = "Estimated" in name or name == "BatchChannelNorm"
    layer.reuse_buffers = reuse
    _cumulative(layer)  # the running statistics the same for any order of the batches
    xs = [[_x(shape, offset=t + 0.1 * s) for s in range(steps)] for t in range(n_threads)]
    dys = [[_x(shape) for _ in range(steps)] for _ in range(n_threads)]
    # each (x, dy) on its own, serially: the y and dx every thread must get
    want = {}
    for t in range(n_threads):
        for s in range(steps):
            solo = make()
            y = solo(xs[t][s])
            want[t, s] = (y.copy(), solo.backward(dys[t][s]).copy())
    wrong = []
    start = threading.Barrier(n_threads)

    def work(t):
        start.wait()
        for s in range(steps):
            y = layer(xs[t][s])
            y_seen = y.copy()
            time.sleep(0)  # let the others run between the forward and its backward
            dx = layer.backward(dys[t][s])
            if not (np.array_equal(y_seen, want[t, s][0]) and np.array_equal(dx, want[t, s][1])):
                wrong.append((t, s))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if not stateful_output:
        assert not wrong, f"{len(wrong)} of {n_threads * steps} steps got another thread's y or dx"
    # no update and no gradient lost: the serial totals, up to the order of the sums
    serial = _cumulative(make())
    for t in range(n_threads):
        for s in range(steps):
            serial(xs[t][s])
            serial.backward(dys[t][s])
    got, ref = layer.state_dict(), serial.state_dict()
    for k in ref:
        if k.endswith("num_batches_tracked"):
            assert got[k] == ref[k] == n_threads * steps
        else:
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-4, err_msg=k)
    for (k, _, g), (_, _, g_ref) in zip(layer.named_parameters(), serial.named_parameters(), strict=True):
        if stateful_output and k not in ("bias", "channel_norm.bias"):
            continue  # sums of dy * x-hat with the x-hat of the moment: order-dependent
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-3, err_msg=k)


def _cumulative(layer):
    """``layer`` with every running average cumulative (momentum None)."""
    for part in [layer] + list(layer._children().values()):
        if getattr(part, "running_mean", None) is not None:
            part.momentum = None
    return layer


def test_a_thread_without_a_forward_of_its_own_cannot_take_another_threads():
    layer = nc.BatchNorm1d(3)
    layer(_x((4, 3)))
    seen = []
    th = threading.Thread(target=lambda: seen.append(pytest.raises(RuntimeError, layer.backward, _x((4, 3)))))
    th.start()
    th.join()
    assert "before forward (on this thread)" in str(seen[0].value)
    layer.backward(_x((4, 3)))  # this thread's forward is still there


# -- interrupted calls ----------------------------------------------------------------------

class _Stop(BaseException):
    pass


@pytest.mark.parametrize("where", ["_update_running", "_apply", "_apply_running", "NormCache"])
@pytest.mark.parametrize("name, make, shape", [c for c in LAYERS if "Norm" in c[0]], ids=IDS)
def test_a_forward_interrupted_anywhere_leaves_the_layer_as_before(monkeypatch, name, make, shape, where):
    monkeypatch.setattr(program, "ENABLED", False)  # the route executors' steps (programs: below)
    layer = make()
    x = _x(shape, offset=3.0)
    layer(_x(shape))  # a first step: state and a cache to keep
    before, cache = _state(layer), _cache_of(layer)
    real = getattr(forward_route, where)
    hits = []

    def interrupted(*args, **kwargs):
        result = real(*args, **kwargs)
        hits.append(1)
        raise _Stop  # as a KeyboardInterrupt arriving right after this step
    monkeypatch.setattr(forward_route, where, interrupted)
    try:
        layer(x)
    except _Stop:
        pass
    monkeypatch.undo()
    if not hits:
        pytest.skip(f"{name}'s training forward does not pass through {where}")
    assert _same_state(before, _state(layer)), "running statistics changed by an interrupted call"
    assert _cache_of(layer) is cache


@pytest.mark.parametrize("after", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("name, make, shape", [c for c in LAYERS if "Norm" in c[0]], ids=IDS)
def test_a_warm_forward_interrupted_after_any_kernel_leaves_the_layer_as_before(monkeypatch, name, make, shape,
                                                                                after):
    layer = make()
    layer(_x(shape))
    layer(_x(shape))  # warm: the compiled call runs the next one
    before, cache = _state(layer), _cache_of(layer)
    calls = []

    class Interrupting:
        def __init__(self, K):
            self._K = K

        def __getattr__(self, name):
            f = getattr(self._K, name)
            if not callable(f):
                return f

            def call(*args, **kwargs):
                result = f(*args, **kwargs)
                calls.append(name)
                if len(calls) == after + 1:
                    raise _Stop  # right after this kernel has written what it writes
                return result
            return call
    monkeypatch.setattr(CPU, "K", Interrupting(CPU.K))
    try:
        layer(_x(shape, offset=3.0))
    except _Stop:
        pass
    monkeypatch.undo()
    if len(calls) <= after:
        pytest.skip(f"{name}'s training forward runs {len(calls)} kernels")
    assert _same_state(before, _state(layer)), "running statistics changed by an interrupted call"
    assert _cache_of(layer) is cache


def _cache_of(layer):
    return getattr(layer, "channel_norm", layer)._cache


@pytest.mark.slow
def test_ctrl_c_during_training_forwards_leaves_a_consistent_layer():
    # real SIGINTs at random moments: after each, the layer is the serial replay of the
    # steps that completed, never between two steps
    x = _x((32, 64, 24, 24))
    rng = np.random.default_rng(0)
    for trial in range(12):
        layer, replay = nc.BatchNorm2d(64), nc.BatchNorm2d(64)
        done = 0
        timer = threading.Timer(float(rng.uniform(0.0, 0.05)), lambda: os.kill(os.getpid(), signal.SIGINT))
        timer.start()
        try:
            while True:  # until the signal lands, somewhere in a forward or between two
                layer(x)
                done += 1
        except KeyboardInterrupt:
            pass
        timer.join()
        for _ in range(layer.num_batches_tracked):
            replay(x)
        assert layer.num_batches_tracked in (done, done + 1)
        np.testing.assert_array_equal(layer.running_mean, replay.running_mean)
        np.testing.assert_array_equal(layer.running_var, replay.running_var)


def test_a_backward_that_fails_half_way_adds_no_gradient(monkeypatch):
    bcn = nc.BatchChannelNorm(4, 2, estimate=False)
    x = _x((6, 4, 7))
    bcn(x)
    grads = _grads(bcn)
    real = bcn.batch_norm.backward

    def failing(*args, **kwargs):
        raise _Stop
    monkeypatch.setattr(bcn.batch_norm, "backward", failing)
    with pytest.raises(_Stop):
        bcn.backward(_x((6, 4, 7)))
    assert all(np.array_equal(a, b) for a, b in zip(grads, _grads(bcn)))
    monkeypatch.setattr(bcn.batch_norm, "backward", real)
    bcn.backward(_x((6, 4, 7)))  # the forward was not consumed


# -- a backward consumes its forward ------------------------------------------------------

@pytest.mark.parametrize("name, make, shape", LAYERS, ids=IDS)
def test_a_second_backward_of_one_forward_is_refused(name, make, shape):
    layer = make()
    y = layer(_x(shape))
    dy = np.ones_like(y)
    dx = layer.backward(dy, retain_graph=True)
    grads = _grads(layer)
    np.testing.assert_array_equal(layer.backward(dy), dx)  # retained: a second one is allowed
    twice = _grads(layer)
    with pytest.raises(RuntimeError, match="already consumed by a backward"):
        layer.backward(dy)
    assert all(np.array_equal(a, b) for a, b in zip(twice, _grads(layer)))  # nothing added
    assert all(np.allclose(t, 2 * g) for t, g in zip(twice, grads))
    layer(_x(shape))
    layer.backward(dy)  # a new forward: a new backward


def test_sync_batch_norm_second_backward_reaches_every_rank():
    def rank(comm):
        bn = nc.SyncBatchNorm(3, comm=comm)
        y = bn(_x((4, 3, 2)))
        bn.backward(np.ones_like(y))
        return bn.backward(np.ones_like(y)) if comm.Get_rank() == 1 else bn.backward(np.ones_like(y), retain_graph=True)

    out = run_ranks(2, rank, timeout=10)
    assert isinstance(out[1], RuntimeError) and "consumed" in str(out[1])
    assert isinstance(out[0], (RuntimeError, nc.SyncError))


def test_pickled_layers_keep_their_pending_backward():
    layer = nc.BatchNorm1d(3)
    y = layer(_x((4, 3)))
    twin = copy.deepcopy(layer)
    np.testing.assert_array_equal(twin.backward(np.ones_like(y)), layer.backward(np.ones_like(y)))
    with pytest.raises(RuntimeError, match="consumed"):
        copy.deepcopy(layer).backward(np.ones_like(y))
