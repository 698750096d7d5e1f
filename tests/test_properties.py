"""Property tests of every built-in mode and of random user-registered specs."""
import pytest
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st

import normcore
from normcore import testing

BUILTIN_SIZES = {"group_norm": {"g": 2}, "channel_norm": {"g": 2}}


@pytest.mark.parametrize("name", [n for n in normcore.modes() if not n.startswith("test_")])
def test_builtin_mode_properties(name):
    testing.check_mode(name, max_examples=100, **BUILTIN_SIZES.get(name, {}))


def test_group_norm_with_inferred_groups():
    # g drawn by the strategy too: (g k) with k inferred from the channel count
    testing.check_mode("group_norm", max_examples=50)


@pytest.mark.parametrize("prop", testing.PROPERTIES, ids=lambda p: p.__name__)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_user_specs(prop, data):
    mode = data.draw(testing.random_modes(), label="mode")
    prop(mode, data, {})
