"""Folder layouts as users have them (issue 26): ``train/`` + ``test/``, ``train/`` + ``val/`` (ImageNet),
``train/`` + ``val/`` + ``test/``, one ``<class>/`` tree; each said in one line, no folder silently ignored."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from metapl.commands.cli import main
from metapl.data import load_dataset
from metapl.errors import UserError


def _load(root, tmp_path):
    return load_dataset("folder", str(root), cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("stream", [False, True])
def test_train_and_val_is_the_imagenet_layout_val_scores(make_tree, tmp_path, stream, log_lines):
    root = make_tree(splits=("train", "val"), per_class=4)
    kw = {"data_path": "stream", "image_size": 12} if stream else {}
    data = load_dataset("folder", str(root), cache_dir=str(tmp_path / "cache"), **kw)
    lines = log_lines()
    assert (len(data.train), len(data.test), data.val) == (12, 12, None)
    assert any(line.endswith("train/ = training images (12), val/ = test images (12)") for line in lines), lines


@pytest.mark.parametrize("stream", [False, True])
def test_train_val_test_val_folder_holds_the_validation_images(make_tree, tmp_path, stream, log_lines):
    root = make_tree(splits=("train", "test", "val"), per_class=3)
    kw = {"data_path": "stream", "image_size": 12} if stream else {}
    data = load_dataset("folder", str(root), cache_dir=str(tmp_path / "cache"), **kw)
    lines = log_lines()
    assert (len(data.train), len(data.test), len(data.val)) == (9, 9, 9)
    assert np.bincount(np.asarray(data.val.labels)).tolist() == [3, 3, 3]
    expected = "train/ = training images (9), test/ = test images (9), val/ = validation images (they choose the "
    assert any(line.endswith(expected + "result) (9)") for line in lines), lines


def test_one_class_tree_and_train_alone_hold_out_a_test_share(make_tree, tmp_path, log_lines, caplog):
    data = _load(make_tree("flat", splits=(), per_class=10), tmp_path)
    assert (len(data.train), len(data.test)) == (27, 3)
    assert any("one <class>/ tree of 30 images: a tenth of each class is held out as test" in x for x in log_lines())
    caplog.clear()
    _load(make_tree("alone", splits=("train",), per_class=10), tmp_path)
    lines = log_lines()
    assert any("no test/: a tenth of each class of train/ is held out as test" in x for x in lines), lines


def test_a_folder_beside_the_splits_is_refused_not_ignored(make_tree, tmp_path):
    root = make_tree(splits=("train", "test"))
    shutil.copytree(root / "test", root / "extra")
    with pytest.raises(UserError, match=r"holds extra/ beside its train/ folder; it would be ignored"):
        _load(root, tmp_path)
    shutil.rmtree(root / "train")
    shutil.rmtree(root / "extra")
    with pytest.raises(UserError, match=r"has test/ but no train/"):
        _load(root, tmp_path)


def test_a_run_on_train_val_test_chooses_its_result_on_val(make_tree, tmp_path, capsys):
    root = make_tree(splits=("train", "test", "val"), per_class=6, sizes=((8, 8),))
    out = tmp_path / "run"
    argv = [*("train", "--dataset", "folder", "--data-dir", str(root), "--num-labeled", "6", "--steps", "2")]
    argv += [*("--batch-size", "2", "--mu", "1", "--workers", "0", "--no-tensorboard", "--no-progress")]
    assert main([*argv, "--cache-dir", str(tmp_path / "c"), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_val"] == 18 and summary["result"]["chosen_by"] == "validation accuracy on 18 images"
    assert "validation: the 18 images of the data's val/ folder choose" in capsys.readouterr().out
    assert main([*argv, "--val-labeled", "3", "--out", str(tmp_path / "r2")]) == 2
    assert "has 18 of its own (its val/ folder); drop --val-labeled" in capsys.readouterr().err
