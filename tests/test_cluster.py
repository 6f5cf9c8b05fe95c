"""A shared cluster (issue 20): one writer per run folder, outputs that never overwrite inputs, signals from a
scheduler to the whole process group, resume that checks the config, and save failures as one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import metapl.core
import metapl.rundir.checkpoint
import metapl.training.trainer
from conftest import cli
from metapl.commands.cli import main
from metapl.errors import UserError
from metapl.rundir.checkpoint import atomic_save, load_checkpoint
from metapl.rundir.layout import LATEST, LOCK
from metapl.rundir.lock import run_lock
from metapl.training.metrics import read_metrics

QUICK = [
    *["--steps", "4", "--num-labeled", "50", "--eval-every", "4", "--workers", "0", "--batch-size", "8", "--mu", "2"],
    *["--no-progress", "--no-tensorboard", "--device", "cpu"],
]
HOST = socket.gethostname()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """One finished run of ``QUICK`` (copied by conftest's ``copy_of`` for the tests that change it)."""
    out = tmp_path_factory.mktemp("base") / "base"
    assert main(["train", *QUICK, "--out", str(out)]) == 0
    return out


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not predicate():
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended too early"


# ----------------------------------------------------------------------------------------------------------------
# One writer per run folder


def _in_use(run: Path, holder: str) -> str:
    return (
        f"metapl: error: {run} is in use by {holder}; one run folder takes one writer: wait for it to end (or "
        "stop it), or pick another folder"
    )


def test_two_concurrent_trainers_one_runs_the_other_writes_nothing(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "metapl", "train", *QUICK, "--steps", "60", "--log-every", "1", "--out", str(out)]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (out / LOCK).exists() and (out / LOCK).read_text().strip(), first)
        first.send_signal(signal.SIGSTOP)  # paused, it still holds the lock: no race with a slow second start
        try:
            second = subprocess.run([*cmd, "--seed", "1", "--overwrite"], capture_output=True, text=True, timeout=120)
        finally:
            first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert second.returncode == 2 and second.stderr.strip() == _in_use(out, f"pid {first.pid} on {HOST}: metapl train")
    assert first.returncode == 0, err
    assert [r["step"] for r in read_metrics(out) if "train/loss/teacher" in r] == list(range(1, 61))
    assert json.loads((out / "summary.json").read_text())["seed"] == 0
    assert (out / LOCK).read_text() == ""  # released cleanly


def test_train_resume_and_finetune_are_refused_while_another_process_writes(copy_of, capsys):
    run = copy_of()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with run_lock(run, command="metapl train"):
        holder = f"pid {os.getpid()} on {HOST}: metapl train"
        assert cli(capsys, "train", *QUICK, "--out", run, "--overwrite") == (2, _in_use(run, holder))
        assert cli(capsys, "train", "--resume", run) == (2, _in_use(run, holder))
        assert cli(capsys, "finetune", run, "--steps", "2") == (2, _in_use(run, holder))
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert after.keys() == before.keys() | {LOCK} and all(after[k] == before[k] for k in before)


def test_a_lock_left_by_a_dead_process_is_taken_over_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = "pid 999999 on elsewhere: metapl train"
    note = f"{out / LOCK}: its last holder ({holder}) ended without releasing it; taken over"
    lines = []
    for argv in ([*QUICK, "--out", out], ["--resume", out]):  # a new run into the folder, then its resume
        (out / LOCK).write_text(holder + "\n")  # killed while holding it: the lock is free
        capsys.readouterr()
        assert main(["train", *map(str, argv)]) == 0
        lines += [line for line in capsys.readouterr().out.splitlines() if "taken over" in line]
    assert lines == [note, note]


def test_a_refused_new_run_leaves_no_folder_behind(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = cli(capsys, "train", *QUICK, "--num-labeled", "100000", "--out", out)
    assert code == 2 and "100000" in err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# Save failures


@pytest.mark.parametrize(
    "error, reason",
    [
        (
            RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 0\nframe #0: ..."),
            "torch.save failed: [enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 0); the disk is "
            "probably full: free disk space or pick another folder",
        ),
        (OSError(5, "Input/output error"), "Input/output error); check the path and the disk"),
        (
            PermissionError(13, "Permission denied"),
            "Permission denied); check its permissions or pick a writable folder",
        ),
    ],
)
def test_every_save_failure_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error, reason):
    path = tmp_path / LATEST
    atomic_save({"config": {}, "student": {}, "step": 1}, path)

    def failing(obj, f):
        f.write(b"torn")
        raise error

    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(UserError) as err:
        atomic_save({"config": {}, "student": {}, "step": 2}, path)
    assert str(err.value) == f"cannot write {path} ({reason}"
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == [LATEST]


def test_a_full_disk_at_a_later_save_of_a_run(tmp_path, capsys, monkeypatch):
    real, calls = torch.save, []

    def full_after_the_first(obj, f):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real(obj, f)

    monkeypatch.setattr(metapl.rundir.checkpoint.torch, "save", full_after_the_first)
    out = tmp_path / "run"
    code, err = cli(capsys, "train", *QUICK, "--save-every", "2", "--out", out)
    assert code == 2 and err == (
        f"metapl: error: cannot write {out / LATEST} (torch.save failed: [enforce fail at inline_container.cc:672] . "
        "unexpected pos 64 vs 0); the disk is probably full: free disk space or pick another folder"
    )
    monkeypatch.undo()
    assert load_checkpoint(out)["step"] == 2


# ----------------------------------------------------------------------------------------------------------------
# Outputs never overwrite inputs


@pytest.mark.parametrize(
    "name",
    ["checkpoint.pt", "config.yaml", "split.json", "metrics.jsonl", "summary.json", "finetuned.pt", LOCK],
)
def test_eval_output_onto_a_run_file_is_refused(copy_of, capsys, name):
    run = copy_of()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    code, err = cli(capsys, "eval", run, "--output", run / name)
    what = f"the run's {name} in {run}"
    if name == LATEST:  # what eval reads is named as such
        what = f"the checkpoint {run / name}, which this command reads"
    assert (code, err) == (2, f"metapl: error: --output {run / name} would overwrite {what}; name another output file")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_eval_may_write_its_own_files_and_refuses_any_checkpoint(copy_of, tmp_path, capsys):
    run = copy_of()
    assert cli(capsys, "eval", run / LATEST, "--output", run / "checkpoint.eval.json")[0] == 0
    assert json.loads((run / "checkpoint.eval.json").read_text())["checkpoint"] == str(run / LATEST)
    other = tmp_path / "elsewhere.pt"
    other.write_bytes(b"any checkpoint")
    assert cli(capsys, "eval", run, "--output", other) == (
        2,
        f"metapl: error: --output {other} would overwrite a checkpoint; name another output file",
    )
    assert other.read_bytes() == b"any checkpoint"


def test_predict_output_onto_an_input_image_a_checkpoint_or_a_run_file(copy_of, tmp_path, capsys):
    from conftest import write_image

    run = copy_of()
    images = tmp_path / "images"
    for i in range(2):
        write_image(images / f"img{i}.png", 1, (8, 8), "L")
    image = images / "img1.png"
    kept = image.read_bytes()
    refusals = {
        image: f"the input image {image}, which this command reads",
        run / LATEST: f"the checkpoint {run / LATEST}, which this command reads",
        run / "config.yaml": f"the run's config.yaml in {run}",
        run / "summary.json": f"the run's summary.json in {run}",
    }
    for output, what in refusals.items():
        argv = ["predict", run / LATEST, image if output != run / "config.yaml" else images, "--output", output]
        assert cli(capsys, *argv) == (
            2,
            f"metapl: error: --output {output} would overwrite {what}; name another output file",
        )
    assert cli(capsys, "predict", run / LATEST, images, "--output", images / "img0.png")[1].endswith(
        f"would overwrite the input image {images / 'img0.png'}, which this command reads; name another output file"
    )
    assert image.read_bytes() == kept and load_checkpoint(run)["step"] == 4
    assert cli(capsys, "predict", run, images, "--output", tmp_path / "p.csv")[0] == 0


def test_plot_output_onto_a_run_file_other_than_its_png(copy_of, capsys):
    run = copy_of()
    metrics = (run / "metrics.jsonl").read_bytes()
    assert cli(capsys, "plot", run, "--output", run / "metrics.jsonl") == (
        2,
        f"metapl: error: --output {run / 'metrics.jsonl'} would overwrite the run's metrics.jsonl in {run}; name "
        "another output file",
    )
    assert (run / "metrics.jsonl").read_bytes() == metrics
    assert cli(capsys, "plot", run, "--output", run / "curves.png")[0] == 0


# ----------------------------------------------------------------------------------------------------------------
# Resume checks the config; --steps extends a run


def test_resume_refuses_an_edited_config_yaml_naming_the_keys(copy_of, capsys):
    run = copy_of()
    text = (run / "config.yaml").read_text()
    edited = text.replace("mode: hard", "mode: soft").replace("t_lr: 0.05", "t_lr: 0.5")
    edited = edited.replace("num_labeled: 50", "num_labeled: 60")
    (run / "config.yaml").write_text(edited)
    assert cli(capsys, "train", "--resume", run) == (
        2,
        f"metapl: error: {run / 'config.yaml'} differs from the config the checkpoint was trained with in "
        "num_labeled 60 (trained with 50), t_lr 0.5 (trained with 0.05), mode 'soft' (trained with 'hard'); these "
        "change the training: put the saved values back, or start a new run with another --out (on resume only "
        "--steps and the runtime options may change)",
    )
    assert cli(capsys, "finetune", run, "--steps", "1")[1].startswith(f"metapl: error: {run / 'config.yaml'} differs")


def test_resume_takes_runtime_options_as_flags_and_edits(copy_of, capsys):
    run = copy_of()
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("eval_batch_size: 512", "eval_batch_size: 100"))
    assert cli(
        capsys,
        "train",
        "--resume",
        run,
        *["--workers", "1", "--threads", "1", "--device", "cpu", "--log-every", "3", "--tensorboard"],
    ) == (0, "")
    saved = (run / "config.yaml").read_text()
    assert "workers: 1\n" in saved and "log_every: 3\n" in saved and "eval_batch_size: 100\n" in saved
    assert cli(capsys, "train", "--resume", run, "--steps", "3") == (
        2,
        f"metapl: error: --steps 3 does not extend the run in {run}: it has trained 4 steps; give more",
    )


def _weights(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, weights_only=False)
    return {f"{m}.{k}": v for m in ("teacher", "student", "ema") for k, v in ckpt[m].items()}


def test_extending_a_finished_run_follows_the_longer_schedule_and_resumes_exactly(tmp_path, capsys, monkeypatch):
    from metapl.core import warmup_cosine

    full = tmp_path / "full"
    assert cli(capsys, "train", *QUICK, "--deterministic", "--t-warmup-steps", "2", "--out", full)[0] == 0
    stopped = Path(shutil.copytree(full, tmp_path / "stopped"))
    assert cli(capsys, "train", "--resume", full, "--steps", "12", "--log-every", "1") == (0, "")

    real, calls = metapl.core.mpl_update, []

    def update_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # inside step 7: the loop finishes it, saves and stops
        return real(*args, **kwargs)

    monkeypatch.setattr(metapl.core, "mpl_update", update_then_signal)
    code, err = cli(capsys, "train", "--resume", stopped, "--steps", "12", "--log-every", "1")
    assert code == 143 and err.startswith("metapl: interrupted by SIGTERM at step 7;")
    assert cli(capsys, "train", "--resume", stopped) == (0, "")  # no --steps: the checkpoint says 12

    a, b = _weights(full / LATEST), _weights(stopped / LATEST)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(
        torch.load(full / "finetuned.pt", weights_only=False)["student"]["fc.weight"],
        torch.load(stopped / "finetuned.pt", weights_only=False)["student"]["fc.weight"],
    )
    plan = warmup_cosine(total_steps=12, warmup_steps=2)
    lrs = {r["step"]: r["train/lr/teacher"] for r in read_metrics(full) if "train/lr/teacher" in r}
    assert lrs == {4: 0.0, **{s: 0.05 * plan(s) for s in range(5, 13)}}
    assert json.loads((full / "summary.json").read_text())["finetune_steps"] == 1  # a tenth of 12


# ----------------------------------------------------------------------------------------------------------------
# A signal during eval (signals during training and finetuning: test_cluster_signals.py)


def test_sigterm_during_eval_is_one_line_and_status_143(copy_of, capsys, monkeypatch):
    import metapl.commands.inference

    def evaluate_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM was not handled")

    run = copy_of()
    monkeypatch.setattr(metapl.commands.inference, "evaluate_report", evaluate_then_signal)
    handler = signal.getsignal(signal.SIGTERM)
    assert cli(capsys, "eval", run) == (143, "metapl: interrupted; nothing was saved since the last checkpoint")
    assert signal.getsignal(signal.SIGTERM) == handler and not (run / "eval.json").exists()
