"""The call path's seams: one rule one message at every entry, x checked once per public
call, the kernel contract's per-group algebra on both backends, param_shapes, the
signature cache, multi-axis layer norm through the one-axis mode, inputs without elements,
and rules that refuse a call before its first write."""
import numpy as np
import pytest

import normcore as nc
from layer_cases import _x
from normcore import checks, gpu, signature
from normcore.kernels import K
from normcore.reference import reference_backward, reference_forward
from normcore.testing import run_ranks

RNG = np.random.default_rng(5)


def x32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def message(call):
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    return type(info.value), str(info.value)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_eps_rule_reads_the_same_everywhere(value):
    seen = {message(lambda: nc.BatchNorm2d(3, eps=value)),
            message(lambda: nc.LayerNorm(4, eps=value)),
            message(lambda: nc.normalize(x32(4, 3), "batch_norm", eps=value)),
            message(lambda: nc.layer_norm(x32(2, 4), 4, eps=value)),
            message(lambda: nc.group_norm(x32(2, 4, 3), 2, eps=value))}
    assert seen == {(ValueError, f"eps: expected a finite float > 0, got {value!r}")}


@pytest.mark.parametrize("value", [1.5, -0.1])
def test_momentum_rule_reads_the_same_everywhere(value):
    seen = {message(lambda: nc.BatchNorm1d(3, momentum=value)),
            message(lambda: nc.normalize(x32(4, 3), "batch_norm", momentum=value,
                                         running_mean=np.zeros(3, np.float32),
                                         running_var=np.ones(3, np.float32)))}
    assert seen == {(ValueError, f"momentum: expected a float in [0, 1], got {value!r}")}


def test_positive_int_and_divisibility_rules():
    assert message(lambda: nc.GroupNorm(0, 4)) == (ValueError, "num_groups: expected a positive int, got 0")
    assert message(lambda: nc.group_norm(x32(2, 4, 3), 0)) == (ValueError, "num_groups: expected a positive int, got 0")
    assert message(lambda: nc.BatchNorm1d(2.5))[0] is TypeError
    assert message(lambda: nc.GroupNorm(3, 8)) == (ValueError, "num_groups (3) does not divide num_channels (8)")
    assert message(lambda: nc.group_norm(x32(2, 8, 3), 3)) == (
        ValueError, "num_groups (3) does not divide input's channels (8)")


def test_masked_arrays_are_refused_naming_the_argument():
    x = np.ma.masked_array(x32(4, 3), mask=np.zeros((4, 3), bool))
    with pytest.raises(TypeError, match=r"^x: masked arrays are not supported"):
        nc.normalize(x, "batch_norm")
    with pytest.raises(TypeError, match=r"^x: masked arrays"):
        nc.BatchNorm1d(3)(x)
    with pytest.raises(TypeError, match=r"^weight: masked arrays"):
        nc.normalize(x32(4, 3), "batch_norm", weight=np.ma.masked_array(np.ones(3, np.float32)))


@pytest.mark.parametrize("entry", [
    lambda x: nc.BatchNorm2d(4)(x),
    lambda x: nc.BatchChannelNorm(4, 2)(x),
    lambda x: nc.GroupNorm(2, 4)(x),
    lambda x: nc.LayerNorm((4, 3))(x.reshape(2, 4, 3)),
    lambda x: nc.normalize(x, "batch_norm", weight=np.ones(4, np.float32)),
    lambda x: nc.group_norm(x, 2),
    lambda x: nc.layer_norm(x.reshape(2, 4, 3), (4, 3)),
], ids=["BatchNorm2d", "BatchChannelNorm", "GroupNorm", "LayerNorm", "normalize", "group_norm", "layer_norm"])
def test_x_is_checked_once_per_public_call(monkeypatch, entry):
    names = []
    real = checks.array

    def counting(name, a, *args, **kw):
        names.append(name)
        return real(name, a, *args, **kw)

    monkeypatch.setattr(checks, "array", counting)
    entry(x32(2, 4, 3, 1))
    # at most once: layers check the common case (an ndarray of their dtype) inline
    assert sum(n in ("x", "input") for n in names) <= 1, names
    assert not any(n in ("dy", "weight", "bias") for n in names), names  # their common case is inline too


def test_param_shapes_agree_with_what_normalize_accepts():
    for mode, shape, sizes in [("batch_norm", (8, 3, 5), {}), ("group_norm", (2, 6, 4), {"g": 3}),
                               ("channel_norm", (2, 6, 4), {"g": 3}), ("instance_norm", (2, 3, 7), {}),
                               ("layer_norm", (4, 9), {}), ("weight_standardize", (4, 3, 3), {})]:
        shapes = nc.param_shapes(mode, shape, **sizes)
        x = x32(*shape)
        kw = {k: np.ones(v, np.float32) for k, v in shapes.items() if v is not None}
        nc.normalize(x, mode, **kw, **sizes)  # accepted as given
    with pytest.raises(ValueError, match=r"^x_shape: axis \(g k\) of size 6 is not divisible by g=4"):
        nc.param_shapes("group_norm", (2, 6, 4), g=4)


def test_saved_statistics_are_the_reference_ones():
    x = (1 + x32(6, 4, 5)).astype(np.float64)
    for mode, sizes in [("batch_norm", {}), ("group_norm", {"g": 2}), ("layer_norm", {})]:
        _, cache = nc.normalize(x, mode, eps=1e-3, **sizes)
        ref = reference_forward(x, mode, eps=1e-3, **sizes)
        shape = cache.saved_mean.shape
        np.testing.assert_allclose(cache.saved_mean, ref.mean.reshape(shape), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(cache.saved_rstd, (1 / np.sqrt(ref.var + 1e-3)).reshape(shape), rtol=1e-12)


def test_multi_axis_layer_norm_through_the_one_axis_mode():
    x = RNG.standard_normal((3, 5, 4, 6))
    w, b = RNG.standard_normal((4, 6)), RNG.standard_normal((4, 6))
    y, cache = nc.layer_norm(x, (4, 6), weight=w, bias=b)
    assert cache.shape == x.shape and cache.plan.shape == (3, 5, 24)
    ref = reference_forward(x.reshape(3, 5, 24), "layer_norm", weight=w.reshape(-1), bias=b.reshape(-1))
    np.testing.assert_allclose(y, ref.y.reshape(x.shape), atol=1e-12)
    dy = RNG.standard_normal(x.shape)
    dx, dw, db = nc.backward(dy, cache)
    rdx, rdw, rdb = reference_backward(dy.reshape(3, 5, 24), ref)
    assert dx.shape == x.shape and dw.shape == db.shape == (4, 6)
    np.testing.assert_allclose(dx, rdx.reshape(x.shape), atol=1e-10)
    np.testing.assert_allclose(dw, rdw.reshape(4, 6), atol=1e-10)
    np.testing.assert_allclose(db, rdb.reshape(4, 6), atol=1e-10)
    out = np.empty_like(x)
    assert nc.backward(dy, cache, out=out)[0] is out
    np.testing.assert_array_equal(out, dx)
    y_out = np.empty_like(x)
    assert nc.layer_norm(x, (4, 6), weight=w, bias=b, out=y_out)[0] is y_out
    np.testing.assert_array_equal(y_out, y)
    with pytest.raises(ValueError, match=r"^dy: expected shape \(3, 5, 4, 6\)"):
        nc.backward(dy.reshape(3, 5, 24), cache)


def test_signature_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(signature, "_MAX_SIGNATURES", 8)
    signature._SIGNATURES.clear()
    for n in range(2, 40):
        nc.normalize(x32(n, 3), "batch_norm")
    assert 0 < len(signature._SIGNATURES) <= 8


def test_kernels_refuse_arrays_outside_their_contract():
    x = np.ones((2, 3, 1), np.float32)
    m = np.zeros(3)
    def affine(mean=m, y=None):
        K.affine_rows(x=x, row_mean=mean, row_scale=m, row_shift=m, rows_per_block=1,
                      y=np.empty_like(x) if y is None else y, threads=1)
    with pytest.raises(TypeError, match="kernel argument"):
        affine(mean=m.astype(np.float32))
    with pytest.raises(TypeError, match="kernel argument"):
        affine(y=np.empty((2, 6, 1), np.float32)[:, ::2])
    read_only = np.empty_like(x)
    read_only.setflags(write=False)
    with pytest.raises(TypeError, match="writeable"):
        affine(y=read_only)
    with pytest.raises(TypeError, match="positional"):  # every argument by name
        K.affine_rows(x, m, m, m, 1, np.empty_like(x), 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("given", ["both", "weight", "bias", "none"])
def test_per_group_algebra_agrees_between_backends(dtype, given):
    # The CPU kernels and the CUDA backend's device-array version of the same contract,
    # both on NumPy arrays here; one group has no elements (counts 0: mean, var, rstd 0);
    # absent parameters are None for both
    cuda = gpu.CudaKernels(lambda *a: (lambda grid, block, args: None))
    C, R, K_, E, P = 6, 12, 4, 3, 5
    pmean, pm2 = RNG.standard_normal((K_, C)), RNG.uniform(0.5, 2, (K_, C))
    pcount = np.array([[3.0, 3.0, 5.0, 2.0, 0.0, 3.0]])
    rg, rp, rc = np.repeat(np.arange(C), 2), RNG.integers(0, P, R), np.arange(C) % E
    w, b = RNG.standard_normal(P).astype(dtype), RNG.standard_normal(P).astype(dtype)
    w = w if given in ("both", "weight") else None
    b = b if given in ("both", "bias") else None
    outs = {}
    for name, k in (("cpu", K), ("cuda", cuda)):
        res = []
        for center in (True, False):
            mean, var, rstd, n = np.empty(C), np.empty(C), np.empty(C), np.empty(C)
            k.finalize_moments(part_mean=pmean[:1], part_m2=pm2[:1], part_count=pcount, center=center, eps=1e-3,
                               mean=mean, var=var, rstd=rstd, counts=n)
            res += [mean, var, rstd, n]
        assert mean[4] == var[4] == rstd[4] == 0.0
        for unbiased in (True, False):
            rm, rv = np.zeros(E, dtype), np.ones(E, dtype)
            k.update_running(mean=mean, var=var, counts=pcount[0], rc=rc, groups_per_running=2.0, momentum=0.25,
                             keep=0.75, unbiased=unbiased, running_mean=rm, running_var=rv)
            res += [rm, rv]
        stats = [np.empty(C) for _ in range(3)]
        k.running_statistics(running_mean=rm, running_var=rv, rc=rc, eps=1e-3, mean=stats[0], var=stats[1],
                             rstd=stats[2])
        coeffs = [np.empty(R) for _ in range(3)]
        k.row_coefficients(mean=mean, rstd=rstd, rg=rg, rp=rp, weight=w, bias=b, row_mean=coeffs[0],
                           row_scale=coeffs[1], row_shift=coeffs[2])
        group_sums, grads = np.empty((2, C)), np.zeros((2, P))
        sums = np.stack([RNG.standard_normal((K_, R)) * 0 + pmean[:, :1], pm2[:, :1] + np.zeros((K_, R))])
        k.gradient_sums(sums=sums, rg=rg, rp=rp, weight=w, rstd=rstd, group_sums=group_sums, param_grads=grads)
        ks = [np.empty(R) for _ in range(3)]
        k.dx_coefficients(group_sums=group_sums, counts=pcount[0], rg=rg, rp=rp, weight=w, rstd=rstd, stats_grad=True,
                          center=True, dy_scale=ks[0], xc_scale=ks[1], dx_shift=ks[2])
        outs[name] = res + stats + coeffs + [group_sums, grads] + ks
    for a, b_ in zip(outs["cpu"], outs["cuda"], strict=True):
        np.testing.assert_allclose(a, b_, rtol=1e-13, atol=1e-13)


def test_finalize_merges_counted_partials_exactly_in_order():
    # K > 1 partials, each over its own count (a mask's; one partial and one group empty):
    # the two-pass merge over the partial means, in partial order, an empty partial adding
    # nothing even where its stored mean is far from the group's
    C, K_ = 5, 4
    pmean, pm2 = RNG.standard_normal((K_, C)) + 10, RNG.uniform(0.5, 2, (K_, C))
    pcount = RNG.integers(1, 6, (K_, C)).astype(np.float64)
    pcount[1, 2] = 0.0
    pmean[1, 2], pm2[1, 2] = 1e200, 0.0
    pcount[:, 4] = 0.0
    mean, var, rstd, n = (np.empty(C) for _ in range(4))
    K.finalize_moments(part_mean=pmean, part_m2=pm2, part_count=pcount, center=True, eps=0.0, mean=mean, var=var,
                       rstd=rstd, counts=n)
    for c in range(C):
        tot = s = 0.0
        for k in range(K_):
            tot += pcount[k, c]
            s += pcount[k, c] * pmean[k, c]
        if tot == 0:
            assert mean[c] == var[c] == rstd[c] == n[c] == 0.0
            continue
        mu, q = s / tot, 0.0
        for k in range(K_):
            if pcount[k, c]:
                d = pmean[k, c] - mu
                q += pm2[k, c] + pcount[k, c] * d * d
        assert (mean[c], var[c], n[c]) == (mu, q / tot, tot)


@pytest.mark.parametrize("mode, shape, sizes", [("batch_norm", (6, 4, 5), {}), ("group_norm", (3, 4, 5), {"g": 2}),
                                                ("instance_norm", (3, 4, 5), {}), ("layer_norm", (6, 4), {})])
def test_strided_parameters_and_running_statistics(mode, shape, sizes):
    # weight, bias and running statistics that are strided views: read as given, and the
    # running statistics updated in place, exactly as contiguous ones
    x = x32(*shape)
    shapes = nc.param_shapes(mode, shape, **sizes)
    P = shapes["weight"]
    w, b = x32(*P), x32(*P)
    ws, bs = np.repeat(w, 2)[::2].reshape(P), np.repeat(b, 2)[::2].reshape(P)
    assert not ws.flags.c_contiguous
    run, run_s = {}, {}
    if shapes["running_mean"] is not None:
        E = shapes["running_mean"]
        run = {"running_mean": np.zeros(E, np.float32), "running_var": np.ones(E, np.float32)}
        for k, v in run.items():  # every other element of a buffer twice as long
            store = np.full(2 * v.size, np.nan, np.float32)
            store[::2] = v.reshape(-1)
            run_s[k] = store[::2].reshape(E)
            assert not run_s[k].flags.c_contiguous
    y, cache = nc.normalize(x, mode, weight=w, bias=b, **run, **sizes)
    ys, cache_s = nc.normalize(x, mode, weight=ws, bias=bs, **run_s, **sizes)
    np.testing.assert_array_equal(y, ys)
    for k in run:
        np.testing.assert_array_equal(run[k], run_s[k])
    if run:
        assert not np.array_equal(run["running_var"], np.ones_like(run["running_var"]))  # updated
    if run:
        ye, _ = nc.normalize(x, mode, weight=ws, bias=bs, training=False, **run_s, **sizes)
        ye2, _ = nc.normalize(x, mode, weight=w, bias=b, training=False, **run, **sizes)
        np.testing.assert_array_equal(ye, ye2)
    dy = x32(*shape)
    for a, b_ in zip(nc.backward(dy, cache), nc.backward(dy, cache_s)):
        np.testing.assert_array_equal(a, b_)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix itself warns
def test_ndarray_subclasses_are_read_as_arrays():
    x = x32(6, 3)
    y, cache = nc.normalize(x, "batch_norm")
    ym, cache_m = nc.normalize(np.matrix(x), "batch_norm")
    assert type(ym) is np.ndarray
    np.testing.assert_array_equal(y, ym)
    dy = x32(6, 3)
    np.testing.assert_array_equal(nc.backward(dy, cache)[0], nc.backward(np.matrix(dy), cache_m)[0])


def _separate_cols_forward(k, x, rpb, center, eps, rg, rp, w, b):
    A, C = x.shape
    nb = -(-A // rpb)
    counts = np.full((nb, C), float(rpb))
    counts[-1] = A - rpb * (nb - 1)
    pmean, pm2 = np.empty((nb, C)), np.empty((nb, C))
    k.moments_cols(x=x, rows_per_block=rpb, part_mean=pmean, part_m2=pm2, threads=1)
    mean, var, rstd = np.empty(C), np.empty(C), np.empty(C)
    k.finalize_moments(part_mean=pmean, part_m2=pm2, part_count=counts, center=center, eps=eps, mean=mean, var=var,
                       rstd=rstd)
    coefs = [np.empty(C) for _ in range(3)]
    k.row_coefficients(mean=mean, rstd=rstd, rg=rg, rp=rp, weight=w, bias=b, row_mean=coefs[0], row_scale=coefs[1],
                       row_shift=coefs[2])
    y = np.empty_like(x)
    k.affine_rows(x=x.reshape(A, C, 1), row_mean=coefs[0], row_scale=coefs[1], row_shift=coefs[2], rows_per_block=rpb,
                  y=y.reshape(A, C, 1), threads=1)
    return mean, var, rstd, y


def _separate_cols_backward(k, dy, x, mean, rstd, counts, rpb, rg, rp, w, stats_grad, center, P):
    A, C = x.shape
    nb = -(-A // rpb)
    sums = np.empty((2, nb, C))
    k.sums_cols(dy=dy, x=x, row_mean=mean, rows_per_block=rpb, sum_dy=sums[0], sum_dy_xc=sums[1], threads=1)
    group_sums, grads = np.empty((2, C)), np.zeros((2, P))
    k.gradient_sums(sums=sums, rg=rg, rp=rp, weight=w, rstd=rstd, group_sums=group_sums, param_grads=grads)
    ks = [np.empty(C) for _ in range(3)]
    k.dx_coefficients(group_sums=group_sums, counts=counts, rg=rg, rp=rp, weight=w, rstd=rstd, stats_grad=stats_grad,
                      center=center, dy_scale=ks[0], xc_scale=ks[1], dx_shift=ks[2])
    dx = np.empty_like(x)
    k.dx_rows(dy=dy.reshape(A, C, 1), x=x.reshape(A, C, 1), row_mean=mean, dy_scale=ks[0], xc_scale=ks[1],
              dx_shift=ks[2], rows_per_block=rpb, dx=dx.reshape(A, C, 1), threads=1)
    return grads, dx


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("A, C, rpb", [(7, 5, 3), (64, 9, 64), (130, 3, 64)])
def test_composed_kernels_equal_their_parts(dtype, A, C, rpb):
    # normalize_cols / backward_cols / normalize_running run the separate kernels' building
    # blocks in one call: bitwise the same results, on the CPU and in the shared
    # composition every other backend inherits (normcore.composites, over the CPU
    # primitives here)
    from normcore.composites import Composites

    class Composed(Composites):
        def __getattr__(self, name):
            return getattr(K, name)

    x = (RNG.standard_normal((A, C)) * 3 + 100).astype(dtype)
    dy = RNG.standard_normal((A, C)).astype(dtype)
    P = C // 2 + 1
    rg, rp = np.arange(C), np.arange(C) // 2
    w_, b_ = RNG.standard_normal(P).astype(dtype), RNG.standard_normal(P).astype(dtype)
    for kernels in (K, Composed()):
        for center, has_w, has_b in ((True, True, True), (False, True, False), (True, False, False),
                                     (True, False, True)):
            w, b = (w_ if has_w else None), (b_ if has_b else None)
            want = _separate_cols_forward(K, x, rpb, center, 1e-3, rg, rp, w, b)
            got = [np.empty(C), np.empty(C), np.empty(C), np.empty_like(x)]
            kernels.normalize_cols(x=x, rows_per_block=rpb, center=center, eps=1e-3, rg=rg, rp=rp, weight=w, bias=b,
                                   mean=got[0], var=got[1], rstd=got[2], y=got[3], threads=1)
            for a, e in zip(got, want, strict=True):
                np.testing.assert_array_equal(a, e)
            mean, _, rstd, _ = want
            for stats_grad in (True, False):
                n_p = P if (has_w or has_b) else 0
                counts = np.full(C, float(A))
                want_b = _separate_cols_backward(K, dy, x, mean, rstd, counts, rpb, rg, rp, w, stats_grad, center, n_p)
                got_b = [np.full((2, n_p), np.nan), np.empty_like(x)]
                kernels.backward_cols(dy=dy, x=x, mean=mean, rstd=rstd, counts=counts, rows_per_block=rpb, rg=rg, rp=rp,
                                      weight=w, stats_grad=stats_grad, center=center, param_grads=got_b[0],
                                      dx=got_b[1], threads=1)
                for a, e in zip(got_b, want_b, strict=True):
                    np.testing.assert_array_equal(a, e)
            # eval: running statistics (two groups per running entry), rows of S elements
            E, S = (C + 1) // 2, 4
            rm, rv = RNG.standard_normal(E).astype(dtype), RNG.uniform(0.5, 2, E).astype(dtype)
            rc = np.arange(C) // 2
            x3 = np.repeat(x[:, :, None], S, axis=2) + np.arange(S, dtype=dtype)
            stats = [np.empty(C) for _ in range(3)]
            K.running_statistics(running_mean=rm, running_var=rv, rc=rc, eps=1e-3, mean=stats[0], var=stats[1],
                                 rstd=stats[2])
            coeffs = [np.empty(C) for _ in range(3)]
            K.row_coefficients(mean=stats[0], rstd=stats[2], rg=rg, rp=rp, weight=w, bias=b, row_mean=coeffs[0],
                               row_scale=coeffs[1], row_shift=coeffs[2])
            want_y = np.empty_like(x3)
            K.affine_rows(x=x3, row_mean=coeffs[0], row_scale=coeffs[1], row_shift=coeffs[2], rows_per_block=rpb,
                          y=want_y, threads=1)
            got = [np.empty(C), np.empty(C), np.empty(C), np.empty_like(x3)]
            kernels.normalize_running(x=x3, running_mean=rm, running_var=rv, rc=rc, eps=1e-3, rg=rg, rp=rp, weight=w,
                                      bias=b, rows_per_block=rpb, mean=got[0], var=got[1], rstd=got[2], y=got[3],
                                      threads=1)
            for a, e in zip(got, stats + [want_y], strict=True):
                np.testing.assert_array_equal(a, e)


# -- inputs without elements ----------------------------------------------------------------

EMPTY = [("batch_norm", (4, 0, 5), {}), ("batch_norm", (0, 3), {}), ("batch_norm", (0, 3, 4), {}),
         ("batch_norm_channels_last", (4, 5, 0), {}), ("batch_norm_channels_last", (0, 5, 3), {}),
         ("batch_norm_per_activation", (0, 4), {}), ("weight_standardize", (0, 3), {}),
         ("group_norm", (0, 4, 3), {"g": 2}), ("group_norm", (2, 0, 3), {"g": 2}), ("instance_norm", (0, 3, 4), {}),
         ("layer_norm", (0, 4), {}), ("layer_norm", (3, 0), {}), ("rms_norm", (2, 0), {})]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode, shape, sizes", EMPTY)
def test_empty_in_empty_out(mode, shape, sizes, dtype):
    ps = nc.param_shapes(mode, shape, **sizes)
    kw = {}
    if ps["weight"] is not None:
        kw["weight"], kw["bias"] = np.ones(ps["weight"], dtype), np.zeros(ps["weight"], dtype)
    if ps["running_mean"] is not None:
        kw["running_mean"], kw["running_var"] = np.zeros(ps["running_mean"], dtype), np.ones(ps["running_mean"], dtype)
    x = np.empty(shape, dtype)
    for training in (True, False):
        y, cache = nc.normalize(x, mode, training=training, **kw, **sizes)
        assert y.shape == shape and y.dtype == dtype
        dx, dw, db = nc.backward(np.empty(shape, dtype), cache)
        assert dx.shape == shape
        for g in (dw, db):
            if "weight" in kw:
                assert g.shape == kw["weight"].shape and not g.any()
        if "running_mean" in kw:
            assert not kw["running_mean"].any() and (kw["running_var"] == 1).all()


def test_empty_input_with_huge_group_counts_allocates_nothing():
    # every group count divides an empty axis: the plan must not build per-group indices
    y, cache = nc.group_norm(np.zeros((2, 0, 3), np.float32), 2 ** 40)
    assert y.shape == (2, 0, 3)
    dx, dw, db = nc.backward(y, cache)
    assert dx.shape == (2, 0, 3)


def test_empty_batch_leaves_a_layer_untouched():
    layer = nc.BatchNorm2d(3)
    y = layer(np.empty((0, 3, 4, 4), np.float32))
    assert y.shape == (0, 3, 4, 4) and layer.num_batches_tracked == 0
    assert layer.backward(y).shape == y.shape and not layer.grad_weight.any()
    np.testing.assert_array_equal(layer.running_var, np.ones(3))


# -- every refusing rule before the first write ---------------------------------------------

def test_a_masked_call_refused_by_the_counts_rule_writes_no_output():
    x = _x((4, 3, 6))
    mask = np.zeros(x.shape, bool)
    mask[0, :, 0] = True  # one counted element per channel
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    out, h_out = np.full_like(x, 7.0), np.full_like(x, 7.0)
    for call in (lambda: nc.normalize(x, "batch_norm", running_mean=rm, running_var=rv, mask=mask, out=out),
                 lambda: nc.add_normalize(x, x, "batch_norm", running_mean=rm, running_var=rv, mask=mask, out=out,
                                          h_out=h_out),
                 lambda: nc.add_normalize(x, x, "instance_norm", mask=mask, out=out, h_out=h_out)):
        with pytest.raises(ValueError, match="mask: group"):
            call()
        assert (out == 7).all() and (h_out == 7).all() and not rm.any() and (rv == 1).all()


@pytest.mark.parametrize("make, shape", [(lambda: nc.BatchNorm1d(3), (4, 3, 6)),
                                         (lambda: nc.InstanceNorm1d(3), (4, 3, 6)),
                                         (lambda: nc.BatchChannelNorm(3, 1), (4, 3, 6))])
def test_a_refused_layer_call_keeps_what_the_last_call_returned(make, shape):
    layer = make()
    layer.reuse_buffers = True
    x = _x(shape)
    y, h = layer.forward_add(x, x)
    kept_y, kept_h = y.copy(), h.copy()
    mask = np.zeros(shape, bool)
    mask[0, :, 0] = True
    with pytest.raises(ValueError, match="mask: group"):
        layer.forward_add(x, x, mask=mask)
    np.testing.assert_array_equal(y, kept_y)
    np.testing.assert_array_equal(h, kept_h)


def test_synchronized_ranks_that_disagree_write_no_h_out():
    x = _x((8, 3, 4))

    def rank(comm):
        r = comm.Get_rank()
        part = x[:4] if r == 0 else x[4:]
        h_out = np.full_like(part, 7.0)
        with pytest.raises(ValueError, match="ranks disagree"):
            nc.add_normalize(part, part, "batch_norm", comm=comm, eps=1e-5 if r == 0 else 1e-3, h_out=h_out)
        return h_out

    assert all((h == 7).all() for h in run_ranks(2, rank, timeout=10))
