"""A trained network rebuilt from a run: the checkpoint's config names the architecture, its entries the weights.

Beside the checkpoint format (``metapl.engine.checkpoint``); ``metapl eval``, ``predict`` and ``export`` and the
benchmarks call it.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from metapl.engine.checkpoint import MODEL_KEYS, refuse_nonfinite, require_keys
from metapl.engine.config import REDUCED_METHODS, config_from_dict
from metapl.engine.exported import import_modules
from metapl.engine.run_dir import LATEST
from metapl.errors import UserError
from metapl.models import create_model
from metapl.models.weights import state_dict_mismatch


def checkpoint_file(path: str | Path) -> Path:
    """The ``.pt`` file that ``path`` names: itself, or a run directory's latest checkpoint.

    Args:
        path: a run directory or a ``.pt`` file.

    Returns:
        The checkpoint file path (not checked for existence).
    """
    path = Path(path)
    return path / LATEST if path.is_dir() else path


def build_model(ckpt: dict, role: str, *, source: str | Path = "checkpoint") -> nn.Module:
    """Rebuild one network of a checkpoint from its config and load its weights.

    Args:
        ckpt: a checkpoint dict (``metapl.engine.checkpoint.load_checkpoint``).
        role: ``teacher``, ``student`` or ``ema`` (the EMA student has the student's architecture).
        source: where the checkpoint came from, for error messages.

    Returns:
        The model in eval mode, on the CPU.

    Raises:
        UserError: the checkpoint lacks that network, its weights do not fit the architecture its config names, or
            they hold NaN/inf (a diverged run).
    """
    require_keys(ckpt, MODEL_KEYS, source)
    state = ckpt.get(role)
    if state is None:
        raise UserError(f"{source} holds no {role} weights")
    method = ckpt["config"].get("method")
    if role == "teacher" and method in REDUCED_METHODS:  # its teacher reads stored predictions, not images
        raise UserError(
            f"{source} is a --method {method} run: its teacher entry is not a {ckpt['config'].get('teacher')} "
            "classifier of images; use the student, ema or finetuned model"
        )
    cfg = config_from_dict(ckpt["config"])
    import_modules(getattr(cfg, "imports", None))
    name, dropout = (cfg.teacher, cfg.teacher_dropout) if role == "teacher" else (cfg.student, cfg.student_dropout)
    num_classes, in_channels = int(ckpt["num_classes"]), int(ckpt["in_channels"])
    model = create_model(
        name, num_classes=num_classes, in_channels=in_channels, image_size=int(ckpt["image_size"]), dropout=dropout
    )
    problem = state_dict_mismatch(model.state_dict(), state)
    if problem:
        raise UserError(
            f"{source}: the {role} weights do not fit {name} rebuilt from the checkpoint's config "
            f"(num_classes={num_classes}, in_channels={in_channels}): {problem}; "
            "was the checkpoint edited, or written for another data set?"
        )
    refuse_nonfinite(ckpt, source, roles=(role,))
    model.load_state_dict(state)
    return model.eval()
