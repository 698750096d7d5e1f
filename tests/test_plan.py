"""The planner and its caches: bounded by bytes, plans beyond the bound held only while used."""
import gc
import weakref

import numpy as np

import normcore as nc
from layer_cases import _x
from normcore import plan as plan_module
from normcore.backend import CPU

RNG = np.random.default_rng(12)


# -- bounded caches ---------------------------------------------------------------------------

def test_plan_cache_is_bounded_by_bytes_and_frees_what_it_drops(monkeypatch):
    import gc
    import weakref
    from normcore import plan as plan_module
    from normcore.spec import parse_axes, parse_spec
    monkeypatch.setattr(plan_module, "PLAN_CACHE_BYTES", 1 << 20)
    first = weakref.ref(nc.normalize(np.ones((5000, 7)), "layer_norm")[1].plan)
    for rows in range(5001, 5101):  # 100 distinct lengths, ~40 KB of row indices each
        x = np.ones((rows, 7), np.float32)
        nc.normalize(x, "layer_norm")
        nc.normalize(x, "batch_norm", weight=np.ones(7, np.float32))
    cached = sum(size for _, size in plan_module._PLANS.values())
    assert cached <= (1 << 20) + 200_000
    gc.collect()
    assert first() is None  # evicted and not kept alive by any other cache
    assert parse_spec.cache_info().maxsize == parse_axes.cache_info().maxsize == 4096


def test_a_plan_beyond_the_cache_bound_lives_only_as_long_as_its_caller_holds_it(monkeypatch):
    monkeypatch.setattr(plan_module, "PLAN_CACHE_BYTES", 1 << 20)
    x = np.ones((200_000, 4), np.float32)  # 3.2 MB of row indices
    y, cache = nc.layer_norm(x, 4)
    plan = weakref.ref(cache.plan)
    assert plan().index_bytes > 1 << 20
    assert nc.layer_norm(x, 4)[1].plan is plan()  # reused while held
    assert not any(p is plan() for p, _ in plan_module._PLANS.values())  # not in the bounded cache
    del y, cache
    gc.collect()
    assert plan() is None, "a plan larger than the cache's bound outlived its caller"


def test_mask_layouts_and_constants_stay_within_their_bytes(monkeypatch):
    from normcore import masking
    from normcore.bounded import PlanArrays
    monkeypatch.setattr(CPU, "_constants", PlanArrays(200_000))
    monkeypatch.setattr(masking, "_LAYOUTS", PlanArrays(200_000))
    shape = (2,) * 9 + (3,)  # channels last: 512 broadcast shapes of a mask over the leading axes
    x = _x(shape)
    for bits in range(512):
        mshape = tuple(2 if bits >> i & 1 else 1 for i in range(9)) + (1,)
        mask = np.ones(mshape, bool)
        mask.flat[-1] = False
        nc.normalize(x, "batch_norm_channels_last", mask=mask)
    assert CPU._constants.bytes <= 200_000 and masking._LAYOUTS.bytes <= 200_000
    assert len(CPU._constants) < 512


def test_plan_arrays_forget_a_freed_plan():
    from normcore.bounded import PlanArrays

    class Plan:
        pass
    cache, plan = PlanArrays(1 << 20), Plan()
    cache.get(plan, "a", lambda: np.zeros(100))
    assert cache.bytes == 800
    del plan
    gc.collect()
    assert cache.bytes == 0 and len(cache) == 0
    big = cache.get(Plan(), "b", lambda: np.zeros(1 << 18))  # larger than the bound: not kept
    assert big.size == 1 << 18 and cache.bytes == 0
