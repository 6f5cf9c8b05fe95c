"""metapl: Meta Pseudo Labels (Pham et al., CVPR 2021) for PyTorch.

The algorithm lives in ``metapl.core`` (any teacher and student ``nn.Module``); data sets in ``metapl.data``; models
in ``metapl.models``; the training methods in ``metapl.methods``; the trainer in ``metapl.config`` (options),
``metapl.training`` (set-up, the loop, checkpoints, metrics), ``metapl.rundir`` (the run folder) and
``metapl.protocol`` (many runs compared); the ``metapl`` command
line in ``metapl.commands`` (docs/architecture.md). The names below come from ``metapl.core`` on first use, so that
``import metapl.commands.cli`` (``metapl --help``) does not import torch.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from metapl.core import Batch, ModelEMA, MPLConfig, MPLInputError, MPLState, linear_ramp, mpl_update, warmup_cosine

# As a library metapl prints nothing, warnings included, until its user configures logging (metapl.logs).
logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"
__all__ = ["Batch", "MPLConfig", "MPLInputError", "MPLState", "ModelEMA", "linear_ramp", "mpl_update", "warmup_cosine"]


def __getattr__(name: str) -> object:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from metapl import core

    value = getattr(core, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
