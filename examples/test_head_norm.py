# A user-registered mode, proven by normcore's property checks: run with `pytest`.
# The registration sits in the test module (or a conftest.py), so it runs before the test.
import numpy as np

import normcore as nc
import normcore.testing

if "head_norm" not in nc.modes():
    nc.register_mode("head_norm", "b t (h d) -> b h", params="(h d)", h=8)


def test_head_norm():
    normcore.testing.check_mode("head_norm")


def test_head_norm_statistics_are_per_batch_and_head():
    x = np.random.default_rng(0).standard_normal((4, 10, 64)).astype(np.float32)
    y, _ = nc.normalize(x, "head_norm")
    per_head = y.reshape(4, 10, 8, 8).transpose(0, 2, 1, 3).reshape(4, 8, -1)
    assert np.abs(per_head.mean(axis=-1)).max() < 1e-5
