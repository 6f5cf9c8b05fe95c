"""The comparison protocol behind ``metapl compare``, ``metapl demo`` and ``benchmarks/ablation.py``: one home.

Rows are the user's recipe (a ``TrainConfig``) with a few changes each; seeds are paired across rows (the same seed
gives the same labeled split, validation images and initial weights). Every final model gets the same number of
optimizer steps: a pseudo-label run trains ``steps`` MPL steps and then ``finetune_steps`` finetuning steps on the
labels, a labels-only run trains ``steps + finetune_steps`` steps. Runs are resumable: a finished run (its
``summary.json`` exists) is read back, a killed one is resumed from its checkpoint (or started again when it stopped
before its first save).

The statistics are paired by seed: the mean difference between two rows and its 95 % Student-t interval.
"""

from __future__ import annotations

import statistics
from dataclasses import fields
from pathlib import Path

from metapl.core.options import specs
from metapl.engine.config import RUNTIME_KEYS, TrainConfig
from metapl.engine.run_dir import LATEST, SUMMARY, load_run_config, read_summary
from metapl.errors import UserError

# Two-sided 95 % quantiles of Student's t by degrees of freedom (seeds − 1).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 25: 2.060, 30: 2.042}  # fmt: skip

LABELS_ONLY = "labels-only"
# name -> (what a reader sees, the row's changes to the user's recipe). The order is the table's, cheapest first: a
# tie on validation goes to the earlier row.
ROWS = {
    LABELS_ONLY: ("labels only", dict(method="supervised", labeled_aug="weak")),
    "labels-strong": ("labels only, strong augmentation", dict(method="supervised", labeled_aug="strong")),
    "uda-distill": ("UDA teacher distilled (h = 0)", dict(mpl_weight=0.0)),
    "mpl": ("Meta Pseudo Labels", dict(method="mpl")),
    "distill": ("big teacher distilled", dict(method="distill", uda_weight=0.0)),
    "reduced-mpl": ("Reduced MPL", dict(method="reduced-mpl", uda_weight=0.0)),
}
BIG_TEACHER_ROWS = ("distill", "reduced-mpl")  # only with --teacher-weights (or --pretrained teacher)
# Options distill refuses unless at their defaults (its teacher is fixed: it takes no feedback).
_FEEDBACK_OPTIONS = ("feedback", "feedback_sign", "mpl_weight", "baseline_decay")


def t_975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (the nearest tabled df at or below)."""
    return T_975[max(k for k in T_975 if k <= df)]


def paired_interval(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, int] | None:
    """Mean of a − b over the seeds both have, and the half-width of its 95 % t-interval.

    Args:
        a: seed -> value of one row.
        b: seed -> value of its partner.

    Returns:
        (mean difference, half-width, number of paired seeds), or None below 2 paired seeds.
    """
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    half = t_975(len(seeds) - 1) * statistics.stdev(diffs) / len(seeds) ** 0.5
    return statistics.mean(diffs), half, len(seeds)


def mean_sd(values: list[float]) -> str:
    """``"mean ± sd"`` with two decimals (sd 0 for one value; "–" for none)."""
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def kept_model(summary: dict) -> str:
    """Which model a user keeps from a run: its result (``metapl.engine.result``); for a summary written before runs
    chose one, ``"finetuned"`` (the finetuned student) or ``"student"`` (labels-only)."""
    result = summary.get("result")
    if isinstance(result, dict):
        return result["role"]
    return "finetuned" if summary.get("finetuned_acc") is not None else "student"


def kept_accuracy(summary: dict, prefix: str = "") -> float | None:
    """Accuracy of the kept model: ``prefix`` ``""`` for the test set, ``"val_"`` for the validation images."""
    return summary.get(f"{prefix}{kept_model(summary)}_acc")


def default_rows(base: TrainConfig) -> list[str]:
    """The rows compared on ``base``: the four of every comparison, and the big-teacher rows when it has one."""
    big = base.teacher_weights is not None or base.pretrained in ("teacher", "both")
    return [row for row in ROWS if big or row not in BIG_TEACHER_ROWS]


def row_config(base: TrainConfig, changes: dict, *, seed: int, out: str | Path) -> TrainConfig:
    """One run's config: the recipe ``base`` with a row's ``changes``, the seed and the run folder.

    A labels-only row (``method="supervised"``) trains ``steps + finetune_steps`` steps without finetuning and waits
    for no teacher (``s_wait_steps`` 0 unless ``changes`` sets it), and drops the teacher's starting weights. A
    reduced row (distill, reduced-mpl) has no UDA, and distill the feedback options at their defaults; the other rows
    keep ``reduced_hidden`` at its default. So no refusal of ``TrainConfig`` fires for a row a valid recipe yields.

    Args:
        base: the user's recipe (its ``method`` is replaced by the row's).
        changes: the row's option values (``ROWS``' second entry, or the demo's own).
        seed: seed of the split, the initial weights and the data order.
        out: the run folder.

    Returns:
        The run's ``TrainConfig``.
    """
    defaults = {name: spec.default for name, spec in specs(TrainConfig).items()}
    values = {f.name: getattr(base, f.name) for f in fields(TrainConfig)}
    values.update(method=changes.get("method", "mpl"), seed=seed, out=str(out))
    if values["method"] == "supervised":
        no_teacher = {"both": "student", "teacher": "none"}.get(base.pretrained, base.pretrained)
        values.update(
            steps=base.steps + base.planned_finetune_steps(),
            finetune_steps=0,
            s_wait_steps=0,
            teacher_weights=None,
            pretrained=no_teacher,
        )
    if values["method"] != "reduced-mpl":
        values["reduced_hidden"] = defaults["reduced_hidden"]
    if values["method"] == "distill":
        values.update({name: defaults[name] for name in _FEEDBACK_OPTIONS})
    values.update(changes)
    return TrainConfig(**values)


def run_state(cfg: TrainConfig) -> str:
    """What ``train_row`` will do with ``cfg.out``: ``"finished"``, ``"resume"``, ``"redo"`` or ``"new"``.

    Raises:
        UserError: the folder holds a run with other settings than ``cfg`` (options that alter the math).
    """
    run_dir = Path(cfg.out)
    if (run_dir / SUMMARY).is_file() or (run_dir / LATEST).is_file():
        _check_same_run(cfg, run_dir)
        return "finished" if (run_dir / SUMMARY).is_file() else "resume"
    return "redo" if run_dir.is_dir() and any(run_dir.iterdir()) else "new"


def _check_same_run(cfg: TrainConfig, run_dir: Path) -> None:
    saved = load_run_config(run_dir).to_dict()
    wanted = cfg.to_dict()
    changed = [k for k in wanted if k not in RUNTIME_KEYS | {"out"} and saved.get(k) != wanted[k]]
    if changed:
        name = changed[0]
        raise UserError(
            f"{run_dir} holds a run with other settings ({name} {saved.get(name)} there, {wanted[name]} now); "
            "pick another --out, or delete that folder to train it again"
        )


def train_row(cfg: TrainConfig, *, fresh: bool = False, log=print) -> tuple[dict, str]:
    """Train one run unless it is finished; resume it when it was stopped.

    Args:
        cfg: the run's config (``row_config``).
        fresh: start the run again even if its folder holds one (``--overwrite``'s deletion of its run files).
        log: where the trainer's lines go.

    Returns:
        (the run's summary, what was done: ``"finished"`` (read back), ``"resume"``, ``"redo"``, ``"new"``).
    """
    from metapl.engine.train import train  # the trainer's modules load only when a run is made

    state = "new" if fresh else run_state(cfg)
    if state == "finished":
        return read_summary(Path(cfg.out)), state
    summary = train(cfg, resume=state == "resume", overwrite=fresh or state == "redo", log=log)
    return summary, state


def interval_text(stats: tuple[float, float, int] | None, single: float | None = None) -> str:
    """``"+1.20 [-0.30, +2.70]"``; with one paired seed (``stats`` None) ``"+1.20 (one seed)"``; "–" for neither."""
    if stats is not None:
        mean, half, _ = stats
        return f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]"
    return "–" if single is None else f"{single:+.2f} (one seed)"


def paired_text(a: dict[int, float], b: dict[int, float]) -> str:
    """The paired difference a − b as ``interval_text`` shows it (one seed: that seed's difference)."""
    stats = paired_interval(a, b)
    common = sorted(set(a) & set(b))
    return interval_text(stats, a[common[0]] - b[common[0]] if len(common) == 1 else None)


def recommendation(val: dict[str, dict[int, float]]) -> tuple[str, str]:
    """The row to train, chosen on validation accuracy, and the one line that says so.

    The row with the highest mean validation accuracy wins (a tie goes to the row listed first in ``ROWS``, the
    cheaper one); the line gives its paired difference over labels-only, and what MPL adds: over the recommended row
    when that is not MPL, else over its own h = 0 control (the UDA teacher distilled).

    Args:
        val: row -> seed -> validation accuracy of the kept model; holds ``LABELS_ONLY``.

    Returns:
        (the row's name, the line).
    """
    order = [row for row in ROWS if row in val]
    best = max(order, key=lambda row: (statistics.mean(val[row].values()), -order.index(row)))
    label = ROWS[best][0]
    if best == LABELS_ONLY:
        line = f"recommend: {label} (no other row is ahead of it on validation)"
    else:
        line = f"recommend: {label} ({paired_text(val[best], val[LABELS_ONLY])} over labels only on validation)"
    if best == "mpl" and "uda-distill" in val:
        line += f"; the MPL feedback adds {paired_text(val['mpl'], val['uda-distill'])} over h = 0"
    elif best != "mpl" and "mpl" in val:
        stats, diff = paired_interval(val["mpl"], val[best]), paired_text(val["mpl"], val[best])
        if stats is None:
            line += f"; MPL {diff} vs it"
        elif stats[0] + stats[1] >= 0:  # its interval reaches 0 (it cannot be ahead: best has the top mean)
            line += f"; MPL adds nothing measurable here ({diff} vs it)"
        else:
            line += f"; MPL is measurably worse here ({diff} vs it)"
    if len(next(iter(val.values()))) < 2:
        line += "; one seed: no interval, run --seeds 0,1,2 before trusting it"
    return best, line
