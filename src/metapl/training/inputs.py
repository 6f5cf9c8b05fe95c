"""The batches of a run's phases (``metapl.data.make_train_batches``): training's seeded, resumable streams, with the
views made in the loader workers (``--augment-on loader``) or on the training device (``--augment-on device``), and
finetuning's labeled batches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from metapl import data as mdata
from metapl.config.fields import TrainConfig
from metapl.data.stores import SourceData
from metapl.errors import UserError
from metapl.training.setup import Run


def hflip(cfg: TrainConfig, data: SourceData) -> bool:
    """Whether the views flip horizontally: ``--hflip`` where given, else the data set's default."""
    return data.hflip if cfg.hflip is None else cfg.hflip


def train_batches(run: Run) -> tuple[Iterator, Iterator | None]:
    """The endless iterators of labeled batches and (for a method that reads them) unlabeled batches, positioned at
    ``run.step``."""
    cfg, data = run.cfg, run.data
    if cfg.augment_on == "device" and data.streamed:
        raise UserError(
            "--augment-on device augments cached uint8 arrays, but this data set is streamed from its files "
            "(--data-path); use --augment-on loader, or --data-path cache if the decoded images fit on disk"
        )
    # Random-resized crops of streamed images, padded crops of cached arrays.
    kw: dict[str, Any] = {"hflip": hflip(cfg, data), "mean": data.mean, "std": data.std, "crop": mdata.train_crop(data)}
    weak = mdata.weak_view(data.image_size, **kw)
    strong = mdata.strong_view(
        data.image_size, **kw, randaug_n=cfg.randaug_n, randaug_m=cfg.randaug_m, cutout=cfg.cutout
    )
    mpl = run.method.unlabeled
    # --per-rank-shards: this rank's unlabeled images are those of its own shards; the labeled set stays global.
    own = None
    if cfg.per_rank_shards and mpl:
        own = mdata.rank_unlabeled_items(data, run.split.unlabeled, run.dist.rank, run.dist.world_size)
    spec = mdata.BatchSpec(
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        weak=weak,
        strong=strong if mpl else None,
        labeled=strong if cfg.planned_labeled_aug(len(run.split.labeled)) == "strong" else weak,
        mu=cfg.mu,
        start_step=run.step,
        rank=run.dist.rank,
        world_size=run.dist.world_size,
        expand_labels_to=cfg.schedule().eval_every * cfg.batch_size if cfg.expand_labels else None,
        unlabeled_items=own,
        augment_on=cfg.augment_on,
        device=run.device,
        workers=cfg.workers or 0,  # filled in by the run (setup.build_run)
    )
    labeled, unlabeled = mdata.make_train_batches(data, run.split, spec, side=_side(run))
    return iter(labeled), (iter(unlabeled) if unlabeled is not None else None)


def _side(run: Run) -> mdata.batches.Side | None:
    """Reduced MPL: the large teacher's stored predictions of the train and extra images, one row per image."""
    preds = run.predictions
    return None if preds is None else (preds.train, preds.extra)


def finetune_batches(run: Run, start: int) -> Iterator:
    """The finetuning's batches from step ``start`` on: shuffled labeled images, weak views, per rank."""
    cfg, data = run.cfg, run.data
    weak = mdata.weak_view(
        data.image_size, hflip=hflip(cfg, data), mean=data.mean, std=data.std, crop=mdata.train_crop(data)
    )
    spec = mdata.BatchSpec(
        batch_size=cfg.finetune_batch_size,
        seed=cfg.seed + 1,
        weak=weak,
        start_step=start,
        rank=run.dist.rank,
        world_size=run.dist.world_size,
        device=run.device,
        workers=cfg.workers or 0,
    )
    loader, _ = mdata.make_train_batches(data, run.split, spec)
    return iter(loader)
