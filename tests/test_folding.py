"""Inference folding: layer.fold(), normcore.fold and normcore.fold_into."""
import numpy as np
import pytest

import normcore as nc
from layer_cases import _OneRank

RNG = np.random.default_rng(11)


def _trained(layer, x, steps=3):
    """Run a few training steps so the running statistics are not their initial values,
    with non-trivial parameters; return the layer in eval mode."""
    if layer.weight is not None:
        layer.weight[...] = 1 + RNG.standard_normal(layer.weight.shape)
    if layer.bias is not None:
        layer.bias[...] = RNG.standard_normal(layer.bias.shape)
    for _ in range(steps):
        layer(x)
    return layer.eval()


@pytest.mark.parametrize("make, shape, ndim", [
    (lambda: nc.BatchNorm1d(5, dtype=np.float64), (16, 5), None),
    (lambda: nc.BatchNorm1d(5, dtype=np.float64), (16, 5, 7), 3),
    (lambda: nc.BatchNorm2d(5, dtype=np.float64), (8, 5, 4, 3), None),
    (lambda: nc.BatchNorm3d(5, dtype=np.float64), (4, 5, 2, 3, 2), None),
    (lambda: nc.BatchNorm2d(5, channel_axis=-1, dtype=np.float64), (8, 4, 3, 5), None),
    (lambda: nc.EstimatedBatchNorm(5, dtype=np.float64), (8, 5, 6), 3),
    (lambda: nc.InstanceNorm2d(5, affine=True, track_running_stats=True, dtype=np.float64), (4, 5, 6, 6), None),
    (lambda: nc.BatchNorm2d(5, affine=False, dtype=np.float64), (8, 5, 3, 3), None),
])
def test_eval_output_is_x_times_scale_plus_shift(make, shape, ndim):
    x = 3 + 2 * RNG.standard_normal(shape)
    layer = _trained(make(), x)
    scale, shift = layer.fold(ndim)
    assert scale.dtype == shift.dtype == layer.dtype
    np.testing.assert_allclose(x * scale + shift, layer(x), rtol=1e-12, atol=1e-12)


def test_float32_fold_is_rounded_once_from_float64():
    bn = nc.BatchNorm2d(4)
    _trained(bn, RNG.standard_normal((8, 4, 3, 3)).astype(np.float32))
    scale, shift = bn.fold()
    w, b = bn.weight.astype(np.float64), bn.bias.astype(np.float64)
    s64 = w / np.sqrt(bn.running_var.astype(np.float64) + bn.eps)
    assert scale.dtype == np.float32
    assert np.array_equal(scale.ravel(), s64.astype(np.float32))
    assert np.array_equal(shift.ravel(), (b - bn.running_mean.astype(np.float64) * s64).astype(np.float32))


@pytest.mark.parametrize("layer, says", [
    (nc.LayerNorm(4), "statistics of that input"),
    (nc.GroupNorm(2, 4), "statistics of that input"),
    (nc.RMSNorm(4), "statistics of that input"),
    (nc.BatchNorm2d(4, track_running_stats=False), "track_running_stats=False"),
    (nc.InstanceNorm2d(4), "track_running_stats=False"),
    (nc.BatchChannelNorm(4, 2), "statistics of that input"),
])
def test_layers_whose_eval_output_is_not_affine_refuse_to_fold(layer, says):
    with pytest.raises(ValueError, match=says):
        layer.fold()


def test_any_rank_layers_need_the_rank():
    with pytest.raises(ValueError, match="ndim: EstimatedBatchNorm takes"):
        nc.EstimatedBatchNorm(3).eval().fold()
    with pytest.raises(ValueError, match="ndim"):
        nc.BatchNorm2d(3).eval().fold(ndim=1)


def test_functional_fold_matches_the_layer_and_handles_no_parameters():
    rm, rv = RNG.standard_normal(3), 1 + RNG.random(3)
    scale, shift = nc.fold(rm, rv, eps=1e-3)
    np.testing.assert_allclose(scale, 1 / np.sqrt(rv + 1e-3))
    np.testing.assert_allclose(shift, -rm / np.sqrt(rv + 1e-3))
    scale, shift = nc.fold(None, rv, weight=np.full(3, 2.0), bias=np.ones(3), eps=1e-3, center=False)
    np.testing.assert_allclose(scale, 2 / np.sqrt(rv + 1e-3))
    assert (shift == 1).all()
    with pytest.raises(ValueError, match="running_mean"):
        nc.fold(None, rv)
    with pytest.raises(ValueError, match="weight: expected shape"):
        nc.fold(rm, rv, weight=np.ones(4))
    with pytest.raises(ValueError, match="eps"):
        nc.fold(rm, rv, eps=0.0)


demo = pytest.importorskip("normcore.demo.nets", reason="the demo's layers need the demo extra")


@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_then_batch_norm_equals_the_folded_conv(with_bias):
    conv = demo.Conv2d(3, 6, np.random.default_rng(1), np.float64)
    if with_bias:
        conv.bias[...] = RNG.standard_normal(6)
    bn = nc.BatchNorm2d(6, dtype=np.float64)
    x = RNG.standard_normal((8, 3, 9, 9))
    _trained(bn, conv.forward(x))
    want = bn(conv.forward(x))
    w, b = nc.fold_into(conv.weight, conv.bias if with_bias else None, bn, axis=0)
    conv.weight, conv.bias = w, b
    np.testing.assert_allclose(conv.forward(x), want, rtol=1e-10, atol=1e-10)


def test_linear_then_batch_norm_equals_the_folded_linear():
    lin = demo.Linear(7, 5, np.random.default_rng(2), np.float32)
    bn = nc.BatchNorm1d(5)
    x = RNG.standard_normal((32, 7)).astype(np.float32)
    _trained(bn, lin.forward(x))
    want = bn(lin.forward(x))
    w, b = nc.fold_into(lin.weight, lin.bias, bn, axis=1)  # x @ weight: outputs along axis 1
    assert w.dtype == b.dtype == np.float32
    np.testing.assert_allclose(x @ w + b, want, rtol=1e-5, atol=1e-5)
    # a (scale, shift) pair serves as well as the layer
    w2, b2 = nc.fold_into(lin.weight, lin.bias, bn.fold(), axis=1)
    assert np.array_equal(w, w2) and np.array_equal(b, b2)


def test_fold_into_rejects_mismatches():
    bn = nc.BatchNorm2d(4).eval()
    with pytest.raises(ValueError, match="axis 1 has 3 output channels, but norm has 4"):
        nc.fold_into(np.ones((4, 3, 3, 3), np.float32), None, bn, axis=1)
    with pytest.raises(ValueError, match="axis: expected an axis of weight"):
        nc.fold_into(np.ones((4, 3), np.float32), None, bn, axis=2)
    with pytest.raises(ValueError, match=r"bias: expected shape \(4,\)"):
        nc.fold_into(np.ones((4, 3), np.float32), np.ones(3, np.float32), bn, axis=0)
    with pytest.raises(ValueError, match="LayerNorm"):
        nc.fold_into(np.ones((4, 3), np.float32), None, nc.LayerNorm(4), axis=0)
    with pytest.raises(TypeError, match="norm: expected a normalization layer"):
        nc.fold_into(np.ones((4, 3), np.float32), None, "bn", axis=0)


# -- folding needs eval mode ----------------------------------------------------------------

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
