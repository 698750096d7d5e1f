"""Every bad input raises ValueError/TypeError naming the argument and changes nothing."""
import re

import numpy as np
import pytest

import normcore as nc

RNG = np.random.default_rng(0)


def x32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def snapshot(layer):
    state = {k: v.copy() for k, v in layer.state_dict().items()}
    for name in ("grad_weight", "grad_bias"):
        g = getattr(layer, name, None)
        if g is not None:
            state[name] = g.copy()
    return state


def assert_unchanged(layer, before):
    after = snapshot(layer)
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)


def trained_bn(n=3):
    bn = nc.BatchNorm2d(n)
    bn(x32(4, n, 2, 2))
    bn.backward(x32(4, n, 2, 2))
    return bn


LAYER_FORWARD_CASES = [
    # (layer factory, bad input, exception, argument named in the message)
    (lambda: trained_bn(), x32(4, 3, 2), ValueError, "x"),                      # wrong ndim
    (lambda: trained_bn(), x32(4, 5, 2, 2), ValueError, "x"),                   # channel mismatch
    (lambda: trained_bn(), RNG.standard_normal((4, 3, 2, 2)), TypeError, "x"),  # float64 into float32
    (lambda: trained_bn(), np.ones((4, 3, 2, 2), np.int64), TypeError, "x"),
    (lambda: trained_bn(), np.ones((4, 3, 2, 2), bool), TypeError, "x"),
    (lambda: trained_bn(), np.ones((4, 3, 2, 2), np.complex64), TypeError, "x"),
    (lambda: trained_bn(), np.ones((4, 3, 2, 2), object), TypeError, "x"),
    (lambda: trained_bn(), [[1.0]], TypeError, "x"),
    (lambda: trained_bn(), x32(1, 3, 1, 1), ValueError, "x"),                   # one value per channel
    (lambda: nc.BatchNorm1d(4), x32(1, 4), ValueError, "x"),
    (lambda: nc.InstanceNorm1d(4, track_running_stats=True), x32(2, 4, 1), ValueError, "x"),
    (lambda: nc.GroupNorm(2, 4), x32(2, 6, 3), ValueError, "x"),
    (lambda: nc.LayerNorm((3, 4)), x32(2, 4, 3), ValueError, "x"),
    (lambda: nc.ChannelNorm(4, 2), x32(4), ValueError, "x"),
    (lambda: nc.BatchChannelNorm(4, 2), x32(2, 6, 3), ValueError, "x"),
]


@pytest.mark.parametrize("factory, x, exc, arg", LAYER_FORWARD_CASES)
def test_layer_forward_bad_input(factory, x, exc, arg):
    layer = factory()
    before = snapshot(layer)
    nbt = getattr(layer, "num_batches_tracked", None)
    with pytest.raises(exc, match=rf"^{arg}\b"):
        layer(x)
    assert_unchanged(layer, before)
    assert getattr(layer, "num_batches_tracked", None) == nbt


@pytest.mark.parametrize("dy, exc", [
    (x32(2, 3, 2, 2), ValueError),              # shape of another call
    (RNG.standard_normal((4, 3, 2, 2)), TypeError),
    (np.ones((4, 3, 2, 2), np.int32), TypeError),
    ("dy", TypeError),
])
def test_layer_backward_bad_dy_leaves_grads(dy, exc):
    bn = trained_bn()
    bn(x32(4, 3, 2, 2))
    before = snapshot(bn)
    with pytest.raises(exc, match=r"^dy\b"):
        bn.backward(dy)
    assert_unchanged(bn, before)


def test_backward_before_forward():
    with pytest.raises(RuntimeError, match="before forward"):
        nc.LayerNorm(3).backward(x32(2, 3))


def test_backward_with_cache_from_another_shape():
    _, cache = nc.normalize(x32(4, 3), "layer_norm")
    with pytest.raises(ValueError, match=r"^dy: expected shape \(4, 3\)"):
        nc.backward(x32(3, 4), cache)
    with pytest.raises(TypeError, match=r"^cache"):
        nc.backward(x32(4, 3), {"not": "a cache"})


@pytest.mark.parametrize("ctor, exc, arg", [
    (lambda: nc.GroupNorm(3, 8), ValueError, "num_groups"),
    (lambda: nc.ChannelNorm(8, 3), ValueError, "groups"),
    (lambda: nc.BatchChannelNorm(8, 3), ValueError, "groups"),
    (lambda: nc.BatchNorm2d(3, eps=0.0), ValueError, "eps"),
    (lambda: nc.BatchNorm2d(3, eps=-1e-5), ValueError, "eps"),
    (lambda: nc.LayerNorm(3, eps=float("nan")), ValueError, "eps"),
    (lambda: nc.BatchNorm2d(3, momentum=1.5), ValueError, "momentum"),
    (lambda: nc.BatchNorm2d(3, momentum=-0.1), ValueError, "momentum"),
    (lambda: nc.BatchNorm2d(0), ValueError, "num_features"),
    (lambda: nc.BatchNorm2d(3, channel_axis=2), ValueError, "channel_axis"),
    (lambda: nc.LayerNorm(()), ValueError, "normalized_shape"),
    (lambda: nc.BatchNorm2d(3, dtype=np.int32), TypeError, "dtype"),
    (lambda: nc.RMSNorm(4, dtype=np.complex64), TypeError, "dtype"),
])
def test_constructor_errors(ctor, exc, arg):
    with pytest.raises(exc, match=rf"^{arg}\b"):
        ctor()


def test_half_precision_parameters_are_x_dtype_or_float32():
    # beside a float16 x, weight/bias/running statistics may be float16 or float32 (mixed,
    # as PyTorch's CPU kernels); any other dtype, or a pair split across dtypes, is refused
    x = np.ones((4, 3, 2), np.float16)
    w16, w32 = np.ones(3, np.float16), np.ones(3, np.float32)
    for bad in (np.ones(3), np.ones(3, np.int32)):
        with pytest.raises(TypeError, match=r"^weight: expected x's dtype float16 or float32, got dtype"):
            nc.normalize(x, "batch_norm", weight=bad)
    with pytest.raises(TypeError, match=r"^weight/bias: expected one dtype for both, got float16 and float32"):
        nc.normalize(x, "batch_norm", weight=w16, bias=w32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float16)
    with pytest.raises(TypeError, match=r"^running_mean/running_var: expected one dtype"):
        nc.normalize(x, "batch_norm", running_mean=rm, running_var=rv)
    assert (rm == 0).all() and (rv == 1).all()  # refused before anything is written
    # a float32 x keeps the one-dtype rule
    with pytest.raises(TypeError, match=r"^weight: dtype float16 does not match x's dtype float32"):
        nc.normalize(x.astype(np.float32), "batch_norm", weight=w16)
    with pytest.raises(TypeError, match=r"^x: expected float32, float64, float16 or bfloat16 \(ml_dtypes.bfloat16\)"):
        nc.normalize(np.ones((2, 4), np.int8), "layer_norm")


def running():
    return np.zeros(3, np.float32), np.ones(3, np.float32)


FUNCTIONAL_CASES = [
    (dict(weight=np.ones(4, np.float32)), ValueError, "weight"),
    (dict(bias=np.ones((3, 1), np.float32)), ValueError, "bias"),
    (dict(weight=np.ones(3, np.float64)), TypeError, "weight"),
    (dict(running_mean=np.zeros(4, np.float32), running_var=np.ones(4, np.float32)), ValueError, "running_mean"),
    (dict(running_mean=np.zeros(3, np.float32), running_var=np.ones(2, np.float32)), ValueError, "running_var"),
    (dict(running_mean=np.zeros(3, np.float64), running_var=np.ones(3, np.float64)), TypeError, "running_mean"),
    (dict(running_var=None), ValueError, "running_mean/running_var"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(eps="small"), TypeError, "eps"),
    (dict(momentum=1.01), ValueError, "momentum"),
    (dict(momentum=-0.5), ValueError, "momentum"),
    (dict(momentum=None), ValueError, "momentum"),
    (dict(momentum=float("inf")), ValueError, "momentum"),
    (dict(estimate=True, training=False), ValueError, "estimate"),
    (dict(c=5), ValueError, "x"),
    (dict(q=5), TypeError, "unexpected keyword argument"),
]


@pytest.mark.parametrize("kw, exc, arg", FUNCTIONAL_CASES)
def test_normalize_bad_arguments_leave_running_stats(kw, exc, arg):
    rm, rv = running()
    call = {"running_mean": rm, "running_var": rv}
    call.update(kw)
    before = {k: v.copy() for k, v in call.items() if isinstance(v, np.ndarray)}
    with pytest.raises(exc, match=rf"^{re.escape(arg)}\b"):
        nc.normalize(x32(4, 3, 2), "batch_norm", **call)
    for k, v in before.items():
        np.testing.assert_array_equal(call[k], v)


def test_read_only_running_stats_rejected_before_update():
    rm, rv = running()
    rm.setflags(write=False)
    with pytest.raises(ValueError, match=r"^running_mean: must be writeable"):
        nc.normalize(x32(4, 3), "batch_norm", running_mean=rm, running_var=rv)
    np.testing.assert_array_equal(rv, np.ones(3))


def test_mode_errors():
    with pytest.raises(ValueError, match=r"^mode: unknown mode 'nope'"):
        nc.normalize(x32(2, 3), "nope")
    with pytest.raises(TypeError, match=r"^mode"):
        nc.normalize(x32(2, 3), 3)
    with pytest.raises(ValueError, match=r"^weight/bias: .*no affine"):
        nc.normalize(x32(2, 3), "weight_standardize", weight=np.ones(3, np.float32))
    with pytest.raises(ValueError, match=r"^running_mean: .*keeps no running"):
        nc.normalize(x32(2, 3), "layer_norm", running_mean=np.zeros(2, np.float32),
                     running_var=np.ones(2, np.float32))


def test_functional_forms_errors():
    with pytest.raises(ValueError, match=r"^num_groups \(3\) does not divide input's channels \(8\)"):
        nc.group_norm(x32(2, 8, 4), 3)
    with pytest.raises(ValueError, match=r"^x: axis \(g k\) of size 8 is not divisible by g=3"):
        nc.normalize(x32(2, 8, 4), "group_norm", g=3)
    with pytest.raises(ValueError, match=r"^normalized_shape"):
        nc.layer_norm(x32(2, 8), (4,))
    with pytest.raises(ValueError, match=r"^input"):
        nc.instance_norm(x32(2, 8))
    with pytest.raises(ValueError, match=r"^channel_axis"):
        nc.batch_norm(x32(2, 8, 3, 3), channel_axis=2)
    with pytest.raises(ValueError, match=r"^w"):
        nc.weight_standardize(x32(5))
    with pytest.raises(ValueError, match=r"^x: expected at least 2 dimensions"):
        nc.normalize(x32(5), "batch_norm")
    with pytest.raises(ValueError, match=r"^x: expected 2 dimensions, got 3"):
        nc.normalize(x32(2, 3, 4), "batch_norm_per_activation")


@pytest.mark.parametrize("spec, token", [
    ("n (c h -> c", "unbalanced parenthesis '\\('"),
    ("n c) h -> c", "unbalanced parenthesis '\\)'"),
    ("n ((c h)) -> c", "nested parenthesis"),
    ("n c c -> c", "duplicate axis 'c'"),
    ("n c -> c c", "duplicate axis 'c'"),
    ("n c -> d", "axis 'd' on the right is missing on the left"),
    ("n ... c ... -> c", "two '...'"),
    ("n c", "exactly one '->'"),
    ("n -> c -> c", "exactly one '->'"),
    ("n (c ...) -> n", "'...' inside parentheses"),
    ("n () c -> c", "empty group"),
    ("n c* -> c", "invalid token '\\*'"),
    ("n c h -> h c", "must keep their left-hand order"),
    ("n c -> (n c)", "parentheses are not allowed"),
    (" -> ", "no input axes"),
])
def test_malformed_specs_name_spec_and_token(spec, token):
    with pytest.raises(nc.SpecError, match=token) as info:
        nc.Mode(spec)
    assert repr(spec) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_register_mode_errors():
    with pytest.raises(nc.SpecError, match="params axis 'z'"):
        nc.Mode("n c -> c", params="z")
    with pytest.raises(nc.SpecError, match="running_stats axis 'n'"):
        nc.Mode("n c -> c", running_stats="n")
    with pytest.raises(ValueError, match="^running_stats: only centred"):
        nc.Mode("n c -> c", center=False, running_stats="c")
    with pytest.raises(ValueError, match="^name: mode 'batch_norm' is already registered"):
        nc.register_mode("batch_norm", "n c -> c")
    with pytest.raises(ValueError, match="^sizes: axis 'z'"):
        nc.register_mode("bad_sizes", "n c -> c", z=2)
    with pytest.raises(ValueError, match="^sizes: g=0"):
        nc.register_mode("bad_sizes", "n (g k) -> n g", g=0)
    assert "bad_sizes" not in nc.modes()


def test_load_state_dict_checks_everything_first():
    bn = trained_bn()
    before = snapshot(bn)
    state = bn.state_dict()
    state["running_mean"] = np.zeros(4, np.float32)
    state["weight"] = np.full(3, 7, np.float32)
    with pytest.raises(ValueError, match=r"^state\['running_mean'\]: expected shape"):
        bn.load_state_dict(state)
    del state["running_mean"]
    with pytest.raises(ValueError, match=r"^state: missing keys \['running_mean'\]"):
        bn.load_state_dict(state)
    assert_unchanged(bn, before)
