"""The training batches of a run: its seeded, resumable streams, with the views made in the loader workers
(``--augment-on loader``) or on the training device (``--augment-on device``)."""

from __future__ import annotations

from metapl import data as mdata
from metapl.engine.config import TrainConfig
from metapl.engine.run import Run
from metapl.errors import UserError


def hflip(cfg: TrainConfig, data) -> bool:
    """Whether the views flip horizontally: ``--hflip`` where given, else the data set's default."""
    return data.hflip if cfg.hflip is None else cfg.hflip


def train_batches(run: Run):
    """The endless iterators of labeled batches and (MPL only) unlabeled batches, positioned at ``run.step``."""
    cfg, data = run.cfg, run.data
    if cfg.augment_on == "device":
        return _device_batches(run)
    crop = mdata.train_crop(data)  # random-resized crops of streamed files, padded crops of cached arrays
    weak = mdata.weak_transform(data.image_size, hflip=hflip(cfg, data), mean=data.mean, std=data.std, crop=crop)
    strong = mdata.strong_transform(
        data.image_size, hflip=hflip(cfg, data), mean=data.mean, std=data.std, randaug_n=cfg.randaug_n,
        randaug_m=cfg.randaug_m, cutout=cfg.cutout, crop=crop,
    )  # fmt: skip
    # --per-rank-shards: this rank's unlabeled images are those of its own shards; the labeled set stays global.
    own = None
    if cfg.per_rank_shards and cfg.method != "supervised":
        own = mdata.rank_unlabeled_items(data, run.split.unlabeled, run.dist.rank, run.dist.world_size)
    l_loader, u_loader = mdata.make_train_loaders(
        data, run.split, batch_size=cfg.batch_size, mu=cfg.mu, seed=cfg.seed, start_step=run.step,
        num_workers=cfg.workers, rank=run.dist.rank, world_size=run.dist.world_size, weak=weak, strong=strong,
        expand_labels_to=cfg.eval_every * cfg.batch_size if cfg.expand_labels else None,
        labeled_transform=strong if cfg.labeled_aug == "strong" else weak, pin_memory=run.device.type == "cuda",
        unlabeled_items=own, side=_side(run),
    )  # fmt: skip
    return iter(l_loader), (iter(u_loader) if cfg.method != "supervised" else None)


def _side(run: Run):
    """Reduced MPL: the large teacher's stored predictions of the train and extra images, one row per image."""
    preds = run.predictions
    return None if preds is None else (preds.train, preds.extra)


def _device_batches(run: Run):
    """``train_batches`` with ``--augment-on device``: the same streams, the views computed on ``run.device``."""
    cfg, data = run.cfg, run.data
    if isinstance(data.train, mdata.ImageFiles):
        raise UserError(
            "--augment-on device augments cached uint8 arrays, but this data set is streamed from its files "
            "(--data-path); use --augment-on loader, or --data-path cache if the decoded images fit on disk"
        )
    kw = {"hflip": hflip(cfg, data), "mean": data.mean, "std": data.std}
    weak = mdata.weak_batch_view(data.image_size, **kw)
    strong = mdata.strong_batch_view(data.image_size, **kw, randaug_n=cfg.randaug_n, randaug_m=cfg.randaug_m,
                                     cutout=cfg.cutout)  # fmt: skip
    labeled, unlabeled = mdata.make_device_train_batches(
        data, run.split, batch_size=cfg.batch_size, mu=cfg.mu, seed=cfg.seed, device=run.device, weak=weak,
        strong=strong, labeled_view=strong if cfg.labeled_aug == "strong" else weak, start_step=run.step,
        num_workers=cfg.workers, rank=run.dist.rank, world_size=run.dist.world_size,
        expand_labels_to=cfg.eval_every * cfg.batch_size if cfg.expand_labels else None,
        pin_memory=run.device.type == "cuda", side=_side(run),
    )  # fmt: skip
    return labeled, (unlabeled if cfg.method != "supervised" else None)
