"""The optimizers of a run and their learning-rate schedules: SGD without decay on biases and normalisation weights,
``warmup_cosine`` through ``LambdaLR``, and the re-plan of an extended run (``--resume RUN --steps N``).

Extending a run: ``--steps N`` with N above the step the run has reached re-plans both learning-rate schedules. The
rule: from the current step k on, each schedule is the one of a run planned for N steps (``warmup_cosine`` with
``total_steps=N`` and the same wait and warm-up), so the learning rate at k becomes that schedule's value at k (a warm
restart when a finished run is extended: its rate was 0) and decays by the cosine to 0 at N. The steps before k are
kept as trained. The re-plan depends only on k and N, and the extended run's checkpoints record N, so stopping and
resuming an extended run continues it bit for bit. A finished run that was finetuned is finetuned again after the
extension, on the extended student (``finetuned.pt`` is replaced; ``finetune_steps`` left unset is a tenth of N).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from metapl.core import warmup_cosine

if TYPE_CHECKING:
    from metapl.training.setup import Run


def make_sgd(
    model: nn.Module, *, lr: float, momentum: float, nesterov: bool, weight_decay: float, device: torch.device
) -> torch.optim.SGD:
    """SGD with weight decay on weight matrices and kernels only (not on biases and normalisation parameters).

    The fused CUDA kernel is used on GPUs, the multi-tensor ``foreach`` path elsewhere.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0, **fast)


def make_scheduler(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0, wait_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over ``metapl.core.warmup_cosine``."""
    schedule = warmup_cosine(total_steps=total_steps, warmup_steps=warmup_steps, wait_steps=wait_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def replan_schedules(run: Run, saved_steps: int) -> None:
    """After restoring a run whose length changed (``run.cfg.steps`` != ``saved_steps``), set each optimizer's
    learning rate to its N-step schedule's value at the current step (the module docstring's rule).

    The schedulers were built for ``run.cfg.steps`` and hold the restored step; only the rates already set in the
    optimizers come from the old plan.
    """
    if run.cfg.steps == saved_steps:
        return
    for sched in (run.t_sched, run.s_sched):
        for group, base, multiplier in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * multiplier(sched.last_epoch)  # as LambdaLR computes it
        sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]
