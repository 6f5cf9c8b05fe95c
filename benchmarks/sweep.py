"""Hyper-parameter sweeps scored on a validation split carved from the labeled images (never the test set).

Each grid is a base config plus named variants; each (grid, variant, seed) is one ``metapl train`` run in
``ROOT/GRID/VARIANT/seedS``, skipped when its ``summary.json`` exists, so a sweep can be split across lanes
(``--lane 0/2`` and ``--lane 1/2`` run alternate variants) and resumed after a kill. ``--report`` prints a Markdown
table of validation accuracy (final and median of the last five evaluations) per variant; test accuracy is shown
only for the record, never used to choose.

    python -m benchmarks.sweep --grid fashion-teacher --lane 0/2 &
    python -m benchmarks.sweep --grid fashion-teacher --lane 1/2
    python -m benchmarks.sweep --grid fashion-teacher --report
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks.ablation import PROTOCOLS as ABLATION_PROTOCOLS
from benchmarks.harness import last_evaluations, read_metrics, set_data_root, train_once

_FASHION = dict(
    dataset="fashion-mnist",
    data_dir="fashion-mnist",
    teacher="small_cnn",
    student="small_cnn",
    batch_size=16,
    mu=4,
    t_lr=0.05,
    s_lr=0.05,
    t_warmup_steps=50,
    label_smoothing=0.1,
    randaug_m=9,
    ema=0.99,
    workers=1,
    log_every=50,
    tensorboard=False,
    progress=False,
    device="cpu",
)


def _teacher_only(train_labels: int) -> dict:
    """A teacher-only grid's base: the student waits for the whole run (its work is skipped), so a run costs a UDA
    teacher; ``train_labels`` labels are trained on and 1,000 more are drawn and held out for validation (enough to
    separate variants by a point)."""
    return {
        **_FASHION,
        "num_labeled": train_labels + 1000,
        "val_labeled": 1000,
        "steps": 2000,
        "eval_every": 250,
        "save_every": 2000,
        "s_wait_steps": 2000,
        "mpl_weight": 0.0,
        "uda_weight": 1.0,
        "uda_steps": 200,
    }


# The shipped CIFAR-10 CPU recipe as the ablation reads it (the cifar10_cpu config and the data), on the device
# augmentation path, without progress output.
_CIFAR10 = {
    **ABLATION_PROTOCOLS["cifar10"],
    "tensorboard": False,
    "progress": False,
    "device": "cpu",
    "augment_on": "device",
    "threads": 1,
    "workers": 0,
}
LABELS_ONLY = dict(method="supervised", s_wait_steps=0)
GRIDS = {
    "fashion-teacher": dict(
        base=_teacher_only(1000),
        variants={
            "labels-only": LABELS_ONLY,
            "uda": {},
            "uda-joint": dict(teacher_batch="joint"),
            "uda-w4": dict(uda_weight=4.0),
            "uda-mu7": dict(mu=7),
            "uda-sharp": dict(uda_temperature=0.4, uda_threshold=0.8),
            "uda-cut8": dict(cutout=8),
            "uda-cut0": dict(cutout=0),
        },
    ),
    "fashion-teacher-250": dict(
        base=_teacher_only(250), variants={"labels-only": LABELS_ONLY, "uda": {}, "uda-cut8": dict(cutout=8)}
    ),
    "fashion-teacher-100": dict(
        base=_teacher_only(100),
        variants={
            "labels-only": LABELS_ONLY,
            "uda": {},
            "uda-cut8": dict(cutout=8),
            "uda-w3-cut8": dict(cutout=8, uda_weight=3.0),
        },
    ),
    # Full MPL runs (teacher, student, finetuning) at 100 training labels: how far the student trails, and when.
    "fashion-mpl-100": dict(
        base={
            **_FASHION,
            "num_labeled": 1100,
            "val_labeled": 1000,
            "steps": 3000,
            "eval_every": 250,
            "save_every": 3000,
            "s_wait_steps": 50,
            "s_warmup_steps": 50,
            "uda_weight": 1.0,
            "uda_steps": 200,
            "finetune_steps": 300,
            "finetune_batch_size": 16,
        },
        variants={
            "uda-mpl": {},
            "uda-mpl-wait1000": dict(s_wait_steps=1000),
            "uda-mpl-cosine": dict(feedback="cosine"),
            "labels-only": dict(method="supervised", steps=3300, finetune_steps=0),
        },
    ),
    # Twice the budget at 100 labels (validation): does the UDA teacher's lead over labels-only grow with steps?
    "fashion-long-100": dict(
        base={
            **_FASHION,
            "num_labeled": 1100,
            "val_labeled": 1000,
            "steps": 6000,
            "eval_every": 500,
            "save_every": 2000,
            "s_wait_steps": 50,
            "s_warmup_steps": 50,
            "uda_weight": 1.0,
            "uda_steps": 200,
            "cutout": 8,
            "finetune_steps": 600,
            "finetune_batch_size": 16,
        },
        variants={
            "labels-only": dict(method="supervised", steps=6600, finetune_steps=0),
            "uda-distill": dict(mpl_weight=0.0),
        },
    ),
    # RandAugment on the labeled images helps labels-only (ablation row randaug-labels-only): does it help the UDA
    # teacher too? The recipe's budget (3,000 + 300 steps), h = 0, validation.
    "fashion-lstrong-100": dict(
        base={
            **_FASHION,
            "num_labeled": 1100,
            "val_labeled": 1000,
            "steps": 3000,
            "eval_every": 250,
            "save_every": 3000,
            "s_wait_steps": 50,
            "s_warmup_steps": 50,
            "uda_weight": 1.0,
            "uda_steps": 200,
            "cutout": 8,
            "mpl_weight": 0.0,
            "finetune_steps": 300,
            "finetune_batch_size": 16,
        },
        variants={
            "uda-distill": {},
            "uda-distill-lstrong": dict(labeled_aug="strong"),
            "randaug-labels-only": dict(method="supervised", steps=3300, finetune_steps=0, labeled_aug="strong"),
            "labels-only": dict(method="supervised", steps=3300, finetune_steps=0),
        },
    ),
    # CIFAR-10 at 4,000 training labels (+1,000 held out for validation), twice the cifar10 protocol's steps, no
    # finetuning (every row 6,000 optimizer steps): does the Fashion-MNIST recipe (RandAugment'd labels for the UDA
    # teacher, h = 0) beat labels-only here too? Augmentation on the device path (one process per run).
    "cifar10-lstrong-4k": dict(
        base={
            **_CIFAR10,
            "num_labeled": 5000,
            "val_labeled": 1000,
            "steps": 6000,
            "eval_every": 500,
            "save_every": 6000,
            "finetune_steps": 0,
            "mpl_weight": 0.0,
        },
        variants={
            "labels-only": dict(method="supervised", s_wait_steps=0),
            "randaug-labels-only": dict(method="supervised", s_wait_steps=0, labeled_aug="strong"),
            "uda-distill-lstrong": dict(labeled_aug="strong"),
            "uda-distill": {},
            # after the four above: the student, not the teacher, trails; is it the strong view it learns on?
            "uda-distill-student-weak": dict(student_view="weak"),
        },
    ),
    # Does the UDA teacher's gap to labels-only on CIFAR-10 (4.0 points at 3,000 steps, 2.6 at 6,000) close with
    # steps? The weak-view rows of cifar10-lstrong-4k at 12,000 steps.
    "cifar10-long-4k": dict(
        base={
            **_CIFAR10,
            "num_labeled": 5000,
            "val_labeled": 1000,
            "steps": 12000,
            "eval_every": 1000,
            "save_every": 12000,
            "finetune_steps": 0,
            "mpl_weight": 0.0,
        },
        variants={"labels-only": dict(method="supervised", s_wait_steps=0), "uda-distill": {}},
    ),
}


def run_one(root: Path, grid: str, variant: str, seed: int, cache_dir: str | None) -> dict:
    """Train one (grid, variant, seed) unless its summary exists; return the summary."""
    spec = GRIDS[grid]
    values = {**spec["base"], **spec["variants"][variant], "seed": seed, "cache_dir": cache_dir}
    return train_once(root / grid / variant / f"seed{seed}", values, f"{grid} {variant} seed {seed}")


def report(root: Path, grid: str) -> str:
    """Markdown table: per variant and model (teacher, student, EMA, finetuned student), validation accuracy, final
    and median of the last five evaluations, mean over seeds; test accuracy only for the record. Read from each
    run's metrics.jsonl, so a run that stopped after its MPL phase still reports it."""
    lines = [
        "| variant | model | seeds | val acc final (%) | val acc median last 5 (%) | test acc final (%) | s / run |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in GRIDS[grid]["variants"]:
        base = {**GRIDS[grid]["base"], **GRIDS[grid]["variants"][variant]}
        student_trained = base.get("method") == "supervised" or base["s_wait_steps"] < base["steps"]
        runs = sorted(p for p in (root / grid / variant).glob("seed*") if (p / "metrics.jsonl").exists())
        for who in ("teacher", "student", "ema", "finetuned") if student_trained else ("teacher",):
            rows, label = [], variant
            for run in runs:
                val = last_evaluations(run, f"val_{who}_acc")
                if val:
                    summary = run / "summary.json"
                    wall = json.loads(summary.read_text())["wall_seconds"] if summary.exists() else float("nan")
                    if not summary.exists():  # killed, or stopped before finetuning: say how far it got
                        label = f"{variant} (stopped at step {read_metrics(run)[-1]['step']})"
                    rows.append((val[-1], statistics.median(val), last_evaluations(run, f"{who}_acc", 1)[0], wall))
            if rows:
                mean = [statistics.mean(col) for col in zip(*rows)]
                wall = "–" if mean[3] != mean[3] else f"{mean[3]:.0f}"
                lines.append(
                    f"| {label} | {who} | {len(rows)} | {mean[0]:.2f} | {mean[1]:.2f} | {mean[2]:.2f} | {wall} |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=sorted(GRIDS), required=True)
    p.add_argument("--variants", default="all", help="comma list of the grid's variants, or all")
    p.add_argument("--seeds", default="0")
    p.add_argument("--lane", default="0/1", help="I/N: run every N-th variant starting at I (parallel lanes)")
    p.add_argument("--root", default="runs/sweep")
    p.add_argument("--cache-dir", default=None)
    p.add_argument(
        "--data-root", default=None, help="where the data sets are (default $METAPL_DATA_ROOT or ../shared/data)"
    )
    p.add_argument("--report", action="store_true")
    args = p.parse_args(argv)
    root = Path(args.root)
    set_data_root(args.data_root)
    if args.report:
        print(report(root, args.grid))
        return 0
    variants = list(GRIDS[args.grid]["variants"]) if args.variants == "all" else args.variants.split(",")
    unknown = [v for v in variants if v not in GRIDS[args.grid]["variants"]]
    if unknown:
        p.error(f"unknown variant(s) {unknown} for grid {args.grid}")
    lane, lanes = (int(x) for x in args.lane.split("/"))
    jobs = [(v, int(s)) for s in args.seeds.split(",") for v in variants]
    for variant, seed in jobs[lane::lanes]:
        run_one(root, args.grid, variant, seed, args.cache_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
