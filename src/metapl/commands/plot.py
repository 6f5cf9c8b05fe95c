"""``metapl plot``: one PNG of a run's curves (test accuracy, teacher and student losses, the MPL coefficient h).

Several runs are overlaid: the colour then says which run, the line style which model. The figure is drawn with the
object-oriented API on an Agg canvas, so plotting neither needs a display nor changes pyplot's global backend for a
caller who imported this module into an interactive session.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from metapl.errors import UserError, reporting_os_errors
from metapl.rundir.checkpoint import refuse_overwrite
from metapl.rundir.layout import CURVES, METRICS
from metapl.training.metrics import read_metrics

logger = logging.getLogger(__name__)

ACC_KEYS = (("eval/teacher_acc", "teacher"), ("eval/student_acc", "student"), ("eval/ema_acc", "EMA student"))
FINETUNED_KEY = "eval/finetuned_acc"
LINESTYLES = {"teacher": "--", "student": ":", "EMA student": "-", "h": "-", "baseline": "--", "loss": "-"}
SMOOTH_MIN_POINTS = 20  # below this many logged points a loss curve is drawn as is
SMOOTH_FRACTION = 0.04  # moving-average window as a share of a loss curve's points (~25 windows across the plot)


def plot_runs(run_dirs: list[str | Path], *, output: str | Path | None = None) -> Path:
    """Draw the curves of one or several runs into one image.

    Args:
        run_dirs: run directories of ``metapl train`` (each with a ``metrics.jsonl``).
        output: the image file (PNG unless its extension names another format matplotlib writes); default
            ``curves.png`` in the first run directory.

    Returns:
        The path of the image written.

    Raises:
        UserError: no run given, a missing run directory, a run without metrics or with a damaged metrics line, an
            unsupported output extension, or an output that cannot be written.
    """
    if not run_dirs:
        raise UserError("pass at least one run directory to plot")
    dirs = [Path(d) for d in run_dirs]
    # Keyed by label: a directory passed twice gets one label and is drawn once.
    runs = {name: load_run_series(d) for name, d in zip(run_labels(dirs), dirs)}
    output = Path(output) if output is not None else dirs[0] / CURVES
    refuse_overwrite(output, own=(CURVES,))
    fmt = output.suffix.lower().lstrip(".") or "png"
    fig = make_figure(runs)
    if fmt not in fig.canvas.get_supported_filetypes():
        raise UserError(f"cannot write a .{fmt} image ({output}); use a .png file name")
    with reporting_os_errors(output):
        output.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(output, format=fmt, dpi=110)
    logger.info(f"wrote {output} ({len(runs)} run{'s' if len(runs) > 1 else ''})")
    return output


def load_run_series(run_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every numeric metric of a run as ``key -> (steps, values)``, ordered by step, missing values dropped.

    Args:
        run_dir: a run directory.

    Returns:
        The series, e.g. ``{"eval/ema_acc": (array([100, 200]), array([71.2, 80.4])), ...}``.

    Raises:
        UserError: the directory or its metrics are missing or empty.
    """
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} not found; pass the --out of a metapl train run")
    if not (run_dir / METRICS).is_file():
        raise UserError(f"{run_dir} has no {METRICS}; is it a run directory of metapl train?")
    records = read_metrics(run_dir)
    if not records:
        raise UserError(f"{run_dir / METRICS} holds no records yet; plot again once the run has logged a step")
    points: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        step = r.get("step")
        for key, value in r.items():
            # bool is an int subclass; None marks a NaN the writer could not store as JSON.
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and step is not None:
                points.setdefault(key, []).append((int(step), float(value)))
    series = {}
    for key, pts in points.items():
        pts.sort(key=lambda p: p[0])  # stable: a step logged twice keeps its order of writing
        steps, values = zip(*pts)
        series[key] = (np.asarray(steps), np.asarray(values))
    return series


def run_labels(dirs: list[Path]) -> list[str]:
    """Legend names of the runs: the directory names, with parents added until they differ.

    Args:
        dirs: run directories.

    Returns:
        One label per directory, e.g. ``["mpl", "supervised"]`` or ``["a/run", "b/run"]`` when the names clash.
    """
    parts = [d.resolve().parts for d in dirs]
    depth = 1
    while True:
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels) or depth >= max(len(p) for p in parts):
            return labels
        depth += 1


def make_figure(runs: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]) -> Figure:
    """The 2x2 figure: test accuracy, teacher loss, student loss, and h with its baseline.

    Args:
        runs: run label -> its series (``load_run_series``), in legend order.

    Returns:
        The figure, on an Agg canvas.
    """
    fig = Figure(figsize=(13, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_acc, ax_t, ax_s, ax_h = fig.subplots(2, 2).flat
    several = len(runs) > 1
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for (label, series), color in zip(runs.items(), colors):
        prefix = f"{label}: " if several else ""

        # Test accuracy: colour = run, style = model when overlaid; one colour per model for a single run.
        for i, (key, model) in enumerate(ACC_KEYS):
            if key in series:
                steps, values = series[key]
                c = color if several else f"C{i}"
                ax_acc.plot(steps, values, LINESTYLES[model], color=c, marker=".", ms=4, label=prefix + model)
        if FINETUNED_KEY in series:
            steps, values = series[FINETUNED_KEY]
            ax_acc.plot(steps, values, "*", color=color if several else "C3", ms=12, label=prefix + "finetuned student")

        _plot_loss(ax_t, series, "train/loss/teacher", color, label)
        _plot_loss(ax_s, series, "train/loss/student", color, label)

        # h: the teacher's feedback coefficient. Soft mode logs it as constant 0 (it has no h), so skip all-zero curves.
        h = series.get("train/mpl/h")
        if h is not None and np.any(h[1] != 0):
            _plot_loss(ax_h, series, "train/mpl/h", color, prefix + "h")
        baseline = series.get("train/mpl/baseline")
        if baseline is not None and np.any(baseline[1] != 0):  # all zeros: baseline_decay was 0, nothing to show
            c = color if several else "C1"
            ax_h.plot(*baseline, LINESTYLES["baseline"], color=c, lw=1.2, label=prefix + "baseline (moving avg)")

    _finish(ax_acc, "Test accuracy", "top-1 accuracy (%)", "no evaluation recorded")
    _finish(ax_t, "Teacher loss (total)", "loss", "no teacher (labels-only runs)")
    _finish(ax_s, "Student training loss", "loss", "no student loss recorded")
    _finish(ax_h, "MPL feedback h", "h", "no MPL feedback h (labels-only or soft-mode runs)")
    if ax_h.has_data():
        ax_h.axhline(0.0, color="0.5", lw=0.8, zorder=0)  # the sign of h decides the direction of the teacher update
    fig.suptitle("metapl: " + ", ".join(runs), fontsize=13)
    return fig


def _plot_loss(ax: Axes, series: dict, key: str, color: str, label: str) -> None:
    """Raw values faintly, and a smoothed curve on top once there are enough points."""
    if key not in series:
        return
    steps, values = series[key]
    if len(values) < SMOOTH_MIN_POINTS:
        ax.plot(steps, values, "-", color=color, lw=1.4, label=label)
        return
    ax.plot(steps, values, "-", color=color, lw=0.8, alpha=0.25)
    window = max(3, round(SMOOTH_FRACTION * len(values)))
    ax.plot(steps, smooth(values, window), "-", color=color, lw=1.6, label=f"{label} (smoothed)")


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average; near the ends it averages the points that exist.

    Centred rather than exponential (TensorBoard's slider) because an exponential average lags behind a falling loss,
    which reads as a higher loss than the run had.

    Args:
        values: the raw curve.
        window: points averaged (an even window is widened by one to stay centred); 1 returns the curve unchanged.

    Returns:
        The smoothed curve, same length.
    """
    values = np.asarray(values, dtype=np.float64)
    if window <= 1:
        return values
    kernel = np.ones(window | 1)
    return np.convolve(values, kernel, mode="same") / np.convolve(np.ones_like(values), kernel, mode="same")


def _finish(ax: Axes, title: str, ylabel: str, empty: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers, even when a run has only a few
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize=8, loc="best")
    else:  # an empty panel says why rather than showing a blank axis
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, color="0.4")
