"""add_normalize, the forms' residual=, layers' forward_add and backward(dh=): h is NumPy's
x + residual bitwise, y and every gradient are normalize's of h bitwise (dx + dh for the
input's gradient), through the fused one-visit kernels and the separate add alike; bad
residuals and dh raise before anything is written. (The Hypothesis property
prop_add_normalize runs on every mode in test_properties and on the emulated GPU.)"""
import numpy as np
import pytest

import ml_dtypes
import normcore as nc
from layer_cases import _x, LAYERS, IDS, _state, _same_state
from normcore.testing import run_ranks

BF16 = np.dtype(ml_dtypes.bfloat16)
RNG = np.random.default_rng(14)


def _bits(a):
    return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")


def _same(a, b):
    return a is None and b is None or (a.dtype == b.dtype and np.array_equal(_bits(a), _bits(b)))


CASES = [  # (mode, shape, sizes): fused (contiguous groups) and separate-add layouts
    ("layer_norm", (64, 96), {}),
    ("rms_norm", (8, 5, 33), {}),
    ("group_norm", (4, 8, 5, 5), {"g": 2}),
    ("instance_norm", (3, 4, 17), {}),
    ("channel_norm", (2, 6, 3, 3), {"g": 3}),
    ("batch_norm", (16, 4, 7), {}),
    ("batch_norm_channels_last", (30, 6), {}),
    ("batch_norm_per_activation", (20, 9), {}),
    ("weight_standardize", (6, 3, 2, 2), {}),
    ("add_norm_user_heads", (4, 6, 8), {}),
    ("layer_norm", (2048, 768), {}),  # large: both threads, the blocked add
]


@pytest.fixture(autouse=True, scope="module")
def _user_mode():
    if "add_norm_user_heads" not in nc.modes():
        nc.register_mode("add_norm_user_heads", "b t (h d) -> b h", params="(h d)", h=2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, BF16], ids=str)
@pytest.mark.parametrize("mode, shape, sizes", CASES, ids=lambda c: str(c))
def test_add_normalize_is_normalize_of_x_plus_residual_bitwise(mode, shape, sizes, dtype):
    x, r, dy, dh = (RNG.standard_normal(shape).astype(dtype) for _ in range(4))
    m = nc.get_mode(mode)
    kw = dict(sizes)
    if m.params is not None:
        p = nc.param_shapes(mode, shape, **sizes)["weight"]
        kw["weight"] = RNG.standard_normal(p).astype(np.float32 if dtype in (np.float16, BF16) else dtype)
        if m.center:
            kw["bias"] = RNG.standard_normal(p).astype(kw["weight"].dtype)
    y, h, cache = nc.add_normalize(x, r, mode, **kw)
    assert _same(h, x + r)
    y0, cache0 = nc.normalize(x + r, mode, **kw)
    assert _same(y, y0)
    got, want = nc.backward(dy, cache, dh=dh), nc.backward(dy, cache0)
    assert _same(got[0], want[0] + dh)
    for a, b in zip(got[1:], want[1:]):
        assert _same(a, b)


def test_strided_inputs_and_running_statistics():
    # a transposed residual, a strided x, training batch norm with running statistics
    x = RNG.standard_normal((8, 3, 6)).astype(np.float32)
    r = RNG.standard_normal((6, 3, 8)).astype(np.float32).transpose(2, 1, 0)
    xs = RNG.standard_normal((8, 3, 12)).astype(np.float32)[:, :, ::2]
    for xx in (x, xs):
        rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
        rm0, rv0 = rm.copy(), rv.copy()
        y, h, c = nc.add_normalize(xx, r, "batch_norm", running_mean=rm, running_var=rv)
        y0, c0 = nc.normalize(xx + r, "batch_norm", running_mean=rm0, running_var=rv0)
        assert _same(h, xx + r) and _same(y, y0) and _same(rm, rm0) and _same(rv, rv0)
        assert h.flags.c_contiguous
        dh = RNG.standard_normal(x.shape).astype(np.float32)[:, ::-1]
        assert _same(nc.backward(np.ones_like(y), c, dh=dh)[0], nc.backward(np.ones_like(y), c0)[0] + dh)


def test_forms_take_a_residual():
    x, r = (RNG.standard_normal((4, 6, 5, 5)).astype(np.float32) for _ in range(2))
    for form, args, kw in ((nc.batch_norm, (), {"training": True}), (nc.layer_norm, ((5, 5),), {}),
                           (nc.rms_norm, (5,), {}), (nc.group_norm, (3,), {}), (nc.instance_norm, (), {})):
        y, h, cache = form(x, *args, residual=r, **kw)
        y0, cache0 = form(x + r, *args, **kw)
        assert _same(h, x + r) and _same(y, y0), form.__name__
        dy = np.ones_like(y)
        assert _same(nc.backward(dy, cache, dh=x)[0], nc.backward(dy, cache0)[0] + x), form.__name__


@pytest.mark.parametrize("make", [lambda: nc.BatchNorm2d(4), lambda: nc.LayerNorm((5, 5)), lambda: nc.RMSNorm(5),
                                  lambda: nc.GroupNorm(2, 4), lambda: nc.InstanceNorm2d(4, affine=True),
                                  lambda: nc.ChannelNorm(4, 2), lambda: nc.BatchChannelNorm(4, 2)])
def test_layers_forward_add_and_backward_dh(make):
    x, r, dy, dh = (RNG.standard_normal((6, 4, 5, 5)).astype(np.float32) for _ in range(4))
    fused, plain = make(), make()
    for reuse in (False, True):
        fused.reuse_buffers = plain.reuse_buffers = reuse
        y, h = fused.forward_add(x, r)
        y0 = plain(x + r)
        assert _same(h, x + r) and _same(y, y0)
        assert _same(fused.backward(dy, dh=dh), plain.backward(dy) + dh)
    assert all(_same(a, b) for a, b in zip(fused.state_dict().values(), plain.state_dict().values()))


def test_bad_residual_and_dh_raise_before_anything_is_written():
    x = RNG.standard_normal((8, 3, 4)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    for bad, err, words in ((x[:4], ValueError, "residual: expected x's shape"),
                            (x.astype(np.float64), TypeError, "residual: dtype float64"),
                            (x.tolist(), TypeError, "residual: expected a numpy.ndarray"),
                            (None, TypeError, "residual: expected an array")):
        with pytest.raises(err, match=words):
            nc.add_normalize(x, bad, "batch_norm", running_mean=rm, running_var=rv)
        assert not rm.any() and (rv == 1).all()  # no half-updated running statistic
    with pytest.raises(ValueError, match="out: must not .*residual"):
        r = x.copy()
        nc.add_normalize(x, r, "layer_norm", out=r)
    with pytest.raises(ValueError, match="residual: expected x's shape"):
        nc.layer_norm(x, (3, 4), residual=x[:2])
    ln = nc.LayerNorm(4)
    with pytest.raises(ValueError, match="residual"):
        ln.forward_add(x, x[:, :1])
    y, h, cache = nc.add_normalize(x, x, "layer_norm")
    for bad, err, words in ((x[:2], ValueError, "dh: expected x's shape"),
                            (x.astype(np.float16), TypeError, "dh: dtype float16"),
                            ("dh", TypeError, "dh: expected a numpy.ndarray")):
        with pytest.raises(err, match=words):
            nc.backward(np.ones_like(y), cache, dh=bad)
    dh = np.ones_like(y)
    with pytest.raises(ValueError, match="out: must not .*dh"):
        nc.backward(np.ones_like(y), cache, dh=dh, out=dh)
    bcn = nc.BatchChannelNorm(3, 3)
    bcn(x)
    before = bcn.batch_norm.grad_weight.copy()
    with pytest.raises(ValueError, match="dh"):
        bcn.backward(np.ones_like(x), dh=x[:1])
    assert _same(bcn.batch_norm.grad_weight, before)


@pytest.mark.parametrize("mode, shape, sizes", [("layer_norm", (16, 32), {}), ("batch_norm", (16, 4, 7), {}),
                                                ("group_norm", (4, 8, 5), {"g": 2})])
def test_h_out_receives_h(mode, shape, sizes):
    x, r = (RNG.standard_normal(shape).astype(np.float32) for _ in range(2))
    h_out, y_out = np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float32)
    y, h, cache = nc.add_normalize(x, r, mode, out=y_out, h_out=h_out, **sizes)
    assert h is h_out and y is y_out and _same(h, x + r)
    assert _same(y, nc.normalize(x + r, mode, **sizes)[0])
    with pytest.raises(ValueError, match="h_out: only add_normalize"):
        nc.functional.forward(x, nc.backend.CPU, mode, h_out=h_out, sizes=sizes)
    for bad, err, words in ((h_out.astype(np.float64), TypeError, "h_out: dtype float64"),
                            (h_out[:1], ValueError, "h_out: expected shape"),
                            (x, ValueError, "h_out: must not .*x"), (r, ValueError, "h_out: must not .*residual"),
                            (y_out, ValueError, "must not .*")):
        with pytest.raises(err, match=words):
            nc.add_normalize(x, r, mode, out=y_out, h_out=bad, **sizes)
    ln = nc.LayerNorm(shape[-1]) if mode == "layer_norm" else None
    if ln is not None:
        ln.reuse_buffers = True
        _, h1 = ln.forward_add(x, r)
        h1_id = id(h1)
        _, h2 = ln.forward_add(r, x)
        assert id(h2) == h1_id and _same(h2, r + x)
        _, h3 = ln.forward_add(x, h2)  # the kept buffer is the residual: a new one
        assert h3 is not h2 and _same(h3, x + (r + x))


def test_synchronized_add_normalize_equals_the_whole_batch():
    # comm=: h is per rank (elementwise), the statistics are the whole batch's; a bad
    # residual on one rank reaches the other as an error instead of a hang
    from normcore.testing import assert_close, run_ranks
    x, r, dy, dh = (RNG.standard_normal((10, 3, 4)).astype(np.float64) for _ in range(4))
    slices = [slice(0, 4), slice(4, 10)]

    def rank(comm):
        s = slices[comm.Get_rank()]
        y, h, cache = nc.add_normalize(x[s], r[s], "batch_norm", comm=comm)
        return y, h, nc.backward(dy[s], cache, dh=dh[s])[0]

    got = run_ranks(2, rank)
    y, h, cache = nc.add_normalize(x, r, "batch_norm")
    dx = nc.backward(dy, cache, dh=dh)[0]
    assert_close(np.concatenate([g[0] for g in got]), y, np.dtype(np.float64), "y")
    assert _same(np.concatenate([g[1] for g in got]), h)
    assert_close(np.concatenate([g[2] for g in got]), dx, np.dtype(np.float64), "dh_total")

    def bad(comm):
        s = slices[comm.Get_rank()]
        res = r[s] if comm.Get_rank() == 0 else r[s][:1]
        return nc.add_normalize(x[s], res, "batch_norm", comm=comm)

    out = run_ranks(2, bad, timeout=10)
    assert all(isinstance(o, Exception) for o in out)
    assert isinstance(out[1], ValueError) and "residual" in str(out[1])


# -- forward_add with a missing residual ---------------------------------------------------

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
