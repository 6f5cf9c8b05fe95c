"""``metapl eval``'s report: per-class figures, confusion matrix, calibration, top-k only below K, any folder layout."""

from __future__ import annotations

import json

import matplotlib.text
import numpy as np
import pytest
import torch

from metapl.commands.cli import main
from metapl.commands.eval_report import class_report, confusion_figure, expected_calibration_error, plot_confusion
from metapl.commands.inference import run_eval


def test_class_report_counts_by_hand():
    y = torch.tensor([0, 1, 1, 2, 2, 0, 2])
    pred = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    conf = torch.tensor([0.9, 0.6, 0.7, 0.95, 0.8, 0.5, 0.4])
    r = class_report(pred, conf, y, 4)
    assert r["confusion_matrix"] == [[1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 2, 0], [0, 0, 0, 0]]
    assert r["acc"] == pytest.approx(100 * 4 / 7)
    assert "top5" not in r  # 4 classes: a top-5 would always be 100 %
    per = r["per_class"]
    assert per[0] == {"accuracy": 50.0, "precision": 50.0, "recall": 50.0, "support": 2}
    assert per[2] == {
        "accuracy": pytest.approx(200 / 3),
        "precision": pytest.approx(200 / 3),
        "recall": pytest.approx(200 / 3),
        "support": 3,
    }
    assert per[3] == {"accuracy": None, "precision": None, "recall": None, "support": 0}  # absent, never predicted
    hits = torch.tensor([True] * 7)
    assert class_report(pred, conf, y, 6, topk_hits=hits)["top5"] == 100.0


def test_expected_calibration_error_with_15_bins():
    # 0.95 falls in bin (14/15, 1], 0.55 in (8/15, 9/15]: |1 - 1.9| / 4 + |2 - 1.1| / 4 = 0.45
    conf = torch.tensor([0.95, 0.95, 0.55, 0.55])
    correct = torch.tensor([True, False, True, True])
    assert expected_calibration_error(conf, correct) == pytest.approx(0.45)
    assert expected_calibration_error(torch.tensor([1.0, 0.0]), torch.tensor([True, False])) == 0.0
    assert expected_calibration_error(torch.zeros(0), torch.zeros(0, dtype=torch.bool)) == 0.0


@pytest.fixture
def folder_run(tmp_path, make_tree):
    """A 2-step run on a 3-class 12x12 train/test tree."""
    tree = make_tree("tree", per_class=4)
    out = tmp_path / "run"
    argv = [
        "train",
        "--dataset",
        "folder",
        "--data-dir",
        str(tree),
        *["--steps", "2", "--eval-every", "2", "--batch-size", "3", "--mu", "1", "--num-labeled", "6"],
        *["--workers", "0", "--no-tensorboard", "--no-progress", "--finetune-steps", "0", "--out"],
        str(out),
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    assert main(argv) == 0
    return out


def test_eval_reports_per_class_confusion_and_calibration(folder_run, capsys):
    assert main(["eval", str(folder_run), "--device", "cpu", "--plot"]) == 0
    shown = capsys.readouterr().out
    result = json.loads((folder_run / "eval.json").read_text())
    summary = json.loads((folder_run / "summary.json").read_text())
    assert result["classes"] == ["ant", "bee", "cat"] and result["num_test"] == 12
    for name in ("teacher", "student", "ema"):
        assert result[f"{name}_acc"] == pytest.approx(summary[f"{name}_acc"], abs=1e-9)
        assert f"{name}_top5" not in result  # 3 classes
        report = result["models"][name]
        matrix = report["confusion_matrix"]
        assert [sum(row) for row in matrix] == [4, 4, 4] and [c["support"] for c in report["per_class"]] == [4, 4, 4]
        assert report["acc"] == pytest.approx(100 * sum(matrix[i][i] for i in range(3)) / 12)
        assert result[f"{name}_ece"] == report["ece"] and 0 <= report["ece"] <= 100
    assert "top-5 %" not in shown and "ECE %" in shown and "precision %" in shown
    assert (folder_run / "eval.confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_on_a_flat_folder_scores_all_of_it(folder_run, make_tree, log_lines):
    flat = make_tree("flat", splits=(), per_class=5, sizes=((20, 16),))  # other size: resized to the run's 12
    result = run_eval(folder_run, data_dir=str(flat), output=folder_run / "flat.json", device="cpu")
    assert result["num_test"] == 15 and result["data_dir"] == str(flat)
    assert [c["support"] for c in result["models"]["student"]["per_class"]] == [5, 5, 5]
    assert f"{flat} has no train/ and test/ folders: all 15 of its images are scored as the test set" in log_lines()
    tree = folder_run.parent / "tree"  # the training tree: its test split, 4 per class
    assert run_eval(folder_run, data_dir=str(tree), output=folder_run / "t.json", device="cpu")["num_test"] == 12


def test_eval_image_size_other_than_the_runs_is_refused(folder_run, make_tree, capsys):
    flat = make_tree("flat", splits=(), per_class=2)
    out = folder_run / "x.json"
    code = main(["eval", str(folder_run), "--data-dir", str(flat), "--image-size", "16", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("metapl: error: the folder test data has 16 pixels per side but checkpoint ")
    assert err.endswith("was trained with 12 pixels per side; pass --image-size 12\n") and not out.exists()


@pytest.mark.parametrize("k", [10, 43])
def test_confusion_png_keeps_every_title_and_class_name_inside_the_image(k, tmp_path):
    rng = np.random.default_rng(k)
    classes = [f"class {i} with a long name" for i in range(k)]
    reports = {
        role: {"confusion_matrix": (rng.integers(0, 5, (k, k)) + 40 * np.eye(k, dtype=int)).tolist(), "acc": 75.0}
        for role in ("teacher", "student", "ema", "finetuned")
    }
    fig = confusion_figure(reports, classes)
    fig.canvas.draw()
    frame = fig.bbox
    texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text()]
    for text in texts:  # nothing cut at the image's edges, nothing smaller than 7 pt at 100 dpi
        box = text.get_window_extent()
        assert frame.x0 - 0.5 <= box.x0 and box.x1 <= frame.x1 + 0.5, text.get_text()
        assert frame.y0 - 0.5 <= box.y0 and box.y1 <= frame.y1 + 0.5, text.get_text()
        assert text.get_fontsize() >= 7, text.get_text()
    shown = {t.get_text() for t in texts}
    assert {f"{role}: 75.00% top-1" for role in reports} <= shown
    assert sum(t.get_text() == "class 0 with a lo…" for t in texts) == 2 * len(reports)  # both axes of every panel
    png = plot_confusion(reports, classes, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
