"""normcore: normalization kernels for NumPy arrays.

Every mode (batch, layer, instance, group, RMS, channel norm, weight standardization and
any mode a user registers) runs through the same compiled Cython/OpenMP kernels.
"""
from .spec import SpecError
from .modes import Mode, get_mode, modes, register_mode
from .functional import NormCache, add_normalize, backward, normalize
from .kernels import get_num_threads, set_num_threads
from .plan import param_shapes
from .folding import fold, fold_into
from .forms import (batch_norm, group_norm, instance_norm, layer_norm, rms_norm,
                    weight_standardize, weight_standardize_backward)

from .layers import (BatchChannelNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, ChannelNorm,
                     EstimatedBatchNorm, GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d,
                     LayerNorm, RMSNorm, SyncBatchNorm)
from . import sync  # noqa: F401  (normcore.sync.traffic() without a second import)
from .sync import SyncError

__version__ = "0.1.0"

__all__ = [
    "SpecError", "Mode", "register_mode", "modes", "get_mode", "normalize", "add_normalize", "backward", "NormCache", "param_shapes",
    "fold", "fold_into",
    "set_num_threads", "get_num_threads",
    "batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm",
    "weight_standardize", "weight_standardize_backward",
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm", "InstanceNorm1d",
    "InstanceNorm2d", "InstanceNorm3d", "RMSNorm", "ChannelNorm", "EstimatedBatchNorm", "BatchChannelNorm",
    "SyncBatchNorm", "SyncError",
]
