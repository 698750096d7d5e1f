"""The compiled path itself: layouts, threads (a forked child too), strides, empty inputs,
large offsets."""
import os
import subprocess
import sys

import numpy as np
import pytest

import ml_dtypes
import normcore as nc
from normcore import backend, kernels
from normcore.plan import make_plan
from normcore.reference import reference_backward, reference_forward

threadpoolctl = pytest.importorskip("threadpoolctl")

RNG = np.random.default_rng(2)


def test_extension_is_built_with_openmp():
    assert kernels.K.openmp_probe() == 2


NAMES = [name for name, _, _ in kernels.VARIANTS]


@pytest.fixture(params=NAMES)
def build(request, monkeypatch):
    """Each build of the kernels in turn (skipped where this CPU or installation lacks it)."""
    name = request.param
    if name not in kernels.available_variants():
        pytest.skip(f"the {name} build does not run here (this CPU or installation lacks it)")
    module = dict((n, m) for n, m, _ in kernels.VARIANTS)[name]
    import importlib
    monkeypatch.setattr(backend.CPU, "K", importlib.import_module(f"normcore.{module}"))
    return name


def test_the_widest_build_the_cpu_has_is_chosen():
    assert kernels.VARIANT == kernels.available_variants()[0]
    assert backend.CPU.K is kernels.K


@pytest.mark.slow  # a fresh interpreter or compiler
@pytest.mark.parametrize("name", NAMES)
def test_normcore_kernels_forces_a_build_in_a_fresh_process(name):
    code = "import normcore.kernels as k; print(k.VARIANT, k.K.__name__)"
    env = dict(os.environ, NORMCORE_KERNELS=name)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if name in kernels.available_variants():
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[0] == name
    else:  # asked for a build this CPU cannot run: an error that says so, not a crash
        assert "cannot run that build" in out.stderr


@pytest.mark.slow  # a fresh interpreter or compiler
def test_normcore_kernels_rejects_an_unknown_build():
    env = dict(os.environ, NORMCORE_KERNELS="sse9")
    out = subprocess.run([sys.executable, "-c", "import normcore"], capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "NORMCORE_KERNELS: expected one of auto, avx512, avx2, baseline" in out.stderr


ACCURACY_MODES = ["batch_norm", "batch_norm_channels_last", "layer_norm", "rms_norm", "instance_norm",
                  "group_norm", "channel_norm"]


def _rounding_floor(want):
    """max |float32(want) - want|: the error of rounding the exact result once, a floor
    below the contract's (which also rounds the mean to float32)."""
    return max(float(np.abs(want.astype(np.float32).astype(np.float64) - want).max()), np.finfo(np.float32).tiny)


@pytest.mark.parametrize("offset", [0.0, 1e2, 1e3, 1e4])
@pytest.mark.parametrize("name", ACCURACY_MODES)
def test_float32_within_three_times_the_floor_in_every_build(build, name, offset):
    # The float32 contract (README, Numerics): y, dx, dweight, dbias within 3x the floor
    # error; checked here against the stricter floor of one rounding of the exact result.
    # Two layouts per mode: rows shorter than a vector, and wider ones with lane tails.
    mode = nc.get_mode(name)
    for shape in ((16, 8, 12), (6, 16, 101)):
        sizes = {"g": 4} if "g k" in mode.spec else {}
        rng = np.random.default_rng(int(offset) + len(name))
        x = (offset + rng.standard_normal(shape)).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        plan = make_plan(mode, shape, sizes)
        w = rng.standard_normal(plan.param_shape).astype(np.float32)
        kw = {"weight": w} if mode.center is False else {"weight": w, "bias": rng.standard_normal(w.shape).astype(np.float32)}
        y, cache = nc.normalize(x, name, **kw, **sizes)
        ref = reference_forward(x, name, **kw, **sizes)
        dx, dw, db = nc.backward(dy, cache)
        rdx, rdw, rdb = reference_backward(dy, ref)
        for what, got, want in (("y", y, ref.y), ("dx", dx, rdx), ("dweight", dw, rdw), ("dbias", db, rdb)):
            if got is None:
                continue
            assert got.dtype == np.float32
            ratio = float(np.abs(got.astype(np.float64) - want).max()) / _rounding_floor(want)
            assert ratio <= 3.0, (what, shape, ratio)


HALF = {"float16": (np.dtype(np.float16), (0.0, 1e1, 1e2)),
        "bfloat16": (np.dtype(ml_dtypes.bfloat16), (0.0, 1e2, 1e3, 1e4))}


@pytest.mark.parametrize("param_dtype", ["x", "float32"])
@pytest.mark.parametrize("dtype_name", sorted(HALF))
@pytest.mark.parametrize("name", ACCURACY_MODES + ["bench_user_heads"])
def test_half_precision_within_twice_the_floor_in_every_build(build, name, dtype_name, param_dtype):
    # y, dx, dweight, dbias within 2x the floor: float64 arithmetic on the half inputs,
    # rounded once to the output dtype; at offsets 0..1e2 (float16) and 0..1e4 (bfloat16).
    # Parameters in x's dtype or float32; their gradients in theirs. Layouts: rows shorter
    # than a vector, wider ones with lane tails, and rows longer than a moments chunk.
    if name not in nc.modes():
        nc.register_mode(name, "b t (h d) -> b h", params="(h d)", h=4)
    dtype, offsets = HALF[dtype_name]
    pdt = dtype if param_dtype == "x" else np.dtype(np.float32)
    mode = nc.get_mode(name)
    for offset in offsets:
        for shape in ((16, 8, 12), (6, 16, 100), (2, 4, 4500)):
            sizes = {"g": 4} if "g k" in mode.spec else {}
            rng = np.random.default_rng(int(offset) + len(name) + shape[-1])
            x = (offset + rng.standard_normal(shape)).astype(dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            plan = make_plan(mode, shape, sizes)
            w = rng.standard_normal(plan.param_shape).astype(pdt)
            kw = {"weight": w} if mode.center is False else {"weight": w, "bias": rng.standard_normal(w.shape).astype(pdt)}
            y, cache = nc.normalize(x, name, **kw, **sizes)
            ref = reference_forward(x.astype(np.float64), name, **{k: v.astype(np.float64) for k, v in kw.items()},
                                    **sizes)
            dx, dw, db = nc.backward(dy, cache)
            rdx, rdw, rdb = reference_backward(dy.astype(np.float64), ref)
            for what, got, want, dt in (("y", y, ref.y, dtype), ("dx", dx, rdx, dtype), ("dweight", dw, rdw, pdt),
                                        ("dbias", db, rdb, pdt)):
                if got is None:
                    continue
                assert got.dtype == dt, (what, got.dtype)
                floor = max(float(np.abs(want.astype(dt).astype(np.float64) - want).max()), 2.0 ** -24)
                ratio = float(np.abs(got.astype(np.float64) - want).max()) / floor
                assert ratio <= 2.0, (what, offset, shape, ratio)


@pytest.mark.parametrize("mode, shape, sizes", [
    ("batch_norm", (64, 16, 24, 24), {}),
    ("batch_norm_channels_last", (2048, 160), {}),
    ("layer_norm", (1500, 200), {}),
    ("group_norm", (16, 64, 18, 18), {"g": 8}),
])
def test_every_build_gives_the_same_bits_for_one_and_two_threads(build, mode, shape, sizes):
    x = (3 + RNG.standard_normal(shape)).astype(np.float32)
    dy = RNG.standard_normal(shape).astype(np.float32)
    p = nc.param_shapes(mode, shape, **sizes)["weight"]
    w, b = RNG.standard_normal(p).astype(np.float32), RNG.standard_normal(p).astype(np.float32)
    results = []
    for threads in (1, 2, 2):
        with threadpoolctl.threadpool_limits(threads, user_api="openmp"):
            y, cache = nc.normalize(x, mode, weight=w, bias=b, **sizes)
            results.append((y, *nc.backward(dy, cache)))
    for other in results[1:]:
        for a, c in zip(results[0], other, strict=True):
            assert np.array_equal(a, c), mode


@pytest.mark.parametrize("mode, shape, layout, perm", [
    ("batch_norm", (8, 3, 4, 5), (8, 3, 20), None),
    ("batch_norm", (8, 3), (8, 3, 1), None),
    ("batch_norm_channels_last", (8, 4, 5, 3), (160, 3, 1), None),
    ("layer_norm", (2, 3, 7), (1, 6, 7), None),
    ("instance_norm", (2, 3, 4, 4), (1, 6, 16), None),
    ("group_norm", (2, 8, 3), (1, 4, 12), None),
    ("batch_norm", (1, 3, 1, 1), (1, 3, 1), None),
])
def test_plans_merge_axes_onto_the_canonical_layout(mode, shape, layout, perm):
    plan = make_plan(nc.get_mode(mode), shape, {"g": 2} if "group" in mode else {})
    assert plan.layout == layout and plan.perm == perm
    assert plan.layout[0] * plan.layout[1] * plan.layout[2] == np.prod(shape)


def test_non_adjacent_kept_axes_are_transposed_and_still_correct():
    mode = nc.Mode("a b c d -> a c", params="b")
    x = RNG.standard_normal((3, 4, 5, 6))
    plan = make_plan(mode, x.shape)
    assert plan.perm == (0, 2, 1, 3) and plan.layout == (1, 15, 24)
    w = RNG.standard_normal(4)
    y, cache = nc.normalize(x, mode, weight=w)
    mean = x.mean(axis=(1, 3), keepdims=True)
    var = x.var(axis=(1, 3), keepdims=True)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5) * w[None, :, None, None], rtol=1e-10, atol=1e-12)
    dy = RNG.standard_normal(x.shape)
    ref = reference_forward(x, mode, weight=w)
    got, want = nc.backward(dy, cache), reference_backward(dy, ref)
    assert got[2] is None and want[2] is None
    for g, r in zip(got[:2], want[:2], strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("view", [
    lambda a: a[:, :, ::-1],
    lambda a: a[::2],
    lambda a: np.asfortranarray(a),
    lambda a: a.transpose(1, 0, 2).copy().transpose(1, 0, 2),
])
def test_non_contiguous_and_negative_stride_inputs(view):
    base = RNG.standard_normal((8, 4, 6)).astype(np.float32)
    x = view(base)
    w = RNG.standard_normal(4).astype(np.float32)
    for mode in ("batch_norm", "instance_norm"):
        y, cache = nc.normalize(x, mode, weight=w)
        y_c, cache_c = nc.normalize(np.ascontiguousarray(x), mode, weight=w)
        assert np.array_equal(y, y_c) and y.flags.c_contiguous
        dy = view(RNG.standard_normal(base.shape).astype(np.float32))
        for a, b in zip(nc.backward(dy, cache), nc.backward(np.ascontiguousarray(dy), cache_c), strict=True):
            assert np.array_equal(a, b)


def test_zero_size_inputs():
    # no groups: an empty result and zero parameter gradients
    w = np.ones(8, np.float32)
    y, cache = nc.layer_norm(np.empty((0, 8), np.float32), (8,), weight=w, bias=np.zeros(8, np.float32))
    assert y.shape == (0, 8) and y.dtype == np.float32
    dx, dw, db = nc.backward(np.empty((0, 8), np.float32), cache)
    assert dx.shape == (0, 8) and not dw.any() and not db.any()
    # empty groups (a batch of 0 samples), as PyTorch: an empty result, running stats untouched
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y, cache = nc.batch_norm(np.empty((0, 3, 4), np.float32), rm, rv, training=True)
    assert y.shape == (0, 3, 4) and not rm.any() and (rv == 1).all()
    assert np.isnan(cache.saved_mean).all() and cache.saved_mean.shape == (3,)


@pytest.mark.parametrize("mode, shape, sizes, params", [
    ("batch_norm", (64, 16, 30, 30), {}, (16,)),             # rows, many per group
    ("batch_norm_channels_last", (4096, 300), {}, (300,)),   # column blocks
    ("layer_norm", (3000, 200), {}, (200,)),                 # per-row, params on b
    ("group_norm", (16, 64, 20, 20), {"g": 8}, (64,)),       # params across c and b
])
def test_bitwise_identical_for_one_and_two_threads(mode, shape, sizes, params):
    x = (100 + RNG.standard_normal(shape)).astype(np.float32)
    dy = RNG.standard_normal(shape).astype(np.float32)
    w = RNG.standard_normal(params).astype(np.float32)
    b = RNG.standard_normal(params).astype(np.float32)
    results = []
    # repeated two-thread runs: a variable shared between threads by mistake shows up as
    # an occasional difference, not a constant one
    for threads in (1, 2, 2, 2, 2, 2, 2):
        with threadpoolctl.threadpool_limits(threads, user_api="openmp"):
            y, cache = nc.normalize(x, mode, weight=w, bias=b, **sizes)
            results.append((y, *nc.backward(dy, cache)))
    for other in results[1:]:
        for a, c in zip(results[0], other, strict=True):
            assert np.array_equal(a, c)


@pytest.mark.parametrize("mode, shape, sizes", [
    ("batch_norm_channels_last", (40, 4100), {}),         # column tiles: 4096 + 4
    ("batch_norm_channels_last", (43, 1027), {}),         # wide tile, row and column tails
    ("batch_norm_channels_last", (47, 2051), {}),         # wide reduction, row and column tails
    ("batch_norm", (3, 2, 9000), {}),                     # rows longer than one chunk (4096)
    ("layer_norm", (5, 4103), {}),                        # inner rows across lane tails and tiles
    ("group_norm", (2, 6, 1500), {"g": 3}),
])
def test_tile_and_chunk_boundaries_match_reference(mode, shape, sizes):
    x = 7 + RNG.standard_normal(shape)
    dy = RNG.standard_normal(shape)
    p = nc.param_shapes(mode, shape, **sizes)["weight"]
    w, b = RNG.standard_normal(p), RNG.standard_normal(p)
    y, cache = nc.normalize(x, mode, weight=w, bias=b, **sizes)
    ref = reference_forward(x, mode, weight=w, bias=b, **sizes)
    np.testing.assert_allclose(y, ref.y, rtol=1e-10, atol=1e-10)
    for got, want in zip(nc.backward(dy, cache), reference_backward(dy, ref), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_out_arguments_are_written_and_checked():
    x = RNG.standard_normal((6, 4, 5)).astype(np.float32)
    dy = RNG.standard_normal(x.shape).astype(np.float32)
    for mode, sizes in (("batch_norm", {}), ("layer_norm", {}), ("group_norm", {"g": 2}),
                        (nc.Mode("a b c -> b", params="c"), {})):  # the last one is transposed
        y_ref, cache = nc.normalize(x, mode, **sizes)
        out = np.empty_like(x)
        y, cache = nc.normalize(x, mode, out=out, **sizes)
        assert y is out and np.array_equal(out, y_ref)
        dx_ref = nc.backward(dy, cache)[0]
        dout = np.full_like(x, np.nan)
        dx = nc.backward(dy, cache, out=dout)[0]
        assert dx is dout and np.array_equal(dx, dx_ref)
    for bad, exc in ((np.empty((6, 4, 5), np.float64), TypeError), (np.empty((6, 4)), TypeError),
                     (np.empty((6, 4, 4), np.float32), ValueError),
                     (np.empty((5, 4, 6), np.float32).transpose(2, 1, 0), ValueError),
                     (x, ValueError), ([0.0], TypeError)):
        with pytest.raises(exc, match=r"^out\b"):
            nc.normalize(x, "batch_norm", out=bad)
    with pytest.raises(ValueError, match=r"^out: must not share memory with dy"):
        nc.backward(dy, cache, out=dy)
    y, _ = nc.layer_norm(x, (5,), out=np.empty_like(x))
    assert y.shape == x.shape


def test_layers_reuse_buffers_when_asked():
    bn = nc.BatchNorm2d(3)
    x = RNG.standard_normal((4, 3, 5, 5)).astype(np.float32)
    dy = RNG.standard_normal(x.shape).astype(np.float32)
    fresh = [bn(x), bn.backward(dy)]
    assert not np.shares_memory(bn(x), fresh[0])
    bn.reuse_buffers = True
    y1 = bn(x)
    dx1 = bn.backward(dy)
    y2 = bn(x.copy())
    dx2 = bn.backward(dy)
    assert y1 is y2 and dx1 is dx2
    assert np.allclose(y2, fresh[0], atol=1e-5) and np.allclose(dx2, fresh[1], atol=1e-5)
    assert bn(np.ones((2, 3, 5, 5), np.float32)).shape == (2, 3, 5, 5)  # a new shape: a new buffer
    chained = bn(bn(x))  # the input is the layer's own buffer: it gets another one
    assert chained.shape == x.shape and np.isfinite(chained).all()
    bcn = nc.BatchChannelNorm(4, 2)
    bcn.reuse_buffers = True
    assert bcn.batch_norm.reuse_buffers and bcn.channel_norm.reuse_buffers


def test_set_num_threads():
    try:
        nc.set_num_threads(1)
        assert nc.get_num_threads() == 1
        with pytest.raises(ValueError, match=r"^n: expected at least 1"):
            nc.set_num_threads(0)
        with pytest.raises(TypeError, match=r"^n"):
            nc.set_num_threads(1.5)
    finally:
        nc.set_num_threads(None)
    assert nc.get_num_threads() == kernels.K.max_threads()


def test_kernels_release_the_gil_and_are_reentrant():
    # normalize from several Python threads at once gives the same results as one by one
    from concurrent.futures import ThreadPoolExecutor
    xs = [RNG.standard_normal((64, 32, 40)).astype(np.float32) for _ in range(6)]
    dy = RNG.standard_normal((64, 32, 40)).astype(np.float32)

    def run(x):
        y, cache = nc.normalize(x, "batch_norm")
        return y, nc.backward(dy, cache)[0]

    expected = [run(x) for x in xs]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(run, xs))
    for (y, dx), (ye, dxe) in zip(got, expected, strict=True):
        assert np.array_equal(y, ye) and np.array_equal(dx, dxe)


@pytest.mark.parametrize("spec, params, running, shape, sizes", [
    ("b t (h d) -> b h", "(h d)", None, (3, 5, 2 * 40), {"h": 2}),      # parameters along the rows
    ("b t (h d) -> b h", "h", None, (3, 5, 2 * 40), {"h": 2}),          # one parameter per row
    ("n c h w -> n h", "c", "h", (4, 3, 2, 36), {}),                    # running statistics
    ("a b c d -> a c", None, None, (2, 3, 4, 33), {}),
])
def test_non_adjacent_kept_axes_are_normalized_in_place(spec, params, running, shape, sizes):
    mode = nc.Mode(spec, params=params, running_stats=running)
    plan = make_plan(mode, shape, sizes)
    assert plan.perm is None and plan.scattered is not None  # no transpose of x
    x = 30 + RNG.standard_normal(shape)
    dy = RNG.standard_normal(shape)
    kw = dict(sizes)
    if params:
        kw["weight"] = RNG.standard_normal(plan.param_shape)
        kw["bias"] = RNG.standard_normal(plan.param_shape)
    if running:
        kw["running_mean"] = RNG.standard_normal(plan.running_shape)
        kw["running_var"] = RNG.uniform(0.5, 2, plan.running_shape)
    for training in (True, False) if running else (True,):
        call = {k: (v.copy() if k.startswith("running") else v) for k, v in kw.items()}
        ref_call = {k: (v.copy() if k.startswith("running") else v) for k, v in kw.items()}
        y, cache = nc.normalize(x, mode, training=training, **call)
        ref = reference_forward(x, mode, training=training, **ref_call)
        np.testing.assert_allclose(y, ref.y, rtol=1e-10, atol=1e-10)
        if running and training:
            np.testing.assert_allclose(call["running_mean"], ref.running_mean, rtol=1e-12)
            np.testing.assert_allclose(call["running_var"], ref.running_var, rtol=1e-12)
        got, want = nc.backward(dy, cache), reference_backward(dy, ref)
        for g, r in zip(got, want, strict=True):
            assert (g is None) == (r is None)
            if g is not None:
                np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-9)


# Outputs of 8 MiB up to 32 MiB are written with streaming stores (kernels.pxi,
# STREAM_BYTES): same values, other instructions, an aligned head peeled off each row.
@pytest.mark.parametrize("mode, shape, sizes", [
    ("batch_norm", (16, 8, 33000), {}),               # row passes
    ("batch_norm_channels_last", (70001, 61), {}),    # contiguous column tiles, odd width
    ("group_norm", (8, 64, 8300), {"g": 8}),          # groups of rows with per-row parameters
])
def test_streamed_outputs_keep_the_contract(build, mode, shape, sizes):
    rng = np.random.default_rng(5)
    x = (2 + rng.standard_normal(shape)).astype(np.float32)
    assert 16 * 2**20 <= x.nbytes < 32 * 2**20
    dy = rng.standard_normal(shape).astype(np.float32)
    p = nc.param_shapes(mode, shape, **sizes)["weight"]
    w, b = rng.standard_normal(p).astype(np.float32), rng.standard_normal(p).astype(np.float32)
    # into resident out= buffers (fresh pages are written with normal stores)
    y, dx = np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float32)
    assert kernels.K.streaming(y) and kernels.K.streaming(dx)
    _, cache = nc.normalize(x, mode, weight=w, bias=b, out=y, **sizes)
    nc.backward(dy, cache, out=dx)
    ref = reference_forward(x, mode, weight=w, bias=b, **sizes)
    for got, want in ((y, ref.y), (dx, reference_backward(dy, ref)[0])):
        assert float(np.abs(got - want).max()) <= 3 * _rounding_floor(want)


def _fresh(shape, dtype, skip=0):
    # an out= array on pages not yet touched (written with plain stores: kernels.pxi,
    # _streams), ``skip`` elements past the start of its mapping
    import mmap
    n = int(np.prod(shape)) + skip
    return np.frombuffer(mmap.mmap(-1, n * np.dtype(dtype).itemsize), dtype)[skip:].reshape(shape)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("mode, shape, sizes", [
    ("batch_norm", (16, 8, 33000), {}),        # row passes, one coefficient set per row
    ("layer_norm", (4200, 1022), {}),          # groups of one row, weight along the row
    ("group_norm", (8, 64, 8300), {"g": 8}),   # groups of rows with per-row parameters
])
def test_streamed_and_plain_stores_give_the_same_bits(build, mode, shape, sizes, dtype):
    # Streamed rows are peeled to a line boundary in part vectors; a large array's data
    # starts 16 bytes past a line, and one element further on here, so every row has a head
    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(8)
    x = (2 + rng.standard_normal(shape)).astype(dt)
    dy = rng.standard_normal(shape).astype(dt)
    p = nc.param_shapes(mode, shape, **sizes)["weight"]
    w, b = rng.standard_normal(p).astype(np.float32), rng.standard_normal(p).astype(np.float32)
    for skip in (0, 1):
        plain = [_fresh(shape, dt, skip) for _ in range(2)]
        streamed = [np.full(int(np.prod(shape)) + skip, np.nan, dt)[skip:].reshape(shape) for _ in range(2)]
        assert kernels.K.streaming(streamed[0]) and not (sys.platform.startswith("linux")
                                                         and kernels.K.streaming(plain[0]))
        for y, dx in (plain, streamed):
            _, cache = nc.normalize(x, mode, weight=w, bias=b, out=y, **sizes)
            nc.backward(dy, cache, out=dx)
        for a, c in zip(plain, streamed, strict=True):
            assert np.array_equal(a, c), (mode, dtype, skip)


def test_streaming_needs_a_large_output_already_in_memory():
    import mmap
    region = mmap.mmap(-1, 12 * 2**20)  # a fresh anonymous mapping: no page touched yet
    fresh = np.frombuffer(region, np.float32)
    if sys.platform.startswith("linux"):  # elsewhere residency is not asked: always streams
        assert not kernels.K.streaming(fresh)
    fresh.fill(0.0)
    assert kernels.K.streaming(fresh)
    assert not kernels.K.streaming(np.full(2**20, 1.0, np.float32))  # 4 MiB: below the size
    del fresh
    region.close()


def test_streamed_layer_norm_rows_equal_the_same_rows_computed_small(build):
    rng = np.random.default_rng(6)
    x = np.ascontiguousarray(rng.standard_normal((4200, 1023)).astype(np.float32)[:, 1:])
    assert 16 * 2**20 <= x.nbytes < 32 * 2**20
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w, b = rng.standard_normal(1022).astype(np.float32), rng.standard_normal(1022).astype(np.float32)
    y, dx = np.full(x.shape, np.nan, np.float32), np.full(x.shape, np.nan, np.float32)
    _, cache = nc.normalize(x, "layer_norm", weight=w, bias=b, out=y)
    nc.backward(dy, cache, out=dx)
    out = np.full((x.shape[0] * x.shape[1] + 1,), np.nan, np.float32)[1:].reshape(x.shape)  # misaligned
    assert kernels.K.streaming(out)
    nc.normalize(x, "layer_norm", weight=w, bias=b, out=out)
    assert np.array_equal(out, y)
    for rows in (slice(0, 5), slice(2000, 2003), slice(4190, 4200)):
        ys, cs = nc.normalize(x[rows], "layer_norm", weight=w, bias=b)
        assert np.array_equal(ys, y[rows])
        assert np.array_equal(nc.backward(dy[rows], cs)[0], dx[rows])


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("mode, shape, sizes", [
    ("layer_norm", (40, 100), {}),              # fused, weight along the rows, lane tails
    ("rms_norm", (6, 2100), {}),                # fused, unpaired last row
    ("group_norm", (4, 8, 9, 9), {"g": 4}),     # fused, per-row weights
    ("batch_norm", (16, 3, 20), {}),            # separate add pass; dh in the row dx pass
    ("batch_norm_channels_last", (300, 40), {}),  # column tiles (backward_cols) with dh
    ("batch_norm_per_activation", (64, 50), {}),
])
def test_add_normalize_is_bitwise_in_every_build(build, mode, shape, sizes, dtype):
    # the fused kernels' h = x + r and dx + dh round as NumPy's adds, in every build; eval
    # too (running statistics: no gradient through the statistics)
    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(15)
    x, r, dy, dh = ((1 + rng.standard_normal(shape)).astype(dt) for _ in range(4))
    p = nc.param_shapes(mode, shape, **sizes)["weight"]
    kw = {"weight": rng.standard_normal(p).astype(np.float32 if dt.itemsize == 2 else dt), **sizes}
    y, h, cache = nc.add_normalize(x, r, mode, **kw)
    y0, cache0 = nc.normalize(x + r, mode, **kw)
    bits = f"u{dt.itemsize}"
    assert np.array_equal(h.view(bits), (x + r).view(bits)) and np.array_equal(y.view(bits), y0.view(bits))
    got, want = nc.backward(dy, cache, dh=dh), nc.backward(dy, cache0)
    assert np.array_equal(got[0].view(bits), (want[0] + dh).view(bits))
    assert np.array_equal(got[1], want[1])
    m = nc.get_mode(mode)
    if m.running_stats is not None:
        run = nc.param_shapes(mode, shape, **sizes)["running_mean"]
        rkw = {"running_mean": np.zeros(run, kw["weight"].dtype), "running_var": np.ones(run, kw["weight"].dtype),
               "training": False}
        _, _, cache = nc.add_normalize(x, r, mode, **kw, **rkw)
        _, cache0 = nc.normalize(x + r, mode, **kw, **rkw)
        got, want = nc.backward(dy, cache, dh=dh), nc.backward(dy, cache0)
        assert np.array_equal(got[0].view(bits), (want[0] + dh).view(bits))


@pytest.mark.parametrize("offset", [0.0, 1e2, 1e4])
@pytest.mark.parametrize("name", ACCURACY_MODES)
def test_masked_float32_within_three_times_the_floor_in_every_build(build, name, offset):
    # the masked kernels (compact masks of step 0 and 1, and masks of x's shape) keep the
    # float32 contract of the plain ones, in every build: y, dx, dweight, dbias against
    # the float64 reference of the masked statistics. dy is 0 where not counted, as from a
    # loss that ignores the padding: a gradient there adds to sums divided by the counted
    # elements only, which makes dx a difference of terms up to (elements / counted) times
    # larger than itself (README, "Masked statistics")
    mode = nc.get_mode(name)
    sizes = {"g": 4} if "g k" in mode.spec else {}
    for shape in ((16, 8, 12), (6, 16, 101)):
        rng = np.random.default_rng(int(offset) + len(name) + 7)
        x = (offset + rng.standard_normal(shape)).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        plan = make_plan(mode, shape, sizes)
        w = rng.standard_normal(plan.param_shape).astype(np.float32)
        kw = {"weight": w} if mode.center is False else {"weight": w, "bias": rng.standard_normal(w.shape).astype(np.float32)}
        for mshape in (shape, (shape[0], 1, shape[2]), (shape[0], shape[1], 1), (1,) + shape[1:]):
            mask = rng.random(mshape) < 0.6
            mask.reshape(mshape[0], -1)[:, :2] = True
            y, cache = nc.normalize(x, name, mask=mask, **kw, **sizes)
            ref = reference_forward(x, name, mask=mask, **kw, **sizes)
            dy = np.where(mask, dy, 0).astype(np.float32)
            dx, dw, db = nc.backward(dy, cache)
            rdx, rdw, rdb = reference_backward(dy, ref)
            for what, got, want in (("y", y, ref.y), ("dx", dx, rdx), ("dweight", dw, rdw), ("dbias", db, rdb)):
                if got is None:
                    continue
                ratio = float(np.abs(got.astype(np.float64) - want).max()) / _rounding_floor(want)
                assert ratio <= 3.0, (what, shape, mshape, ratio)


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
