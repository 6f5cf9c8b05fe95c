"""Zero is a value wherever it is in range (``metapl finetune --steps 0``), ``metapl demo --steps 0`` is refused in one
line, options that do nothing in the chosen mode are refused, and every shipped recipe still loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metapl.commands.cli import get_args_parser, main
from metapl.engine.config import TrainConfig, load_yaml, resolve
from metapl.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = [
    *["--dataset", "digits", "--num-labeled", "20", "--batch-size", "8", "--mu", "2", "--workers", "0"],
    *["--eval-every", "2", "--log-every", "2", "--save-every", "2", "--no-tensorboard", "--no-progress"],
    *["--device", "cpu", "--steps", "2", "--finetune-steps", "0", "--eval-limit", "40"],
]


def test_finetune_steps_zero_runs_no_step_and_scores_the_student(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    student = torch.load(out / "checkpoint.pt", weights_only=False)["student"]
    assert main(["finetune", str(out), "--steps", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finetune_steps"] == 0 and summary["finetuned_acc"] == summary["student_acc"]
    saved = torch.load(out / "finetuned.pt", weights_only=False)["student"]
    assert all(torch.equal(student[k], saved[k]) for k in student)
    capsys.readouterr()
    assert main(["finetune", str(out), "--steps", "-1"]) == 2
    assert capsys.readouterr().err == (
        "metapl: error: --steps -1 is out of range; use an integer >= 0 (0 scores the student as it is)\n"
    )


def test_demo_steps_zero_is_refused_in_one_line(tmp_path, capsys):
    assert main(["demo", "--steps", "0", "--out", str(tmp_path / "demo")]) == 2
    assert capsys.readouterr().err == "metapl: error: --steps 0 is out of range; use an integer >= 1\n"
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            dict(mode="soft", feedback="cosine"),
            "--feedback cosine does nothing with --mode soft (soft mode has the "
            "exact meta-gradient, no estimator of h); drop --feedback or use --mode hard",
        ),
        (
            dict(mode="soft", feedback="dot"),
            "--feedback dot does nothing with --mode soft (soft mode has the "
            "exact meta-gradient, no estimator of h); drop --feedback or use --mode hard",
        ),
        (
            dict(mode="soft", baseline_decay=0.01),
            "--baseline-decay 0.01 does nothing with --mode soft (soft mode has "
            "no h to subtract a baseline from); drop --baseline-decay or use --mode hard",
        ),
        (
            dict(mode="soft", pseudo_label="sample"),
            "--pseudo-label sample does nothing with --mode soft (soft mode's "
            "pseudo labels are the whole distribution); drop --pseudo-label or use --mode hard",
        ),
        (
            dict(mode="soft", teacher_batch="joint"),
            "--teacher-batch joint does nothing with --mode soft (soft mode "
            "always runs one joint teacher forward); drop --teacher-batch or use --mode hard",
        ),
        (
            dict(soft_temperature=2.0),
            "--soft-temperature 2.0 does nothing with --mode hard (hard pseudo labels are "
            "the argmax or a sample); drop --soft-temperature or use --mode soft",
        ),
    ],
)
def test_an_option_the_mode_ignores_is_refused(values, message):
    with pytest.raises(ValueError) as info:  # a UserError, which is a ValueError
        TrainConfig(**values)
    assert isinstance(info.value, UserError) and str(info.value) == message


def test_mpl_only_flags_are_refused_with_the_labels_only_baseline_but_a_recipe_file_is_not(capsys):
    parser = get_args_parser()
    with pytest.raises(UserError) as info:
        resolve(parser.parse_args(["train", "--method", "supervised", "--uda-weight", "3"]))
    assert str(info.value) == (
        "--uda-weight 3.0 does nothing with --method supervised (the labels-only baseline "
        "trains the student alone); drop --uda-weight or use --method mpl"
    )
    with pytest.raises(UserError) as info:
        resolve(parser.parse_args(["train", "--uda-weight", "0", "--uda-threshold", "0.9"]))
    assert str(info.value) == (
        "--uda-threshold 0.9 does nothing with --uda-weight 0.0 (UDA is off); drop "
        "--uda-threshold or use --uda-weight a weight > 0"
    )
    recipe = REPO / "src" / "metapl" / "configs" / "cifar10_4k.yaml"
    cfg = resolve(parser.parse_args(["train", "--config", str(recipe), "--method", "supervised"]))
    assert cfg.method == "supervised" and cfg.uda_weight == load_yaml(recipe)["uda_weight"] == 8.0
    assert main(["train", "--mode", "soft", "--feedback", "cosine", "--out", "unused"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("path", sorted((REPO / "src" / "metapl" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(TrainConfig(**load_yaml(path)), TrainConfig)


def test_every_ablation_row_loads():
    from benchmarks import ablation

    for protocol in ablation.PROTOCOLS:
        for row in ablation.ROWS:
            for steps in (None, 4):
                TrainConfig(**ablation.run_values(protocol, row, 0, steps))
