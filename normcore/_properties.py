"""The Hypothesis side of :mod:`normcore.testing`: strategies, properties and
:func:`check_mode`. Imported on first use of one of those names, so that the rest of
``normcore.testing`` works without Hypothesis installed.
"""
from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

from .functional import add_normalize, backward, normalize
from .modes import Mode, get_mode
from .plan import make_plan
from .reference import _axes as reference_axes
from .reference import reference_backward, reference_forward, term_scales
from .spec import ELLIPSIS
from .backend import HALF_NAMES, storage_dtypes
from .testing import TOLERANCE, assert_close

__all__ = ["mode_cases", "float_arrays", "random_modes", "check_mode", "PROPERTIES", "DTYPES"]

#: The input dtypes the properties draw: float32, float64, float16 and (with ml_dtypes)
#: bfloat16; beside a half input the parameters and running statistics are drawn in x's
#: dtype or float32.
DTYPES = storage_dtypes()  # bfloat16 included where installed: normcore.testing imports ml_dtypes

# offsets drawn per dtype: the half types' accuracy holds at 0..1e2 (float16) and 0..1e4
# (bfloat16)
_OFFSETS = {"float16": [0.0, 1.0, -3.0, 100.0], "bfloat16": [0.0, 1.0, -3.0, 100.0, 1e4]}


@st.composite
def float_arrays(draw, shape, dtype):
    """Finite arrays of ``shape``: Gaussian with an offset and scale, or small integers."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        offset = draw(st.sampled_from(_OFFSETS.get(np.dtype(dtype).name, [0.0, 1.0, -3.0, 100.0, 1e3])))
        scale = draw(st.sampled_from([1.0, 0.01, 10.0]))
        a = offset + scale * rng.standard_normal(shape)
    else:
        a = rng.integers(-3, 4, shape).astype(np.float64)
    return a.astype(dtype)


@st.composite
def mode_cases(draw, mode, *, dtypes=DTYPES, max_side=4, max_extra=2, last_side=None,
               **sizes):
    """Draw ``(shape, sizes, dtype)`` fitting ``mode``'s spec.

    Sizes given here are fixed; for a parenthesised group all but its last unknown
    elementary size are passed on, so the last one is inferred from the shape.
    ``last_side`` lets the last input axis be long (half the draws in [last_side/2, last_side]).
    """
    m = get_mode(mode)
    fixed = dict(m.sizes)
    fixed.update(sizes)
    shape, call_sizes = [], dict(sizes)
    for index, group in enumerate(m.parsed.lhs):
        last = index == len(m.parsed.lhs) - 1
        side = st.integers(1, max_side)
        if last and last_side:
            side = st.one_of(side, st.integers(max(1, last_side // 2), last_side))
        if group == (ELLIPSIS,):
            shape += draw(st.lists(side, min_size=0, max_size=max_extra))
        elif len(group) == 1:
            shape.append(fixed[group[0]] if group[0] in fixed else draw(side))
        else:
            dims = [fixed[n] if n in fixed else draw(side) for n in group]
            unknown = [n for n in group if n not in fixed]
            inferred = unknown[-1] if unknown else None
            for n, d in zip(group, dims):
                if n not in fixed and n != inferred:
                    call_sizes[n] = d
            shape.append(math.prod(dims))
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    return tuple(shape), call_sizes, dtype


def _params(data, m, plan, dtype):
    if m.params is None:
        return {}
    kw = {}
    if data.draw(st.booleans(), label="weight"):
        kw["weight"] = data.draw(float_arrays(plan.param_shape, np.float64), label="w").astype(dtype)
    if data.draw(st.booleans(), label="bias"):
        kw["bias"] = data.draw(float_arrays(plan.param_shape, np.float64), label="b").astype(dtype)
    return kw


def _running(data, m, plan, dtype):
    if m.running_stats is None or not data.draw(st.booleans(), label="running"):
        return {}
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="running seed"))
    return {"running_mean": rng.standard_normal(plan.running_shape).astype(dtype),
            "running_var": rng.uniform(0.25, 4.0, plan.running_shape).astype(dtype)}


def _draw_mask(data, shape):
    """A boolean mask broadcasting to ``shape`` (each axis full or 1, leading axes maybe
    dropped), of random density: all counted, some, or a few (groups without any
    counted element included)."""
    mshape = [d if data.draw(st.booleans(), label="mask axis") else 1 for d in shape]
    mshape = mshape[data.draw(st.integers(0, len(mshape)), label="mask axes dropped"):]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="mask seed"))
    density = data.draw(st.sampled_from([1.0, 0.8, 0.5, 0.2]), label="mask density")
    return np.asarray(rng.random(mshape) < density)


def _draw_call(data, m, sizes, last_side, *, dtypes=DTYPES):
    shape, call_sizes, dtype = data.draw(mode_cases(m, dtypes=dtypes, last_side=last_side, **sizes),
                                         label="case")
    plan = make_plan(m, shape, call_sizes)
    x = data.draw(float_arrays(shape, dtype), label="x")
    pdtype = dtype
    if dtype.name in HALF_NAMES:  # mixed precision: float32 parameters beside a half x
        pdtype = np.dtype(data.draw(st.sampled_from([dtype, np.dtype(np.float32)]), label="param dtype"))
    kw = dict(call_sizes)
    kw.update(_params(data, m, plan, pdtype))
    kw.update(_running(data, m, plan, pdtype))
    kw["eps"] = data.draw(st.sampled_from([1e-5, 1e-3, 0.1]), label="eps")
    training = data.draw(st.booleans(), label="training") if "running_mean" in kw else True
    kw["training"] = training
    if training and "running_mean" in kw:
        kw["momentum"] = data.draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]), label="momentum")
        kw["unbiased"] = data.draw(st.booleans(), label="unbiased")
        kw["estimate"] = data.draw(st.booleans(), label="estimate")
    if training and m.running_stats is not None:
        assume(plan.count > 1)
    if data.draw(st.booleans(), label="masked"):
        kw["mask"] = _draw_mask(data, shape)
        if training and m.running_stats is not None:  # the counts rule (a ValueError, tested apart):
            dims, reduced = _group_axes(m, shape, call_sizes)  # two counted per group, or none
            counted = np.broadcast_to(kw["mask"], shape).reshape(dims).sum(axis=reduced)
            low = counted < 2 if "running_mean" in kw else counted == 1
            assume(counted.size == 0 or not low.any())
        note(f"mask of shape {kw['mask'].shape}, {int(kw['mask'].sum())} of {kw['mask'].size} counted")
    note(f"mode={m!r} shape={shape} dtype={dtype} kw={ {k: v for k, v in kw.items() if not isinstance(v, np.ndarray)} }")
    return x, kw, call_sizes


def _fits(dtype, *exact):
    """The exact results are within ``dtype``'s finite range: a half output beyond it is
    an overflow of the format (inf, as NumPy gives), not a kernel error, so such draws are
    discarded."""
    top = 65504.0 if np.dtype(dtype).name == "float16" else 3e38
    assume(all(e is None or float(np.abs(e).max(initial=0.0)) < top / 2 for e in exact))


def _copy_running(kw):
    return {k: (v.copy() if k.startswith("running") else v) for k, v in kw.items()}


def _group_axes(m, shape, sizes):
    _, dims, _, reduced = reference_axes(m, shape, sizes)
    return dims, reduced


# The backend the properties run on: "cpu", or "cuda" (inputs copied to the GPU, results
# copied back, so that every check compares NumPy arrays with the float64 reference).
_BACKEND = ["cpu"]


def _normalize(x, m, residual=None, **kw):
    """normalize (add_normalize with ``residual``) on the backend; results as NumPy arrays
    and the cache last."""
    def call(x, r, **kw):
        return normalize(x, m, **kw) if r is None else add_normalize(x, r, m, **kw)

    if _BACKEND[0] == "cpu":
        return call(x, residual, **kw)
    import cupy
    dev = {k: cupy.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    got = call(cupy.asarray(x), None if residual is None else cupy.asarray(residual), **dev)
    for k in ("running_mean", "running_var"):
        if k in kw:
            kw[k][...] = cupy.asnumpy(dev[k])  # the in-place update, seen by the caller
    return tuple(cupy.asnumpy(a) for a in got[:-1]) + (got[-1],)


def _backward(dy, cache, dh=None):
    if _BACKEND[0] == "cpu":
        return backward(dy, cache, dh=dh)
    import cupy
    got = backward(cupy.asarray(dy), cache, dh=None if dh is None else cupy.asarray(dh))
    return tuple(None if g is None else cupy.asnumpy(g) for g in got)


def prop_forward_matches_reference(m, data, sizes, last_side=None):
    """Forward output and running-statistic updates equal the float64 reference."""
    x, kw, _ = _draw_call(data, m, sizes, last_side)
    ref = reference_forward(x, m, **_copy_running(kw))
    call = _copy_running(kw)
    _fits(x.dtype, ref.y)
    y, _ = _normalize(x, m, **call)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, ref.y, x.dtype, "y")
    if ref.running_mean is not None:
        assert_close(call["running_mean"], ref.running_mean, call["running_mean"].dtype, "running_mean")
        assert_close(call["running_var"], ref.running_var, call["running_var"].dtype, "running_var")


def _draw_plain(data, m, sizes, last_side):
    """A float64 input with no parameters and no running statistics."""
    shape, call_sizes, dtype = data.draw(mode_cases(m, dtypes=(np.float64,), last_side=last_side, **sizes),
                                         label="case")
    if m.running_stats is not None:
        assume(make_plan(m, shape, call_sizes).count > 1)
    return data.draw(float_arrays(shape, dtype), label="x"), call_sizes, dtype


def prop_normalized_moments(m, data, sizes, last_side=None):
    """Without affine, each group of y has mean 0 (centred) and variance var/(var+eps)."""
    x, call_sizes, dtype = _draw_plain(data, m, sizes, last_side)
    shape = x.shape
    eps = 1e-5
    y, _ = _normalize(x, m, eps=eps, **call_sizes)
    dims, reduced = _group_axes(m, shape, call_sizes)
    xe, ye = x.reshape(dims), y.reshape(dims)
    if m.center:
        var = xe.var(axis=reduced, keepdims=True)
        assert_close(ye.mean(axis=reduced), np.zeros(ye.mean(axis=reduced).shape), dtype, "group mean of y")
    else:
        var = (xe ** 2).mean(axis=reduced, keepdims=True)
    spread = (ye ** 2).mean(axis=reduced) - (ye.mean(axis=reduced) ** 2 if m.center else 0)
    assert_close(spread, (var / (var + eps)).reshape(spread.shape), dtype, "group variance of y")


def prop_invariances(m, data, sizes, last_side=None):
    """y is unchanged by a per-group shift (centred) and by positive scaling of x."""
    x, call_sizes, dtype = _draw_plain(data, m, sizes, last_side)
    shape = x.shape
    dims, reduced = _group_axes(m, shape, call_sizes)
    gshape = [1 if i in reduced else d for i, d in enumerate(dims)]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    eps = 1e-5
    y, _ = _normalize(x, m, eps=eps, **call_sizes)
    if m.center:
        shift = rng.integers(-50, 50, gshape).astype(np.float64)
        ys, _ = _normalize((x.reshape(dims) + shift).reshape(shape), m, eps=eps, **call_sizes)
        assert_close(ys, y, dtype, "y after a per-group shift")
    # One scale for all groups keeps eps * s^2 a single number; powers of two are exact.
    s = 2.0 ** data.draw(st.integers(-4, 4), label="log2 scale")
    yk, _ = _normalize(x * s, m, eps=eps * s * s, **call_sizes)
    assert_close(yk, y, dtype, "y after scaling x")
    if reduced:
        # per-group positive scales: exact invariance needs eps -> 0 relative to the variance
        scales = 2.0 ** rng.integers(-3, 4, gshape)
        tiny = 1e-300
        y0, _ = _normalize(x, m, eps=tiny, **call_sizes)
        yg, _ = _normalize((x.reshape(dims) * scales).reshape(shape), m, eps=tiny, **call_sizes)
        xe = x.reshape(dims)
        var = xe.var(axis=reduced, keepdims=True) if m.center else (xe ** 2).mean(axis=reduced, keepdims=True)
        ok = np.broadcast_to(var > 1e-6, dims).reshape(shape)
        assert_close(yg[ok], y0[ok], dtype, "y after per-group scaling")


def _bits(a):
    """``a``'s bit patterns (an unsigned view), for bitwise comparisons of any float dtype."""
    return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")


def prop_add_normalize(m, data, sizes, last_side=None):
    """add_normalize(x, r) is normalize(x + r) bitwise: h equals NumPy's x + r, y and the
    running statistics equal normalize's on it; backward with dh gives normalize's dx + dh
    (NumPy's add) and the same parameter gradients."""
    x, kw, _ = _draw_call(data, m, sizes, last_side)
    r = data.draw(float_arrays(x.shape, x.dtype), label="residual")
    dy = data.draw(float_arrays(x.shape, x.dtype), label="dy")
    dh = data.draw(float_arrays(x.shape, x.dtype), label="dh")
    want_h = x + r
    _fits(x.dtype, want_h.astype(np.float64))
    plain, fused = _copy_running(kw), _copy_running(kw)
    y0, cache0 = _normalize(want_h, m, **plain)
    y, h, cache = _normalize(x, m, residual=r, **fused)
    assert h.dtype == x.dtype and h.shape == x.shape and y.dtype == x.dtype
    assert np.array_equal(_bits(h), _bits(want_h)), "h differs from x + residual"
    assert np.array_equal(_bits(y), _bits(y0)), "y differs from normalize(x + residual)"
    for k in ("running_mean", "running_var"):
        if k in kw:
            assert np.array_equal(_bits(fused[k]), _bits(plain[k])), k
    with np.errstate(over="ignore"):  # a half dweight beyond the format is inf in both: compared as such
        want = _backward(dy, cache0)
        got = _backward(dy, cache, dh=dh)
        want_dx = want[0] + dh
    assert np.array_equal(_bits(got[0]), _bits(want_dx)), "dh_total differs from dx + dh"
    for a, b in zip(got[1:], want[1:]):
        assert (a is None) == (b is None) and (a is None or np.array_equal(_bits(a), _bits(b)))


def prop_masked_elements_do_not_count(m, data, sizes, last_side=None):
    """With a mask, x where it is False (set here to anything, NaN and inf included)
    changes y only there and the statistics and running statistics not at all, bitwise;
    backward leaves those positions out whatever x and dy hold there: dx is 0 there, and
    dx elsewhere and the parameter gradients do not change."""
    x, kw, _ = _draw_call(data, m, sizes, last_side)
    mask = kw.get("mask")
    assume(mask is not None and not mask.all())
    free = ~np.broadcast_to(mask, x.shape)
    finite = data.draw(st.booleans(), label="finite padding")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="padding seed"))
    values = [-7.0, 250.0, 0.0] if finite else [np.nan, np.inf, -7.0]
    x2 = np.where(free, rng.choice(np.array(values), size=x.shape), x).astype(x.dtype)
    first, second = _copy_running(kw), _copy_running(kw)
    with np.errstate(invalid="ignore", over="ignore"):
        y, cache = _normalize(x, m, **first)
        y2, cache2 = _normalize(x2, m, **second)
    keep = ~free
    assert np.array_equal(_bits(y[keep]), _bits(y2[keep])), "y changed where the mask is True"
    stats = [np.asarray(a if isinstance(a, np.ndarray) else a.get()) for a in
             (cache.mean, cache.rstd, cache2.mean, cache2.rstd)]
    assert np.array_equal(_bits(stats[0]), _bits(stats[2])) and np.array_equal(_bits(stats[1]), _bits(stats[3])), \
        "the statistics saw masked-out elements"
    for k in ("running_mean", "running_var"):
        if k in kw:
            assert np.array_equal(_bits(first[k]), _bits(second[k])), k
    dy = data.draw(float_arrays(x.shape, x.dtype), label="dy")
    dy2 = np.where(free, rng.choice(np.array([np.nan, np.inf, 3.0]), size=x.shape), dy).astype(x.dtype)
    with np.errstate(over="ignore"):
        got, got2 = _backward(dy, cache), _backward(dy2, cache2)
    # equal values (a sum of zeros may be +0 or -0 as the products' signs fall)
    assert np.array_equal(got[0][keep], got2[0][keep]), "dx changed where the mask is True"
    assert not got[0][free].any() and not got2[0][free].any(), "dx is not 0 where the mask is False"
    for a, b in zip(got[1:], got2[1:]):
        assert (a is None) == (b is None) and (a is None or np.array_equal(a, b)), \
            "a parameter gradient saw masked-out positions"


def prop_backward_matches_reference(m, data, sizes, last_side=None):
    """dx, dweight, dbias equal the float64 closed form (training, eval, estimated)."""
    x, kw, call_sizes = _draw_call(data, m, sizes, last_side)
    dy = data.draw(float_arrays(x.shape, x.dtype), label="dy")
    ref = reference_forward(x, m, **_copy_running(kw))
    rdx, rdw, rdb = reference_backward(dy, ref)
    _fits(x.dtype, ref.y, rdx, rdw, rdb)  # (before the call: a half result beyond the format is discarded)
    y, cache = _normalize(x, m, **_copy_running(kw))
    dx, dw, db = _backward(dy, cache)
    terms = term_scales(dy, ref)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    assert_close(dx, rdx, x.dtype, "dx", scale=terms["dx"])
    assert (dw is None) == ("weight" not in kw) and (db is None) == ("bias" not in kw)
    pdtype = kw["weight"].dtype if "weight" in kw else kw["bias"].dtype if "bias" in kw else x.dtype
    if dw is not None:
        assert dw.dtype == pdtype
        assert_close(dw, rdw, pdtype, "dweight", scale=terms["dweight"])
    if db is not None:
        assert db.dtype == pdtype
        assert_close(db, rdb, pdtype, "dbias")
    if m.center and ref.stats_grad and "mask" not in kw:
        dims, reduced = _group_axes(m, x.shape, call_sizes)
        sums = dx.astype(np.float64).reshape(dims).sum(axis=reduced)
        scale = max(1.0, terms["dx"]) * math.prod(dims[i] for i in reduced)
        assert float(np.abs(sums).max()) <= TOLERANCE[x.dtype] * scale, "dx does not sum to zero per group"


def prop_central_difference(m, data, sizes, last_side=None):
    """float64 backward equals a central difference of the compiled forward."""
    x, kw, _ = _draw_call(data, m, sizes, last_side, dtypes=(np.float64,))
    assume(x.size <= 48)
    assume(not kw.get("estimate"))  # estimated BN deliberately drops d(stats)/dx
    # Fresh N(0, 1) data: no ties (kinks) and no offset whose cancellation would swamp the
    # difference quotient; offsets are covered by the comparisons with the reference.
    x = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed")).standard_normal(x.shape)
    dy = np.random.default_rng(1).standard_normal(x.shape)
    # masked-out positions are not data: the loss is over the counted ones (backward is
    # given dy everywhere and must ignore it there)
    weights = dy if "mask" not in kw else np.where(kw["mask"], dy, 0.0)

    def loss(**over):
        call = _copy_running(kw)
        call.update(over)
        xx = call.pop("x", x)
        return float((_normalize(xx, m, **call)[0] * weights).sum())

    y, cache = _normalize(x, m, **_copy_running(kw))
    dx, dw, db = _backward(dy, cache)
    h = 1e-6
    # Rounding in the loss itself limits any central difference: ~eps * sum|y * dy| / h.
    roundoff = 16 * np.finfo(np.float64).eps * float(np.abs(y * weights).sum()) / h
    for name, grad in (("x", dx), ("weight", dw), ("bias", db)):
        if grad is None:
            continue
        base = x if name == "x" else kw[name]
        num = np.empty(base.shape)
        for i in np.ndindex(base.shape):
            plus, minus = base.copy(), base.copy()
            plus[i] += h
            minus[i] -= h
            num[i] = (loss(**{name: plus}) - loss(**{name: minus})) / (2 * h)
        scale = max(1.0, float(np.abs(num).max()))
        err = float(np.abs(num - grad).max())
        note(f"d{name}: central-difference error {err:.3g} (scale {scale:.3g}, roundoff {roundoff:.3g})")
        assert err <= 1e-6 * scale + roundoff, f"d{name} disagrees with the central difference ({err:.3g})"


PROPERTIES = (prop_forward_matches_reference, prop_normalized_moments, prop_invariances,
              prop_backward_matches_reference, prop_central_difference, prop_add_normalize,
              prop_masked_elements_do_not_count)


def check_mode(mode, *, max_examples=30, last_side=None, backend="cpu", **sizes):
    """Run every property in :data:`PROPERTIES` on ``mode`` (a name or a Mode): half the
    calls drawn with a ``mask=`` of random shape (broadcasting to x) and density, compared
    with the float64 reference of the masked statistics, and the masked-out elements shown
    not to count.

    ``sizes`` fixes axis sizes (e.g. ``g=2``); others are drawn (1 to 4, the last input
    axis up to ``last_side`` when given, to reach long-row code paths). ``backend="cuda"``
    runs the same properties on CuPy arrays (the GPU path). Raises the first falsifying
    example, as a Hypothesis test does.

    >>> check_mode("layer_norm", max_examples=5)
    """
    m = get_mode(mode)
    if backend not in ("cpu", "cuda"):
        raise ValueError(f"backend: expected 'cpu' or 'cuda', got {backend!r}")
    if backend == "cuda":
        from .gpu import unavailable_reason
        reason = unavailable_reason()
        if reason is not None:  # say so now, not from inside the first property
            raise RuntimeError(f"check_mode(backend='cuda') cannot run: {reason}")

    def runner(prop):
        @settings(max_examples=max_examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.data())
        def run(data):
            prop(m, data, sizes, last_side)
        run.__name__ = f"{prop.__name__}[{m.name or m.spec}]"
        return run

    _BACKEND[0] = backend
    try:
        for prop in PROPERTIES:
            runner(prop)()
    finally:
        _BACKEND[0] = "cpu"


_AXIS_NAMES = "abcdefgh"


@st.composite
def random_modes(draw):
    """Random valid user modes: 1-4 named axes, maybe a parenthesised pair and '...',
    a random kept subset, random parameter axes, centring and running statistics."""
    n = draw(st.integers(1, 4))
    names = list(_AXIS_NAMES[:n])
    tokens = [[a] for a in names]
    if n >= 2 and draw(st.booleans()):
        i = draw(st.integers(0, len(tokens) - 2))
        tokens[i:i + 2] = [tokens[i] + tokens[i + 1]]
    if draw(st.booleans()):
        tokens.insert(draw(st.integers(0, len(tokens))), [ELLIPSIS])
    flat = [a for t in tokens for a in t]
    kept = [a for a in flat if draw(st.booleans())]
    if len(kept) == len(flat):  # a mode reduces at least one axis
        kept.pop(draw(st.integers(0, len(kept) - 1)))
    lhs = " ".join(t[0] if len(t) == 1 else "(" + " ".join(t) + ")" for t in tokens)
    spec = f"{lhs} -> {' '.join(kept)}"
    # parameters never on a kept leading (batch) axis
    batch = tokens[0] if any(a in kept for a in tokens[0]) else []
    param_axes = [a for a in flat if a != ELLIPSIS and a not in batch and draw(st.booleans())]
    params = " ".join(param_axes) if param_axes else None
    center = draw(st.booleans())
    kept_named = [a for a in kept if a != ELLIPSIS]
    running = None
    if center and kept_named and draw(st.booleans()):
        running = " ".join(a for a in kept_named if draw(st.booleans())) or kept_named[0]
    return Mode(spec, params=params, center=center, running_stats=running, name=f"random[{spec}]")
