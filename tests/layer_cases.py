"""Shared by several test modules: one of every layer kind with an input it takes, and
snapshots of a layer's state."""
import numpy as np

import normcore as nc

RNG = np.random.default_rng(26)


def _x(shape, dtype=np.float32, offset=0.0):
    return (offset + RNG.standard_normal(shape)).astype(dtype)


# one of every layer kind, with an input it takes
LAYERS = [
    ("BatchNorm1d", lambda: nc.BatchNorm1d(4), (8, 4, 3)),
    ("BatchNorm2d", lambda: nc.BatchNorm2d(4), (6, 4, 5, 5)),
    ("BatchNorm2d-nhwc", lambda: nc.BatchNorm2d(4, channel_axis=-1), (6, 5, 5, 4)),
    ("BatchNorm3d", lambda: nc.BatchNorm3d(4), (4, 4, 2, 3, 3)),
    ("LayerNorm", lambda: nc.LayerNorm((3, 5)), (6, 3, 5)),
    ("GroupNorm", lambda: nc.GroupNorm(2, 4), (6, 4, 7)),
    ("InstanceNorm2d", lambda: nc.InstanceNorm2d(4, affine=True, track_running_stats=True), (6, 4, 5, 5)),
    ("RMSNorm", lambda: nc.RMSNorm(6), (5, 6)),
    ("ChannelNorm", lambda: nc.ChannelNorm(4, 2), (6, 4, 7)),
    ("EstimatedBatchNorm", lambda: nc.EstimatedBatchNorm(4), (6, 4, 7)),
    ("BatchChannelNorm", lambda: nc.BatchChannelNorm(4, 2), (6, 4, 7)),
    ("BatchChannelNorm-bn", lambda: nc.BatchChannelNorm(4, 2, estimate=False), (6, 4, 7)),
]
IDS = [name for name, _, _ in LAYERS]


def _state(layer):
    return {k: v.copy() for k, v in layer.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _grads(layer):
    return [g.copy() for _, _, g in layer.named_parameters()]


class _OneRank:
    """A communicator of one rank (allgather returns what it is given)."""

    def allgather(self, obj):
        return [obj]

    def Get_rank(self):
        return 0
