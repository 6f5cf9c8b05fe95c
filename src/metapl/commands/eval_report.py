"""What ``metapl eval`` shows: the accuracy table, the per-class table and the confusion-matrix image (``--plot``).

The figures come from ``metapl.engine.evaluate.evaluate_report``; this module only lays them out. The image is drawn
with matplotlib's object-oriented API on an Agg canvas, as ``metapl plot`` draws its curves.
"""

from __future__ import annotations

import math
from pathlib import Path

from metapl.errors import reporting_os_errors

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


def plot_confusion(reports: dict[str, dict], classes: list[str], output: Path) -> Path:
    """One panel per model: its confusion matrix, rows = true class, columns = predicted, each row as shares.

    Args:
        reports: model name -> ``evaluate_report`` entry.
        classes: class names, index = label.
        output: the PNG file.

    Returns:
        ``output``.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k, n = len(classes), len(reports)
    side = min(2.5 + 0.35 * k, 12.0)
    fig = Figure(figsize=(side * n, side))
    FigureCanvasAgg(fig)
    for i, (name, report) in enumerate(reports.items()):
        ax = fig.add_subplot(1, n, i + 1)
        counts = np.asarray(report["confusion_matrix"], dtype=float)  # (K, K)
        shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"{name}: {report['acc']:.2f}% top-1")
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        if k <= 30:
            ax.set_xticks(range(k), classes, rotation=90, fontsize=7)
            ax.set_yticks(range(k), classes, fontsize=7)
        if k <= 12:  # counts readable in the cells
            for (r, c), v in np.ndenumerate(counts):
                ax.text(
                    c,
                    r,
                    f"{int(v)}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if shares[r, c] > 0.5 else "black",
                )
    fig.tight_layout()
    with reporting_os_errors(output):
        output.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(output, format="png", dpi=max(60, int(110 / math.sqrt(n))))
    return output
