"""The datasets the loaders fetch from: views made per image in the workers (``LabeledDataset``, ``UnlabeledDataset``),
raw uint8 batches for views made on the training device (``RawImages``), and evaluation images (``EvalDataset``).

Training items are fetched by the sampler's ``(index, sample_seed)`` keys (``sampling.py``); a per-image view runs with
torch's CPU generator seeded by the sample seed, so it depends on the sample alone, not on the worker that makes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset

from metapl.data.stores import EvalViews, ImageStore

_T = TypeVar("_T")


def _image_tensor(images: np.ndarray | EvalViews, i: int) -> torch.Tensor:
    # (H, W, C) uint8, possibly a read-only memmap row -> an owned (C, H, W) tensor.
    return torch.from_numpy(np.array(images[i])).permute(2, 0, 1)


def _seeded(sample_seed: int, fn: Callable[[], _T]) -> _T:
    """Run ``fn`` with torch's CPU generator seeded with ``sample_seed``, then restore it: the caller's draws are
    untouched."""
    # devices=[]: only the CPU generator is saved and seeded; CUDA generators are never touched (nor initialised),
    # which torch.manual_seed would do.
    # One intra-op thread: per-image ops on tiny tensors only lose to thread-pool hand-offs (a reflect pad of an
    # 8x8 image took 11 ms with 2 threads on a busy 2-core machine, 2 us with 1). Workers already run with 1 thread;
    # this also covers num_workers=0, restoring the caller's setting after each image.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed)
            return fn()
    finally:
        torch.set_num_threads(threads)


class LabeledDataset(Dataset):
    """Labeled images under a random ``transform``, fetched by ``(i, sample_seed)`` from a ``ResumableSampler``.

    Args:
        store: the train images.
        indices: which rows of ``store`` form this dataset (``split.labeled``); ``i`` indexes this list.
        transform: uint8 ``(C, H, W)`` -> float tensor.
        side: an array with one row per row of ``store`` (Reduced MPL: the large teacher's stored log-probabilities),
            whose row is appended to each item; None: items are ``(x, y)``.
    """

    def __init__(self, store: ImageStore, indices: np.ndarray, transform: Callable, side: np.ndarray | None = None):
        self.store, self.indices, self.transform = store, np.asarray(indices, dtype=np.int64), transform
        self.side = side

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        i, sample_seed = key
        row = int(self.indices[i])
        x = _seeded(sample_seed, lambda: self.transform(self.store.image(row)))
        item = (x, torch.tensor(int(self.store.labels[row]), dtype=torch.int64))
        return item if self.side is None else (*item, torch.from_numpy(np.array(self.side[row])))


class UnlabeledDataset(Dataset):
    """Unlabeled images as a (weak, strong) pair of views of the same image, plus the hidden true label.

    Args:
        store: the train images.
        indices: rows of ``store`` used as unlabeled data (``split.unlabeled``).
        weak: the weak transform.
        strong: the strong transform.
        extra: extra images without classes, appended after ``indices``.
        side: ``(rows of store, rows of extra)``, per-image arrays whose row is appended to each item (see
            ``LabeledDataset``); None: none.

    Items are ``(x_uw, x_us, y_true)``; ``y_true`` is -1 for extra images (only used to monitor pseudo-labels).
    """

    def __init__(
        self,
        store: ImageStore,
        indices: np.ndarray,
        weak: Callable,
        strong: Callable,
        extra: ImageStore | None = None,
        side: tuple[np.ndarray, np.ndarray | None] | None = None,
    ):
        self.store, self.indices, self.weak, self.strong = store, np.asarray(indices, dtype=np.int64), weak, strong
        self.extra, self.side = extra, side

    def __len__(self) -> int:
        return len(self.indices) + (len(self.extra) if self.extra is not None else 0)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        i, sample_seed = key
        from_extra = i >= len(self.indices)
        source, row = (self.extra, i - len(self.indices)) if from_extra else (self.store, int(self.indices[i]))
        assert source is not None  # a key past the store's rows is an extra image
        image = source.image(row)  # decoded here, in the worker, for streamed files
        x_uw, x_us = _seeded(sample_seed, lambda: (self.weak(image), self.strong(image)))
        item = (x_uw, x_us, torch.tensor(int(source.labels[row]), dtype=torch.int64))
        if self.side is None:
            return item
        side = self.side[from_extra]
        assert side is not None  # predictions for every store that yields images
        return (*item, torch.from_numpy(np.array(side[row])))


class EvalDataset(Dataset):
    """Images under a deterministic transform, by plain integer index: ``(x, y)``."""

    def __init__(self, store: ImageStore, transform: Callable):
        self.store, self.transform = store, transform

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(_image_tensor(self.store.images, i)), torch.tensor(int(self.store.labels[i]))

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # The DataLoader's batched fetch: the deterministic transform runs once on the whole (N, C, H, W) batch
        # instead of N times on single images.
        rows = np.asarray(indices, dtype=np.int64)
        images = torch.from_numpy(np.array(self.store.images[rows])).permute(0, 3, 1, 2)
        labels = torch.as_tensor(np.asarray(self.store.labels[rows]), dtype=torch.int64)
        return list(zip(self.transform(images).unbind(0), labels.unbind(0)))


class RawImages(Dataset):
    """Unaugmented uint8 images with their labels and sample seeds, fetched a whole batch at a time.

    Args:
        sources: ``(store, rows)`` pairs of cached arrays; item ``i`` is the ``i``-th row of their concatenation.
        sides: one per-image array per source, aligned with its ``store`` (Reduced MPL: the large teacher's stored
            log-probabilities), whose rows end each batch; None: none.
    """

    def __init__(self, sources: Sequence[tuple[ImageStore, np.ndarray]], sides: Sequence[np.ndarray] | None = None):
        self.sources = [(store, np.asarray(rows, dtype=np.int64)) for store, rows in sources]
        self.starts = np.cumsum([0] + [len(rows) for _, rows in self.sources])
        self.sides = sides

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitems__(self, keys: list[tuple[int, int]]) -> tuple[torch.Tensor, ...]:
        """The batch of the sampler's ``(index, sample_seed)`` keys.

        Returns:
            uint8 ``(B, C, H, W)`` images, int64 ``(B,)`` labels, int64 ``(B,)`` sample seeds (and the ``sides``
            rows, when given).
        """
        index = np.fromiter((k[0] for k in keys), dtype=np.int64, count=len(keys))
        seeds = torch.tensor([k[1] for k in keys], dtype=torch.int64)
        first = self.sources[0][0]
        images = np.empty((len(keys), *first.images.shape[1:]), dtype=np.uint8)  # (B, H, W, C)
        labels = np.empty(len(keys), dtype=np.int64)
        side = None if self.sides is None else np.empty((len(keys), *self.sides[0].shape[1:]), self.sides[0].dtype)
        for s, ((store, rows), start, end) in enumerate(zip(self.sources, self.starts[:-1], self.starts[1:])):
            mine = (index >= start) & (index < end)
            if mine.any():
                picked = rows[index[mine] - start]
                images[mine] = store.images[picked]  # one fancy index per source: a copy out of the memmap
                labels[mine] = store.labels[picked]
                if side is not None and self.sides is not None:
                    side[mine] = self.sides[s][picked]
        batch = (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels), seeds)
        return batch if side is None else (*batch, torch.from_numpy(side))


def whole_batch(batch: _T) -> _T:
    """``RawImages.__getitems__`` already returns the collated batch; module-level so that workers can pickle it."""
    return batch
