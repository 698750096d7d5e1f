"""The float64 reference against hand-written formulas, and normcore against PyTorch."""
import numpy as np

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
