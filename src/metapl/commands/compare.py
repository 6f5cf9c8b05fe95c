"""``metapl compare``: does Meta Pseudo Labels pay on my data? One command trains the rows and answers.

On the user's recipe (any ``metapl train`` options), seeds paired across rows, every final model at the same number
of optimizer steps (``metapl.protocol.rows``): labels only, labels only with strong augmentation, FixMatch (one
network on its own confident pseudo labels), the UDA teacher distilled with the feedback off (h = 0), full MPL, and
with a big teacher (``--teacher-weights``) also its plain distillation and Reduced MPL. Rows are compared on
validation images carved from the labeled ones, never on the test set; test accuracy is reported beside it, and each
row's steps and time per run. Each run goes to ``OUT/<row>/seed<k>/``; ``OUT/compare.json`` and ``OUT/compare.md``
hold the table and the recommendation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from metapl.config.fields import TrainConfig
from metapl.errors import UserError, reporting_os_errors
from metapl.protocol.paired import identical, interval_bounds, mean_sd, paired_interval, paired_text
from metapl.protocol.rows import (
    LABELS_ONLY,
    ROWS,
    default_rows,
    kept_accuracy,
    recommendation,
    row_config,
    run_state,
    train_row,
)

logger = logging.getLogger(__name__)

DEFAULT_OUT = "runs/compare"
DEFAULT_SEEDS = "0,1,2"
VAL_SHARE = 0.2  # of --num-labeled, held out for validation unless --val-labeled is given
# Below this many validation images a comparison is mostly noise: one image moves an accuracy by more than a point,
# and the binomial sd of an accuracy near 75 % is 43 / sqrt(n) points (4.3 at 100 images, 9.7 at 20).
MIN_VAL_IMAGES = 100


def flag_helps() -> dict[str, str]:
    """``metapl compare --help``'s own lines for the train options it reads otherwise: ``--out`` and ``--val-labeled``
    (other defaults), ``--method`` and ``--seed`` (refused: every row's method and every ``--seeds`` seed run)."""
    return {
        "out": f"where the runs (OUT/<row>/seed<k>/), compare.json and compare.md go (default: {DEFAULT_OUT})",
        "val_labeled": "of the labeled images, hold out this many (class-balanced) as validation images, on which "
        f"the rows are compared; under {MIN_VAL_IMAGES} a warning says the comparison is mostly noise; an integer "
        ">= 1 (default: a fifth of --num-labeled, at least 1)",
        "method": argparse.SUPPRESS,
        "seed": argparse.SUPPRESS,
    }


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; anything else (a word, a negative or repeated seed) is one line."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r} is not a list of distinct seeds >= 0; write e.g. --seeds 0,1,2")
    return seeds


def compare_command(base: TrainConfig, given: dict, *, seeds: str = DEFAULT_SEEDS) -> dict:
    """``metapl compare``: check what only the command line can get wrong, then ``compare``.

    Args:
        base: the resolved recipe (``--config`` and the train flags).
        given: the options given as flags (``metapl.config.flags.given_options``).
        seeds: ``--seeds``.

    Returns:
        ``compare``'s result.
    """
    refused = [f"--{name}" for name in ("method", "seed") if name in given]
    if refused:
        raise UserError(f"compare trains every method with every seed of --seeds itself; drop {', '.join(refused)}")
    if given.get("val_labeled") == 0:
        raise UserError(
            "compare chooses on validation images; give --val-labeled >= 1 (default: a fifth of the labels)"
        )
    return compare(base, out=given.get("out", DEFAULT_OUT), seeds=parse_seeds(seeds))


def compare(
    base: TrainConfig, *, out: str | Path, seeds: Sequence[int] = (0, 1, 2), rows: Sequence[str] | None = None
) -> dict:
    """Train every (row, seed) that is not finished, then write and print the table and the recommendation.

    Args:
        base: the recipe; ``val_labeled`` 0 or unset becomes a fifth of ``num_labeled`` (at least 1).
        out: the folder of the runs, ``compare.json`` and ``compare.md``.
        seeds: the seeds, paired across rows.
        rows: names from ``metapl.protocol.rows.ROWS`` (default: ``default_rows``; labels-only is always added).

    Returns:
        What ``compare.json`` holds.
    """
    val_labeled = base.val_labeled or max(1, round(VAL_SHARE * base.num_labeled))
    base = replace(base, val_labeled=val_labeled)
    if val_labeled < MIN_VAL_IMAGES:
        logger.warning(few_images(val_labeled))
    rows = [LABELS_ONLY, *(r for r in rows or default_rows(base) if r != LABELS_ONLY)]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise UserError(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    # Every run's config is built, and every existing run folder checked, before anything trains.
    plan = {
        (row, seed): row_config(base, ROWS[row][1], seed=seed, out=Path(out) / row / f"seed{seed}")
        for seed in seeds
        for row in rows
    }
    for cfg in plan.values():
        run_state(cfg)
    created = [p for p in (Path(out), *(Path(out) / row for row in rows)) if not p.exists()]
    try:
        summaries = _train_all(plan)
    except UserError:  # bad data or a split that cannot be drawn: leave no empty folders behind
        for path in reversed(created):
            with contextlib.suppress(OSError):
                path.rmdir()  # only an empty folder goes
        raise
    result = _result(base, plan, summaries)
    text = report(result)
    _write(Path(out), result, text)
    logger.info("")
    logger.info(text)
    return result


def few_images(count: int) -> str:
    """The warning of a comparison on ``count`` < ``MIN_VAL_IMAGES`` validation images."""
    return (
        f"the rows are compared on {count} validation image{'s' * (count != 1)}, where one image moves an accuracy by "
        f"{100 / count:.2g} points: differences that small are noise; give --val-labeled {MIN_VAL_IMAGES} or more "
        "where your labels allow"
    )


def _train_all(plan: dict[tuple[str, int], TrainConfig]) -> dict[str, dict[int, dict]]:
    """Train (or read back) every planned run, seed-major (every row of seed 0 first): row -> seed -> summary."""
    summaries: dict[str, dict[int, dict]] = {}
    for (row, seed), cfg in plan.items():
        logger.info(f"== compare: {ROWS[row][0]}, seed {seed}: {cfg.steps} steps -> {cfg.out} ==")
        summary, state = train_row(cfg)
        if state == "finished":
            logger.info(f"compare: {row} seed {seed} finished earlier; skipped")
        summaries.setdefault(row, {})[seed] = summary
    return summaries


def _result(base: TrainConfig, plan: dict, summaries: dict[str, dict[int, dict]]) -> dict:
    """The figures of ``compare.json``: per row and seed the kept model's validation and test accuracy, and the
    recommendation."""
    rows = {}
    for row, seeds in summaries.items():
        cfg = plan[(row, next(iter(seeds)))]
        rows[row] = {
            "label": ROWS[row][0],
            "steps": cfg.steps,
            "finetune_steps": cfg.planned_finetune_steps(),  # with steps, every optimizer step of its final model
            "seconds": statistics.mean(s["seconds"] for s in seeds.values()),  # per run, evaluations included
            "seeds": {
                seed: {
                    "val": kept_accuracy(s, "val_"),
                    "test": kept_accuracy(s),
                    "seconds": s["seconds"],
                    "run": plan[(row, seed)].out,
                }
                for seed, s in seeds.items()
            },
        }
    val = {row: {seed: r["val"] for seed, r in info["seeds"].items()} for row, info in rows.items()}
    missing = [row for row, by_seed in val.items() if None in by_seed.values()]
    if missing:  # a run trained without validation images cannot be compared here
        raise UserError(f"{', '.join(missing)} has no validation accuracy; delete its runs to train them again")
    best, line = recommendation(val)
    for row, info in rows.items():
        test = {seed: r["test"] for seed, r in info["seeds"].items()}
        base_test = {seed: r["test"] for seed, r in rows[LABELS_ONLY]["seeds"].items()}
        for key, a, b in (("val", val[row], val[LABELS_ONLY]), ("test", test, base_test)):
            stats = paired_interval(a, b) if row != LABELS_ONLY else None
            info[f"{key}_vs_labels_only"] = None if stats is None else _interval(stats)
    counts = [s.get("num_val", base.val_labeled) for seeds in summaries.values() for s in seeds.values()]
    num_val = min(int(n) for n in counts if n is not None)
    return {
        "dataset": base.dataset,
        "num_labeled": base.num_labeled,
        "val_labeled": base.val_labeled,
        "warnings": [few_images(num_val)] if num_val < MIN_VAL_IMAGES else [],
        "mpl_steps": base.steps,
        "finetune_steps": base.planned_finetune_steps(),
        "seeds": sorted({seed for info in rows.values() for seed in info["seeds"]}),
        "rows": rows,
        "recommend": best,
        "recommendation": line,
    }


def _interval(stats: tuple[float, float, int]) -> dict:
    """A paired difference in ``compare.json``: mean, half-width and seeds, the interval clipped to ±100 points, and
    whether every seed's difference was the same (then the interval says nothing about another seed)."""
    low, high = interval_bounds(stats)
    named = dict(zip(("mean", "half_width", "seeds"), stats))
    return {**named, "low": low, "high": high, "identical": identical(stats)}


def report(result: dict) -> str:
    """``compare.md``: the table (accuracy of the kept model, mean ± std; paired differences vs labels only with 95 %
    t-intervals) and the recommendation line."""
    r = result
    lines = [
        f"{r['dataset']}, {r['num_labeled']} labels ({r['val_labeled']} held out for validation), {r['mpl_steps']} "
        f"steps + {r['finetune_steps']} finetuning (labels-only rows: {r['mpl_steps'] + r['finetune_steps']} steps), "
        f"seeds {', '.join(map(str, r['seeds']))}; accuracy (%) of the model a user keeps, mean ± std:",
        "",
        "| row | validation | test | validation vs labels only (95 % interval) | test vs labels only | steps "
        "| time / run |",
        "|---|---|---|---|---|---|---|",
    ]
    base = r["rows"][LABELS_ONLY]["seeds"]
    for row, info in r["rows"].items():
        per_seed = info["seeds"]
        cells = [mean_sd([s[k] for s in per_seed.values()]) for k in ("val", "test")]
        for k in ("val", "test"):
            own, other = ({seed: s[k] for seed, s in d.items()} for d in (per_seed, base))
            cells.append("–" if row == LABELS_ONLY else paired_text(own, other))
        steps = f"{info['steps']:,}" + (f" + {info['finetune_steps']:,}" if info["finetune_steps"] else "")
        cells += [steps, _duration(info["seconds"])]
        lines.append(f"| {info['label']} | " + " | ".join(cells) + " |")
    warnings = [f"warning: {w}" for w in r.get("warnings", [])]
    return "\n".join([*lines, "", *warnings, r["recommendation"]])


def _duration(seconds: float) -> str:
    """``"42 s"``, ``"12.5 min"`` or ``"3.2 h"``."""
    if seconds < 100:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 6000 else f"{seconds / 3600:.1f} h"


def _write(out: Path, result: dict, text: str) -> None:
    for name, content in (("compare.json", json.dumps(result, indent=1) + "\n"), ("compare.md", text + "\n")):
        path = out / name
        with reporting_os_errors(path, "write"):
            tmp = path.with_suffix(".tmp")
            tmp.write_text(content)
            tmp.replace(path)
