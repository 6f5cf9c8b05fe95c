"""Datasets and infinite, exactly resumable train loaders.

Resume contract: the batches, and every augmentation inside them, depend only on ``(seed, step)``, never on
``num_workers`` or on whether the run was interrupted. The sampler (in the main process) decides which image comes at
each position of the stream and gives it a ``sample_seed``; the worker that draws it seeds torch's CPU generator with
that seed, so which worker, or which process, does the work does not matter.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from metapl.data.arrays import ImageArrays, SourceData
from metapl.data.split import Split
from metapl.data.transforms import eval_transform

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    # _splitmix64 on a uint64 array: numpy's uint64 arithmetic wraps modulo 2**64 like the masks above.
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def mix_seeds(*values: int, last: np.ndarray) -> np.ndarray:
    """``mix_seed(*values, v)`` for every ``v`` of ``last`` at once (the sampler's seeds of a whole epoch).

    Args:
        *values: the leading integers, shared by every seed.
        last: non-negative int64 array of the last integer.

    Returns:
        uint64 array of seeds, equal to ``mix_seed`` element by element.
    """
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return _splitmix64_array(np.uint64(h) ^ np.asarray(last).astype(np.uint64)) >> np.uint64(1)


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (SplitMix64 chained), fit for ``torch.Generator.manual_seed``.

    Args:
        *values: the integers to combine, e.g. ``(seed, epoch, position)``.

    Returns:
        An int in ``[0, 2**63)``.
    """
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1


class ResumableSampler(Sampler):
    """An endless, sharded stream of ``(index, sample_seed)`` that can start at any position.

    Epoch ``e`` is a permutation of ``num_items * repeat`` positions (item = position % num_items) drawn from a
    generator seeded with ``(seed, e)``, padded to a multiple of ``world_size`` like ``DistributedSampler`` and
    dealt out as ``perm[rank::world_size]``. ``sample_seed`` mixes ``(seed, epoch, position in the epoch)``, so it is
    the same whatever ``world_size`` is.

    Args:
        num_items: size of the dataset.
        seed: stream seed.
        start: how many items of this rank's stream to skip (``step * batch_size`` to resume at ``step``).
        rank: this process's shard.
        world_size: number of shards.
        repeat: the epoch holds each item this many times ("expand labels": a small labeled set still fills a
            whole evaluation interval without reshuffling mid-interval).
    """

    def __init__(
        self, num_items: int, *, seed: int, start: int = 0, rank: int = 0, world_size: int = 1, repeat: int = 1
    ):
        if num_items <= 0:
            raise ValueError("ResumableSampler needs at least one item")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.num_items, self.seed, self.start = num_items, seed, start
        self.rank, self.world_size, self.repeat = rank, world_size, max(1, int(repeat))
        self.epoch_total = num_items * self.repeat
        self.per_rank = math.ceil(self.epoch_total / world_size)  # items of one epoch on each rank, after padding

    def epoch_positions(self, epoch: int) -> np.ndarray:
        """This rank's positions of epoch ``epoch``, in order (positions ``p`` map to item ``p % num_items``)."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        perm = torch.randperm(self.epoch_total, generator=g).numpy()
        pad = self.per_rank * self.world_size - self.epoch_total
        if pad:  # as DistributedSampler: repeat the head so every rank gets the same count
            perm = np.concatenate([perm, np.resize(perm, pad)])
        return perm[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            positions = self.epoch_positions(epoch)
            # The sample seed uses the index in the padded global order, so padded duplicates get fresh views.
            # Computed for the rest of the epoch at once: one Python splitmix chain per item cost ~5 us.
            order = self.rank + np.arange(offset, len(positions), dtype=np.int64) * self.world_size
            seeds = mix_seeds(self.seed, epoch, last=order).tolist()
            items = (positions[offset:] % self.num_items).tolist()
            yield from zip(items, seeds)
            epoch, offset = epoch + 1, 0


class ItemsSampler(Sampler):
    """An endless stream of ``(index, sample_seed)`` over one rank's own ``items`` (``--per-rank-shards``).

    A ``ResumableSampler`` of one shard over ``len(items)`` positions, seeded with ``(seed, rank)``: epoch ``e`` is a
    permutation of ``items`` drawn from ``(seed, rank, e)``, and ``start`` skips items of this rank's stream exactly as
    there, so resuming at a step is exact. Ranks own different numbers of items, so their epochs differ in length; the
    streams are endless and each step takes the same count from each, so no rank waits.

    Args:
        items: the dataset indices this rank reads.
        seed: stream seed.
        start: how many items of this rank's stream to skip.
        rank: this process's rank (mixed into the seed: ranks draw distinct permutations and views).
    """

    def __init__(self, items: np.ndarray, *, seed: int, start: int = 0, rank: int = 0):
        self.items = np.asarray(items, dtype=np.int64)
        self.positions = ResumableSampler(len(self.items), seed=mix_seed(seed, rank), start=start)
        self.per_rank = self.positions.per_rank  # items of one epoch on this rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for j, sample_seed in self.positions:
            yield int(self.items[j]), sample_seed


def _image_tensor(images: np.ndarray, i: int) -> torch.Tensor:
    # (H, W, C) uint8, possibly a read-only memmap row -> an owned (C, H, W) tensor.
    return torch.from_numpy(np.array(images[i])).permute(2, 0, 1)


def _seeded(sample_seed: int, fn: Callable):
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
    """Labeled images under a random ``transform``, fetched by ``(i, sample_seed)`` from ``ResumableSampler``.

    Args:
        arrays: the train arrays.
        indices: which rows of ``arrays`` form this dataset (``split.labeled``); ``i`` indexes this list.
        transform: uint8 ``(C, H, W)`` -> float tensor.
        side: an array with one row per row of ``arrays`` (Reduced MPL: the large teacher's stored log-probabilities),
            whose row is appended to each item; None: items are ``(x, y)``.
    """

    def __init__(self, arrays: ImageArrays, indices: np.ndarray, transform: Callable, side: np.ndarray | None = None):
        self.arrays, self.indices, self.transform = arrays, np.asarray(indices, dtype=np.int64), transform
        self.side = side

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        i, sample_seed = key
        row = int(self.indices[i])
        x = _seeded(sample_seed, lambda: self.transform(self.arrays.image(row)))
        item = (x, torch.tensor(int(self.arrays.labels[row]), dtype=torch.int64))
        return item if self.side is None else (*item, torch.from_numpy(np.array(self.side[row])))


class UnlabeledDataset(Dataset):
    """Unlabeled images as a (weak, strong) pair of views of the same image, plus the hidden true label.

    Args:
        arrays: the train arrays.
        indices: rows of ``arrays`` used as unlabeled data (``split.unlabeled``).
        weak: the weak transform.
        strong: the strong transform.
        extra: extra images without classes, appended after ``indices``.
        side: ``(rows of arrays, rows of extra)``, per-image arrays whose row is appended to each item (see
            ``LabeledDataset``); None: none.

    Items are ``(x_uw, x_us, y_true)``; ``y_true`` is -1 for extra images (only used to monitor pseudo-labels).
    """

    def __init__(
        self,
        arrays: ImageArrays,
        indices: np.ndarray,
        weak: Callable,
        strong: Callable,
        extra: ImageArrays | None = None,
        side: tuple[np.ndarray, np.ndarray | None] | None = None,
    ):
        self.arrays, self.indices, self.weak, self.strong = arrays, np.asarray(indices, dtype=np.int64), weak, strong
        self.extra, self.side = extra, side

    def __len__(self) -> int:
        return len(self.indices) + (len(self.extra) if self.extra is not None else 0)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        i, sample_seed = key
        from_extra = i >= len(self.indices)
        source, row = (self.extra, i - len(self.indices)) if from_extra else (self.arrays, int(self.indices[i]))
        image = source.image(row)  # decoded here, in the worker, for streamed files
        x_uw, x_us = _seeded(sample_seed, lambda: (self.weak(image), self.strong(image)))
        item = (x_uw, x_us, torch.tensor(int(source.labels[row]), dtype=torch.int64))
        if self.side is None:
            return item
        return (*item, torch.from_numpy(np.array(self.side[from_extra][row])))


class EvalDataset(Dataset):
    """Images under a deterministic transform, by plain integer index: ``(x, y)``."""

    def __init__(self, arrays: ImageArrays, transform: Callable):
        self.arrays, self.transform = arrays, transform

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(_image_tensor(self.arrays.images, i)), torch.tensor(int(self.arrays.labels[i]))

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # The DataLoader's batched fetch: the deterministic transform runs once on the whole (N, C, H, W) batch
        # instead of N times on single images.
        rows = np.asarray(indices, dtype=np.int64)
        images = torch.from_numpy(np.array(self.arrays.images[rows])).permute(0, 3, 1, 2)
        labels = torch.as_tensor(np.asarray(self.arrays.labels[rows]), dtype=torch.int64)
        return list(zip(self.transform(images).unbind(0), labels.unbind(0)))


def _worker_init(_worker_id: int) -> None:
    # Each worker handles one image at a time; intra-op threads would only oversubscribe the cores.
    torch.set_num_threads(1)
    # Ctrl-C and a scheduler's SIGTERM (SLURM's scancel, a time limit) reach the whole process group: the main process
    # saves a checkpoint and stops its workers itself, so a worker killed by the same signal would only break the
    # batches it still has to deliver (and the main process would die of "DataLoader worker ... killed by signal").
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def stream_loader(dataset, sampler, batch_size, num_workers, pin_memory, persistent_workers, prefetch_factor,
                  collate_fn=None) -> DataLoader:  # fmt: skip
    """A ``DataLoader`` of ``batch_size`` items from a ``ResumableSampler`` stream, workers set up for it.

    Args:
        dataset: fetched by the sampler's ``(index, sample_seed)`` keys.
        sampler: a ``ResumableSampler``.
        batch_size: items per batch.
        num_workers: worker processes (0 = in the main process).
        pin_memory: pin batches for faster host-to-GPU copies.
        persistent_workers: keep the workers between epochs.
        prefetch_factor: batches prefetched per worker.
        collate_fn: None for torch's default; a dataset whose ``__getitems__`` builds the batch passes its own.

    Returns:
        The loader.
    """
    workers = num_workers > 0
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if workers else None,
        persistent_workers=persistent_workers and workers,
        prefetch_factor=prefetch_factor if workers else None,
        # Its own generator: creating the iterator draws a base seed, which must not come from (and shift) the
        # global generator that dropout uses, or a resumed run would diverge from an uninterrupted one.
        generator=torch.Generator(),
    )


def train_samplers(
    num_labeled: int, num_unlabeled: int, *, batch_size: int, mu: int, seed: int, start_step: int = 0, rank: int = 0,
    world_size: int = 1, expand_labels_to: int | None = None, unlabeled_items: np.ndarray | None = None,
) -> tuple[ResumableSampler, ResumableSampler | ItemsSampler]:  # fmt: skip
    """The labeled and unlabeled streams of one training run, positioned at ``start_step``.

    Args:
        num_labeled: labeled images.
        num_unlabeled: unlabeled images (extra ones included).
        batch_size: labeled images per step (per rank).
        mu: unlabeled images per labeled image.
        seed: run seed; the two streams use different seeds derived from it.
        start_step: the step to resume at; both streams skip exactly the items the earlier steps consumed.
        rank: this process's shard.
        world_size: number of processes.
        expand_labels_to: repeat the labeled set within an epoch until it holds at least this many items.
        unlabeled_items: the unlabeled items this rank reads alone (``shards.rank_unlabeled_items``); None: a
            ``world_size``-th share of all of them.

    Returns:
        ``(labeled_sampler, unlabeled_sampler)``.
    """
    repeat = max(1, math.ceil(expand_labels_to / num_labeled)) if expand_labels_to else 1
    labeled = ResumableSampler(num_labeled, seed=mix_seed(seed, 1), start=start_step * batch_size, rank=rank,
                               world_size=world_size, repeat=repeat)  # fmt: skip
    start = start_step * mu * batch_size
    if unlabeled_items is not None:
        return labeled, ItemsSampler(unlabeled_items, seed=mix_seed(seed, 2), start=start, rank=rank)
    unlabeled = ResumableSampler(num_unlabeled, seed=mix_seed(seed, 2), start=start, rank=rank, world_size=world_size)
    return labeled, unlabeled


def make_train_loaders(
    data: SourceData,
    split: Split,
    *,
    batch_size: int,
    mu: int,
    seed: int,
    start_step: int = 0,
    num_workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    weak: Callable,
    strong: Callable,
    expand_labels_to: int | None = None,
    labeled_transform: Callable | None = None,
    pin_memory: bool = False,
    persistent_workers: bool = True,
    prefetch_factor: int = 4,
    unlabeled_items: np.ndarray | None = None,
    side: tuple[np.ndarray, np.ndarray | None] | None = None,
) -> tuple[DataLoader, DataLoader]:
    """The endless labeled and unlabeled loaders of one training run, positioned at ``start_step``.

    Args:
        data: the dataset.
        split: which train images are labeled / unlabeled.
        batch_size: labeled images per step (per rank).
        mu: unlabeled images per labeled image; the unlabeled batch is ``mu * batch_size``.
        seed: run seed; the two streams use different seeds derived from it.
        start_step: the step to resume at; both streams skip exactly the items the earlier steps consumed.
        num_workers: loader worker processes for each loader (0 = in the main process; the batches are identical).
        rank: this process's shard under data parallelism.
        world_size: number of processes.
        weak: weak transform (labeled images and the weak unlabeled view).
        strong: strong transform (the strong unlabeled view).
        expand_labels_to: repeat the labeled set within an epoch until it holds at least this many items (e.g.
            ``batch_size * eval_every``).
        labeled_transform: the labeled images' transform; None means ``weak`` (``strong`` gives the paper's
            "RandAugment" rows of its ablation).
        pin_memory: pin batches for faster host-to-GPU copies.
        persistent_workers: keep workers between epochs (the streams are endless, so this rarely matters).
        prefetch_factor: batches prefetched per worker.
        unlabeled_items: positions of the unlabeled set this rank reads alone (see ``train_samplers``).
        side: per-image arrays for the train and the extra images (Reduced MPL: the large teacher's stored
            log-probabilities); each batch then ends with the rows of its images.

    Returns:
        ``(labeled_loader, unlabeled_loader)``: batches ``(x_l, y_l)`` and ``(x_uw, x_us, y_u_true)`` (each with the
        ``side`` rows last, when given).
    """
    unlabeled_ds = UnlabeledDataset(data.train, split.unlabeled, weak, strong, extra=data.extra_unlabeled, side=side)
    labeled_ds = LabeledDataset(data.train, split.labeled, labeled_transform or weak, None if side is None else side[0])
    labeled_sampler, unlabeled_sampler = train_samplers(
        len(labeled_ds), len(unlabeled_ds), batch_size=batch_size, mu=mu, seed=seed, start_step=start_step, rank=rank,
        world_size=world_size, expand_labels_to=expand_labels_to, unlabeled_items=unlabeled_items,
    )  # fmt: skip
    common = (num_workers, pin_memory, persistent_workers, prefetch_factor)
    labeled = stream_loader(labeled_ds, labeled_sampler, batch_size, *common)
    unlabeled = stream_loader(unlabeled_ds, unlabeled_sampler, mu * batch_size, *common)
    return labeled, unlabeled


def make_eval_loader(
    arrays: ImageArrays,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = 512,
    num_workers: int = 0,
) -> DataLoader:
    """A finite, ordered loader of normalized images for evaluation.

    Args:
        arrays: e.g. ``data.test``.
        mean: per-channel mean in [0, 1] units.
        std: per-channel std in [0, 1] units.
        batch_size: images per batch.
        num_workers: loader worker processes.

    Returns:
        A ``DataLoader`` of ``(x, y)`` batches in dataset order.
    """
    return DataLoader(
        EvalDataset(arrays, eval_transform(mean, std)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        generator=torch.Generator(),  # see stream_loader: leave the global generator alone
    )
