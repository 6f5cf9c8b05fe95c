"""The paper's last phase: finetune the student on the labeled data alone (``--finetune-steps``, ``metapl finetune``).

The finetuned student is saved as ``finetuned.pt`` (``checkpoint.inference_state``: the models, the student
finetuned, and no optimizer state), so the MPL checkpoint stays untouched and finetuning can be repeated with other
settings. A finetune killed midway is simply run again: it is short and restarts from the MPL checkpoint.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from metapl import data as mdata
from metapl.core import supervised_step, unwrap
from metapl.engine.batches import hflip
from metapl.engine.checkpoint import (
    FINETUNED,
    LATEST,
    atomic_save,
    inference_state,
    load_checkpoint,
    nonfinite_weights,
)
from metapl.engine.evaluate import eval_loaders, evaluate_sets
from metapl.engine.metrics import MetricsWriter
from metapl.engine.run import build_run, load_run_config, read_summary, write_summary
from metapl.engine.runtime import init_distributed, make_sgd, seed_everything, select_device
from metapl.errors import UserError


def finetune_student(run, run_dir: Path, writer, log) -> dict:
    """Finetune ``run.student`` for ``cfg.planned_finetune_steps()`` steps on shuffled labeled batches (weak views).

    Args:
        run: a built ``metapl.engine.run.Run`` (models restored).
        run_dir: the run directory.
        writer: the run's ``MetricsWriter``; finetune records use steps after the MPL steps.
        log: progress lines.

    Returns:
        ``{"finetuned_acc", "finetuned_top5", "finetune_steps"}``.

    Raises:
        UserError: the finetuned weights became non-finite (nothing is evaluated or written then).
    """
    cfg, device, data = run.cfg, run.device, run.data
    student = run.student  # DDP-wrapped under torchrun: the ranks stay in step
    opt = make_sgd(unwrap(student), lr=cfg.finetune_lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                   weight_decay=cfg.weight_decay, device=device)  # fmt: skip
    weak = mdata.weak_transform(data.image_size, hflip=hflip(cfg, data), mean=data.mean, std=data.std,
                                crop=mdata.train_crop(data))  # fmt: skip
    loader, _ = mdata.make_train_loaders(
        data, run.split, batch_size=cfg.finetune_batch_size, mu=1, seed=cfg.seed + 1, start_step=0,
        num_workers=cfg.workers, rank=run.dist.rank, world_size=run.dist.world_size, weak=weak, strong=weak,
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    batches = iter(loader)
    loaders = eval_loaders(data, run.split, cfg.eval_batch_size, cfg.eval_limit, cfg.workers)
    student.train()
    losses, accs = [], {}
    steps = cfg.planned_finetune_steps()
    for i in range(steps):
        x, y = (t.to(device, non_blocking=True) for t in next(batches))
        out = supervised_step(student, opt, x, y, label_smoothing=cfg.label_smoothing, grad_clip=cfg.grad_clip,
                              amp_dtype=run.amp_dtype, scaler=None)  # fmt: skip
        losses.append(out["loss/student"])
        done = i + 1
        if done % cfg.log_every == 0 and run.dist.is_main:
            writer.write(run.step + done, {"finetune/loss": torch.stack(losses).mean().item()})
            losses = []
        # Evaluated as often as training is, so that benchmarks can report the median of the last evaluations.
        if done % cfg.eval_every == 0 or done == steps:
            _refuse_diverged(student, cfg)  # every rank: they hold the same weights and must stop together
            if run.dist.is_main:
                accs = evaluate_sets({"finetuned": unwrap(student)}, loaders, device, amp_dtype=run.amp_dtype)
                writer.write(run.step + done, {f"eval/{k}": v for k, v in accs.items()})
    result = {"finetune_steps": steps}
    if run.dist.is_main:
        log(f"finetuned student: test accuracy {accs['finetuned_acc']:.2f}%")
        result.update(accs)
        atomic_save(inference_state(run), run_dir / FINETUNED)
    return result


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
        steps: finetune steps (default: the run's ``finetune_steps``, or 1000 when that is 0).
        lr: learning rate (default: the run's ``finetune_lr``).
        device: ``auto``/``cpu``/``cuda`` (default: the run's).
        log: progress lines.

    Returns:
        The run's summary, updated with the finetuned accuracy (also written to ``summary.json``).
    """
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    cfg = replace(
        cfg, out=str(run_dir), finetune_steps=steps or cfg.planned_finetune_steps() or 1000,
        finetune_lr=lr if lr is not None else cfg.finetune_lr, device=device or cfg.device,
    )  # fmt: skip
    ckpt = load_checkpoint(run_dir / LATEST)
    summary = read_summary(run_dir)  # read first: a damaged file is reported before minutes of work
    dev = select_device(cfg.device)
    seed_everything(cfg.seed + 1)
    run = build_run(cfg, dev, init_distributed(dev), run_dir, ckpt, log)
    writer = MetricsWriter(run_dir, tensorboard=cfg.tensorboard)
    try:
        result = finetune_student(run, run_dir, writer, log)
    finally:
        writer.close()
    summary.update(result)
    if run.dist.is_main:
        write_summary(run_dir, summary)
    return summary
