"""Every bad input raises ValueError/TypeError naming the argument and changes nothing."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import normcore as nc
from layer_cases import _x
from normcore import cs231n

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


# -- construction-time rules ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [">f4", "<f8" if np.little_endian is False else ">f8", "nope", "int32", object])
@pytest.mark.parametrize("make", [lambda d: nc.BatchNorm2d(3, dtype=d), lambda d: nc.LayerNorm(4, dtype=d),
                                  lambda d: nc.GroupNorm(2, 4, dtype=d), lambda d: nc.BatchChannelNorm(4, 2, dtype=d)])
def test_layers_refuse_dtypes_they_cannot_run(make, dtype):
    with pytest.raises(TypeError, match="^dtype: expected"):
        make(dtype)


@pytest.mark.parametrize("make", [lambda: nc.BatchNorm1d(3, eps=None), lambda: nc.LayerNorm(4, eps=None),
                                  lambda: nc.GroupNorm(2, 4, eps=None), lambda: nc.InstanceNorm1d(3, eps=None),
                                  lambda: nc.BatchChannelNorm(4, 2, eps=None)])
def test_eps_none_is_refused_at_construction(make):
    with pytest.raises(TypeError, match="^eps"):
        make()


def test_rms_norm_eps_none_is_the_machine_epsilon():
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    want, _ = nc.normalize(x, "rms_norm", eps=float(np.finfo(np.float32).eps))
    np.testing.assert_array_equal(nc.RMSNorm(4, eps=None)(x), want)


# -- keywords and sizes ---------------------------------------------------------------------

@pytest.mark.parametrize("call", [lambda **k: nc.normalize(RNG.standard_normal((4, 3)), "batch_norm", **k),
                                  lambda **k: nc.normalize(RNG.standard_normal((2, 4, 3)), "group_norm", g=2, **k),
                                  lambda **k: nc.param_shapes("layer_norm", (4, 3), **k)])
@pytest.mark.parametrize("kw", [{"trainig": False}, {"padding_mask": np.ones((4, 3))}, {"zz": 3}])
def test_an_unknown_keyword_is_a_type_error_naming_it(call, kw):
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{next(iter(kw))}'") as info:
        call(**kw)
    assert "array(" not in str(info.value)


def test_a_size_that_is_not_an_int_is_not_dumped():
    with pytest.raises(ValueError, match="^sizes: g must be a positive int, got numpy.ndarray$"):
        nc.normalize(RNG.standard_normal((2, 4, 3)), "group_norm", g=np.ones(1000))


def test_a_call_cannot_resize_a_registered_mode():
    if "fixed_heads" not in nc.modes():
        nc.register_mode("fixed_heads", "b t (h d) -> b h", params="(h d)", h=2)
    x = RNG.standard_normal((2, 3, 8))
    y, _ = nc.normalize(x, "fixed_heads", h=2)  # the fixed value itself is fine
    with pytest.raises(ValueError, match="^sizes: h=4 conflicts with h=2"):
        nc.normalize(x, "fixed_heads", h=4)
    with pytest.raises(ValueError, match="^sizes: h=4 conflicts"):
        nc.param_shapes("fixed_heads", x.shape, h=4)


@pytest.mark.parametrize("spec", ["n c -> n c", "n ... -> n ...", "(a b) c -> a b c", "n (g k) -> n g k"])
def test_a_spec_that_reduces_nothing_is_refused(spec):
    with pytest.raises(nc.SpecError, match="reduces no axis"):
        nc.Mode(spec)


@pytest.mark.parametrize("spec, params", [("n c -> n", "n"), ("n c h -> n", "n c"), ("(n m) c -> n m", "m"),
                                          ("n c ... -> n c", "n")])
def test_parameters_on_the_kept_batch_axis_are_refused(spec, params):
    with pytest.raises(nc.SpecError, match="leading axis"):
        nc.Mode(spec, params=params)


def test_parameters_on_a_reduced_leading_axis_are_fine():
    y, _ = nc.normalize(RNG.standard_normal(5), nc.Mode("a -> ", params="a"), weight=np.ones(5))
    assert y.shape == (5,)


# -- arrays a call writes never overlap what it reads --------------------------------------

def _overlap_cases():
    x = RNG.standard_normal((8, 3)).astype(np.float32)
    rm, rv, w = np.zeros(3, np.float32), np.ones(3, np.float32), np.ones(3, np.float32)
    buf = np.zeros(30, np.float32)
    out = np.empty(24, np.float32)
    return [
        ("same running arrays", x, dict(running_mean=rm, running_var=rm), "running_mean"),
        ("overlapping running arrays", x, dict(running_mean=buf[:3], running_var=buf[2:5]), "running_mean"),
        ("running mean a view of x", x, dict(running_mean=x[0], running_var=rv), "running_mean"),
        ("running var a view of x", x, dict(running_mean=rm, running_var=x.reshape(-1)[3:6]), "running_var"),
        ("running mean is the weight", x, dict(running_mean=w, running_var=rv, weight=w), "running_mean"),
        ("out over the weight", x, dict(weight=out[:3], out=out.reshape(8, 3)), "out"),
        ("out over the running var", x, dict(running_mean=rm, running_var=out[:3], out=out.reshape(8, 3)), "out"),
    ]


@pytest.mark.parametrize("label, x, kw, blamed", _overlap_cases(), ids=[c[0] for c in _overlap_cases()])
@pytest.mark.parametrize("mode", ["batch_norm", "batch_norm_channels_last"])
def test_overlapping_written_arrays_are_refused_before_anything_is_written(label, x, kw, blamed, mode):
    before = {k: v.copy() for k, v in kw.items()}
    x_before = x.copy()
    with pytest.raises(ValueError, match=f"^{blamed}: must not"):
        nc.normalize(x, mode, **kw)
    np.testing.assert_array_equal(x, x_before)
    for k, v in before.items():
        if k != "out":
            np.testing.assert_array_equal(kw[k], v, err_msg=k)


def test_overlap_rules_hold_at_the_form_and_layer_entries():
    x = RNG.standard_normal((8, 3)).astype(np.float32)
    rm = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="^running_mean: must not be the same array as running_var"):
        nc.batch_norm(x, rm, rm, training=True)
    layer = nc.BatchNorm1d(3)
    layer.running_var = layer.running_mean
    with pytest.raises(ValueError, match="^running_mean: must not"):
        layer(x)
    assert layer.num_batches_tracked == 0
    w = np.ones((3, 4), np.float32)
    out = np.empty(8 * 12, np.float32)
    with pytest.raises(ValueError, match="^out: must not"):
        nc.layer_norm(RNG.standard_normal((8, 3, 4)).astype(np.float32), (3, 4), weight=out[:12].reshape(3, 4),
                      out=out.reshape(8, 3, 4))
    # eval reads the running statistics only: the same array twice is fine there
    y, _ = nc.normalize(x, "batch_norm", running_mean=rm, running_var=np.ones(3, np.float32) + rm * 0, training=False)
    assert y.shape == x.shape


def test_backward_out_must_not_overlap_the_weight():
    x = RNG.standard_normal((8, 3)).astype(np.float32)
    buf = np.ones(24, np.float32)
    y, cache = nc.normalize(x, "batch_norm", weight=buf[:3])
    with pytest.raises(ValueError, match="^out: must not share memory with weight"):
        nc.backward(np.ones_like(y), cache, out=buf.reshape(8, 3))


# -- messages that name the argument --------------------------------------------------------

X45 = np.ones((4, 5), np.float32)


@pytest.mark.parametrize("call, exc, pattern", [
    (lambda: nc.LayerNorm(None), TypeError, "^normalized_shape: expected an int or a sequence"),
    (lambda: nc.LayerNorm(3.5), TypeError, "^normalized_shape: expected an int or a sequence"),
    (lambda: nc.RMSNorm("ab"), TypeError, "^normalized_shape: expected an int or a sequence"),
    (lambda: nc.layer_norm(X45, "ab"), TypeError, "^normalized_shape"),
    (lambda: nc.layer_norm(X45, None), TypeError, "^normalized_shape"),
    (lambda: nc.layer_norm(X45, 5.0), TypeError, "^normalized_shape"),
    (lambda: nc.layer_norm(X45, (5.7,)), TypeError, "^normalized_shape: expected a positive int, got float 5.7"),
    (lambda: nc.Mode(["n", "c"]), TypeError, "^spec: expected a str"),
    (lambda: nc.Mode("n c -> c", sizes=3), TypeError, "^sizes: expected a dict"),
    (lambda: nc.Mode("n c -> c", sizes=[("c", 2, 3)]), TypeError, "^sizes: expected a dict"),
    (lambda: nc.Mode("n c -> c", sizes={"z": 2}), ValueError, "^sizes: axis 'z'"),
    (lambda: nc.BatchNorm2d(3, dtype="nope"), TypeError, "^dtype: expected"),
    (lambda: cs231n.batchnorm_forward([[1.0, 2.0], [3.0, 4.0]], np.ones(2), np.zeros(2), {"mode": "train"}),
     TypeError, "^x: expected a numpy.ndarray"),
    (lambda: cs231n.batchnorm_forward(np.ones(3), np.ones(3), np.zeros(3), {"mode": "train"}),
     ValueError, "^x: expected 2 dimensions"),
    (lambda: cs231n.spatial_batchnorm_forward(np.ones((2, 3)), np.ones(3), np.zeros(3), {"mode": "train"}),
     ValueError, "^x: expected"),
    (lambda: cs231n.batchnorm_forward(np.ones((4, 3)), np.ones(3), np.zeros(3), {"mode": "train", "momentum": 1.5}),
     ValueError, r"^bn_param\['momentum'\]: expected a float in \[0, 1\], got 1.5"),
])
def test_messages_name_the_argument(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_mode_sizes_as_a_dict_are_kept_as_pairs():
    m = nc.Mode("n (g k) -> n g", sizes={"g": 2})
    assert m.sizes == (("g", 2),) and hash(m) == hash(nc.Mode("n (g k) -> n g", sizes=(("g", 2),)))
    y, _ = nc.normalize(np.ones((3, 4)), m)
    assert y.shape == (3, 4)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix itself
def test_out_may_be_an_ndarray_subclass():
    x = RNG.standard_normal((4, 5)).astype(np.float32)
    out = np.matrix(np.zeros((4, 5), np.float32))
    y, cache = nc.normalize(x, "layer_norm", out=out)
    assert y is out
    np.testing.assert_array_equal(np.asarray(y), nc.normalize(x, "layer_norm")[0])


def test_load_of_a_npy_payload_names_the_path(tmp_path):
    path = tmp_path / "w.npz"
    with open(path, "wb") as f:
        np.save(f, np.ones(3))
    with pytest.raises(ValueError, match=r"w\.npz.* is not a normcore checkpoint.*\.npy payload"):
        nc.BatchNorm1d(3).load(path)


def test_a_list_where_an_array_is_needed_advises_numpy():
    y, cache = nc.normalize(_x((2, 3)), "layer_norm")
    with pytest.raises(TypeError, match="^dy: expected a numpy.ndarray.*got list; convert it with numpy.asarray"):
        nc.backward([[1.0, 2.0, 3.0]] * 2, cache)
    with pytest.raises(TypeError, match="numpy.asarray"):
        nc.normalize(_x((2, 3)), "layer_norm", weight=[1.0, 2.0, 3.0])


def test_param_dtype_errors_name_param_dtype():
    with pytest.raises(TypeError, match="^param_dtype: expected"):
        nc.BatchNorm2d(3, dtype=np.float16, param_dtype=">f4")
    with pytest.raises(TypeError, match="^dtype: expected"):
        nc.BatchNorm2d(3, dtype=">f4")


@pytest.mark.parametrize("bad", [[[1.0, 2.0]], (1.0, 2.0), None, 3.0], ids=["list", "tuple", "None", "scalar"])
@pytest.mark.parametrize("call", [
    lambda x: cs231n.batchnorm_forward(x, np.ones(2), np.zeros(2), {"mode": "train"}),
    lambda x: cs231n.layernorm_forward(x, np.ones(2), np.zeros(2), {}),
    lambda x: cs231n.spatial_batchnorm_forward(x, np.ones(2), np.zeros(2), {"mode": "train"}),
    lambda x: cs231n.spatial_groupnorm_forward(x, np.ones((1, 2, 1, 1)), np.zeros((1, 2, 1, 1)), 1, {}),
], ids=["batchnorm", "layernorm", "spatial_batchnorm", "spatial_groupnorm"])
def test_cs231n_forwards_name_a_bad_x(call, bad):
    with pytest.raises(TypeError, match="^x: expected a numpy.ndarray"):
        call(bad)


@pytest.mark.parametrize("call, pattern", [
    (lambda: cs231n.spatial_groupnorm_forward(np.ones((2, 4)), np.ones((1, 4, 1, 1)), np.zeros((1, 4, 1, 1)), 2, {}),
     r"^x: expected 4 dimensions \(N, C, H, W\), got shape \(2, 4\)"),
    (lambda: cs231n.layernorm_forward(np.ones((2, 3, 4)), np.ones(4), np.zeros(4), {}),
     r"^x: expected 2 dimensions \(N, D\)"),
    (lambda: cs231n.spatial_groupnorm_forward(np.ones((2, 4, 3, 3)), np.ones((1, 3, 1, 1)), np.zeros((1, 4, 1, 1)), 2, {}),
     "^gamma: expected shape"),
    (lambda: cs231n.batchnorm_forward(np.ones((2, 3)), np.ones(3), np.zeros(3), None), "^bn_param: expected a dict"),
    (lambda: cs231n.batchnorm_forward(np.ones((2, 3)), np.ones(3), np.zeros(3), {}), "^bn_param: needs 'mode'"),
    (lambda: cs231n.layernorm_forward(np.ones((2, 3)), np.ones(3), np.zeros(3), None), "^ln_param: expected a dict"),
    (lambda: cs231n.spatial_groupnorm_backward(np.ones((2, 4, 3, 3)), None), "^cache: expected"),
])
def test_cs231n_names_the_bad_argument(call, pattern):
    with pytest.raises((TypeError, ValueError), match=pattern):
        call()


# -- the dtype error, whatever has been imported --------------------------------------------

@pytest.mark.slow  # a fresh interpreter or compiler
def test_the_dtype_error_lists_bfloat16_before_ml_dtypes_is_imported():
    code = ("import sys, numpy as np, normcore as nc\n"
            "assert 'ml_dtypes' not in sys.modules\n"
            "try:\n    nc.normalize(np.ones((2, 3), np.int32), 'layer_norm')\n"
            "except TypeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(nc.__file__))))
    assert "bfloat16" in out.stdout, out.stdout + out.stderr


def test_layer_docs_state_what_eval_without_running_statistics_does():
    for cls in (nc.BatchNorm1d, nc.BatchNorm2d, nc.BatchNorm3d):
        assert "track_running_stats=False`` has none and uses the batch statistics in eval" in \
            " ".join(cls.__doc__.split())
