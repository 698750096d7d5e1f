"""normcore.cs231n against the CS231n assignment's formulas."""
import numpy as np
import pytest

from normcore import cs231n

RNG = np.random.default_rng(5)
EPS = 1e-5


def textbook_bn_train(x, gamma, beta, rm, rv, momentum):
    mu, var = x.mean(0), x.var(0)
    xhat = (x - mu) / np.sqrt(var + EPS)
    return xhat * gamma + beta, momentum * rm + (1 - momentum) * mu, momentum * rv + (1 - momentum) * var


def textbook_bn_backward(dout, x, gamma):
    n = x.shape[0]
    mu, var = x.mean(0), x.var(0)
    xhat = (x - mu) / np.sqrt(var + EPS)
    dgamma, dbeta = (dout * xhat).sum(0), dout.sum(0)
    dx = gamma / np.sqrt(var + EPS) / n * (n * dout - dbeta - xhat * dgamma)
    return dx, dgamma, dbeta


def test_batchnorm_train_and_test_follow_the_assignment():
    x = 3 + 2 * RNG.standard_normal((20, 5))
    gamma, beta = RNG.standard_normal(5), RNG.standard_normal(5)
    bn_param = {"mode": "train", "momentum": 0.8}
    out, cache = cs231n.batchnorm_forward(x, gamma, beta, bn_param)
    y, rm, rv = textbook_bn_train(x, gamma, beta, np.zeros(5), np.zeros(5), 0.8)
    np.testing.assert_allclose(out, y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bn_param["running_mean"], rm, rtol=1e-12)
    np.testing.assert_allclose(bn_param["running_var"], rv, rtol=1e-12)
    dout = RNG.standard_normal(x.shape)
    for fn in (cs231n.batchnorm_backward, cs231n.batchnorm_backward_alt):
        for got, want in zip(fn(dout, cache), textbook_bn_backward(dout, x, gamma), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    bn_param["mode"] = "test"
    out, _ = cs231n.batchnorm_forward(x, gamma, beta, bn_param)
    np.testing.assert_allclose(out, (x - rm) / np.sqrt(rv + EPS) * gamma + beta, rtol=1e-12)


def test_unknown_mode_raises_and_leaves_param_alone():
    bn_param = {"mode": "eval"}
    with pytest.raises(ValueError, match='Invalid forward batchnorm mode "eval"'):
        cs231n.batchnorm_forward(np.ones((3, 2)), np.ones(2), np.zeros(2), bn_param)
    assert bn_param == {"mode": "eval"}


def test_layernorm_matches_the_formula():
    x = RNG.standard_normal((4, 7))
    gamma, beta = RNG.standard_normal(7), RNG.standard_normal(7)
    out, cache = cs231n.layernorm_forward(x, gamma, beta, {"eps": EPS})
    mu, var = x.mean(1, keepdims=True), x.var(1, keepdims=True)
    xhat = (x - mu) / np.sqrt(var + EPS)
    np.testing.assert_allclose(out, xhat * gamma + beta, rtol=1e-12, atol=1e-12)
    dout = RNG.standard_normal(x.shape)
    dx, dgamma, dbeta = cs231n.layernorm_backward(dout, cache)
    g = dout * gamma
    expected = (g - g.mean(1, keepdims=True) - xhat * (g * xhat).mean(1, keepdims=True)) / np.sqrt(var + EPS)
    np.testing.assert_allclose(dx, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dgamma, (dout * xhat).sum(0), rtol=1e-12)
    np.testing.assert_allclose(dbeta, dout.sum(0), rtol=1e-12)


def test_spatial_batchnorm_is_batchnorm_over_nhw():
    x = RNG.standard_normal((3, 4, 5, 2))
    gamma, beta = RNG.standard_normal(4), RNG.standard_normal(4)
    out, cache = cs231n.spatial_batchnorm_forward(x, gamma, beta, {"mode": "train"})
    flat = x.transpose(0, 2, 3, 1).reshape(-1, 4)
    y, _, _ = textbook_bn_train(flat, gamma, beta, np.zeros(4), np.zeros(4), 0.9)
    np.testing.assert_allclose(out, y.reshape(3, 5, 2, 4).transpose(0, 3, 1, 2), rtol=1e-12, atol=1e-12)
    dout = RNG.standard_normal(x.shape)
    dx, dgamma, dbeta = cs231n.spatial_batchnorm_backward(dout, cache)
    rdx, rdg, rdb = textbook_bn_backward(dout.transpose(0, 2, 3, 1).reshape(-1, 4), flat, gamma)
    np.testing.assert_allclose(dx, rdx.reshape(3, 5, 2, 4).transpose(0, 3, 1, 2), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dgamma, rdg, rtol=1e-10)


def test_spatial_groupnorm_shapes_and_values():
    x = RNG.standard_normal((2, 6, 3, 3))
    gamma, beta = RNG.standard_normal((1, 6, 1, 1)), RNG.standard_normal((1, 6, 1, 1))
    out, cache = cs231n.spatial_groupnorm_forward(x, gamma, beta, 3, {"eps": EPS})
    g = x.reshape(2, 3, -1)
    xhat = ((g - g.mean(2, keepdims=True)) / np.sqrt(g.var(2, keepdims=True) + EPS)).reshape(x.shape)
    np.testing.assert_allclose(out, xhat * gamma + beta, rtol=1e-12, atol=1e-12)
    dx, dgamma, dbeta = cs231n.spatial_groupnorm_backward(RNG.standard_normal(x.shape), cache)
    assert dx.shape == x.shape and dgamma.shape == (1, 6, 1, 1) and dbeta.shape == (1, 6, 1, 1)
