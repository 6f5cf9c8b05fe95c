"""``metapl eval`` and ``metapl predict``: models rebuilt from checkpoints, CSV/JSON outputs, one-line errors."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import count_accuracies
from metapl.commands.cli import main
from metapl.commands.inference import find_images, format_table, run_eval, run_predict
from metapl.config.fields import TrainConfig
from metapl.data import load_dataset, make_eval_loader
from metapl.errors import UserError
from metapl.models import create_model
from metapl.rundir.checkpoint import atomic_save, load_checkpoint
from metapl.rundir.layout import save_config
from metapl.rundir.rebuild import build_model

CLASSES = [f"c{i}" for i in range(10)]
MEAN, STD = [0.3], [0.4]


def _small(num_classes: int, seed: int):
    torch.manual_seed(seed)
    return create_model("small_cnn", num_classes=num_classes, in_channels=1, image_size=8)


def write_fake_run(run_dir, *, num_classes=10, weights_classes=None, ema=True, method="mpl"):
    """A finished run directory with a real checkpoint of three small_cnn models for scikit-learn's 8x8 digits, its
    config and a summary whose result is the EMA student (the student without an EMA)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(
        dataset="digits", out=str(run_dir), cache_dir=str(run_dir / "cache"), ema=0.995 if ema else 0.0, method=method
    )
    n = weights_classes or num_classes
    teacher, student, ema_model = _small(n, 0), _small(n, 1), _small(n, 2)
    # Non-default BatchNorm statistics, so eval mode (running stats) and train mode (batch stats) differ.
    for m in (teacher, student, ema_model):
        for bn in (mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    ckpt = {
        "config": cfg.to_dict(),
        "step": 7,
        "num_classes": num_classes,
        "classes": CLASSES[:num_classes],
        "in_channels": 1,
        "image_size": 8,
        "mean": MEAN,
        "std": STD,
        "teacher": teacher.state_dict(),
        "student": student.state_dict(),
        "ema": ema_model.state_dict() if ema else None,
    }
    atomic_save(ckpt, run_dir / "checkpoint.pt")
    save_config(cfg, run_dir / "config.yaml")
    role = "ema" if ema else "student"
    result = {"role": role, "file": "checkpoint.pt", "network": role, "chosen_by": "rule", "val_acc": None}
    (run_dir / "summary.json").write_text(json.dumps({"result": {**result, "test_acc": None}}))
    return {"teacher": teacher.eval(), "student": student.eval(), "ema": ema_model.eval()}


def write_images(folder, count, *, seed=0, size=8, mode="L"):
    """Random images; returns their paths and the uint8 arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths, arrays = [], []
    for i in range(count):
        shape = (size, size) if mode == "L" else (size, size, 3)
        a = rng.integers(0, 256, shape, dtype=np.uint8)
        p = folder / f"img{i}.png"
        Image.fromarray(a).save(p)  # (H, W) -> L, (H, W, 3) -> RGB
        paths.append(p)
        arrays.append(a)
    return paths, arrays


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def expected_probs(model, array):
    x = (torch.from_numpy(array).float()[None, None] / 255.0 - MEAN[0]) / STD[0]  # (1, 1, H, W)
    with torch.no_grad():
        return model(x).softmax(dim=1)[0]


# ----------------------------------------------------------------------------------------------------------------
# eval


def test_eval_writes_json_and_table(tmp_path, log_lines):
    models = write_fake_run(tmp_path / "run")
    result = run_eval(tmp_path / "run", device="cpu")
    lines = log_lines()
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved == result
    # The model objects themselves on the digits test split (the run's seed 0), normalised with the checkpoint's
    # mean and std, in batches of the config's size: the same logits, so exactly the same figures.
    test = load_dataset("digits", None, cache_dir=str(tmp_path / "run" / "cache")).test
    loader = make_eval_loader(test, mean=MEAN, std=STD, batch_size=TrainConfig(dataset="digits").eval_batch_size)
    expected = count_accuracies(models, loader)
    for key, value in expected.items():
        assert saved[key] == pytest.approx(value, abs=1e-9), key
    assert saved["num_test"] == 500 and saved["dataset"] == "digits" and saved["step"] == 7
    table = "\n".join(lines)
    assert "top-1 %" in table and "top-5 %" in table and f"{saved['ema_acc']:.2f}" in table


def test_eval_of_a_trained_run_matches_its_summary(tmp_path):
    """End to end through the CLI: the rebuilt models on the reloaded test split give the trainer's own numbers."""
    run = tmp_path / "run"
    argv = [
        *["train", "--dataset", "digits", "--steps", "2", "--eval-every", "2", "--batch-size", "4", "--mu", "1"],
        *["--num-labeled", "20", "--workers", "0", "--no-tensorboard", "--no-progress", "--out"],
        str(run),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert main(argv) == 0
    assert main(["eval", str(run), "--device", "cpu"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    result = json.loads((run / "eval.json").read_text())
    for key in ("teacher_acc", "student_acc", "ema_acc", "teacher_top5", "student_top5", "ema_top5"):
        assert result[key] == pytest.approx(summary[key], abs=1e-6), key

    # predict on the same run, via the CLI, with its real class names and normalisation
    paths, _ = write_images(tmp_path / "imgs", 2)
    out = tmp_path / "pred.csv"
    # eval's headline and predict's default are the run's result (here the rule's: no validation images).
    assert result["result"] == summary["result"]["role"] == "teacher"
    assert main(["predict", str(run), str(tmp_path / "imgs"), "--output", str(out)]) == 0
    rows = read_csv(out)
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    assert all(r["class"] in [str(d) for d in range(10)] for r in rows)


def test_predict_over_the_test_images_reproduces_eval(make_tree, tmp_path):
    """predict decodes and normalises as training and eval do: over a folder run's test images (RGB PNGs and
    grayscale JPEGs of three sizes, resized to 12 with JPEG draft decoding), its predictions give eval's confusion
    matrix and accuracy exactly."""
    tree = make_tree(mode="mixed", per_class=6, sizes=((48, 40), (30, 36), (12, 16)))
    run = tmp_path / "run"
    argv = [
        "train",
        "--dataset",
        "folder",
        "--data-dir",
        str(tree),
        *["--image-size", "12", "--steps", "2", "--eval-every", "2", "--batch-size", "3", "--mu", "1"],
        *["--num-labeled", "6", "--workers", "0", "--no-tensorboard", "--no-progress", "--finetune-steps", "0"],
        "--out",
        str(run),
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    assert main(argv) == 0
    assert main(["eval", str(run), "--device", "cpu"]) == 0
    result = json.loads((run / "eval.json").read_text())
    out = tmp_path / "pred.csv"
    assert main(["predict", str(run), str(tree / "test"), "--output", str(out), "--device", "cpu"]) == 0
    rows = read_csv(out)
    classes = result["classes"]
    matrix = [[0] * len(classes) for _ in classes]
    for r in rows:  # true class: the image's folder
        matrix[classes.index(Path(r["path"]).parent.name)][classes.index(r["class"])] += 1
    assert len(rows) == result["num_test"] == 18
    assert matrix == result["models"][result["result"]]["confusion_matrix"]  # predict's model: the run's result
    correct = sum(matrix[i][i] for i in range(len(classes)))
    role = result["result"]
    assert 100.0 * correct / len(rows) == result[f"{role}_acc"]
    # Image by image, the probabilities of the result (here the teacher) over eval's own loader of the test split.
    ckpt = load_checkpoint(run / "checkpoint.pt")
    test = load_dataset("folder", str(tree), image_size=12, cache_dir=str(tmp_path / "c")).test
    with torch.no_grad():
        model = build_model(ckpt, role)
        loader = make_eval_loader(test, mean=ckpt["mean"], std=ckpt["std"], batch_size=64)
        probs = torch.cat([model(x).softmax(1) for x, _ in loader])
    expected = probs.max(1).values.tolist()
    # The CSV rounds to 4 decimals (a last digit may flip on a float's last bit); another decoder misses by more.
    assert max(abs(float(r["probability"]) - p) for r, p in zip(rows, expected, strict=True)) <= 5.1e-5


def test_eval_of_a_pt_file_writes_beside_it_and_skips_missing_ema(tmp_path):
    write_fake_run(tmp_path / "run", ema=False)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    result = run_eval(ckpt, device="cpu")
    assert (tmp_path / "run" / "checkpoint.eval.json").exists()
    assert not (tmp_path / "run" / "eval.json").exists()
    assert "ema_acc" not in result and {"teacher_acc", "student_acc"} <= set(result)


def test_eval_of_a_labels_only_run_reports_no_teacher(tmp_path):
    write_fake_run(tmp_path / "run", method="supervised")
    out = tmp_path / "elsewhere" / "e.json"
    result = run_eval(tmp_path / "run", output=out, device="cpu")
    assert out.exists() and "teacher_acc" not in result and "student_acc" in result


def test_eval_weights_that_do_not_fit_the_config(tmp_path):
    # The checkpoint claims 10 classes, but its weights were made for 5 (as if hand-edited).
    write_fake_run(tmp_path / "run", num_classes=10, weights_classes=5)
    with pytest.raises(UserError, match=r"\(5, 64\).*\(10, 64\)") as err:
        run_eval(tmp_path / "run", device="cpu")
    assert "\n" not in str(err.value)


def test_eval_dataset_with_another_class_count(tmp_path):
    write_fake_run(tmp_path / "run", num_classes=5)  # consistent checkpoint, but digits has 10 classes
    with pytest.raises(UserError, match=r"10 classes.* 5\b") as err:
        run_eval(tmp_path / "run", device="cpu")
    assert "\n" not in str(err.value)


def test_eval_missing_checkpoint_is_a_user_error(tmp_path):
    assert main(["eval", str(tmp_path / "nothing")]) == 2


def test_build_model_reports_missing_and_unexpected_tensors():
    ckpt = {
        "config": TrainConfig().to_dict(),
        "num_classes": 10,
        "classes": CLASSES,
        "in_channels": 1,
        "image_size": 8,
        "mean": MEAN,
        "std": STD,
    }
    state = _small(10, 0).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["fc.bias"]
    ckpt["student"] = state
    with pytest.raises(UserError, match="1 tensors missing \\(fc.bias\\), 1 unexpected tensors \\(extra.weight\\)"):
        build_model(ckpt, "student")


def test_format_table_is_aligned():
    table = format_table({"teacher_acc": 9.6, "teacher_top5": 52.2, "ema_acc": 100.0, "ema_top5": 100.0})
    lines = table.splitlines()
    assert len(lines) == 3 and len({len(line) for line in lines}) == 1
    assert lines[1].split() == ["teacher", "9.60", "52.20"]


# ----------------------------------------------------------------------------------------------------------------
# predict


def test_predict_writes_one_row_per_image_with_sorted_top_k(tmp_path, log_lines):
    models = write_fake_run(tmp_path / "run")
    gray, arrays = write_images(tmp_path / "imgs", 3)
    rgb, _ = write_images(tmp_path / "imgs" / "nested" / "deeper", 2, seed=1, size=20, mode="RGB")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")  # not an image extension: skipped in folders
    out = tmp_path / "out" / "pred.csv"
    rows = run_predict(tmp_path / "run", [tmp_path / "imgs"], output=out, top_k=4, device="cpu")
    lines = log_lines()
    csv_rows = read_csv(out)
    assert len(csv_rows) == len(rows) == 5
    assert {r["path"] for r in csv_rows} == {str(p) for p in gray + rgb}
    assert list(csv_rows[0]) == ["path", "class", "probability", "top_k"]
    for r in csv_rows:
        pairs = [item.split(":") for item in r["top_k"].split(";")]
        probs = [float(p) for _, p in pairs]
        assert len(pairs) == 4 and all(c in CLASSES for c, _ in pairs)
        assert probs == sorted(probs, reverse=True)
        assert r["class"] == pairs[0][0] and float(r["probability"]) == probs[0]
    assert "5 images" in lines[-1] and str(out) in lines[-1]

    # Same preprocessing as training (scale to [0, 1], normalise with the checkpoint's mean/std), EMA model by default.
    for path, array in zip(gray, arrays):
        row = next(r for r in rows if r["path"] == str(path))
        want = expected_probs(models["ema"], array)
        assert row["class"] == CLASSES[int(want.argmax())]
        assert row["probability"] == pytest.approx(float(want.max()), abs=1e-5)
        top_p, top_i = want.topk(4)
        pairs = [item.split(":") for item in next(r for r in csv_rows if r["path"] == str(path))["top_k"].split(";")]
        assert [c for c, _ in pairs] == [CLASSES[i] for i in top_i.tolist()]
        assert [float(p) for _, p in pairs] == pytest.approx(top_p.tolist(), abs=5e-5)  # written with 4 decimals


def test_predict_picks_the_requested_model_and_converts_channels(tmp_path):
    models = write_fake_run(tmp_path / "run")
    _, arrays = write_images(tmp_path / "imgs", 1)
    rgb = tmp_path / "imgs" / "rgb.png"  # the same image as RGB: converting to L must give the same pixels back
    Image.fromarray(np.repeat(arrays[0][..., None], 3, axis=2)).save(rgb)
    rows = run_predict(
        tmp_path / "run" / "checkpoint.pt",
        [tmp_path / "imgs" / "img0.png", rgb],
        model="teacher",
        output=tmp_path / "p.csv",
        top_k=20,
        device="cpu",
    )
    want = expected_probs(models["teacher"], arrays[0])
    assert len(rows[0]["top_k"]) == 10  # top_k capped at the number of classes
    for row in rows:
        got = torch.tensor([p for _, p in sorted(row["top_k"], key=lambda cp: CLASSES.index(cp[0]))])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_predict_ema_falls_back_to_student_with_a_warning(tmp_path, log_lines):
    models = write_fake_run(tmp_path / "run", ema=False)
    _, arrays = write_images(tmp_path / "imgs", 1)
    out = tmp_path / "p.csv"
    rows = run_predict(tmp_path / "run", [tmp_path / "imgs"], model="ema", output=out, device="cpu")
    assert any(line.startswith("warning: ") and "student" in line for line in log_lines())
    assert rows[0]["probability"] == pytest.approx(float(expected_probs(models["student"], arrays[0]).max()), abs=1e-5)


def test_predict_finetuned_reads_finetuned_pt(tmp_path):
    write_fake_run(tmp_path / "run")
    write_images(tmp_path / "imgs", 1)
    with pytest.raises(UserError, match="finetuned.pt"):
        run_predict(tmp_path / "run", [tmp_path / "imgs"], model="finetuned", output=tmp_path / "p.csv")
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    finetuned = _small(10, 3).eval()
    ckpt = {**copy.deepcopy(ckpt), "student": finetuned.state_dict()}
    atomic_save(ckpt, tmp_path / "run" / "finetuned.pt")
    rows = run_predict(
        tmp_path / "run",
        [tmp_path / "imgs"],
        model="finetuned",
        output=tmp_path / "p.csv",
        device="cpu",
    )
    array = np.array(Image.open(tmp_path / "imgs" / "img0.png"))
    assert rows[0]["probability"] == pytest.approx(float(expected_probs(finetuned, array).max()), abs=1e-5)


def test_predict_errors_are_one_line_user_errors(tmp_path):
    write_fake_run(tmp_path / "run")
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken" / "bad.png"
    broken.parent.mkdir()
    broken.write_bytes(b"\x89PNG definitely not a png")
    cases = [
        ([tmp_path / "missing.png"], "does not exist"),
        ([tmp_path / "empty"], "no images found"),
        ([tmp_path / "broken"], "bad.png"),
    ]
    for paths, message in cases:
        with pytest.raises(UserError, match=message) as err:
            run_predict(tmp_path / "run", paths, output=tmp_path / "p.csv", device="cpu")
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="top-k"):
        run_predict(tmp_path / "run", [tmp_path / "broken"], top_k=0, output=tmp_path / "p.csv")
    assert not (tmp_path / "p.csv").exists()
    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "empty")]) == 2


def test_find_images_recurses_skips_hidden_and_dedupes(tmp_path):
    write_images(tmp_path / "a" / "b", 2)
    write_images(tmp_path / "a" / ".hidden", 1)
    (tmp_path / "a" / "b" / "img0.JPG").write_bytes(b"")  # upper-case extensions count too
    found = find_images([tmp_path / "a", tmp_path / "a" / "b" / "img1.png"])
    assert [p.name for p in found] == ["img0.JPG", "img0.png", "img1.png"]
