"""What every reader returns: ``ImageArrays`` (uint8 images and int64 labels) and ``SourceData`` (a whole data set)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch


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

    def take(self, rows) -> ImageArrays:
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
    """

    train: ImageArrays
    test: ImageArrays
    extra_unlabeled: ImageArrays | None
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[3])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[1])


def _memmap_ref(array: np.ndarray):
    """``(path, shape)`` for a C-contiguous memmap that covers its whole .npy file, else the array itself."""
    if isinstance(array, np.memmap) and array.filename and array.flags.c_contiguous:
        try:
            if array.offset + array.nbytes == os.path.getsize(array.filename):
                return (array.filename, array.shape)
        except OSError:
            pass
    return np.asarray(array)
