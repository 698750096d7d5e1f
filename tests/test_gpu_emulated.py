"""The CUDA kernels, run on the host by the emulator in tests/conftest.py (``emulated_gpu``):
the CPU property suite through the GPU launch code for every mode, and shapes that cross
the kernels' block, tile and stripe boundaries, against the CPU kernels."""
import numpy as np
import pytest

import normcore as nc
from normcore.reference import reference_forward
from normcore.testing import check_mode

MODES = [("batch_norm", {}), ("batch_norm_channels_last", {}), ("batch_norm_per_activation", {}),
         ("layer_norm", {}), ("rms_norm", {}), ("instance_norm", {}), ("group_norm", {"g": 2}),
         ("channel_norm", {"g": 2}), ("weight_standardize", {})]


@pytest.mark.parametrize("name, sizes", MODES, ids=[m for m, _ in MODES])
def test_emulated_gpu_properties(emulated_gpu, name, sizes):
    check_mode(name, max_examples=8, **sizes)
    assert emulated_gpu.launches > 0  # the CUDA kernels did the work


def test_emulated_gpu_user_mode(emulated_gpu):
    if "emu_head_norm" not in nc.modes():
        nc.register_mode("emu_head_norm", "b t (h d) -> b h", params="(h d)", h=2)
    check_mode("emu_head_norm", max_examples=8)


BOUNDARY_CASES = [
    ("batch_norm", (3, 2, 700), {}),                  # rows of 700: 256 threads, strided tail
    ("batch_norm", (5, 3, 40), {}),                   # 32-thread blocks, partial warp of data
    ("batch_norm_channels_last", (300, 70), {}),      # 3 column tiles (32), 3 row blocks, stripes
    ("batch_norm_per_activation", (129, 33), {}),     # row block boundary at 128
    ("layer_norm", (7, 300), {}),                     # parameters along S (inner family)
    ("group_norm", (2, 6, 90), {"g": 3}),
    ("instance_norm", (2, 3, 65), {}),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode, shape, sizes", BOUNDARY_CASES)
def test_emulated_gpu_matches_cpu_across_boundaries(request, mode, shape, sizes, dtype):
    rng = np.random.default_rng(9)
    x = (3 + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    shapes = nc.param_shapes(mode, shape, **sizes)
    kw = {}
    if shapes["weight"] is not None:
        kw = {"weight": rng.standard_normal(shapes["weight"]).astype(dtype),
              "bias": rng.standard_normal(shapes["weight"]).astype(dtype)}
    def step():
        run = {}
        if shapes["running_mean"] is not None:
            run = {"running_mean": np.zeros(shapes["running_mean"], dtype), "running_var": np.ones(shapes["running_mean"], dtype)}
        y, cache = nc.normalize(x, mode, **kw, **run, **sizes)
        return (y, *nc.backward(dy, cache), *run.values())

    _emulated_matches_cpu(request, step, dtype)


def _emulated_matches_cpu(request, step, dtype):
    """``step()`` on the CPU, then through the emulated CUDA kernels: the same results
    within the float type's tolerance. Returns the emulated backend."""
    cpu = step()
    be = request.getfixturevalue("emulated_gpu")  # from here on the CUDA kernels compute
    emulated = step()
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for a, b in zip(emulated, cpu, strict=True):
        if a is None:
            assert b is None
            continue
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * max(1.0, float(np.abs(b).max())))
    return be


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode, shape, sizes", BOUNDARY_CASES)
def test_emulated_gpu_masked_matches_cpu_across_boundaries(request, mode, shape, sizes, dtype):
    # masks of every density per group (some groups empty), through the masked kernels
    rng = np.random.default_rng(19)
    x = (3 + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    mask = rng.random(shape) < rng.random(shape[:2] + (1,) * (len(shape) - 2))
    def step():
        y, cache = nc.normalize(x, mode, mask=mask, **sizes)
        return y, nc.backward(dy, cache)[0]

    be = _emulated_matches_cpu(request, step, dtype)
    assert {"nc_masked_moments_rows", "nc_masked_moments_cols"} & be.launched
    assert {"nc_masked_dx_rows", "nc_masked_dx_cols", "nc_masked_dx_inner"} & be.launched


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mode, shape, sizes", BOUNDARY_CASES)
def test_emulated_gpu_masked_dx_adds_dh_in_its_own_pass(emulated_gpu, mode, shape, sizes, dtype):
    # the masked dx kernels add dh after dx's rounding: the same bits as dx + dh
    rng = np.random.default_rng(23)
    x = (3 + rng.standard_normal(shape)).astype(dtype)
    dy, dh = rng.standard_normal((2,) + shape).astype(dtype)
    mask = rng.random(shape) < 0.7
    y, cache = nc.normalize(x, mode, mask=mask, **sizes)
    assert cache.route.dh_in_dx
    np.testing.assert_array_equal(nc.backward(dy, cache, dh=dh)[0], nc.backward(dy, cache)[0] + dh)


def test_emulated_gpu_float16_layer_norm(emulated_gpu):
    x = (2 + np.random.default_rng(10).standard_normal((8, 300))).astype(np.float16)
    w = np.random.default_rng(11).standard_normal(300).astype(np.float16)
    y, cache = nc.normalize(x, "layer_norm", weight=w, bias=w)
    ref = reference_forward(x.astype(np.float64), "layer_norm", weight=w.astype(np.float64), bias=w.astype(np.float64))
    assert y.dtype == np.float16
    # float32 accumulation, one float16 rounding of y: a few units in the last place
    assert np.abs(y.astype(np.float64) - ref.y).max() <= 4 * 2.0 ** -11 * np.abs(ref.y).max()
    dx, dw, db = nc.backward(np.ones_like(x), cache)
    assert dx.dtype == dw.dtype == np.float16


def test_emulated_gpu_bfloat16(emulated_gpu):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    x = (2 + np.random.default_rng(12).standard_normal((6, 4, 50))).astype(bf16)
    y, _ = nc.normalize(x, "batch_norm")
    ref = reference_forward(x.astype(np.float64), "batch_norm")
    assert y.dtype == bf16
    assert np.abs(y.astype(np.float64) - ref.y).max() <= 4 * 2.0 ** -8 * np.abs(ref.y).max()


def test_emulated_gpu_rms_norm_default_eps_in_bfloat16(emulated_gpu):
    # eps=None takes the input dtype's machine epsilon, which NumPy's finfo cannot give
    # for bfloat16
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.random.default_rng(13).standard_normal((4, 64)).astype(ml_dtypes.bfloat16)
    y, cache = nc.rms_norm(x, 64)
    layer = nc.RMSNorm(64, dtype=ml_dtypes.bfloat16)
    assert layer(x).dtype == x.dtype == y.dtype
