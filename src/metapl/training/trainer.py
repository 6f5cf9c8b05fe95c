"""``metapl train``: the MPL training loop around ``metapl.core.mpl_update`` (and the labels-only baseline).

A run's state and folder: ``metapl.engine.run``; its files and checkpoint format: ``metapl.engine.checkpoint``;
its accuracies and ``summary.json``: ``metapl.engine.results``.
Only finite weights are ever saved: a run that diverges stops with the last good checkpoint on disk. SIGINT (Ctrl-C)
and SIGTERM stop it after the current step, with a checkpoint of that step.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from metapl.core import Batch, linear_ramp, mpl_update, supervised_step, unwrap
from metapl.engine.batches import train_batches
from metapl.engine.checkpoint import (
    atomic_save,
    checkpoint_state,
    load_checkpoint,
    nonfinite_weights,
    rng_state,
)
from metapl.engine.config import TrainConfig
from metapl.engine.evaluate import eval_loaders
from metapl.engine.finetune import finetune_progress, finetune_student
from metapl.engine.lock import is_writer_rank, run_lock
from metapl.engine.metrics import LogFile, MetricsWriter, NullWriter, require_wandb
from metapl.engine.result import record_result
from metapl.engine.results import eval_line, evaluate_run, run_summary
from metapl.engine.resume import check_resume, replan_schedules
from metapl.engine.run import Run, build_run, check_out_dir, check_out_path, clear_run_files
from metapl.engine.run_dir import LATEST, TRAIN_LOG, save_run_config, save_run_split, write_summary
from metapl.engine.runtime import (
    StopSignals,
    all_reduce_mean,
    barrier,
    init_distributed,
    launched_world_size,
    seed_everything,
    select_device,
    stop_agreed,
)
from metapl.errors import Interrupted, UserError, reporting_os_errors

LOSS_KEYS = ("loss/teacher", "loss/student")


class TrainingDiverged(UserError):
    """A loss or a weight became NaN or infinite; the last good checkpoint is kept."""


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, log=print) -> dict:
    """Train a run to ``cfg.steps`` (then finetune if asked) and return its summary.

    Args:
        cfg: the resolved config; ``cfg.out`` is the run directory.
        resume: continue the run in ``cfg.out`` from its latest checkpoint.
        overwrite: start a new run in ``cfg.out`` even if it is not empty, deleting the old run's files (see
            ``metapl.engine.run.clear_run_files``); without it, a folder that is not empty is refused.
        log: where progress lines go (rank 0 only).

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
    with run_lock(run_dir, command="metapl train", log=log, enabled=is_writer_rank()):
        run_dir = check_out_dir(cfg.out, resume=resume, overwrite=overwrite)
        d = init_distributed(device)
        log = LogFile(log if d.is_main else (lambda *a, **k: None))  # also RUN_DIR/train.log, once the folder exists
        try:
            return _train(cfg, run_dir, d, device, log, resume=resume, overwrite=overwrite)
        finally:
            log.close()


def _train(cfg: TrainConfig, run_dir: Path, d, device: torch.device, log, *, resume: bool, overwrite: bool) -> dict:
    """``train`` after the run folder was checked and the process group joined; ``log`` is the run's ``LogFile``."""
    ckpt = load_checkpoint(run_dir / LATEST) if resume else None
    if ckpt is not None:
        check_resume(cfg, ckpt, run_dir)
    seed_everything(cfg.seed, cfg.deterministic)
    run = build_run(cfg, device, d, run_dir, ckpt, log)
    if ckpt is not None:
        replan_schedules(run, ckpt["config"]["steps"])
    if d.is_main:
        with reporting_os_errors(run_dir, "create"):
            run_dir.mkdir(parents=True, exist_ok=True)
        if overwrite and not resume:
            clear_run_files(run_dir, log)
        log.open(run_dir / TRAIN_LOG)
        save_run_config(cfg, run_dir)
        save_run_split(run.split, run_dir)
    writer = NullWriter()  # rank 0 alone writes the run's files; under torchrun the other ranks only train
    if d.is_main:
        resume_step = None
        if ckpt is not None:  # a stopped finetuning keeps the records it wrote
            resume_step = run.step + (finetune_progress(run, run_dir) or {}).get("done", 0)
        writer = MetricsWriter.for_run(cfg, run_dir, resume_step)
    try:
        with StopSignals() as stop:
            if run.step < cfg.steps:
                _loop(run, run_dir, writer, log, stop)
            summary = _finish(run, run_dir, writer, log, stop)
    finally:
        writer.close()
    return summary


def _save(run: Run, run_dir: Path, name: str = LATEST) -> None:
    # Every rank's generators (dropout masks, sampled pseudo labels differ per rank), so that a resumed
    # multi-process run continues bit-identically; a collective, so every rank calls _save.
    _check_finite(run)  # every rank: the weights are the same on all of them, so all of them stop together
    ranks = None
    if run.dist.enabled:
        ranks = [None] * run.dist.world_size
        dist.all_gather_object(ranks, rng_state())
    if run.dist.is_main:
        state = checkpoint_state(run)
        if ranks is not None:
            state["rng_ranks"] = ranks
        atomic_save(state, run_dir / name)
    if name == LATEST:
        run.saved_step = run.step
    barrier(run.dist)


def _check_finite(run: Run) -> None:
    """Stop a run whose weights hold a NaN or an infinity, before they are evaluated or saved."""
    models = {"teacher": unwrap(run.teacher), "student": unwrap(run.student)}
    if run.ema is not None:
        models["ema"] = run.ema.module
    bad = nonfinite_weights({role: m.state_dict() for role, m in models.items()})
    if bad:
        raise _diverged(run, f"the {' and '.join(bad)} weights became non-finite (NaN/inf) by step {run.step}")


def _diverged(run: Run, what: str) -> TrainingDiverged:
    """The one-line stop of a diverged run: what happened, which checkpoint is left, how to start again."""
    out = shlex.quote(run.cfg.out)
    if run.saved_step is not None:
        kept = f"the last finite checkpoint, {Path(run.cfg.out) / LATEST} (step {run.saved_step}), is kept"
    else:
        kept = "no checkpoint was saved before"
    return TrainingDiverged(
        f"{what}; training stopped and {kept}; lower the learning rates (--t-lr, --s-lr) or set --grad-clip, and "
        f"start again with --out {out} --overwrite"
    )


def _refuse_unsupported(cfg: TrainConfig, device: torch.device, world_size: int) -> None:
    """Settings that cannot run as asked, refused before any process joins the group or loads data."""
    if cfg.sync_bn and device.type != "cuda":
        raise UserError(f"--sync-bn needs CUDA (SyncBatchNorm has no {device.type} kernel); drop --sync-bn")
    if cfg.sync_bn and world_size > 1 and cfg.method != "supervised" and cfg.mode == "soft":
        raise UserError(
            "--sync-bn does not go with --mode soft: the exact meta-gradient runs the student in forward-mode "
            "autodiff, which SyncBatchNorm does not support; drop --sync-bn (per-rank BatchNorm) or use --mode hard"
        )


# ----------------------------------------------------------------------------------------------------------------
# The loop


def _loop(run: Run, run_dir: Path, writer: MetricsWriter, log, stop: StopSignals) -> None:
    cfg, plan = run.cfg, run.cfg.schedule()
    batches = train_batches(run)
    eval_sets = eval_loaders(run.data, run.split, cfg.eval_batch_size, cfg.eval_limit, cfg.workers)
    images_per_step = cfg.batch_size * (1 + 2 * cfg.mu if cfg.method != "supervised" else 1) * run.dist.world_size

    pending: list[torch.Tensor] = []  # per-step metric vectors since the last sync (no .item() per step)
    keys: list[str] = []
    progress = _progress(cfg, run, log)
    tick, seg_start = time.perf_counter(), time.perf_counter()
    start_step = run.step
    last = {}
    try:
        while run.step < cfg.steps:
            metrics = _train_step(run, batches)
            run.step += 1
            keys = list(metrics)
            pending.append(torch.stack([metrics[k] for k in keys]))

            is_last = run.step == cfg.steps
            do_eval = run.step % plan.eval_every == 0 or is_last
            do_save = run.step % plan.save_every == 0 or is_last
            synced = run.step % cfg.log_every == 0 or do_eval or do_save
            if synced:
                now = time.perf_counter()
                values = _interval_metrics(run, keys, pending, now - tick, images_per_step)
                pending, tick = [], now
                writer.write(run.step, {f"train/{k}": v for k, v in values.items()})
                last.update({"loss_t": values.get("loss/teacher"), "loss_s": values.get("loss/student")})
            if do_eval:
                run.seconds += time.perf_counter() - seg_start
                seg_start = time.perf_counter()
                accs = _evaluate(run, eval_sets, writer, log)
                last.update({k: accs[k] for k in accs if k.endswith("_acc")})
                tick = time.perf_counter()  # evaluation time is not step time
            stopping = _stop_agreed(run, stop, synced)
            if do_save or stopping:
                run.seconds += time.perf_counter() - seg_start
                seg_start = time.perf_counter()
                _save(run, run_dir)
            if stopping:
                raise _interrupted(run, stop)
            if progress is not None:
                progress.update(1)
                progress.set_postfix({k: f"{v:.3g}" for k, v in last.items() if v is not None}, refresh=False)
    finally:
        if progress is not None:
            progress.close()
    log(f"trained steps {start_step}..{run.step} in {run.seconds:.0f} s (total)")


def _interval_metrics(
    run: Run, keys: list[str], pending: list[torch.Tensor], seconds: float, images_per_step: int
) -> dict[str, float]:
    """The means of the ``pending`` steps' metrics (the one host sync of the interval), the learning rates and speed."""
    values = _sync_metrics(run, keys, pending)
    n = len(pending)
    values.update(
        {
            "lr/teacher": run.t_opt.param_groups[0]["lr"],
            "lr/student": run.s_opt.param_groups[0]["lr"],
            "time/step_ms": 1000 * seconds / n,
            "time/images_per_s": images_per_step * n / seconds,
        }
    )
    return values


def _train_step(run: Run, batches) -> dict[str, torch.Tensor]:
    """One update of the teacher and the student (or of the student alone), schedules and EMA included."""
    cfg, device = run.cfg, run.device
    l_iter, u_iter = batches
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    x_l, y_l, *t_x_l = (t.to(device, non_blocking=True) for t in next(l_iter))
    x_l = x_l.contiguous(memory_format=memory_format)
    if cfg.method != "supervised":
        x_uw, x_us, y_u, *t_x_u = (t.to(device, non_blocking=True) for t in next(u_iter))
        # Reduced MPL: the teacher reads the large teacher's stored prediction of each image, the same for both views.
        t_x = (t_x_l[0], t_x_u[0], t_x_u[0]) if t_x_l else (None, None, None)
        batch = Batch(
            x_l,
            y_l,
            x_uw.contiguous(memory_format=memory_format),
            x_us.contiguous(memory_format=memory_format),
            y_u,
            *t_x,
        )
        uda_weight = linear_ramp(run.step, value=cfg.planned_uda_weight(), ramp_steps=cfg.schedule().uda_steps)
        metrics = mpl_update(
            run.teacher,
            run.student,
            None if run.fixed_teacher else run.t_opt,
            run.s_opt,
            batch,
            cfg.mpl_config(),
            run.state,
            uda_weight=uda_weight,
            amp_dtype=run.amp_dtype,
            t_scaler=run.t_scaler,
            s_scaler=run.s_scaler,
            check_finite=False,  # no sync per step: the loop checks the weights when it syncs (TrainingDiverged)
        )
        run.t_sched.step()
    else:
        metrics = _supervised_step(run, x_l, y_l)
    with warnings.catch_warnings():
        # While the student waits, mpl_update skips its optimizer on purpose; the schedule still advances.
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
        run.s_sched.step()
    if run.ema is not None:
        run.ema.update(run.student)
    return metrics


def _evaluate(run: Run, loaders: dict, writer: MetricsWriter, log) -> dict[str, float]:
    """Evaluate the finite models and log their accuracies (the result is chosen among the final ones: ``_finish``)."""
    _check_finite(run)
    accs = evaluate_run(run, loaders)
    run.last_eval = (run.step, accs)
    if run.dist.is_main:
        writer.write(run.step, {f"eval/{k}": v for k, v in accs.items()})
        log(eval_line(run.step, accs))
    return accs


def _stop_agreed(run: Run, stop: StopSignals, synced: bool) -> bool:
    """Whether to stop after this step on a signal (``metapl.engine.runtime.stop_agreed``)."""
    return stop_agreed(stop, run.dist, run.device, synced)


def _interrupted(run: Run, stop: StopSignals) -> Interrupted:
    signum = stop.signum or signal.SIGTERM  # under torchrun another rank may have been the one signalled
    return Interrupted(
        f"interrupted by {signal.Signals(signum).name} at step {run.step}; saved {Path(run.cfg.out) / LATEST}; "
        f"resume with: metapl train --resume {shlex.quote(run.cfg.out)}",
        status=128 + signum,
    )


def _supervised_step(run: Run, x_l: torch.Tensor, y_l: torch.Tensor) -> dict[str, torch.Tensor]:
    """The labels-only baseline: the student alone, cross-entropy on the labeled batch."""
    return supervised_step(
        run.student,
        run.s_opt,
        x_l,
        y_l,
        label_smoothing=run.cfg.label_smoothing,
        grad_clip=run.cfg.grad_clip,
        amp_dtype=run.amp_dtype,
        scaler=run.s_scaler,
    )


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
                raise _diverged(run, f"{k} became {rows[first, i].item()} at step {step}")
    return {k: float(v) for k, v in zip(keys, mean.cpu().tolist())}


def _progress(cfg: TrainConfig, run: Run, log):
    if not (cfg.progress and run.dist.is_main):
        return None
    from tqdm import tqdm

    # disable=None: a bar on a terminal, nothing in a log file (the per-evaluation lines remain).
    return tqdm(
        total=cfg.steps, initial=run.step, desc="metapl", unit="step", dynamic_ncols=True, leave=False, disable=None
    )


# ----------------------------------------------------------------------------------------------------------------
# After training


def _finish(run: Run, run_dir: Path, writer: MetricsWriter, log, stop: StopSignals) -> dict:
    cfg = run.cfg
    if run.last_eval is not None and run.last_eval[0] == run.step:
        accs = run.last_eval[1]  # the loop just evaluated this very step
    else:
        accs = evaluate_run(run, eval_loaders(run.data, run.split, cfg.eval_batch_size, cfg.eval_limit, cfg.workers))
    if _stop_agreed(run, stop, synced=True):  # signalled during the last evaluation: checkpoint.pt is of this step
        raise _interrupted(run, stop)
    summary = run_summary(run, accs)
    if cfg.planned_finetune_steps() > 0:
        resume = f"metapl train --resume {shlex.quote(cfg.out)}"
        summary.update(finetune_student(run, run_dir, writer, log, stop=stop, resume_command=resume))
    if run.dist.is_main:
        record_result(summary, cfg, log)
        write_summary(run_dir, summary)
        log(f"summary: {json.dumps({k: v for k, v in summary.items() if k.endswith('_acc')})}")
    barrier(run.dist)
    return summary
