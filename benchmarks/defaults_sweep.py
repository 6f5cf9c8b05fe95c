"""Choosing ``metapl train``'s defaults on validation images only (issue 26).

The new-user benchmark's cells (``benchmarks.new_user``), each with extra labeled images held out of the train split
as validation (``--val-labeled``; they leave the labeled and the unlabeled streams): the variants below are compared
on those images alone, never on the test set. A variant is a recipe whose step-count settings are fractions of the
budget, so one variant runs at every budget. Every role of a run (teacher, student, EMA student, finetuned student)
is scored on the validation images at the end, so one run tells which role a rule should hand back.

    python -m benchmarks.defaults_sweep --variants labels,base --cells digits-50 --budgets 1000 --seeds 0
    python -m benchmarks.defaults_sweep --report [--json benchmarks/results/defaults_sweep/sweep.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks.harness import add_run_arguments, record, set_data_root, train_once
from benchmarks.new_user import BUDGETS, CELLS, DATA, QUIET

# Validation images held out per data set (class-balanced, from the train split).
VAL = {"digits": 250, "fashion": 1000, "cifar10": 1000}
ROLES = ("teacher", "student", "ema", "finetuned")


def scaled(budget: int, *, t_warmup=0.05, s_wait=0.1, s_warmup=0.05, uda=0.2, finetune=0.1, evals=10) -> dict:
    """Step-count settings as fractions of the budget."""
    return dict(
        t_warmup_steps=round(t_warmup * budget),
        s_wait_steps=round(s_wait * budget),
        s_warmup_steps=round(s_warmup * budget),
        uda_steps=round(uda * budget),
        finetune_steps=round(finetune * budget),
        eval_every=max(1, budget // evals),
        save_every=budget,
    )


def labels_only(budget: int) -> dict:
    """The labels-only baseline, evaluated as often as the other variants."""
    return dict(method="supervised", eval_every=max(1, budget // 10), save_every=budget)


def auto_aug(budget: int, labels: int, batch_size: int = 32, epochs: float = 100) -> str:
    """Strong labeled views when the run sees each labeled image at least ``epochs`` times, else weak."""
    return "strong" if budget * batch_size / labels >= epochs else "weak"


# name -> (budget, labeled images of the cell) -> option values. ``defaults`` is whatever metapl train does with no
# option: the row to compare against once the chosen defaults are in.
VARIANTS = {
    "labels": lambda b, n: labels_only(b),
    "labels-strong": lambda b, n: {**labels_only(b), "labeled_aug": "strong"},
    "labels-auto": lambda b, n: {**labels_only(b), "labeled_aug": auto_aug(b, n)},
    "base": lambda b, n: scaled(b),
    "base-lstrong": lambda b, n: {**scaled(b), "labeled_aug": "strong"},
    "base-wait0": lambda b, n: scaled(b, s_wait=0.0),
    "base-wait30": lambda b, n: scaled(b, s_wait=0.3),
    "base-mu3": lambda b, n: {**scaled(b), "mu": 3},
    "base-uda3": lambda b, n: {**scaled(b), "uda_weight": 3.0},
    "base-h0": lambda b, n: {**scaled(b), "mpl_weight": 0.0},
    "base-thr95": lambda b, n: {**scaled(b), "uda_threshold": 0.95},
    "base-joint": lambda b, n: {**scaled(b), "teacher_batch": "joint"},
    "base-ramp50": lambda b, n: scaled(b, uda=0.5),
    "base-udaw03": lambda b, n: {**scaled(b), "uda_weight": 0.3},
    "joint-auto": lambda b, n: {**scaled(b), "teacher_batch": "joint", "labeled_aug": auto_aug(b, n)},
    "joint-lstrong": lambda b, n: {**scaled(b), "teacher_batch": "joint", "labeled_aug": "strong"},
    "defaults": lambda b, n: {},
}


def run_values(cell: str, budget: int, variant: str, seed: int) -> dict:
    """One run's ``TrainConfig`` values: the cell's data with the validation images added to the labeled draw."""
    data, labels = CELLS[cell]
    val = VAL[data]
    values = {**DATA[data], "num_labeled": labels + val, "val_labeled": val, "steps": budget, **QUIET, "seed": seed}
    return {**values, **VARIANTS[variant](budget, labels)}


def run_one(root: Path, cell: str, budget: int, variant: str, seed: int, cache_dir: str | None = None) -> dict:
    """Train one (cell, budget, variant, seed) unless it is finished; return its summary."""
    values = {**run_values(cell, budget, variant, seed), "cache_dir": cache_dir}
    out = root / cell / str(budget) / variant / f"seed{seed}"
    return train_once(out, values, f"{cell} {budget} {variant} seed {seed}")


def collect(root: Path) -> dict:
    """cell -> budget -> variant -> seed -> {role: validation accuracy, "seconds"}."""
    out: dict = {}
    for path in sorted(root.glob("*/*/*/seed*/summary.json")):
        seed_dir, variant_dir, budget_dir, cell_dir = path.parents[0], path.parents[1], path.parents[2], path.parents[3]
        s = json.loads(path.read_text())
        entry = {role: s.get(f"val_{role}_acc") for role in ROLES}
        entry["seconds"] = s.get("wall_seconds", s.get("seconds"))
        seed = int(seed_dir.name.removeprefix("seed"))
        by_variant = out.setdefault(cell_dir.name, {}).setdefault(int(budget_dir.name), {})
        by_variant.setdefault(variant_dir.name, {})[seed] = entry
    return out


def _mean(values: list[float]) -> float | None:
    return statistics.mean(values) if values else None


def report(root: Path) -> str:
    """Markdown: per cell and budget, each variant's validation accuracy per role (mean over seeds)."""
    runs = collect(root)
    lines = ["| cell | steps | variant | seeds | teacher | student | ema | finetuned | best role | wall s |"]
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for cell in CELLS:
        for budget in sorted(runs.get(cell, {})):
            for variant, seeds in runs[cell][budget].items():
                means = {role: _mean([v[role] for v in seeds.values() if v[role] is not None]) for role in ROLES}
                best = max((r for r in ROLES if means[r] is not None), key=lambda r: means[r])
                cols = " | ".join("–" if means[r] is None else f"{means[r]:.2f}" for r in ROLES)
                wall = statistics.mean(v["seconds"] for v in seeds.values())
                lines.append(f"| {cell} | {budget} | {variant} | {len(seeds)} | {cols} | {best} | {wall:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default=",".join(CELLS), help=f"comma list of {', '.join(CELLS)}")
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="comma list of step budgets")
    p.add_argument("--variants", default="labels,base", help=f"comma list of {', '.join(VARIANTS)}")
    add_run_arguments(p, root="runs/defaults_sweep", seeds="0")
    args = p.parse_args(argv)
    root = Path(args.root)
    set_data_root(args.data_root)
    if args.report:
        print(report(root))
        if args.json:
            record(args.json, collect(root))
        return 0
    variants, cells = args.variants.split(","), args.cells.split(",")
    bad = [v for v in variants if v not in VARIANTS] + [c for c in cells if c not in CELLS]
    if bad:
        p.error(f"unknown variant(s) or cell(s) {bad}; variants: {', '.join(VARIANTS)}; cells: {', '.join(CELLS)}")
    budgets = [args.steps] if args.steps else [int(b) for b in args.budgets.split(",")]
    for seed in (int(s) for s in args.seeds.split(",")):
        for budget in budgets:
            for cell in cells:
                for variant in variants:
                    run_one(root, cell, budget, variant, seed, args.cache_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
