"""The route as programs (normcore.program) and the compiled warm call (normcore._steady):
bitwise the same results as the route executors step by step, for every built-in mode and
layer kind; a warm call that differs from its memo in anything takes the Python path and
its errors; an interrupted compiled forward leaves the layer as it was."""
import copy

import numpy as np
import pytest

import normcore
from normcore import program
from normcore.backend import CPU
from layer_cases import LAYERS, IDS, _grads, _same_state, _state
from test_route import CASES


@pytest.fixture
def step_by_step(monkeypatch):
    """Run every call on the route executors (no programs)."""
    monkeypatch.setattr(program, "ENABLED", False)


def _same(a, b):
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


VARIANTS = ["train", "train, no parameters", "eval", "estimate", "dh", "out", "residual", "residual, h_out"]


def _applies(mode, variant):
    m = normcore.get_mode(mode)
    if variant in ("eval", "estimate") and m.running_stats is None:
        return False
    return not (variant == "train, no parameters" and m.params is None)


def _fused(cache):
    """Whether the call's statistics pass added its residual (the programs' residual)."""
    return cache.route.residual == "fused"


def _call(mode, shape, sizes, variant, dtype, seed=0):
    """(y, cache, dx, dw, db, running stats) of one call and its backward."""
    m = normcore.get_mode(mode)
    rng = np.random.default_rng(seed)
    x = (3.0 + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    pdtype = np.float32 if dtype == np.float16 else dtype
    kw = dict(sizes)
    pshape = normcore.param_shapes(mode, shape, **sizes)
    if m.params is not None and variant != "train, no parameters":
        kw["weight"] = (1 + rng.standard_normal(pshape["weight"])).astype(pdtype)
        kw["bias"] = rng.standard_normal(pshape["weight"]).astype(pdtype)
    running = ()
    if m.running_stats is not None:
        running = (rng.standard_normal(pshape["running_mean"]).astype(pdtype),
                   (1 + rng.random(pshape["running_mean"])).astype(pdtype))
        kw["running_mean"], kw["running_var"] = running
    kw["training"] = variant != "eval"
    kw["estimate"] = variant == "estimate"
    out = np.empty(shape, dtype) if variant in ("out", "residual, h_out") else None
    h = None
    if variant.startswith("residual"):
        h_out = np.empty(shape, dtype) if variant == "residual, h_out" else None
        y, h, cache = normcore.add_normalize(x, rng.standard_normal(shape).astype(dtype), mode, out=out,
                                             h_out=h_out, **kw)
        assert h_out is None or h is h_out
    else:
        y, cache = normcore.normalize(x, mode, out=out, **kw)
    dh = rng.standard_normal(shape).astype(dtype) if variant in ("dh", "residual") else None
    dx_out = np.empty(shape, dtype) if variant == "out" else None
    dx, dw, db = normcore.backward(dy, cache, dh=dh, out=dx_out)
    assert out is None or y is out
    assert dx_out is None or dx is dx_out
    return y, cache, dx, dw, db, running + (() if h is None else (h,))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16], ids=["f32", "f64", "f16"])
@pytest.mark.parametrize("mode, shape, sizes", CASES, ids=[f"{m}{s}" for m, s, _ in CASES])
def test_programs_give_the_route_executors_results_bitwise(mode, shape, sizes, dtype, monkeypatch):
    for variant in VARIANTS:
        if not _applies(mode, variant):
            continue
        got = _call(mode, shape, sizes, variant, dtype)
        # every one of these is a program's (a residual: where the statistics pass adds it)
        assert (got[1].programs is not None) == (not variant.startswith("residual") or _fused(got[1])), \
            (mode, variant)
        monkeypatch.setattr(program, "ENABLED", False)
        want = _call(mode, shape, sizes, variant, dtype)
        monkeypatch.setattr(program, "ENABLED", True)
        assert want[1].programs is None
        for name, a, b in zip(("y", "", "dx", "dweight", "dbias"), got, want):
            if name:
                assert _same(a, b), (mode, variant, name)
        assert len(got[5]) == len(want[5])
        for a, b in zip(got[5], want[5]):
            assert _same(a, b), (mode, variant, "running statistics, h")
        for name in ("mean", "rstd", "x3"):
            assert _same(getattr(got[1], name), getattr(want[1], name)), (mode, variant, name)
        assert got[1].count == want[1].count and got[1].shape == want[1].shape


def _steps(layer, xs, dys, eval_xs=()):
    """Outputs and gradients of training steps, then eval forwards, with the layer's state."""
    outs = []
    for x, dy in zip(xs, dys):
        outs.append(layer(x))
        outs.append(layer.backward(dy))
        outs.extend(g.copy() for g in _grads(layer))
    layer.eval()
    outs.extend(layer(x) for x in eval_xs)
    layer.train()
    return outs, _state(layer)


# every layer kind, and the settings that change what a warm call computes
SETTINGS = [(name, make, shape) for name, make, shape in LAYERS] + [
    ("BatchNorm1d-cumulative", lambda: normcore.BatchNorm1d(4, momentum=None), (8, 4)),
    ("BatchNorm1d-decay", lambda: normcore.BatchNorm1d(4, decay=0.9), (8, 4)),
    ("BatchNorm1d-biased", lambda: normcore.BatchNorm1d(4, unbiased=False), (8, 4)),
    ("BatchNorm1d-no-affine", lambda: normcore.BatchNorm1d(4, affine=False), (8, 4)),
    ("BatchNorm1d-no-bias", lambda: normcore.BatchNorm1d(4, bias=False), (8, 4)),
    ("BatchNorm1d-f64", lambda: normcore.BatchNorm1d(4, dtype=np.float64), (8, 4)),
    ("BatchNorm2d-f16", lambda: normcore.BatchNorm2d(4, dtype=np.float16), (6, 4, 3, 3)),
    ("BatchNorm2d-untracked", lambda: normcore.BatchNorm2d(4, track_running_stats=False), (6, 4, 3, 3)),
    ("InstanceNorm1d-unbatched", lambda: normcore.InstanceNorm1d(4, affine=True, track_running_stats=True), (4, 9)),
    ("RMSNorm-default-eps", lambda: normcore.RMSNorm((2, 3)), (5, 2, 3)),
    ("LayerNorm-f64", lambda: normcore.LayerNorm(6, dtype=np.float64), (3, 4, 6)),
]


@pytest.mark.parametrize("name, make, shape", SETTINGS, ids=[s[0] for s in SETTINGS])
def test_a_warm_layer_call_gives_the_python_paths_results_bitwise(name, make, shape, monkeypatch):
    rng = np.random.default_rng(5)
    probe = make()
    dtype = getattr(probe, "dtype", np.float32)
    xs = [(2.0 + rng.standard_normal(shape)).astype(dtype) for _ in range(4)]
    dys = [rng.standard_normal(shape).astype(dtype) for _ in range(4)]
    fast, fast_state = _steps(make(), xs, dys, xs[:2])
    monkeypatch.setattr(program, "ENABLED", False)
    slow, slow_state = _steps(make(), xs, dys, xs[:2])
    assert len(fast) == len(slow)
    for i, (a, b) in enumerate(zip(fast, slow)):
        assert _same(a, b), (name, i)
    assert _same_state(fast_state, slow_state)


ADD_LAYERS = [("LayerNorm", lambda: normcore.LayerNorm((3, 5)), (6, 3, 5)),
              ("RMSNorm", lambda: normcore.RMSNorm(6), (5, 6)),
              ("GroupNorm", lambda: normcore.GroupNorm(2, 4), (6, 4, 7)),
              ("InstanceNorm2d", lambda: normcore.InstanceNorm2d(4, affine=True, track_running_stats=True),
               (6, 4, 5, 5)),
              ("BatchNorm1d", lambda: normcore.BatchNorm1d(4), (8, 4))]  # (the last: h made apart)


@pytest.mark.parametrize("name, make, shape", ADD_LAYERS, ids=[c[0] for c in ADD_LAYERS])
def test_a_warm_forward_add_gives_the_python_paths_results_bitwise(name, make, shape, monkeypatch):
    rng = np.random.default_rng(8)
    xs = [(1.0 + rng.standard_normal(shape)).astype(np.float32) for _ in range(4)]
    rs = [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]
    dys = [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]

    def steps(layer):
        outs = []
        for x, r, dy in zip(xs, rs, dys):
            y, h = layer.forward_add(x, r)
            outs += [y, h, layer.backward(dy, dh=dy), layer(x), layer.backward(dy)]
            outs.extend(g.copy() for g in _grads(layer))
        return outs, _state(layer)
    fast, fast_state = steps(make())
    monkeypatch.setattr(program, "ENABLED", False)
    slow, slow_state = steps(make())
    for i, (a, b) in enumerate(zip(fast, slow)):
        assert _same(a, b), (name, i)
    assert _same_state(fast_state, slow_state)


def test_a_warm_forward_add_refuses_a_bad_residual():
    x = np.random.default_rng(9).standard_normal((4, 6)).astype(np.float32)
    ln = normcore.LayerNorm(6)
    ln.forward_add(x, x), ln.forward_add(x, x)
    assert "_steady_add" in ln.__dict__
    with pytest.raises(TypeError, match="residual"):
        ln.forward_add(x, None)
    with pytest.raises(ValueError, match="residual"):
        ln.forward_add(x, x[:, :3])
    with pytest.raises(TypeError, match="residual"):
        ln.forward_add(x, x.astype(np.float64))


def _warm(layer, x):
    layer(x)
    layer.backward(np.ones_like(x))
    layer(x)
    assert "_steady" in layer.__dict__  # the next call is a warm one
    return layer


def test_the_warm_path_covers_the_common_layers():
    x = np.ones((8, 4), np.float32) + np.arange(4, dtype=np.float32)
    for layer in (normcore.BatchNorm1d(4), normcore.LayerNorm(4), normcore.RMSNorm(4),
                  normcore.BatchNorm1d(4).eval()):
        _warm(layer, x)


def test_a_warm_layer_still_refuses_what_its_first_call_would():
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    bn = _warm(normcore.BatchNorm1d(4), x)
    with pytest.raises(TypeError, match="x: dtype float64"):
        bn(x.astype(np.float64))
    with pytest.raises(ValueError, match="x: expected 4 channels"):
        bn(x[:, :3])
    bn.eps = -1.0
    with pytest.raises(ValueError, match="eps"):
        bn(x)
    bn.eps = 1e-5
    good = bn.weight
    bn.weight = good.astype(np.float64)
    with pytest.raises(TypeError, match="weight"):
        bn(x)
    bn.weight = good
    bn.momentum = 2.0
    with pytest.raises(ValueError, match="momentum"):
        bn(x)
    bn.momentum = 0.1
    bn.running_mean.flags.writeable = False
    with pytest.raises(ValueError, match="running_mean: must be writeable"):
        bn(x)
    bn.running_mean.flags.writeable = True
    with pytest.raises(ValueError, match="share memory|overlap"):
        bn.running_var = bn.running_mean[:]  # a view of the other: both written
        bn(x)


def test_a_warm_layer_sees_arrays_and_settings_replaced_between_calls(monkeypatch):
    x = np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32)
    a = _warm(normcore.BatchNorm1d(4), x)
    monkeypatch.setattr(program, "ENABLED", False)
    b = normcore.BatchNorm1d(4)  # the same history, on the Python path
    b(x), b.backward(np.ones_like(x)), b(x)
    monkeypatch.setattr(program, "ENABLED", True)
    for layer in (a, b):
        layer.weight = np.full(4, 2.0, np.float32)
        layer.eps = 1e-3
        layer.momentum = 0.5
    ya = a(x)
    monkeypatch.setattr(program, "ENABLED", False)
    yb = b(x)
    assert _same(ya, yb) and _same_state(_state(a), _state(b))


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix
def test_a_non_contiguous_or_subclassed_input_takes_the_python_path():
    x = np.random.default_rng(2).standard_normal((8, 8)).astype(np.float32)
    bn = _warm(normcore.BatchNorm1d(4), x[:, :4].copy())
    strided = x[:, ::2]
    want = normcore.BatchNorm1d(4)
    want(x[:, :4].copy()), want.backward(np.ones((8, 4), np.float32)), want(x[:, :4].copy())
    assert _same(bn(strided), want(strided))
    assert _same(bn(np.asmatrix(x[:, 4:].copy())), want(np.asmatrix(x[:, 4:].copy())))


def test_an_interrupted_warm_forward_leaves_the_layer_as_before(monkeypatch):
    x = np.random.default_rng(3).standard_normal((8, 4)).astype(np.float32)
    bn = _warm(normcore.BatchNorm1d(4), x)
    before = _state(bn)

    class Failing:
        def __init__(self, K):
            self._K = K

        def __getattr__(self, name):
            f = getattr(self._K, name)
            if name != "update_running":
                return f

            def update_then_fail(**kwargs):
                f(**kwargs)  # the running statistics are written, then the call is interrupted
                raise KeyboardInterrupt
            return update_then_fail

    monkeypatch.setattr(CPU, "K", Failing(CPU.K))
    with pytest.raises(KeyboardInterrupt):
        bn(x)
    assert _same_state(before, _state(bn))
    monkeypatch.undo()
    bn(x)
    assert bn.num_batches_tracked == before["num_batches_tracked"] + 1


def test_a_warm_backward_checks_dy_and_the_gradient_arrays():
    x = np.random.default_rng(4).standard_normal((8, 4)).astype(np.float32)
    bn = _warm(normcore.BatchNorm1d(4), x)
    with pytest.raises(TypeError, match="dy"):
        bn.backward(np.ones((8, 4)))  # float64
    with pytest.raises(ValueError, match="dy: expected shape"):
        bn.backward(np.ones((8, 3), np.float32))
    bn.grad_weight = np.zeros((2, 2), np.float32)  # a shape += cannot take
    with pytest.raises(ValueError):
        bn.backward(np.ones((8, 4), np.float32))
    bn.grad_weight = np.zeros(4, np.float32)
    dx = bn.backward(np.ones((8, 4), np.float32), retain_graph=True)
    assert dx.shape == (8, 4)
    bn.backward(np.ones((8, 4), np.float32))
    with pytest.raises(RuntimeError, match="already consumed"):
        bn.backward(np.ones((8, 4), np.float32))


def test_a_copy_of_a_warm_layer_runs_its_backward():
    x = np.random.default_rng(6).standard_normal((8, 4)).astype(np.float32)
    bn = _warm(normcore.BatchNorm1d(4), x)
    twin = copy.deepcopy(bn)
    assert "_steady" not in twin.__dict__
    assert _same(twin.backward(np.ones_like(x)), bn.backward(np.ones_like(x)))
    assert _same(twin.grad_weight, bn.grad_weight)


@pytest.mark.parametrize("op", ["sum0", "take"])
def test_the_interpreters_array_steps_are_numpys(op):
    """The compiled sum over the partials' axis and the gather are NumPy's own, signed zeros
    and all (a C loop of their own could differ)."""
    from normcore._steady import FIXED_REGISTERS, Program, Step
    rng = np.random.default_rng(7)
    a = rng.standard_normal((37, 5))
    a[:, 2] = -0.0
    index = rng.integers(0, 37, 50)
    r = FIXED_REGISTERS
    step = Step(op, r + 1, r, index=index if op == "take" else None)
    regs = [None] * (r + 2)
    regs[r] = a
    Program(CPU, [step], r + 2)(regs)
    want = a.sum(axis=0) if op == "sum0" else a[index]
    assert np.array_equal(regs[r + 1], want) and np.array_equal(np.signbit(regs[r + 1]), np.signbit(want))
