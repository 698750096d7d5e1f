"""Failures an adversarial pass found, each pinned at its cause: extreme magnitudes, files,
construction-time rules, atomic state, pickling, keyword arguments."""
import copy
import pickle

import numpy as np
import pytest

import normcore as nc
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
