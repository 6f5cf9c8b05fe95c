"""``metapl train``: the MPL training loop around ``metapl.core.mpl_update`` (and the labels-only baseline).

Run directory layout: ``config.yaml`` (resolved config), ``split.json`` (labeled/unlabeled indices),
``checkpoint.pt`` (latest), ``best.pt`` (best EMA-student accuracy), ``metrics.jsonl``, ``tb/`` (TensorBoard),
``summary.json`` (final accuracies).
"""

from __future__ import annotations

import json
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch import nn

from metapl import data as mdata
from metapl.checkpoint import BEST, LATEST, atomic_save, load_checkpoint, rng_state, set_rng_state
from metapl.config import TrainConfig, config_from_dict, save_config
from metapl.core import Batch, ModelEMA, MPLState, linear_ramp, mpl_update, supervised_step, unwrap
from metapl.data.loader import mix_seed
from metapl.errors import UserError
from metapl.evaluate import eval_loaders, evaluate
from metapl.metrics import MetricsWriter
from metapl.models import count_parameters, create_model
from metapl.runtime import (
    Dist,
    all_reduce_mean,
    amp_dtype,
    barrier,
    init_distributed,
    launched_world_size,
    make_scheduler,
    make_sgd,
    seed_everything,
    select_device,
    wrap_ddp,
)  # fmt: skip

SPLIT = "split.json"
SUMMARY = "summary.json"
LOSS_KEYS = ("loss/teacher", "loss/student")


class TrainingDiverged(UserError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class Run:
    """Everything the loop mutates, and what a checkpoint holds."""

    cfg: TrainConfig
    device: torch.device
    dist: Dist
    data: object
    split: object
    teacher: nn.Module
    student: nn.Module
    t_opt: torch.optim.Optimizer
    s_opt: torch.optim.Optimizer
    t_sched: object
    s_sched: object
    ema: ModelEMA | None
    state: MPLState
    t_scaler: torch.amp.GradScaler | None
    s_scaler: torch.amp.GradScaler | None
    amp_dtype: torch.dtype | None
    step: int = 0
    seconds: float = 0.0
    best_acc: float = -1.0
    last_eval: tuple[int, dict] | None = None  # (step, accuracies) of the latest evaluation


def train(cfg: TrainConfig, *, resume: bool = False, log=print) -> dict:
    """Train a run to ``cfg.steps`` (then finetune if asked) and return its summary.

    Args:
        cfg: the resolved config; ``cfg.out`` is the run directory.
        resume: continue the run in ``cfg.out`` from its latest checkpoint.
        log: where progress lines go (rank 0 only).

    Returns:
        The summary dict also written to ``RUN_DIR/summary.json``.
    """
    device = select_device(cfg.device)
    _refuse_unsupported(cfg, device, launched_world_size())
    d = init_distributed(device)
    log = log if d.is_main else (lambda *a, **k: None)
    run_dir = Path(cfg.out)
    ckpt = None
    if resume:
        ckpt = load_checkpoint(run_dir / LATEST)
    elif (run_dir / LATEST).exists():
        raise UserError(f"{run_dir} already holds a run; pass --resume {run_dir} to continue it, or another --out")
    seed_everything(cfg.seed, cfg.deterministic)
    run = build_run(cfg, device, d, run_dir, ckpt, log)
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        mdata.save_split(run.split, run_dir / SPLIT)
    writer = _NoWriter()  # rank 0 alone writes the run's files; under torchrun the other ranks only train
    if d.is_main:
        writer = MetricsWriter(run_dir, tensorboard=cfg.tensorboard, resume_step=run.step if ckpt else None)
    try:
        if run.step < cfg.steps:
            _loop(run, run_dir, writer, log)
        summary = _finish(run, run_dir, writer, log)
    finally:
        writer.close()
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Building a run


def build_run(cfg: TrainConfig, device, d: Dist, run_dir: Path, ckpt: dict | None, log) -> Run:
    """Data, split, models, optimizers, schedulers, EMA and scalers of a run; restored from ``ckpt`` if given."""
    data = mdata.load_dataset(
        cfg.dataset, cfg.data_dir, download=cfg.download, image_size=cfg.image_size, unlabeled_dir=cfg.unlabeled_dir,
        cache_dir=cfg.cache_dir, skip_corrupt=cfg.skip_corrupt, seed=cfg.seed, log=log,
    )  # fmt: skip
    if (run_dir / SPLIT).exists() and ckpt is not None:
        split = mdata.load_split(run_dir / SPLIT)
    else:
        split = mdata.make_split(
            data.train.labels, cfg.num_labeled, data.num_classes, seed=cfg.seed, unlabeled=cfg.unlabeled,
            val=cfg.val_labeled, log=log,
        )  # fmt: skip
    log(
        f"data: {cfg.dataset} {data.image_size}x{data.image_size}x{data.in_channels}, {data.num_classes} classes, "
        f"{len(split.labeled)} labeled, {len(split.unlabeled)} unlabeled, {len(data.test.labels)} test"
    )
    teacher, student = (
        create_model(name, num_classes=data.num_classes, in_channels=data.in_channels, image_size=data.image_size,
                     dropout=drop)
        for name, drop in ((cfg.teacher, cfg.teacher_dropout), (cfg.student, cfg.student_dropout))
    )  # fmt: skip
    log(f"teacher {cfg.teacher}: {count_parameters(teacher):,} parameters; "
        f"student {cfg.student}: {count_parameters(student):,} parameters")  # fmt: skip
    memory_format = torch.channels_last if cfg.channels_last else torch.preserve_format
    teacher = teacher.to(device, memory_format=memory_format)
    student = student.to(device, memory_format=memory_format)
    opt = dict(momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay, device=device)
    t_opt, s_opt = make_sgd(teacher, lr=cfg.t_lr, **opt), make_sgd(student, lr=cfg.s_lr, **opt)
    t_sched = make_scheduler(t_opt, total_steps=cfg.steps, warmup_steps=cfg.t_warmup_steps)
    # The baseline has no teacher to wait for: its student starts at once.
    wait = cfg.s_wait_steps if cfg.method == "mpl" else 0
    s_sched = make_scheduler(s_opt, total_steps=cfg.steps, warmup_steps=cfg.s_warmup_steps, wait_steps=wait)
    ema = ModelEMA(student, cfg.ema) if cfg.ema > 0 else None
    dtype = amp_dtype(cfg.amp, device)
    scalers = (None, None)
    if dtype == torch.float16:
        scalers = (torch.amp.GradScaler("cuda"), torch.amp.GradScaler("cuda"))
    run = Run(cfg, device, d, data, split, teacher, student, t_opt, s_opt, t_sched, s_sched, ema, MPLState(),
              *scalers, dtype)  # fmt: skip
    if ckpt is not None:
        _restore(run, ckpt)
        log(f"resumed {run_dir} at step {run.step}")
    elif d.enabled:
        _seed_rank(cfg, d)
    run.teacher = wrap_ddp(teacher, d, device, sync_bn=cfg.sync_bn)
    run.student = wrap_ddp(student, d, device, sync_bn=cfg.sync_bn)
    if cfg.compile:
        run.teacher, run.student = torch.compile(run.teacher), torch.compile(run.student)
    return run


def checkpoint_state(run: Run) -> dict:
    """The flat checkpoint dict of a run: models, optimizers, schedulers, scalers, RNG, split, config."""
    return {
        "config": run.cfg.to_dict(),
        "step": run.step,
        "seconds": run.seconds,
        "best_acc": run.best_acc,
        "num_classes": run.data.num_classes,
        "classes": list(run.data.classes),
        "in_channels": run.data.in_channels,
        "image_size": run.data.image_size,
        "mean": list(run.data.mean),
        "std": list(run.data.std),
        "teacher": unwrap(run.teacher).state_dict(),
        "student": unwrap(run.student).state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "t_opt": run.t_opt.state_dict(),
        "s_opt": run.s_opt.state_dict(),
        "t_sched": run.t_sched.state_dict(),
        "s_sched": run.s_sched.state_dict(),
        "t_scaler": run.t_scaler.state_dict() if run.t_scaler is not None else None,
        "s_scaler": run.s_scaler.state_dict() if run.s_scaler is not None else None,
        "mpl_state": run.state.state_dict(),
        "split": {"labeled": run.split.labeled.tolist(), "unlabeled": run.split.unlabeled.tolist()},
        "rng": rng_state(),
    }


def _restore(run: Run, ckpt: dict) -> None:
    unwrap(run.teacher).load_state_dict(ckpt["teacher"])
    unwrap(run.student).load_state_dict(ckpt["student"])
    if run.ema is not None and ckpt["ema"] is not None:
        run.ema.load_state_dict(ckpt["ema"])
    run.t_opt.load_state_dict(ckpt["t_opt"])
    run.s_opt.load_state_dict(ckpt["s_opt"])
    run.t_sched.load_state_dict(ckpt["t_sched"])
    run.s_sched.load_state_dict(ckpt["s_sched"])
    for scaler, key in ((run.t_scaler, "t_scaler"), (run.s_scaler, "s_scaler")):
        if scaler is not None and ckpt[key] is not None:
            scaler.load_state_dict(ckpt[key])
    state = ckpt["mpl_state"]
    if state["baseline"] is not None:
        state = {"baseline": state["baseline"].to(run.device)}
    run.state.load_state_dict(state)
    run.step, run.seconds, run.best_acc = ckpt["step"], ckpt["seconds"], ckpt["best_acc"]
    # Each rank resumes its own generators (see _save); a single process takes rank 0's.
    ranks = ckpt.get("rng_ranks")
    if not run.dist.enabled:
        set_rng_state(ckpt["rng"])
    elif ranks is not None and len(ranks) == run.dist.world_size:
        set_rng_state(ranks[run.dist.rank])
    else:  # another world size: no exact resume is possible, but the ranks must still draw differently
        _seed_rank(run.cfg, run.dist, run.step)


def _save(run: Run, run_dir: Path, name: str = LATEST) -> None:
    # Every rank's generators (dropout masks, sampled pseudo labels differ per rank), so that a resumed
    # multi-process run continues bit-identically; a collective, so every rank calls _save.
    ranks = None
    if run.dist.enabled:
        ranks = [None] * run.dist.world_size
        dist.all_gather_object(ranks, rng_state())
    if run.dist.is_main:
        state = checkpoint_state(run)
        if ranks is not None:
            state["rng_ranks"] = ranks
        atomic_save(state, run_dir / name)
    barrier(run.dist)


def _seed_rank(cfg: TrainConfig, d: Dist, step: int = 0) -> None:
    """Give each rank its own random stream, after the models were built identically from ``cfg.seed``.

    With one seed for all ranks, every rank would draw the same dropout masks and the same sampled pseudo labels
    for its different images. Data augmentation does not depend on this: the loaders seed each image themselves.
    """
    seed_everything(mix_seed(cfg.seed, d.rank, step) >> 31, cfg.deterministic)  # NumPy takes 32-bit seeds


def _refuse_unsupported(cfg: TrainConfig, device: torch.device, world_size: int) -> None:
    """Settings that cannot run as asked, refused before any process joins the group or loads data."""
    if world_size > 1 and cfg.method == "mpl" and cfg.mode == "soft":
        raise UserError(
            "--mode soft (exact meta-gradient) does not run under torchrun/DDP: it differentiates through a "
            "functional copy of the student that DDP cannot synchronise; use --mode hard, or a single process"
        )
    if cfg.sync_bn and device.type != "cuda":
        raise UserError(f"--sync-bn needs CUDA (SyncBatchNorm has no {device.type} kernel); drop --sync-bn")


class _NoWriter:
    """What ranks other than 0 get in place of a ``MetricsWriter``: they write no files."""

    def write(self, step: int, values: dict[str, float]) -> None:
        """Drop the record."""

    def close(self) -> None:
        """Nothing to close."""


# ----------------------------------------------------------------------------------------------------------------
# The loop


def _loop(run: Run, run_dir: Path, writer: MetricsWriter, log) -> None:
    cfg, device = run.cfg, run.device
    data = run.data
    weak = mdata.weak_transform(data.image_size, hflip=_hflip(cfg, data), mean=data.mean, std=data.std)
    strong = mdata.strong_transform(
        data.image_size, hflip=_hflip(cfg, data), mean=data.mean, std=data.std, randaug_n=cfg.randaug_n,
        randaug_m=cfg.randaug_m, cutout=cfg.cutout,
    )  # fmt: skip
    l_loader, u_loader = mdata.make_train_loaders(
        data, run.split, batch_size=cfg.batch_size, mu=cfg.mu, seed=cfg.seed, start_step=run.step,
        num_workers=cfg.workers, rank=run.dist.rank, world_size=run.dist.world_size, weak=weak, strong=strong,
        expand_labels_to=cfg.eval_every * cfg.batch_size if cfg.expand_labels else None,
        labeled_transform=strong if cfg.labeled_aug == "strong" else weak, pin_memory=device.type == "cuda",
    )  # fmt: skip
    eval_sets = eval_loaders(run.data, run.split, cfg.eval_batch_size)
    l_iter = iter(l_loader)
    u_iter = iter(u_loader) if cfg.method == "mpl" else None
    mpl_config = cfg.mpl_config()
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    images_per_step = cfg.batch_size * (1 + 2 * cfg.mu if cfg.method == "mpl" else 1) * run.dist.world_size

    pending: list[torch.Tensor] = []  # per-step metric vectors since the last sync (no .item() per step)
    keys: list[str] = []
    progress = _progress(cfg, run, log)
    tick, seg_start = time.perf_counter(), time.perf_counter()
    start_step = run.step
    last = {}
    while run.step < cfg.steps:
        x_l, y_l = (t.to(device, non_blocking=True) for t in next(l_iter))
        x_l = x_l.contiguous(memory_format=memory_format)
        if cfg.method == "mpl":
            x_uw, x_us, y_u = (t.to(device, non_blocking=True) for t in next(u_iter))
            batch = Batch(x_l, y_l, x_uw.contiguous(memory_format=memory_format),
                          x_us.contiguous(memory_format=memory_format), y_u)  # fmt: skip
            uda_weight = linear_ramp(run.step, value=cfg.uda_weight, ramp_steps=cfg.uda_steps)
            metrics = mpl_update(
                run.teacher, run.student, run.t_opt, run.s_opt, batch, mpl_config, run.state,
                uda_weight=uda_weight, amp_dtype=run.amp_dtype, t_scaler=run.t_scaler, s_scaler=run.s_scaler,
            )  # fmt: skip
            run.t_sched.step()
        else:
            metrics = _supervised_step(run, x_l, y_l)
        with warnings.catch_warnings():
            # While the student waits, mpl_update skips its optimizer on purpose; the schedule still advances.
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            run.s_sched.step()
        if run.ema is not None:
            run.ema.update(run.student)
        run.step += 1
        keys = list(metrics)
        pending.append(torch.stack([metrics[k] for k in keys]))

        is_last = run.step == cfg.steps
        do_eval = run.step % cfg.eval_every == 0 or is_last
        do_save = run.step % cfg.save_every == 0 or is_last
        if run.step % cfg.log_every == 0 or do_eval or do_save:
            now = time.perf_counter()
            values = _sync_metrics(run, keys, pending)  # the one host sync of this interval
            n = len(pending)
            pending = []
            values.update({
                "lr/teacher": run.t_opt.param_groups[0]["lr"], "lr/student": run.s_opt.param_groups[0]["lr"],
                "time/step_ms": 1000 * (now - tick) / n, "time/images_per_s": images_per_step * n / (now - tick),
            })  # fmt: skip
            tick = now
            if run.dist.is_main:
                writer.write(run.step, {f"train/{k}": v for k, v in values.items()})
            last.update({"loss_t": values.get("loss/teacher"), "loss_s": values.get("loss/student")})
        if do_eval:
            run.seconds += time.perf_counter() - seg_start
            seg_start = time.perf_counter()
            accs = _evaluate(run, eval_sets)
            run.last_eval = (run.step, accs)
            if run.dist.is_main:
                writer.write(run.step, {f"eval/{k}": v for k, v in accs.items()})
                log(_eval_line(run.step, accs))
                # With a validation split the best checkpoint is chosen on it, never on the test set.
                prefix = "val_" if "val_student_acc" in accs else ""
                score = accs.get(f"{prefix}ema_acc", accs[f"{prefix}student_acc"])
                if score > run.best_acc:
                    run.best_acc = score
                    atomic_save(checkpoint_state(run), run_dir / BEST)
            last.update({k: accs[k] for k in accs if k.endswith("_acc")})
            tick = time.perf_counter()  # evaluation time is not step time
        if do_save:
            run.seconds += time.perf_counter() - seg_start
            seg_start = time.perf_counter()
            _save(run, run_dir)
        if progress is not None:
            progress.update(1)
            progress.set_postfix({k: f"{v:.3g}" for k, v in last.items() if v is not None}, refresh=False)
    if progress is not None:
        progress.close()
    log(f"trained steps {start_step}..{run.step} in {run.seconds:.0f} s (total)")


def _supervised_step(run: Run, x_l: torch.Tensor, y_l: torch.Tensor) -> dict[str, torch.Tensor]:
    """The labels-only baseline: the student alone, cross-entropy on the labeled batch."""
    return supervised_step(
        run.student, run.s_opt, x_l, y_l, label_smoothing=run.cfg.label_smoothing, grad_clip=run.cfg.grad_clip,
        amp_dtype=run.amp_dtype, scaler=run.s_scaler,
    )  # fmt: skip


def _sync_metrics(run: Run, keys: list[str], pending: list[torch.Tensor]) -> dict[str, float]:
    """Average the steps since the last sync (over ranks too), stop on a non-finite loss."""
    stacked = torch.stack(pending)  # (n_steps, n_keys)
    mean = all_reduce_mean(stacked.nanmean(dim=0), run.dist)
    rows = all_reduce_mean(stacked, run.dist).cpu()  # device sync
    for i, k in enumerate(keys):
        if k in LOSS_KEYS or k.startswith("loss/"):
            bad = (~torch.isfinite(rows[:, i])).nonzero()
            if len(bad):
                first = int(bad[0, 0])
                step = run.step - len(pending) + first + 1
                raise TrainingDiverged(
                    f"{k} became {rows[first, i].item()} at step {step}; training stopped and the last good "
                    f"checkpoint ({run.cfg.out}/{LATEST}) is kept; lower the learning rates or set --grad-clip"
                )
    return {k: float(v) for k, v in zip(keys, mean.cpu().tolist())}


def _evaluate(run: Run, loaders: dict[str, object]) -> dict[str, float]:
    """Accuracies of teacher, student and EMA on each loader; validation keys carry a ``val_`` prefix."""
    out = {}
    if run.dist.is_main:
        models = {"teacher": unwrap(run.teacher), "student": unwrap(run.student)}
        if run.cfg.method == "supervised":
            models.pop("teacher")
        if run.ema is not None:
            models["ema"] = run.ema.module
        for prefix, loader in loaders.items():
            accs = evaluate(models, loader, run.device, amp_dtype=run.amp_dtype, channels_last=run.cfg.channels_last)
            out.update({prefix + k: v for k, v in accs.items()})
    barrier(run.dist)
    return out


def _eval_line(step: int, accs: dict[str, float]) -> str:
    def listing(prefix: str) -> str:
        return ", ".join(f"{k[len(prefix) : -4]} {v:.2f}%" for k, v in accs.items()
                         if k.endswith("_acc") and k.startswith("val_") == (prefix == "val_"))  # fmt: skip

    val = f"; validation accuracy {listing('val_')}" if "val_student_acc" in accs else ""
    return f"step {step}: test accuracy {listing('')}{val}"


def _progress(cfg: TrainConfig, run: Run, log):
    if not (cfg.progress and run.dist.is_main):
        return None
    from tqdm import tqdm

    # disable=None: a bar on a terminal, nothing in a log file (the per-evaluation lines remain).
    return tqdm(total=cfg.steps, initial=run.step, desc="metapl", unit="step", dynamic_ncols=True, leave=False,
                disable=None)  # fmt: skip


def _hflip(cfg: TrainConfig, data) -> bool:
    return data.hflip if cfg.hflip is None else cfg.hflip


# ----------------------------------------------------------------------------------------------------------------
# After training


def _finish(run: Run, run_dir: Path, writer: MetricsWriter, log) -> dict:
    cfg = run.cfg
    if run.last_eval is not None and run.last_eval[0] == run.step:
        accs = run.last_eval[1]  # the loop just evaluated this very step
    else:
        accs = _evaluate(run, eval_loaders(run.data, run.split, cfg.eval_batch_size))
    summary = {
        "teacher_acc": accs.get("teacher_acc"),
        "student_acc": accs.get("student_acc"),
        "ema_acc": accs.get("ema_acc"),
        "teacher_top5": accs.get("teacher_top5"),
        "student_top5": accs.get("student_top5"),
        "ema_top5": accs.get("ema_top5"),
        **{k: v for k, v in accs.items() if k.startswith("val_") and k.endswith("_acc")},
        "best_acc": run.best_acc,
        "steps": run.step,
        "seconds": round(run.seconds, 2),
        "method": cfg.method,
        "mode": cfg.mode,
        "feedback": cfg.feedback,
        "feedback_sign": cfg.feedback_sign,
        "dataset": cfg.dataset,
        "num_labeled": len(run.split.labeled),
        "seed": cfg.seed,
    }
    if cfg.finetune_steps > 0:
        from metapl.finetune import finetune_student

        summary.update(finetune_student(run, run_dir, writer, log))
    if run.dist.is_main:
        (run_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        log(f"summary: {json.dumps({k: v for k, v in summary.items() if k.endswith('_acc')})}")
    barrier(run.dist)
    return summary


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The resolved config saved in a run directory (for ``--resume`` and the other commands)."""
    path = Path(run_dir) / "config.yaml"
    if not Path(run_dir).is_dir():
        raise UserError(f"run directory {run_dir} not found; pass the --out of an earlier metapl train")
    if not path.exists():
        raise UserError(f"{run_dir} has no config.yaml; pass a run directory written by metapl train")
    return config_from_dict(yaml.safe_load(path.read_text()))
