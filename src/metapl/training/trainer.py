"""``metapl train`` and ``metapl finetune``: one way into a run. Each takes the run folder's lock, picks the device,
joins the process group, rebuilds the run (``setup.build_run``), opens its metrics, and then runs its phases through
the one loop (``loop.run_phase``) with the signals caught: training by the run's method, then finetuning the
student; ``metapl finetune`` runs the second phase alone. The run's result and ``summary.json`` come last.

Only finite weights are ever saved (``saver.CheckpointSaver``): a run that diverges stops with the last good
checkpoint on disk. SIGINT (Ctrl-C) and SIGTERM stop it after the current step, with a checkpoint of that step.
"""

from __future__ import annotations

import json
import logging
import shlex
from dataclasses import replace
from pathlib import Path

import torch

from metapl.config.fields import FINETUNE_STEPS_IF_NONE, TrainConfig, config_from_dict
from metapl.config.rules import check_resume
from metapl.errors import UserError, reporting_os_errors
from metapl.logs import RunLog, run_log
from metapl.rundir.checkpoint import load_checkpoint
from metapl.rundir.layout import (
    CONFIG,
    LATEST,
    TRAIN_LOG,
    check_out_dir,
    check_out_path,
    clear_run_files,
    load_run_config,
    read_summary,
    save_run_config,
    save_run_split,
    write_summary,
)
from metapl.rundir.lock import is_writer_rank, run_lock
from metapl.rundir.result import record_result
from metapl.training.evaluation import eval_loaders, evaluate_run, run_summary
from metapl.training.loop import run_phase
from metapl.training.metrics import MetricsWriter, NullWriter, Writer, require_wandb
from metapl.training.optimizers import replan_schedules
from metapl.training.phases import FinetunePhase, TrainingPhase
from metapl.training.process import (
    Dist,
    StopSignals,
    barrier,
    init_distributed,
    launched_world_size,
    seed_everything,
    select_device,
    stop_agreed,
)
from metapl.training.saver import CheckpointSaver
from metapl.training.setup import Run, build_run

logger = logging.getLogger(__name__)


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Train a run to ``cfg.steps`` (then finetune if asked) and return its summary.

    Its lines go to the ``metapl`` logger (``metapl.logs``: printed by the ``metapl`` command, silent in a library
    unless configured) and, on rank 0, to ``RUN_DIR/train.log``.

    Args:
        cfg: the resolved config; ``cfg.out`` is the run directory.
        resume: continue the run in ``cfg.out`` from its latest checkpoint.
        overwrite: start a new run in ``cfg.out`` even if it is not empty, deleting the old run's files (see
            ``metapl.rundir.layout.clear_run_files``); without it, a folder that is not empty is refused.

    Returns:
        The summary dict also written to ``RUN_DIR/summary.json``.

    Raises:
        UserError: bad settings or data, a folder that would mix two runs, or a diverged run.
        Interrupted: SIGINT or SIGTERM, after saving a checkpoint of the current step.
    """
    device = select_device(cfg.device)
    _refuse_unsupported(cfg, device, launched_world_size())
    if cfg.wandb and is_writer_rank():
        require_wandb()
    # Checked and locked before joining the process group, so no rank can have written anything yet.
    run_dir = check_out_path(cfg.out)
    with run_lock(run_dir, command="metapl train", enabled=is_writer_rank()):
        run_dir = check_out_dir(cfg.out, resume=resume, overwrite=overwrite)
        d = init_distributed(device)
        with run_log() as lines:  # RUN_DIR/train.log (rank 0), once the folder exists
            return _train(cfg, run_dir, d, device, lines, resume=resume, overwrite=overwrite)


def _train(
    cfg: TrainConfig, run_dir: Path, d: Dist, device: torch.device, lines: RunLog, *, resume: bool, overwrite: bool
) -> dict:
    """``train`` after the run folder was checked and the process group joined; ``lines`` is the run's ``RunLog``."""
    ckpt = load_checkpoint(run_dir / LATEST) if resume else None
    if ckpt is not None:
        _check_resume(cfg, ckpt, run_dir)
    run, saver = _open_run(cfg, run_dir, d, device, ckpt, seed=cfg.seed)
    if d.is_main:
        with reporting_os_errors(run_dir, "create"):
            run_dir.mkdir(parents=True, exist_ok=True)
        if overwrite and not resume:
            clear_run_files(run_dir)
        lines.open(run_dir / TRAIN_LOG)
        save_run_config(cfg, run_dir)
        save_run_split(run.split, run_dir)
    progress = saver.finetune_progress() if ckpt is not None else None  # a stopped finetuning keeps its records
    resume_step = run.step + (progress or {}).get("done", 0) if ckpt is not None else None
    writer = _writer(run, run_dir, resume_step)
    try:
        with StopSignals() as stop:
            if run.step < cfg.steps:
                start = run.step
                phase = TrainingPhase(run, saver, writer)
                try:
                    run_phase(phase, run, stop)
                finally:
                    phase.close()
                logger.info(f"trained steps {start}..{run.step} in {run.seconds:.0f} s (total)")
            summary = _finish(run, saver, writer, stop)
    finally:
        writer.close()
    return summary


def _finish(run: Run, saver: CheckpointSaver, writer: Writer, stop: StopSignals) -> dict:
    """After training: the final accuracies, finetuning if planned, the result and ``summary.json``."""
    cfg = run.cfg
    if run.last_eval is not None and run.last_eval[0] == run.step:
        accs = run.last_eval[1]  # the loop just evaluated this very step
    else:
        accs = evaluate_run(
            run, eval_loaders(run.data, run.split, cfg.eval_batch_size, cfg.eval_limit, cfg.workers or 0)
        )
    if stop_agreed(stop, run.dist, run.device, synced=True):  # signalled during the last evaluation: saved already
        raise saver.interrupted(stop)
    summary = run_summary(run, accs)
    if cfg.planned_finetune_steps() > 0:
        resume = f"metapl train --resume {shlex.quote(cfg.out)}"
        summary.update(_finetune(run, saver, writer, stop, resume))
    if run.dist.is_main:
        record_result(summary, cfg)
        write_summary(saver.run_dir, summary)
        logger.info(f"summary: {json.dumps({k: v for k, v in summary.items() if k.endswith('_acc')})}")
    barrier(run.dist)
    return summary


def _finetune(run: Run, saver: CheckpointSaver, writer: Writer, stop: StopSignals | None, resume_command: str) -> dict:
    """The finetuning phase, to its end; ``{"finetune_steps", "finetuned_acc", "finetuned_top5"}`` for the summary."""
    phase = FinetunePhase(run, saver, writer, resume_command)
    try:
        run_phase(phase, run, stop)
    finally:
        phase.close()
    return phase.finish()


def finetune_run(run_dir: str | Path, *, steps: int | None, lr: float | None, device: str | None) -> dict:
    """``metapl finetune RUN_DIR``: rebuild the run from its latest checkpoint and finetune its student.

    Args:
        run_dir: a run directory of ``metapl train``.
        steps: finetune steps, 0 included (the student as it is, evaluated and saved as ``finetuned.pt``); None: the
            run's ``finetune_steps``, or ``FINETUNE_STEPS_IF_NONE`` (1000) when that is 0.
        lr: learning rate (default: the run's ``finetune_lr``).
        device: ``auto``/``cpu``/``cuda`` (default: the run's).

    Returns:
        The run's summary, updated with the finetuned accuracy (also written to ``summary.json``).
    """
    run_dir = Path(run_dir)
    if steps is not None and steps < 0:
        raise UserError(f"--steps {steps} is out of range; use an integer >= 0 (0 scores the student as it is)")
    if load_run_config(run_dir).wandb:  # a missing or damaged run is named before the folder is locked
        require_wandb()
    with run_lock(run_dir, command="metapl finetune", enabled=is_writer_rank()):
        return _finetune_run(run_dir, steps=steps, lr=lr, device=device)


def _finetune_run(run_dir: Path, *, steps: int | None, lr: float | None, device: str | None) -> dict:
    saved = load_run_config(run_dir)
    default = saved.planned_finetune_steps() or FINETUNE_STEPS_IF_NONE
    cfg = replace(
        saved,
        out=str(run_dir),
        finetune_steps=steps if steps is not None else default,
        finetune_lr=lr if lr is not None else saved.finetune_lr,
        device=device or saved.device,
    )
    ckpt = load_checkpoint(run_dir / LATEST)
    _check_resume(saved, ckpt, run_dir)  # an edited config.yaml would rebuild another run around these weights
    summary = read_summary(run_dir)  # read first: a damaged file is reported before minutes of work
    dev = select_device(cfg.device)
    run, saver = _open_run(cfg, run_dir, init_distributed(dev), dev, ckpt, seed=cfg.seed + 1)
    progress = saver.finetune_progress()  # a stopped finetuning keeps the records it wrote
    writer = _writer(run, run_dir, run.step + progress["done"] if progress is not None else None)
    again = f"metapl finetune {shlex.quote(str(run_dir))} --steps {cfg.finetune_steps} --lr {cfg.finetune_lr}"
    try:
        with StopSignals() as stop:
            summary.update(_finetune(run, saver, writer, stop, again))
    finally:
        writer.close()
    if run.dist.is_main:
        record_result(summary, cfg)
        write_summary(run_dir, summary)
    return summary


# ----------------------------------------------------------------------------------------------------------------
# What both commands share


def _open_run(
    cfg: TrainConfig, run_dir: Path, d: Dist, device: torch.device, ckpt: dict | None, *, seed: int
) -> tuple[Run, CheckpointSaver]:
    """Seed (``cfg.deterministic`` kernels included), build the run, restore ``ckpt`` into it with its length
    re-planned; the run and its ``CheckpointSaver``."""
    seed_everything(seed, cfg.deterministic)
    run = build_run(cfg, device, d, run_dir, ckpt)
    if ckpt is not None:
        replan_schedules(run, ckpt["config"]["steps"])
    return run, CheckpointSaver(run, run_dir)


def _writer(run: Run, run_dir: Path, resume_step: int | None) -> Writer:
    """The run's metrics writer, keeping the records up to ``resume_step`` (None: all); rank 0 alone writes the run's
    files, the other ranks only train."""
    if not run.dist.is_main:
        return NullWriter()
    return MetricsWriter.for_run(run.cfg, run_dir, resume_step)


def _check_resume(cfg: TrainConfig, ckpt: dict, run_dir: Path) -> None:
    """``config.rules.check_resume`` of this config against the checkpoint's (``UserError`` when they differ)."""
    try:
        saved = config_from_dict(ckpt["config"]).to_dict()
    except UserError:  # a checkpoint of another metapl version whose values no longer pass: nothing to compare with
        saved = None
    check_resume(cfg.to_dict(), saved, int(ckpt["step"]), run_dir / CONFIG)


def _refuse_unsupported(cfg: TrainConfig, device: torch.device, world_size: int) -> None:
    """Settings that cannot run as asked, refused before any process joins the group or loads data."""
    if cfg.sync_bn and device.type != "cuda":
        raise UserError(f"--sync-bn needs CUDA (SyncBatchNorm has no {device.type} kernel); drop --sync-bn")
    if cfg.sync_bn and world_size > 1 and cfg.mode == "soft":  # mode is idle, hence hard, without an MPL step
        raise UserError(
            "--sync-bn does not go with --mode soft: the exact meta-gradient runs the student in forward-mode "
            "autodiff, which SyncBatchNorm does not support; drop --sync-bn (per-rank BatchNorm) or use --mode hard"
        )
