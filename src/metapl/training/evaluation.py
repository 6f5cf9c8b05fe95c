"""Top-1 / top-5 accuracy of several models over one pass of a test loader."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from metapl import data as mdata


def validation_images(data, split, limit: int | None = None):
    """The run's validation images: a folder's own ``val/`` (``SourceData.val``), else the labeled images the split
    held out (``--val-labeled``), else None; the first ``limit`` of them when given."""
    if data.val is not None:
        return data.val if limit is None else data.val.take(np.arange(min(limit, len(data.val))))
    if len(split.val):
        return data.train.take(split.val[:limit])
    return None


def eval_loaders(data, split, batch_size: int, limit: int | None = None, workers: int = 0) -> dict[str, object]:
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
    loader,
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
    loaders: dict[str, object],
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


# ----------------------------------------------------------------------------------------------------------------
# metapl eval's report: per-class figures, confusion matrix, calibration

ECE_BINS = 15  # equal-width confidence bins of the expected calibration error (Guo et al. 2017 use 15)
TOP_K = 5  # the top-k accuracy reported, only where there are more than k classes (top-5 of 5 classes is always 100)


@torch.no_grad()
def evaluate_report(models: dict[str, nn.Module], loader, device: torch.device, num_classes: int) -> dict[str, dict]:
    """Everything ``metapl eval`` reports for each model, over one pass of ``loader``.

    Args:
        models: name -> model (switched to eval mode here, and left there).
        loader: yields ``(x, y)`` batches.
        device: where the models are.
        num_classes: K, the models' output width.

    Returns:
        name -> ``class_report``'s dict.
    """
    for m in models.values():
        m.eval()
    preds = {name: [] for name in models}
    confs = {name: [] for name in models}
    topk_hits = {name: [] for name in models}
    labels = []
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        labels.append(y.cpu())
        for name, m in models.items():
            logits = m(x).float()  # (B, K)
            top = logits.topk(min(TOP_K, num_classes), dim=1).indices.cpu()  # (B, k); column 0 is the prediction
            preds[name].append(top[:, 0])
            confs[name].append(logits.softmax(dim=1).gather(1, top[:, :1].to(device)).squeeze(1).cpu())
            topk_hits[name].append((top == y.cpu()[:, None]).any(dim=1))
    y_all = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    out = {}
    for name in models:
        pred, conf = torch.cat(preds[name]), torch.cat(confs[name])
        hits = torch.cat(topk_hits[name]) if num_classes > TOP_K else None
        out[name] = class_report(pred, conf, y_all, num_classes, topk_hits=hits)
    return out


def class_report(
    pred: torch.Tensor, conf: torch.Tensor, y: torch.Tensor, num_classes: int, *, topk_hits: torch.Tensor | None = None
) -> dict:
    """Accuracy, top-5, ECE, per-class accuracy/precision/recall and the confusion matrix of one model's predictions.

    Per class c (all in %): ``accuracy`` and ``recall`` are the share of class c's images predicted as c (the same
    number: accuracy within the class), ``precision`` the share of images predicted as c that are c; None where the
    share has no images to count (a class absent from the set, or never predicted).

    Args:
        pred: ``(N,)`` predicted classes.
        conf: ``(N,)`` the predicted class's softmax probability.
        y: ``(N,)`` true classes.
        num_classes: K.
        topk_hits: ``(N,)`` whether the true class is among the top 5, or None (K <= 5: no top-5 is reported).

    Returns:
        ``{"acc", "top5" (K > 5 only), "ece", "per_class": [{"accuracy", "precision", "recall", "support"}, ...],
        "confusion_matrix": K x K counts, rows = true class, columns = predicted class}``.
    """
    k = num_classes
    cm = torch.bincount(y * k + pred, minlength=k * k).view(k, k)  # (K, K): rows true, columns predicted
    support, predicted, tp = cm.sum(dim=1), cm.sum(dim=0), cm.diag()
    n = max(len(y), 1)

    def pct(a: int, b: int) -> float | None:
        return 100.0 * a / b if b else None

    per_class = []
    for c in range(k):
        recall = pct(int(tp[c]), int(support[c]))
        per_class.append(
            {
                "accuracy": recall,
                "precision": pct(int(tp[c]), int(predicted[c])),
                "recall": recall,
                "support": int(support[c]),
            }
        )
    report = {"acc": 100.0 * int(tp.sum()) / n}
    if topk_hits is not None:
        report["top5"] = 100.0 * int(topk_hits.sum()) / n
    report["ece"] = 100.0 * expected_calibration_error(conf, pred == y)
    report.update({"per_class": per_class, "confusion_matrix": cm.tolist()})
    return report


def expected_calibration_error(conf: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over equal-width confidence bins of (bin share) x |accuracy - confidence|.

    The confidence of an image is its predicted class's softmax probability; bin b holds the confidences in
    ``((b-1)/bins, b/bins]`` (the first bin includes 0). A perfectly calibrated model scores 0.

    Args:
        conf: ``(N,)`` confidences in [0, 1].
        correct: ``(N,)`` whether each prediction was right.
        bins: number of bins (15, as Guo et al. 2017, "On Calibration of Modern Neural Networks").

    Returns:
        The ECE as a fraction in [0, 1] (0 for an empty set).
    """
    if len(conf) == 0:
        return 0.0
    conf = conf.double()
    index = (conf * bins).ceil().long().clamp(1, bins) - 1  # (N,) bin of each confidence
    conf_sum = torch.bincount(index, weights=conf, minlength=bins)
    acc_sum = torch.bincount(index, weights=correct.double(), minlength=bins)
    return float((conf_sum - acc_sum).abs().sum() / len(conf))
