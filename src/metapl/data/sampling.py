"""The endless, exactly resumable streams of ``(index, sample_seed)`` that decide every training batch.

Resume contract: the batches, and every augmentation inside them, depend only on ``(seed, step)``, never on
``num_workers`` or on whether the run was interrupted. The sampler (in the main process) decides which image comes at
each position of the stream and gives it a ``sample_seed``; whatever makes the views of that image (a loader worker,
or the training device for a whole batch) seeds its generator with that seed, so which worker, or which process, does
the work does not matter.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

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
