"""``metapl compare``: the paired statistics on fixed numbers, each row's config, a tiny resumable run, bad input."""

from __future__ import annotations

import argparse
import json
import statistics

import pytest

from metapl.commands.cli import get_args_parser, main
from metapl.config.fields import TrainConfig
from metapl.config.flags import given_options
from metapl.protocol.paired import mean_sd, paired_interval, paired_text, t_975
from metapl.protocol.rows import ROWS, default_rows, recommendation, row_config

TINY = [
    *["--dataset", "digits", "--num-labeled", "50", "--steps", "4", "--finetune-steps", "2", "--eval-every", "4"],
    *["--log-every", "2", "--batch-size", "8", "--mu", "2", "--workers", "0", "--threads", "1", "--no-progress"],
    *["--no-tensorboard", "--device", "cpu", "--eval-limit", "100"],
]


def test_paired_interval_is_a_t_interval():
    mean, half, n = paired_interval({0: 3.0, 1: 5.0, 2: 4.0, 7: 9.0}, {0: 1.0, 1: 2.0, 2: 3.0})
    # seeds 0, 1, 2 paired (7 has no partner): differences 2, 3, 1: mean 2, sd 1, t(0.975, 2) = 4.303
    assert (mean, n) == (2.0, 3) and half == pytest.approx(4.303 / 3**0.5)
    assert paired_interval({0: 1.0}, {0: 0.0}) is None
    assert (t_975(1), t_975(9), t_975(22), t_975(100)) == (12.706, 2.262, 2.086, 2.042)
    assert mean_sd([1.0, 3.0]) == "2.00 ± 1.41" and mean_sd([5.0]) == "5.00 ± 0.00" and mean_sd([]) == "–"
    assert paired_text({0: 3.0, 1: 5.0, 2: 4.0}, {0: 1.0, 1: 2.0, 2: 3.0}) == "+2.00 [-0.48, +4.48]"
    assert paired_text({0: 3.0}, {0: 4.5}) == "-1.50 (one seed)"


def test_intervals_are_clipped_and_identical_differences_said_in_words():
    # differences 100 and 0: t(0.975, 1) x sd 70.7 / sqrt(2) = 635 points either side, clipped to what accuracies allow
    assert paired_text({0: 100.0, 1: 0.0}, {0: 0.0, 1: 0.0}) == "+50.00 [-100.00, +100.00]"
    # 72.3 - 70.1 and 75.4 - 73.2 differ by a rounding error: a zero-width interval would claim certainty
    assert paired_text({0: 72.3, 1: 75.4, 2: 80.0}, {0: 70.1, 1: 73.2, 2: 77.8}) == "+2.20 (the same in all 3 seeds)"


def test_recommendation_names_the_best_row_on_validation_and_what_mpl_adds():
    val = {
        "labels-only": {0: 70.0, 1: 72.0, 2: 71.0},
        "labels-strong": {0: 72.0, 1: 73.0, 2: 74.0},  # +2, +1, +3 over labels only
        "uda-distill": {0: 71.0, 1: 72.0, 2: 73.0},
        "mpl": {0: 71.0, 1: 72.0, 2: 72.0},  # -1, -1, -2 vs labels-strong: [-2.77, +0.10]
    }
    assert recommendation(val) == (
        "labels-strong",
        "recommend: labels only, strong augmentation (+2.00 [-0.48, +4.48] over labels only on validation); "
        "MPL adds nothing measurable here (-1.33 [-2.77, +0.10] vs it)",
    )
    val["mpl"] = {0: 74.0, 1: 75.0, 2: 75.0}  # +4, +3, +4 over labels only; +3, +3, +2 over h = 0
    assert recommendation(val) == (
        "mpl",
        "recommend: Meta Pseudo Labels (+3.67 [+2.23, +5.10] over labels only on validation); the MPL feedback "
        "adds +2.67 [+1.23, +4.10] over h = 0",
    )
    one = {row: {0: by_seed[0]} for row, by_seed in val.items()}
    one["labels-only"] = {0: 80.0}  # ahead of every row; a tie would go to the cheaper row listed first
    assert recommendation(one) == (
        "labels-only",
        "recommend: labels only (no other row is ahead of it on validation); MPL -6.00 (one seed) vs it; one seed: "
        "no interval, run --seeds 0,1,2 before trusting it",
    )


def test_row_configs_of_a_big_teacher_recipe_pass_every_refusal():
    base = TrainConfig(
        teacher_weights="big.safetensors", feedback="dot", mpl_weight=0.5, steps=100, s_wait_steps=10, out="x"
    )
    rows = default_rows(base)
    assert rows == list(ROWS)
    assert default_rows(TrainConfig()) == ["labels-only", "labels-strong", "fixmatch", "uda-distill", "mpl"]
    cfgs = {row: row_config(base, ROWS[row][1], seed=3, out=f"o/{row}") for row in rows}
    assert all(c.seed == 3 and c.out == f"o/{row}" for row, c in cfgs.items())
    # labels only: the pseudo-label rows' 100 + 10 finetuning steps, no teacher, no wait for one
    labels = cfgs["labels-only"]
    assert (labels.steps, labels.planned_finetune_steps(), labels.teacher_weights, labels.s_wait_steps) == (
        110,
        0,
        None,
        0,
    )
    assert cfgs["labels-strong"].labeled_aug == "strong" and labels.labeled_aug == "weak"
    fixmatch = cfgs["fixmatch"]  # one network: the labels-only row's steps, no teacher, the paper's settings
    assert (fixmatch.steps, fixmatch.planned_finetune_steps(), fixmatch.teacher_weights, fixmatch.s_wait_steps) == (
        110,
        0,
        None,
        0,
    )
    assert (fixmatch.label_smoothing, fixmatch.fixmatch_threshold, fixmatch.uda_weight) == (0.0, 0.95, None)
    assert (cfgs["uda-distill"].mpl_weight, cfgs["mpl"].mpl_weight, cfgs["mpl"].feedback) == (0.0, 0.5, "dot")
    assert cfgs["mpl"].planned_finetune_steps() == 10 and cfgs["mpl"].teacher_weights == "big.safetensors"
    distill, reduced = cfgs["distill"], cfgs["reduced-mpl"]
    assert (distill.feedback, distill.mpl_weight, distill.uda_weight, distill.reduced_hidden) == (
        "taylor",
        1.0,
        0.0,
        64,
    )
    assert (reduced.feedback, reduced.mpl_weight, reduced.uda_weight) == ("dot", 0.5, 0.0)


def _mtimes(out):
    return {p: p.stat().st_mtime_ns for p in sorted(out.glob("*/seed*/summary.json"))}


def test_tiny_compare_tabulates_paired_intervals_and_resumes(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "--seeds", "0,1", "--out", str(out)]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert list(result["rows"]) == ["labels-only", "labels-strong", "fixmatch", "uda-distill", "mpl"]
    assert (result["val_labeled"], result["seeds"]) == (10, [0, 1])  # a fifth of the 50 labels
    steps = {row: (info["steps"], info["finetune_steps"]) for row, info in result["rows"].items()}
    assert steps == {
        "labels-only": (6, 0),
        "labels-strong": (6, 0),
        "fixmatch": (6, 0),
        "uda-distill": (4, 2),
        "mpl": (4, 2),
    }
    warning = (
        "the rows are compared on 10 validation images, where one image moves an accuracy by 10 points: differences "
        "that small are noise; give --val-labeled 100 or more where your labels allow"
    )
    assert result["warnings"] == [warning]
    # The interval recomputed by hand from the runs' own summaries (each run's result: its validation accuracy).
    val = {
        row: [json.loads((out / row / f"seed{s}" / "summary.json").read_text()) for s in (0, 1)]
        for row in ("labels-only", "mpl")
    }
    assert [s["steps"] for s in val["labels-only"]] == [6, 6] and "finetuned_acc" not in val["labels-only"][0]
    diffs = [m["result"]["val_acc"] - b["result"]["val_acc"] for m, b in zip(val["mpl"], val["labels-only"])]
    mean, half = statistics.mean(diffs), 12.706 * statistics.stdev(diffs) / 2**0.5
    assert result["rows"]["mpl"]["val_vs_labels_only"]["mean"] == pytest.approx(mean)
    table = (out / "compare.md").read_text()
    assert f"| Meta Pseudo Labels | {mean_sd([s['result']['val_acc'] for s in val['mpl']])} | " in table
    assert f"| {mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}] | " in table
    assert table.splitlines()[-1] == result["recommendation"] and result["recommendation"].startswith("recommend: ")
    assert table.splitlines()[-2] == f"warning: {warning}"
    # Each row's time per run: the mean of its runs' training seconds (evaluations included), in the JSON and table.
    seconds = statistics.mean(s["seconds"] for s in val["mpl"])
    assert result["rows"]["mpl"]["seconds"] == seconds and seconds < 100
    assert f"| 4 + 2 | {seconds:.0f} s |" in next(line for line in table.splitlines() if "Meta Pseudo" in line)
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith(result["recommendation"]) and printed.startswith(f"warning: {warning}\n")

    # Again: every run is finished, nothing trains.
    before = _mtimes(out)
    assert len(before) == 10 and main(["compare", *TINY, "--seeds", "0,1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier; skipped") == 10 and "trained steps" not in printed
    assert _mtimes(out) == before and (out / "compare.md").read_text() == table

    # A run stopped before its summary is resumed from its checkpoint, to the same figures.
    (out / "mpl" / "seed1" / "summary.json").unlink()
    assert main(["compare", *TINY, "--seeds", "0,1", "--out", str(out)]) == 0
    assert f"resumed {out / 'mpl' / 'seed1'}" in capsys.readouterr().out
    assert (out / "compare.md").read_text() == table

    # Other settings into the same folder: one line, nothing trained or written.
    assert main(["compare", *TINY, "--seeds", "0,1", "--out", str(out), "--mu", "3"]) == 2
    err = capsys.readouterr().err
    where = out / "labels-only" / "seed0"
    assert err == (
        f"metapl: error: {where} holds a run with other settings (mu 2 there, 3 now); pick another --out, "
        "or delete that folder to train it again\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "0,x"], "--seeds '0,x' is not a list of distinct seeds >= 0; write e.g. --seeds 0,1,2"),
        (["--seeds", "1,1"], "--seeds '1,1' is not a list of distinct seeds >= 0; write e.g. --seeds 0,1,2"),
        (["--method", "supervised"], "compare trains every method with every seed of --seeds itself; drop --method"),
        (["--seed", "3"], "compare trains every method with every seed of --seeds itself; drop --seed"),
        (
            ["--val-labeled", "45"],  # found when the first run draws its split: its empty folders are removed
            "--val-labeled 45 leaves fewer than one training label per class of the 50 labeled images; lower "
            "--val-labeled or raise --num-labeled",
        ),
        (
            ["--val-labeled", "0"],
            "compare chooses on validation images; give --val-labeled >= 1 (default: a fifth of the labels)",
        ),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "--out", str(out), *args]) == 2
    assert capsys.readouterr().err == f"metapl: error: {message}\n"
    assert not out.exists()


def test_compare_help_gives_its_own_defaults_and_hides_what_it_refuses():
    sub = next(a for a in get_args_parser()._actions if a.dest == "command").choices["compare"]
    helps = {a.dest: a.help for a in sub._actions}
    assert helps["out"].endswith("(default: runs/compare)") and "runs/mpl" not in helps["out"]
    assert helps["val_labeled"].endswith("(default: a fifth of --num-labeled, at least 1)")
    assert "[--method " not in sub.format_usage() and "[--seed " not in sub.format_usage()
    assert (helps["method"], helps["seed"]) == (argparse.SUPPRESS, argparse.SUPPRESS)
    train = next(a for a in get_args_parser()._actions if a.dest == "command").choices["train"]
    assert next(a.help for a in train._actions if a.dest == "out").endswith("(default: runs/mpl)")
    demo = next(a for a in get_args_parser()._actions if a.dest == "command").choices["demo"]
    demo_helps = {a.dest: a.help for a in demo._actions}
    assert demo_helps["out"] == "where the 3 runs go (default: runs/demo)"  # labels only, h = 0, MPL
    assert demo_helps["steps"].endswith("(default: 500)") and demo_helps["seed"].endswith("(default: 0)")


def test_val_is_short_for_val_labeled():
    args = get_args_parser().parse_args(["compare", "--val", "7"])
    assert given_options(args) == {"val_labeled": 7} and args.seeds == "0,1,2"
