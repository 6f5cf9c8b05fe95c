"""Class-balanced labeled splits: balance, seeding, refusals, and the saved file."""

from __future__ import annotations

import numpy as np
import pytest

from metapl.data import Split, load_split, make_split, per_class_counts, save_split
from metapl.errors import UserError


@pytest.fixture
def labels() -> np.ndarray:
    # 4 classes of unequal size, shuffled, so that balance is not an accident of the layout.
    labels = np.repeat(np.arange(4), [30, 12, 50, 20])
    return np.random.default_rng(0).permutation(labels)


def test_balanced_and_unlabeled_modes(labels):
    split = make_split(labels, 40, 4, seed=3)
    assert per_class_counts(labels, split.labeled, 4) == [10, 10, 10, 10]
    assert len(np.unique(split.labeled)) == 40 and split.labeled.dtype == np.int64
    assert np.array_equal(split.unlabeled, np.arange(len(labels)))  # "all": the paper's protocol
    rest = make_split(labels, 40, 4, seed=3, unlabeled="rest")
    assert np.array_equal(rest.labeled, split.labeled)
    assert len(rest.unlabeled) == len(labels) - 40 and not np.intersect1d(rest.unlabeled, rest.labeled).size


def test_remainder_spread_and_logged(labels, log_lines):
    split = make_split(labels, 43, 4, seed=0)
    lines = log_lines()
    counts = per_class_counts(labels, split.labeled, 4)
    assert sum(counts) == 43 and sorted(counts) == [10, 11, 11, 11]
    assert any("extra" in line for line in lines) and any(str(counts) in line for line in lines)
    chosen = {tuple(per_class_counts(labels, make_split(labels, 41, 4, seed=s).labeled, 4)) for s in range(8)}
    assert len(chosen) > 1  # which class gets the extra label depends on the seed


def test_seeding(labels):
    a = make_split(labels, 20, 4, seed=7)
    b = make_split(labels, 20, 4, seed=7)
    c = make_split(labels, 20, 4, seed=8)
    assert np.array_equal(a.labeled, b.labeled) and a.seed == 7
    assert not np.array_equal(a.labeled, c.labeled)


@pytest.mark.parametrize(
    ("num_labeled", "needle"),
    [(200, "exceeds the 112 training images"), (3, "below the 4 classes"), (60, "class 1 has 12 training images")],
)
def test_refusals(labels, num_labeled, needle):
    with pytest.raises(UserError, match=needle) as info:
        make_split(labels, num_labeled, 4, seed=0)
    assert "\n" not in str(info.value)


def test_unknown_unlabeled_mode(labels):
    with pytest.raises(UserError, match="all, rest"):
        make_split(labels, 8, 4, seed=0, unlabeled="some")


@pytest.mark.parametrize("unlabeled", ["all", "rest"])
def test_validation_carved_from_the_labeled_draw(labels, unlabeled):
    whole = make_split(labels, 40, 4, seed=3, unlabeled=unlabeled)
    split = make_split(labels, 40, 4, seed=3, unlabeled=unlabeled, val=12)
    # The held-out images come out of the same labeled draw, so seeds stay paired with and without validation.
    assert np.array_equal(np.union1d(split.labeled, split.val), whole.labeled)
    assert per_class_counts(labels, split.val, 4) == [3, 3, 3, 3]
    assert not np.intersect1d(split.val, split.unlabeled).size  # never trained on, not even unlabeled
    assert np.array_equal(split.unlabeled, np.setdiff1d(whole.unlabeled, split.val))


def test_validation_must_leave_a_label_per_class(labels):
    with pytest.raises(UserError, match="--val-labeled 37 leaves fewer than one training label per class"):
        make_split(labels, 40, 4, seed=0, val=37)


@pytest.mark.parametrize("name", ["split.json", "split.npz"])
def test_save_load_roundtrip(labels, tmp_path, name):
    split = make_split(labels, 12, 4, seed=5, unlabeled="rest", val=4)
    save_split(split, tmp_path / name)
    back = load_split(tmp_path / name)
    assert isinstance(back, Split) and back.seed == 5
    assert np.array_equal(back.labeled, split.labeled) and np.array_equal(back.unlabeled, split.unlabeled)
    assert np.array_equal(back.val, split.val) and len(back.val) == 4


def test_load_bad_split_file(tmp_path):
    (tmp_path / "split.json").write_text("{not json")
    with pytest.raises(UserError, match="split.json"):
        load_split(tmp_path / "split.json")
