"""The ImageFolder reader (``--dataset folder``): a directory or a tar of ``train/<class>/*`` + ``test/<class>/*``, or
of ``<class>/*`` with a seeded, stratified test hold-out; also the extra images of ``--unlabeled-dir``.

A folder is decoded once into the cache (``cache.py``, with ``imagetree.py``'s parallel decoder), or, when it is too
large for that (``--data-path``, ``streamed.choose_data_path``), kept as a list of files (``streamed.FolderImages``).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from metapl.data.sources import cache, streamed
from metapl.data.sources.imagetree import (
    archive_or_folder,
    channel_stats,
    decode_tree,
    describe_layout,
    plan_images,
    plan_layout,
)
from metapl.data.sources.readers import ReadOptions, register_source
from metapl.data.stores import ImageArrays, ImageStore, SourceData, StreamedImages
from metapl.errors import UserError

logger = logging.getLogger(__name__)


@register_source("folder", streams=True)
def read_folder(o: ReadOptions) -> SourceData:
    """An image tree or a tar of one, decoded into the cache or streamed from its files (``o.data_path``)."""
    data_dir, test_fraction, seed = o.data_dir, o.test_fraction, o.seed
    image_size, skip_corrupt = o.image_size, o.skip_corrupt
    if not data_dir:
        raise UserError("--dataset folder needs --data-dir pointing at an image folder or a .tar/.tar.gz of one")
    check_test_fraction(test_fraction)
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise UserError(f"data directory {path} does not exist; point --data-dir at an image folder or archive")
    if archive_or_folder(path) == "folder" and o.data_path not in (
        None,
        "cache",
    ):  # raises on a file that is not an archive
        classes, plan, folders = plan_layout(path)
        n = sum(len(entries) for entries in plan.values())
        cache_dir = o.cache_dir or cache.default_cache_dir()
        if streamed.choose_data_path(o.data_path, n, image_size, cache_dir, threshold=o.stream_above) == "stream":
            logger.info(describe_layout(path, folders, {split: len(entries) for split, entries in plan.items()}))
            return _stream_folder(path, classes, plan, o)
    elif o.data_path == "stream":
        raise UserError(f"--data-path stream needs an extracted folder, not the archive {path}; extract it first")

    def build() -> tuple[dict[str, np.ndarray], dict]:
        return decode_tree(path, image_size=image_size, skip_corrupt=skip_corrupt)

    # layout 2: val/ folders are read (they were left out before): entries of older trees are rebuilt once
    parts = {"source": cache.fingerprint(path), "image_size": image_size, "layout": 2}
    arrays, meta = cache.load_or_build(o.cache_dir, "folder", parts, build)
    report_skipped(meta["skipped"], skip_corrupt)
    counts = {name.removesuffix("_labels"): len(a) for name, a in arrays.items() if name.endswith("_labels")}
    logger.info(describe_layout(path, meta["layout"], {"train": counts.get("all", 0), **counts}))
    if "all_images" in arrays:  # one class tree: hold out a seeded, stratified test share
        train_idx, test_idx = holdout(arrays["all_labels"], test_fraction, seed)
        train = ImageArrays(arrays["all_images"][train_idx], arrays["all_labels"][train_idx])
        test = ImageArrays(arrays["all_images"][test_idx], arrays["all_labels"][test_idx])
        mean, std = channel_stats(train.images)
    else:
        train = ImageArrays(arrays["train_images"], arrays["train_labels"])
        test = ImageArrays(arrays["test_images"], arrays["test_labels"])
        mean, std = tuple(meta["mean"]), tuple(meta["std"])
    val = ImageArrays(arrays["val_images"], arrays["val_labels"]) if "val_images" in arrays else None
    return SourceData(train, test, None, list(meta["classes"]), mean, std, hflip=True, val=val)


def _stream_folder(path: Path, classes: list[str], plan: dict, o: ReadOptions) -> SourceData:
    """A folder on the streaming path: file lists, the same train/test split as the cache path, sampled statistics."""
    logger.info(
        f"streaming {sum(map(len, plan.values()))} images from {path}: decoded in the loader workers, not cached"
    )
    size = o.image_size
    assert size is not None  # streamed only with --image-size (streamed.choose_data_path)
    val: StreamedImages | None = streamed.FolderImages.from_entries(path, plan["val"], size) if "val" in plan else None
    train: StreamedImages
    test: StreamedImages
    if "test" in plan:
        train = streamed.FolderImages.from_entries(path, plan["train"], size)
        test = streamed.FolderImages.from_entries(path, plan["test"], size)
    else:  # one class tree (or train/ alone): the seeded, stratified hold-out of the cache path, on the same order
        every = streamed.FolderImages.from_entries(path, plan["train"] if "train" in plan else plan["all"], size)
        train_idx, test_idx = holdout(every.labels, o.test_fraction, o.seed)
        train, test = every.take(train_idx), every.take(test_idx)
    if o.skip_corrupt:  # decoded once up front, so that training never meets an unreadable file
        train, test = streamed.drop_unreadable(train), streamed.drop_unreadable(test)
        val = streamed.drop_unreadable(val) if val is not None else None
    mean, std = streamed.sample_stats(train.images)
    return SourceData(train, test, None, list(classes), mean, std, hflip=True, val=val)


def read_unlabeled(unlabeled_dir: str, data: SourceData, o: ReadOptions) -> ImageStore:
    """The extra images of ``--unlabeled-dir`` (labels all -1): cached, or streamed when the labeled data streams."""
    image_size, skip_corrupt = o.image_size, o.skip_corrupt
    path = Path(unlabeled_dir).expanduser()
    if not path.exists():
        raise UserError(f"unlabeled directory {path} does not exist; fix --unlabeled-dir")
    if data.streamed:  # the labeled data streams: so do the extra images
        if archive_or_folder(path) != "folder":
            raise UserError(f"--data-path stream needs an extracted --unlabeled-dir, not the archive {path}")
        return streamed.FolderImages.from_entries(path, plan_images(path, flat=True)[1]["all"], data.image_size)
    archive_or_folder(path)
    channels = data.in_channels

    def build() -> tuple[dict[str, np.ndarray], dict]:
        return decode_tree(path, image_size=image_size, skip_corrupt=skip_corrupt, flat=True, channels=channels)

    parts = {"source": cache.fingerprint(path), "image_size": image_size, "channels": channels}
    arrays, meta = cache.load_or_build(o.cache_dir, "unlabeled", parts, build)
    report_skipped(meta["skipped"], skip_corrupt)
    images = arrays["all_images"]
    if images.shape[1:3] != (data.image_size, data.image_size):
        raise UserError(
            f"unlabeled images in {path} are {images.shape[1]}x{images.shape[2]} but the labeled ones are "
            f"{data.image_size}x{data.image_size}; pass --image-size {data.image_size}"
        )
    return ImageArrays(images, np.full(len(images), -1, dtype=np.int64))


def report_skipped(skipped: list[list[str]], skip_corrupt: bool) -> None:
    """Replay what happened to unreadable images, also on a cache hit (the cache holds only the readable ones)."""
    if not skipped:
        return
    name, reason = skipped[0]
    if not skip_corrupt:
        raise UserError(f"cannot read image {name} ({reason}); fix or delete it, or pass --skip-corrupt")
    for name, reason in skipped:
        logger.warning(f"skipped unreadable image {name} ({reason})")
    warnings.warn(f"skipped {len(skipped)} unreadable image(s), first: {skipped[0][0]}", stacklevel=3)


def check_test_fraction(fraction: float) -> None:
    if not 0.0 < fraction < 1.0:
        # A library argument (load_dataset's), not a flag: metapl train holds out a fixed tenth.
        raise UserError(f"load_dataset(test_fraction={fraction!r}) is out of range; use a number in (0, 1)")


def holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded ``fraction`` (at least one image, never all) goes to the test set."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            raise UserError(f"class {int(c)} has {len(idx)} image; a held-out test split needs at least 2 per class")
        k = min(max(1, round(fraction * len(idx))), len(idx) - 1)
        test.append(rng.permutation(idx)[:k])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx
