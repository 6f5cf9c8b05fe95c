"""Top-1 / top-5 accuracy of several models over one pass of a test loader."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from metapl import data as mdata


def eval_loaders(data, split, batch_size: int, limit: int | None = None, workers: int = 0) -> dict[str, object]:
    """Loaders to evaluate a run on: the test set (key ``""``) and, when the split holds labeled images out, the
    validation set (key ``"val_"``, the prefix its accuracies are reported under).

    Args:
        data: the run's ``SourceData``.
        split: the run's ``Split``.
        batch_size: images per evaluation batch.
        limit: evaluate on the first ``limit`` images of each set only (quick checks); None = all.
        workers: the run's loader workers; streamed sets are decoded in that many workers, cached ones in the
            process (``data.stream.eval_workers``).

    Returns:
        prefix -> ``DataLoader``.
    """
    # take(): rows of cached arrays, or still-undecoded files on the streaming path
    test = data.test if limit is None else data.test.take(np.arange(min(limit, len(data.test))))
    sets = {"": test}
    if len(split.val):
        sets["val_"] = data.train.take(split.val[:limit])
    return {
        prefix: mdata.make_eval_loader(
            images, mean=data.mean, std=data.std, batch_size=batch_size, num_workers=mdata.eval_workers(images, workers)
        )  # fmt: skip
        for prefix, images in sets.items()
    }


@torch.no_grad()
def evaluate(
    models: dict[str, nn.Module], loader, device: torch.device, *, amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, float]:  # fmt: skip
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


def evaluate_sets(models: dict[str, nn.Module], loaders: dict[str, object], device: torch.device, *,
                  amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> dict[str, float]:  # fmt: skip
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
