"""What ``metapl eval`` reports: the figures (``evaluate_report``: per class, confusion matrix, calibration) and their
layout: the accuracy table, the per-class table and the confusion-matrix image (``--plot``). The image is drawn with
matplotlib's object-oriented API on an Agg canvas, as ``metapl plot`` draws its curves.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from metapl.errors import reporting_os_errors

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ECE_BINS = 15  # equal-width confidence bins of the expected calibration error (Guo et al. 2017 use 15)
TOP_K = 5  # the top-k accuracy reported, only where there are more than k classes (top-5 of 5 classes is always 100)

PER_CLASS_MAX = 30  # classes listed in the terminal; eval.json always holds them all


def format_table(accs: dict) -> str:
    """An aligned text table of a result: one row per model, top-1 %, then top-5 % and ECE % where present.

    Args:
        accs: ``{"<model>_acc": ..., "<model>_top5": ..., "<model>_ece": ...}`` (other keys are ignored).

    Returns:
        The table, lines joined by newlines.
    """
    names = [k.removesuffix("_acc") for k in accs if k.endswith("_acc")]
    columns = [("top-1 %", "_acc")]
    columns += [
        (title, suffix)
        for title, suffix in (("top-5 %", "_top5"), ("ECE %", "_ece"))
        if any(f"{n}{suffix}" in accs for n in names)
    ]
    width = max([len("model"), *map(len, names)])
    lines = [f"{'model':<{width}}" + "".join(f"  {title:>8}" for title, _ in columns)]
    for name in names:
        cells = "".join(f"  {accs.get(name + suffix, float('nan')):>8.2f}" for _, suffix in columns)
        lines.append(f"{name:<{width}}{cells}")
    return "\n".join(lines)


def format_per_class(report: dict, classes: list[str]) -> str:
    """One model's per-class accuracy (= recall), precision and image count, one line per class.

    Args:
        report: one model's ``evaluate_report`` entry.
        classes: class names, index = label.

    Returns:
        The table; with more than ``PER_CLASS_MAX`` classes, the first ones and a line pointing at eval.json.
    """

    def cell(v: float | None) -> str:
        return f"{'-':>11}" if v is None else f"{v:>11.2f}"

    width = max([len("class"), *(len(c) for c in classes[:PER_CLASS_MAX])])
    lines = [f"{'class':<{width}}  {'accuracy %':>11}  {'precision %':>11}  {'images':>7}"]
    for name, row in list(zip(classes, report["per_class"]))[:PER_CLASS_MAX]:
        lines.append(f"{name:<{width}}  {cell(row['accuracy'])}  {cell(row['precision'])}  {row['support']:>7}")
    if len(classes) > PER_CLASS_MAX:
        lines.append(f"... {len(classes) - PER_CLASS_MAX} more classes in the JSON file")
    return "\n".join(lines)


CONFUSION_DPI = 100
CONFUSION_NAMES_MAX = 60  # classes named on the axes; beyond, every fifth index
NAME_CHARS = 18  # a class name on an axis is cut to this many characters


def plot_confusion(reports: dict[str, dict], classes: list[str], output: Path) -> Path:
    """One panel per model (two per row): its confusion matrix, rows = true class, columns = predicted, each row as
    shares; ``confusion_figure`` draws it.

    Args:
        reports: model name -> ``evaluate_report`` entry.
        classes: class names, index = label.
        output: the PNG file.

    Returns:
        ``output``.
    """
    fig = confusion_figure(reports, classes)
    with reporting_os_errors(output):
        output.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(output, format="png", dpi=CONFUSION_DPI)
    return output


def confusion_figure(reports: dict[str, dict], classes: list[str]) -> Figure:
    """The figure of ``plot_confusion``, laid out by matplotlib's constrained layout so that no title or label is cut:
    each panel grows with the class count (class names readable at 7 pt up to ``CONFUSION_NAMES_MAX`` classes), the
    counts are written in the cells up to 12 classes.

    Returns:
        A ``matplotlib.figure.Figure`` on an Agg canvas.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k, n = len(classes), len(reports)
    cols = min(n, 2)
    side = max(4.5, 1.5 + 0.16 * k)  # inches per panel: 0.16 in (11 px at 100 dpi) per class row
    fig = Figure(figsize=(side * cols, side * math.ceil(n / cols) + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle("confusion matrices: rows = true class, colour = share of the row", fontsize=11)
    names = [c if len(c) <= NAME_CHARS else c[: NAME_CHARS - 1] + "…" for c in map(str, classes)]
    for i, (name, report) in enumerate(reports.items()):
        ax = fig.add_subplot(math.ceil(n / cols), cols, i + 1)
        counts = np.asarray(report["confusion_matrix"], dtype=float)  # (K, K)
        shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"{name}: {report['acc']:.2f}% top-1", fontsize=11)
        ax.set_xlabel("predicted class", fontsize=9)
        ax.set_ylabel("true class", fontsize=9)
        ticks = range(k) if k <= CONFUSION_NAMES_MAX else range(0, k, 5)
        labels = [names[t] for t in ticks] if k <= CONFUSION_NAMES_MAX else [str(t) for t in ticks]
        ax.set_xticks(ticks, labels, rotation=90, fontsize=7)
        ax.set_yticks(ticks, labels, fontsize=7)
        if k <= 12:  # counts readable in the cells
            for (r, c), v in np.ndenumerate(counts):
                colour = "white" if shares[r, c] > 0.5 else "black"
                ax.text(c, r, f"{int(v)}", ha="center", va="center", fontsize=7, color=colour)
    return fig


# ----------------------------------------------------------------------------------------------------------------
# The figures


@torch.no_grad()
def evaluate_report(
    models: dict[str, nn.Module],
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    num_classes: int,
) -> dict[str, dict]:
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
    preds: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    confs: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    topk_hits: dict[str, list[torch.Tensor]] = {name: [] for name in models}
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
    report: dict[str, object] = {"acc": 100.0 * int(tp.sum()) / n}
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
