"""``metapl demo``: ``metapl train`` with its defaults against labels-only training on scikit-learn's bundled 8×8
digits, offline, on the CPU.

Each run gets the data flags alone (50 labels, ``--steps``), as a new user would type them; everything else is the
default, so the demo shows what the defaults hand back (``metapl.rundir.result``). Rows: labels only; the UDA teacher
distilled with the MPL feedback off (h = 0); Meta Pseudo Labels. The three runs use the same model, the same labeled
images and the same number of optimizer steps for the student (``metapl.protocol.rows``); the pseudo-label runs also
see the other images of the train split without their labels. The settings are recorded in each run's
``config.yaml``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from metapl.config.fields import TrainConfig
from metapl.protocol.rows import ROWS as COMPARE_ROWS
from metapl.protocol.rows import kept_accuracy, row_config, train_row
from metapl.rundir.result import describe

logger = logging.getLogger(__name__)

# The data flags of a new user, and a quiet console; every other option at its default.
DEMO = TrainConfig(dataset="digits", num_labeled=50, steps=500, device="cpu", tensorboard=False, log_every=20)

_PICKED = ("labels-only", "uda-distill", "mpl")  # compare's rows the demo shows
ROWS = tuple((COMPARE_ROWS[row][0], COMPARE_ROWS[row][1]) for row in _PICKED)


def demo(*, out: str = "runs/demo", steps: int | None = None, seed: int = 0) -> dict[str, dict]:
    """Train labels-only, the UDA teacher distilled with the feedback off (h = 0), and full MPL on digits; print
    their test accuracies side by side.

    Every pseudo-label student is then finetuned on the labels (a tenth of the steps, the default), and the
    labels-only model trains that much longer, so all three students get the same number of optimizer steps
    (``metapl.protocol.rows``, the protocol of ``metapl compare``). Each row's figure is the model its run hands
    back. The h = 0 row isolates what the MPL feedback adds on top of UDA and distillation.

    Args:
        out: parent folder of the three run directories; earlier demo runs there are replaced (``--overwrite``: only
            metapl's run files are removed).
        steps: MPL steps of each run (default ``DEMO.steps``).
        seed: seed of the split, the models and the augmentations.

    Returns:
        row name -> summary.
    """
    base = replace(DEMO, seed=seed, steps=DEMO.steps if steps is None else steps)  # 0 is refused: --steps >= 1
    finetune = base.planned_finetune_steps()
    summaries = {}
    for row, (name, changes) in zip(_PICKED, ROWS):
        cfg = row_config(base, changes, seed=seed, out=Path(out) / row)
        logger.info(f"== {name}: {cfg.steps} steps on digits, {cfg.num_labeled} labels ==")
        start = time.perf_counter()
        summaries[name], _ = train_row(cfg, fresh=True)
        summaries[name]["wall_seconds"] = time.perf_counter() - start
    _print_table(summaries, base, finetune, out)
    return summaries


def final_accuracy(summary: dict) -> float:
    """Test accuracy of the model the run handed back (its result)."""
    accuracy = kept_accuracy(summary)
    assert accuracy is not None  # a finished run's summary holds it
    return accuracy


def _print_table(summaries: dict[str, dict], base: TrainConfig, finetune: int, out: str) -> None:
    logger.info("")
    logger.info(f"digits, {base.num_labeled} labels, {base.steps} steps (+{finetune} finetuning), test accuracy (%):")
    logger.info(f"{'method':<32}{'teacher':>9}{'student':>9}{'finetuned':>11}{'handed back':>30}{'time':>7}")
    for name, s in summaries.items():
        teacher = f"{s['teacher_acc']:9.2f}" if s.get("teacher_acc") is not None else f"{'-':>9}"
        tuned = f"{s['finetuned_acc']:11.2f}" if s.get("finetuned_acc") is not None else f"{'-':>11}"
        result = f"{describe(s['result']['role'])} {final_accuracy(s):.2f}"
        logger.info(f"{name:<32}{teacher}{s['student_acc']:9.2f}{tuned}{result:>30}{s['wall_seconds']:6.0f}s")
    labels_only, distilled, mpl = (final_accuracy(summaries[name]) for name, _ in ROWS)
    logger.info(
        f"MPL vs labels-only: {mpl - labels_only:+.2f} points; "
        f"feedback (MPL vs h = 0): {mpl - distilled:+.2f} points, one seed "
        f"(the 3-seed answer: README.md, Results); runs in {out}/"
    )
