"""Seeded, class-balanced choice of the labeled subset of the training images, saved with each run."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from metapl.errors import UserError

UNLABELED_MODES = ("all", "rest")


@dataclass
class Split:
    """Which training images are labeled and which feed the unlabeled stream.

    Attributes:
        labeled: sorted int64 indices into the train arrays.
        unlabeled: sorted int64 indices into the train arrays: all of them (the paper's protocol, labels hidden) or
            the rest after removing ``labeled``.
        seed: the seed that chose ``labeled``.
        val: sorted int64 indices of the labeled images held out for validation (class-balanced, carved from the
            labeled draw; never trained on, not even as unlabeled data). Empty unless ``--val-labeled`` asks.
    """

    labeled: np.ndarray
    unlabeled: np.ndarray
    seed: int
    val: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def per_class_counts(labels: np.ndarray, indices: np.ndarray, num_classes: int) -> list[int]:
    """How many of ``indices`` fall in each class.

    Args:
        labels: ``(N,)`` int labels of the train set.
        indices: indices into ``labels``.
        num_classes: length of the result.

    Returns:
        A list of ``num_classes`` counts.
    """
    return np.bincount(np.asarray(labels)[np.asarray(indices, dtype=np.int64)], minlength=num_classes).tolist()


def make_split(
    labels: np.ndarray,
    num_labeled: int,
    num_classes: int,
    *,
    seed: int,
    unlabeled: str = "all",
    val: int = 0,
    log: Callable[[str], None] = print,
) -> Split:
    """Draw ``num_labeled`` labeled images, ``num_labeled // num_classes`` per class.

    When ``num_labeled`` is not a multiple of ``num_classes``, the remainder goes one image each to a seeded choice of
    classes (among those with images to spare), and ``log`` says which.

    Args:
        labels: ``(N,)`` labels of the train set.
        num_labeled: total number of labeled images.
        num_classes: number of classes.
        seed: the same seed gives the same split.
        unlabeled: ``"all"`` (every train image is also unlabeled data, as in the paper) or ``"rest"``.
        val: how many of the ``num_labeled`` images to hold out as a class-balanced validation set (for choosing
            hyper-parameters without the test set); they leave both the labeled and the unlabeled stream.
        log: receives the per-class counts.

    Returns:
        The ``Split``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if unlabeled not in UNLABELED_MODES:
        raise UserError(f"unknown unlabeled mode {unlabeled!r}; choose one of {', '.join(UNLABELED_MODES)}")
    if num_labeled < num_classes:
        raise UserError(
            f"--num-labeled {num_labeled} is below the {num_classes} classes; use at least one label per class"
        )
    if num_labeled > len(labels):
        raise UserError(f"--num-labeled {num_labeled} exceeds the {len(labels)} training images; lower it")
    available = np.bincount(labels, minlength=num_classes)[:num_classes]
    quota = np.full(num_classes, num_labeled // num_classes)
    short = np.flatnonzero(available < quota)
    if len(short):
        c = int(short[0])
        raise UserError(
            f"class {c} has {int(available[c])} training images but needs {int(quota[c])} labels; lower --num-labeled"
        )
    rng = np.random.default_rng(seed)
    remainder = num_labeled % num_classes
    if remainder:
        spare = np.flatnonzero(available > quota)
        if len(spare) < remainder:
            raise UserError(
                f"only {len(spare)} classes have images beyond {int(quota[0])} for the {remainder} leftover labels; "
                f"use a multiple of {num_classes} for --num-labeled"
            )
        extra = np.sort(rng.choice(spare, size=remainder, replace=False))
        quota[extra] += 1
        log(f"{num_labeled} labels do not divide by {num_classes} classes: one extra for classes {extra.tolist()}")
    labeled = np.sort(
        np.concatenate([rng.permutation(np.flatnonzero(labels == c))[: quota[c]] for c in range(num_classes)])
    ).astype(np.int64)
    held_out = _carve_validation(labels, labeled, num_classes, val, rng)
    labeled = np.setdiff1d(labeled, held_out)
    everything = np.setdiff1d(np.arange(len(labels), dtype=np.int64), held_out)
    rest = everything if unlabeled == "all" else np.setdiff1d(everything, labeled)
    counts = per_class_counts(labels, labeled, num_classes)
    log(f"labeled images per class: {counts}; {len(rest)} unlabeled images ({unlabeled})")
    if len(held_out):
        log(f"validation: {len(held_out)} of the labeled images held out, {len(held_out) // num_classes}+ per class")
    return Split(labeled=labeled, unlabeled=rest, seed=seed, val=held_out)


def _carve_validation(labels, labeled: np.ndarray, num_classes: int, val: int, rng) -> np.ndarray:
    """``val`` of the ``labeled`` indices, as evenly over classes as the draw allows (seeded)."""
    if val <= 0:
        return np.zeros(0, dtype=np.int64)
    if val > len(labeled) - num_classes:
        raise UserError(
            f"--val-labeled {val} leaves fewer than one training label per class of the {len(labeled)} labeled "
            f"images; lower --val-labeled or raise --num-labeled"
        )
    quota = np.full(num_classes, val // num_classes)
    quota[rng.permutation(num_classes)[: val % num_classes]] += 1
    picked = []
    for c in range(num_classes):
        members = rng.permutation(labeled[labels[labeled] == c])
        take = min(int(quota[c]), len(members) - 1)  # keep at least one training label per class
        picked.append(members[:take])
    return np.sort(np.concatenate(picked)).astype(np.int64)


def save_split(split: Split, path: str | os.PathLike) -> None:
    """Write a split as JSON (or ``.npz`` when ``path`` ends in ``.npz``), so a run can be resumed or audited.

    Args:
        split: the split.
        path: the output file.
    """
    path = Path(path)
    if path.suffix == ".npz":
        np.savez(path, labeled=split.labeled, unlabeled=split.unlabeled, seed=np.int64(split.seed), val=split.val)
        return
    payload = {"version": 1, "seed": split.seed, "labeled": split.labeled.tolist()}
    payload["unlabeled"] = split.unlabeled.tolist()
    payload["val"] = split.val.tolist()
    path.write_text(json.dumps(payload))


def load_split(path: str | os.PathLike) -> Split:
    """Read a split written by ``save_split``.

    Args:
        path: a ``.json`` or ``.npz`` file.

    Returns:
        The ``Split``.
    """
    path = Path(path)
    try:
        if path.suffix == ".npz":
            with np.load(path) as z:
                val = z["val"].astype(np.int64) if "val" in z else np.zeros(0, dtype=np.int64)
                return Split(z["labeled"].astype(np.int64), z["unlabeled"].astype(np.int64), int(z["seed"]), val)
        payload = json.loads(path.read_text())
        return Split(
            np.asarray(payload["labeled"], dtype=np.int64),
            np.asarray(payload["unlabeled"], dtype=np.int64),
            int(payload["seed"]),
            np.asarray(payload.get("val", []), dtype=np.int64),
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read the split file {path} ({e}); delete it to draw a new split") from e
