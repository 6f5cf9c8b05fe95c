"""The exported-model format of ``metapl export``: weights as ``.safetensors`` plus a JSON file beside them.

The JSON (``<name>.json`` next to ``<name>.safetensors``, ``.onnx`` or ``.torchscript.pt``) holds what rebuilding and
feeding the network needs and nothing else::

    {"format": "metapl-export", "version": 1, "architecture": "wrn28_2",
     "arguments": {"num_classes": 10, "in_channels": 3, "image_size": 32, "dropout": 0.0},
     "num_classes": 10, "classes": [...], "in_channels": 3, "image_size": 32, "mean": [...], "std": [...],
     "role": "ema", "source": "runs/mpl/checkpoint.pt", "step": 4000, "method": "mpl", "weights": "ema.safetensors"}

Inputs are ``(B, in_channels, image_size, image_size)`` float images scaled to [0, 1] and normalised with
``mean``/``std``; outputs are ``(B, num_classes)`` logits. ``create_model(architecture, **arguments)`` rebuilds the
network, so a ``.safetensors`` export loads with nothing but metapl (``read_exported``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from metapl.config.fields import config_from_dict
from metapl.errors import UserError, reporting_os_errors
from metapl.models import create_model
from metapl.models.weights import state_dict_mismatch

FORMAT = "metapl-export"
VERSION = 1
SUFFIX = {"safetensors": ".safetensors", "onnx": ".onnx", "torchscript": ".torchscript.pt"}


def meta_path(weights: str | Path) -> Path:
    """The JSON file that belongs to an exported file: its name with the format's suffix replaced by ``.json``."""
    weights = Path(weights)
    for suffix in sorted(SUFFIX.values(), key=len, reverse=True):
        if weights.name.endswith(suffix):
            return weights.with_name(weights.name[: -len(suffix)] + ".json")
    return weights.with_suffix(".json")


def export_meta(ckpt: dict, role: str, source: str | Path) -> dict:
    """The JSON record of one network of a checkpoint (see the module docstring).

    Args:
        ckpt: a checkpoint dict (``metapl.rundir.checkpoint.load_checkpoint``).
        role: the checkpoint entry exported: ``teacher``, ``student`` or ``ema``; ``finetuned`` is the student entry
            of ``finetuned.pt``.
        source: the checkpoint file, recorded as ``source``.

    Returns:
        The record, without ``weights`` (the caller names the file).
    """
    cfg = config_from_dict(ckpt["config"])
    name, dropout = (cfg.teacher, cfg.teacher_dropout) if role == "teacher" else (cfg.student, cfg.student_dropout)
    shape = {key: int(ckpt[key]) for key in ("num_classes", "in_channels", "image_size")}
    meta = {"format": FORMAT, "version": VERSION, "architecture": name, "arguments": {**shape, "dropout": dropout}}
    meta.update(shape)
    meta.update(
        {
            "classes": [str(c) for c in ckpt["classes"]],
            "mean": [float(v) for v in ckpt["mean"]],
            "std": [float(v) for v in ckpt["std"]],
            "role": role,
            "source": str(source),
            "step": ckpt.get("step"),
            "method": cfg.method,
        }
    )
    imports = getattr(cfg, "imports", None)
    if imports:
        meta["imports"] = imports
    return meta


def safetensors_bytes(model: nn.Module, meta: dict) -> bytes:
    """The model's state dict as a ``.safetensors`` file's bytes (tensors copied: shared storage is not allowed)."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    return save(tensors, metadata={"format": "pt", "metapl": json.dumps({"architecture": meta["architecture"]})})


def read_exported(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild an exported ``.safetensors`` model from the JSON beside it.

    Args:
        path: the ``.safetensors`` file written by ``metapl export``.

    Returns:
        ``(model in eval mode on the CPU, the JSON record)``.

    Raises:
        UserError: no JSON beside the file, a JSON of another format, or weights that do not fit the architecture.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path, meta_file = Path(path), meta_path(path)
    if not meta_file.is_file():
        raise UserError(f"no {meta_file.name} beside {path}; keep the JSON that metapl export wrote next to it")
    with reporting_os_errors(meta_file, "read"):
        text = meta_file.read_bytes()
    try:
        meta = json.loads(text.decode("utf-8"))
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{meta_file} is not a metapl export record; export the model again with metapl export")
    import_modules(meta.get("imports"))
    model = create_model(meta["architecture"], **meta["arguments"])
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read {path} ({str(e).splitlines()[0][:80]}); export the model again") from None
    problem = state_dict_mismatch(model.state_dict(), state)
    if problem:
        raise UserError(
            f"{path}: the weights do not fit {meta['architecture']} as {meta_file.name} describes it "
            f"({problem}); was one of the two files replaced?"
        )
    model.load_state_dict(state)
    return model.eval(), meta


def import_modules(imports: Iterable[str] | None) -> None:
    """Import the user's model modules a run or an export names (``--import``); a no-op when there are none."""
    if not imports:
        return
    from metapl.models.plugins import import_model_modules

    import_model_modules(imports)


def write_files(files: dict[Path, bytes]) -> None:
    """Write each file's bytes to a temporary name, then rename them all into place (so nothing half-written is
    left when the disk refuses)."""
    tmps = {}
    try:
        for path, data in files.items():
            with reporting_os_errors(path):
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.tmp")
                tmps[path] = tmp
                tmp.write_bytes(data)
        for path, tmp in tmps.items():
            with reporting_os_errors(path):
                tmp.replace(path)
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)


def example_input(meta: dict) -> torch.Tensor:
    """A ``(1, C, H, W)`` zero batch of the exported model's input shape (for tracing)."""
    return torch.zeros(1, meta["in_channels"], meta["image_size"], meta["image_size"])
