"""The paper's ablation table (Pham et al. 2021, Table 6 / MPL_NOTES) at a budget a 2-core CPU can run.

Rows, each a ``metapl train`` run per seed, seeds paired across rows (same labeled split, same initial weights):

* ``labels-only``         the student on the labeled images alone (weak augmentation)      partner of itself
* ``labels-mpl``          teacher on labels + MPL feedback, no UDA, no RandAugment; student on its pseudo labels
* ``randaug-labels-only`` the labeled images with RandAugment + Cutout
* ``randaug-mpl``         as labels-mpl, with RandAugment on the teacher's labeled and the student's images
* ``uda-distill``         UDA teacher, feedback off (h = 0): the teacher distilled into the student
* ``uda-mpl``             UDA teacher + MPL feedback (``taylor``, derived sign): the full recipe
* feedback variants of ``uda-mpl`` (``uda-mpl-dot``, ``uda-mpl-cosine``, ``*-reversed``) and soft pseudo labels
  (``uda-mpl-soft`` with its own h = 0 control ``uda-distill-soft``), for the feedback-effect table.

Every pseudo-label row is followed by the paper's student finetuning on the labeled images (``finetune_steps``);
each labels-only row trains ``steps + finetune_steps`` steps, so every final model gets the same number of
optimizer steps. A finished run (its ``summary.json`` exists) is skipped; a killed one is started again, so the
table is built in pieces, one run per command if wanted, and resumed at will:

    python -m benchmarks.ablation --protocol fashion --rows labels-only --seeds 0
    python -m benchmarks.ablation --protocol fashion --rows core --seeds 0,1,2
    python -m benchmarks.ablation --protocol fashion --report --png benchmarks/results/ablation/fashion.png

The report gives, per row, the final test accuracy of the model a user keeps (the finetuned student, or the
labels-only student) and the median of its last (up to) five evaluations (never the best-on-test), mean ± std over
seeds; then each pair's gain paired by seed, and the feedback effect MPL − (h = 0) with a 95 % t-interval, for the
final models and again for the students before finetuning.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks.harness import (
    add_run_arguments,
    last_evaluations,
    mean_sd,
    paired_lines,
    protocol_model,
    read_metrics,
    record,
    resolve_data_dir,
    run_rows,
    set_data_root,
    shipped_recipe,
    train_once,
)
from metapl.methods.by_name import get_method

# Each protocol is a shipped config (one home for the recipe), read through the config layer with its checks, plus
# the data's name under the data root (benchmarks.harness). The Fashion-MNIST recipe was chosen with
# benchmarks/sweep.py on validation images carved from the labeled set (benchmarks/README.md, "The ablation"); the
# test set played no part.
CONFIGS = {"fashion": ("fashion_100_cpu", "fashion-mnist"), "cifar10": ("cifar10_cpu", "cifar10-jpeg.tar.gz")}
PROTOCOLS = {
    name: {**shipped_recipe(config), "data_dir": data, "save_every": 100_000}
    for name, (config, data) in CONFIGS.items()
}
# Twice the budget, chosen on validation (benchmarks/sweep.py --grid fashion-long-100: the UDA student's lead over
# labels-only grew from ~2 to ~4 points on the validation images at 6,000 + 600 steps).
PROTOCOLS["fashion-long"] = {**PROTOCOLS["fashion"], "steps": 6000, "finetune_steps": 600, "eval_every": 500}

NO_UDA = dict(uda_weight=0.0)
NO_RANDAUG = dict(randaug_n=0, cutout=0)  # the "strong" view is then the weak view's flip + crop
ROWS = {
    "labels-only": dict(method="supervised"),
    "labels-mpl": {**NO_UDA, **NO_RANDAUG},
    "randaug-labels-only": dict(method="supervised", labeled_aug="strong"),
    "randaug-mpl": {**NO_UDA, "labeled_aug": "strong"},
    "uda-distill": dict(mpl_weight=0.0),
    "uda-mpl": dict(feedback="taylor"),
    "uda-mpl-reversed": dict(feedback="taylor", feedback_sign="reversed"),
    "uda-mpl-dot": dict(feedback="dot"),
    "uda-mpl-dot-reversed": dict(feedback="dot", feedback_sign="reversed"),
    "uda-mpl-cosine": dict(feedback="cosine"),
    "uda-mpl-cosine-reversed": dict(feedback="cosine", feedback_sign="reversed"),
    "uda-distill-soft": dict(mode="soft", mpl_weight=0.0),
    # Chosen on validation (sweep.py --grid fashion-lstrong-100): the UDA teacher also sees RandAugment'd labels; no
    # finetuning on weak views (it cost 0.9 points there), the MPL phase gets its steps instead.
    "uda-distill-lstrong": dict(mpl_weight=0.0, labeled_aug="strong", fold_finetune=True),
    "uda-mpl-soft": dict(mode="soft"),
    "uda-mpl-soft-reversed": dict(mode="soft", feedback_sign="reversed"),
    # The same recipe with the feedback on: what MPL adds to the recipe that wins.
    "uda-mpl-lstrong": dict(labeled_aug="strong", fold_finetune=True),
    # FixMatch (Sohn et al. 2020): one network, 3,300 steps as labels-only, without the recipe's label smoothing (the
    # paper's Eq. 2 has none): smoothing 0.1 over 10 classes caps the confidence near 0.91, under tau 0.95, and held
    # the mask ratio at 0.13 instead of 0.55 at step 600 (benchmarks/README.md, 3.3c).
    "fixmatch": dict(method="fixmatch", label_smoothing=0.0),
}
GROUPS = {
    "core": ["labels-only", "uda-distill", "uda-mpl"],
    "baselines": ["fixmatch", "labels-only", "uda-distill", "uda-mpl", "randaug-labels-only"],
    "paper": ["labels-only", "labels-mpl", "randaug-labels-only", "randaug-mpl", "uda-distill", "uda-mpl"],
    "feedback": [
        "uda-mpl-dot",
        "uda-mpl-cosine",
        "uda-mpl-reversed",
        "uda-mpl-dot-reversed",
        "uda-mpl-cosine-reversed",
        "uda-distill-soft",
        "uda-mpl-soft",
        "uda-mpl-soft-reversed",
    ],
}
# (row, partner): a pseudo-label row against the labels-only row with the same augmentation.
PAIRS = [
    ("uda-distill-lstrong", "labels-only"),
    ("uda-mpl-lstrong", "labels-only"),
    ("uda-distill-lstrong", "randaug-labels-only"),
    ("labels-mpl", "labels-only"),
    ("randaug-mpl", "randaug-labels-only"),
    ("uda-distill", "labels-only"),
    ("uda-mpl", "labels-only"),
    ("uda-mpl-cosine", "labels-only"),
    # the strongest labels-only baseline: RandAugment on the labels, against plain labels and against UDA
    ("randaug-labels-only", "labels-only"),
    ("uda-distill", "randaug-labels-only"),
    # FixMatch, the one-network baseline, against labels only and the UDA rows
    ("fixmatch", "labels-only"),
    ("fixmatch", "randaug-labels-only"),
    ("fixmatch", "uda-distill"),
    ("fixmatch", "uda-mpl"),
]
# (row, its h = 0 control): the feedback effect.
FEEDBACK = [
    (row, next((f"uda-distill-{kind}" for kind in ("soft", "lstrong") if kind in row), "uda-distill"))
    for row in ROWS
    if row.startswith("uda-mpl")
]


def run_values(protocol: str, row: str, seed: int, steps: int | None = None) -> dict:
    """The flat ``TrainConfig`` values of one run: the protocol's recipe, the row's changes, the seed."""
    # The CPU unless the protocol names a device (benchmarks/gpu_ablation.py's does).
    values = {"device": "cpu", **resolve_data_dir(PROTOCOLS[protocol]), **ROWS[row], "seed": seed}
    values.update(progress=False, tensorboard=False)
    if steps is not None:  # smoke tests: a few steps, a proportional finetune
        finetune = max(1, steps // 2)
        values.update(steps=steps, finetune_steps=finetune, eval_every=steps, log_every=1, save_every=steps + finetune)
        values.update(s_wait_steps=0, s_warmup_steps=0, t_warmup_steps=0, uda_steps=0, workers=0, eval_limit=200)
    # The same optimizer-step count as pseudo labels + finetuning: rows whose method does not finetune (labels-only,
    # FixMatch), and rows that skip finetuning (fold_finetune), train steps + finetune_steps steps.
    method = get_method(values.get("method", "mpl"))
    if values.pop("fold_finetune", False) or not method.finetunes:
        values["steps"] += values.pop("finetune_steps")
        values["finetune_steps"] = 0
    if not method.waits_for_teacher:  # no teacher to wait for
        values["s_wait_steps"] = 0
    return values


def finetuned(row: str) -> bool:
    """Whether the row's final model is a finetuned student (else its student: no finetuning, no "before")."""
    return not ROWS[row].get("fold_finetune") and get_method(ROWS[row].get("method", "mpl")).finetunes


def run_one(root: Path, protocol: str, row: str, seed: int, *, steps: int | None = None, cache_dir=None) -> dict:
    """Train one (protocol, row, seed) unless it is finished; return its summary."""
    values = {**run_values(protocol, row, seed, steps), "cache_dir": cache_dir}
    return train_once(root / protocol / row / f"seed{seed}", values, f"{protocol} {row} seed {seed}")


# The protocol's statistics and "the model a user keeps" live in the library (metapl compare uses them too).
final_model = protocol_model


def collect(root: Path, protocol: str) -> dict[str, dict[int, dict]]:
    """row -> seed -> {"final", "median5", "teacher", "ema", "seconds", "curve"} for every finished run."""
    out: dict[str, dict[int, dict]] = {}
    for row in ROWS:
        for path in sorted((root / protocol / row).glob("seed*/summary.json")):
            summary = json.loads(path.read_text())
            who = final_model(summary)
            curve = [
                (r["step"], r["eval/ema_acc"]) for r in read_metrics(path.parent) if r.get("eval/ema_acc") is not None
            ]
            out.setdefault(row, {})[summary["seed"]] = {
                "final": summary[f"{who}_acc"],
                "median5": statistics.median(last_evaluations(path.parent, f"{who}_acc")),
                "teacher": summary.get("teacher_acc"),
                "student": summary.get("student_acc"),
                "seconds": summary.get("wall_seconds", summary["seconds"]),
                "curve": curve,
            }
    return out


def report(root: Path, protocol: str, png: Path | None = None) -> str:
    """Three Markdown tables (rows; paired gains; feedback effect) and optionally a PNG of EMA accuracy."""
    runs = collect(root, protocol)
    lines = [
        "| row | seeds | final model acc (%) | median of last 5 evals (%) | teacher (%) | student before "
        "finetuning (%) | s / run |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, seeds in runs.items():
        col = {k: [v[k] for v in seeds.values() if v[k] is not None] for k in ("final", "median5", "teacher")}
        before = [v["student"] for v in seeds.values()] if finetuned(row) else []
        wall = statistics.mean(v["seconds"] for v in seeds.values())
        lines.append(
            f"| {row} | {len(seeds)} | {mean_sd(col['final'])} | {mean_sd(col['median5'])} | "
            f"{mean_sd(col['teacher'])} | {mean_sd(before)} | {wall:.0f} |"
        )
    lines += [
        "",
        "| comparison (paired by seed) | seeds | mean difference (points) | 95 % interval |",
        "|---|---|---|---|",
    ]
    # The same comparisons for the students before finetuning (the paper's last phase can cost as well as help).
    lines += paired_lines(runs, PAIRS + FEEDBACK)
    lines += ["", *feedback_stats(root, protocol), "", *fixmatch_stats(root, protocol)]
    if png is not None and runs:
        _plot(runs, protocol, png)
    return "\n".join(lines)


def feedback_stats(root: Path, protocol: str) -> list[str]:
    """How much the feedback term weighs: per MPL row, over all seeds' logged 50-step means after step 100, the median
    |h|, the median |MPL term| against the median labeled loss, and how often h was positive."""
    lines = [
        "| row | median abs h | median abs MPL term | median labeled loss | MPL / labeled | h > 0 |",
        "|---|---|---|---|---|---|",
    ]
    for row in (r for r in ROWS if r.startswith("uda-mpl")):
        records = [
            r
            for run in sorted((root / protocol / row).glob("seed*"))
            if (run / "metrics.jsonl").exists()
            for r in read_metrics(run)
            if "train/mpl/h" in r and r["step"] > 100
        ]
        if not records:
            continue
        h = [r["train/mpl/h"] for r in records]
        term = statistics.median(abs(r["train/loss/teacher_mpl"]) for r in records)
        labeled = statistics.median(r["train/loss/teacher_l"] for r in records)
        lines.append(
            f"| {row} | {statistics.median(abs(v) for v in h):.2g} | {term:.2g} | {labeled:.3f} | "
            f"{100 * term / labeled:.2f} % | {100 * sum(v > 0 for v in h) / len(h):.0f} % |"
        )
    return lines


def fixmatch_stats(root: Path, protocol: str) -> list[str]:
    """What FixMatch's threshold let through: per seed, the mean over the last 500 steps' logged records of the mask
    ratio (the share of unlabeled images whose weak-view confidence reached tau) and of its pseudo labels' accuracy."""
    lines = ["| fixmatch seed | mask ratio, last 500 steps | pseudo-label accuracy (all images) |", "|---|---|---|"]
    for run in sorted((root / protocol / "fixmatch").glob("seed*")):
        records = [r for r in read_metrics(run) if "train/mask_ratio" in r] if (run / "metrics.jsonl").exists() else []
        last = [r for r in records if records and r["step"] > records[-1]["step"] - 500]
        if last:
            mask = statistics.mean(r["train/mask_ratio"] for r in last)
            acc = statistics.mean(r["train/pseudo/acc"] for r in last)
            lines.append(f"| {run.name} | {mask:.2f} | {100 * acc:.1f} % |")
    return lines if len(lines) > 2 else []


PAPER_PANEL = [
    "labels-only",
    "labels-mpl",
    "randaug-labels-only",
    "randaug-mpl",
    "uda-distill",
    "uda-mpl",
    "uda-distill-lstrong",
    "uda-mpl-lstrong",
]


def _plot(runs: dict, protocol: str, png: Path) -> None:
    """Mean EMA-student curves: the paper's rows and the recipe that wins on the left, every feedback variant with
    its h = 0 controls on the right (ten colours per panel, so each line keeps its own)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {
        "the paper's rows, the recipe that wins": [r for r in PAPER_PANEL if r in runs],
        "feedback estimators and signs vs h = 0": [r for r in runs if r not in PAPER_PANEL or r == "uda-distill"],
    }
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for ax, (title, rows) in zip(axes, panels.items()):
        for i, row in enumerate(rows):
            curves = [v["curve"] for v in runs[row].values() if v["curve"]]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            mean = [statistics.mean(c[j][1] for c in curves) for j in range(n)]
            ax.plot(
                [s for s, _ in curves[0][:n]],
                mean,
                marker="o",
                ms=2,
                label=row,
                color=f"C{i % 10}",
                ls="-" if i < 10 else "--",
            )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step (MPL phase; finetuning not shown)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ends = [line.get_ydata()[-1] for ax in axes for line in ax.get_lines()]
    if ends:  # the first evaluations (random-init models) would squash the part that differs
        axes[0].set_ylim(bottom=max(0.0, min(ends) - 15))
    axes[0].set_ylabel("EMA student test accuracy (%)")
    fig.suptitle(f"{protocol}: EMA student accuracy over steps (mean over seeds)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), required=True)
    p.add_argument("--rows", default="core", help=f"comma list of rows or groups ({', '.join(GROUPS)})")
    add_run_arguments(p, root="runs/ablation")
    p.add_argument("--png", default=None, help="with --report: write the accuracy plot here")
    args = p.parse_args(argv)
    root = Path(args.root)
    set_data_root(args.data_root)
    if args.report:
        print(report(root, args.protocol, Path(args.png) if args.png else None))
        if args.json:
            runs = collect(root, args.protocol)
            record(
                args.json,
                {row: {seed: _without_curve(run) for seed, run in seeds.items()} for row, seeds in runs.items()},
            )
        return 0

    def run(row: str, seed: int) -> dict:
        return run_one(root, args.protocol, row, seed, steps=args.steps, cache_dir=args.cache_dir)

    run_rows(p, args, ROWS, GROUPS, run)
    return 0


def _without_curve(run: dict) -> dict:
    return {k: v for k, v in run.items() if k != "curve"}


if __name__ == "__main__":
    sys.exit(main())
