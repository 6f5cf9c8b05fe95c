"""Streamed image folders: keep file paths and labels only, decode each image in the loader worker that needs it.

The cache path (``cache.py``) decodes a data set once into a memory-mapped uint8 array of one fixed size. That cannot
hold ImageNet-scale data (1.28M images at 224 px are ~190 GB of pixels), and a fixed size rules out the
RandomResizedCrop views such data sets are trained with. Here ``FolderImages``, a ``stores.StreamedImages``, keeps the
files of a folder instead: ``choose_data_path`` decides when (``--data-path``), ``sample_stats`` estimates the
normalisation from a sample, and ``drop_unreadable`` is ``--skip-corrupt`` without a decoding pass into a cache.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image

from metapl.data.stores import EvalViews, StreamedImages, StringTable, open_rgb
from metapl.errors import UserError

logger = logging.getLogger(__name__)

# Decoded size above which ``--data-path auto`` streams instead of caching. 8 GiB: every data set this package knew
# before (CIFAR, SVHN, Fashion-MNIST, small folders) stays far below it at its native size (SVHN with extra: 1.9 GB),
# a memory-mapped cache of that size still sits in the page cache of an ordinary training machine, and decoding it
# once costs minutes; ImageNet-10 % at 224 px (1.28M images, ~190 GB) is far above, where the one-off decode takes
# hours and the disk and page cache no longer hold it. Also streamed: anything over half the cache disk's free space.
STREAM_ABOVE_BYTES = 8 * 2**30
STATS_SAMPLES = 256  # images (evenly spaced) whose evaluation views estimate a streamed set's mean and std
DATA_PATHS = ("auto", "cache", "stream")


def choose_data_path(
    data_path: str, num_images: int, image_size: int | None, cache_dir: str | Path, *, threshold: int | None = None
) -> str:
    """``"cache"`` or ``"stream"`` for a folder of ``num_images`` images, as ``--data-path`` asks.

    Args:
        data_path: ``auto``, ``cache`` or ``stream``.
        num_images: images in the folder (all splits).
        image_size: the side images are resized to (``--image-size``); streaming needs one.
        cache_dir: where the cache would be written (its free space counts for ``auto``).
        threshold: decoded bytes above which ``auto`` streams; None means ``STREAM_ABOVE_BYTES``.

    Returns:
        ``"cache"`` or ``"stream"``.
    """
    if data_path not in DATA_PATHS:
        raise UserError(f"unknown --data-path {data_path!r}; choose one of {', '.join(DATA_PATHS)}")
    if data_path == "stream" and image_size is None:
        raise UserError("--data-path stream needs --image-size (the side of the random crops), e.g. --image-size 224")
    if data_path != "auto":
        return data_path
    if image_size is None:
        return "cache"  # a folder without --image-size must hold images of one size: the cache reads it as it is
    decoded = num_images * image_size * image_size * 3
    limit = STREAM_ABOVE_BYTES if threshold is None else threshold
    return "stream" if decoded > limit or decoded > _free_bytes(Path(cache_dir)) / 2 else "cache"


def _free_bytes(path: Path) -> float:
    nearest = next((p for p in (path, *path.parents) if p.exists()), None)
    try:
        return float(shutil.disk_usage(nearest).free) if nearest is not None else float("inf")
    except OSError:
        return float("inf")


class FolderImages(StreamedImages):
    """The image files of a folder and their labels, decoded when read (see ``stores.StreamedImages``).

    Args:
        root: the folder the paths are relative to.
        paths: the relative paths.
        labels: ``(N,)`` int64 class indices, -1 for images without a class.
        size: side of the evaluation views (``--image-size``).
    """

    def __init__(self, root: str | Path, paths: StringTable, labels: np.ndarray, size: int):
        self.root, self.paths, self.size = str(root), paths, int(size)
        self.labels = np.asarray(labels, dtype=np.int64)

    @classmethod
    def from_entries(cls, root: Path, entries: list[tuple[str, int]], size: int) -> FolderImages:
        """Files from ``imagetree.plan_images``' ``(relative path, label)`` pairs.

        Args:
            root: the folder the paths are relative to.
            entries: the pairs, in dataset order.
            size: side of the evaluation views (``--image-size``).

        Returns:
            The ``FolderImages``.
        """
        labels = np.array([label for _, label in entries], dtype=np.int64)
        return cls(root, StringTable([name for name, _ in entries]), labels, size)

    def file(self, i: int) -> Path:
        """The path of image ``i``."""
        return Path(self.root) / self.paths[int(i)]

    def open(self, i: int, min_side: int | None = None) -> Image.Image:
        return open_rgb(self.file(i), min_side)

    def take(self, rows: ArrayLike) -> FolderImages:
        rows = np.asarray(rows, dtype=np.int64)
        return FolderImages(self.root, self.paths.take(rows), self.labels[rows], self.size)

    def __repr__(self) -> str:
        return (
            f"FolderImages({len(self)} files under {self.root}, views {self.size}x{self.size}x3, "
            f"labels={self.labels.dtype}{self.labels.shape})"
        )


def sample_stats(images: EvalViews, samples: int = STATS_SAMPLES) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units, estimated from ``samples`` evenly spaced evaluation views.

    The cache path counts every pixel; decoding a whole streamed set only for these would cost as much as caching it.
    A few hundred images pin each channel's mean to about 0.01, which is all ``Normalize`` needs.

    Args:
        images: the training images' evaluation views (``store.images``).
        samples: how many images to read.

    Returns:
        ``(mean, std)``, one float per channel, rounded to 4 decimals.
    """
    rows = np.unique(np.linspace(0, len(images) - 1, num=min(samples, len(images))).astype(np.int64))
    pixels = images[rows].reshape(-1, 3).astype(np.float64) / 255.0
    return tuple(round(float(m), 4) for m in pixels.mean(0)), tuple(round(float(s), 4) for s in pixels.std(0))


def drop_unreadable(files: StreamedImages) -> StreamedImages:
    """``--skip-corrupt`` on a streamed set: decode every image once, up front, and drop the unreadable ones, each
    named in a warning line. A full decoding pass (what the cache path does anyway), so that training never meets an
    unreadable file later; without ``--skip-corrupt`` training stops at the first one, in one line naming it.

    Args:
        files: the streamed images (files in a folder or members of tar shards).

    Returns:
        ``files`` without the unreadable images (the same object when all are readable).
    """
    bad = []
    for i in range(len(files)):
        try:
            files.open(i)
        except UserError as e:
            bad.append(i)
            logger.warning("skipped unreadable image " + str(e).split("; fix")[0].removeprefix("cannot read image "))
    if not bad:
        return files
    return files.take(np.setdiff1d(np.arange(len(files)), bad))
