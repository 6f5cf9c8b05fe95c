"""A shared cluster (issue 20), continued from test_cluster: signals from a scheduler to the whole process group,
loader workers included, during training and finetuning; the stopped run resumes where it stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from conftest import cli
from metapl.commands.cli import main
from metapl.rundir.checkpoint import load_checkpoint
from metapl.rundir.layout import LATEST
from metapl.training.metrics import read_metrics
from test_cluster import QUICK, _wait_for, _weights


def _signal_group_when(cmd: list[str], ready, signum: int = signal.SIGTERM) -> tuple[int, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(ready, proc)
        os.killpg(proc.pid, signum)  # as SLURM's scancel: every process of the job, loader workers too
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, err.strip()


def _has_record(run: Path, key: str):
    def ready() -> bool:
        path = run / "metrics.jsonl"
        return path.exists() and key in path.read_text()

    return ready


def test_sigterm_to_the_process_group_during_training_saves_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "metapl",
        "train",
        *QUICK,
        *["--workers", "1", "--steps", "100000", "--eval-every", "100000", "--save-every", "100000"],
        *["--log-every", "1", "--out"],
        str(out),
    ]
    code, err = _signal_group_when(cmd, _has_record(out, "train/loss/teacher"))
    step = load_checkpoint(out)["step"]
    assert (code, err) == (
        143,
        f"metapl: interrupted by SIGTERM at step {step}; saved {out / LATEST}; resume with: metapl train "
        f"--resume {out}",
    )
    assert step >= 1 and max(r["step"] for r in read_metrics(out)) <= step
    assert cli(capsys, "train", "--resume", out, "--steps", step + 2) == (0, "")  # shortened to end the test
    assert json.loads((out / "summary.json").read_text())["steps"] == step + 2


def test_sigint_to_the_process_group_during_finetuning_saves_its_progress(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "metapl",
        "train",
        *QUICK,
        *["--workers", "1", "--steps", "2", "--finetune-steps", "100000", "--eval-every", "100000", "--log-every", "1"],
        "--out",
        str(out),
    ]
    code, err = _signal_group_when(cmd, _has_record(out, "finetune/loss"), signal.SIGINT)
    done = load_checkpoint(out / "finetune-progress.pt")["done"]
    assert (code, err) == (
        130,
        f"metapl: interrupted by SIGINT in finetuning at step {done} of 100000; saved "
        f"{out / 'finetune-progress.pt'}; resume with: metapl train --resume {out}",
    )
    assert done >= 1 and load_checkpoint(out)["step"] == 2


def _finetune_stopping_at(monkeypatch, call: int) -> None:
    import metapl.training.phases

    real, calls = metapl.training.phases.supervised_step, []

    def step_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)  # inside this finetuning step: finished, saved, then stopped
        return real(*args, **kwargs)

    monkeypatch.setattr(metapl.training.phases, "supervised_step", step_then_signal)


def _records(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("train/time")} for r in read_metrics(run)]


def test_a_stopped_finetuning_continues_where_it_stopped_bit_identical(tmp_path, capsys, monkeypatch):
    argv = [*QUICK, "--deterministic", "--finetune-steps", "6", "--log-every", "1", "--eval-every", "2"]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    assert cli(capsys, "train", *argv, "--out", full)[0] == 0
    _finetune_stopping_at(monkeypatch, 3)
    assert cli(capsys, "train", *argv, "--out", stopped) == (
        143,
        f"metapl: interrupted by SIGTERM in finetuning at step 3 of 6; saved {stopped / 'finetune-progress.pt'}; "
        f"resume with: metapl train --resume {stopped}",
    )
    monkeypatch.undo()
    assert cli(capsys, "train", "--resume", stopped) == (0, "")
    a, b = _weights(full / "finetuned.pt"), _weights(stopped / "finetuned.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _records(full) == _records(stopped) and not (stopped / "finetune-progress.pt").exists()

    # metapl finetune stopped the same way continues with the command it prints
    _finetune_stopping_at(monkeypatch, 2)
    assert cli(capsys, "finetune", full, "--steps", "4") == (
        143,
        f"metapl: interrupted by SIGTERM in finetuning at step 2 of 4; saved {full / 'finetune-progress.pt'}; "
        f"resume with: metapl finetune {full} --steps 4 --lr 0.01",
    )
    monkeypatch.undo()
    assert main(["finetune", str(full), "--steps", "4", "--lr", "0.01"]) == 0
    assert "finetuning continues at step 2 of 4" in capsys.readouterr().out
