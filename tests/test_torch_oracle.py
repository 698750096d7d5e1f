"""normcore layers against PyTorch (float64), when PyTorch is installed: an optional oracle."""
import numpy as np
import pytest

import normcore as nc

RNG = np.random.default_rng(4)

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
