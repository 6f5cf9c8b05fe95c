"""Zero is a value wherever it is in range (``metapl finetune --steps 0``), ``metapl demo --steps 0`` is refused in one
line, options that do nothing in the chosen mode are refused, and every shipped recipe still loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metapl.commands.cli import get_args_parser, main
from metapl.config.fields import TrainConfig, config_from_dict
from metapl.config.flags import resolve
from metapl.config.recipes import load_yaml
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
            dict(mode="soft", teacher_batch="split"),
            "--teacher-batch split does nothing with --mode soft (soft mode "
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


def test_an_idle_option_is_refused_beside_what_idles_it_and_a_recipe_switched_by_a_flag_drops_it(capsys, tmp_path):
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
    # One rule for every source: the same pair in one YAML file, or in one TrainConfig call, is refused too.
    both = tmp_path / "both.yaml"
    both.write_text("method: supervised\nuda_weight: 3\n")
    with pytest.raises(UserError) as info:
        resolve(parser.parse_args(["train", "--config", str(both)]))
    assert str(info.value).startswith("--uda-weight 3 does nothing with --method supervised")
    with pytest.raises(UserError, match="^--uda-weight 3.0 does nothing with --method supervised"):
        TrainConfig(method="supervised", uda_weight=3.0)
    # A recipe is a set of defaults: --method supervised over it drops the recipe's options the baseline ignores.
    recipe = REPO / "src" / "metapl" / "configs" / "cifar10_4k.yaml"
    assert load_yaml(recipe)["uda_weight"] == 8.0
    cfg = resolve(parser.parse_args(["train", "--config", str(recipe), "--method", "supervised"]))
    assert (cfg.method, cfg.uda_weight, cfg.t_lr, cfg.teacher) == ("supervised", None, 0.05, "wrn28_2")
    assert main(["train", "--mode", "soft", "--feedback", "cosine", "--out", "unused"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("path", sorted((REPO / "src" / "metapl" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(TrainConfig(**load_yaml(path)), TrainConfig)


def test_every_ablation_row_loads():
    from benchmarks import ablation

    for protocol in ablation.PROTOCOLS:
        for row in ablation.ROWS:
            for steps in (None, 4):  # as the harness reads a recipe with a row's changes
                config_from_dict(ablation.run_values(protocol, row, 0, steps))
