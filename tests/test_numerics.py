"""Numerics at the edges: float32 near its maximum, large magnitudes and offsets, NaN only where the
README says (statistics that do not exist), and no warnings on the way."""
import warnings

import numpy as np
import pytest

import normcore as nc
from normcore.reference import reference_forward
from normcore.testing import run_ranks

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


# -- extreme magnitudes ----------------------------------------------------------------------

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


# -- NaN only where the README says; no warnings ----------------------------------------

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
