"""Masked statistics (mask=): equal to the unmasked statistics of the compacted data, for
the functional API, the forms, the layers, synchronized ranks and every dtype; the rules
for groups with too few counted elements; bad masks. The float64 reference, central
differences and the "masked-out elements never count" property run for every mode in the
property suite (normcore.testing.check_mode)."""
import numpy as np
import pytest

import normcore as nc
from layer_cases import _x
from normcore.layout import canonical
from normcore.testing import TOLERANCE, assert_close, run_ranks

ml_dtypes = pytest.importorskip("ml_dtypes")
RNG = np.random.default_rng(21)
DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]


def _lengths_mask(lengths, T):
    """(B, T, 1) True on the first lengths[b] steps of sequence b."""
    return (np.arange(T)[None, :] < np.asarray(lengths)[:, None])[:, :, None]


def _close(a, b, dtype, what, scale=0.0):
    assert_close(np.asarray(a, np.float64), np.asarray(b, np.float64), np.dtype(dtype), what, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape", [(5, 9, 7), (64, 40, 33)])  # small; column blocks and tiles
def test_batch_norm_over_padded_sequences_is_batch_norm_of_the_real_steps(dtype, shape):
    B, T, C = shape
    x = (1 + RNG.standard_normal(shape)).astype(dtype)
    x[:, -2:] = 1e3  # padding far off the data: any leak shows
    lengths = RNG.integers(2, T - 1, B)
    mask = _lengths_mask(lengths, T)
    pdtype = np.float32 if dtype.itemsize == 2 else dtype
    w, b = (RNG.standard_normal(C).astype(pdtype) for _ in range(2))
    run = {"running_mean": np.zeros(C, pdtype), "running_var": np.ones(C, pdtype)}
    run0 = {k: v.copy() for k, v in run.items()}
    y, cache = nc.normalize(x, "batch_norm_channels_last", weight=w, bias=b, mask=mask, **run)
    real = mask[..., 0]
    y0, cache0 = nc.normalize(x[real], "batch_norm_channels_last", weight=w, bias=b, **run0)
    _close(y[real], y0, dtype, "y on the real steps")
    for k in run:
        _close(run[k], run0[k], pdtype, k)
    dy = RNG.standard_normal(shape).astype(dtype)
    dy[~real] = 0  # the loss ignores the padding
    dx, dw, db = nc.backward(dy, cache)
    dx0, dw0, db0 = nc.backward(dy[real], cache0)
    scale = float(np.abs(dy.astype(np.float64)).max() * np.abs(w.astype(np.float64)).max() * cache0.rstd.max())
    _close(dx[real], dx0, dtype, "dx on the real steps", scale=scale)
    _close(dw, dw0, pdtype, "dweight", scale=float(np.abs(dw0.astype(np.float64)).max()))
    _close(db, db0, pdtype, "dbias")
    # the padding receives only the direct term rstd * w * dy (here 0)
    assert not np.asarray(dx[~real], np.float64).any()


@pytest.mark.parametrize("mode, make", [
    ("instance_norm", lambda x, L: nc.normalize(x[:, :, :L], "instance_norm")),
    ("group_norm", lambda x, L: nc.normalize(x[:, :, :L], "group_norm", g=2)),
    ("layer_norm_channels", None),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_per_sample_statistics_over_variable_lengths(mode, make, dtype):
    # (B, C, T) audio-like input with a (B, 1, T) lengths mask: each sample's statistics are
    # those of its own cropped sample
    B, C, T = 4, 6, 50
    x = (3 + RNG.standard_normal((B, C, T))).astype(dtype)
    lengths = [50, 31, 7, 2]
    mask = (np.arange(T) < np.array(lengths)[:, None])[:, None, :]
    if make is None:  # a user mode: layer norm over (C, T) of each sample
        if "user_ct_norm" not in nc.modes():
            nc.register_mode("user_ct_norm", "n c t -> n")
        mode, make = "user_ct_norm", lambda x, L: nc.normalize(x[:, :, :L], "user_ct_norm")
    kw = {"g": 2} if mode == "group_norm" else {}
    y, cache = nc.normalize(x, mode, mask=mask, **kw)
    dy = RNG.standard_normal(x.shape).astype(dtype) * mask
    dx, _, _ = nc.backward(dy, cache)
    for i, L in enumerate(lengths):
        yi, ci = make(x[i:i + 1], L)
        _close(y[i:i + 1, :, :L], yi, dtype, f"y of sample {i}")
        dxi, _, _ = nc.backward(np.ascontiguousarray(dy[i:i + 1, :, :L]), ci)
        _close(dx[i:i + 1, :, :L], dxi, dtype, f"dx of sample {i}", scale=float(np.abs(dxi).max()))


def test_a_group_without_counted_elements_outputs_its_bias_and_passes_no_gradient():
    x = RNG.standard_normal((3, 4, 5)).astype(np.float32)
    mask = np.ones((3, 1, 5), bool)
    mask[1] = False  # sample 1 has nothing counted
    w, b = RNG.standard_normal(4).astype(np.float32), RNG.standard_normal(4).astype(np.float32)
    for mode, kw in (("instance_norm", {}), ("group_norm", {"g": 2})):
        y, cache = nc.normalize(x, mode, weight=w, bias=b, mask=mask, **kw)
        np.testing.assert_array_equal(y[1], np.broadcast_to(b[:, None], (4, 5)))
        dx, dw, db = nc.backward(np.ones_like(y), cache)
        assert not dx[1].any() and np.isfinite(dx).all()
        assert np.isfinite(dw).all() and np.isfinite(db).all()


def test_training_with_running_statistics_needs_two_counted_per_group():
    x = RNG.standard_normal((4, 3, 6)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    mask = np.zeros(x.shape, bool)
    mask[0, :, 0] = True  # one counted element per channel
    for call in (lambda: nc.normalize(x, "batch_norm", running_mean=rm, running_var=rv, mask=mask),
                 lambda: nc.BatchNorm1d(3)(x, mask=mask)):
        with pytest.raises(ValueError, match="mask: group 0 has 1 counted element"):
            call()
        assert not rm.any() and (rv == 1).all()  # untouched
    mask[1, :, 0] = True  # two: fine, and unbiased by 2 / (2 - 1)
    nc.normalize(x, "batch_norm", running_mean=rm, running_var=rv, momentum=1.0, mask=mask)
    pair = x[:2, :, 0].astype(np.float64)
    np.testing.assert_allclose(rv, pair.var(axis=0, ddof=1), rtol=1e-6)
    # without running statistics the rule of an unmasked call holds: one value per group
    # is refused in training (as nc.normalize(x[:1, :, :1], "batch_norm") is), none is an
    # empty group, and eval takes either
    one = mask[:1].repeat(4, 0) & (np.arange(4) == 0)[:, None, None]
    with pytest.raises(ValueError, match="mask: group 0 has 1 counted element"):
        nc.normalize(x, "batch_norm", mask=one)
    with pytest.raises(ValueError, match="more than 1 value per statistics group"):
        nc.normalize(x[:1, :, :1], "batch_norm")
    y, _ = nc.normalize(x, "batch_norm", mask=one, training=False)
    assert np.isfinite(y).all()
    y, _ = nc.normalize(x, "batch_norm", mask=np.zeros_like(one))
    assert (y == 0).all()


def test_eval_with_running_statistics_ignores_the_mask():
    x = RNG.standard_normal((5, 3, 4)).astype(np.float32)
    run = {"running_mean": RNG.standard_normal(3).astype(np.float32), "running_var": np.ones(3, np.float32)}
    mask = RNG.random((5, 1, 4)) < 0.5
    y, cache = nc.normalize(x, "batch_norm", training=False, mask=mask, **run)
    y0, cache0 = nc.normalize(x, "batch_norm", training=False, **run)
    np.testing.assert_array_equal(y, y0)
    # ... for y; backward still leaves the masked-out positions out (they are not data)
    counted = np.broadcast_to(mask, x.shape)
    dy = np.ones_like(y)
    np.testing.assert_array_equal(nc.backward(dy, cache)[0], np.where(counted, nc.backward(dy, cache0)[0], 0))


def test_estimated_batch_norm_updates_from_the_masked_statistics():
    x = (2 + RNG.standard_normal((6, 5, 3))).astype(np.float64)
    mask = _lengths_mask([5, 4, 2, 5, 3, 2], 5)
    rm, rv = np.zeros(3), np.ones(3)
    nc.normalize(x, "batch_norm_channels_last", running_mean=rm, running_var=rv, momentum=1.0, estimate=True,
                 mask=mask)
    real = x[mask[..., 0]]
    np.testing.assert_allclose(rm, real.mean(0), rtol=1e-12)
    np.testing.assert_allclose(rv, real.var(0, ddof=1), rtol=1e-12)


@pytest.mark.parametrize("form, kw, mshape", [
    (nc.weight_standardize, {}, (6, 7, 4)),
    (nc.batch_norm, {"training": True, "channel_axis": -1}, (6, 7, 1)),
    (nc.layer_norm, {"normalized_shape": (7, 4)}, (6, 1, 1)),
    (nc.rms_norm, {"normalized_shape": 4}, (6, 7, 1)),
    (nc.group_norm, {"num_groups": 7}, (6, 7, 4)),
    (nc.instance_norm, {}, (6, 1, 4)),
])
def test_forms_take_mask(form, kw, mshape):
    shape = (6, 7, 4)
    x = RNG.standard_normal(shape).astype(np.float32)
    mask = RNG.random(mshape) < 0.6
    mask[..., :2] = True  # two counted per instance: training refuses one (as without a mask)
    y, cache = form(x, **kw, mask=mask)
    # changing x where not counted leaves y unchanged where counted
    free = ~np.broadcast_to(mask, shape)
    x2 = np.where(free, 1e4, x).astype(np.float32)
    y2, _ = form(x2, **kw, mask=mask)
    np.testing.assert_array_equal(y[~free], y2[~free])
    assert nc.backward(np.ones_like(y), cache)[0].shape == shape
    with pytest.raises(ValueError, match="mask: shape"):
        form(x, **kw, mask=np.ones((5, 1, 1), bool))


@pytest.mark.parametrize("layer, x_shape, mshape", [
    (lambda: nc.BatchNorm1d(5, channel_axis=-1), (4, 9, 5), (4, 9, 1)),
    (lambda: nc.BatchNorm2d(3), (4, 3, 5, 5), (4, 1, 5, 5)),
    (lambda: nc.LayerNorm(5), (4, 9, 5), (4, 9, 1)),
    (lambda: nc.RMSNorm((9, 5)), (4, 9, 5), (4, 9, 1)),
    (lambda: nc.GroupNorm(2, 4), (3, 4, 10), (3, 1, 10)),
    (lambda: nc.InstanceNorm1d(4, track_running_stats=True), (3, 4, 10), (3, 1, 10)),
    (lambda: nc.BatchChannelNorm(4, 2), (6, 4, 10), (6, 1, 10)),
    (lambda: nc.EstimatedBatchNorm(4), (6, 4, 10), (6, 1, 10)),
])
def test_layers_take_mask_in_forward_and_backward(layer, x_shape, mshape):
    x = RNG.standard_normal(x_shape).astype(np.float32)
    mask = RNG.random(mshape) < 0.7
    mask.reshape(mshape[0], -1)[:, :2] = True
    a, b = layer(), layer()
    y = a(x, mask=mask)
    free = ~np.broadcast_to(mask, x_shape)
    y2 = b.forward(np.where(free, -50, x).astype(np.float32), mask=mask)
    np.testing.assert_array_equal(y[~free], y2[~free])
    dy = np.where(free, 0, RNG.standard_normal(x_shape)).astype(np.float32)
    dx, dx2 = a.backward(dy), b.backward(dy)
    np.testing.assert_array_equal(dx[~free], dx2[~free])
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(v, b.state_dict()[k], err_msg=k)
    y3, h = layer().forward_add(x, x, mask=mask)
    np.testing.assert_array_equal(h, x + x)


@pytest.mark.parametrize("mode, sizes, running", [("layer_norm", {}, False), ("batch_norm_channels_last", {}, False),
                                                  ("rms_norm", {}, False), ("group_norm", {"g": 3}, False),
                                                  ("instance_norm", {}, True), ("instance_norm", {}, False)])
@pytest.mark.parametrize("h_out", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_add_normalize_with_a_mask_is_normalize_of_the_sum(mode, sizes, running, h_out, dtype):
    # the masked one-pass forward makes h itself where groups are contiguous (layer, RMS,
    # group, instance norm), a pass of its own first elsewhere, and the masked one-visit
    # backward adds dh to each row it writes: the same bits as the separate passes
    x, r = (RNG.standard_normal((4, 6, 8)).astype(dtype) for _ in range(2))
    mask = RNG.random((4, 6, 1)) < 0.6
    mask[:, :2] = True
    stats = {}
    if running:  # training with running statistics: the counts rule runs after h is made
        mask = RNG.random(x.shape) < 0.7  # (each group needs two counted elements)
        mask[..., :2] = True
        C = x.shape[1]
        stats = {"running_mean": np.zeros(C, dtype), "running_var": np.ones(C, dtype)}
    kept = np.full_like(x, np.nan) if h_out else None
    y, h, cache = nc.add_normalize(x, r, mode, mask=mask, h_out=kept, **sizes,
                                   **{k: v.copy() for k, v in stats.items()})
    y0, cache0 = nc.normalize(x + r, mode, mask=mask, **sizes, **{k: v.copy() for k, v in stats.items()})
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(h, x + r)
    assert (h is kept) == h_out
    dy, dh = RNG.standard_normal((2, 4, 6, 8)).astype(dtype)
    np.testing.assert_array_equal(nc.backward(dy, cache, dh=dh)[0], nc.backward(dy, cache0)[0] + dh)


@pytest.mark.parametrize("mode", ["batch_norm", "batch_norm_channels_last"])
def test_synchronized_ranks_may_mask_differently(mode):
    shape = (7, 3, 6) if mode == "batch_norm" else (7, 6, 3)
    x = (1 + RNG.standard_normal(shape)).astype(np.float64)
    mshape = (7, 1, 6) if mode == "batch_norm" else (7, 6, 1)
    mask = RNG.random(mshape) < 0.6
    mask[:, ..., :1] = True
    dy = RNG.standard_normal(shape) * mask
    rm, rv = np.zeros(3), np.ones(3)
    y, cache = nc.normalize(x, mode, running_mean=rm, running_var=rv, mask=mask)
    dx, _, _ = nc.backward(dy, cache)
    cuts = [slice(0, 3), slice(3, 3), slice(3, 7)]  # one rank holds no samples

    def rank(comm):
        s = cuts[comm.Get_rank()]
        rmr, rvr = np.zeros(3), np.ones(3)
        yr, c = nc.normalize(x[s], mode, running_mean=rmr, running_var=rvr, mask=mask[s], comm=comm)
        return yr, nc.backward(dy[s], c)[0], rmr, rvr

    out = run_ranks(3, rank)
    np.testing.assert_allclose(np.concatenate([o[0] for o in out]), y, atol=1e-12)
    np.testing.assert_allclose(np.concatenate([o[1] for o in out]), dx, atol=1e-12)
    for o in out:
        np.testing.assert_allclose(o[2], rm, atol=1e-14)
        np.testing.assert_allclose(o[3], rv, atol=1e-14)


def test_synchronized_ranks_must_all_pass_a_mask_or_none():
    x = RNG.standard_normal((4, 3, 5))

    def rank(comm):
        m = np.ones((2, 1, 5), bool) if comm.Get_rank() == 0 else None
        with pytest.raises(ValueError, match="mask given"):
            nc.normalize(x[:2] if comm.Get_rank() == 0 else x[2:], "batch_norm", mask=m, comm=comm)
        return True

    assert all(run_ranks(2, rank))


def test_sync_batch_norm_layer_takes_a_mask():
    x = RNG.standard_normal((6, 3, 5)).astype(np.float32)
    mask = RNG.random((6, 1, 5)) < 0.7
    mask[..., 0] = True
    whole = nc.BatchNorm1d(3)
    y = whole(x, mask=mask)

    def rank(comm):
        bn = nc.SyncBatchNorm(3, comm=comm)
        s = slice(0, 2) if comm.Get_rank() == 0 else slice(2, 6)
        return bn(x[s], mask=mask[s]), bn.running_mean

    (y0, rm0), (y1, rm1) = run_ranks(2, rank)
    np.testing.assert_allclose(np.concatenate([y0, y1]), y, atol=1e-5)
    np.testing.assert_allclose(rm0, whole.running_mean, atol=1e-6)
    np.testing.assert_array_equal(rm0, rm1)


@pytest.mark.parametrize("mask, error, match", [
    (np.ones((4, 3, 5), np.float32), TypeError, "mask: expected a boolean array"),
    (np.ones((4, 3, 5), np.uint8), TypeError, "mask: expected a boolean array"),
    ([[True]], TypeError, "mask: expected a boolean numpy.ndarray"),
    (True, TypeError, "mask: expected a boolean numpy.ndarray"),
    (np.ones((4, 2, 5), bool), ValueError, r"mask: shape \(4, 2, 5\) does not broadcast to x's shape \(4, 3, 5\)"),
    (np.ones((2, 4, 3, 5), bool), ValueError, "mask: shape"),
])
def test_bad_masks_raise_before_any_write(mask, error, match):
    x = RNG.standard_normal((4, 3, 5)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(error, match=match):
        nc.normalize(x, "batch_norm", running_mean=rm, running_var=rv, mask=mask)
    assert not rm.any() and (rv == 1).all()
    layer = nc.BatchNorm1d(3)
    with pytest.raises(error, match=match):
        layer(x, mask=mask)
    assert layer.num_batches_tracked == 0 and not layer.running_mean.any()


def test_a_mask_changes_nothing_when_everything_is_counted():
    for mode, shape, kw in (("layer_norm", (5, 40), {}), ("batch_norm", (8, 3, 6), {}),
                            ("batch_norm_channels_last", (300, 20), {}), ("group_norm", (2, 4, 30), {"g": 2})):
        x = (5 + RNG.standard_normal(shape)).astype(np.float32)
        y, cache = nc.normalize(x, mode, mask=np.ones(shape, bool), **kw)
        y0, cache0 = nc.normalize(x, mode, **kw)
        tol = TOLERANCE[np.dtype(np.float32)]
        np.testing.assert_allclose(y, y0, rtol=0, atol=3 * tol * np.abs(y0).max())
        dy = RNG.standard_normal(shape).astype(np.float32)
        d, d0 = nc.backward(dy, cache)[0], nc.backward(dy, cache0)[0]
        np.testing.assert_allclose(d, d0, rtol=0, atol=3 * tol * np.abs(d0).max())


@pytest.mark.parametrize("mode, shape, mshape, step", [
    ("batch_norm_channels_last", (4, 5, 6), (4, 5, 1), 0),   # a byte per row of the column layout
    ("group_norm", (3, 4, 5, 2), (3, 1, 5, 2), 1),           # (N, 1, H, W): each row's bytes in the mask
    ("layer_norm", (3, 4, 8), (3, 4, 1), 0),
    ("batch_norm", (3, 4, 5), (1, 4, 5), 1),
    ("batch_norm", (3, 4, 5), (3, 4, 1), 0),
])
def test_a_broadcast_mask_travels_compact(mode, shape, mshape, step):
    from normcore.backend import CPU
    from normcore.masking import kernel_rows, mask_rows
    from normcore.plan import make_plan
    sizes = {"g": 2} if mode == "group_norm" else {}
    plan = make_plan(nc.get_mode(mode), shape, sizes)
    mask = RNG.random(mshape) < 0.5
    m = mask_rows(mask, plan, CPU)
    assert m.step == step and m.base.size == mask.size  # never expanded to x's size
    # every kernel row reads exactly its elements' bytes
    rows, length = kernel_rows(plan)
    want = canonical(np.broadcast_to(mask, shape), plan).reshape(rows, length)
    got = m.base[m.offsets[:, None] + m.step * np.arange(length)[None, :]]
    np.testing.assert_array_equal(got.astype(bool), want)


def test_a_mask_of_x_shape_is_read_in_place():
    from normcore.backend import CPU
    from normcore.masking import mask_rows
    from normcore.plan import make_plan
    plan = make_plan(nc.get_mode("batch_norm"), (2, 3, 4))
    mask = RNG.random((2, 3, 4)) < 0.5
    m = mask_rows(mask, plan, CPU)
    assert m.step == 1 and np.shares_memory(m.base, mask)


# -- numpy.ma masks -------------------------------------------------------------------------

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


# -- NaN padding never reaches a gradient -------------------------------------------------

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


MASKED_DH_CASES = [
    ("batch_norm", (8, 6), {}, (8, 6)),                       # columns, a byte per element
    ("batch_norm", (300, 40), {}, (300, 1)),                  # column tiles, a byte per row
    ("batch_norm", (4, 3, 5, 6), {}, (4, 3, 5, 6)),           # rows of S
    ("batch_norm", (4, 3, 5, 6), {}, (4, 1, 1, 1)),           # rows of S, a byte per row
    ("batch_norm_channels_last", (4, 5, 3), {}, (4, 5, 1)),
    ("layer_norm", (4, 5, 6), {}, (4, 5, 6)),
    ("rms_norm", (4, 6), {}, (4, 6)),
    ("group_norm", (4, 6, 5), {"g": 3}, (4, 6, 5)),
    ("instance_norm", (4, 3, 5, 6), {}, (4, 3, 5, 6)),
]


@pytest.mark.parametrize("mode, shape, sizes, mshape", MASKED_DH_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_masked_dx_adds_dh_in_its_own_pass(mode, shape, sizes, mshape, dtype):
    # every masked backward route adds dh while it writes dx (no add pass after): the same
    # bits as dx + dh, and the counts the statistics divide by are the counted elements
    x = (3 + RNG.standard_normal(shape)).astype(dtype)
    mask = RNG.random(mshape) < 0.7
    mask.reshape(-1)[:2] = True
    y, cache = nc.normalize(x, mode, mask=mask, **sizes)
    assert cache.route.dh_in_dx
    assert "add" not in cache.route.kernels(cache.plan, dh=True)["backward"]
    dy, dh = RNG.standard_normal((2,) + shape).astype(dtype)
    np.testing.assert_array_equal(nc.backward(dy, cache, dh=dh)[0], nc.backward(dy, cache)[0] + dh)
    counted = np.broadcast_to(mask, shape)
    from normcore.layout import canonical
    want = canonical(counted, cache.plan).reshape(cache.plan.layout).sum(axis=(0, 2))
    np.testing.assert_array_equal(cache.counts, want)


@pytest.mark.parametrize("mode, shape, sizes, mshape", MASKED_DH_CASES[:3] + MASKED_DH_CASES[5:6])
def test_an_unmasked_call_counts_every_element_of_its_groups(mode, shape, sizes, mshape):
    _, cache = nc.normalize(RNG.standard_normal(shape).astype(np.float32), mode, **sizes)
    assert cache.counts.dtype == np.float64 and cache.counts.shape == (cache.plan.layout[1],)
    assert (cache.counts == cache.plan.count).all()
