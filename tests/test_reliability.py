"""The reliability contracts, each on every entry point it applies to: layers shared by
threads, calls interrupted or refused half-way, NaN only where the README says, bounded
caches, and the small contracts (messages, torch.nn parity) around them."""
import copy
import gc
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
import weakref

import numpy as np
import pytest

import normcore as nc
from normcore import cs231n, forward_route, plan as plan_module
from normcore.backend import CPU
from normcore.testing import run_ranks

RNG = np.random.default_rng(26)


def _x(shape, dtype=np.float32, offset=0.0):
    return (offset + RNG.standard_normal(shape)).astype(dtype)


# one of every layer kind, with an input it takes
LAYERS = [
    ("BatchNorm1d", lambda: nc.BatchNorm1d(4), (8, 4, 3)),
    ("BatchNorm2d", lambda: nc.BatchNorm2d(4), (6, 4, 5, 5)),
    ("BatchNorm2d-nhwc", lambda: nc.BatchNorm2d(4, channel_axis=-1), (6, 5, 5, 4)),
    ("BatchNorm3d", lambda: nc.BatchNorm3d(4), (4, 4, 2, 3, 3)),
    ("LayerNorm", lambda: nc.LayerNorm((3, 5)), (6, 3, 5)),
    ("GroupNorm", lambda: nc.GroupNorm(2, 4), (6, 4, 7)),
    ("InstanceNorm2d", lambda: nc.InstanceNorm2d(4, affine=True, track_running_stats=True), (6, 4, 5, 5)),
    ("RMSNorm", lambda: nc.RMSNorm(6), (5, 6)),
    ("ChannelNorm", lambda: nc.ChannelNorm(4, 2), (6, 4, 7)),
    ("EstimatedBatchNorm", lambda: nc.EstimatedBatchNorm(4), (6, 4, 7)),
    ("BatchChannelNorm", lambda: nc.BatchChannelNorm(4, 2), (6, 4, 7)),
    ("BatchChannelNorm-bn", lambda: nc.BatchChannelNorm(4, 2, estimate=False), (6, 4, 7)),
]
IDS = [name for name, _, _ in LAYERS]


def _state(layer):
    return {k: v.copy() for k, v in layer.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _grads(layer):
    return [g.copy() for _, _, g in layer.named_parameters()]


# -- 1. one layer, several threads -------------------------------------------------------------

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


# -- 2. forward_add with a missing residual ---------------------------------------------------

@pytest.mark.parametrize("name, make, shape", LAYERS, ids=IDS)
def test_forward_add_refuses_a_missing_residual(name, make, shape):
    layer = make()
    before = _state(layer)
    with pytest.raises(TypeError, match="^residual: expected an array of x's shape and dtype, got None"):
        layer.forward_add(_x(shape), None)
    assert _same_state(before, _state(layer))
    with pytest.raises(TypeError, match="^residual: expected an array"):
        nc.add_normalize(_x(shape), None, "layer_norm")


def test_sync_batch_norm_forward_add_refuses_a_missing_residual_on_every_rank():
    def rank(comm):
        bn = nc.SyncBatchNorm(3, comm=comm)
        x = _x((4, 3, 2))
        return bn.forward_add(x, None if comm.Get_rank() == 1 else x)

    out = run_ranks(2, rank, timeout=10)
    assert isinstance(out[1], TypeError) and "residual" in str(out[1])
    assert isinstance(out[0], nc.SyncError) and "residual" in str(out[0])


# -- 3. synchronized ranks that disagree -----------------------------------------------------

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


# -- 4. numpy.ma masks -------------------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda x, m: nc.normalize(x, "batch_norm", mask=m),
    lambda x, m: nc.add_normalize(x, x, "layer_norm", mask=m),
    lambda x, m: nc.layer_norm(x, 5, mask=m),
    lambda x, m: nc.BatchNorm1d(3)(x, mask=m),
    lambda x, m: nc.LayerNorm(5).forward_add(x, x, mask=m),
    lambda x, m: nc.BatchChannelNorm(3, 1)(x, mask=m),
], ids=["normalize", "add_normalize", "form", "layer", "layer-add", "BatchChannelNorm"])
def test_a_numpy_ma_mask_is_refused_naming_mask(call):
    x = _x((4, 3, 5))
    m = np.ma.masked_array(np.ones((4, 3, 5), bool), mask=np.zeros((4, 3, 5), bool))
    with pytest.raises(TypeError, match="^mask: masked arrays are not supported"):
        call(x, m)


# -- 5, 6. NaN only where the README says; no warnings ----------------------------------------

HUGE = [
    ("layer_norm", 1.35e154 * np.array([[1, 1 + 1e-6, 1 - 1e-6, 1]]), {}, None),
    ("batch_norm", 2e154 * (1 + 1e-6 * np.random.default_rng(1).standard_normal((16, 3, 5))), {}, None),
    ("batch_norm_channels_last", 2e154 * (1 + 1e-6 * np.random.default_rng(2).standard_normal((300, 3))), {}, None),
    ("group_norm", 1.5e154 * (1 + 1e-6 * np.random.default_rng(3).standard_normal((2, 4, 50))), {"g": 2}, None),
    # wholly padded row blocks of the masked column strategy
    ("batch_norm_channels_last", 1e158 * (1 + 1e-6 * np.random.default_rng(4).standard_normal((300, 4, 3))), {},
     np.arange(300)[:, None, None] < 150),
    ("batch_norm", 2e154 * (1 + 1e-6 * np.random.default_rng(5).standard_normal((16, 3, 5))), {},
     np.arange(16)[:, None, None] < 5),
    ("layer_norm", 1.35e154 * (1 + 1e-6 * np.random.default_rng(6).standard_normal((4, 9))), {},
     np.arange(9) < 5),
]


@pytest.mark.parametrize("mode, x, sizes, mask", HUGE)
def test_large_offsets_with_a_representable_variance_stay_finite_without_warnings(mode, x, sizes, mask):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, cache = nc.normalize(x, mode, mask=mask, **sizes)
        counted = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
        assert np.isfinite(y[counted]).all()
        assert np.isfinite(cache.mean).all() and np.isfinite(cache.rstd).all()
        dx, _, _ = nc.backward(np.ones_like(y), cache)
        assert np.isfinite(dx).all()


def test_large_offsets_on_synchronized_ranks():
    x = 2e154 * (1 + 1e-6 * np.random.default_rng(7).standard_normal((12, 3, 5)))

    def rank(comm):
        part = x[:3] if comm.Get_rank() == 0 else x[3:]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return nc.normalize(part, "batch_norm", comm=comm)[0]

    y = np.concatenate(run_ranks(2, rank, timeout=10))
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, nc.normalize(x, "batch_norm")[0], atol=1e-6)


@pytest.mark.parametrize("scale", [1e155, 1e157, 1e160])
def test_masked_statistics_beyond_the_range_are_nan_silently(scale):
    x = scale * (1 + 1e-6 * np.random.default_rng(8).standard_normal((200, 4, 3)))
    mask = np.arange(200)[:, None, None] < 150
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, _ = nc.normalize(x, "batch_norm_channels_last", mask=mask)
        y0, _ = nc.normalize(np.ascontiguousarray(x[:150]), "batch_norm_channels_last")
    # the same verdict as the unmasked call on the counted rows: finite or the documented NaN
    np.testing.assert_array_equal(np.isnan(y[:150]), np.isnan(y0))


def test_large_offsets_through_the_emulated_cuda_kernels(emulated_gpu):
    for mode, x, sizes, mask in HUGE:
        y, cache = nc.normalize(x, mode, mask=mask, **sizes)
        counted = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
        assert np.isfinite(y[counted]).all(), mode


# -- 7. interrupted calls ----------------------------------------------------------------------

class _Stop(BaseException):
    pass


@pytest.mark.parametrize("where", ["_update_running", "_apply", "_apply_running", "NormCache"])
@pytest.mark.parametrize("name, make, shape", [c for c in LAYERS if "Norm" in c[0]], ids=IDS)
def test_a_forward_interrupted_anywhere_leaves_the_layer_as_before(monkeypatch, name, make, shape, where):
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


# -- 8. every refusing rule before the first write ---------------------------------------------

def test_a_masked_call_refused_by_the_counts_rule_writes_no_output():
    x = _x((4, 3, 6))
    mask = np.zeros(x.shape, bool)
    mask[0, :, 0] = True  # one counted element per channel
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    out, h_out = np.full_like(x, 7.0), np.full_like(x, 7.0)
    for call in (lambda: nc.normalize(x, "batch_norm", running_mean=rm, running_var=rv, mask=mask, out=out),
                 lambda: nc.add_normalize(x, x, "batch_norm", running_mean=rm, running_var=rv, mask=mask, out=out,
                                          h_out=h_out),
                 lambda: nc.add_normalize(x, x, "instance_norm", mask=mask, out=out, h_out=h_out)):
        with pytest.raises(ValueError, match="mask: group"):
            call()
        assert (out == 7).all() and (h_out == 7).all() and not rm.any() and (rv == 1).all()


@pytest.mark.parametrize("make, shape", [(lambda: nc.BatchNorm1d(3), (4, 3, 6)),
                                         (lambda: nc.InstanceNorm1d(3), (4, 3, 6)),
                                         (lambda: nc.BatchChannelNorm(3, 1), (4, 3, 6))])
def test_a_refused_layer_call_keeps_what_the_last_call_returned(make, shape):
    layer = make()
    layer.reuse_buffers = True
    x = _x(shape)
    y, h = layer.forward_add(x, x)
    kept_y, kept_h = y.copy(), h.copy()
    mask = np.zeros(shape, bool)
    mask[0, :, 0] = True
    with pytest.raises(ValueError, match="mask: group"):
        layer.forward_add(x, x, mask=mask)
    np.testing.assert_array_equal(y, kept_y)
    np.testing.assert_array_equal(h, kept_h)


def test_synchronized_ranks_that_disagree_write_no_h_out():
    x = _x((8, 3, 4))

    def rank(comm):
        r = comm.Get_rank()
        part = x[:4] if r == 0 else x[4:]
        h_out = np.full_like(part, 7.0)
        with pytest.raises(ValueError, match="ranks disagree"):
            nc.add_normalize(part, part, "batch_norm", comm=comm, eps=1e-5 if r == 0 else 1e-3, h_out=h_out)
        return h_out

    assert all((h == 7).all() for h in run_ranks(2, rank, timeout=10))


# -- 9, 10. caches keep their byte bound --------------------------------------------------------

def test_a_plan_beyond_the_cache_bound_lives_only_as_long_as_its_caller_holds_it(monkeypatch):
    monkeypatch.setattr(plan_module, "PLAN_CACHE_BYTES", 1 << 20)
    x = np.ones((200_000, 4), np.float32)  # 3.2 MB of row indices
    y, cache = nc.layer_norm(x, 4)
    plan = weakref.ref(cache.plan)
    assert plan().index_bytes > 1 << 20
    assert nc.layer_norm(x, 4)[1].plan is plan()  # reused while held
    assert not any(p is plan() for p, _ in plan_module._PLANS.values())  # not in the bounded cache
    del y, cache
    gc.collect()
    assert plan() is None, "a plan larger than the cache's bound outlived its caller"


def test_mask_layouts_and_constants_stay_within_their_bytes(monkeypatch):
    from normcore import masking
    from normcore.bounded import PlanArrays
    monkeypatch.setattr(CPU, "_constants", PlanArrays(200_000))
    monkeypatch.setattr(masking, "_LAYOUTS", PlanArrays(200_000))
    shape = (2,) * 9 + (3,)  # channels last: 512 broadcast shapes of a mask over the leading axes
    x = _x(shape)
    for bits in range(512):
        mshape = tuple(2 if bits >> i & 1 else 1 for i in range(9)) + (1,)
        mask = np.ones(mshape, bool)
        mask.flat[-1] = False
        nc.normalize(x, "batch_norm_channels_last", mask=mask)
    assert CPU._constants.bytes <= 200_000 and masking._LAYOUTS.bytes <= 200_000
    assert len(CPU._constants) < 512


def test_plan_arrays_forget_a_freed_plan():
    from normcore.bounded import PlanArrays

    class Plan:
        pass
    cache, plan = PlanArrays(1 << 20), Plan()
    cache.get(plan, "a", lambda: np.zeros(100))
    assert cache.bytes == 800
    del plan
    gc.collect()
    assert cache.bytes == 0 and len(cache) == 0
    big = cache.get(Plan(), "b", lambda: np.zeros(1 << 18))  # larger than the bound: not kept
    assert big.size == 1 << 18 and cache.bytes == 0


# -- 11. messages that name the argument --------------------------------------------------------

def test_load_of_a_npy_payload_names_the_path(tmp_path):
    path = tmp_path / "w.npz"
    with open(path, "wb") as f:
        np.save(f, np.ones(3))
    with pytest.raises(ValueError, match=r"w\.npz.* is not a normcore checkpoint.*\.npy payload"):
        nc.BatchNorm1d(3).load(path)


def test_a_list_where_an_array_is_needed_advises_numpy():
    y, cache = nc.normalize(_x((2, 3)), "layer_norm")
    with pytest.raises(TypeError, match="^dy: expected a numpy.ndarray.*got list; convert it with numpy.asarray"):
        nc.backward([[1.0, 2.0, 3.0]] * 2, cache)
    with pytest.raises(TypeError, match="numpy.asarray"):
        nc.normalize(_x((2, 3)), "layer_norm", weight=[1.0, 2.0, 3.0])


def test_param_dtype_errors_name_param_dtype():
    with pytest.raises(TypeError, match="^param_dtype: expected"):
        nc.BatchNorm2d(3, dtype=np.float16, param_dtype=">f4")
    with pytest.raises(TypeError, match="^dtype: expected"):
        nc.BatchNorm2d(3, dtype=">f4")


@pytest.mark.parametrize("bad", [[[1.0, 2.0]], (1.0, 2.0), None, 3.0], ids=["list", "tuple", "None", "scalar"])
@pytest.mark.parametrize("call", [
    lambda x: cs231n.batchnorm_forward(x, np.ones(2), np.zeros(2), {"mode": "train"}),
    lambda x: cs231n.layernorm_forward(x, np.ones(2), np.zeros(2), {}),
    lambda x: cs231n.spatial_batchnorm_forward(x, np.ones(2), np.zeros(2), {"mode": "train"}),
    lambda x: cs231n.spatial_groupnorm_forward(x, np.ones((1, 2, 1, 1)), np.zeros((1, 2, 1, 1)), 1, {}),
], ids=["batchnorm", "layernorm", "spatial_batchnorm", "spatial_groupnorm"])
def test_cs231n_forwards_name_a_bad_x(call, bad):
    with pytest.raises(TypeError, match="^x: expected a numpy.ndarray"):
        call(bad)


@pytest.mark.parametrize("call, pattern", [
    (lambda: cs231n.spatial_groupnorm_forward(np.ones((2, 4)), np.ones((1, 4, 1, 1)), np.zeros((1, 4, 1, 1)), 2, {}),
     r"^x: expected 4 dimensions \(N, C, H, W\), got shape \(2, 4\)"),
    (lambda: cs231n.layernorm_forward(np.ones((2, 3, 4)), np.ones(4), np.zeros(4), {}),
     r"^x: expected 2 dimensions \(N, D\)"),
    (lambda: cs231n.spatial_groupnorm_forward(np.ones((2, 4, 3, 3)), np.ones((1, 3, 1, 1)), np.zeros((1, 4, 1, 1)), 2, {}),
     "^gamma: expected shape"),
    (lambda: cs231n.batchnorm_forward(np.ones((2, 3)), np.ones(3), np.zeros(3), None), "^bn_param: expected a dict"),
    (lambda: cs231n.batchnorm_forward(np.ones((2, 3)), np.ones(3), np.zeros(3), {}), "^bn_param: needs 'mode'"),
    (lambda: cs231n.layernorm_forward(np.ones((2, 3)), np.ones(3), np.zeros(3), None), "^ln_param: expected a dict"),
    (lambda: cs231n.spatial_groupnorm_backward(np.ones((2, 4, 3, 3)), None), "^cache: expected"),
])
def test_cs231n_names_the_bad_argument(call, pattern):
    with pytest.raises((TypeError, ValueError), match=pattern):
        call()


# -- 12. small contracts ----------------------------------------------------------------------

def test_to_drops_every_kept_buffer():
    ln = nc.LayerNorm(5)
    ln.reuse_buffers = True
    x = _x((3, 5))
    y, h = ln.forward_add(x, x)
    dx = ln.backward(np.ones_like(y))
    ln.to("cpu")
    y2, h2 = ln.forward_add(x, x)
    dx2 = ln.backward(np.ones_like(y))
    assert y2 is not y and h2 is not h and dx2 is not dx
    with pytest.raises(RuntimeError, match="before forward"):
        ln.to("cpu").backward(np.ones_like(y))


def test_fold_of_a_half_layer_returns_its_param_dtype():
    bn = nc.BatchNorm2d(3, dtype=np.float16).eval()
    scale, shift = bn.fold()
    assert scale.dtype == shift.dtype == bn.param_dtype == np.float32
    assert "param_dtype" in nc.BatchNorm2d.fold.__doc__


@pytest.mark.slow  # a fresh interpreter or compiler
def test_an_empty_normcore_kernels_variable_is_the_default():
    env = dict(os.environ, NORMCORE_KERNELS="")
    code = "import normcore.kernels as k; print(k.VARIANT == k.available_variants()[0])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(nc.__file__))))
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr


# -- 13. bias=False ---------------------------------------------------------------------------

BIAS_LAYERS = [
    (lambda **k: nc.BatchNorm1d(4, **k), (8, 4)), (lambda **k: nc.BatchNorm2d(4, **k), (6, 4, 3, 3)),
    (lambda **k: nc.BatchNorm3d(4, **k), (4, 4, 2, 2, 2)), (lambda **k: nc.GroupNorm(2, 4, **k), (6, 4, 5)),
    (lambda **k: nc.InstanceNorm1d(4, affine=True, **k), (6, 4, 5)),
    (lambda **k: nc.InstanceNorm2d(4, affine=True, track_running_stats=True, **k), (6, 4, 3, 3)),
    (lambda **k: nc.InstanceNorm3d(4, affine=True, **k), (3, 4, 2, 2, 2)),
    (lambda **k: nc.ChannelNorm(4, 2, **k), (6, 4, 5)), (lambda **k: nc.EstimatedBatchNorm(4, **k), (6, 4, 5)),
    (lambda **k: nc.SyncBatchNorm(4, comm=_OneRank(), **k), (6, 4, 5)),
    (lambda **k: nc.LayerNorm(5, **k), (6, 4, 5)),
]


class _OneRank:
    def allgather(self, obj):
        return [obj]

    def Get_rank(self):
        return 0


@pytest.mark.parametrize("make, shape", BIAS_LAYERS)
def test_bias_false_gives_a_scale_alone(make, shape):
    layer, full = make(bias=False), make()
    assert layer.bias is None and layer.grad_bias is None and layer.weight is not None
    assert "bias" not in layer.state_dict() and "bias" in full.state_dict()
    assert "bias=False" in repr(layer)
    x, dy = _x(shape, offset=1.0), _x(shape)
    y, y_full = layer(x), full(x)
    np.testing.assert_array_equal(y, y_full)  # the bias is zero at construction
    np.testing.assert_array_equal(layer.backward(dy), full.backward(dy))
    np.testing.assert_array_equal(layer.grad_weight, full.grad_weight)
    if getattr(layer, "running_mean", None) is not None:
        layer.eval()
        layer.weight[...] = 2.0
        scale, shift = layer.fold(ndim=len(shape)) if layer._fold_ndim is None else layer.fold()
        np.testing.assert_allclose(x * scale + shift, layer(x), rtol=1e-5, atol=1e-5)


def test_batch_channel_norm_bias_false():
    bcn = nc.BatchChannelNorm(4, 2, bias=False)
    assert bcn.batch_norm.bias is None and bcn.channel_norm.bias is None
    assert not any(k.endswith("bias") for k in bcn.state_dict())
    y = bcn(_x((6, 4, 5)))
    bcn.backward(np.ones_like(y))


# -- 14. instance norm without the batch axis -------------------------------------------------

@pytest.mark.parametrize("cls, shape", [(nc.InstanceNorm1d, (3, 7)), (nc.InstanceNorm2d, (3, 4, 5)),
                                        (nc.InstanceNorm3d, (3, 2, 3, 4))])
@pytest.mark.parametrize("kw", [{}, {"affine": True}, {"affine": True, "track_running_stats": True}])
def test_instance_norm_takes_unbatched_input_as_a_batch_of_one(cls, shape, kw):
    one, batch = cls(3, **kw), cls(3, **kw)
    x, dy = _x(shape, offset=2.0), _x(shape)
    y = one(x)
    assert y.shape == shape
    np.testing.assert_array_equal(y, batch(x[None])[0])
    np.testing.assert_array_equal(one.backward(dy), batch.backward(dy[None])[0])
    assert _same_state(_state(one), _state(batch))
    y, h = one.forward_add(x, x)
    assert h.shape == shape and np.array_equal(h, x + x)
    np.testing.assert_array_equal(y, batch.forward_add(x[None], x[None])[0][0])
    mask = np.ones(shape[1:], bool)
    mask.flat[0] = False
    np.testing.assert_array_equal(one(x, mask=mask), batch(x[None], mask=mask)[0])
    one.eval(), batch.eval()
    np.testing.assert_array_equal(one(x), batch(x[None])[0])
    with pytest.raises(ValueError, match="expects"):
        one(x[0])


def test_only_instance_norm_takes_unbatched_input():
    with pytest.raises(ValueError, match="BatchNorm2d expects 4-D input"):
        nc.BatchNorm2d(3)(_x((3, 4, 5)))
    with pytest.raises(ValueError, match="expected 3 channels .* on axis 0"):
        nc.InstanceNorm2d(3)(_x((4, 4, 5)))


# -- 15. one counts rule, with a mask or without ----------------------------------------------

@pytest.mark.parametrize("mode", ["batch_norm", "instance_norm"])
def test_one_value_per_group_in_training_is_refused_with_or_without_a_mask(mode):
    x = _x((4, 3, 6))
    with pytest.raises(ValueError, match="more than 1 value per statistics group"):
        nc.normalize(x[:1, :, :1] if mode == "batch_norm" else x[:, :, :1], mode)
    mask = np.zeros(x.shape, bool)
    mask[0, :, 0] = True
    if mode == "instance_norm":
        mask[:, :, 0] = True
    with pytest.raises(ValueError, match="counted element"):
        nc.normalize(x, mode, mask=mask)
    with pytest.raises(ValueError, match="counted element"):
        (nc.BatchNorm1d(3, track_running_stats=False) if mode == "batch_norm" else nc.InstanceNorm1d(3))(x, mask=mask)
    nc.normalize(x, mode, mask=mask, training=False)  # eval has no such rule
    nc.normalize(x, "layer_norm", mask=mask)  # nor a mode without running statistics


# -- 16. the dtype error, whatever has been imported --------------------------------------------

@pytest.mark.slow  # a fresh interpreter or compiler
def test_the_dtype_error_lists_bfloat16_before_ml_dtypes_is_imported():
    code = ("import sys, numpy as np, normcore as nc\n"
            "assert 'ml_dtypes' not in sys.modules\n"
            "try:\n    nc.normalize(np.ones((2, 3), np.int32), 'layer_norm')\n"
            "except TypeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(nc.__file__))))
    assert "bfloat16" in out.stdout, out.stdout + out.stderr


def test_layer_docs_state_what_eval_without_running_statistics_does():
    for cls in (nc.BatchNorm1d, nc.BatchNorm2d, nc.BatchNorm3d):
        assert "track_running_stats=False`` has none and uses the batch statistics in eval" in \
            " ".join(cls.__doc__.split())


# -- 17. NaN padding never reaches a gradient -------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode, shape, mshape, sizes", [
    ("batch_norm_channels_last", (4, 9, 5), (4, 9, 1), {}),
    ("batch_norm", (4, 3, 9), (4, 1, 9), {}),
    ("batch_norm", (40, 3), (40, 1), {}),
    ("layer_norm", (4, 9), (4, 9), {}),
    ("group_norm", (3, 4, 10), (3, 1, 10), {"g": 2}),
    ("instance_norm", (3, 4, 10), (3, 1, 10), {}),
    ("rms_norm", (4, 9), (4, 9), {}),
])
@pytest.mark.parametrize("training", [True, False])
def test_nan_padding_never_reaches_a_gradient(mode, shape, mshape, sizes, dtype, training):
    x = _x(shape, dtype, offset=1.0)
    mask = RNG.random(mshape) < 0.7
    mask[..., :3] = True
    free = ~np.broadcast_to(mask, shape)
    padded = np.where(free, np.nan, x).astype(dtype)
    padded[free & (RNG.random(shape) < 0.3)] = np.inf
    shapes = nc.param_shapes(mode, shape, **sizes)
    kw = {"weight": _x(shapes["weight"], dtype), "bias": _x(shapes["weight"], dtype)} if shapes["weight"] else {}
    run = lambda: ({"running_mean": np.zeros(shapes["running_mean"], dtype),  # noqa: E731
                    "running_var": np.ones(shapes["running_mean"], dtype)} if shapes["running_mean"] else {})
    if not training and not shapes["running_mean"]:
        pytest.skip("no running statistics: eval is training's computation")
    dy = _x(shape, dtype)
    for dy_padding in (0.0, np.nan):
        dy2 = np.where(free, dy_padding, dy).astype(dtype)
        with np.errstate(invalid="ignore"):
            y, cache = nc.normalize(padded, mode, mask=mask, training=training, **kw, **run(), **sizes)
        dx, dw, db = nc.backward(dy2, cache)
        y0, cache0 = nc.normalize(x, mode, mask=mask, training=training, **kw, **run(), **sizes)
        dx0, dw0, db0 = nc.backward(dy, cache0)
        assert np.isfinite(y[~free]).all() and (dx[free] == 0).all()
        np.testing.assert_array_equal(dx[~free], dx0[~free])
        for a, b in ((dw, dw0), (db, db0)):
            assert a is None or (np.isfinite(a).all() and np.array_equal(a, b))


def test_masked_batch_norm_gradients_equal_those_of_the_counted_elements_alone():
    x = _x((4, 10, 8), np.float64)
    mask = (np.arange(10)[None, :] < np.array([10, 7, 3, 5])[:, None])[:, :, None]
    padded = np.where(mask, x, np.nan)
    w, b = _x(8, np.float64), _x(8, np.float64)
    dy = _x(x.shape, np.float64)
    y, cache = nc.normalize(padded, "batch_norm_channels_last", weight=w, bias=b, mask=mask)
    dx, dw, db = nc.backward(dy, cache)
    real = mask[..., 0]
    y1, c1 = nc.normalize(x[real], "batch_norm_channels_last", weight=w, bias=b)
    dx1, dw1, db1 = nc.backward(dy[real], c1)
    np.testing.assert_allclose(y[real], y1, atol=1e-12)
    np.testing.assert_allclose(dx[real], dx1, atol=1e-12)
    np.testing.assert_allclose(dw, dw1, atol=1e-12)
    np.testing.assert_allclose(db, db1, atol=1e-12)
    assert (dx[~real] == 0).all()


def test_nan_padding_through_the_emulated_cuda_kernels(emulated_gpu):
    x = _x((4, 9, 5), np.float32)
    mask = RNG.random((4, 9, 1)) < 0.6
    mask[:, :2] = True
    padded = np.where(mask, x, np.nan).astype(np.float32)
    y, cache = nc.normalize(padded, "batch_norm_channels_last", weight=np.ones(5, np.float32),
                            bias=np.zeros(5, np.float32), mask=mask)
    dx, dw, db = nc.backward(np.where(np.broadcast_to(mask, x.shape), 1.0, np.nan).astype(np.float32), cache)
    assert np.isfinite(dw).all() and np.isfinite(db).all() and np.isfinite(dx).all()
    assert (dx[~np.broadcast_to(mask, x.shape)] == 0).all()


# -- 18. a backward consumes its forward ------------------------------------------------------

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


# -- 19. folding needs eval mode ----------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: nc.BatchNorm2d(3), lambda: nc.EstimatedBatchNorm(3),
                                  lambda: nc.InstanceNorm2d(3, track_running_stats=True),
                                  lambda: nc.SyncBatchNorm(3, comm=_OneRank())])
def test_folding_a_training_layer_is_refused(make):
    layer = make()
    with pytest.raises(ValueError, match=r"training mode.*call \.eval\(\) first"):
        layer.fold(ndim=4)
    with pytest.raises(ValueError, match=r"call \.eval\(\) first"):
        nc.fold_into(np.ones((3, 2, 3, 3), np.float32), None, layer, axis=0)
    layer.eval().fold(ndim=4)
    nc.fold_into(np.ones((3, 2, 3, 3), np.float32), None, layer, axis=0)


# -- 20. errors name the public class --------------------------------------------------------

@pytest.mark.parametrize("cls", [getattr(nc, n) for n in nc.layers.__all__])
def test_a_misspelled_keyword_names_the_public_class(cls):
    with pytest.raises(TypeError, match=rf"^{cls.__name__}\(\): got an unexpected keyword argument 'epss'"):
        cls(4, 2, epss=1e-3) if cls in (nc.GroupNorm, nc.ChannelNorm, nc.BatchChannelNorm) else cls(4, epss=1e-3)
    with pytest.raises(TypeError, match=rf"^{cls.__name__}\(\): missing a required argument"):
        cls()
