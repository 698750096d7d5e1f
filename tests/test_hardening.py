"""Failures an adversarial pass found, each pinned at its cause: extreme magnitudes, files,
construction-time rules, atomic state, pickling, keyword arguments."""
import copy
import pickle

import numpy as np
import pytest

import normcore as nc
from normcore import cs231n
from normcore.reference import reference_forward

RNG = np.random.default_rng(12)

# every kernel family: columns (channels-last, per-activation, 2-D batch norm), rows,
# one-pass groups (layer, instance, group norm), and a non-centred mode
FAMILIES = [("batch_norm_channels_last", (17, 3), {}), ("batch_norm_per_activation", (17, 3), {}),
            ("batch_norm", (17, 3), {}), ("batch_norm", (5, 3, 7), {}), ("layer_norm", (3, 17), {}),
            ("instance_norm", (2, 3, 17), {}), ("group_norm", (2, 4, 9), {"g": 2}), ("rms_norm", (3, 17), {})]


def _reduced_axis_first(mode, shape):
    """An index that puts two values in one statistics group (same kept coordinates)."""
    if mode in ("layer_norm", "rms_norm"):
        return (0, 0), (0, 1)
    if mode in ("instance_norm", "group_norm"):
        return (0, 0, 0), (0, 0, 1)
    if len(shape) == 3:
        return (0, 0, 0), (1, 0, 0)
    return (0, 0), (1, 0)


@pytest.mark.parametrize("mode, shape, sizes", FAMILIES)
def test_float32_near_its_maximum_gives_the_exact_answer(mode, shape, sizes):
    # x - x of two finite float32 values can overflow float32: every kernel widens to
    # double before subtracting, so the output is the float64 one, finite
    x = RNG.standard_normal(shape).astype(np.float32)
    i, j = _reduced_axis_first(mode, shape)
    x[i], x[j] = 3e38, -3e38
    y, _ = nc.normalize(x, mode, **sizes)
    want = reference_forward(x.astype(np.float64), mode, **sizes).y
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)


def test_float32_near_its_maximum_keeps_running_statistics_representable():
    x = np.zeros((17, 2), np.float32)
    x[:, 1] = np.arange(17)
    x[0, 0], x[1, 0] = 3e38, -3e38
    rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    nc.normalize(x, "batch_norm_channels_last", running_mean=rm, running_var=rv)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(rm, 0.1 * x64.mean(axis=0), rtol=1e-6)
    # column 1 as computed in double; column 0's variance (1e76) exceeds float32: +inf, the
    # rounding of the true value, not NaN or a wrong finite number
    np.testing.assert_allclose(rv[1], 0.9 + 0.1 * x64[:, 1].var(ddof=1), rtol=1e-6)
    assert rv[0] == np.inf


@pytest.mark.parametrize("mode, shape, sizes", FAMILIES)
def test_float64_at_large_magnitude_keeps_its_variance(mode, shape, sizes):
    # the squared sum of deviations of 1e153-sized values overflows unless divided first
    x = RNG.standard_normal(shape) * 1e153
    y, _ = nc.normalize(x, mode, **sizes)
    np.testing.assert_allclose(y, reference_forward(x, mode, **sizes).y, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode, shape, sizes", FAMILIES)
def test_unrepresentable_statistics_give_nan_not_a_finite_answer(mode, shape, sizes):
    # squares of 1e200 exceed double: the group's variance does not exist in float64, so
    # its output is NaN; the other groups are unaffected
    x = RNG.standard_normal(shape)
    i, j = _reduced_axis_first(mode, shape)
    x[i], x[j] = 1e200, -1e200
    y, cache = nc.normalize(x, mode, **sizes)
    assert np.isnan(y[i]) and np.isnan(y[j])
    assert np.isfinite(y).sum() > 0
    assert np.isnan(cache.saved_rstd).sum() >= 1


@pytest.mark.parametrize("mode, shape, sizes", FAMILIES)
def test_extreme_magnitudes_on_the_emulated_gpu(emulated_gpu, mode, shape, sizes):
    test_float32_near_its_maximum_gives_the_exact_answer(mode, shape, sizes)
    test_float64_at_large_magnitude_keeps_its_variance(mode, shape, sizes)
    test_unrepresentable_statistics_give_nan_not_a_finite_answer(mode, shape, sizes)
    assert emulated_gpu.launches > 0


# -- pickling and copies (every layer, at any time) -----------------------------------------

LAYERS = [(lambda: nc.BatchNorm1d(3), (6, 3)), (lambda: nc.BatchNorm2d(3, channel_axis=-1), (2, 4, 4, 3)),
          (lambda: nc.LayerNorm((3, 5)), (4, 3, 5)), (lambda: nc.GroupNorm(2, 4), (2, 4, 5)),
          (lambda: nc.InstanceNorm2d(3, track_running_stats=True), (2, 3, 4, 4)), (lambda: nc.RMSNorm(5), (3, 5)),
          (lambda: nc.ChannelNorm(4, 2), (2, 4, 3)), (lambda: nc.EstimatedBatchNorm(3), (6, 3, 2)),
          (lambda: nc.BatchChannelNorm(4, 2), (6, 4, 3)), (lambda: nc.SyncBatchNorm(3), (6, 3))]


@pytest.mark.parametrize("make, shape", LAYERS)
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


# -- construction-time rules ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [">f4", "<f8" if np.little_endian is False else ">f8", "nope", "int32", object])
@pytest.mark.parametrize("make", [lambda d: nc.BatchNorm2d(3, dtype=d), lambda d: nc.LayerNorm(4, dtype=d),
                                  lambda d: nc.GroupNorm(2, 4, dtype=d), lambda d: nc.BatchChannelNorm(4, 2, dtype=d)])
def test_layers_refuse_dtypes_they_cannot_run(make, dtype):
    with pytest.raises(TypeError, match="^dtype: expected"):
        make(dtype)


@pytest.mark.parametrize("make", [lambda: nc.BatchNorm1d(3, eps=None), lambda: nc.LayerNorm(4, eps=None),
                                  lambda: nc.GroupNorm(2, 4, eps=None), lambda: nc.InstanceNorm1d(3, eps=None),
                                  lambda: nc.BatchChannelNorm(4, 2, eps=None)])
def test_eps_none_is_refused_at_construction(make):
    with pytest.raises(TypeError, match="^eps"):
        make()


def test_rms_norm_eps_none_is_the_machine_epsilon():
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    want, _ = nc.normalize(x, "rms_norm", eps=float(np.finfo(np.float32).eps))
    np.testing.assert_array_equal(nc.RMSNorm(4, eps=None)(x), want)


# -- keywords and sizes ---------------------------------------------------------------------

@pytest.mark.parametrize("call", [lambda **k: nc.normalize(RNG.standard_normal((4, 3)), "batch_norm", **k),
                                  lambda **k: nc.normalize(RNG.standard_normal((2, 4, 3)), "group_norm", g=2, **k),
                                  lambda **k: nc.param_shapes("layer_norm", (4, 3), **k)])
@pytest.mark.parametrize("kw", [{"trainig": False}, {"padding_mask": np.ones((4, 3))}, {"zz": 3}])
def test_an_unknown_keyword_is_a_type_error_naming_it(call, kw):
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{next(iter(kw))}'") as info:
        call(**kw)
    assert "array(" not in str(info.value)


def test_a_size_that_is_not_an_int_is_not_dumped():
    with pytest.raises(ValueError, match="^sizes: g must be a positive int, got numpy.ndarray$"):
        nc.normalize(RNG.standard_normal((2, 4, 3)), "group_norm", g=np.ones(1000))


def test_a_call_cannot_resize_a_registered_mode():
    if "fixed_heads" not in nc.modes():
        nc.register_mode("fixed_heads", "b t (h d) -> b h", params="(h d)", h=2)
    x = RNG.standard_normal((2, 3, 8))
    y, _ = nc.normalize(x, "fixed_heads", h=2)  # the fixed value itself is fine
    with pytest.raises(ValueError, match="^sizes: h=4 conflicts with h=2"):
        nc.normalize(x, "fixed_heads", h=4)
    with pytest.raises(ValueError, match="^sizes: h=4 conflicts"):
        nc.param_shapes("fixed_heads", x.shape, h=4)


@pytest.mark.parametrize("spec", ["n c -> n c", "n ... -> n ...", "(a b) c -> a b c", "n (g k) -> n g k"])
def test_a_spec_that_reduces_nothing_is_refused(spec):
    with pytest.raises(nc.SpecError, match="reduces no axis"):
        nc.Mode(spec)


@pytest.mark.parametrize("spec, params", [("n c -> n", "n"), ("n c h -> n", "n c"), ("(n m) c -> n m", "m"),
                                          ("n c ... -> n c", "n")])
def test_parameters_on_the_kept_batch_axis_are_refused(spec, params):
    with pytest.raises(nc.SpecError, match="leading axis"):
        nc.Mode(spec, params=params)


def test_parameters_on_a_reduced_leading_axis_are_fine():
    y, _ = nc.normalize(RNG.standard_normal(5), nc.Mode("a -> ", params="a"), weight=np.ones(5))
    assert y.shape == (5,)


# -- inputs without elements ----------------------------------------------------------------

EMPTY = [("batch_norm", (4, 0, 5), {}), ("batch_norm", (0, 3), {}), ("batch_norm", (0, 3, 4), {}),
         ("batch_norm_channels_last", (4, 5, 0), {}), ("batch_norm_channels_last", (0, 5, 3), {}),
         ("batch_norm_per_activation", (0, 4), {}), ("weight_standardize", (0, 3), {}),
         ("group_norm", (0, 4, 3), {"g": 2}), ("group_norm", (2, 0, 3), {"g": 2}), ("instance_norm", (0, 3, 4), {}),
         ("layer_norm", (0, 4), {}), ("layer_norm", (3, 0), {}), ("rms_norm", (2, 0), {})]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode, shape, sizes", EMPTY)
def test_empty_in_empty_out(mode, shape, sizes, dtype):
    ps = nc.param_shapes(mode, shape, **sizes)
    kw = {}
    if ps["weight"] is not None:
        kw["weight"], kw["bias"] = np.ones(ps["weight"], dtype), np.zeros(ps["weight"], dtype)
    if ps["running_mean"] is not None:
        kw["running_mean"], kw["running_var"] = np.zeros(ps["running_mean"], dtype), np.ones(ps["running_mean"], dtype)
    x = np.empty(shape, dtype)
    for training in (True, False):
        y, cache = nc.normalize(x, mode, training=training, **kw, **sizes)
        assert y.shape == shape and y.dtype == dtype
        dx, dw, db = nc.backward(np.empty(shape, dtype), cache)
        assert dx.shape == shape
        for g in (dw, db):
            if "weight" in kw:
                assert g.shape == kw["weight"].shape and not g.any()
        if "running_mean" in kw:
            assert not kw["running_mean"].any() and (kw["running_var"] == 1).all()


def test_empty_input_with_huge_group_counts_allocates_nothing():
    # every group count divides an empty axis: the plan must not build per-group indices
    y, cache = nc.group_norm(np.zeros((2, 0, 3), np.float32), 2 ** 40)
    assert y.shape == (2, 0, 3)
    dx, dw, db = nc.backward(y, cache)
    assert dx.shape == (2, 0, 3)


def test_empty_batch_leaves_a_layer_untouched():
    layer = nc.BatchNorm2d(3)
    y = layer(np.empty((0, 3, 4, 4), np.float32))
    assert y.shape == (0, 3, 4, 4) and layer.num_batches_tracked == 0
    assert layer.backward(y).shape == y.shape and not layer.grad_weight.any()
    np.testing.assert_array_equal(layer.running_var, np.ones(3))


# -- GPU launch geometry (no GPU needed) ------------------------------------------------------

def test_every_launch_stays_within_the_device_grid_limits():
    from normcore import gpu
    seen = []
    kernels = gpu.CudaKernels(lambda family, name, dtype: lambda grid, block, args: seen.append((name, grid, block)))
    S, R = 2 ** 25, 1  # a layer norm over 33.5M elements: ceil(S / 256) > 65535
    x = np.empty((1, R, S), np.float32)  # never touched: the launches only read shapes
    mean = np.empty(R)
    kernels.sums_inner(x, x, mean, mean, np.zeros(R, np.intp), np.empty(S), 1, mean, mean,
                       np.empty((1, S)), np.empty((1, S)), 1)
    kernels.dx_inner(x, x, mean, mean, np.zeros(R, np.intp), np.empty(S), mean, mean, None, x, 1)
    wide = np.empty((3, 2 ** 24), np.float32)
    p = np.empty((1, 2 ** 24))
    kernels.moments_cols(wide, 3, p, p, 1)
    kernels.sums_cols(wide, wide, np.empty(2 ** 24), 3, p, p, 1)
    assert seen
    for name, grid, block in seen:
        grid = tuple(grid) + (1, 1)
        assert 1 <= grid[0] < 2 ** 31 and 1 <= grid[1] <= 65535, (name, grid)
        assert 1 <= np.prod(block) <= 1024, (name, block)


def test_capped_grids_still_cover_every_element(emulated_gpu, monkeypatch):
    # with the grid's y extent capped at 1, the kernels stride over what it leaves out
    from normcore import gpu
    monkeypatch.setattr(gpu, "_MAX_GRID_Y", 1)
    for mode, shape in (("layer_norm", (5, 700)), ("batch_norm_channels_last", (9, 300))):
        x = RNG.standard_normal(shape)
        w = RNG.standard_normal(shape[-1])
        y, cache = nc.normalize(x, mode, weight=w, bias=np.zeros_like(w))
        dy = RNG.standard_normal(shape)
        monkeypatch.setattr(gpu, "_MAX_GRID_Y", 65535)
        with monkeypatch.context() as m:
            m.setattr(normcore_checks(), "backend_of", lambda a: nc.backend.CPU)
            want_y, want_cache = nc.normalize(x, mode, weight=w, bias=np.zeros_like(w))
            want = nc.backward(dy, want_cache)
        monkeypatch.setattr(gpu, "_MAX_GRID_Y", 1)
        np.testing.assert_allclose(y, want_y, rtol=1e-12, atol=1e-12)
        for a, b in zip(nc.backward(dy, cache), want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


def normcore_checks():
    from normcore import checks
    return checks


# -- arrays a call writes never overlap what it reads --------------------------------------

def _overlap_cases():
    x = RNG.standard_normal((8, 3)).astype(np.float32)
    rm, rv, w = np.zeros(3, np.float32), np.ones(3, np.float32), np.ones(3, np.float32)
    buf = np.zeros(30, np.float32)
    out = np.empty(24, np.float32)
    return [
        ("same running arrays", x, dict(running_mean=rm, running_var=rm), "running_mean"),
        ("overlapping running arrays", x, dict(running_mean=buf[:3], running_var=buf[2:5]), "running_mean"),
        ("running mean a view of x", x, dict(running_mean=x[0], running_var=rv), "running_mean"),
        ("running var a view of x", x, dict(running_mean=rm, running_var=x.reshape(-1)[3:6]), "running_var"),
        ("running mean is the weight", x, dict(running_mean=w, running_var=rv, weight=w), "running_mean"),
        ("out over the weight", x, dict(weight=out[:3], out=out.reshape(8, 3)), "out"),
        ("out over the running var", x, dict(running_mean=rm, running_var=out[:3], out=out.reshape(8, 3)), "out"),
    ]


@pytest.mark.parametrize("label, x, kw, blamed", _overlap_cases(), ids=[c[0] for c in _overlap_cases()])
@pytest.mark.parametrize("mode", ["batch_norm", "batch_norm_channels_last"])
def test_overlapping_written_arrays_are_refused_before_anything_is_written(label, x, kw, blamed, mode):
    before = {k: v.copy() for k, v in kw.items()}
    x_before = x.copy()
    with pytest.raises(ValueError, match=f"^{blamed}: must not"):
        nc.normalize(x, mode, **kw)
    np.testing.assert_array_equal(x, x_before)
    for k, v in before.items():
        if k != "out":
            np.testing.assert_array_equal(kw[k], v, err_msg=k)


def test_overlap_rules_hold_at_the_form_and_layer_entries():
    x = RNG.standard_normal((8, 3)).astype(np.float32)
    rm = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="^running_mean: must not be the same array as running_var"):
        nc.batch_norm(x, rm, rm, training=True)
    layer = nc.BatchNorm1d(3)
    layer.running_var = layer.running_mean
    with pytest.raises(ValueError, match="^running_mean: must not"):
        layer(x)
    assert layer.num_batches_tracked == 0
    w = np.ones((3, 4), np.float32)
    out = np.empty(8 * 12, np.float32)
    with pytest.raises(ValueError, match="^out: must not"):
        nc.layer_norm(RNG.standard_normal((8, 3, 4)).astype(np.float32), (3, 4), weight=out[:12].reshape(3, 4),
                      out=out.reshape(8, 3, 4))
    # eval reads the running statistics only: the same array twice is fine there
    y, _ = nc.normalize(x, "batch_norm", running_mean=rm, running_var=np.ones(3, np.float32) + rm * 0, training=False)
    assert y.shape == x.shape


def test_backward_out_must_not_overlap_the_weight():
    x = RNG.standard_normal((8, 3)).astype(np.float32)
    buf = np.ones(24, np.float32)
    y, cache = nc.normalize(x, "batch_norm", weight=buf[:3])
    with pytest.raises(ValueError, match="^out: must not share memory with weight"):
        nc.backward(np.ones_like(y), cache, out=buf.reshape(8, 3))


# -- fork --------------------------------------------------------------------------------------

def _normalize_in_child(queue):
    x = np.random.default_rng(7).standard_normal((64, 32, 16, 16)).astype(np.float32)
    layer = nc.BatchNorm2d(32)
    y = layer(x)
    queue.put((nc.get_num_threads(), y.tobytes(), layer.backward(np.ones_like(y)).tobytes()))


def test_a_forked_child_computes_instead_of_hanging():
    import multiprocessing
    x = np.random.default_rng(7).standard_normal((64, 32, 16, 16)).astype(np.float32)  # 2**19 elements
    nc.normalize(x, "batch_norm")  # the parent's OpenMP team now exists
    layer = nc.BatchNorm2d(32)
    y = layer(x)
    dx = layer.backward(np.ones_like(y))
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_normalize_in_child, args=(queue,))
    child.start()
    try:  # read before joining: a child blocks on exit until its queued data is read
        threads, y_child, dx_child = queue.get(timeout=60)
    except Exception:
        child.kill()
        pytest.fail("the forked child hung in a kernel")
    child.join(10)
    assert threads == 1 and child.exitcode == 0
    assert y_child == y.tobytes() and dx_child == dx.tobytes()  # bitwise: any thread count


# -- bounded caches ---------------------------------------------------------------------------

def test_plan_cache_is_bounded_by_bytes_and_frees_what_it_drops(monkeypatch):
    import gc
    import weakref
    from normcore import plan as plan_module
    from normcore.spec import parse_axes, parse_spec
    monkeypatch.setattr(plan_module, "PLAN_CACHE_BYTES", 1 << 20)
    first = weakref.ref(nc.normalize(np.ones((5000, 7)), "layer_norm")[1].plan)
    for rows in range(5001, 5101):  # 100 distinct lengths, ~40 KB of row indices each
        x = np.ones((rows, 7), np.float32)
        nc.normalize(x, "layer_norm")
        nc.normalize(x, "batch_norm", weight=np.ones(7, np.float32))
    cached = sum(size for _, size in plan_module._PLANS.values())
    assert cached <= (1 << 20) + 200_000
    gc.collect()
    assert first() is None  # evicted and not kept alive by any other cache
    assert parse_spec.cache_info().maxsize == parse_axes.cache_info().maxsize == 4096


# -- messages that name the argument --------------------------------------------------------

X45 = np.ones((4, 5), np.float32)


@pytest.mark.parametrize("call, exc, pattern", [
    (lambda: nc.LayerNorm(None), TypeError, "^normalized_shape: expected an int or a sequence"),
    (lambda: nc.LayerNorm(3.5), TypeError, "^normalized_shape: expected an int or a sequence"),
    (lambda: nc.RMSNorm("ab"), TypeError, "^normalized_shape: expected an int or a sequence"),
    (lambda: nc.layer_norm(X45, "ab"), TypeError, "^normalized_shape"),
    (lambda: nc.layer_norm(X45, None), TypeError, "^normalized_shape"),
    (lambda: nc.layer_norm(X45, 5.0), TypeError, "^normalized_shape"),
    (lambda: nc.layer_norm(X45, (5.7,)), TypeError, "^normalized_shape: expected a positive int, got float 5.7"),
    (lambda: nc.Mode(["n", "c"]), TypeError, "^spec: expected a str"),
    (lambda: nc.Mode("n c -> c", sizes=3), TypeError, "^sizes: expected a dict"),
    (lambda: nc.Mode("n c -> c", sizes=[("c", 2, 3)]), TypeError, "^sizes: expected a dict"),
    (lambda: nc.Mode("n c -> c", sizes={"z": 2}), ValueError, "^sizes: axis 'z'"),
    (lambda: nc.BatchNorm2d(3, dtype="nope"), TypeError, "^dtype: expected"),
    (lambda: cs231n.batchnorm_forward([[1.0, 2.0], [3.0, 4.0]], np.ones(2), np.zeros(2), {"mode": "train"}),
     TypeError, "^x: expected a numpy.ndarray"),
    (lambda: cs231n.batchnorm_forward(np.ones(3), np.ones(3), np.zeros(3), {"mode": "train"}),
     ValueError, "^x: expected 2 dimensions"),
    (lambda: cs231n.spatial_batchnorm_forward(np.ones((2, 3)), np.ones(3), np.zeros(3), {"mode": "train"}),
     ValueError, "^x: expected"),
    (lambda: cs231n.batchnorm_forward(np.ones((4, 3)), np.ones(3), np.zeros(3), {"mode": "train", "momentum": 1.5}),
     ValueError, r"^bn_param\['momentum'\]: expected a float in \[0, 1\], got 1.5"),
])
def test_messages_name_the_argument(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_mode_sizes_as_a_dict_are_kept_as_pairs():
    m = nc.Mode("n (g k) -> n g", sizes={"g": 2})
    assert m.sizes == (("g", 2),) and hash(m) == hash(nc.Mode("n (g k) -> n g", sizes=(("g", 2),)))
    y, _ = nc.normalize(np.ones((3, 4)), m)
    assert y.shape == (3, 4)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix itself
def test_out_may_be_an_ndarray_subclass():
    x = RNG.standard_normal((4, 5)).astype(np.float32)
    out = np.matrix(np.zeros((4, 5), np.float32))
    y, cache = nc.normalize(x, "layer_norm", out=out)
    assert y is out
    np.testing.assert_array_equal(np.asarray(y), nc.normalize(x, "layer_norm")[0])
