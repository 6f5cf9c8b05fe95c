"""Train batches augmented on the training device (``TrainConfig.augment_on = "device"``).

The loaders ship what the decode-once cache holds, uint8 ``(B, C, H, W)`` images, with their labels and sample seeds;
``DeviceViews`` moves each batch to the device and runs ``batch_augment``'s views there, in a few batched kernels
instead of one Pillow round trip per image in the workers. The iterators yield the same tuples as the loader path
(``(x_l, y_l)`` and ``(x_uw, x_us, y_u)``, normalized float32), so the training step takes either.

Resume contract, as in ``loader.py``: the sampler streams (``loader.train_samplers``) fix which images and which
sample seeds make up the batch of each step; the views draw from a generator seeded with those sample seeds. A batch
therefore depends only on ``(seed, step)``, not on ``num_workers``, the device, or an interruption.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from metapl.data.arrays import ImageArrays, SourceData
from metapl.data.batch_augment import BatchView
from metapl.data.loader import mix_seed, stream_loader, train_samplers
from metapl.data.split import Split


class RawImages(Dataset):
    """Unaugmented uint8 images with their labels and sample seeds, fetched a whole batch at a time.

    Args:
        sources: ``(arrays, rows)`` pairs; item ``i`` is the ``i``-th row of their concatenation.
        sides: one per-image array per source, aligned with its ``arrays`` (Reduced MPL: the large teacher's stored
            log-probabilities), whose rows end each batch; None: none.
    """

    def __init__(self, sources: Sequence[tuple[ImageArrays, np.ndarray]], sides: Sequence[np.ndarray] | None = None):
        self.sources = [(arrays, np.asarray(rows, dtype=np.int64)) for arrays, rows in sources]
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
        for s, ((arrays, rows), start, end) in enumerate(zip(self.sources, self.starts[:-1], self.starts[1:])):
            mine = (index >= start) & (index < end)
            if mine.any():
                picked = rows[index[mine] - start]
                images[mine] = arrays.images[picked]  # one fancy index per source: a copy out of the memmap
                labels[mine] = arrays.labels[picked]
                if side is not None:
                    side[mine] = self.sides[s][picked]
        batch = (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels), seeds)
        return batch if side is None else (*batch, torch.from_numpy(side))


def _whole_batch(batch):
    # RawImages.__getitems__ already returns the collated batch; a module-level function so workers can pickle it.
    return batch


class DeviceViews:
    """An endless iterator of augmented batches: ``(*views, labels)``, every tensor on ``device``.

    Args:
        loader: a loader of ``RawImages`` batches.
        device: where the views run and the batches go.
        views: the views to take of each batch, in order (one generator draws for all of them, in this order).
    """

    def __init__(self, loader, device: torch.device, views: Sequence[BatchView]):
        self.loader, self.device, self.views = loader, torch.device(device), tuple(views)
        self._batches = None  # the workers start at the first batch, not when the iterator is built

    def __iter__(self) -> DeviceViews:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        if self._batches is None:
            self._batches = iter(self.loader)
        images, labels, seeds, *side = next(self._batches)
        # Seeded by the batch's sample seeds, which the sampler derives from (seed, step) alone.
        generator = torch.Generator().manual_seed(mix_seed(*seeds.tolist()))
        images = images.to(self.device, non_blocking=True)
        views = (view(images, generator) for view in self.views)
        return (*views, *(t.to(self.device, non_blocking=True) for t in (labels, *side)))


def make_device_train_batches(
    data: SourceData,
    split: Split,
    *,
    batch_size: int,
    mu: int,
    seed: int,
    device: torch.device | str,
    weak: BatchView,
    strong: BatchView,
    labeled_view: BatchView | None = None,
    start_step: int = 0,
    num_workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    expand_labels_to: int | None = None,
    pin_memory: bool = False,
    side: tuple[np.ndarray, np.ndarray | None] | None = None,
) -> tuple[DeviceViews, DeviceViews]:
    """The endless labeled and unlabeled batches of one run, augmented on ``device``, positioned at ``start_step``.

    The same streams as ``loader.make_train_loaders`` (same images at the same steps); only where and how the views
    are computed differs.

    Args:
        data: the dataset.
        split: which train images are labeled / unlabeled.
        batch_size: labeled images per step (per rank).
        mu: unlabeled images per labeled image.
        seed: run seed.
        device: the training device.
        weak: weak view (labeled images and the weak unlabeled view).
        strong: strong view (the strong unlabeled view).
        labeled_view: the labeled images' view; None means ``weak``.
        start_step: the step to resume at.
        num_workers: loader worker processes per loader (they only copy uint8 rows out of the cache).
        rank: this process's shard under data parallelism.
        world_size: number of processes.
        expand_labels_to: repeat the labeled set within an epoch until it holds at least this many items.
        pin_memory: pin the uint8 batches for faster host-to-GPU copies.
        side: per-image arrays of the train and the extra images, as ``loader.make_train_loaders`` takes them.

    Returns:
        ``(labeled, unlabeled)`` iterators of ``(x_l, y_l)`` and ``(x_uw, x_us, y_u_true)`` (each with the ``side``
        rows last, when given).
    """
    labeled_ds = RawImages([(data.train, split.labeled)], None if side is None else side[:1])
    extra = [(data.extra_unlabeled, np.arange(len(data.extra_unlabeled)))] if data.extra_unlabeled is not None else []
    unlabeled_ds = RawImages([(data.train, split.unlabeled), *extra], None if side is None else side[: 1 + len(extra)])
    labeled_sampler, unlabeled_sampler = train_samplers(
        len(labeled_ds), len(unlabeled_ds), batch_size=batch_size, mu=mu, seed=seed, start_step=start_step, rank=rank,
        world_size=world_size, expand_labels_to=expand_labels_to,
    )  # fmt: skip
    common = (num_workers, pin_memory, True, 4, _whole_batch)  # persistent workers, prefetch 4 batches each
    labeled = stream_loader(labeled_ds, labeled_sampler, batch_size, *common)
    unlabeled = stream_loader(unlabeled_ds, unlabeled_sampler, mu * batch_size, *common)
    return DeviceViews(labeled, device, [labeled_view or weak]), DeviceViews(unlabeled, device, [weak, strong])
