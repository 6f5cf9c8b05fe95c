"""A training run as ``metapl train`` and ``metapl finetune`` both rebuild it: its data and split, its models (the
teacher as its method builds it), optimizers, schedules, EMA and scalers, restored from a checkpoint when resumed.

The run folder's files belong to ``metapl.rundir``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from metapl import data as mdata
from metapl.config.budget import AUTO_VAL_MIN_PER_CLASS, auto_val_count, plan_line
from metapl.config.fields import TrainConfig
from metapl.core import ModelEMA, MPLState
from metapl.data.sampling import mix_seed
from metapl.data.split import Split
from metapl.data.stores import SourceData
from metapl.errors import UserError
from metapl.methods.by_name import get_method
from metapl.methods.method import Method
from metapl.models import count_parameters
from metapl.models.plugins import import_model_modules
from metapl.rundir.checkpoint import restore
from metapl.rundir.layout import LATEST, SPLIT, load_run_split
from metapl.training.optimizers import make_scheduler, make_sgd
from metapl.training.process import Dist, amp_dtype, plan_cpu_share, seed_everything, wrap_ddp
from metapl.training.starting_weights import start_model

if TYPE_CHECKING:
    from metapl.methods.large_teacher import TeacherPredictions

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything the training loop mutates, and what a checkpoint holds."""

    cfg: TrainConfig
    device: torch.device
    dist: Dist
    data: SourceData
    split: Split
    teacher: nn.Module
    student: nn.Module
    t_opt: torch.optim.Optimizer
    s_opt: torch.optim.Optimizer
    t_sched: LambdaLR
    s_sched: LambdaLR
    ema: ModelEMA | None
    state: MPLState
    t_scaler: torch.amp.GradScaler | None
    s_scaler: torch.amp.GradScaler | None
    amp_dtype: torch.dtype | None
    step: int = 0
    seconds: float = 0.0
    last_eval: tuple[int, dict] | None = None  # (step, accuracies) of the latest evaluation
    saved_step: int | None = None  # step of the checkpoint.pt on disk, None before the first save
    predictions: TeacherPredictions | None = (
        None  # a reduced method's large-teacher predictions (metapl.methods.large_teacher)
    )

    @property
    def method(self) -> Method:
        """The run's method (``metapl.methods``): its step, its evaluated models, its result candidates."""
        return get_method(self.cfg.method)


@dataclass(frozen=True)
class ModelStart:
    """What a method builds its teacher from (``Method.build_teacher``): the run's config, data, device, place in
    the job, and whether it resumes (then the checkpoint holds the weights)."""

    cfg: TrainConfig
    data: SourceData
    device: torch.device
    dist: Dist
    resuming: bool

    def model(self, role: str, *, replace_head: bool = True, load: bool | None = None) -> nn.Module:
        """The run's ``role`` network started from its configured weights (``starting_weights.start_model``); ``load``
        None: unless resuming."""
        load = not self.resuming if load is None else load
        return start_model(self.cfg, role, self.data, replace_head=replace_head, load=load)


def build_run(cfg: TrainConfig, device: torch.device, d: Dist, run_dir: Path, ckpt: dict | None) -> Run:
    """Data, split, models, optimizers, schedulers, EMA and scalers of a run; restored from ``ckpt`` if given.

    With ``ckpt``, the saved ``split.json`` is reused after checking that the data still matches its fingerprint.
    ``cfg.workers`` and ``cfg.threads`` left open are chosen here (``Run.cfg`` holds the values used).
    """
    cfg = _take_cpu_share(cfg, device, d)
    import_model_modules(cfg.imports)  # the user's own models, before any is built (metapl.models.plugins)
    data = _load_data(cfg)
    split = _split(cfg, data, run_dir if ckpt is not None else None)
    logger.info(
        f"data: {cfg.dataset} {data.image_size}x{data.image_size}x{data.in_channels}, {data.num_classes} classes, "
        f"{len(split.labeled)} labeled, {len(split.unlabeled)} unlabeled, {len(data.test.labels)} test"
    )
    logger.info(plan_line(cfg, len(split.labeled)))
    predictions, teacher, student = _models(cfg, data, device, d, resuming=ckpt is not None)
    memory_format = torch.channels_last if cfg.channels_last else torch.preserve_format
    # nn.Module.to takes both at once at run time; torch's overloads list them apart.
    teacher = teacher.to(device, memory_format=memory_format)  # type: ignore[call-overload]
    student = student.to(device, memory_format=memory_format)  # type: ignore[call-overload]
    optimizers = _optimizers(cfg, teacher, student, device)  # (t_opt, s_opt, t_sched, s_sched)
    ema = ModelEMA(student, cfg.ema) if cfg.ema > 0 else None
    dtype = amp_dtype(cfg.amp, device)
    scalers: tuple[torch.amp.GradScaler | None, torch.amp.GradScaler | None] = (None, None)
    if dtype == torch.float16:
        scalers = (torch.amp.GradScaler("cuda"), torch.amp.GradScaler("cuda"))
    run = Run(cfg, device, d, data, split, teacher, student, *optimizers, ema, MPLState(), *scalers, dtype)
    run.predictions = predictions
    if ckpt is not None:
        if not restore(run, ckpt, run_dir / LATEST):
            seed_rank(cfg, d, run.step)  # another number of processes: no exact resume, but distinct streams
        run.saved_step = run.step
        logger.info(f"resumed {run_dir} at step {run.step}")
    elif d.enabled:
        seed_rank(cfg, d)
    run.teacher = wrap_ddp(teacher, d, device, sync_bn=cfg.sync_bn)
    run.student = wrap_ddp(student, d, device, sync_bn=cfg.sync_bn)
    if cfg.compile:
        # An OptimizedModule, a Module (torch types compile's result as a callable).
        run.teacher = torch.compile(run.teacher)  # type: ignore[assignment]
        run.student = torch.compile(run.student)  # type: ignore[assignment]
    return run


def _load_data(cfg: TrainConfig) -> SourceData:
    """The run's data set (``metapl.data.load_dataset``), as its options describe it."""
    return mdata.load_dataset(
        cfg.dataset,
        cfg.data_dir,
        download=cfg.download,
        image_size=cfg.image_size,
        unlabeled_dir=cfg.unlabeled_dir,
        cache_dir=cfg.cache_dir,
        skip_corrupt=cfg.skip_corrupt,
        seed=cfg.seed,
        data_path=cfg.data_path,
    )


def _optimizers(
    cfg: TrainConfig, teacher: nn.Module, student: nn.Module, device: torch.device
) -> tuple[torch.optim.SGD, torch.optim.SGD, LambdaLR, LambdaLR]:
    """SGD for both models and their learning-rate schedules: ``(t_opt, s_opt, t_sched, s_sched)``."""
    opt: dict[str, Any] = dict(
        momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay, device=device
    )
    t_opt, s_opt = make_sgd(teacher, lr=cfg.t_lr, **opt), make_sgd(student, lr=cfg.s_lr, **opt)
    t_sched = make_scheduler(t_opt, total_steps=cfg.steps, warmup_steps=cfg.schedule().t_warmup_steps)
    # The baseline has no teacher to wait for: its student starts at once.
    plan = cfg.schedule()
    wait = plan.s_wait_steps if get_method(cfg.method).waits_for_teacher else 0
    s_sched = make_scheduler(s_opt, total_steps=cfg.steps, warmup_steps=plan.s_warmup_steps, wait_steps=wait)
    return t_opt, s_opt, t_sched, s_sched


def _models(
    cfg: TrainConfig, data: SourceData, device: torch.device, d: Dist, *, resuming: bool
) -> tuple[TeacherPredictions | None, nn.Module, nn.Module]:
    """The run's teacher, as its method builds it, and student, started from their weights (not when resuming: the
    checkpoint has them). The teacher comes first: it draws from the seed before the student.

    Returns:
        ``(predictions, teacher, student)``; ``predictions``: a reduced method's large-teacher predictions, else None.
    """
    start = ModelStart(cfg, data, device, d, resuming)
    built = get_method(cfg.method).build_teacher(start)
    student = start.model("student")
    logger.info(
        f"teacher {built.name}: {count_parameters(built.teacher):,} parameters; "
        f"student {cfg.student}: {count_parameters(student):,} parameters"
    )
    return built.predictions, built.teacher, student


def _take_cpu_share(cfg: TrainConfig, device: torch.device, d: Dist) -> TrainConfig:
    """Set this process's intra-op threads and fill in the loader workers, from the free cores where left open."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(d.world_size)))
    share = plan_cpu_share(cfg.workers, cfg.threads, device, local_world, copy_only=cfg.augment_on == "device")
    torch.set_num_threads(share.threads)
    if cfg.workers is None or cfg.threads is None:
        logger.info(
            f"cpu: {share.free_cores:.1f} of {os.cpu_count()} cores free -> {share.workers} loader workers, "
            f"{share.threads} threads (set --workers / --threads to choose)"
        )
    return replace(cfg, workers=share.workers, threads=share.threads)


def _split(cfg: TrainConfig, data: SourceData, run_dir: Path | None) -> Split:
    """The saved split of a resumed run (checked against the data), else a new one carrying the data's fingerprint.

    Args:
        run_dir: the folder of the run being resumed (its ``split.json``, read by ``layout.load_run_split``), or
            None for a new run (``metapl.training.trainer`` saves its split there with ``layout.save_run_split``).
    """
    fingerprint = mdata.data_fingerprint(data)
    if run_dir is not None and (run_dir / SPLIT).exists():
        split = load_run_split(run_dir)
        mdata.check_fingerprint(split.fingerprint, fingerprint, run_dir / SPLIT)
        return split
    split = mdata.make_split(
        data.train.labels,
        cfg.num_labeled,
        data.num_classes,
        seed=cfg.seed,
        unlabeled=cfg.unlabeled,
        val=_validation_count(cfg, data),
    )
    if get_method(cfg.method).unlabeled and len(split.unlabeled) == 0 and data.extra_unlabeled is None:
        raise UserError(
            f"--unlabeled rest leaves no unlabeled images: all {len(data.train)} training images are labeled or held "
            "out; lower --num-labeled, use --unlabeled all, or add images with --unlabeled-dir"
        )
    split.fingerprint = fingerprint
    return split


def _validation_count(cfg: TrainConfig, data: SourceData) -> int:
    """``--val-labeled``, or where left unset the automatic carve-out (``fields.auto_val_count``), said in one line."""
    if data.val is not None:
        if cfg.val_labeled:
            raise UserError(
                f"--val-labeled {cfg.val_labeled} would carve validation images out of the labeled draw, but the data "
                f"has {len(data.val)} of its own (its val/ folder); drop --val-labeled"
            )
        logger.info(
            f"validation: the {len(data.val)} images of the data's val/ folder choose the model the run hands back"
        )
        return 0
    if cfg.val_labeled is not None:
        return cfg.val_labeled
    if not get_method(cfg.method).auto_validation:
        return 0  # the labels-only baseline: one model and its EMA, not worth labels (the result is the EMA student)
    num_classes = data.num_classes
    count = auto_val_count(cfg.num_labeled, num_classes)
    per_class = cfg.num_labeled // num_classes
    if count:
        logger.info(
            f"validation: {count} of the {cfg.num_labeled} labeled images held out ({count // num_classes} per class) "
            "to choose the model the run hands back (--val-labeled 0: none)"
        )
    else:
        logger.info(
            f"validation: none ({per_class} labels per class, below the {AUTO_VAL_MIN_PER_CLASS} of the automatic "
            "carve-out): the model the run hands back is chosen by rule (--val-labeled N holds N out)"
        )
    return count


def seed_rank(cfg: TrainConfig, d: Dist, step: int = 0) -> None:
    """Give each rank its own random stream, after the models were built identically from ``cfg.seed``.

    With one seed for all ranks, every rank would draw the same dropout masks and the same sampled pseudo labels
    for its different images. Data augmentation does not depend on this: the loaders seed each image themselves.
    """
    seed_everything(mix_seed(cfg.seed, d.rank, step) >> 31, cfg.deterministic)  # NumPy takes 32-bit seeds
