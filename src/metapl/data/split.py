"""Seeded, class-balanced choice of the labeled subset of the training images, saved with each run.

The saved split carries a fingerprint of the data it indexes (``data_fingerprint``): a resumed run checks it, since
the same indices into changed data (images added to a folder, another copy of a data set) silently pick other images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from metapl.data.stores import SourceData
from metapl.errors import UserError, reporting_os_errors

logger = logging.getLogger(__name__)

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
        fingerprint: ``data_fingerprint`` of the data the split was drawn from, or None (files of older versions).
    """

    labeled: np.ndarray
    unlabeled: np.ndarray
    seed: int
    val: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    fingerprint: dict | None = None


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
) -> Split:
    """Draw ``num_labeled`` labeled images, ``num_labeled // num_classes`` per class.

    When ``num_labeled`` is not a multiple of ``num_classes``, the remainder goes one image each to a seeded choice of
    classes (among those with images to spare), and a line says which.

    Args:
        labels: ``(N,)`` labels of the train set.
        num_labeled: total number of labeled images.
        num_classes: number of classes.
        seed: the same seed gives the same split.
        unlabeled: ``"all"`` (every train image is also unlabeled data, as in the paper) or ``"rest"``.
        val: how many of the ``num_labeled`` images to hold out as a class-balanced validation set (for choosing
            hyper-parameters without the test set); they leave both the labeled and the unlabeled stream.

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
    rng = np.random.default_rng(seed)
    quota = _label_quota(labels, num_labeled, num_classes, rng)
    labeled = np.sort(
        np.concatenate([rng.permutation(np.flatnonzero(labels == c))[: quota[c]] for c in range(num_classes)])
    ).astype(np.int64)
    held_out = _carve_validation(labels, labeled, num_classes, val, rng)
    labeled = np.setdiff1d(labeled, held_out)
    everything = np.setdiff1d(np.arange(len(labels), dtype=np.int64), held_out)
    rest = everything if unlabeled == "all" else np.setdiff1d(everything, labeled)
    counts = per_class_counts(labels, labeled, num_classes)
    logger.info(f"labeled images per class: {counts}; {len(rest)} unlabeled images ({unlabeled})")
    if len(held_out):
        logger.info(
            f"validation: {len(held_out)} of the labeled images held out, {len(held_out) // num_classes}+ per class"
        )
    return Split(labeled=labeled, unlabeled=rest, seed=seed, val=held_out)


def _label_quota(labels: np.ndarray, num_labeled: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Labels per class: ``num_labeled // num_classes`` each, the remainder one each to a seeded choice of classes."""
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
        logger.info(
            f"{num_labeled} labels do not divide by {num_classes} classes: one extra for classes {extra.tolist()}"
        )
    return quota


def _carve_validation(
    labels: np.ndarray, labeled: np.ndarray, num_classes: int, val: int, rng: np.random.Generator
) -> np.ndarray:
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


FINGERPRINT_SAMPLES = 64  # images hashed by data_fingerprint, evenly spaced: a cheap check of the pixels


def data_fingerprint(data: SourceData) -> dict:
    """What identifies a data set cheaply: counts, per-class counts, and hashes of the labels and a sample of images.

    Reads the labels and ``FINGERPRINT_SAMPLES`` images, never the whole image array, so checking it on resume costs
    milliseconds even for large data sets. It depends on the content only, not on paths or file times: a copy of the
    data elsewhere matches.

    Args:
        data: a ``metapl.data.SourceData``.

    Returns:
        A JSON-able dict.
    """
    labels = np.ascontiguousarray(data.train.labels, dtype=np.int64)
    images = data.train.images
    rows = np.unique(np.linspace(0, len(images) - 1, num=min(FINGERPRINT_SAMPLES, len(images))).astype(np.int64))
    sample = np.ascontiguousarray(images[rows]) if len(images) else np.zeros(0, dtype=np.uint8)
    extra = data.extra_unlabeled
    fingerprint = {
        "train_images": int(len(images)),
        "test_images": int(len(data.test)),
        "extra_unlabeled": int(len(extra)) if extra is not None else 0,
        "image_shape": [int(d) for d in images.shape[1:]],
        "class_counts": np.bincount(labels[labels >= 0], minlength=data.num_classes).tolist(),
        "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest(),
        "images_sample_sha256": hashlib.sha256(sample.tobytes()).hexdigest(),
    }
    val = getattr(data, "val", None)
    if val is not None:  # only then: the fingerprints of data without val/ stay as they were
        fingerprint["val_images"] = int(len(val))
    return fingerprint


def check_fingerprint(saved: dict | None, current: dict, where: str | os.PathLike) -> None:
    """Refuse to reuse a split on data that changed since it was drawn.

    Args:
        saved: the split's ``fingerprint`` (None: an older split file without one; nothing to check).
        current: ``data_fingerprint`` of the data loaded now.
        where: the split file, for the message.

    Raises:
        UserError: naming the first difference.
    """
    if saved is None or saved == current:
        return
    names = {
        "train_images": "training images",
        "test_images": "test images",
        "extra_unlabeled": "extra unlabeled images",
        "image_shape": "image shape",
        "class_counts": "images per class",
        "labels_sha256": "labels",
        "images_sample_sha256": "image content",
        "val_images": "validation images",
    }
    key = next((k for k in names if saved.get(k) != current.get(k)), None)
    change = f"{names[key]}: {saved.get(key)} then, {current.get(key)} now" if key else "its fingerprint"
    if key and key.endswith("sha256"):
        change = f"the {names[key]} differ"
    raise UserError(
        f"the data changed since {where} was written ({change}); the saved split would pick other images: "
        "restore the run's data (its data_dir in config.yaml), or start a new run"
    )


def save_split(split: Split, path: str | os.PathLike) -> None:
    """Write a split as JSON (or ``.npz`` when ``path`` ends in ``.npz``), so a run can be resumed or audited.

    The JSON form also keeps the split's data fingerprint (key ``data``).

    Args:
        split: the split.
        path: the output file.
    """
    path = Path(path)
    with reporting_os_errors(path):
        if path.suffix == ".npz":
            np.savez(path, labeled=split.labeled, unlabeled=split.unlabeled, seed=np.int64(split.seed), val=split.val)
            return
        payload = {"version": 1, "seed": split.seed, "labeled": split.labeled.tolist()}
        payload["unlabeled"] = split.unlabeled.tolist()
        payload["val"] = split.val.tolist()
        payload["data"] = split.fingerprint
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
        if not isinstance(payload.get("data"), (dict, type(None))):
            raise ValueError("its data fingerprint is not a mapping")
        return Split(
            np.asarray(payload["labeled"], dtype=np.int64),
            np.asarray(payload["unlabeled"], dtype=np.int64),
            int(payload["seed"]),
            np.asarray(payload.get("val", []), dtype=np.int64),
            payload.get("data"),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"cannot read the split file {path} ({e}); delete it to draw a new split") from e
