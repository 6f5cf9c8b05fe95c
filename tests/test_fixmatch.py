"""``--method fixmatch``: the step against a hand computation of the paper's Eq. 2-4, its mask, its one forward, and
the method in a run (one network: the teacher untouched, the EMA and the result as for the other methods)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metapl.commands.cli import main
from metapl.config.fields import TrainConfig
from metapl.core import fixmatch_step
from metapl.errors import UserError
from metapl.rundir.checkpoint import load_checkpoint

TINY = [
    *["--dataset", "digits", "--num-labeled", "20", "--batch-size", "8", "--mu", "2", "--workers", "0"],
    *["--eval-every", "4", "--log-every", "2", "--save-every", "4", "--no-tensorboard", "--no-progress"],
    *["--device", "cpu"],
]


def _batch():
    g = torch.Generator().manual_seed(0)
    x_l, x_uw, x_us = (torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64) for n in (2, 4, 4))
    return x_l, torch.tensor([0, 2]), x_uw, x_us


def _linear() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[1].weight.mul_(4)  # confident enough that some weak views pass tau and some do not
    return model


def _by_hand(model, x_l, y_l, x_uw, x_us, tau, lam):
    """ℓ_s + λ_u ℓ_u written out image by image (Eq. 2-4), and the mask."""
    probs_uw = F.softmax(model(x_uw), dim=-1).detach()
    log_l, log_us = F.log_softmax(model(x_l), dim=-1), F.log_softmax(model(x_us), dim=-1)
    loss_l = -sum(log_l[b, y_l[b]] for b in range(len(y_l))) / len(y_l)
    mask = [float(probs_uw[b].max() >= tau) for b in range(len(x_uw))]
    loss_u = -sum(mask[b] * log_us[b, probs_uw[b].argmax()] for b in range(len(x_uw))) / len(x_uw)
    return loss_l + lam * loss_u, loss_l, loss_u, mask


def test_loss_mask_and_gradient_equal_the_hand_computation():
    x_l, y_l, x_uw, x_us = _batch()
    model = _linear()
    confidence = F.softmax(model(x_uw), dim=-1).amax(dim=-1).detach()
    tau = float(confidence.sort().values[2])  # the two most confident of four weak views pass
    reference = copy.deepcopy(model)
    loss, loss_l, loss_u, mask = _by_hand(reference, x_l, y_l, x_uw, x_us, tau, lam=0.5)
    assert mask.count(1.0) == 2 and loss_u.item() > 0
    loss.backward()
    expected = {n: p.detach() - 0.1 * p.grad for n, p in reference.named_parameters()}

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = fixmatch_step(model, opt, x_l, y_l, x_uw, x_us, threshold=tau, weight=0.5)
    assert out["loss/student"].item() == pytest.approx(loss.item(), abs=1e-12)
    assert out["loss/student_l"].item() == pytest.approx(loss_l.item(), abs=1e-12)
    assert out["loss/student_u"].item() == pytest.approx(loss_u.item(), abs=1e-12)
    assert out["mask_ratio"].item() == 0.5
    assert out["pseudo/confidence"].item() == pytest.approx(confidence.mean().item(), abs=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=1e-12)
    assert all(not t.requires_grad for t in out.values())


def test_threshold_one_masks_every_image_and_leaves_the_labeled_step():
    x_l, y_l, x_uw, x_us = _batch()
    model, reference = _linear(), _linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = fixmatch_step(model, opt, x_l, y_l, x_uw, x_us, threshold=1.0, weight=1.0, y_u=torch.tensor([1, -1, 0, 2]))
    assert out["mask_ratio"].item() == 0.0 and out["loss/student_u"].item() == 0.0
    F.cross_entropy(reference(x_l), y_l).backward()  # only ℓ_s moves the weights
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), q.detach() - 0.1 * q.grad, rtol=0, atol=1e-12)
    predicted = F.softmax(_linear()(x_uw), dim=-1).argmax(dim=-1)
    known = [(predicted[b] == y).item() for b, y in enumerate([1, -1, 0, 2]) if y >= 0]
    assert out["pseudo/acc"].item() == pytest.approx(sum(known) / 3)


def test_labeled_weak_and_strong_images_share_one_batchnorm_batch():
    x_l, y_l, x_uw, x_us = (t.float() if t.is_floating_point() else t for t in _batch())
    model = nn.Sequential(nn.BatchNorm2d(1, momentum=1.0), nn.Flatten(), nn.Linear(4, 3))
    fixmatch_step(model, torch.optim.SGD(model.parameters(), lr=0.0), x_l, y_l, x_uw, x_us, threshold=0.5, weight=1.0)
    joint = torch.cat([x_l, x_uw, x_us])  # (10, 1, 2, 2)
    torch.testing.assert_close(model[0].running_mean, joint.mean(dim=(0, 2, 3)))


def test_a_fixmatch_run_trains_the_student_alone_and_hands_back_its_ema(tmp_path):
    out = tmp_path / "fm"
    assert main(["train", *TINY, "--steps", "4", "--method", "fixmatch", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher_acc"] is None and summary["steps"] == 4 and "finetuned_acc" not in summary
    assert summary["result"]["role"] == "ema" and summary["result"]["test_acc"] == summary["ema_acc"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss/student_u", "train/mask_ratio", "train/pseudo/acc"} <= set(records[0])
    # The teacher is built (so the student starts as in the other runs of the seed) and never trained.
    start = tmp_path / "start"
    assert main(["train", *TINY, "--steps", "1", "--method", "supervised", "--s-lr", "1e-9", "--out", str(start)]) == 0
    ckpt, untouched = load_checkpoint(out), load_checkpoint(start)
    assert all(torch.equal(ckpt["teacher"][k], untouched["teacher"][k]) for k in ckpt["teacher"])
    assert any(not torch.equal(ckpt["student"][k], untouched["student"][k]) for k in ckpt["student"])
    # Finetuning and export work as for the other methods; its untrained teacher is never exported.
    assert main(["finetune", str(out), "--steps", "2"]) == 0
    assert json.loads((out / "summary.json").read_text())["finetune_steps"] == 2
    assert main(["export", str(out), "--model", "finetuned"]) == 0
    assert json.loads((out / "export" / "finetuned.safetensors.json").read_text())["method"] == "fixmatch"
    assert main(["export", str(out), "--model", "teacher"]) == 2


def test_fixmatch_options_are_idle_with_the_other_methods_and_mpl_options_with_fixmatch():
    with pytest.raises(UserError) as info:
        TrainConfig(method="mpl", fixmatch_threshold=0.9)
    assert str(info.value) == (
        "--fixmatch-threshold 0.9 does nothing with --method mpl (only --method fixmatch reads it); drop "
        "--fixmatch-threshold or use --method fixmatch"
    )
    with pytest.raises(UserError, match=r"^--uda-weight 1.0 does nothing with --method fixmatch \(FixMatch trains"):
        TrainConfig(method="fixmatch", uda_weight=1.0)
    with pytest.raises(UserError, match="^--method fixmatch trains no teacher; drop --teacher-weights"):
        TrainConfig(method="fixmatch", teacher_weights="runs/big")
    cfg = TrainConfig(method="fixmatch", fixmatch_threshold=0.8, fixmatch_weight=2.0)
    assert cfg.schedule().finetune_steps == 0 and cfg.schedule().s_wait_steps == 0
