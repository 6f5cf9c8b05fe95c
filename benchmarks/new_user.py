"""The new-user benchmark (issue 26): ``metapl train`` with data flags only, against labels-only training.

A new user passes the data and a step budget, nothing else. Per cell (a data set and a labeled count) and budget, the
rows are:

* ``metapl``          ``metapl train`` with its defaults: the model the run hands back (its ``result``)
* ``labels-only``     ``metapl train --method supervised`` with its defaults
* ``labels-strong``   the same with ``--labeled-aug strong`` (RandAugment and Cutout on the labeled images)

Seeds are paired across rows (the same seed draws the same labeled images). Every figure is the test accuracy of the
model the run hands back; the test images choose nothing. A finished run is skipped, a killed one redone, so the
table is built one run per command and grows across sessions:

    python -m benchmarks.new_user --cells digits-50 --budgets 300 --rows metapl --seeds 0
    python -m benchmarks.new_user --report --json benchmarks/results/new_user/grid.json

The report gives each cell's accuracies (mean ± std over seeds), wall times, and the paired differences metapl −
labels-only and metapl − the better labels-only row, with 95 % t-intervals where there are two seeds or more.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks.harness import (
    add_run_arguments,
    mean_sd,
    paired_interval,
    record,
    run_rows,
    set_data_root,
    train_once,
)

# What a user types to point metapl at each data set: the data flags and nothing else.
DATA = {
    "digits": dict(dataset="digits"),
    "fashion": dict(dataset="fashion-mnist", data_dir="fashion-mnist"),
    "cifar10": dict(dataset="cifar10", data_dir="cifar10-jpeg.tar.gz"),
}
CELLS = {
    "digits-50": ("digits", 50),
    "fashion-40": ("fashion", 40),
    "fashion-1000": ("fashion", 1000),
    "cifar10-250": ("cifar10", 250),
    "cifar10-4000": ("cifar10", 4000),
}
BUDGETS = (300, 1000, 3000)
ROWS = {
    "metapl": {},
    "labels-only": dict(method="supervised"),
    "labels-strong": dict(method="supervised", labeled_aug="strong"),
}
GROUPS = {"all": list(ROWS), "labels": ["labels-only", "labels-strong"]}
# Options that change where and how fast a run goes, never what it computes, and the quiet console of a benchmark.
QUIET = dict(progress=False, tensorboard=False)


def cell_values(cell: str, budget: int) -> dict:
    """The data flags of a cell and the step budget: what the new user types."""
    data, labels = CELLS[cell]
    return {**DATA[data], "num_labeled": labels, "steps": budget}


def run_dir(root: Path, cell: str, budget: int, row: str, seed: int) -> Path:
    """Where one run of the grid goes."""
    return root / cell / str(budget) / row / f"seed{seed}"


def run_one(root: Path, cell: str, budget: int, row: str, seed: int, cache_dir: str | None = None) -> dict:
    """Train one (cell, budget, row, seed) unless it is finished; return its summary."""
    values = {**cell_values(cell, budget), **ROWS[row], **QUIET, "seed": seed, "cache_dir": cache_dir}
    return train_once(run_dir(root, cell, budget, row, seed), values, f"{cell} {budget} {row} seed {seed}")


def handed_back(summary: dict) -> float | None:
    """The test accuracy of the model the run handed back (``summary["result"]``), else of its kept model."""
    result = summary.get("result")
    if result:
        return summary.get(f"{result['role']}_acc")
    return summary.get("finetuned_acc") or summary.get("ema_acc") or summary.get("student_acc")


def collect(root: Path) -> dict:
    """cell -> budget -> row -> seed -> {"acc", "seconds", "role"}."""
    out: dict = {}
    for path in sorted(root.glob("*/*/*/seed*/summary.json")):
        seed_dir, row_dir, budget_dir, cell_dir = path.parents[0], path.parents[1], path.parents[2], path.parents[3]
        s = json.loads(path.read_text())
        entry = {
            "acc": handed_back(s),
            "seconds": s.get("wall_seconds", s.get("seconds")),
            "role": (s.get("result") or {}).get("role"),
        }
        seed = int(seed_dir.name.removeprefix("seed"))
        by_row = out.setdefault(cell_dir.name, {}).setdefault(int(budget_dir.name), {})
        by_row.setdefault(row_dir.name, {})[seed] = entry
    return out


def _diff(a: dict[int, dict], b: dict[int, float]) -> str:
    acc = {s: v["acc"] for s, v in a.items()}
    common = sorted(set(acc) & set(b))
    if not common:
        return "–"
    stats = paired_interval(acc, b)
    mean = statistics.mean(acc[s] - b[s] for s in common)
    if stats is None:
        return f"{mean:+.2f} (1 seed)"
    _, half, n = stats
    return f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]"


def report(root: Path) -> str:
    """Markdown: per cell and budget, each row's accuracy and wall time, metapl's paired gains."""
    runs = collect(root)
    lines = [
        "| cell | steps | seeds | metapl (role) | labels-only | labels-strong | metapl − labels-only | "
        "metapl − better labels row | wall s (metapl / labels / strong) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    gains = []
    for cell in CELLS:
        for budget in sorted(runs.get(cell, {})):
            rows = runs[cell][budget]
            if "metapl" not in rows:
                continue
            m, lo, ls = rows["metapl"], rows.get("labels-only", {}), rows.get("labels-strong", {})
            roles = ",".join(sorted({v["role"] or "?" for v in m.values()}))
            lo_acc = {s: v["acc"] for s, v in lo.items()}
            better = {s: max(lo_acc[s], ls[s]["acc"]) for s in lo_acc if s in ls}
            gains += [m[s]["acc"] - lo_acc[s] for s in m if s in lo_acc]

            def acc(r):
                return mean_sd([v["acc"] for v in r.values()])

            def secs(r):
                return f"{statistics.mean(v['seconds'] for v in r.values()):.0f}" if r else "–"

            lines.append(
                f"| {cell} | {budget} | {len(m)} | {acc(m)} ({roles}) | {acc(lo)} | {acc(ls)} | {_diff(m, lo_acc)} | "
                f"{_diff(m, better)} | {secs(m)} / {secs(lo)} / {secs(ls)} |"
            )
    if gains:
        lines += ["", f"Mean gain of metapl over labels-only across the grid's runs: {statistics.mean(gains):+.2f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default=",".join(CELLS), help=f"comma list of {', '.join(CELLS)}")
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="comma list of step budgets")
    p.add_argument("--rows", default="all", help=f"comma list of rows or groups ({', '.join(GROUPS)})")
    add_run_arguments(p, root="runs/new_user", seeds="0")
    args = p.parse_args(argv)
    root = Path(args.root)
    set_data_root(args.data_root)
    if args.report:
        print(report(root))
        if args.json:
            record(args.json, collect(root))
        return 0
    cells = args.cells.split(",")
    unknown = [c for c in cells if c not in CELLS]
    if unknown:
        p.error(f"unknown cell(s) {unknown}; choose from {', '.join(CELLS)}")
    budgets = [args.steps] if args.steps else [int(b) for b in args.budgets.split(",")]
    for cell in cells:
        for budget in budgets:

            def run(row: str, seed: int, cell: str = cell, budget: int = budget) -> dict:
                return run_one(root, cell, budget, row, seed, args.cache_dir)

            run_rows(p, args, ROWS, GROUPS, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
