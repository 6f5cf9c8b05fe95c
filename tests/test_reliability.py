"""Faults and hostile input (issue 11): each ends in one line and a clear exit status, never in a traceback, silent
acceptance, non-finite weights on disk, or lost and mixed-up work. The five reproductions of the issue come first."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import metapl.core
import metapl.training.trainer
from conftest import cli, write_image
from metapl.commands.cli import main
from metapl.core import Batch, MPLConfig, mpl_update
from metapl.data import load_dataset
from metapl.errors import UserError
from metapl.rundir.checkpoint import atomic_save, load_checkpoint, nonfinite_weights
from metapl.rundir.layout import FINETUNED, LATEST
from metapl.training.metrics import read_metrics

# The issue's `T`: 5 steps on digits in a few seconds.
T = [
    *["--steps", "5", "--num-labeled", "50", "--eval-every", "5", "--workers", "0", "--batch-size", "8", "--mu", "2"],
    "--no-progress",
]
QUICK = [*T, "--no-tensorboard", "--device", "cpu"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """One finished run of ``T`` (copied by the tests that change it)."""
    out = tmp_path_factory.mktemp("base") / "base"
    assert main(["train", *QUICK, "--out", str(out)]) == 0
    return out


def write_png(folder: Path, count: int = 1) -> Path:
    for i in range(count):
        write_image(folder / f"img{i}.png", 1, (8, 8), "L")
    return folder


# ----------------------------------------------------------------------------------------------------------------
# The five reproductions of issue 11


@pytest.mark.parametrize(
    ("lr", "message"),
    [
        (
            "1e6",
            "finetuning diverged: the student's weights became non-finite (NaN/inf) with learning rate 1000000.0; "
            f"{FINETUNED} was not written; finetune again with a lower --lr",
        ),
        ("nan", "--finetune-lr nan is not finite; use a finite number > 0"),  # the config layer's range check
    ],
)
def test_repro1_diverged_finetune_fails_and_saves_nothing(copy_of, tmp_path, capsys, lr, message):
    run = copy_of()
    summary_before = (run / "summary.json").read_text()
    assert cli(capsys, "finetune", run, "--steps", "20", "--lr", lr) == (2, f"metapl: error: {message}")
    assert not (run / FINETUNED).exists()
    assert (run / "summary.json").read_text() == summary_before
    code, err = cli(
        capsys, "predict", run, write_png(tmp_path / "img"), "--model", "finetuned", "--output", tmp_path / "p.csv"
    )
    assert code == 2 and f"no {FINETUNED} beside" in err and not (tmp_path / "p.csv").exists()


def test_repro2_divergence_saves_no_poisoned_checkpoint(tmp_path, capsys):
    for name, extra in (("c22", ["--save-every", "2"]), ("c23", [])):
        out = tmp_path / name
        code, err = cli(
            capsys,
            *["train", "--steps", "5", "--num-labeled", "50", "--workers", "0", "--batch-size", "8", "--mu", "2"],
            *["--t-lr", "1e6", "--s-lr", "1e6"],
            *extra,
            *["--eval-every", "2", "--no-progress", "--no-tensorboard", "--out"],
            out,
        )
        assert code == 2
        assert err == (
            "metapl: error: the teacher weights became non-finite (NaN/inf) by step 2; training stopped and no "
            "checkpoint was saved before; lower the learning rates (--t-lr, --s-lr) or set --grad-clip, and start "
            f"again with --out {out} --overwrite"
        )
        assert not (out / LATEST).exists() and not (out / FINETUNED).exists()


def test_repro3_existing_files_are_never_overwritten(tmp_path, capsys, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my own notes\n")
    (mine / "summary.json").write_text("{}\n")
    code, err = cli(capsys, "train", *QUICK, "--out", mine)
    assert code == 2
    assert err == (
        f"metapl: error: --out {mine} is not empty (it holds config.yaml, summary.json); pick another --out, or pass "
        "--overwrite to replace the metapl run files in it"
    )
    assert (mine / "config.yaml").read_text() == "my own notes\n"

    monkeypatch.chdir(tmp_path)
    assert cli(capsys, "train", *QUICK, "--out", "") == (2, "metapl: error: --out '' is empty; use a non-empty string")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_repro3_run_killed_before_its_first_checkpoint(copy_of, capsys):
    killed = copy_of("killed")  # what a run stopped before its first save leaves: no checkpoint.pt
    (killed / LATEST).unlink()
    (killed / "notes.txt").write_text("keep me\n")
    old_metrics = (killed / "metrics.jsonl").read_bytes()
    code, err = cli(capsys, "train", *QUICK, "--out", killed)
    assert code == 2 and err.startswith(f"metapl: error: --out {killed} is not empty") and "--overwrite" in err
    assert (killed / "metrics.jsonl").read_bytes() == old_metrics
    code, err = cli(capsys, "train", "--resume", killed)
    assert code == 2 and err == (
        f"metapl: error: {killed} has no {LATEST} to resume from (stopped before its first save?); start it again "
        f"with metapl train --out {killed} --overwrite and the same options"
    )
    # --overwrite starts afresh: the old records are gone, not mixed with the new ones; other files stay.
    (killed / "metrics.jsonl").write_text('{"step": 99, "train/loss/teacher": 1.0}\n')
    args = [*QUICK, "--steps", "2", "--eval-every", "2", "--seed", "3"]
    assert cli(capsys, "train", *args, "--out", killed, "--overwrite")[0] == 0
    assert [r["step"] for r in read_metrics(killed)] == [2, 2]  # one train record, one eval record
    assert (killed / "notes.txt").read_text() == "keep me\n"
    assert load_checkpoint(killed)["config"]["seed"] == 3


def test_repro4_data_dir_with_digits_is_refused(tmp_path, capsys):
    code, err = cli(capsys, "train", *QUICK, "--data-dir", tmp_path, "--out", tmp_path / "run")
    assert code == 2 and err.startswith(
        f"metapl: error: --dataset digits is bundled with scikit-learn and reads no "
        f"--data-dir ({tmp_path}); to train on that folder pass --dataset folder"
    )
    assert not (tmp_path / "run").exists()


def _idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes() + array.tobytes()


def test_repro4_idx_images_and_labels_of_different_lengths(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n_images, n_labels in (("train", 30, 29), ("t10k", 10, 10)):
        (tmp_path / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(rng.integers(0, 256, (n_images, 28, 28), np.uint8)))
        (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(rng.integers(0, 10, n_labels).astype(np.uint8)))
    with pytest.raises(UserError) as err:
        load_dataset("fashion-mnist", str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert str(err.value) == (
        f"{tmp_path / 'train-images-idx3-ubyte'} holds 30 images but {tmp_path / 'train-labels-idx1-ubyte'} holds 29 "
        "labels; the two files must come from the same Fashion-MNIST copy"
    )


FOLDER = [
    *["--dataset", "folder", "--num-labeled", "6", "--steps", "2", "--eval-every", "2", "--batch-size", "2"],
    *["--mu", "1", "--workers", "0", "--no-progress", "--no-tensorboard", "--device", "cpu"],
]


def test_repro4_resume_after_images_were_added(make_tree, tmp_path, capsys):
    tree = make_tree()
    out = tmp_path / "run"
    assert cli(capsys, "train", *FOLDER, "--data-dir", tree, "--cache-dir", tmp_path / "cache", "--out", out)[0] == 0
    write_image(tree / "train" / "ant" / "new.png", 0, (12, 12), "RGB")
    code, err = cli(capsys, "train", "--resume", out)
    assert code == 2 and err == (
        f"metapl: error: the data changed since {out / 'split.json'} was written (training images: 12 then, 13 now); "
        "the saved split would pick other images: restore the run's data (its data_dir in config.yaml), "
        "or start a new run"
    )


@pytest.mark.parametrize("damage", ["truncated", "garbage", "meta", "edited-meta", "deleted"])
def test_repro5_damaged_cache_entry_is_rebuilt(make_tree, tmp_path, damage, log_lines, caplog):
    tree, cache = make_tree(), tmp_path / "cache"
    first = load_dataset("folder", str(tree), cache_dir=str(cache))
    images = np.array(first.train.images)
    del first
    (entry,) = cache.iterdir()
    victim = entry / "train_images.npy"
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:-100])
    elif damage == "garbage":
        victim.write_bytes(b"\x00garbage" * (victim.stat().st_size // 8) + b"\x00" * (victim.stat().st_size % 8))
    elif damage == "meta":
        (entry / "meta.json").write_text('{"arrays": [')
    elif damage == "edited-meta":
        meta = json.loads((entry / "meta.json").read_text())
        (entry / "meta.json").write_text(json.dumps({**meta, "classes": ["x", "y", "z"]}))
    else:
        victim.unlink()
    caplog.clear()
    again = load_dataset("folder", str(tree), cache_dir=str(cache))
    assert np.array_equal(again.train.images, images)
    damaged = [line for line in log_lines() if "is damaged" in line]
    assert len(damaged) == 1 and damaged[0].startswith(f"cache entry {entry} is damaged (")
    assert damaged[0].endswith("); rebuilding it")
    caplog.clear()
    load_dataset("folder", str(tree), cache_dir=str(cache))  # the rebuilt entry is used as it is
    assert not any("is damaged" in line for line in log_lines()) and [p.name for p in cache.iterdir()] == [entry.name]


# ----------------------------------------------------------------------------------------------------------------
# Non-finite weights


def test_divergence_after_a_save_names_the_finite_checkpoint(tmp_path, capsys, monkeypatch):
    real, calls = metapl.core.mpl_update, []

    def poisoning_update(teacher, *args, **kwargs):  # the 4th update leaves an infinite teacher weight
        metrics = real(teacher, *args, **kwargs)
        calls.append(1)
        if len(calls) == 4:
            with torch.no_grad():
                next(teacher.parameters()).view(-1)[0] = float("inf")
        return metrics

    monkeypatch.setattr(metapl.core, "mpl_update", poisoning_update)
    out = tmp_path / "run"
    code, err = cli(capsys, "train", *QUICK, "--save-every", "2", "--eval-every", "4", "--out", out)
    assert code == 2 and err.startswith(
        f"metapl: error: the teacher weights became non-finite (NaN/inf) by step 4; training stopped and the last "
        f"finite checkpoint, {out / LATEST} (step 2), is kept;"
    )
    assert load_checkpoint(out)["step"] == 2 and nonfinite_weights(load_checkpoint(out)) == []
    assert not (out / FINETUNED).exists()


def _poison(ckpt: dict, role: str) -> dict:
    ckpt = copy.deepcopy(ckpt)
    ckpt[role][next(iter(ckpt[role]))].view(-1)[0] = float("nan")
    return ckpt


def test_eval_predict_finetune_and_resume_refuse_non_finite_checkpoints(copy_of, tmp_path, capsys):
    run = copy_of()
    atomic_save(_poison(load_checkpoint(run), "student"), run / LATEST)
    images = write_png(tmp_path / "img")
    expected = f"{run / LATEST} holds non-finite (NaN/inf) student weights"
    for argv in (
        ["eval", run, "--device", "cpu"],
        ["predict", run, images, "--model", "student", "--output", tmp_path / "p.csv"],
        ["finetune", run, "--steps", "1"],
        ["train", "--resume", run],
    ):
        code, err = cli(capsys, *argv)
        assert code == 2 and err.startswith(f"metapl: error: {expected}"), (argv, err)
    assert not (tmp_path / "p.csv").exists() and not (run / FINETUNED).exists()


# ----------------------------------------------------------------------------------------------------------------
# Damaged run files and checkpoints of other runs


def test_damaged_config_yaml_on_resume_and_finetune(copy_of, capsys):
    run = copy_of()
    for text, reason in (
        (b"steps: [unclosed\n", "while parsing a flow sequence"),
        (b"\xff\xfe not utf-8", "'utf-8' codec can't decode byte 0xff"),
        (b"steps: many\n", "--steps 'many' is not an integer; use an integer >= 1"),
        (b"- a list\n", "not a mapping of option: value"),
    ):
        (run / "config.yaml").write_bytes(text)
        for argv in (["train", "--resume", run], ["finetune", run, "--steps", "1"]):
            code, err = cli(capsys, *argv)
            assert code == 2 and err.startswith(f"metapl: error: {run / 'config.yaml'} is damaged ({reason}"), err
            assert err.endswith("repair it (checkpoint.pt keeps a copy of the run's config under 'config')")


def test_damaged_metrics_on_resume_and_plot(copy_of, capsys):
    run = copy_of()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], '{"step": "x"}', *lines[1:]]) + "\n")
    expected = f"metapl: error: {run / 'metrics.jsonl'} line 2 is damaged (not a record with an integer step)"
    for argv in (["plot", run], ["train", "--resume", run]):
        code, err = cli(capsys, *argv)
        assert code == 2 and err == f"{expected}; delete that line and try again", err
    assert not (run / "curves.png").exists()


def test_damaged_summary_on_finetune_is_reported_before_any_work(copy_of, capsys):
    run = copy_of()
    (run / "summary.json").write_text('{"student_acc": 1')
    code, err = cli(capsys, "finetune", run, "--steps", "1")
    assert code == 2 and err.startswith(f"metapl: error: {run / 'summary.json'} is damaged (")
    assert err.endswith("delete it (it is rewritten) and try again") and not (run / FINETUNED).exists()


def test_eval_of_a_torn_checkpoint(copy_of, capsys):
    run = copy_of()
    (run / LATEST).write_bytes((run / LATEST).read_bytes()[:1000])
    code, err = cli(capsys, "eval", run, "--device", "cpu")
    assert code == 2 and err.startswith(f"metapl: error: cannot read checkpoint {run / LATEST} (")


def test_checkpoint_of_another_class_count_on_resume_and_finetune(copy_of, capsys):
    run = copy_of()
    ckpt = load_checkpoint(run)
    atomic_save({**ckpt, "num_classes": 3, "classes": ["a", "b", "c"]}, run / LATEST)
    for argv in (["train", "--resume", run], ["finetune", run, "--steps", "1"]):
        code, err = cli(capsys, *argv)
        assert code == 2 and err == (
            f"metapl: error: {run / LATEST} was written for 3 classes of 1-channel 8x8 images but this run's data has "
            "10 classes of 1-channel 8x8 images; it belongs to another run: put this run's own checkpoint back, "
            "or start a new run"
        )


def test_split_json_of_another_run_is_refused_on_resume(copy_of, capsys):
    run = copy_of()
    split = json.loads((run / "split.json").read_text())
    split["labeled"][0] += 1  # as if copied from a run with another seed
    (run / "split.json").write_text(json.dumps(split))
    code, err = cli(capsys, "train", "--resume", run)
    assert code == 2 and err.startswith(
        f"metapl: error: split.json beside {run / LATEST} is not the split the checkpoint was trained on"
    )


def test_unlabeled_rest_with_nothing_left(make_tree, tmp_path, capsys):
    tree = make_tree()  # 12 training images
    args = [*FOLDER, "--data-dir", tree, "--cache-dir", tmp_path / "c", "--num-labeled", "12", "--unlabeled", "rest"]
    code, err = cli(capsys, "train", *args, "--out", tmp_path / "run")
    assert code == 2 and err.startswith(
        "metapl: error: --unlabeled rest leaves no unlabeled images: all 12 training images are labeled"
    )


# ----------------------------------------------------------------------------------------------------------------
# Library


@pytest.mark.parametrize("field", ["x_l", "x_uw", "x_us"])
def test_mpl_update_refuses_an_empty_batch_field(field):
    torch.manual_seed(0)
    teacher, student = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (teacher, student)]
    sizes = {"x_l": 2, "x_uw": 4, "x_us": 4, field: 0}
    batch = Batch(
        torch.randn(sizes["x_l"], 4),
        torch.zeros(sizes["x_l"], dtype=torch.long),
        torch.randn(sizes["x_uw"], 4),
        torch.randn(sizes["x_us"], 4),
    )
    before = [p.clone() for p in teacher.parameters()]
    with pytest.raises(ValueError, match=rf"^batch\.{field} is empty \(0 images\)"):
        mpl_update(teacher, student, *opts, batch, MPLConfig())
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
