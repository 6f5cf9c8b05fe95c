"""The config layer: options declared once (help, range, choices), one check for library calls, YAML and flags."""

from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys
import typing
from dataclasses import fields, replace
from pathlib import Path

import pytest

from metapl.commands.cli import get_args_parser, main
from metapl.config.fields import TrainConfig, sections
from metapl.config.flags import resolve
from metapl.config.recipes import load_yaml
from metapl.core import MPLConfig
from metapl.core.options import specs
from metapl.data import DATASETS
from metapl.errors import UserError
from metapl.methods.by_name import method_names
from metapl.rundir.layout import save_config

REPO = Path(__file__).resolve().parents[1]


def train_actions() -> dict:
    """The ``metapl train`` parser's actions by dest."""
    sub = next(a for a in get_args_parser()._actions if a.dest == "command")
    return {a.dest: a for a in sub.choices["train"]._actions}


def test_every_option_has_a_help_text_and_a_flag():
    actions = train_actions()
    for name, spec in specs(TrainConfig).items():
        assert len(spec.help) > 10, name
        assert actions[name].option_strings[0] == "--" + name.replace("_", "-")
        assert "(default: " in actions[name].help, name
    assert all(d in specs(TrainConfig)["dataset"].help for d in DATASETS)  # the help names every data set


def test_choices_come_from_the_literal_types_and_the_methods_registry():
    hints = typing.get_type_hints(TrainConfig)
    literal = {n: typing.get_args(t) for n, t in hints.items() if typing.get_origin(t) is typing.Literal}
    assert literal["feedback"] == ("taylor", "dot", "cosine") and literal["amp"] == ("none", "bf16", "fp16")
    actions = train_actions()
    assert {n for n, a in actions.items() if a.choices} == {*literal, "method"}
    for name, allowed in literal.items():
        assert tuple(actions[name].choices) == allowed
    assert tuple(actions["method"].choices) == method_names()
    assert method_names() == ("mpl", "supervised", "reduced-mpl", "distill", "fixmatch")


def test_help_lines_show_what_range_and_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "--image-size INT resize images to this side, in pixels; none keeps the data set's size; an integer in "
        "[8, 4096] or none (default: none)"
    ) in text
    assert "--label-smoothing FLOAT label smoothing of the teacher's" in text
    assert "finetuning); a number in [0, 1) (default: 0.0)" in text
    assert (
        "--t-lr FLOAT teacher's peak learning rate (warmup, then cosine decay); 0 freezes the teacher; a finite "
        "number >= 0 (default: 0.05)" in text
    )
    assert "--nesterov, --no-nesterov Nesterov momentum (ignored when --momentum is 0) (default: true)" in text


def test_mpl_options_are_train_options_with_one_declaration():
    mpl = {f.name: f for f in fields(MPLConfig)}
    train = {f.name: f for f in fields(TrainConfig)}
    assert all(train[n].default == f.default and train[n].metadata == f.metadata for n, f in mpl.items())
    cfg = TrainConfig(mode="soft", uda_weight=1.0, steps=10, label_smoothing=0.1, label_view="strong")
    assert cfg.mpl_config() == MPLConfig(mode="soft", label_smoothing=0.1, label_view="strong")
    assert (cfg.uda_weight, cfg.steps) == (1.0, 10)
    # Built once per config (the trainer asks every step), rebuilt by replace(), invisible to eq/repr/pickle.
    assert cfg.mpl_config() is cfg.mpl_config()
    assert replace(cfg, mode="hard").mpl_config() == MPLConfig(mode="hard", label_smoothing=0.1, label_view="strong")
    assert pickle.loads(pickle.dumps(cfg)).mpl_config() == cfg.mpl_config()
    assert "_mpl_config" not in repr(cfg) and replace(cfg) == cfg


def test_saved_config_is_grouped_and_round_trips(tmp_path):
    titles = [title.split(" ")[0] for title, _ in sections()]
    assert titles == ["data", "models", "optimisation", "Meta", "FixMatch", "student", "run"]
    names = [n for _, group in sections() for n in group]
    assert sorted(names) == sorted(f.name for f in fields(TrainConfig))
    cfg = TrainConfig(image_size=32, cutout=16, hflip=None, feedback="cosine", seed=2**32 - 1, t_lr=0.0)
    keys = list(cfg.to_dict())
    assert keys[:3] == ["dataset", "data_dir", "download"] and keys[-1] == "progress"
    assert keys.index("ema") < keys.index("mode") < keys.index("grad_clip") < keys.index("finetune_steps")
    save_config(cfg, tmp_path / "c.yaml")
    assert TrainConfig(**load_yaml(tmp_path / "c.yaml")) == cfg


@pytest.mark.parametrize("path", sorted((REPO / "src" / "metapl" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = TrainConfig(**load_yaml(path))
    expected = {
        "cifar10_4k": ("cifar10", 4000),
        "cifar10_cpu": ("cifar10", 4000),
        "fashion_100_cpu": ("fashion-mnist", 100),
        "fashion_100_strong_cpu": ("fashion-mnist", 100),
        "svhn_1k": ("svhn", 1000),
        "cifar100_10k": ("cifar100", 10000),
        "imagenet_10pct": ("folder", 128000),
    }
    assert (cfg.dataset, cfg.num_labeled) == expected[path.stem]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"teacher_dropout": 1.0}, "--teacher-dropout 1.0 is out of range; use a number in [0, 1)"),
        ({"momentum": -0.1}, "--momentum -0.1 is out of range; use a number in [0, 1)"),
        ({"s_lr": 0.0}, "--s-lr 0.0 is out of range; use a finite number > 0"),
        ({"t_lr": float("inf")}, "--t-lr inf is not finite; use a finite number >= 0"),
        ({"uda_weight": float("nan")}, "--uda-weight nan is not finite; use a finite number >= 0"),
        ({"seed": 2**32}, "--seed 4294967296 is out of range; use an integer in [0, 4294967295]"),
        ({"image_size": 4}, "--image-size 4 is out of range; use an integer in [8, 4096] or none"),
        ({"randaug_n": 15}, "--randaug-n 15 is out of range; use an integer in [0, 14]"),
        ({"randaug_m": 31}, "--randaug-m 31 is out of range; use an integer in [0, 30]"),
        ({"cutout": 20, "image_size": 16}, "--cutout 20 exceeds --image-size 16; use at most the image size"),
        ({"eval_batch_size": 0}, "--eval-batch-size 0 is out of range; use an integer in [1, 65536]"),
        ({"finetune_steps": -1}, "--finetune-steps -1 is out of range; use an integer >= 0"),
        ({"uda_threshold": 1.5}, "--uda-threshold 1.5 is out of range; use a number in [0, 1]"),
        ({"soft_temperature": 0}, "--soft-temperature 0 is out of range; use a finite number > 0"),
        ({"steps": 2.5}, "--steps 2.5 is not an integer; use an integer >= 1"),
        ({"ema": True}, "--ema True is not a number; use a number in [0, 1)"),
        ({"hflip": "yes"}, "--hflip 'yes' is not true or false; use true or false or none"),
        ({"feedback": "exact"}, "--feedback 'exact' is not a choice; use one of taylor, dot, cosine"),
        ({"out": ""}, "--out '' is empty; use a non-empty string"),
        ({"steps": None}, "--steps None is not allowed; use an integer >= 1"),
        ({"amp": "fp16", "mode": "soft"}, "--amp fp16 does not work with --mode soft (second-order gradients)"),
    ],
)
def test_train_config_refuses_out_of_range_values(kwargs, message):
    with pytest.raises(UserError) as err:
        TrainConfig(**kwargs)
    assert str(err.value).startswith(message), str(err.value)


def test_mpl_config_refuses_with_value_errors_that_name_option_value_and_range():
    cases = {
        "label_smoothing": (1.0, "MPLConfig.label_smoothing 1.0 is out of range; use a number in [0, 1)"),
        "baseline_decay": (-0.5, "MPLConfig.baseline_decay -0.5 is out of range; use a number in [0, 1]"),
        "uda_temperature": (float("nan"), "MPLConfig.uda_temperature nan is not finite; use a finite number > 0"),
        "grad_clip": ("1", "MPLConfig.grad_clip '1' is not a number; use a finite number >= 0"),
        "mode": ("medium", "MPLConfig.mode 'medium' is not a choice; use one of hard, soft"),
    }
    for name, (value, message) in cases.items():
        with pytest.raises(ValueError) as err:
            MPLConfig(**{name: value})
        assert str(err.value) == message
    assert MPLConfig(baseline_decay=1, uda_threshold=0.0).baseline_decay == 1  # bounds are inclusive where stated


def test_flags_and_yaml_text_are_parsed_then_checked(tmp_path):
    parser = get_args_parser()
    args = parser.parse_args(["train", "--steps", "1e3", "--image-size", "none", "--t-lr", "0", "--no-hflip"])
    cfg = resolve(args)
    assert (cfg.steps, cfg.image_size, cfg.t_lr, cfg.hflip) == (1000, None, 0.0, False)
    with pytest.raises(UserError, match=r"^--mu 'abc' is not an integer; use an integer in \[1, 1024\]$"):
        resolve(parser.parse_args(["train", "--mu", "abc"]))
    (tmp_path / "c.yaml").write_text("steps: 1e3\nseed: 4294967296\n")
    with pytest.raises(UserError) as err:
        load_yaml(tmp_path / "c.yaml")
    assert str(err.value) == (
        f"config file {tmp_path / 'c.yaml'}: seed 4294967296 is out of range; use an integer in [0, 4294967295]"
    )


# -- random flag values through the whole CLI ---------------------------------------------------------------------

TINY = [
    *["--dataset", "digits", "--steps", "2", "--num-labeled", "20", "--workers", "0", "--batch-size", "4", "--mu", "1"],
    *["--eval-every", "2", "--no-progress", "--no-tensorboard", "--device", "cpu"],
]
FUZZED = [
    *["--t-lr", "--label-smoothing", "--ema", "--momentum", "--randaug-n", "--randaug-m", "--seed", "--cutout"],
    *["--image-size", "--uda-threshold", "--uda-temperature", "--grad-clip", "--teacher-dropout", "--mode"],
]
VALUES = [
    "nan",
    "inf",
    "-inf",
    "abc",
    "",
    "none",
    "-1",
    "1e9",
    "soft",  # refused by some or all options
    *["0", "1e-3", "0.1", "0.5", "0.9", "0.99", "1", "2", "8", "14", "30"],
]
ALWAYS_BAD = {"nan", "inf", "-inf", "abc"}  # refused by every fuzzed option


def test_random_flag_values_end_in_a_run_or_one_error_line(tmp_path, capsys):
    rng = random.Random(20240612)
    for i in range(25):
        chosen = {flag: rng.choice(VALUES) for flag in rng.sample(FUZZED, rng.randint(1, 2))}
        extra = [a for flag, v in chosen.items() for a in ((f"{flag}={v}",) if rng.random() < 0.5 else (flag, v))]
        try:
            code = main(["train", *TINY, "--out", str(tmp_path / f"ex{i}"), *extra])
        except SystemExit as e:  # argparse exits by itself
            code = e.code
        err = capsys.readouterr().err
        assert code in (0, 2), (extra, err)
        assert "Traceback" not in err, (extra, err)
        if code == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("metapl: error: "), (extra, err)
        if ALWAYS_BAD & set(chosen.values()):
            assert code == 2 and any(flag in err for flag in chosen), (extra, err)


def test_default_recipe_uses_uda_and_finetunes_a_tenth_of_the_steps():
    # A user who gives only data gets the recipe that won the ablation: UDA on, then student finetuning.
    cfg = TrainConfig(steps=3000)
    assert cfg.planned_uda_weight() == 1.0 and cfg.finetune_steps is None and cfg.planned_finetune_steps() == 300
    assert TrainConfig(steps=3000, method="distill", teacher_weights="t.pt").planned_uda_weight() == 0.0
    assert TrainConfig(steps=3000, method="supervised").planned_finetune_steps() == 0
    assert TrainConfig(steps=3000, finetune_steps=7).planned_finetune_steps() == 7


def test_help_imports_no_torch():
    # `python -X importtime` lists every module the interpreter imported; --help of metapl and of each subcommand
    # must build its parser from torch-free modules only (docs/architecture.md: metapl --help stays fast).
    commands = sorted(a for a in next(a for a in get_args_parser()._actions if a.dest == "command").choices)
    script = (
        "import sys\nfrom metapl.commands.cli import main\n"
        f"for argv in [[], *[[c] for c in {commands!r}]]:\n"
        "    try:\n        main([*argv, '--help'])\n    except SystemExit:\n        pass\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time")}
    assert "metapl.commands.cli" in imported and "metapl.config.fields" in imported
    assert sorted(m for m in imported if m.split(".")[0] in ("torch", "numpy", "PIL")) == []
    assert done.stdout.count("usage: metapl") == len(commands) + 1


def test_one_device_option_for_the_commands_that_load_a_run():
    sub = next(a for a in get_args_parser()._actions if a.dest == "command").choices
    helps = {name: next(a.help for a in sub[name]._actions if a.dest == "device") for name in ("eval", "predict")}
    assert helps == {name: "auto, cpu, cuda or cuda:N (default: auto)" for name in ("eval", "predict")}
    finetune = next(a for a in sub["finetune"]._actions if a.dest == "device")
    assert (finetune.default, finetune.help) == (None, "auto, cpu, cuda or cuda:N (default: the run's)")
    steps = next(a for a in sub["finetune"]._actions if a.dest == "steps")
    assert steps.help.endswith("(default: the run's finetune_steps, or 1000 when that is 0)")
