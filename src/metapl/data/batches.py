"""Training batches: ``make_train_batches`` turns a data set, its split and a ``BatchSpec`` into the endless labeled
and unlabeled batches of a run, with the views made per image in the loader workers or per batch on the device.

Both backends draw the same streams (``sampling.py``): the images of each step and their sample seeds depend only on
``(seed, step)``. With ``augment_on="loader"`` the workers run ``per_image`` views on each image
(``datasets.LabeledDataset`` / ``UnlabeledDataset``); with ``augment_on="device"`` they only copy uint8 rows out of the
decode-once cache (``datasets.RawImages``) and ``DeviceViews`` runs ``BatchView`` views on each whole batch on the
training device, in a few batched kernels instead of one Pillow round trip per image. Either yields the same tuples,
``(x_l, y_l)`` and ``(x_uw, x_us, y_u)``, normalized float32, so the training step takes either.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from metapl.data.datasets import EvalDataset, LabeledDataset, RawImages, UnlabeledDataset, whole_batch
from metapl.data.sampling import ItemsSampler, ResumableSampler, mix_seed
from metapl.data.split import Split
from metapl.data.stores import ImageStore, SourceData, StreamedImages
from metapl.data.views import BatchView, ViewSpec, eval_transform, per_image

AUGMENT_ON = ("loader", "device")
PREFETCH = 4  # batches prefetched per worker; the workers persist (the streams are endless)
# Per-image rows that end each batch (Reduced MPL: the large teacher's stored predictions): the train images', the extra
# unlabeled images' (None without them).
Side = tuple[np.ndarray, np.ndarray | None]


@dataclass(frozen=True)
class BatchSpec:
    """What ``make_train_batches`` makes: the streams, the views, and where the views run.

    Attributes:
        batch_size: labeled images per step (per rank).
        seed: run seed; the two streams use different seeds derived from it.
        weak: weak view (labeled images and the weak unlabeled view).
        strong: strong view (the strong unlabeled view); None: no unlabeled batches (supervised training).
        labeled: the labeled images' view; None means ``weak`` (``strong`` gives the paper's "RandAugment" rows of
            its ablation).
        mu: unlabeled images per labeled image; the unlabeled batch is ``mu * batch_size``.
        start_step: the step to resume at; both streams skip exactly the items the earlier steps consumed.
        rank: this process's shard under data parallelism.
        world_size: number of processes.
        expand_labels_to: repeat the labeled set within an epoch until it holds at least this many items (e.g.
            ``batch_size * eval_every``).
        unlabeled_items: positions of the unlabeled set this rank reads alone (``rank_unlabeled_items``); None: a
            ``world_size``-th share of all of them.
        augment_on: ``"loader"`` (per image, in the workers) or ``"device"`` (per batch, on ``device``; cached arrays
            only).
        device: the training device; the device views run there, and batches for CUDA are pinned.
        workers: loader worker processes per stream (0 = in the main process; the batches are identical).
    """

    batch_size: int
    seed: int
    weak: ViewSpec
    strong: ViewSpec | None = None
    labeled: ViewSpec | None = None
    mu: int = 1
    start_step: int = 0
    rank: int = 0
    world_size: int = 1
    expand_labels_to: int | None = None
    unlabeled_items: np.ndarray | None = None
    augment_on: str = "loader"
    device: torch.device | str = "cpu"
    workers: int = 2

    def __post_init__(self) -> None:
        if self.augment_on not in AUGMENT_ON:
            raise ValueError(f"unknown augment_on {self.augment_on!r}; choose one of {', '.join(AUGMENT_ON)}")

    @property
    def pin_memory(self) -> bool:
        return torch.device(self.device).type == "cuda"


def make_train_batches(
    data: SourceData, split: Split, spec: BatchSpec, *, side: Side | None = None
) -> tuple[Iterable, Iterable | None]:
    """The endless labeled and unlabeled batches of one training run, positioned at ``spec.start_step``.

    Args:
        data: the dataset.
        split: which train images are labeled / unlabeled.
        spec: the streams, the views and their backend.
        side: per-image arrays of the train and the extra images (Reduced MPL: the large teacher's stored
            log-probabilities); each batch then ends with the rows of its images.

    Returns:
        ``(labeled, unlabeled)``: iterables of ``(x_l, y_l)`` and ``(x_uw, x_us, y_u_true)`` batches (each with the
        ``side`` rows last, when given; ``y_u_true`` is -1 for extra images); ``unlabeled`` is None without
        ``spec.strong``. The loader backend gives ``DataLoader``s, the device backend ``DeviceViews``.
    """
    if spec.augment_on == "device":
        return _device_batches(data, split, spec, side)
    return _loader_batches(data, split, spec, side)


def _loader_batches(
    data: SourceData, split: Split, spec: BatchSpec, side: Side | None
) -> tuple[DataLoader, DataLoader | None]:
    """``make_train_batches`` with the views made per image, in the loader workers."""
    labeled_side = None if side is None else side[0]
    labeled_ds = LabeledDataset(data.train, split.labeled, per_image(spec.labeled or spec.weak), labeled_side)
    labeled = _stream_loader(labeled_ds, _labeled_sampler(len(labeled_ds), spec), spec.batch_size, spec)
    if spec.strong is None:
        return labeled, None
    weak, strong = per_image(spec.weak), per_image(spec.strong)
    unlabeled_ds = UnlabeledDataset(data.train, split.unlabeled, weak, strong, extra=data.extra_unlabeled, side=side)
    sampler = _unlabeled_sampler(len(unlabeled_ds), spec)
    return labeled, _stream_loader(unlabeled_ds, sampler, spec.mu * spec.batch_size, spec)


def _device_batches(
    data: SourceData, split: Split, spec: BatchSpec, side: Side | None
) -> tuple[DeviceViews, DeviceViews | None]:
    """``make_train_batches`` with the views made per batch on ``spec.device``; the workers copy uint8 rows only."""
    labeled_ds = RawImages([(data.train, split.labeled)], None if side is None else side[:1])
    loader = _stream_loader(labeled_ds, _labeled_sampler(len(labeled_ds), spec), spec.batch_size, spec, whole_batch)
    labeled = DeviceViews(loader, spec.device, [BatchView(spec.labeled or spec.weak)])
    if spec.strong is None:
        return labeled, None
    extra = [(data.extra_unlabeled, np.arange(len(data.extra_unlabeled)))] if data.extra_unlabeled is not None else []
    # The extra images' rows are there when the extra images are (make_train_batches' ``side``).
    sides = None if side is None else cast("tuple[np.ndarray, ...]", side[: 1 + len(extra)])
    unlabeled_ds = RawImages([(data.train, split.unlabeled), *extra], sides)
    sampler = _unlabeled_sampler(len(unlabeled_ds), spec)
    loader = _stream_loader(unlabeled_ds, sampler, spec.mu * spec.batch_size, spec, whole_batch)
    return labeled, DeviceViews(loader, spec.device, [BatchView(spec.weak), BatchView(spec.strong)])


def _labeled_sampler(num_labeled: int, spec: BatchSpec) -> ResumableSampler:
    """The labeled stream: ``spec.batch_size`` items per step, the set repeated up to ``spec.expand_labels_to``."""
    repeat = max(1, math.ceil(spec.expand_labels_to / num_labeled)) if spec.expand_labels_to else 1
    start = spec.start_step * spec.batch_size
    return ResumableSampler(
        num_labeled, seed=mix_seed(spec.seed, 1), start=start, rank=spec.rank, world_size=spec.world_size, repeat=repeat
    )


def _unlabeled_sampler(num_unlabeled: int, spec: BatchSpec) -> ResumableSampler | ItemsSampler:
    """The unlabeled stream (extra images included): ``spec.mu * spec.batch_size`` items per step, a
    ``world_size``-th share of them or this rank's own ``spec.unlabeled_items``."""
    start, seed = spec.start_step * spec.mu * spec.batch_size, mix_seed(spec.seed, 2)
    if spec.unlabeled_items is not None:
        return ItemsSampler(spec.unlabeled_items, seed=seed, start=start, rank=spec.rank)
    return ResumableSampler(num_unlabeled, seed=seed, start=start, rank=spec.rank, world_size=spec.world_size)


def _stream_loader(
    dataset: Dataset,
    sampler: ResumableSampler | ItemsSampler,
    batch_size: int,
    spec: BatchSpec,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """A ``DataLoader`` of ``batch_size`` items from a sampler's endless stream, workers set up for it.

    Args:
        dataset: fetched by the sampler's ``(index, sample_seed)`` keys.
        sampler: a ``ResumableSampler`` or ``ItemsSampler``.
        batch_size: items per batch.
        spec: ``workers`` (0 = in the main process) and ``device`` (batches for CUDA are pinned) are read.
        collate_fn: None for torch's default; a dataset whose ``__getitems__`` builds the batch passes its own.

    Returns:
        The loader.
    """
    workers = spec.workers > 0
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=spec.workers,
        collate_fn=collate_fn,
        pin_memory=spec.pin_memory,
        worker_init_fn=_worker_init if workers else None,
        persistent_workers=workers,
        prefetch_factor=PREFETCH if workers else None,
        # Its own generator: creating the iterator draws a base seed, which must not come from (and shift) the
        # global generator that dropout uses, or a resumed run would diverge from an uninterrupted one.
        generator=torch.Generator(),
    )


class DeviceViews:
    """An endless iterator of augmented batches: ``(*views, labels)``, every tensor on ``device``.

    Args:
        loader: a loader of ``RawImages`` batches.
        device: where the views run and the batches go.
        views: the views to take of each batch, in order (one generator draws for all of them, in this order).
    """

    def __init__(self, loader: DataLoader, device: torch.device | str, views: Sequence[BatchView]) -> None:
        self.loader, self.device, self.views = loader, torch.device(device), tuple(views)
        self._batches: Iterator | None = None  # the workers start at the first batch, not when the iterator is built

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


def close_batches(*iterators: object) -> None:
    """Stop the loader workers behind iterators of ``make_train_batches`` (``None`` entries are skipped).

    A training loop calls this when it ends, however it ends. An exception unwinding past the loop keeps its iterators
    alive in the traceback; their workers ignore SIGTERM (``_worker_init``), so the interpreter's exit, which
    terminates and joins leftover children, would wait for them forever.
    """
    for batches in iterators:
        inner = getattr(batches, "_batches", None)  # DeviceViews: its loader's iterator, once started
        shutdown = getattr(inner if inner is not None else batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()  # torch's DataLoader iterator: ends its workers and joins them (idempotent)


def _worker_init(_worker_id: int) -> None:
    # Each worker handles one image at a time; intra-op threads would only oversubscribe the cores.
    torch.set_num_threads(1)
    # Ctrl-C and a scheduler's SIGTERM (SLURM's scancel, a time limit) reach the whole process group: the main process
    # saves a checkpoint and stops its workers itself, so a worker killed by the same signal would only break the
    # batches it still has to deliver (and the main process would die of "DataLoader worker ... killed by signal").
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_eval_loader(
    images: ImageStore,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = 512,
    num_workers: int = 0,
) -> DataLoader:
    """A finite, ordered loader of normalized images for evaluation.

    Args:
        images: e.g. ``data.test``.
        mean: per-channel mean in [0, 1] units.
        std: per-channel std in [0, 1] units.
        batch_size: images per batch.
        num_workers: loader worker processes.

    Returns:
        A ``DataLoader`` of ``(x, y)`` batches in dataset order.
    """
    return DataLoader(
        EvalDataset(images, eval_transform(mean, std)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        generator=torch.Generator(),  # see _stream_loader: leave the global generator alone
    )


def eval_workers(images: ImageStore, workers: int) -> int:
    """Loader workers for an evaluation loader over ``images``: ``workers`` for streamed images, 0 for cached arrays.

    A streamed image costs 2-5 ms to decode, so a streamed test set decoded in the training process takes minutes per
    evaluation at ImageNet scale; the run's workers decode it in parallel. A cached batch is one memory-map slice and
    one batched normalisation (``EvalDataset.__getitems__``), faster in the process than the start of a worker at every
    evaluation plus the batches' trip through shared memory.

    Args:
        images: the set to evaluate.
        workers: the run's loader workers (``--workers``, resolved).

    Returns:
        The worker count for ``make_eval_loader``.
    """
    return int(workers) if isinstance(images, StreamedImages) else 0
