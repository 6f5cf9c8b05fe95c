"""The algorithm core: pure PyTorch, no files, no data sets, no command line."""

from metapl.core.ema import ModelEMA
from metapl.core.losses import pseudo_labels, soft_cross_entropy, uda_consistency
from metapl.core.mpl import Batch, MPLConfig, MPLState, feedback_mode, mpl_update, unwrap
from metapl.core.schedules import linear_ramp, warmup_cosine
from metapl.core.supervised import supervised_step
from metapl.core.validate import MPLInputError

__all__ = [
    "Batch",
    "MPLConfig",
    "MPLInputError",
    "MPLState",
    "ModelEMA",
    "feedback_mode",
    "linear_ramp",
    "mpl_update",
    "pseudo_labels",
    "soft_cross_entropy",
    "supervised_step",
    "uda_consistency",
    "unwrap",
    "warmup_cosine",
]
