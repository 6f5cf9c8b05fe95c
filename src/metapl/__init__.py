"""metapl: Meta Pseudo Labels (Pham et al., CVPR 2021) for PyTorch.

The algorithm lives in ``metapl.core`` (any teacher and student ``nn.Module``); data sets in ``metapl.data``; models
in ``metapl.models``; the trainer (config, loop, checkpoints, metrics) in ``metapl.engine``; the ``metapl`` command
line in ``metapl.commands`` (docs/architecture.md).
"""

from metapl.core import Batch, ModelEMA, MPLConfig, MPLInputError, MPLState, linear_ramp, mpl_update, warmup_cosine

__version__ = "0.1.0"
__all__ = ["Batch", "MPLConfig", "MPLInputError", "MPLState", "ModelEMA", "linear_ramp", "mpl_update", "warmup_cosine"]
