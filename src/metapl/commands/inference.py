"""``metapl eval`` and ``metapl predict``: a trained run's models rebuilt from a checkpoint (or an export) alone.

Everything needed to rebuild the networks (model names, dropout, class count, channels, image size, normalisation,
class names) is read from the checkpoint, so neither command takes training options. ``eval`` reloads the run's own
test split through the saved config; ``predict`` reads arbitrary image files with the training data's decoder
(``data.sources.imagetree.decode_image``: channels converted, JPEG draft, shorter side resized and centre-cropped
with bicubic filtering) and the eval transform (``data.views.per_image.eval_transform`` with the run's mean/std), so
that a prediction is what ``eval`` scored.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from metapl import data as mdata
from metapl.commands.eval_report import evaluate_report, format_per_class, format_table, plot_confusion
from metapl.config.fields import TrainConfig, config_from_dict
from metapl.data.sources.imagetree import decode_image, is_split_tree
from metapl.data.stores import SourceData
from metapl.data.views.per_image import eval_transform
from metapl.errors import UserError, few, reporting_os_errors
from metapl.methods.by_name import get_method
from metapl.rundir.checkpoint import load_checkpoint, refuse_overwrite
from metapl.rundir.export_format import is_export, load_export, meta_path
from metapl.rundir.layout import EVAL_JSON, FINETUNED, RUN_FILES, read_summary
from metapl.rundir.rebuild import build_model, checkpoint_file, refuse_untrained_teacher
from metapl.rundir.result import read_result
from metapl.training.process import plan_cpu_share, select_device

logger = logging.getLogger(__name__)

PREDICT_BATCH = 256  # images decoded and classified at once: bounds memory for folders of any size
# What predict reads, for --help and for the one line that refuses anything else.
PREDICT_TAKES = (
    "a run folder, a .pt checkpoint of metapl train, or a file of metapl export (.safetensors, .onnx or "
    ".torchscript.pt, its .json record beside it)"
)


# ----------------------------------------------------------------------------------------------------------------
# metapl eval


def run_eval(
    path: str | Path,
    *,
    data_dir: str | None = None,
    output: str | Path | None = None,
    device: str = "auto",
    image_size: int | None = None,
    plot: bool = False,
) -> dict:
    """Accuracy, calibration and per-class figures of a run's teacher, student, EMA student (and finetuned student).

    Args:
        path: a run directory (its ``checkpoint.pt``, plus ``finetuned.pt`` if there) or a ``.pt`` checkpoint.
        data_dir: where the test data lives, overriding the ``data_dir`` saved in the run's config. For a
            ``--dataset folder`` run, a tree with ``train/`` and ``test/`` gives its test split and a flat
            ``<class>/*`` folder is scored whole (every image is a test image).
        output: JSON file for the results; default ``RUN_DIR/eval.json``, or ``<name>.eval.json`` beside a ``.pt``
            (so that evaluating ``finetuned.pt`` does not overwrite the result of ``checkpoint.pt``).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        image_size: resize the images to this size; default the run's (``--data-dir`` of a folder run: the size
            the checkpoint was trained at).
        plot: also write the confusion matrices as ``<output stem>.confusion.png``.

    Returns:
        ``{"<model>_acc": top-1 %, "<model>_top5": top-5 % (more than 5 classes only), "<model>_ece": expected
        calibration error % (15 bins), ...}`` plus ``checkpoint``, ``step``, ``dataset``, ``data_dir``, ``num_test``,
        ``classes`` and ``models`` (per model: per-class accuracy/precision/recall/support and the confusion matrix,
        ``metapl.commands.eval_report.class_report``); the same dict is written to ``output``.

    Raises:
        UserError: unreadable checkpoint, weights that do not fit their config, or a test set whose class count,
            channels or image size differ from the checkpoint's.
    """
    path = Path(path)
    ckpt_path = checkpoint_file(path)
    output = _eval_output(path, ckpt_path, output)
    ckpt = load_checkpoint(ckpt_path)
    cfg = config_from_dict(ckpt["config"])
    models = _eval_models(path, ckpt, ckpt_path, cfg)
    dev = select_device(device)
    loader, num_test, where = _test_loader(cfg, ckpt, ckpt_path, data_dir, image_size, dev)
    reports = evaluate_report({name: m.to(dev) for name, m in models.items()}, loader, dev, int(ckpt["num_classes"]))
    result = _eval_result(ckpt, ckpt_path, cfg, data_dir, num_test, reports)
    result["result"] = _headline_model(path, reports)
    _log_eval(result, ckpt_path, where)
    _write_eval(result, output, plot)
    return result


def _eval_output(path: Path, ckpt_path: Path, output: str | Path | None) -> Path:
    """Where ``run_eval`` writes: ``output`` (refused if it would overwrite what eval reads), else its default."""
    if output is None:
        return path / EVAL_JSON if path.is_dir() else path.with_name(f"{path.stem}.{EVAL_JSON}")
    read = ((ckpt_path, "the checkpoint"), (path / FINETUNED, "the checkpoint"))
    refuse_overwrite(output, inputs=read, own=tuple(n for n in RUN_FILES if n.endswith(EVAL_JSON)))
    return Path(output)


def _eval_models(path: Path, ckpt: dict, ckpt_path: Path, cfg: TrainConfig) -> dict[str, nn.Module]:
    """The checkpoint's models that ``run_eval`` scores, plus the finetuned student of a run folder that has one."""
    models = {role: build_model(ckpt, role, source=ckpt_path) for role in _eval_roles(ckpt, cfg)}
    finetuned_path = path / FINETUNED
    if path.is_dir() and finetuned_path.is_file():
        models["finetuned"] = build_model(load_checkpoint(finetuned_path), "student", source=finetuned_path)
    return models


def _eval_result(
    ckpt: dict, ckpt_path: Path, cfg: TrainConfig, data_dir: str | None, num_test: int, reports: dict
) -> dict:
    """``run_eval``'s result: what was scored, each model's headline figures, the classes and the per-model reports."""
    result = {
        "checkpoint": str(ckpt_path),
        "step": ckpt.get("step"),
        "dataset": cfg.dataset,
        "data_dir": data_dir if data_dir is not None else cfg.data_dir,
        "num_test": num_test,
    }
    for name, report in reports.items():
        result.update({f"{name}_{key}": report[key] for key in ("acc", "top5", "ece") if key in report})
    result.update({"classes": [str(c) for c in ckpt["classes"]], "models": reports})
    return result


def _log_eval(result: dict, ckpt_path: Path, where: str) -> None:
    """The tables ``metapl eval`` prints: every model's figures, then the main model's per-class figures."""
    reports, classes = result["models"], result["classes"]
    logger.info(f"{ckpt_path} (step {result['step']}) on {where}, {result['num_test']} images:")
    logger.info(format_table(result))
    main = result["result"]
    logger.info(f"per class ({main}, the run's result; ECE: 15 equal-width confidence bins):")
    logger.info(format_per_class(reports[main], classes))


def _write_eval(result: dict, output: Path, plot: bool) -> None:
    """Write the result as JSON (and, with ``plot``, the confusion matrices beside it)."""
    with reporting_os_errors(output):
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
    logger.info(f"wrote {output}")
    if plot:
        png = plot_confusion(result["models"], result["classes"], output.with_name(f"{output.stem}.confusion.png"))
        logger.info(f"wrote {png}")


def _headline_model(path: Path, reports: dict) -> str:
    """The model eval puts first: a run folder's result, else the finetuned, EMA or plain student of a checkpoint."""
    entry = read_summary(path).get("result") if path.is_dir() else None
    if isinstance(entry, dict) and entry.get("role") in reports:
        return entry["role"]
    return next(name for name in ("finetuned", "ema", "student") if name in reports)


def _eval_roles(ckpt: dict, cfg: TrainConfig) -> list[str]:
    # A labels-only run has no trained teacher; a reduced run's teacher reads stored predictions, not images.
    roles = list(get_method(cfg.method).evaluated_roles)
    if ckpt.get("ema") is not None:
        roles.append("ema")
    return roles


def _test_loader(
    cfg: TrainConfig,
    ckpt: dict,
    ckpt_path: Path,
    data_dir: str | None,
    image_size: int | None,
    device: torch.device,
) -> tuple[DataLoader, int, str]:
    """A loader of the images to score, checked against what the checkpoint's models take, their count, and a
    phrase naming them. A streamed split is decoded in the run's ``--workers`` loader workers."""

    # A flat folder of a folder run is all test images; the run's own data keeps the run's split (same seed).
    whole = data_dir is not None and cfg.dataset == "folder" and Path(data_dir).is_dir()
    whole = whole and data_dir is not None and not is_split_tree(Path(data_dir))
    if image_size is None:
        image_size = int(ckpt["image_size"]) if data_dir is not None and cfg.dataset == "folder" else cfg.image_size
    data = mdata.load_dataset(
        cfg.dataset,
        data_dir if data_dir is not None else cfg.data_dir,
        download=cfg.download,
        image_size=image_size,
        cache_dir=cfg.cache_dir,
        skip_corrupt=cfg.skip_corrupt,
        seed=cfg.seed,
        data_path="cache" if whole else cfg.data_path,
    )
    _check_test_data(data, cfg, ckpt, ckpt_path)
    test, where = data.test, f"the {cfg.dataset} test split"
    if whole:
        test = mdata.ImageArrays(
            np.concatenate([data.train.images, data.test.images]), np.concatenate([data.train.labels, data.test.labels])
        )
        where = f"all of {data_dir}"
        logger.info(
            f"{data_dir} has no train/ and test/ folders: all {len(test)} of its images are scored as the test set"
        )
    # The checkpoint's mean/std, not the data set's: they are what the weights were trained on.
    workers = mdata.eval_workers(test, plan_cpu_share(cfg.workers, cfg.threads, device).workers)
    loader = mdata.make_eval_loader(
        test, mean=ckpt["mean"], std=ckpt["std"], batch_size=cfg.eval_batch_size, num_workers=workers
    )
    return loader, len(test), where


def _check_test_data(data: SourceData, cfg: TrainConfig, ckpt: dict, ckpt_path: Path) -> None:
    """Refuse test data the checkpoint's models cannot take; warn when only the class names differ."""
    same_data = "pass the --data-dir of the data set the run was trained on"
    checks = (
        ("classes", data.num_classes, ckpt["num_classes"], same_data),
        ("channels", data.in_channels, ckpt["in_channels"], same_data),
        ("pixels per side", data.image_size, ckpt["image_size"], f"pass --image-size {ckpt['image_size']}"),
    )
    for what, have, want, fix in checks:
        if int(have) != int(want):
            raise UserError(
                f"the {cfg.dataset} test data has {have} {what} but checkpoint {ckpt_path} was trained with "
                f"{want} {what}; {fix}"
            )
    if list(data.classes) != list(ckpt["classes"]):
        logger.warning(
            f"the data set's class names differ from the checkpoint's ({few(list(data.classes))} vs "
            f"{few(list(ckpt['classes']))}); labels are compared by index"
        )


# ----------------------------------------------------------------------------------------------------------------
# metapl predict


def run_predict(
    checkpoint: str | Path,
    paths: Iterable[str | Path],
    *,
    model: str | None = None,
    output: str | Path = "predictions.csv",
    top_k: int = 3,
    device: str = "auto",
) -> list[dict]:
    """Classify image files and folders of images (searched recursively) and write one CSV row per image.

    Args:
        checkpoint: a ``.pt`` checkpoint, a run directory (its ``checkpoint.pt``), or a file of ``metapl export``
            (``.safetensors``, ``.onnx`` (needs onnxruntime) or ``.torchscript.pt``) with its JSON record beside it: the
            exported network predicts (``model`` must then be None).
        paths: image files (any format Pillow reads) and folders.
        model: ``ema`` (the EMA student; the student when the run kept no EMA), ``student``, ``teacher`` or
            ``finetuned`` (the student in ``finetuned.pt`` beside the checkpoint); None: a run folder's result
            (``metapl.rundir.result``), a checkpoint file's EMA student.
        output: the CSV file, columns ``path,class,probability,top_k``; ``top_k`` reads ``cat:0.8100;dog:0.1200``.
        top_k: how many classes ``top_k`` lists (capped at the number of classes).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        One dict per image: ``path``, ``class``, ``probability`` and ``top_k`` (a list of ``(class, probability)``,
        most probable first).

    Raises:
        UserError: a missing path, no images found, an unreadable image (named), no ``finetuned.pt``, a bad
            ``top_k``, ``model`` given with an export, or a file that is neither a checkpoint nor an export.
    """
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    ckpt_path = checkpoint_file(checkpoint)
    net, ckpt, model = _predictor(checkpoint, ckpt_path, model)
    files = find_images(paths)
    inputs = (
        (ckpt_path, "the checkpoint"),
        *((f, "the input image") for f in files),
        *((p, "the input") for p in paths),
    )
    refuse_overwrite(output, inputs=inputs)
    dev = select_device(device)
    rows = _classify(net.to(dev), files, ckpt, top_k, dev)
    output = Path(output)
    _write_predictions(rows, output)
    logger.info(
        f"wrote predictions for {len(rows)} images to {output} ({model} model of {ckpt_path}, step {ckpt.get('step')})"
    )
    return rows


def _predictor(given: str | Path, ckpt_path: Path, model: str | None) -> tuple[nn.Module, dict, str]:
    """The network ``run_predict`` uses, the checkpoint (or export record) it came from, and how to name it."""
    if ckpt_path.is_file() and is_export(ckpt_path):  # metapl export's file: its JSON record says what it is
        if model is not None:
            raise UserError(f"{ckpt_path} is an export: it holds one network; drop --model, or predict with the run")
        net, meta = load_export(ckpt_path)
        return net, meta, f"exported {meta['role']}"
    if model is None:
        model = read_result(given).role if Path(given).is_dir() else "ema"
    try:
        ckpt = load_checkpoint(ckpt_path)
    except UserError:
        if not ckpt_path.is_file():
            raise
        raise UserError(
            f"{ckpt_path} is not a metapl checkpoint, nor an export with its {meta_path(ckpt_path).name} beside it; "
            f"predict takes {PREDICT_TAKES}"
        ) from None
    net, ckpt = _predict_model(ckpt, ckpt_path, model)
    return net, ckpt, model


def _classify(net: nn.Module, files: list[Path], ckpt: dict, top_k: int, dev: torch.device) -> list[dict]:
    """``run_predict``'s rows: the images classified ``PREDICT_BATCH`` at a time, their ``top_k`` classes each."""
    classes = [str(c) for c in ckpt["classes"]]
    k = min(top_k, len(classes))
    mode = "L" if int(ckpt["in_channels"]) == 1 else "RGB"
    # The training decoder and the eval transform, with the checkpoint's mean/std: what eval scored, to the bit.
    transform = eval_transform(ckpt["mean"], ckpt["std"])
    rows = []
    for batch_files in _chunks(files, PREDICT_BATCH):
        x = torch.stack([transform(_read_image(f, mode, int(ckpt["image_size"]))) for f in batch_files])  # (B, C, H, W)
        with torch.inference_mode():
            probs = net(x.to(dev)).float().softmax(dim=1)
        top_p, top_i = probs.topk(k, dim=1)  # (B, k), sorted most probable first
        for f, ps, idx in zip(batch_files, top_p.cpu().tolist(), top_i.cpu().tolist()):
            ranked = [(classes[i], p) for i, p in zip(idx, ps)]
            rows.append({"path": str(f), "class": ranked[0][0], "probability": ranked[0][1], "top_k": ranked})
    return rows


def _write_predictions(rows: list[dict], output: Path) -> None:
    """The CSV of ``run_predict``: ``path,class,probability,top_k``, ``top_k`` as ``cat:0.8100;dog:0.1200``."""
    with reporting_os_errors(output):
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(output, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "class", "probability", "top_k"])
            for r in rows:
                top = ";".join(f"{c}:{p:.4f}" for c, p in r["top_k"])
                writer.writerow([r["path"], r["class"], f"{r['probability']:.4f}", top])


def _predict_model(ckpt: dict, ckpt_path: Path, which: str) -> tuple[nn.Module, dict]:
    """The network ``--model`` names, and the checkpoint it came from."""
    if which == "finetuned":
        ft_path = ckpt_path if ckpt_path.name == FINETUNED else ckpt_path.with_name(FINETUNED)
        if not ft_path.is_file():
            raise UserError(
                f"no {FINETUNED} beside {ckpt_path}; run metapl finetune {ckpt_path.parent} first, "
                "or pick another --model"
            )
        ft = load_checkpoint(ft_path)
        return build_model(ft, "student", source=ft_path), ft
    if which == "ema" and ckpt.get("ema") is None:
        logger.warning(f"{ckpt_path} has no EMA student (trained with --ema 0); predicting with the student")
        which = "student"
    if which == "teacher":
        refuse_untrained_teacher(ckpt, ckpt_path)
    if which not in ("ema", "student", "teacher"):
        raise UserError(f"unknown --model {which!r}; choose ema, student, teacher or finetuned")
    return build_model(ckpt, which, source=ckpt_path), ckpt


def _readable_extensions() -> set[str]:
    # Only formats Pillow can open: registered_extensions() also lists write-only ones such as .pdf.
    Image.init()
    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def find_images(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and folders into a list of image files.

    A file named explicitly is taken whatever its extension (Pillow decides whether it can read it); inside folders,
    files with an extension Pillow can open are collected recursively, in sorted order, skipping hidden ones.

    Args:
        paths: files and folders.

    Returns:
        The image files, each once, in the order given.

    Raises:
        UserError: a path does not exist, or nothing was found.
    """
    extensions = _readable_extensions()
    found: list[Path] = []
    seen: set[Path] = set()
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{p} does not exist; pass image files or folders of images")
        if p.is_dir():
            candidates = sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and f.suffix.lower() in extensions
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
        else:
            candidates = [p]
        for f in candidates:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                found.append(f)
    if not found:
        names = ", ".join(str(p) for p in paths)
        raise UserError(f"no images found in {names}; readable extensions include .png, .jpg, .bmp, .gif, .tif")
    return found


def _read_image(path: Path, mode: str, size: int) -> torch.Tensor:
    """Decode one image as the training data was decoded (``data.sources.imagetree.decode_image``): uint8 (C, H, W)."""
    try:
        array = decode_image(path, size, mode)  # (H, W, C)
    except Exception as e:  # Pillow raises many exception types for broken files; all of them mean "unreadable"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot read image {path} ({reason}); remove it or pass other paths") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # Pillow's buffer is read-only


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]
