"""Image stores: what every reader returns and every loader reads, behind one protocol, ``ImageStore``.

Three stores implement it:

* ``ImageArrays``: decoded uint8 arrays, usually read-only memory maps into the decode-once cache;
* ``sources.streamed.FolderImages``: the files of an image folder too large to cache, decoded when read;
* ``sources.shards.ShardImages``: members of WebDataset-style tar shards, decoded when read.

The two undecoded ones share ``StreamedImages``: their ``images`` look like a ``(N, S, S, 3)`` uint8 array of
evaluation views (shorter side resized to ``S / EVAL_CROP``, centre crop ``S``), so that evaluation loaders, the data
fingerprint and the channel statistics read every store alike, while ``image(i)`` hands the training views the whole
image at its own size. ``SourceData`` is a whole data set: train, test and extra unlabeled stores plus what the views
need to know about them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import IO, Protocol, runtime_checkable

import numpy as np
import torch
from numpy.typing import ArrayLike
from PIL import Image

from metapl.errors import UserError

EVAL_CROP = 0.875  # a streamed image's evaluation view covers this fraction of its shorter side (224 of 256)


@runtime_checkable
class ImageStore(Protocol):
    """Labeled images, as the datasets, the split, the fingerprint and the evaluation loaders read them.

    Attributes:
        labels: ``(N,)`` int64 class indices, -1 where the class is unknown (extra unlabeled images).
        images: ``(N, H, W, C)`` uint8, or an object that indexes like one (rows decoded on access).
    """

    labels: np.ndarray

    @property
    def images(self) -> np.ndarray | EvalViews: ...

    def __len__(self) -> int: ...

    def image(self, i: int) -> torch.Tensor:
        """Row ``i`` as the training views' input: an owned uint8 ``(C, H, W)`` tensor."""
        ...

    def take(self, rows: ArrayLike) -> ImageStore:
        """The images at ``rows`` (an index array), as a store of the same kind."""
        ...


@dataclass
class ImageArrays:
    """Decoded images and their labels; ``images`` is often a read-only ``np.memmap`` into the cache.

    Attributes:
        images: ``(N, H, W, C)`` uint8, C = 1 (grayscale) or 3 (RGB).
        labels: ``(N,)`` int64 class indices, -1 where the class is unknown (extra unlabeled images).
    """

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> torch.Tensor:
        """Row ``i`` as the training views' input: an owned uint8 ``(C, H, W)`` tensor (a memmap row is copied)."""
        return torch.from_numpy(np.array(self.images[i])).permute(2, 0, 1)

    def take(self, rows: ArrayLike) -> ImageArrays:
        """The images at ``rows`` (an index array), copied into memory."""
        rows = np.asarray(rows, dtype=np.int64)
        return ImageArrays(np.asarray(self.images[rows]), np.asarray(self.labels[rows]))

    def __repr__(self) -> str:
        kind = " memmap" if isinstance(self.images, np.memmap) else ""
        images, labels = self.images, self.labels
        return f"ImageArrays(images={images.dtype}{images.shape}{kind}, labels={labels.dtype}{labels.shape})"

    def __getstate__(self) -> dict:
        # Loader workers started with "spawn" pickle the dataset: send a whole-file memmap as its path, not its bytes.
        return {name: _memmap_ref(getattr(self, name)) for name in ("images", "labels")}

    def __setstate__(self, state: dict) -> None:
        for name, value in state.items():
            if isinstance(value, tuple):
                path, shape = value
                value = np.load(path, mmap_mode="r").reshape(shape)
            setattr(self, name, value)


def _memmap_ref(array: np.ndarray) -> tuple[str, tuple[int, ...]] | np.ndarray:
    """``(path, shape)`` for a C-contiguous memmap that covers its whole .npy file, else the array itself."""
    if isinstance(array, np.memmap) and array.filename and array.flags.c_contiguous:
        try:
            if array.offset + array.nbytes == os.path.getsize(array.filename):
                return (array.filename, array.shape)
        except OSError:
            pass
    return np.asarray(array)


class StreamedImages:
    """Undecoded images and their labels: the ``ImageStore`` of sets too large to decode into the cache.

    Nothing here depends on the number of loader workers or processes: which image comes when, and its random view, is
    decided by the sampler and the per-sample seed, so exact resume and rank sharding work as for cached arrays.
    Subclasses say where an image's bytes are: ``open(i, min_side)`` (a decoded RGB Pillow image) and ``take(rows)``.

    Attributes:
        labels: ``(N,)`` int64 class indices, in memory (the seeded split is drawn from them as on the cache path).
        size: side of the evaluation views (``--image-size``).
    """

    labels: np.ndarray
    size: int

    def __len__(self) -> int:
        return len(self.labels)

    def open(self, i: int, min_side: int | None = None) -> Image.Image:
        """Image ``i`` decoded as RGB (see ``open_rgb`` for ``min_side``)."""
        raise NotImplementedError

    def take(self, rows: ArrayLike) -> StreamedImages:
        """The images at ``rows``, still undecoded."""
        raise NotImplementedError

    @property
    def images(self) -> EvalViews:
        """The evaluation views, indexed like a uint8 ``(N, size, size, 3)`` array."""
        return EvalViews(self)

    def image(self, i: int) -> torch.Tensor:
        """Image ``i`` whole, at its own size, as the training views' input: uint8 ``(3, H, W)``."""
        array = np.asarray(self.open(i))
        return torch.from_numpy(array.copy()).permute(2, 0, 1)


class EvalViews:
    """A ``StreamedImages``' evaluation views, indexed like a uint8 ``(N, size, size, 3)`` array, decoded on access.

    Args:
        store: the streamed images.
    """

    dtype = np.dtype(np.uint8)

    def __init__(self, store: StreamedImages) -> None:
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.store), self.store.size, self.store.size, 3)

    def __getitem__(self, key: int | np.integer | slice | ArrayLike) -> np.ndarray:
        size = self.store.size
        if isinstance(key, (int, np.integer)):
            return centre_view(self.store.open(int(key), min_side=size), size)
        rows = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key, dtype=np.int64)
        out = np.empty((len(rows), size, size, 3), dtype=np.uint8)
        for j, i in enumerate(rows):
            out[j] = self[int(i)]
        return out


def open_rgb(
    source: str | os.PathLike[str] | IO[bytes], min_side: int | None = None, name: str | None = None
) -> Image.Image:
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
        reason = printable(f"{type(e).__name__}: {e}")
        raise UserError(f"cannot read image {printable(str(name or source))} ({reason}); fix or delete it") from None


def printable(text: str) -> str:
    """``text`` with the bytes of a file name that is not UTF-8 (held as surrogates, ``os.fsdecode``'s rule) shown as
    U+FFFD: a message naming such a file can then be printed to any UTF-8 terminal and log file."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def centre_view(image: Image.Image, size: int) -> np.ndarray:
    """A streamed image's evaluation view: resize the shorter side to ``size / EVAL_CROP``, crop the centre square.

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


class StringTable:
    """Many strings (relative paths, sample keys) as one bytes buffer plus offsets: two NumPy arrays instead of a
    million ``str`` objects, which loader workers would otherwise copy page by page as they touch the objects'
    reference counts.

    Args:
        names: the strings.
    """

    def __init__(self, names: list[str]) -> None:
        encoded = [n.encode("utf-8", "surrogateescape") for n in names]  # a file name that is not UTF-8 keeps its bytes
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
        return self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")

    def take(self, rows: np.ndarray) -> StringTable:
        return StringTable([self[int(i)] for i in rows])


@dataclass
class SourceData:
    """A dataset ready for splitting and loading.

    Attributes:
        train: labeled training images (the labels of the "unlabeled" part are kept to report pseudo-label accuracy).
        test: held-out evaluation images.
        extra_unlabeled: images without classes from ``--unlabeled-dir`` (labels all -1), or None.
        classes: class names, index = label.
        mean: per-channel mean in [0, 1] units, for ``Normalize``.
        std: per-channel standard deviation in [0, 1] units.
        hflip: whether the weak view should flip horizontally by default.
        val: labeled validation images of their own (a folder's ``val/`` beside its ``test/``), or None: the run
            then carves its validation images out of the labeled draw (``--val-labeled``).
    """

    train: ImageStore
    test: ImageStore
    extra_unlabeled: ImageStore | None
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool
    val: ImageStore | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[3])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def streamed(self) -> bool:
        """Whether the images are decoded in the loader workers (folders too large to cache, tar shards)."""
        return isinstance(self.train, StreamedImages)
