"""A trained network rebuilt from a run: the checkpoint's config names the architecture, its entries the weights.

Beside the checkpoint format (``metapl.rundir.checkpoint``); ``metapl eval``, ``predict`` and ``export`` and the
benchmarks call it.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from metapl.config.fields import config_from_dict
from metapl.errors import UserError
from metapl.methods.by_name import get_method
from metapl.models import create_model
from metapl.models.weights import state_dict_mismatch
from metapl.rundir.checkpoint import MODEL_KEYS, refuse_nonfinite_weights, require_keys
from metapl.rundir.export_format import import_modules
from metapl.rundir.layout import LATEST


def checkpoint_file(path: str | Path) -> Path:
    """The ``.pt`` file that ``path`` names: itself, or a run directory's latest checkpoint.

    Args:
        path: a run directory or a ``.pt`` file.

    Returns:
        The checkpoint file path (not checked for existence).
    """
    path = Path(path)
    return path / LATEST if path.is_dir() else path


def refuse_untrained_teacher(ckpt: dict, source: str | Path) -> None:
    """Refuse to use a checkpoint's teacher that its method never trained (the labels-only baseline's)."""
    method = get_method(ckpt["config"].get("method", "mpl"))
    if method.image_teacher and not method.trains_teacher:
        raise UserError(f"{source} is a {method.label} run (--method {method.name}): its teacher was never trained")


def build_model(ckpt: dict, role: str, *, source: str | Path = "checkpoint") -> nn.Module:
    """Rebuild one network of a checkpoint from its config and load its weights.

    Args:
        ckpt: a checkpoint dict (``metapl.rundir.checkpoint.load_checkpoint``).
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
    method = ckpt["config"].get("method", "mpl")
    if role == "teacher" and not get_method(method).image_teacher:  # its teacher reads stored predictions, not images
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
    refuse_nonfinite_weights(ckpt, source, roles=(role,))
    model.load_state_dict(state)
    return model.eval()
