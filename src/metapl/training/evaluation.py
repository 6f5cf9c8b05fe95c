"""A run's accuracies: top-1 / top-5 of several models over one pass of a loader, the loaders of the test and
validation images, the run's evaluation (its method's models), the line logged after it, and ``summary.json``'s
figures."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from metapl import data as mdata
from metapl.training.process import barrier

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from metapl.data import ImageStore, SourceData, Split
    from metapl.training.setup import Run


def validation_images(data: SourceData, split: Split, limit: int | None = None) -> ImageStore | None:
    """The run's validation images: a folder's own ``val/`` (``SourceData.val``), else the labeled images the split
    held out (``--val-labeled``), else None; the first ``limit`` of them when given."""
    if data.val is not None:
        return data.val if limit is None else data.val.take(np.arange(min(limit, len(data.val))))
    if len(split.val):
        return data.train.take(split.val[:limit])
    return None


def eval_loaders(
    data: SourceData, split: Split, batch_size: int, limit: int | None = None, workers: int = 0
) -> dict[str, DataLoader]:
    """Loaders to evaluate a run on: the test set (key ``""``) and, when the split holds labeled images out, the
    validation set (key ``"val_"``, the prefix its accuracies are reported under).

    Args:
        data: the run's ``SourceData``.
        split: the run's ``Split`` (its held-out ``val`` indices, unless the data has validation images of its own).
        batch_size: images per evaluation batch.
        limit: evaluate on the first ``limit`` images of each set only (quick checks); None = all.
        workers: the run's loader workers; streamed sets are decoded in that many workers, cached ones in the
            process (``data.batches.eval_workers``).

    Returns:
        prefix -> ``DataLoader``.
    """
    # take(): rows of cached arrays, or still-undecoded files on the streaming path
    test = data.test if limit is None else data.test.take(np.arange(min(limit, len(data.test))))
    sets = {"": test}
    val = validation_images(data, split, limit)
    if val is not None:
        sets["val_"] = val
    return {
        prefix: mdata.make_eval_loader(
            images, mean=data.mean, std=data.std, batch_size=batch_size, num_workers=mdata.eval_workers(images, workers)
        )
        for prefix, images in sets.items()
    }


@torch.no_grad()
def evaluate(
    models: dict[str, nn.Module],
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Accuracy of each model in eval mode on every batch of ``loader``; train mode is restored afterwards.

    Args:
        models: name -> model, e.g. ``{"teacher": t, "student": s, "ema": e}``.
        loader: yields (x, y) batches.
        device: where the models are.
        amp_dtype: autocast dtype, or None.
        channels_last: convert inputs to channels-last memory format.

    Returns:
        ``{"<name>_acc": top-1 %, "<name>_top5": top-5 %, ...}`` as Python floats (one sync at the end).
    """
    was_training = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    correct1 = {name: torch.zeros((), device=device) for name in models}
    correct5 = {name: torch.zeros((), device=device) for name in models}
    total = 0
    autocast = torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        total += y.shape[0]
        for name, m in models.items():
            with autocast:
                logits = m(x).float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices  # (N, k)
            hit = top == y[:, None]
            correct1[name] += hit[:, 0].sum()
            correct5[name] += hit.any(dim=1).sum()
    for name, m in models.items():
        m.train(was_training[name])
    out = {}
    for name in models:
        out[f"{name}_acc"] = 100.0 * correct1[name].item() / max(total, 1)
        out[f"{name}_top5"] = 100.0 * correct5[name].item() / max(total, 1)
    return out


def evaluate_sets(
    models: dict[str, nn.Module],
    loaders: Mapping[str, Iterable[tuple[torch.Tensor, torch.Tensor]]],
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """``evaluate`` on each of ``eval_loaders``' sets; each set's keys carry its prefix (``val_student_acc``).

    Args:
        models: name -> model.
        loaders: prefix -> loader, as returned by ``eval_loaders``.
        device: where the models are.
        amp_dtype: autocast dtype, or None.
        channels_last: convert inputs to channels-last memory format.

    Returns:
        ``{prefix + "<name>_acc": top-1 %, prefix + "<name>_top5": top-5 %, ...}``.
    """
    out = {}
    for prefix, loader in loaders.items():
        accs = evaluate(models, loader, device, amp_dtype=amp_dtype, channels_last=channels_last)
        out.update({prefix + k: v for k, v in accs.items()})
    return out


def evaluate_run(run: Run, loaders: dict[str, DataLoader]) -> dict[str, float]:
    """Accuracies of the run's models (its method's: teacher, student, EMA) on each loader; validation keys carry a
    ``val_`` prefix. Main rank only ({} on the others)."""
    out = {}
    if run.dist.is_main:
        models = run.method.evaluated_models(run)  # a teacher only where it is a trained image classifier
        out = evaluate_sets(models, loaders, run.device, amp_dtype=run.amp_dtype, channels_last=run.cfg.channels_last)
        out.update(run.method.extra_accuracies(run))
    barrier(run.dist)
    return out


def eval_line(step: int, accs: dict[str, float]) -> str:
    """The line ``metapl train`` logs after an evaluation: test accuracies, then validation ones."""

    def listing(prefix: str) -> str:
        return ", ".join(
            f"{k[len(prefix) : -4]} {v:.2f}%"
            for k, v in accs.items()
            if k.endswith("_acc") and k.startswith("val_") == (prefix == "val_")
        )

    val = f"; validation accuracy {listing('val_')}" if "val_student_acc" in accs else ""
    return f"step {step}: test accuracy {listing('')}{val}"


def run_summary(run: Run, accs: dict[str, float]) -> dict:
    """What ``summary.json`` holds after training (before finetuning adds its own and the result is chosen):
    accuracies, validation size, settings."""
    cfg = run.cfg
    summary = {
        "teacher_acc": accs.get("teacher_acc"),
        "student_acc": accs.get("student_acc"),
        "ema_acc": accs.get("ema_acc"),
        "teacher_top5": accs.get("teacher_top5"),
        "student_top5": accs.get("student_top5"),
        "ema_top5": accs.get("ema_top5"),
        **{k: v for k, v in accs.items() if k.startswith("val_") and k.endswith("_acc")},
        "steps": run.step,
        "seconds": round(run.seconds, 2),
        "method": cfg.method,
        "mode": cfg.mode,
        "feedback": cfg.feedback,
        "feedback_sign": cfg.feedback_sign,
        "dataset": cfg.dataset,
        "num_labeled": len(run.split.labeled),
        "num_val": len(val) if (val := validation_images(run.data, run.split, cfg.eval_limit)) is not None else 0,
        "seed": cfg.seed,
    }
    summary.update(run.method.extra_summary(run))
    return summary
