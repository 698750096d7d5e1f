"""The float64 reference against hand-written formulas, and normcore against PyTorch."""
import numpy as np
import pytest

import normcore as nc
from normcore.reference import reference_backward, reference_forward

RNG = np.random.default_rng(3)
EPS = 1e-5


def norm(x, axes, center=True):
    mean = x.mean(axis=axes, keepdims=True) if center else 0.0
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS)


def test_reference_matches_textbook_formulas():
    x = RNG.standard_normal((4, 6, 3, 5))
    w6 = RNG.standard_normal(6)
    cases = [
        ("batch_norm", {}, {"weight": w6}, norm(x, (0, 2, 3)) * w6[None, :, None, None]),
        ("layer_norm", {}, {}, norm(x, (3,))),
        ("rms_norm", {}, {}, norm(x, (3,), center=False)),
        ("instance_norm", {}, {}, norm(x, (2, 3))),
        ("group_norm", {"g": 2}, {"weight": w6},
         norm(x.reshape(4, 2, 3, 3, 5), (2, 3, 4)).reshape(x.shape) * w6[None, :, None, None]),
        ("channel_norm", {"g": 3}, {"bias": np.arange(3.0)},
         norm(x.reshape(4, 3, 2, 3, 5), (2, 3, 4)).reshape(x.shape) + np.repeat(np.arange(3.0), 2)[None, :, None, None]),
        ("batch_norm_channels_last", {}, {}, norm(x, (0, 1, 2))),
        ("weight_standardize", {}, {}, norm(x, (1, 2, 3))),
    ]
    for mode, sizes, params, expected in cases:
        ref = reference_forward(x, mode, **params, **sizes)
        np.testing.assert_allclose(ref.y, expected, rtol=1e-12, atol=1e-12, err_msg=mode)


def test_reference_backward_matches_finite_differences():
    x = RNG.standard_normal((3, 4, 2))
    dy = RNG.standard_normal(x.shape)
    w = RNG.standard_normal(4)
    ref = reference_forward(x, "batch_norm", weight=w)
    dx, dw, _ = reference_backward(dy, ref)
    h = 1e-6
    num = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        num[i] = ((reference_forward(xp, "batch_norm", weight=w).y - reference_forward(xm, "batch_norm", weight=w).y) * dy).sum() / (2 * h)
    np.testing.assert_allclose(dx, num, rtol=1e-6, atol=1e-7)


torch = pytest.importorskip("torch", reason="PyTorch is an optional oracle")


def _t(a):
    return torch.tensor(a, dtype=torch.float64, requires_grad=True)


def _check(ours, theirs, what):
    np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-9, atol=1e-10, err_msg=what)


@pytest.mark.parametrize("layer, tlayer, shape, to_torch", [
    (lambda: nc.BatchNorm2d(4, dtype=np.float64), lambda: torch.nn.BatchNorm2d(4), (5, 4, 3, 3), None),
    (lambda: nc.BatchNorm1d(4, dtype=np.float64), lambda: torch.nn.BatchNorm1d(4), (6, 4), None),
    (lambda: nc.BatchNorm2d(4, channel_axis=-1, dtype=np.float64), lambda: torch.nn.BatchNorm2d(4), (5, 3, 3, 4),
     (0, 3, 1, 2)),
    (lambda: nc.LayerNorm((3, 5), dtype=np.float64), lambda: torch.nn.LayerNorm((3, 5)), (4, 3, 5), None),
    (lambda: nc.GroupNorm(2, 6, dtype=np.float64), lambda: torch.nn.GroupNorm(2, 6), (3, 6, 4), None),
    (lambda: nc.InstanceNorm2d(3, affine=True, track_running_stats=True, dtype=np.float64),
     lambda: torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True), (4, 3, 5, 5), None),
    (lambda: nc.RMSNorm(6, dtype=np.float64), lambda: torch.nn.RMSNorm(6), (4, 6), None),
])
def test_layers_match_pytorch(layer, tlayer, shape, to_torch):
    ours, theirs = layer(), tlayer().double()
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64))
    if ours.weight is not None:
        ours.weight[...] = theirs.weight.detach().numpy()
    if getattr(ours, "bias", None) is not None:
        ours.bias[...] = theirs.bias.detach().numpy()
    for training in (True, True, False):
        ours.train(training)
        theirs.train(training)
        x = 2.0 + RNG.standard_normal(shape)
        dy = RNG.standard_normal(shape)
        perm = to_torch or tuple(range(len(shape)))
        xt = _t(x.transpose(perm))
        yt = theirs(xt)
        yt.backward(torch.tensor(dy.transpose(perm)))
        y = ours(x)
        dx = ours.backward(dy)
        _check(y.transpose(perm), yt, "y")
        _check(dx.transpose(perm), xt.grad, "dx")
        _check(ours.grad_weight, theirs.weight.grad, "dweight")
        if getattr(ours, "bias", None) is not None:
            _check(ours.grad_bias, theirs.bias.grad, "dbias")
        if ours.running_mean is not None:
            _check(ours.running_mean, theirs.running_mean, "running_mean")
            _check(ours.running_var, theirs.running_var, "running_var")
