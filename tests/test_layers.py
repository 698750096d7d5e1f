"""Layer behaviour: running statistics, train/eval, gradient accumulation, save/load, bias=False,
unbatched instance norm, and errors that name the public class."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import normcore as nc
from layer_cases import _OneRank, _x, _state, _same_state

RNG = np.random.default_rng(1)


def data(*shape, dtype=np.float32, offset=0.0):
    return (offset + RNG.standard_normal(shape)).astype(dtype)


def test_batchnorm_running_stats_follow_torch_convention():
    bn = nc.BatchNorm2d(3, momentum=0.1)
    x = data(8, 3, 4, 4)
    bn(x)
    xd = x.astype(np.float64)
    mean = xd.mean(axis=(0, 2, 3))
    var_unbiased = xd.var(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(bn.running_mean, 0.1 * mean, rtol=1e-6)
    np.testing.assert_allclose(bn.running_var, 0.9 + 0.1 * var_unbiased, rtol=1e-6)
    assert bn.num_batches_tracked == 1


def test_biased_running_var_option():
    bn = nc.BatchNorm1d(5, momentum=1.0, unbiased=False, dtype=np.float64)
    x = data(6, 5, dtype=np.float64)
    bn(x)
    np.testing.assert_allclose(bn.running_var, x.var(axis=0), rtol=1e-12)


def test_momentum_none_is_cumulative_average():
    bn = nc.BatchNorm1d(4, momentum=None, dtype=np.float64)
    batches = [data(10, 4, dtype=np.float64, offset=k) for k in range(3)]
    for b in batches:
        bn(b)
    np.testing.assert_allclose(bn.running_mean, np.mean([b.mean(0) for b in batches], axis=0), rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, np.mean([b.var(0, ddof=1) for b in batches], axis=0), rtol=1e-12)
    assert bn.num_batches_tracked == 3


def test_eval_uses_running_stats_and_changes_nothing():
    bn = nc.BatchNorm2d(3, dtype=np.float64)
    bn.weight[:] = [1.0, 2.0, -1.0]
    bn.bias[:] = [0.0, 0.5, 1.0]
    bn(data(8, 3, 2, 2, dtype=np.float64))
    state = bn.state_dict()
    bn.eval()
    assert not bn.training
    x = data(2, 3, 2, 2, dtype=np.float64)
    y = bn(x)
    rm, rv = bn.running_mean[None, :, None, None], bn.running_var[None, :, None, None]
    expected = (x - rm) / np.sqrt(rv + bn.eps) * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    # eval backward: statistics are constants
    dy = data(2, 3, 2, 2, dtype=np.float64)
    dx = bn.backward(dy)
    np.testing.assert_allclose(dx, dy * (bn.weight / np.sqrt(bn.running_var + bn.eps))[None, :, None, None],
                               rtol=1e-12)


def test_batchnorm_without_tracking_uses_batch_stats_in_eval():
    bn = nc.BatchNorm1d(3, track_running_stats=False, dtype=np.float64).eval()
    x = data(5, 3, dtype=np.float64)
    np.testing.assert_allclose(bn(x), (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5), rtol=1e-12)
    assert bn.running_mean is None and bn.num_batches_tracked is None


@pytest.mark.parametrize("factory, shape", [
    (lambda: nc.BatchNorm2d(3), (4, 3, 2, 2)),
    (lambda: nc.BatchNorm2d(3, channel_axis=-1), (4, 2, 2, 3)),
    (lambda: nc.LayerNorm((2, 3)), (4, 2, 3)),
    (lambda: nc.GroupNorm(2, 4), (3, 4, 5)),
    (lambda: nc.ChannelNorm(4, 2), (3, 4, 5)),
    (lambda: nc.RMSNorm(6), (3, 6)),
    (lambda: nc.InstanceNorm1d(3, affine=True), (2, 3, 5)),
    (lambda: nc.EstimatedBatchNorm(3), (4, 3, 5)),
])
def test_gradients_accumulate_until_zero_grad(factory, shape):
    steps = [(data(*shape), data(*shape)) for _ in range(2)]
    separate, layer = factory(), factory()
    singles = []
    for x, d in steps:
        separate.zero_grad()
        separate(x)
        separate.backward(d)
        singles.append([None if g is None else g.copy() for g in (separate.grad_weight, separate.grad_bias)])
        layer(x)
        layer.backward(d)
    np.testing.assert_allclose(layer.grad_weight, singles[0][0] + singles[1][0], rtol=1e-6, atol=1e-6)
    assert not np.allclose(singles[0][0], singles[1][0])
    if layer.grad_bias is not None:
        np.testing.assert_allclose(layer.grad_bias, singles[0][1] + singles[1][1], rtol=1e-6, atol=1e-6)
    layer.zero_grad()
    assert not layer.grad_weight.any()
    assert layer.grad_bias is None or not layer.grad_bias.any()


def test_estimated_batchnorm_normalizes_with_updated_running_stats():
    ebn = nc.EstimatedBatchNorm(3, momentum=0.5, dtype=np.float64)
    x = data(6, 3, 4, dtype=np.float64, offset=2.0)
    y = ebn(x)
    mean = x.mean(axis=(0, 2))
    var = x.var(axis=(0, 2), ddof=1)
    rm, rv = 0.5 * mean, 0.5 + 0.5 * var
    np.testing.assert_allclose(ebn.running_mean, rm, rtol=1e-12)
    np.testing.assert_allclose(y, (x - rm[:, None]) / np.sqrt(rv[:, None] + 1e-5), rtol=1e-10)
    dy = data(6, 3, 4, dtype=np.float64)
    np.testing.assert_allclose(ebn.backward(dy), dy / np.sqrt(rv[:, None] + 1e-5), rtol=1e-12)


def test_batch_channel_norm_is_batch_norm_then_channel_norm():
    for estimate in (True, False):
        bcn = nc.BatchChannelNorm(4, 2, estimate=estimate, dtype=np.float64)
        bcn.channel_norm.weight[:] = [2.0, 0.5]
        x = data(5, 4, 3, dtype=np.float64)
        y = bcn(x)
        bn = nc.EstimatedBatchNorm(4, dtype=np.float64) if estimate else nc.BatchNorm1d(4, dtype=np.float64)
        cn = nc.ChannelNorm(4, 2, dtype=np.float64)
        cn.weight[:] = [2.0, 0.5]
        np.testing.assert_allclose(y, cn(bn(x)), rtol=1e-12)
        dy = data(5, 4, 3, dtype=np.float64)
        np.testing.assert_allclose(bcn.backward(dy), bn.backward(cn.backward(dy)), rtol=1e-12)
        np.testing.assert_allclose(bcn.channel_norm.grad_weight, cn.grad_weight, rtol=1e-12)
        assert set(bcn.state_dict()) >= {"batch_norm.running_mean", "channel_norm.weight"}
        bcn.eval()
        assert not bcn.batch_norm.training and not bcn.channel_norm.training


def test_instance_norm_running_stats_average_over_batch():
    inorm = nc.InstanceNorm2d(3, track_running_stats=True, momentum=1.0, dtype=np.float64)
    x = data(4, 3, 5, 5, dtype=np.float64)
    inorm(x)
    np.testing.assert_allclose(inorm.running_mean, x.mean(axis=(2, 3)).mean(0), rtol=1e-12)
    np.testing.assert_allclose(inorm.running_var, x.var(axis=(2, 3), ddof=1).mean(0), rtol=1e-12)
    inorm.eval()
    y = inorm(x)
    expected = (x - inorm.running_mean[:, None, None]) / np.sqrt(inorm.running_var[:, None, None] + 1e-5)
    np.testing.assert_allclose(y, expected, rtol=1e-12)


def test_float64_layers():
    for layer, shape in ((nc.LayerNorm(5, dtype=np.float64), (3, 5)), (nc.GroupNorm(1, 2, dtype="float64"), (3, 2, 4))):
        x = data(*shape, dtype=np.float64)
        y = layer(x)
        assert y.dtype == np.float64 and layer.weight.dtype == np.float64


def test_rmsnorm_default_eps_is_machine_epsilon():
    x = np.full((1, 4), 1e-5, np.float32)
    y = nc.RMSNorm(4)(x)
    expected = x / np.sqrt(np.float64(1e-10) + np.finfo(np.float32).eps)
    np.testing.assert_allclose(y, expected, rtol=1e-6)


SAVE_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, normcore as nc
    layer = {ctor}
    layer.load(sys.argv[1])
    layer.eval()
    x = np.load(sys.argv[2])
    np.save(sys.argv[3], layer(x))
""")


@pytest.mark.parametrize("ctor, shape", [
    ("nc.BatchNorm2d(3)", (4, 3, 5, 5)),
    ("nc.BatchChannelNorm(4, 2)", (4, 4, 3)),
    ("nc.InstanceNorm1d(3, affine=True, track_running_stats=True)", (4, 3, 6)),
])
@pytest.mark.slow  # a fresh interpreter or compiler
def test_train_save_load_in_fresh_process_is_bit_identical(tmp_path, ctor, shape):
    layer = eval(ctor)
    for _ in range(3):
        x = data(*shape, offset=3.0)
        layer(x)
        layer.backward(data(*shape))
    for name in ("weight", "bias"):
        for target in (layer, *layer._children().values()):
            p = getattr(target, name, None)
            if p is not None:
                p += RNG.standard_normal(p.shape).astype(p.dtype)
    layer.eval()
    x = data(*shape, offset=3.0)
    y = layer(x)
    layer.save(tmp_path / "model.npz")
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "load.py"
    script.write_text(SAVE_SCRIPT.format(ctor=ctor))
    # the fresh process imports the same normcore as this one
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(nc.__file__)))
    subprocess.run([sys.executable, str(script), str(tmp_path / "model.npz"), str(tmp_path / "x.npy"),
                    str(tmp_path / "y.npy")], check=True, env=env)
    y2 = np.load(tmp_path / "y.npy")
    assert y2.dtype == y.dtype
    assert np.array_equal(y, y2)
    assert layer.state_dict().keys() == dict(np.load(tmp_path / "model.npz")).keys()


# -- small contracts ----------------------------------------------------------------------

def test_to_drops_every_kept_buffer():
    ln = nc.LayerNorm(5)
    ln.reuse_buffers = True
    x = _x((3, 5))
    y, h = ln.forward_add(x, x)
    dx = ln.backward(np.ones_like(y))
    ln.to("cpu")
    y2, h2 = ln.forward_add(x, x)
    dx2 = ln.backward(np.ones_like(y))
    assert y2 is not y and h2 is not h and dx2 is not dx
    with pytest.raises(RuntimeError, match="before forward"):
        ln.to("cpu").backward(np.ones_like(y))


def test_fold_of_a_half_layer_returns_its_param_dtype():
    bn = nc.BatchNorm2d(3, dtype=np.float16).eval()
    scale, shift = bn.fold()
    assert scale.dtype == shift.dtype == bn.param_dtype == np.float32
    assert "param_dtype" in nc.BatchNorm2d.fold.__doc__


@pytest.mark.slow  # a fresh interpreter or compiler
def test_an_empty_normcore_kernels_variable_is_the_default():
    env = dict(os.environ, NORMCORE_KERNELS="")
    code = "import normcore.kernels as k; print(k.VARIANT == k.available_variants()[0])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(nc.__file__))))
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr


# -- bias=False ---------------------------------------------------------------------------

BIAS_LAYERS = [
    (lambda **k: nc.BatchNorm1d(4, **k), (8, 4)), (lambda **k: nc.BatchNorm2d(4, **k), (6, 4, 3, 3)),
    (lambda **k: nc.BatchNorm3d(4, **k), (4, 4, 2, 2, 2)), (lambda **k: nc.GroupNorm(2, 4, **k), (6, 4, 5)),
    (lambda **k: nc.InstanceNorm1d(4, affine=True, **k), (6, 4, 5)),
    (lambda **k: nc.InstanceNorm2d(4, affine=True, track_running_stats=True, **k), (6, 4, 3, 3)),
    (lambda **k: nc.InstanceNorm3d(4, affine=True, **k), (3, 4, 2, 2, 2)),
    (lambda **k: nc.ChannelNorm(4, 2, **k), (6, 4, 5)), (lambda **k: nc.EstimatedBatchNorm(4, **k), (6, 4, 5)),
    (lambda **k: nc.SyncBatchNorm(4, comm=_OneRank(), **k), (6, 4, 5)),
    (lambda **k: nc.LayerNorm(5, **k), (6, 4, 5)),
]



@pytest.mark.parametrize("make, shape", BIAS_LAYERS)
def test_bias_false_gives_a_scale_alone(make, shape):
    layer, full = make(bias=False), make()
    assert layer.bias is None and layer.grad_bias is None and layer.weight is not None
    assert "bias" not in layer.state_dict() and "bias" in full.state_dict()
    assert "bias=False" in repr(layer)
    x, dy = _x(shape, offset=1.0), _x(shape)
    y, y_full = layer(x), full(x)
    np.testing.assert_array_equal(y, y_full)  # the bias is zero at construction
    np.testing.assert_array_equal(layer.backward(dy), full.backward(dy))
    np.testing.assert_array_equal(layer.grad_weight, full.grad_weight)
    if getattr(layer, "running_mean", None) is not None:
        layer.eval()
        layer.weight[...] = 2.0
        scale, shift = layer.fold(ndim=len(shape)) if layer._fold_ndim is None else layer.fold()
        np.testing.assert_allclose(x * scale + shift, layer(x), rtol=1e-5, atol=1e-5)


def test_batch_channel_norm_bias_false():
    bcn = nc.BatchChannelNorm(4, 2, bias=False)
    assert bcn.batch_norm.bias is None and bcn.channel_norm.bias is None
    assert not any(k.endswith("bias") for k in bcn.state_dict())
    y = bcn(_x((6, 4, 5)))
    bcn.backward(np.ones_like(y))


# -- instance norm without the batch axis -------------------------------------------------

@pytest.mark.parametrize("cls, shape", [(nc.InstanceNorm1d, (3, 7)), (nc.InstanceNorm2d, (3, 4, 5)),
                                        (nc.InstanceNorm3d, (3, 2, 3, 4))])
@pytest.mark.parametrize("kw", [{}, {"affine": True}, {"affine": True, "track_running_stats": True}])
def test_instance_norm_takes_unbatched_input_as_a_batch_of_one(cls, shape, kw):
    one, batch = cls(3, **kw), cls(3, **kw)
    x, dy = _x(shape, offset=2.0), _x(shape)
    y = one(x)
    assert y.shape == shape
    np.testing.assert_array_equal(y, batch(x[None])[0])
    np.testing.assert_array_equal(one.backward(dy), batch.backward(dy[None])[0])
    assert _same_state(_state(one), _state(batch))
    y, h = one.forward_add(x, x)
    assert h.shape == shape and np.array_equal(h, x + x)
    np.testing.assert_array_equal(y, batch.forward_add(x[None], x[None])[0][0])
    mask = np.ones(shape[1:], bool)
    mask.flat[0] = False
    np.testing.assert_array_equal(one(x, mask=mask), batch(x[None], mask=mask)[0])
    one.eval(), batch.eval()
    np.testing.assert_array_equal(one(x), batch(x[None])[0])
    with pytest.raises(ValueError, match="expects"):
        one(x[0])


def test_only_instance_norm_takes_unbatched_input():
    with pytest.raises(ValueError, match="BatchNorm2d expects 4-D input"):
        nc.BatchNorm2d(3)(_x((3, 4, 5)))
    with pytest.raises(ValueError, match="expected 3 channels .* on axis 0"):
        nc.InstanceNorm2d(3)(_x((4, 4, 5)))


# -- errors name the public class --------------------------------------------------------

@pytest.mark.parametrize("cls", [getattr(nc, n) for n in nc.layers.__all__])
def test_a_misspelled_keyword_names_the_public_class(cls):
    with pytest.raises(TypeError, match=rf"^{cls.__name__}\(\): got an unexpected keyword argument 'epss'"):
        cls(4, 2, epss=1e-3) if cls in (nc.GroupNorm, nc.ChannelNorm, nc.BatchChannelNorm) else cls(4, epss=1e-3)
    with pytest.raises(TypeError, match=rf"^{cls.__name__}\(\): missing a required argument"):
        cls()
