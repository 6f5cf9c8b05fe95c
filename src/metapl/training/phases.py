"""The paper's last phase: finetune the student on the labeled data alone (``--finetune-steps``, ``metapl finetune``).

The finetuned student is saved as ``finetuned.pt`` (``checkpoint.inference_state``: the models, the student
finetuned, and no optimizer state), so the MPL checkpoint stays untouched and finetuning can be repeated with other
settings. A finetune stopped by SIGINT/SIGTERM saves ``finetune-progress.pt`` and continues from it when resumed
(``metapl train --resume RUN`` for the finetuning that follows training, or the same ``metapl finetune`` command); one
killed outright (SIGKILL) restarts from the MPL checkpoint: it is short.
"""

from __future__ import annotations

import shlex
import signal
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from metapl import data as mdata
from metapl.core import supervised_step, unwrap
from metapl.engine.batches import hflip
from metapl.engine.checkpoint import (
    atomic_save,
    inference_state,
    load_checkpoint,
    nonfinite_weights,
    rng_state,
    set_rng_state,
)
from metapl.engine.config import FINETUNE_STEPS_IF_NONE
from metapl.engine.evaluate import eval_loaders, evaluate_sets
from metapl.engine.lock import is_writer_rank, run_lock
from metapl.engine.metrics import MetricsWriter, require_wandb
from metapl.engine.result import record_result
from metapl.engine.resume import check_resume
from metapl.engine.run import build_run
from metapl.engine.run_dir import FINETUNE_PROGRESS, FINETUNED, LATEST, load_run_config, read_summary, write_summary
from metapl.engine.runtime import (
    StopSignals,
    barrier,
    init_distributed,
    make_sgd,
    seed_everything,
    select_device,
    stop_agreed,
)
from metapl.errors import Interrupted, UserError, reporting_os_errors


def finetune_student(
    run, run_dir: Path, writer, log, *, stop: StopSignals | None = None, resume_command: str = ""
) -> dict:
    """Finetune ``run.student`` for ``cfg.planned_finetune_steps()`` steps on shuffled labeled batches (weak views).

    A finetuning stopped by SIGINT/SIGTERM saves its progress (``finetune-progress.pt``: the student, the optimizer,
    the random generators and the step) and is continued from there by the next call on the same MPL checkpoint with
    the same finetuning settings, bit for bit; the file goes once the finetuning is done.

    Args:
        run: a built ``metapl.engine.run.Run`` (models restored).
        run_dir: the run directory.
        writer: the run's ``MetricsWriter``; finetune records use steps after the MPL steps.
        log: progress lines.
        stop: the signal flag to poll after each step (None: signals keep their usual effect).
        resume_command: what the interrupted message tells the user to run.

    Returns:
        ``{"finetuned_acc", "finetuned_top5", "finetune_steps"}``.

    Raises:
        UserError: the finetuned weights became non-finite (nothing is evaluated or written then).
        Interrupted: SIGINT or SIGTERM, after saving the progress.
    """
    cfg, device, data = run.cfg, run.device, run.data
    student = run.student  # DDP-wrapped under torchrun: the ranks stay in step
    opt = _finetune_optimizer(run)
    start = _restore_progress(run, run_dir, opt, log)
    batches = _labeled_batches(run, start)
    loaders = eval_loaders(data, run.split, cfg.eval_batch_size, cfg.eval_limit, cfg.workers)
    student.train()
    losses, accs = [], {}
    steps = cfg.planned_finetune_steps()
    for i in range(start, steps):
        losses.append(_finetune_step(run, opt, batches))
        done = i + 1
        synced = done % cfg.log_every == 0
        if synced and run.dist.is_main:
            writer.write(run.step + done, {"finetune/loss": torch.stack(losses).mean().item()})
            losses = []
        # Evaluated as often as training is, so that benchmarks can report the median of the last evaluations.
        if done % cfg.schedule().eval_every == 0 or done == steps:
            accs = _checked_accuracies(run, loaders, writer, done)
        if stop is not None and done < steps and stop_agreed(stop, run.dist, device, synced):
            raise _save_progress(run, run_dir, opt, done, stop, resume_command)
    if steps == 0 and run.dist.is_main:  # `metapl finetune --steps 0`: the student as it is, scored and saved
        accs = evaluate_sets({"finetuned": unwrap(student)}, loaders, device, amp_dtype=run.amp_dtype)
    return _save_finetuned(run, run_dir, accs, steps, log)


def _finetune_optimizer(run) -> torch.optim.Optimizer:
    """A fresh SGD for the student: training's settings at ``--finetune-lr``."""
    cfg = run.cfg
    return make_sgd(
        unwrap(run.student),
        lr=cfg.finetune_lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
        device=run.device,
    )


def _labeled_batches(run, start: int):
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
        workers=cfg.workers,
    )
    loader, _ = mdata.make_train_batches(data, run.split, spec)
    return iter(loader)


def _finetune_step(run, opt, batches) -> torch.Tensor:
    """One supervised step of the student on the next labeled batch; its loss (on the device, not synchronised)."""
    cfg = run.cfg
    x, y = (t.to(run.device, non_blocking=True) for t in next(batches))
    out = supervised_step(
        run.student,
        opt,
        x,
        y,
        label_smoothing=cfg.label_smoothing,
        grad_clip=cfg.grad_clip,
        amp_dtype=run.amp_dtype,
        scaler=None,
    )
    return out["loss/student"]


def _checked_accuracies(run, loaders: dict, writer, done: int) -> dict[str, float]:
    """After finetuning step ``done``: refuse diverged weights, then evaluate and record them (main rank; {} else)."""
    _refuse_diverged(run.student, run.cfg)  # every rank: they hold the same weights and must stop together
    if not run.dist.is_main:
        return {}
    accs = evaluate_sets({"finetuned": unwrap(run.student)}, loaders, run.device, amp_dtype=run.amp_dtype)
    writer.write(run.step + done, {f"eval/{k}": v for k, v in accs.items()})
    return accs


def _save_finetuned(run, run_dir: Path, accs: dict[str, float], steps: int, log) -> dict:
    """Write ``finetuned.pt`` and drop the finetuning's progress file (main rank); ``finetune_student``'s result."""
    result = {"finetune_steps": steps}
    if run.dist.is_main:
        log(f"finetuned student: test accuracy {accs['finetuned_acc']:.2f}%")
        result.update(accs)
        atomic_save(inference_state(run), run_dir / FINETUNED)
        with reporting_os_errors(run_dir / FINETUNE_PROGRESS, "delete"):
            (run_dir / FINETUNE_PROGRESS).unlink(missing_ok=True)
    return result


def finetune_progress(run, run_dir: Path) -> dict | None:
    """The saved progress of a stopped finetuning that ``run`` continues (same MPL step, same settings), else None."""
    path = run_dir / FINETUNE_PROGRESS
    if not path.is_file():
        return None
    progress = load_checkpoint(path)
    cfg = run.cfg
    plan = {
        "mpl_step": run.step,
        "steps": cfg.planned_finetune_steps(),
        "lr": cfg.finetune_lr,
        "batch_size": cfg.finetune_batch_size,
        "world_size": run.dist.world_size,
    }
    if any(progress.get(k) != v for k, v in plan.items()):
        return None  # another MPL step (an extended run) or other settings: finetune from the MPL checkpoint
    return progress


def _restore_progress(run, run_dir: Path, opt, log) -> int:
    """Load a stopped finetuning's student, optimizer and generators into ``run``; return its step (0 if none)."""
    progress = finetune_progress(run, run_dir)
    if progress is None:
        return 0
    unwrap(run.student).load_state_dict(progress["student"])
    opt.load_state_dict(progress["opt"])
    set_rng_state(progress["rng_ranks"][run.dist.rank])
    log(f"finetuning continues at step {progress['done']} of {progress['steps']} ({run_dir / FINETUNE_PROGRESS})")
    return int(progress["done"])


def _save_progress(run, run_dir: Path, opt, done: int, stop: StopSignals, resume_command: str) -> Interrupted:
    """Write a stopped finetuning's progress (rank 0; every rank's generators) and the message to stop with."""
    _refuse_diverged(run.student, run.cfg)
    ranks = [rng_state()]
    if run.dist.enabled:
        ranks = [None] * run.dist.world_size
        dist.all_gather_object(ranks, rng_state())
    path = run_dir / FINETUNE_PROGRESS
    if run.dist.is_main:
        cfg = run.cfg
        atomic_save(
            {
                "config": cfg.to_dict(),
                "mpl_step": run.step,
                "steps": cfg.planned_finetune_steps(),
                "lr": cfg.finetune_lr,
                "batch_size": cfg.finetune_batch_size,
                "world_size": run.dist.world_size,
                "done": done,
                "student": unwrap(run.student).state_dict(),
                "opt": opt.state_dict(),
                "rng_ranks": ranks,
            },
            path,
        )
    barrier(run.dist)
    signum = stop.signum or signal.SIGTERM  # under torchrun another rank may have been the one signalled
    return Interrupted(
        f"interrupted by {signal.Signals(signum).name} in finetuning at step {done} of "
        f"{run.cfg.planned_finetune_steps()}; saved {path}; resume with: {resume_command}",
        status=128 + signum,
    )


def _refuse_diverged(student, cfg) -> None:
    """Stop before a diverged student is evaluated or saved as ``finetuned.pt``."""
    if nonfinite_weights({"student": unwrap(student).state_dict()}):
        raise UserError(
            f"finetuning diverged: the student's weights became non-finite (NaN/inf) with learning rate "
            f"{cfg.finetune_lr}; {FINETUNED} was not written; finetune again with a lower --lr"
        )


def finetune_run(run_dir: str | Path, *, steps: int | None, lr: float | None, device: str | None, log=print) -> dict:
    """``metapl finetune RUN_DIR``: rebuild the run from its latest checkpoint and finetune its student.

    Args:
        run_dir: a run directory of ``metapl train``.
        steps: finetune steps, 0 included (the student as it is, evaluated and saved as ``finetuned.pt``); None: the
            run's ``finetune_steps``, or ``FINETUNE_STEPS_IF_NONE`` (1000) when that is 0.
        lr: learning rate (default: the run's ``finetune_lr``).
        device: ``auto``/``cpu``/``cuda`` (default: the run's).
        log: progress lines.

    Returns:
        The run's summary, updated with the finetuned accuracy (also written to ``summary.json``).
    """
    run_dir = Path(run_dir)
    if steps is not None and steps < 0:
        raise UserError(f"--steps {steps} is out of range; use an integer >= 0 (0 scores the student as it is)")
    if load_run_config(run_dir).wandb:  # a missing or damaged run is named before the folder is locked
        require_wandb()
    with run_lock(run_dir, command="metapl finetune", log=log, enabled=is_writer_rank()):
        return _finetune_run(run_dir, steps=steps, lr=lr, device=device, log=log)


def _finetune_run(run_dir: Path, *, steps: int | None, lr: float | None, device: str | None, log) -> dict:
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
    check_resume(saved, ckpt, run_dir)  # an edited config.yaml would rebuild another run around these weights
    summary = read_summary(run_dir)  # read first: a damaged file is reported before minutes of work
    dev = select_device(cfg.device)
    seed_everything(cfg.seed + 1)
    run = build_run(cfg, dev, init_distributed(dev), run_dir, ckpt, log)
    progress = finetune_progress(run, run_dir)  # a stopped finetuning keeps the records it wrote
    resume_step = run.step + progress["done"] if progress is not None else None
    writer = MetricsWriter.for_run(cfg, run_dir, resume_step)
    again = f"metapl finetune {shlex.quote(str(run_dir))} --steps {cfg.finetune_steps} --lr {cfg.finetune_lr}"
    try:
        with StopSignals() as stop:
            result = finetune_student(run, run_dir, writer, log, stop=stop, resume_command=again)
    finally:
        writer.close()
    summary.update(result)
    if run.dist.is_main:
        record_result(summary, cfg, log)
        write_summary(run_dir, summary)
    return summary
