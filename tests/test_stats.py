"""Running statistics: the decay-style running-average convention (decay=) beside PyTorch's
momentum, and the one counts rule for a group in training, with a mask or without."""
import numpy as np
import pytest

import normcore as nc
from layer_cases import _x
from normcore import cs231n

RNG = np.random.default_rng(21)


def _batch_stats(x, axes):
    n = np.prod([x.shape[a] for a in axes])
    return x.mean(axis=axes), x.var(axis=axes) * n / (n - 1)


@pytest.mark.parametrize("decay", [0.99, 0.9, 0.0, 1.0, 0.3])
def test_normalize_updates_running_statistics_by_the_decay_formula(decay):
    x = 2 + RNG.standard_normal((16, 3, 5, 5))
    rm, rv = RNG.standard_normal(3), 1 + RNG.random(3)
    old_m, old_v = rm.copy(), rv.copy()
    nc.normalize(x, "batch_norm", running_mean=rm, running_var=rv, decay=decay)
    mean, var = _batch_stats(x, (0, 2, 3))
    np.testing.assert_allclose(rm, decay * old_m + (1 - decay) * mean, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(rv, decay * old_v + (1 - decay) * var, rtol=1e-14, atol=1e-15)
    if decay == 1.0:  # keep exactly: the update multiplies by decay itself, not by 1 - (1 - decay)
        assert np.array_equal(rm, old_m) and np.array_equal(rv, old_v)


def test_decay_matches_the_equivalent_momentum():
    x = RNG.standard_normal((32, 4)).astype(np.float32)
    a = [np.zeros(4, np.float32), np.ones(4, np.float32)]
    b = [np.zeros(4, np.float32), np.ones(4, np.float32)]
    ya, _ = nc.normalize(x, "batch_norm", running_mean=a[0], running_var=a[1], decay=0.75)
    yb, _ = nc.normalize(x, "batch_norm", running_mean=b[0], running_var=b[1], momentum=0.25)
    assert np.array_equal(ya, yb)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-6)


@pytest.mark.parametrize("call", [
    lambda x, rm, rv, **kw: nc.normalize(x, "batch_norm", running_mean=rm, running_var=rv, **kw),
    lambda x, rm, rv, **kw: nc.batch_norm(x, rm, rv, training=True, **kw),
    lambda x, rm, rv, **kw: nc.instance_norm(x, rm, rv, **kw),
])
def test_both_conventions_at_once_is_an_error_naming_both_and_writes_nothing(call):
    x = RNG.standard_normal((4, 3, 6)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    for momentum in (0.1, 0.2, None):  # an explicit 0.1 counts as given
        with pytest.raises(ValueError, match="momentum, decay: give one of them"):
            call(x, rm, rv, momentum=momentum, decay=0.9)
    with pytest.raises(ValueError, match=r"decay: expected a float in \[0, 1\], got 1.5"):
        call(x, rm, rv, decay=1.5)
    with pytest.raises(TypeError, match="decay"):
        call(x, rm, rv, decay="0.9")
    assert (rm == 0).all() and (rv == 1).all()
    call(x, rm, rv, decay=0.5)  # the forms pass decay through
    assert not (rm == 0).all()


@pytest.mark.parametrize("make", [
    lambda **kw: nc.BatchNorm1d(3, **kw), lambda **kw: nc.BatchNorm1d(3, channel_axis=-1, **kw),
    lambda **kw: nc.EstimatedBatchNorm(3, **kw), lambda **kw: nc.SyncBatchNorm(3, **kw),
    lambda **kw: nc.InstanceNorm1d(3, track_running_stats=True, **kw),
])
def test_layers_take_decay_and_show_it_in_their_repr(make):
    layer = make(decay=0.95, dtype=np.float64)
    assert layer.decay == 0.95 and layer.momentum == pytest.approx(0.05)
    text = repr(layer)
    assert "decay=0.95" in text and "momentum" not in text
    assert "momentum=0.1" in repr(make(dtype=np.float64)) and "decay" not in repr(make(dtype=np.float64))
    x = RNG.standard_normal((6, 3) if isinstance(layer, nc.BatchNorm1d) else (6, 3, 4))
    if getattr(layer, "channel_axis", 1) == -1:
        x = RNG.standard_normal((6, 4, 3))
    layer(x)
    ref = make(momentum=0.05, dtype=np.float64)
    ref(x)
    np.testing.assert_allclose(layer.running_mean, ref.running_mean, rtol=1e-12)
    with pytest.raises(ValueError, match="momentum, decay"):
        make(momentum=0.2, decay=0.9)


def test_batch_channel_norm_passes_decay_to_its_batch_norm():
    bcn = nc.BatchChannelNorm(4, 2, decay=0.8)
    assert bcn.batch_norm.decay == 0.8 and "decay=0.8" in repr(bcn)


def test_cs231n_momentum_is_a_decay():
    x = RNG.standard_normal((10, 4))
    bn_param = {"mode": "train", "momentum": 0.9, "running_mean": np.ones(4), "running_var": np.ones(4)}
    cs231n.batchnorm_forward(x, np.ones(4), np.zeros(4), bn_param)
    np.testing.assert_allclose(bn_param["running_mean"], 0.9 + 0.1 * x.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(bn_param["running_var"], 0.9 + 0.1 * x.var(axis=0), rtol=1e-14)


# -- one counts rule, with a mask or without ----------------------------------------------

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
