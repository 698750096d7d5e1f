"""Property tests of every built-in mode and of random user-registered specs."""
import pytest
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st

import normcore
from normcore import testing

BUILTIN_SIZES = {"group_norm": {"g": 2}, "channel_norm": {"g": 2}}


@pytest.mark.parametrize("name", [n for n in normcore.modes() if not n.startswith("test_")])
def test_builtin_mode_properties(name):
    testing.check_mode(name, max_examples=100, last_side=48, **BUILTIN_SIZES.get(name, {}))


def test_group_norm_with_inferred_groups():
    # g drawn by the strategy too: (g k) with k inferred from the channel count
    testing.check_mode("group_norm", max_examples=50)


@pytest.mark.parametrize("prop", testing.PROPERTIES, ids=lambda p: p.__name__)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_user_specs(prop, data):
    mode = data.draw(testing.random_modes(), label="mode")
    prop(mode, data, {})


@st.composite
def interleaved_modes(draw):
    """Modes whose kept axes are interleaved with reduced ones, ending in a reduced axis."""
    n = draw(st.integers(4, 5))
    kinds = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    kinds[-1] = False
    if not any(kinds[i] and not kinds[j] and kinds[k]
               for i in range(n) for j in range(i + 1, n) for k in range(j + 1, n)):
        kinds[0], kinds[1], kinds[2] = True, False, True
    names = "abcde"[:n]
    kept = [a for a, k in zip(names, kinds, strict=True) if k]
    params = [a for a in names if (a != "a" or not kinds[0]) and draw(st.booleans())]  # not a kept batch axis
    running = None
    if draw(st.booleans()):
        running = " ".join(a for a in kept if draw(st.booleans())) or kept[0]
    spec = f"{' '.join(names)} -> {' '.join(kept)}"
    return normcore.Mode(spec, params=" ".join(params) or None, running_stats=running,
                         name=f"interleaved[{spec}]")


@pytest.mark.parametrize("prop", [testing.prop_forward_matches_reference, testing.prop_backward_matches_reference],
                         ids=lambda p: p.__name__)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_interleaved_kept_axes_normalized_in_place(prop, data):
    # a long last axis sends them down the in-place path (rows of the trailing reduced run)
    prop(data.draw(interleaved_modes(), label="mode"), data, {}, last_side=64)
