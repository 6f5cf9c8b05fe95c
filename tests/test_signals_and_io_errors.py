"""Faults and hostile input (issue 11), continued from test_reliability: SIGINT and SIGTERM during a run, and
file-system errors, each ending in one line and a clear exit status."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import metapl.core
import metapl.training.trainer
from conftest import cli
from metapl.errors import UserError
from metapl.rundir.checkpoint import RESUME_KEYS, atomic_save, load_checkpoint
from metapl.rundir.layout import LATEST
from metapl.training.metrics import read_metrics
from metapl.training.process import StopSignals
from test_reliability import QUICK

# ----------------------------------------------------------------------------------------------------------------
# Signals


def test_sigint_saves_the_current_step_and_prints_the_resume_command(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "metapl",
        "train",
        *QUICK,
        *["--steps", "100000", "--eval-every", "100000", "--save-every", "100000", "--log-every", "1", "--out"],
        str(out),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:  # interrupt once training has logged a step
            if (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    step = load_checkpoint(out)["step"]
    assert err.strip() == (
        f"metapl: interrupted by SIGINT at step {step}; saved {out / LATEST}; resume with: metapl train --resume {out}"
    )
    assert step >= 1 and max(r["step"] for r in read_metrics(out)) <= step


def test_sigterm_mid_run_saves_and_the_run_resumes_to_the_end(tmp_path, capsys, monkeypatch):
    real, calls = metapl.core.mpl_update, []

    def update_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives inside the 3rd step: the loop finishes it, then stops
        return real(*args, **kwargs)

    monkeypatch.setattr(metapl.core, "mpl_update", update_then_signal)
    out = tmp_path / "run"
    handler = signal.getsignal(signal.SIGTERM)
    code, err = cli(capsys, "train", *QUICK, "--out", out)
    assert code == 143 and err.startswith("metapl: interrupted by SIGTERM at step 3;")
    assert load_checkpoint(out)["step"] == 3 and set(RESUME_KEYS) <= set(load_checkpoint(out))
    assert signal.getsignal(signal.SIGTERM) == handler  # restored after the loop
    assert cli(capsys, "train", "--resume", out)[0] == 0
    assert len(calls) == 5 and json.loads((out / "summary.json").read_text())["steps"] == 5


def test_a_second_signal_interrupts_at_once():
    handler = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) == handler


# ----------------------------------------------------------------------------------------------------------------
# I/O errors


def test_out_naming_a_file_and_a_config_that_is_not_utf8(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert cli(capsys, "train", *QUICK, "--out", tmp_path / "file") == (
        2,
        f"metapl: error: --out {tmp_path / 'file'} is a file, not a folder; pick another --out",
    )
    (tmp_path / "c.yaml").write_bytes(b"steps: 2\n\xff\n")
    assert cli(capsys, "train", "--config", tmp_path / "c.yaml", "--out", tmp_path / "run") == (
        2,
        f"metapl: error: config file {tmp_path / 'c.yaml'} is not UTF-8 text; save it as UTF-8 YAML",
    )


def test_a_full_disk_names_the_checkpoint_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / LATEST
    atomic_save({"config": {}, "student": {}, "step": 1}, path)

    def disk_full(obj, f):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError) as err:
        atomic_save({"config": {}, "student": {}, "step": 2}, path)
    assert str(err.value) == f"cannot write {path} (No space left on device); free disk space or pick another folder"
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == [LATEST]


def test_any_other_os_error_is_one_line_naming_the_path(tmp_path, capsys, monkeypatch):
    def read_only(*_args, **_kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system", str(tmp_path / "x"))

    monkeypatch.setattr(metapl.training.trainer, "seed_everything", read_only)
    assert cli(capsys, "train", *QUICK, "--out", tmp_path / "run") == (
        2,
        f"metapl: error: cannot access {tmp_path / 'x'} (Read-only file system); the file system is read-only; "
        "pick a writable folder",
    )
