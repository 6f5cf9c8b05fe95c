"""Reduced Meta Pseudo Labels: the teacher reading stored predictions (``Batch.t_x_*``), the fixed teacher, the
reduced teacher's identity start, and the trainer's ``--method reduced-mpl`` / ``distill`` with its prediction cache."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metapl import Batch, MPLConfig, MPLState, mpl_update
from metapl.commands.cli import main
from metapl.models.reduced import ReducedTeacher

K = 5


def _net(seed: int, width: int = 6) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, K)
    ).double()


def _batch(seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x_l, x_uw = torch.randn(4, 3, 6, 6, generator=g).double(), torch.randn(8, 3, 6, 6, generator=g).double()
    x_us = x_uw + 0.3 * torch.randn(8, 3, 6, 6, generator=g).double()
    return Batch(x_l, torch.randint(0, K, (4,), generator=g), x_uw, x_us)


def _sgd(model: nn.Module, lr: float = 0.5) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr)


def test_reduced_teacher_returns_the_large_teachers_distribution_at_step_zero():
    log_p = torch.log_softmax(torch.randn(32, 10) * 4, dim=1)
    t_r = ReducedTeacher(10, hidden=64)
    torch.testing.assert_close(torch.softmax(t_r(log_p), dim=1), log_p.exp(), rtol=0, atol=1e-6)
    assert sum(p.numel() for p in t_r.parameters()) == 1 + 10 * 64 + 64 + 64 * 10 + 10


@pytest.mark.parametrize(
    "config",
    [MPLConfig(mode="hard", feedback="taylor"), MPLConfig(mode="hard", feedback="dot"), MPLConfig(mode="soft")],
    ids=["taylor", "dot", "soft"],
)
def test_stored_predictions_give_the_update_of_the_composed_teacher(config):
    # The update is unchanged: a reduced teacher over the large teacher's log-probabilities, given as t_x_*, takes the
    # same step as the composition (frozen large teacher -> log_softmax -> reduced teacher) given the images.
    big, batch = _net(1).eval(), _batch()
    for p in big.parameters():
        p.requires_grad_(False)
    t_r = ReducedTeacher(K, hidden=7).double()
    nn.init.normal_(t_r.out.weight, std=0.3)  # away from the identity, so that the teacher's gradient is not trivial
    composed = nn.Sequential(big, nn.LogSoftmax(dim=1), copy.deepcopy(t_r))
    t_start = copy.deepcopy(t_r.state_dict())
    s_a, s_b = _net(2), _net(2)
    with torch.no_grad():
        stored = Batch(*batch[:5], *(F.log_softmax(big(x), dim=1) for x in (batch.x_l, batch.x_uw, batch.x_us)))
    m_a = mpl_update(t_r, s_a, _sgd(t_r), _sgd(s_a), stored, config, MPLState())
    m_b = mpl_update(composed, s_b, _sgd(composed), _sgd(s_b), batch, config, MPLState())
    for a, b in zip(t_r.state_dict().values(), composed[2].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for a, b in zip(s_a.state_dict().values(), s_b.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert not torch.equal(t_r.out.weight, t_start["out.weight"])  # the teacher did learn
    torch.testing.assert_close(m_a["loss/teacher"], m_b["loss/teacher"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_fixed_teacher_is_plain_distillation(mode):
    teacher, batch = _net(1), _batch()
    t_before = copy.deepcopy(teacher.state_dict())
    s_a, s_b = _net(2), _net(2)
    metrics = mpl_update(teacher, s_a, None, _sgd(s_a), batch, MPLConfig(mode=mode))
    # The reference: one SGD step of the student on the teacher's labels of the weak view, nothing else.
    with torch.no_grad():
        t_logits = teacher(batch.x_uw)
    target = t_logits.argmax(1) if mode == "hard" else t_logits.softmax(1)
    loss = F.cross_entropy(s_b(batch.x_us), target)
    opt = _sgd(s_b)
    loss.backward()
    opt.step()
    for a, b in zip(s_a.state_dict().values(), s_b.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t_before.items())
    assert metrics["loss/teacher"] == 0 and metrics["mpl/h"] == 0
    torch.testing.assert_close(metrics["loss/student"], loss.detach().float())


# ----------------------------------------------------------------------------------------------------------------
# The trainer

TINY = [
    *["--dataset", "digits", "--num-labeled", "30", "--batch-size", "8", "--mu", "2", "--workers", "0"],
    *["--threads", "1", "--eval-every", "10", "--log-every", "5", "--no-tensorboard", "--no-progress"],
    *["--device", "cpu", "--steps", "20"],
]


@pytest.fixture(scope="module")
def big_teacher(tmp_path_factory):
    """A labels-only run whose EMA student serves as the large teacher."""
    out = tmp_path_factory.mktemp("big") / "run"
    assert main(["train", *TINY, "--method", "supervised", "--steps", "60", "--ema", "0.9", "--out", str(out)]) == 0
    return out


def distill(weights, out) -> int:
    return main(["train", *TINY, "--method", "distill", "--teacher-weights", str(weights), "--out", str(out)])


def _summary(run) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_distill_starts_and_stays_at_the_large_teacher(big_teacher, tmp_path, capsys):
    out = tmp_path / "d"
    assert distill(big_teacher, out) == 0
    s = _summary(out)
    assert s["large_teacher_acc"] == _summary(big_teacher)["ema_acc"]  # the stored predictions are the EMA's
    assert s["teacher_acc"] == s["large_teacher_acc"]  # a fixed reduced teacher is the identity
    assert "predicting" in capsys.readouterr().out


def test_a_distill_run_shows_no_pytorch_or_numpy_warning(big_teacher, tmp_path, monkeypatch):
    # The fixed teacher's schedule no longer steps without its optimizer (PyTorch: "lr_scheduler.step() before
    # optimizer.step()"), and the reduced teacher's accuracy copies labels that the cache holds read-only (NumPy:
    # "non-writable array"; digits' labels are made read-only here as the cache's memmaps are).
    from metapl.methods import large_teacher

    score = large_teacher.reduced_teacher_accuracy

    def on_read_only_labels(teacher, preds, data, split, device, limit=None):
        data.test.labels.setflags(write=False)
        return score(teacher, preds, data, split, device, limit)

    monkeypatch.setattr(large_teacher, "reduced_teacher_accuracy", on_read_only_labels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert distill(big_teacher, tmp_path / "d") == 0
    assert [str(w.message) for w in caught] == []


def test_reduced_mpl_reuses_the_stored_predictions_and_learns(big_teacher, tmp_path, capsys):
    first = tmp_path / "a"
    assert distill(big_teacher, first) == 0
    capsys.readouterr()
    out = tmp_path / "r"
    assert (
        main(
            [
                "train",
                *TINY,
                *["--method", "reduced-mpl", "--feedback", "cosine", "--t-lr", "0.5", "--teacher-weights"],
                str(big_teacher),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    log = capsys.readouterr().out
    assert "predicting" not in log  # the same data and weights: read back, not recomputed
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert not torch.equal(ckpt["teacher"]["out.weight"], torch.zeros_like(ckpt["teacher"]["out.weight"]))
    assert set(ckpt["teacher"]) == set(ReducedTeacher(10).state_dict())  # the large teacher is not in the run


def test_other_weights_rebuild_the_predictions(big_teacher, tmp_path, capsys):
    other = tmp_path / "other.pt"
    ckpt = torch.load(big_teacher / "checkpoint.pt", weights_only=False)
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt["ema"].items()}, other)
    distill(big_teacher, tmp_path / "a")
    capsys.readouterr()
    assert distill(other, tmp_path / "b") == 0
    assert "predicting" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "reduced-mpl", "--pretrained", "teacher"], "distils a large teacher trained on your classes"),
        (["--method", "distill", "--teacher-weights", "t.pt", "--uda-weight", "1"], "--uda-weight 1.0 does not apply"),
        (["--method", "supervised", "--teacher-weights", "t.pt"], "--method supervised trains no teacher"),
    ],
)
def test_reduced_settings_that_cannot_work_are_one_line(tmp_path, capsys, args, message):
    assert main(["train", *TINY, *args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "x").exists()


def test_a_teacher_of_other_classes_is_refused_for_distillation(tmp_path, capsys):
    from metapl.models import create_model

    five = tmp_path / "five.pt"
    torch.save(create_model("small_cnn", num_classes=5, in_channels=1, image_size=8).state_dict(), five)
    assert distill(five, tmp_path / "x") == 2
    assert "predicts 5 classes but the data has 10" in capsys.readouterr().err


def test_a_killed_reduced_run_resumes_bit_identical(big_teacher, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    args = [
        *TINY,
        *["--method", "reduced-mpl", "--feedback", "dot", "--teacher-weights"],
        str(big_teacher),
        *["--steps", "16", "--save-every", "2", "--deterministic", "--student-dropout", "0.2"],
        *["--augment-on", "device"],
    ]
    full = tmp_path / "full"
    assert main(["train", *args, "--out", str(full)]) == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "metapl", "train", *args, "--out", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ},
    )
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once a mid-run checkpoint exists
        ckpt = killed / "checkpoint.pt"
        if ckpt.exists() and 4 <= torch.load(ckpt, weights_only=False)["step"] < 16:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert main(["train", "--resume", str(killed)]) == 0
    a = torch.load(full / "checkpoint.pt", weights_only=False)
    b = torch.load(killed / "checkpoint.pt", weights_only=False)
    for role in ("teacher", "student", "ema"):
        assert all(torch.equal(a[role][k], b[role][k]) for k in a[role]), role
    assert "finetuned_acc" not in _summary(full)  # the reduced methods finetune only when asked
    assert _summary(full)["result"] == _summary(killed)["result"]
