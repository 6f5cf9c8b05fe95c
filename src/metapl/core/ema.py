"""Exponential moving average of a model's weights, used to evaluate the student (MPL recipe: decay 0.995).

The decay warms up as the official release's does: at update t (counted from 0) the average keeps
``min(decay, (t + 1) / (t + 10))`` of itself (../shared/MPL_NOTES.md, "CIFAR-10-4K recipe"). Without the warm-up a
decay of 0.995 keeps ``0.995**t`` of the random initial weights: 74 % after 60 updates, 22 % after 300, so a short run
hands back an average that is still mostly noise.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from metapl.core.replicas import unwrap


class ModelEMA:
    """A frozen copy of a model whose parameters track ``d_t * ema + (1 - d_t) * model``, ``d_t`` warming up to
    ``decay``.

    Buffers (BatchNorm running statistics) are copied, not averaged: they are already running averages.

    Args:
        model: the model to track (a DDP wrapper is unwrapped).
        decay: weight of the old average per update once warmed up, in [0, 1).
        warmup: use ``d_t = min(decay, (t + 1) / (t + 10))`` at update ``t`` (the official release); False keeps
            ``decay`` from the first update.
    """

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0  # how many times update() ran: the t of the warm-up (restored with the run's step)
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next ``update`` applies."""
        t = self.updates
        return min(self.decay, (t + 1) / (t + 10)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards ``model``'s current weights (one fused op over all tensors)."""
        source = unwrap(model)
        ema_params: list[Tensor] = [p for p in self.module.parameters()]
        src_params = [p.detach() for p in source.parameters()]
        torch._foreach_lerp_(ema_params, src_params, 1.0 - self.current_decay())
        for b_ema, b in zip(self.module.buffers(), source.buffers()):
            b_ema.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict:
        """The averaged model's state dict."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict, *, updates: int | None = None) -> None:
        """Restore the averaged weights and, when given, the number of updates made (the warm-up's position)."""
        self.module.load_state_dict(state)
        if updates is not None:
            self.updates = updates
