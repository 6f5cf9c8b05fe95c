"""Streaming image folders: keep file paths and labels only, decode each image in the loader worker that needs it.

The cache path (``cache.py``) decodes a data set once into a memory-mapped uint8 array of one fixed size. That cannot
hold ImageNet-scale data (1.28M images at 224 px are ~190 GB of pixels), and a fixed size rules out the
RandomResizedCrop views such data sets are trained with. Here ``ImageFiles`` plays the role of ``ImageArrays``:

* ``files.labels``: the int64 labels, in memory (the seeded split is drawn from them exactly as on the cache path);
* ``files.images``: a ``FileImages``, which looks like a ``(N, S, S, 3)`` uint8 array whose rows are the *evaluation
  view* (shorter side resized to ``S / EVAL_CROP``, centre crop ``S``), decoded on access; evaluation loaders, the
  data fingerprint and the channel statistics read it like the cached array;
* ``files.image(i)``: the whole image at its own size as a uint8 ``(3, H, W)`` tensor, what the training views
  (``transforms.weak_transform(..., crop="resized")``) start from.

Nothing here depends on the number of loader workers or processes: which image comes when, and its random view, is
decided by ``loader.ResumableSampler`` and the per-sample seed, so exact resume and rank sharding work unchanged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metapl.errors import UserError

# Decoded size above which ``--data-path auto`` streams instead of caching. 8 GiB: every data set this package knew
# before (CIFAR, SVHN, Fashion-MNIST, small folders) stays far below it at its native size (SVHN with extra: 1.9 GB),
# a memory-mapped cache of that size still sits in the page cache of an ordinary training machine, and decoding it
# once costs minutes; ImageNet-10 % at 224 px (1.28M images, ~190 GB) is far above, where the one-off decode takes
# hours and the disk and page cache no longer hold it. Also streamed: anything over half the cache disk's free space.
STREAM_ABOVE_BYTES = 8 * 2**30
EVAL_CROP = 0.875  # the evaluation view's centre crop covers this fraction of the shorter side (224 of 256)
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


class StringTable:
    """Many strings (relative paths, sample keys) as one bytes buffer plus offsets: two NumPy arrays instead of a
    million ``str`` objects, which loader workers would otherwise copy page by page as they touch the objects'
    reference counts.

    Args:
        names: the strings.
    """

    def __init__(self, names: list[str]):
        encoded = [n.encode("utf-8") for n in names]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, dtype=np.uint8)

    @classmethod
    def from_arrays(cls, offsets: np.ndarray, blob: np.ndarray) -> StringTable:
        """A table from its two arrays (as stored in a cache entry), without re-encoding."""
        table = cls([])
        table.offsets, table.blob = np.asarray(offsets, dtype=np.int64), np.asarray(blob, dtype=np.uint8)
        return table

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes().decode("utf-8")

    def take(self, rows: np.ndarray) -> StringTable:
        return StringTable([self[int(i)] for i in rows])


def open_rgb(source, min_side: int | None = None, name: str | None = None) -> Image.Image:
    """Decode one image as RGB.

    Args:
        source: a path or a binary file object.
        min_side: lets a JPEG decode at 1/2, 1/4 or 1/8 scale while both sides stay at least this large.
        name: what an error message calls the image (default: ``source``).

    Returns:
        The RGB Pillow image; an unreadable one raises a UserError naming it.
    """
    try:
        with Image.open(source) as im:
            if min_side is not None:
                im.draft("RGB", (min_side, min_side))
            return im.convert("RGB")
    except Exception as e:  # Pillow raises many exception types for broken files; all of them mean "unreadable"
        raise UserError(f"cannot read image {name or source} ({type(e).__name__}: {e}); fix or delete it") from None


def eval_view(image: Image.Image, size: int) -> np.ndarray:
    """The evaluation view: resize the shorter side to ``size / EVAL_CROP``, then crop the centre ``size x size``.

    Args:
        image: an RGB Pillow image.
        size: the output side.

    Returns:
        uint8 ``(size, size, 3)``.
    """
    w, h = image.size
    side = min(w, h) * EVAL_CROP  # the centre square, in source pixels, that maps onto the output
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=box))


class StreamedImages:
    """Undecoded images that index like a uint8 ``(N, size, size, 3)`` array of their evaluation views.

    Subclasses say where an image's bytes are: ``open(i, min_side)`` (a decoded RGB Pillow image), ``take(rows)`` and
    ``__len__``; files in a folder here (``FileImages``), members of tar shards in ``shards.ShardImages``.
    """

    dtype = np.dtype(np.uint8)
    size: int

    def __len__(self) -> int:
        raise NotImplementedError

    def open(self, i: int, min_side: int | None = None) -> Image.Image:
        """Image ``i`` decoded as RGB (see ``open_rgb`` for ``min_side``)."""
        raise NotImplementedError

    def take(self, rows: np.ndarray) -> StreamedImages:
        """The images at ``rows``, still undecoded."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), self.size, self.size, 3)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return eval_view(self.open(int(key), min_side=self.size), self.size)
        rows = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key, dtype=np.int64)
        out = np.empty((len(rows), self.size, self.size, 3), dtype=np.uint8)
        for j, i in enumerate(rows):
            out[j] = self[int(i)]
        return out


class FileImages(StreamedImages):
    """Image files in a folder (see ``StreamedImages``).

    Args:
        root: the folder the paths are relative to.
        paths: the relative paths.
        size: side of the evaluation view.
    """

    def __init__(self, root: str | Path, paths: StringTable, size: int):
        self.root, self.paths, self.size = str(root), paths, int(size)

    def __len__(self) -> int:
        return len(self.paths)

    def file(self, i: int) -> Path:
        """The path of image ``i``."""
        return Path(self.root) / self.paths[int(i)]

    def open(self, i: int, min_side: int | None = None) -> Image.Image:
        return open_rgb(self.file(i), min_side)

    def take(self, rows: np.ndarray) -> FileImages:
        return FileImages(self.root, self.paths.take(np.asarray(rows, dtype=np.int64)), self.size)

    def __repr__(self) -> str:
        return f"FileImages({len(self)} files under {self.root}, views {self.size}x{self.size}x3)"


class ImageFiles:
    """The streaming counterpart of ``ImageArrays``: undecoded images and their labels (see the module docstring).

    Args:
        images: the images (files in a folder, or members of tar shards).
        labels: ``(N,)`` int64 class indices, -1 for images without a class.
    """

    def __init__(self, images: StreamedImages, labels: np.ndarray):
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)

    @classmethod
    def from_entries(cls, root: Path, entries: list[tuple[str, int]], size: int) -> ImageFiles:
        """Files from ``imagetree.plan_images``' ``(relative path, label)`` pairs.

        Args:
            root: the folder the paths are relative to.
            entries: the pairs, in dataset order.
            size: side of the evaluation view (``--image-size``).

        Returns:
            The ``ImageFiles``.
        """
        labels = np.array([label for _, label in entries], dtype=np.int64)
        return cls(FileImages(root, StringTable([name for name, _ in entries]), size), labels)

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> torch.Tensor:
        """Image ``i`` whole, at its own size, as the training views' input: uint8 ``(3, H, W)``."""
        array = np.asarray(self.images.open(i))
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    def take(self, rows) -> ImageFiles:
        """The images at ``rows``, still undecoded."""
        rows = np.asarray(rows, dtype=np.int64)
        return ImageFiles(self.images.take(rows), self.labels[rows])

    def __repr__(self) -> str:
        return f"ImageFiles({self.images!r}, labels={self.labels.dtype}{self.labels.shape})"


def sample_stats(images: StreamedImages, samples: int = STATS_SAMPLES) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units, estimated from ``samples`` evenly spaced evaluation views.

    The cache path counts every pixel; decoding a whole streamed set only for these would cost as much as caching it.
    A few hundred images pin each channel's mean to about 0.01, which is all ``Normalize`` needs.

    Args:
        images: the training images.
        samples: how many images to read.

    Returns:
        ``(mean, std)``, one float per channel, rounded to 4 decimals.
    """
    rows = np.unique(np.linspace(0, len(images) - 1, num=min(samples, len(images))).astype(np.int64))
    pixels = images[rows].reshape(-1, 3).astype(np.float64) / 255.0
    return tuple(round(float(m), 4) for m in pixels.mean(0)), tuple(round(float(s), 4) for s in pixels.std(0))


def eval_workers(images, workers: int) -> int:
    """Loader workers for an evaluation loader over ``images``: ``workers`` for streamed files, 0 for cached arrays.

    A streamed image costs 2-5 ms to decode, so a streamed test set decoded in the training process takes minutes per
    evaluation at ImageNet scale; the run's workers decode it in parallel. A cached batch is one memory-map slice and
    one batched normalisation (``EvalDataset.__getitems__``), faster in the process than the start of a worker at every
    evaluation plus the batches' trip through shared memory.

    Args:
        images: the set to evaluate (``ImageFiles`` or ``ImageArrays``).
        workers: the run's loader workers (``--workers``, resolved).

    Returns:
        The worker count for ``make_eval_loader``.
    """
    return int(workers) if isinstance(images, ImageFiles) else 0


def train_crop(data) -> str:
    """The training views' geometry for a ``SourceData``: ``"resized"`` (RandomResizedCrop) for streamed files, whose
    images differ in size, ``"pad"`` (the reflect-padded crop of the paper's CIFAR recipe) for cached arrays."""
    return "resized" if isinstance(data.train, ImageFiles) else "pad"


def drop_unreadable(files: ImageFiles, log) -> ImageFiles:
    """``--skip-corrupt`` on a streamed set: decode every image once, up front, and drop the unreadable ones, each
    named in a warning line. A full decoding pass (what the cache path does anyway), so that training never meets an
    unreadable file later; without ``--skip-corrupt`` training stops at the first one, in one line naming it.

    Args:
        files: the streamed images (files in a folder or members of tar shards).
        log: receives one ``warning: skipped unreadable image ...`` line per dropped image.

    Returns:
        ``files`` without the unreadable images (the same object when all are readable).
    """
    bad = []
    for i in range(len(files)):
        try:
            files.images.open(i)
        except UserError as e:
            bad.append(i)
            log("warning: skipped unreadable image " + str(e).split("; fix")[0].removeprefix("cannot read image "))
    if not bad:
        return files
    return files.take(np.setdiff1d(np.arange(len(files)), bad))
