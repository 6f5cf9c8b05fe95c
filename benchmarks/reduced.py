"""Reduced Meta Pseudo Labels at CPU scale (issue 19): does a learning teacher beat a fixed one when it starts strong?

Per protocol and seed, a large teacher is trained first on the labeled images of that seed's split alone (never the
unlabeled images' labels, never the test set); every other row then starts from it. Rows, seeds paired (same split,
same initial student):

* ``labels-only``     the student on the labeled images alone, ``steps + finetune_steps`` steps
* ``distill``         the large teacher's stored predictions distilled into the student (reduced teacher fixed at
                      the identity, h = 0): the control that isolates the feedback
* ``reduced-taylor``, ``reduced-dot``, ``reduced-cosine``  Reduced MPL: the reduced teacher learns by its labeled loss
                      and the MPL feedback with that estimator
* ``full-mpl``        full MPL (UDA teacher + feedback, the protocol's recipe) with the teacher started from the large
                      teacher's weights

Every pseudo-label row is followed by the protocol's finetuning of the student on the labels. A finished run is
skipped, a killed one redone; one run per command if wanted:

    python -m benchmarks.reduced --protocol fashion --rows teacher,labels-only,distill --seeds 0
    python -m benchmarks.reduced --protocol fashion --report --json benchmarks/results/reduced/fashion.json

The report gives each row's final test accuracy (mean ± std over seeds), its CPU time with the teacher's training
included, the student's gain over labels-only and the feedback effect (Reduced MPL − distill) with 95 % t-intervals.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks.ablation import PROTOCOLS as ABLATION
from benchmarks.harness import (
    add_run_arguments,
    mean_sd,
    paired_lines,
    protocol_model,
    record,
    resolve_data_dir,
    run_rows,
    set_data_root,
    train_once,
)

# The ablation's recipes (chosen on validation there), with the views made on the training device (the same pixels as
# the Pillow path, faster on two cores). The reduced teacher's own settings (64 hidden units, the protocol's teacher
# learning rate) are the defaults, not tuned.
PROTOCOLS = {name: {**ABLATION[name], "augment_on": "device", "workers": 0} for name in ("fashion", "cifar10")}
# The large teacher of each protocol: the strongest labels-only model measured on that data (benchmarks/README.md):
# RandAugment'd labels on Fashion-MNIST (76.7 % at 3,300 steps); on CIFAR-10, where RandAugment'd labels cost the small
# CNN 5.7 points, plain labels at four times the student's budget (70.9 % on validation at 12,000 steps).
TEACHERS = {
    "fashion": dict(method="supervised", labeled_aug="strong"),
    "cifar10": dict(method="supervised", steps=12_000, eval_every=1000),
}
REDUCED = dict(method="reduced-mpl", uda_weight=0.0)
ROWS = {
    "teacher": {},
    "labels-only": dict(method="supervised"),
    "distill": dict(method="distill", uda_weight=0.0),
    "reduced-taylor": {**REDUCED, "feedback": "taylor"},
    "reduced-dot": {**REDUCED, "feedback": "dot"},
    "reduced-cosine": {**REDUCED, "feedback": "cosine"},
    "full-mpl": dict(method="mpl"),
}
USES_TEACHER = [row for row in ROWS if row not in ("teacher", "labels-only")]
GROUPS = {"all": list(ROWS), "reduced": ["reduced-taylor", "reduced-dot", "reduced-cosine"]}
FEEDBACK = [(row, "distill") for row in GROUPS["reduced"]] + [("full-mpl", "distill")]


def run_values(protocol: str, row: str, seed: int, root: Path, steps: int | None = None) -> dict:
    """The flat ``TrainConfig`` values of one run: the protocol's recipe, the row's changes, the seed."""
    values = {"device": "cpu", **resolve_data_dir(PROTOCOLS[protocol]), "seed": seed}
    values.update(progress=False, tensorboard=False)
    values.update(TEACHERS[protocol] if row == "teacher" else ROWS[row])
    if steps is not None:  # smoke tests: a few steps, a proportional finetune
        values.update(steps=steps, finetune_steps=max(1, steps // 2), eval_every=steps, log_every=1)
        values.update(s_wait_steps=0, s_warmup_steps=0, t_warmup_steps=0, uda_steps=0, eval_limit=200)
    if values["method"] == "supervised":  # the same optimizer-step count as pseudo labels + finetuning
        if row != "teacher" or steps is not None:
            values["steps"] = values["steps"] + values["finetune_steps"]
        values.update(finetune_steps=0, s_wait_steps=0)
    else:
        values["teacher_weights"] = str(teacher_dir(root, protocol, seed))
    return values


def teacher_dir(root: Path, protocol: str, seed: int) -> Path:
    """Where a seed's large teacher is trained (its final EMA student is the teacher the other rows start from)."""
    return root / protocol / "teacher" / f"seed{seed}"


def run_one(root: Path, protocol: str, row: str, seed: int, *, steps: int | None = None, cache_dir=None) -> dict:
    """Train one (protocol, row, seed) unless it is finished (its teacher first); return its summary."""
    if row != "teacher":
        run_one(root, protocol, "teacher", seed, steps=steps, cache_dir=cache_dir)
    values = {**run_values(protocol, row, seed, root, steps), "cache_dir": cache_dir}
    return train_once(root / protocol / row / f"seed{seed}", values, f"{protocol} {row} seed {seed}")


def collect(root: Path, protocol: str) -> dict[str, dict[int, dict]]:
    """row -> seed -> {"final", "student", "teacher", "seconds"}; ``seconds`` includes the teacher's training in every
    row that starts from the teacher (not in ``labels-only``)."""
    teacher = {}
    for path in sorted((root / protocol / "teacher").glob("seed*/summary.json")):
        s = json.loads(path.read_text())
        teacher[s["seed"]] = s
    out: dict[str, dict[int, dict]] = {}
    for row in ROWS:
        for path in sorted((root / protocol / row).glob("seed*/summary.json")):
            s = json.loads(path.read_text())
            who = "ema" if row == "teacher" else protocol_model(s)
            own = s.get("wall_seconds", s["seconds"])
            big = teacher.get(s["seed"], {})
            out.setdefault(row, {})[s["seed"]] = {
                "final": s[f"{who}_acc"],
                "student": s.get("student_acc"),
                "teacher": s.get("teacher_acc"),
                "seconds": own + (big.get("wall_seconds", big.get("seconds", 0)) if row in USES_TEACHER else 0),
            }
    return out


def report(root: Path, protocol: str) -> str:
    """Markdown: the rows, the gains over labels-only, the feedback effects."""
    runs = collect(root, protocol)
    lines = [
        "| row | seeds | final model (%) | (reduced) teacher (%) | student before finetuning (%) | CPU min, "
        "teacher's training included |",
        "|---|---|---|---|---|---|",
    ]
    for row, seeds in runs.items():
        col = {k: [v[k] for v in seeds.values() if v[k] is not None] for k in ("final", "teacher", "student")}
        minutes = statistics.mean(v["seconds"] for v in seeds.values()) / 60
        lines.append(
            f"| {row} | {len(seeds)} | {mean_sd(col['final'])} | {mean_sd(col['teacher'])} | "
            f"{mean_sd(col['student'])} | {minutes:.1f} |"
        )
    lines += [
        "",
        "| comparison (paired by seed) | seeds | mean difference (points) | 95 % interval |",
        "|---|---|---|---|",
    ]
    lines += paired_lines(runs, [(row, "labels-only") for row in USES_TEACHER] + FEEDBACK)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), required=True)
    p.add_argument("--rows", default="all", help=f"comma list of rows or groups ({', '.join(GROUPS)})")
    add_run_arguments(p, root="runs/reduced")
    args = p.parse_args(argv)
    root = Path(args.root)
    set_data_root(args.data_root)
    if args.report:
        print(report(root, args.protocol))
        if args.json:  # the same shape as ever (row -> seed -> figures); the command goes to command.txt beside it
            record(args.json, collect(root, args.protocol))
        return 0

    def run(row: str, seed: int) -> dict:
        return run_one(root, args.protocol, row, seed, steps=args.steps, cache_dir=args.cache_dir)

    run_rows(p, args, ROWS, GROUPS, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
