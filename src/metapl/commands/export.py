"""``metapl export RUN``: one trained network as a deployable file plus a JSON record of how to feed it.

Formats: ``safetensors`` (weights only; ``metapl predict`` and ``metapl.rundir.export_format.read_exported`` rebuild the
network from the JSON), ``onnx`` (the legacy TorchScript-based exporter, which needs the ``onnx`` package; a dynamic
batch axis, input ``images``, output ``logits``) and ``torchscript`` (``torch.jit.trace``); ``metapl predict`` takes
all three. Each file gets its own JSON record (``ema.onnx.json``), with the preprocessing of a raw image spelled out;
both are described in ``metapl.rundir.export_format``.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from metapl.errors import UserError
from metapl.rundir.checkpoint import load_checkpoint
from metapl.rundir.export_format import SUFFIX, example_input, export_meta, meta_path, safetensors_bytes, write_files
from metapl.rundir.layout import EXPORT_DIR, FINETUNED
from metapl.rundir.rebuild import build_model, checkpoint_file, refuse_untrained_teacher
from metapl.rundir.result import read_result

logger = logging.getLogger(__name__)

FORMATS = tuple(SUFFIX)
MODELS = ("finetuned", "ema", "student", "teacher")


def run_export(
    path: str | Path, *, model: str | None = None, fmt: str = "safetensors", output: str | Path | None = None
) -> Path:
    """Export one network of a run.

    Args:
        path: a run directory (its ``checkpoint.pt``, and ``finetuned.pt`` if there) or a ``.pt`` checkpoint.
        model: ``finetuned``, ``ema``, ``student`` or ``teacher``; None: a run folder's result
            (``metapl.rundir.result``); a checkpoint file's finetuned student when ``finetuned.pt`` is beside it, else
            its EMA student, else its student.
        fmt: ``safetensors``, ``onnx`` or ``torchscript``.
        output: the model file; default ``RUN_DIR/export/<model><suffix>``. Its JSON record goes beside it, named
            after it (``meta_path``: ``ema.onnx.json``).

    Returns:
        The model file written.

    Raises:
        UserError: an unknown format, a model the run does not hold (no EMA, no finetuned.pt, the teacher of a
            labels-only, reduced-MPL or distillation run), non-finite weights, or an export that fails. Nothing is
            written then.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown --format {fmt!r}; choose {', '.join(FORMATS)}")
    ckpt_path = checkpoint_file(path)
    if model is None and Path(path).is_dir():
        model = read_result(path).role
    ckpt = load_checkpoint(ckpt_path)
    which, source = _choose(ckpt, ckpt_path, model)
    if source != ckpt_path:
        ckpt = load_checkpoint(source)
    role = "student" if which == "finetuned" else which
    net = build_model(ckpt, role, source=source)
    meta = export_meta(ckpt, which, source)
    out = Path(output) if output is not None else ckpt_path.parent / EXPORT_DIR / f"{which}{SUFFIX[fmt]}"
    meta_file = meta_path(out)
    meta = {
        "format": meta.pop("format"),
        "version": meta.pop("version"),
        "weights": out.name,
        "file_format": fmt,
        **meta,
    }
    data = _serialise(net, meta, fmt)
    write_files({out: data, meta_file: (json.dumps(meta, indent=2) + "\n").encode()})
    logger.info(f"wrote {out} and {meta_file.name} ({which} model of {source}, step {ckpt.get('step')}, {fmt})")
    return out


def _choose(ckpt: dict, ckpt_path: Path, model: str | None) -> tuple[str, Path]:
    """The model to export (``--model`` or the default) and the checkpoint file that holds it."""
    ft_path = ckpt_path if ckpt_path.name == FINETUNED else ckpt_path.with_name(FINETUNED)
    if model is None:
        if ft_path.is_file():
            return "finetuned", ft_path
        return ("ema" if ckpt.get("ema") is not None else "student"), ckpt_path
    if model not in MODELS:
        raise UserError(f"unknown --model {model!r}; choose {', '.join(MODELS)}")
    if model == "finetuned":
        if not ft_path.is_file():
            raise UserError(
                f"no {FINETUNED} beside {ckpt_path}; run metapl finetune {ckpt_path.parent} first, "
                "or pick another --model"
            )
        return "finetuned", ft_path
    if model == "ema" and ckpt.get("ema") is None:
        raise UserError(f"{ckpt_path} has no EMA student (trained with --ema 0); pick --model student")
    if model == "teacher":
        refuse_untrained_teacher(ckpt, ckpt_path)
    return model, ckpt_path


def _serialise(net: nn.Module, meta: dict, fmt: str) -> bytes:
    """The exported file's bytes, built in memory so that a failed export leaves nothing on disk."""
    if fmt == "safetensors":
        return safetensors_bytes(net, meta)
    if fmt == "onnx" and importlib.util.find_spec("onnx") is None:
        raise UserError('--format onnx needs the onnx package; pip install "metapl[onnx]", or use --format safetensors')
    x = example_input(meta)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The legacy exporters warn about their own deprecation and about traced shape checks: neither is news
            # to the user, and the tests compare the exported outputs with PyTorch's.
            warnings.simplefilter("ignore")
            if fmt == "onnx":
                torch.onnx.export(
                    net,
                    (x,),
                    buf,  # type: ignore[arg-type]  # a file object works too (torch.onnx.export's docs)
                    dynamo=False,
                    input_names=["images"],
                    output_names=["logits"],
                    dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                )
            else:
                torch.jit.save(torch.jit.trace(net, x), buf)
    except Exception as e:  # an operator the exporter cannot express: name it in one line
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot export {meta['architecture']} as {fmt} ({reason}); try --format safetensors") from None
    return buf.getvalue()
