"""The algorithm core: pure PyTorch, no files, no data sets, no command line.

The names below are imported on first use (PEP 562), so that ``metapl.core.options`` and ``metapl.core.config``
(``MPLConfig``: pure Python) load without torch, and the command line's ``--help`` with them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what the names are, for readers and type checkers
    from metapl.core.config import MPLConfig
    from metapl.core.ema import ModelEMA
    from metapl.core.fixmatch import fixmatch_step
    from metapl.core.losses import pseudo_labels, soft_cross_entropy, uda_consistency
    from metapl.core.mpl import Batch, MPLState, feedback_mode, mpl_update, unwrap
    from metapl.core.schedules import linear_ramp, warmup_cosine
    from metapl.core.supervised import supervised_step
    from metapl.core.validate import MPLInputError

# name -> the submodule that defines it
_HOMES = {
    "ModelEMA": "ema",
    "fixmatch_step": "fixmatch",
    "pseudo_labels": "losses",
    "soft_cross_entropy": "losses",
    "uda_consistency": "losses",
    "MPLConfig": "config",
    "Batch": "mpl",
    "MPLState": "mpl",
    "feedback_mode": "mpl",
    "mpl_update": "mpl",
    "unwrap": "mpl",
    "linear_ramp": "schedules",
    "warmup_cosine": "schedules",
    "supervised_step": "supervised",
    "MPLInputError": "validate",
}

__all__ = [
    "Batch",
    "MPLConfig",
    "MPLInputError",
    "MPLState",
    "ModelEMA",
    "feedback_mode",
    "fixmatch_step",
    "linear_ramp",
    "mpl_update",
    "pseudo_labels",
    "soft_cross_entropy",
    "supervised_step",
    "uda_consistency",
    "unwrap",
    "warmup_cosine",
]


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
