"""``--val-labeled``: a validation split carved from the labeled images, evaluated beside the test set, choosing
the model the run hands back (never the test set), and carried into finetuning."""

from __future__ import annotations

import json

import torch

from metapl.commands.cli import main
from metapl.data import load_dataset
from metapl.models import create_model
from metapl.rundir.checkpoint import load_checkpoint
from metapl.training.evaluation import eval_loaders, evaluate
from metapl.training.metrics import read_metrics

TINY = [
    *["--dataset", "digits", "--num-labeled", "60", "--val-labeled", "20", "--batch-size", "8", "--mu", "2"],
    *["--workers", "0", "--eval-every", "2", "--log-every", "2", "--save-every", "6", "--no-tensorboard"],
    *["--no-progress", "--uda-weight", "1", "--device", "cpu", "--steps", "6", "--finetune-steps", "2"],
    *["--eval-limit", "40"],
]


def test_validation_split_is_evaluated_and_chooses_the_result(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    split = json.loads((out / "split.json").read_text())
    assert len(split["labeled"]) == 40 and len(split["val"]) == 20
    assert not set(split["val"]) & set(split["labeled"]) and not set(split["val"]) & set(split["unlabeled"])

    evals = [r for r in read_metrics(out) if "eval/val_ema_acc" in r and r["step"] <= 6]
    assert [r["step"] for r in evals] == [2, 4, 6]
    summary = json.loads((out / "summary.json").read_text())
    # The result is the final model with the best validation accuracy (a tie to the earlier of finetuned, ema,
    # student, teacher), whatever the test accuracies say.
    vals = {role: summary[f"val_{role}_acc"] for role in ("finetuned", "ema", "student", "teacher")}
    expected = next(role for role, acc in vals.items() if acc == max(vals.values()))
    assert summary["result"]["role"] == expected and summary["result"]["val_acc"] == max(vals.values())
    assert summary["result"]["chosen_by"] == "validation accuracy on 20 images"
    assert summary["val_teacher_acc"] == evals[-1]["eval/val_teacher_acc"]
    assert "validation accuracy teacher" in capsys.readouterr().out
    # --eval-limit 40: test accuracies are counts out of the first 40 test images.
    assert all(round(summary[k] * 40 / 100, 6).is_integer() for k in ("teacher_acc", "student_acc", "ema_acc"))

    # The logged validation accuracy is the saved student's accuracy on exactly the held-out images.
    ckpt = load_checkpoint(out / "checkpoint.pt")
    data = load_dataset("digits", None)
    split_obj = type("S", (), {"val": torch.tensor(split["val"]).numpy()})()
    loaders = eval_loaders(data, split_obj, 512)
    student = create_model("small_cnn", num_classes=10, in_channels=1, image_size=8)
    student.load_state_dict(ckpt["student"])
    assert evaluate({"s": student}, loaders["val_"], torch.device("cpu"))["s_acc"] == summary["val_student_acc"]
    # Finetuning reports the finetuned student on the validation images too.
    assert summary["finetune_steps"] == 2 and summary["val_finetuned_acc"] is not None
