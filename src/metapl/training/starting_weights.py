"""Where a run's models start: ``--pretrained`` and ``--teacher-weights`` / ``--student-weights``.

A weights source is a metapl run folder (the model the run handed back: its result, ``metapl.rundir.result``), a
metapl checkpoint (``checkpoint.pt``, ``finetuned.pt``: its finetuned student, else its EMA student, else its
student; a ``:student``, ``:ema`` or ``:teacher`` suffix picks the network, on a run folder too), a plain state-dict
file or a ``.safetensors`` file.
Every file is read weights-only (``metapl.models.weights``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from metapl.config.fields import TrainConfig
from metapl.data.stores import SourceData
from metapl.errors import UserError
from metapl.methods.by_name import get_method
from metapl.models import create_model
from metapl.models.weights import as_state_dict, load_into, read_file
from metapl.rundir.checkpoint import ROLES, refuse_nonfinite_weights
from metapl.rundir.layout import FINETUNED, LATEST
from metapl.rundir.result import read_result

logger = logging.getLogger(__name__)


def read_weights(source: str) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict a weights source names, and a description of it for the log (``runs/t/checkpoint.pt (ema)``);
    a run folder that has not finished gets a warning line (``metapl.rundir.result.read_result``).

    Raises:
        UserError: a missing file or network, a file that is not weights, non-finite weights.
    """
    path, role = _path_and_role(source)
    if path.is_dir():
        if not (path / LATEST).is_file():
            raise UserError(f"{source} is a folder without {LATEST}; pass a metapl run folder or a weights file")
        if role is None:
            result = read_result(path)
            path, role = path / result.file, result.network
        else:
            path = path / LATEST
    obj = read_file(path)
    if not ("config" in obj and "student" in obj):  # a plain state dict
        if role is not None:
            raise UserError(f"{path} is a plain state dict, not a metapl checkpoint; drop the :{role} suffix")
        return as_state_dict(obj, path), str(path)
    role = role or ("student" if path.name == FINETUNED or obj.get("ema") is None else "ema")
    if obj.get(role) is None:
        raise UserError(f"{path} holds no {role} network; pick another with :student, :ema or :teacher")
    if role == "teacher" and not get_method(obj["config"].get("method", "mpl")).image_teacher:
        raise UserError(
            f"{path}'s teacher is a reduced teacher over stored predictions, not an image model; "
            "use its :student or :ema"
        )
    refuse_nonfinite_weights(obj, path, roles=(role,))
    return as_state_dict(obj[role], path), f"{path} ({role})"


def _path_and_role(source: str) -> tuple[Path, str | None]:
    """``runs/t/checkpoint.pt:ema`` -> (``runs/t/checkpoint.pt``, ``ema``); a path that exists as given is never
    split."""
    head, sep, tail = str(source).rpartition(":")
    if sep and tail in ROLES and not Path(source).exists():
        return Path(head), tail
    return Path(source), None


def start_model(
    cfg: TrainConfig, role: str, data: SourceData, *, replace_head: bool = True, load: bool = True
) -> nn.Module:
    """The run's ``role`` network (``teacher`` or ``student``), built and started from its weights, if any.

    Args:
        cfg: the run's config (model names, dropout, ``pretrained``, the weights sources).
        role: ``teacher`` or ``student``.
        data: the run's ``SourceData`` (class count, channels, image size).
        replace_head: accept weights whose classifier has another class count (replacing it); False refuses them
            (a large teacher that only predicts must already know the data's classes).
        load: start from the configured weights; False builds the bare network (a resumed run's checkpoint has them).

    Returns:
        The model on the CPU, in train mode.
    """
    name, dropout = (cfg.teacher, cfg.teacher_dropout) if role == "teacher" else (cfg.student, cfg.student_dropout)
    model = create_model(
        name,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        image_size=data.image_size,
        dropout=dropout,
        pretrained=load and cfg.pretrained in (role, "both"),
    )
    source = cfg.teacher_weights if role == "teacher" else cfg.student_weights
    if source and load:
        state, where = read_weights(source)
        if not replace_head:
            _refuse_other_classes(model, state, where, data.num_classes)
        load_into(model, state, where)
        logger.info(f"{role} {name} starts from {where}")
    return model


def _refuse_other_classes(model: nn.Module, state: dict, where: str, num_classes: int) -> None:
    head = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    weight = state.get(f"{head[-1]}.weight") if head else None
    if weight is not None and weight.shape[0] != num_classes:
        raise UserError(
            f"{where} predicts {weight.shape[0]} classes but the data has {num_classes}; a teacher that "
            "only predicts must have been trained on these classes"
        )
