"""``metapl train`` end to end on tiny budgets: outputs, config precedence, resume, divergence, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import checkpoint_accuracies
from metapl.commands.cli import main
from metapl.rundir.checkpoint import atomic_save, load_checkpoint
from metapl.rundir.layout import LATEST
from metapl.training.metrics import read_metrics

CIFAR_TAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"

# A few seconds on 2 cores: digits (shipped with scikit-learn), the small CNN, tiny batches.
TINY = [
    *["--dataset", "digits", "--num-labeled", "20", "--batch-size", "8", "--mu", "2", "--workers", "0"],
    *["--eval-every", "4", "--log-every", "2", "--save-every", "4", "--no-tensorboard", "--no-progress"],
    *["--uda-weight", "1", "--device", "cpu"],
]


def cli(*args: str) -> int:
    return main(["train", *args])


def test_train_writes_every_output(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(*TINY, "--steps", "6", "--out", str(out), "--tensorboard") == 0
    summary = json.loads((out / "summary.json").read_text())
    counted = checkpoint_accuracies(out / LATEST)  # the saved final weights on the test split, counted apart
    for key in ("teacher_acc", "student_acc", "ema_acc", "teacher_top5", "student_top5", "ema_top5"):
        assert summary[key] == pytest.approx(counted[key], abs=1e-9), key
    assert summary["steps"] == 6 and summary["seconds"] > 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["steps"] == 6 and saved["num_labeled"] == 20
    split = json.loads((out / "split.json").read_text())
    assert len(split["labeled"]) == 20
    records = read_metrics(out)
    steps = [r["step"] for r in records if "train/loss/teacher" in r]
    assert steps == [2, 4, 6]
    assert any("eval/ema_acc" in r for r in records)
    assert "train/pseudo/acc" in records[0] and "train/mpl/h" in records[0]
    # 2 labels per class: no validation images, so the result is MPL's rule's (its teacher, of the student's
    # architecture), never the test set's choice; no best-of-time file either.
    assert (out / LATEST).exists() and not (out / "best.pt").exists()
    assert summary["num_val"] == 0 and summary["result"]["role"] == "teacher" and summary["result"]["val_acc"] is None
    assert summary["result"]["test_acc"] == summary["teacher_acc"] and summary["result"]["chosen_by"].startswith("rule")
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert "test accuracy" in capsys.readouterr().out


def test_yaml_sets_defaults_and_flags_win(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("steps: 2\nnum-labeled: 30\nseed: 7\nmode: soft\nlabel_smoothing: 0.1\n")
    out = tmp_path / "run"
    assert cli(*TINY, "--config", str(config), "--seed", "3", "--out", str(out)) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    # From the file: steps, mode, label_smoothing; from flags (TINY sets --num-labeled 20): num_labeled, seed.
    got = (saved["steps"], saved["mode"], saved["label_smoothing"], saved["num_labeled"], saved["seed"])
    assert got == (2, "soft", 0.1, 20, 3)
    assert saved["ema"] == 0.995  # untouched default


@pytest.mark.parametrize(
    ("args", "config_text", "message"),
    [
        (["--lerning-rate", "1"], None, "unrecognized arguments: --lerning-rate"),
        ([], "num_labelled: 10\n", "unknown key 'num_labelled'"),
        (["--num-labeled", "5000"], None, "--num-labeled 5000 exceeds"),
        (["--dataset", "folder", "--data-dir", "/nonexistent/data"], None, "/nonexistent/data"),
        (["--mode", "medium"], None, "invalid choice"),
        (["--steps", "0"], None, "--steps 0 is out of range; use an integer >= 1"),
        ([], "t_lr: .nan\n", "t_lr nan is not finite; use a finite number >= 0"),
    ],
    ids=["unknown-flag", "unknown-key", "too-many-labels", "missing-data", "bad-choice", "bad-steps", "yaml-nan"],
)
def test_bad_input_is_one_line_and_nonzero(tmp_path, capsys, args, config_text, message):
    extra = []
    if config_text is not None:
        (tmp_path / "c.yaml").write_text(config_text)
        extra = ["--config", str(tmp_path / "c.yaml")]
    try:
        code = cli(*TINY, "--steps", "2", "--out", str(tmp_path / "run"), *extra, *args)
    except SystemExit as e:  # argparse exits by itself
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert message.lower() in err.lower(), err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / LATEST).exists()


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(*TINY, "--steps", "2", "--out", str(out)) == 0
    assert cli(*TINY, "--steps", "2", "--out", str(out)) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_refuses_other_options(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(*TINY, "--steps", "2", "--out", str(out)) == 0
    assert main(["train", "--resume", str(out), "--t-lr", "0.1", "--mode", "soft", "--workers", "0"]) == 2
    assert "--resume uses the run's saved config.yaml; drop --mode, --t-lr (only --steps" in capsys.readouterr().err


def test_labels_only_baseline_and_finetune(tmp_path):
    out = tmp_path / "sup"
    labels_only = [a for a in TINY if a not in ("--uda-weight", "1")]  # a UDA weight is refused there
    assert cli(*labels_only, "--steps", "4", "--method", "supervised", "--out", str(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher_acc"] is None and summary["student_acc"] is not None
    before = load_checkpoint(out)["student"]
    assert main(["finetune", str(out), "--steps", "3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finetune_steps"] == 3
    counted = checkpoint_accuracies(out / "finetuned.pt")
    assert summary["finetuned_acc"] == pytest.approx(counted["student_acc"], abs=1e-9)
    assert summary["finetuned_top5"] == pytest.approx(counted["student_top5"], abs=1e-9)
    after = torch.load(out / "finetuned.pt", weights_only=False)["student"]
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    import metapl.core

    real, calls = metapl.core.mpl_update, []

    def diverging_update(*args, **kwargs):  # the 5th update's teacher loss is NaN
        metrics = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 5:
            metrics["loss/teacher"] = torch.tensor(float("nan"))
        return metrics

    monkeypatch.setattr(metapl.core, "mpl_update", diverging_update)
    out = tmp_path / "run"
    code = cli(*TINY, "--steps", "40", "--save-every", "2", "--log-every", "3", "--out", str(out))
    err = capsys.readouterr().err
    assert code == 2
    assert "loss/teacher became nan at step 5" in err and "checkpoint" in err
    assert len(calls) == 6  # stopped at the first sync after the bad step, before any later save
    assert load_checkpoint(out)["step"] == 4


# --------------------------------------------------------------------------------------------------------------
# Exact resume


def _final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / LATEST, weights_only=False)
    return {f"{m}.{k}": v for m in ("teacher", "student", "ema") for k, v in ckpt[m].items()}


def _train_records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("train/time")} for r in read_metrics(run_dir)]


RESUME = [
    *TINY,
    *["--steps", "16", "--save-every", "2", "--deterministic", "--workers", "2", "--pseudo-label", "sample"],
    *["--student-dropout", "0.2", "--baseline-decay", "0.1"],
]


def test_killed_run_resumes_bit_identical(tmp_path):
    full = tmp_path / "full"
    assert cli(*RESUME, "--out", str(full)) == 0

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "metapl", "train", *RESUME, "--out", str(killed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once a mid-run checkpoint exists
        if (killed / LATEST).exists() and 4 <= torch.load(killed / LATEST, weights_only=False)["step"] < 16:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    step = torch.load(killed / LATEST, weights_only=False)["step"]
    assert step < 16
    assert main(["train", "--resume", str(killed)]) == 0

    a, b = _final_params(full), _final_params(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = _train_records(full), _train_records(killed)
    assert [r["step"] for r in rb] == [r["step"] for r in ra]  # appended, no step twice
    assert ra == rb


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / LATEST
    atomic_save({"config": {}, "student": {"w": torch.ones(3)}, "step": 1}, path)

    def die_midway(obj, f):
        f.write(b"partial bytes of a torn checkpoint")
        raise KeyboardInterrupt  # the process dies before the rename

    monkeypatch.setattr(torch, "save", die_midway)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"config": {}, "student": {"w": torch.zeros(3)}, "step": 2}, path)
    monkeypatch.undo()
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["student"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == [LATEST]


@pytest.mark.skipif(not CIFAR_TAR.exists(), reason="../shared/data/cifar10-jpeg.tar.gz not found")
def test_trains_on_the_real_cifar10_copy(tmp_path, cifar10_cache_dir):
    out = tmp_path / "cifar"
    args = [
        "--dataset",
        "cifar10",
        "--data-dir",
        str(CIFAR_TAR),
        "--cache-dir",
        str(cifar10_cache_dir),
        *["--num-labeled", "40", "--batch-size", "4", "--mu", "2", "--steps", "3", "--eval-every", "3"],
        *["--workers", "0", "--no-tensorboard", "--no-progress", "--uda-weight", "1", "--out"],
        str(out),
    ]
    assert cli(*args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["dataset"] == "cifar10"
    for key in ("teacher_acc", "student_acc", "ema_acc"):
        # k correct out of CIFAR-10's 10,000 test images: k / 100 %. (Counting them again here would double the
        # test's time; test_train_writes_every_output recounts a digits run's accuracies.)
        assert summary[key] * 100 == pytest.approx(round(summary[key] * 100), abs=1e-6), key
    ckpt = load_checkpoint(out)
    assert ckpt["num_classes"] == 10 and ckpt["classes"][0] == "airplane" and ckpt["image_size"] == 32


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_bf16_autocast_and_channels_last_train(tmp_path, mode):
    out = tmp_path / "run"
    assert cli(*TINY, "--steps", "3", "--mode", mode, "--amp", "bf16", "--channels-last", "--out", str(out)) == 0
    losses = [r["train/loss/teacher"] for r in read_metrics(out) if "train/loss/teacher" in r]
    assert losses and all(v is not None and abs(v) < 1e3 for v in losses)
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_fp16_on_cpu_is_refused_in_one_line(tmp_path, capsys):
    assert cli(*TINY, "--steps", "2", "--amp", "fp16", "--out", str(tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--amp fp16 needs a CUDA device" in err


def test_soft_mode_and_fixmatch_runs_show_no_warning(tmp_path):
    # In a fresh process, every warning an error: soft mode's first forward-mode derivative used to print PyTorch's
    # "torch.jit.script is deprecated" (its jvp decompositions are scripted on first use).
    one_network = [a for a in TINY if a not in ("--uda-weight", "1")]  # FixMatch refuses a UDA weight
    for args in ([*TINY, "--mode", "soft"], [*one_network, "--method", "fixmatch"]):
        done = subprocess.run(
            [sys.executable, "-W", "error", "-m", "metapl", "train", *args, "--steps", "2"]
            + ["--out", str(tmp_path / args[-1]), "--cache-dir", str(tmp_path / "c")],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")},
        )
        assert done.returncode == 0 and "Warning" not in done.stderr, done.stderr[-2000:]
