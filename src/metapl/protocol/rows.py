"""The comparison protocol behind ``metapl compare``, ``metapl demo`` and ``benchmarks/ablation.py``: one home.

Rows are the user's recipe (a ``TrainConfig``) with a few changes each; seeds are paired across rows (the same seed
gives the same labeled split, validation images and initial weights). Every final model gets the same number of
optimizer steps: a pseudo-label run trains ``steps`` MPL steps and then ``finetune_steps`` finetuning steps on the
labels, a run whose method does not finetune (labels only, FixMatch) trains ``steps + finetune_steps`` steps. A row
switches the recipe to its method as a saved config is read back: the options that do nothing with that method fall
back to their defaults (``metapl.config.rules``). Runs are resumable: a finished run (its ``summary.json`` exists) is
read back, a killed one is resumed from its checkpoint (or started again when it stopped before its first save).

The statistics are paired by seed (``metapl.protocol.paired``): the mean difference between two rows and its 95 %
Student-t interval.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import fields
from pathlib import Path

from metapl.config.fields import TrainConfig, config_from_dict
from metapl.config.rules import changed_options
from metapl.errors import UserError
from metapl.methods.by_name import get_method
from metapl.protocol.paired import paired_interval, paired_text
from metapl.rundir.layout import LATEST, SUMMARY, load_run_config, read_summary

logger = logging.getLogger(__name__)

LABELS_ONLY = "labels-only"
# name -> (what a reader sees, the row's changes to the user's recipe). The order is the table's, cheapest first: a
# tie on validation goes to the earlier row.
ROWS: dict[str, tuple[str, dict[str, object]]] = {
    LABELS_ONLY: ("labels only", dict(method="supervised", labeled_aug="weak")),
    "labels-strong": ("labels only, strong augmentation", dict(method="supervised", labeled_aug="strong")),
    # FixMatch as its paper runs it: weak labeled views and no label smoothing, which would cap the confidence under
    # its threshold (0.1 over 10 classes: 0.91 < 0.95; the mask ratio 0.13 instead of 0.55, benchmarks/README.md 3.3c).
    "fixmatch": ("FixMatch (one network)", dict(method="fixmatch", labeled_aug="weak", label_smoothing=0.0)),
    "uda-distill": ("UDA teacher distilled (h = 0)", dict(mpl_weight=0.0)),
    "mpl": ("Meta Pseudo Labels", dict(method="mpl")),
    "distill": ("big teacher distilled", dict(method="distill")),
    "reduced-mpl": ("Reduced MPL", dict(method="reduced-mpl")),
}
BIG_TEACHER_ROWS = ("distill", "reduced-mpl")  # only with --teacher-weights (or --pretrained teacher)


def kept_model(summary: dict) -> str:
    """Which model a user keeps from a run: its result (``metapl.rundir.result``); for a summary written before runs
    chose one, ``"finetuned"`` (the finetuned student) or ``"student"`` (labels-only)."""
    result = summary.get("result")
    if isinstance(result, dict):
        return result["role"]
    return "finetuned" if summary.get("finetuned_acc") is not None else "student"


def kept_accuracy(summary: dict, prefix: str = "") -> float | None:
    """Accuracy of the kept model: ``prefix`` ``""`` for the test set, ``"val_"`` for the validation images."""
    return summary.get(f"{prefix}{kept_model(summary)}_acc")


def default_rows(base: TrainConfig) -> list[str]:
    """The rows compared on ``base``: the five of every comparison, and the big-teacher rows when it has one."""
    big = base.teacher_weights is not None or base.pretrained in ("teacher", "both")
    return [row for row in ROWS if big or row not in BIG_TEACHER_ROWS]


def row_config(base: TrainConfig, changes: dict, *, seed: int, out: str | Path) -> TrainConfig:
    """One run's config: the recipe ``base`` switched to a row's method, with the row's ``changes``, the seed and the
    run folder.

    A row whose method does not finetune (labels only) trains ``steps + finetune_steps`` steps without finetuning, and
    one whose student waits for no teacher has ``s_wait_steps`` 0 (unless ``changes`` sets them). The options that do
    nothing with the row's method fall back to their defaults (``config_from_dict``: a reduced row has no UDA, distill
    the feedback options at their defaults, labels only no teacher weights), so no refusal of ``TrainConfig`` fires
    for a row a valid recipe yields.

    Args:
        base: the user's recipe (its ``method`` is replaced by the row's).
        changes: the row's option values (``ROWS``' second entry, or the demo's own).
        seed: seed of the split, the initial weights and the data order.
        out: the run folder.

    Returns:
        The run's ``TrainConfig``.
    """
    values = {f.name: getattr(base, f.name) for f in fields(TrainConfig)}
    values.update(method=changes.get("method", "mpl"), seed=seed, out=str(out))
    method = get_method(values["method"])
    if not method.finetunes:  # the same optimizer-step count: it trains the finetuning's steps itself
        values.update(steps=base.steps + base.planned_finetune_steps(), finetune_steps=0)
    if not method.waits_for_teacher:
        values["s_wait_steps"] = 0
    values.update(changes)
    return config_from_dict(values)


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
    changed = changed_options(saved, wanted)
    if changed:
        name = changed[0]
        raise UserError(
            f"{run_dir} holds a run with other settings ({name} {saved.get(name)} there, {wanted[name]} now); "
            "pick another --out, or delete that folder to train it again"
        )


def train_row(cfg: TrainConfig, *, fresh: bool = False) -> tuple[dict, str]:
    """Train one run unless it is finished; resume it when it was stopped.

    Args:
        cfg: the run's config (``row_config``).
        fresh: start the run again even if its folder holds one (``--overwrite``'s deletion of its run files).

    Returns:
        (the run's summary, what was done: ``"finished"`` (read back), ``"resume"``, ``"redo"``, ``"new"``).
    """
    from metapl.training.trainer import train  # the trainer's modules load only when a run is made

    state = "new" if fresh else run_state(cfg)
    if state == "finished":
        return read_summary(Path(cfg.out)), state
    summary = train(cfg, resume=state == "resume", overwrite=fresh or state == "redo")
    return summary, state


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
