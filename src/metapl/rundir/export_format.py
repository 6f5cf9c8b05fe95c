"""The exported-model format of ``metapl export``: one model file (``.safetensors``, ``.onnx`` or ``.torchscript.pt``)
and one JSON record per file, named after it (``ema.onnx`` -> ``ema.onnx.json``), whose ``"weights"`` names that file.

The JSON holds what rebuilding the network and feeding it a raw image need, and nothing else::

    {"format": "metapl-export", "version": 2, "weights": "ema.onnx", "file_format": "onnx",
     "architecture": "wrn28_2", "arguments": {"num_classes": 10, "in_channels": 3, "image_size": 32, "dropout": 0.0},
     "num_classes": 10, "classes": [...], "in_channels": 3, "image_size": 32, "mean": [...], "std": [...],
     "input": {"name": "images", "shape": ["batch", 3, 32, 32], "dtype": "float32", "layout": "NCHW"},
     "output": {"name": "logits", "shape": ["batch", 10], ...},
     "preprocessing": {"steps": [...], "decode": {...}, "jpeg_draft": {...}, "resize": {...}, "crop": {...},
                       "scale": {...}, "normalize": {...}, "layout": {...}, "pillow": "..."},
     "role": "ema", "source": "runs/mpl/checkpoint.pt", "step": 4000, "method": "mpl"}

``preprocessing`` spells out, as data, what ``metapl predict`` does to an image file (the training decoder,
``metapl.data.sources.imagetree.decode_image``, and the eval transform): docs/usage.md has a numpy + onnxruntime reader
built on it. ``create_model(architecture, **arguments)`` rebuilds the network, so a ``.safetensors`` export loads with
nothing but metapl (``read_exported``); ``load_export`` loads any of the three formats for ``metapl predict``.
Version 1 wrote one ``<name>.json`` per model name, shared by its formats: still read.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from metapl.config.fields import config_from_dict
from metapl.errors import UserError, reporting_os_errors
from metapl.models import create_model
from metapl.models.weights import state_dict_mismatch

FORMAT = "metapl-export"
VERSION = 2
SUFFIX = {"safetensors": ".safetensors", "onnx": ".onnx", "torchscript": ".torchscript.pt"}


def meta_path(weights: str | Path) -> Path:
    """The JSON record of an exported file: the file's whole name and ``.json`` (``ema.onnx`` -> ``ema.onnx.json``)."""
    weights = Path(weights)
    return weights.with_name(weights.name + ".json")


def _legacy_meta_path(weights: Path) -> Path:
    """Version 1's record: the name with the format's suffix replaced by ``.json``, shared by a model's formats."""
    for suffix in sorted(SUFFIX.values(), key=len, reverse=True):
        if weights.name.endswith(suffix):
            return weights.with_name(weights.name[: -len(suffix)] + ".json")
    return weights.with_suffix(".json")


def file_format(path: str | Path) -> str | None:
    """The export format a file name says (``safetensors``, ``onnx``, ``torchscript``), or None."""
    name = Path(path).name
    return next((fmt for fmt, suffix in SUFFIX.items() if name.endswith(suffix)), None)


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is a file of ``metapl export``: a JSON record beside it, or a ``.safetensors``/``.onnx``
    name (a ``.pt`` file is a checkpoint unless its record is there)."""
    path = Path(path)
    return meta_path(path).is_file() or file_format(path) in ("safetensors", "onnx")


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
    classes, mean, std = (
        [str(c) for c in ckpt["classes"]],
        [float(v) for v in ckpt["mean"]],
        [float(v) for v in ckpt["std"]],
    )
    meta.update({"classes": classes, "mean": mean, "std": std})
    size, channels = shape["image_size"], shape["in_channels"]
    meta["input"] = {"name": "images", "shape": ["batch", channels, size, size], "dtype": "float32", "layout": "NCHW"}
    meta["output"] = {
        "name": "logits",
        "shape": ["batch", shape["num_classes"]],
        "meaning": "logits; their softmax over the last axis gives the probabilities of 'classes', in that order",
    }
    meta["preprocessing"] = preprocessing(channels, size, mean, std)
    meta.update({"role": role, "source": str(source), "step": ckpt.get("step"), "method": cfg.method})
    imports = getattr(cfg, "imports", None)
    if imports:
        meta["imports"] = imports
    return meta


def preprocessing(channels: int, size: int, mean: list[float], std: list[float]) -> dict:
    """What ``metapl predict`` does to an image file before the network sees it, step by step, as data.

    It is ``decode_image`` (the training decoder: ``metapl.data.sources.imagetree``) and the eval transform
    (``metapl.data.views.per_image.ToNormalizedFloat``); ``tests/test_export_reader.py`` runs docs/usage.md's reader,
    built on this record alone, against ``metapl predict``.
    """
    mode = "L" if channels == 1 else "RGB"
    return {
        "steps": ["decode", "jpeg_draft", "resize", "crop", "scale", "normalize", "layout"],
        "decode": {
            "channels": mode,
            "rule": f"Pillow's Image.convert('{mode}'): "
            + (
                "colour to grey as L = 0.299 R + 0.587 G + 0.114 B; a colour JPEG is made grey by the JPEG decoder "
                "itself (its luma), as jpeg_draft asks for L"
                if mode == "L"
                else "a grey image repeated over R, G and B; alpha dropped; palettes expanded"
            ),
        },
        "jpeg_draft": {
            "size": [size, size],
            "rule": f"JPEG files only: decode at scale 1/s, s the largest of 8, 4, 2, 1 with s <= min(width // {size}, "
            f"height // {size}), to ceil(width / s) x ceil(height / s) pixels (Pillow's Image.draft('{mode}', "
            f"({size}, {size})): libjpeg's DCT scaling)",
        },
        "resize": {
            "size": [size, size],
            "interpolation": "bicubic",
            "rule": f"scale both sides by {size} / min(width, height), so the shorter side becomes {size}; Pillow's "
            "bicubic (a = -0.5), its kernel widened by the reduction when shrinking (antialiased)",
        },
        "crop": {
            "rule": f"the centred {size} x {size} window of the resized image (Pillow resamples only that window: "
            f"ImageOps.fit resizes the centred square of side min(width, height), in fractional pixels, to {size} x "
            f"{size})"
        },
        "scale": {"divide_by": 255, "range": [0, 1], "dtype": "float32"},
        "normalize": {"mean": mean, "std": std, "rule": "(x - mean) / std per channel, after scale"},
        "layout": {"order": "NCHW", "channels": mode, "dtype": "float32"},
        "pillow": f"image.draft('{mode}', ({size}, {size})); image = ImageOps.fit(image.convert('{mode}'), ({size}, "
        f"{size}), Image.Resampling.BICUBIC)",
    }


def safetensors_bytes(model: nn.Module, meta: dict) -> bytes:
    """The model's state dict as a ``.safetensors`` file's bytes (tensors copied: shared storage is not allowed)."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    return save(tensors, metadata={"format": "pt", "metapl": json.dumps({"architecture": meta["architecture"]})})


def read_meta(path: str | Path) -> dict:
    """The JSON record of the exported file ``path``: version 2's ``<file>.json``, else version 1's ``<name>.json``.

    Raises:
        UserError: no record beside the file, or a JSON of another format.
    """
    path = Path(path)
    meta_file = meta_path(path)
    if not meta_file.is_file() and _legacy_meta_path(path).is_file():
        meta_file = _legacy_meta_path(path)
    if not meta_file.is_file():
        raise UserError(f"no {meta_path(path).name} beside {path}; keep the JSON that metapl export wrote next to it")
    with reporting_os_errors(meta_file, "read"):
        text = meta_file.read_bytes()
    try:
        meta = json.loads(text.decode("utf-8"))
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{meta_file} is not a metapl export record; export the model again with metapl export")
    return meta


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

    path = Path(path)
    meta = read_meta(path)
    import_modules(meta.get("imports"))
    model = create_model(meta["architecture"], **meta["arguments"])
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read {path} ({str(e).splitlines()[0][:80]}); export the model again") from None
    problem = state_dict_mismatch(model.state_dict(), state)
    if problem:
        raise UserError(
            f"{path}: the weights do not fit {meta['architecture']} as its JSON record describes it "
            f"({problem}); was one of the two files replaced?"
        )
    model.load_state_dict(state)
    return model.eval(), meta


def load_export(path: str | Path) -> tuple[nn.Module, dict]:
    """Any file of ``metapl export`` as a module mapping normalised (B, C, H, W) float32 images to (B, K) logits.

    ``.safetensors``: rebuilt by ``read_exported``; ``.onnx``: run by ONNX Runtime on the CPU (``metapl[onnx]``);
    TorchScript: ``torch.jit.load``. The format is the record's ``file_format`` (version 1: the file's suffix).

    Returns:
        ``(model in eval mode, the JSON record)``.

    Raises:
        UserError: no record, an unknown format, ONNX Runtime missing, or a file its reader cannot load.
    """
    path = Path(path)
    meta = read_meta(path)
    fmt = meta.get("file_format") or file_format(path)
    if fmt == "safetensors":
        return read_exported(path)
    try:
        if fmt == "onnx":
            return _OnnxModel(path), meta
        if fmt == "torchscript":
            with warnings.catch_warnings():  # torch.jit.load's deprecation notice is PyTorch's news, not the user's
                warnings.simplefilter("ignore", FutureWarning)
                return torch.jit.load(str(path), map_location="cpu").eval(), meta
    except UserError:
        raise
    except Exception as e:  # a damaged file: its reader's many exception types all mean "cannot load"
        reason = str(e).strip().splitlines()[0][:100] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load {path} as {fmt} ({reason}); export the model again") from None
    raise UserError(f"{path}: unknown export format {fmt!r} in its JSON record; export the model again")


class _OnnxModel(nn.Module):
    """An ``.onnx`` export behind a module's call: ONNX Runtime on the CPU, tensors in and out."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        try:
            import onnxruntime
        except ImportError:
            raise UserError(
                f'{path} is an ONNX file: reading it needs onnxruntime; pip install "metapl[onnx]", or predict with '
                "the run folder or a .safetensors export"
            ) from None
        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session.run(None, {self.input_name: x.detach().cpu().float().numpy()})
        return torch.from_numpy(logits).to(x.device)


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
