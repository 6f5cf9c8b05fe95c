"""Exponential moving average of a model's weights, used to evaluate the student (MPL recipe: decay 0.995)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from metapl.core.parts import unwrap


class ModelEMA:
    """A frozen copy of a model whose parameters track ``decay * ema + (1 - decay) * model``.

    Buffers (BatchNorm running statistics) are copied, not averaged: they are already running averages.

    Args:
        model: the model to track (a DDP wrapper is unwrapped).
        decay: weight of the old average per update, in [0, 1).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards ``model``'s current weights (one fused op over all tensors)."""
        source = unwrap(model)
        ema_params = [p for p in self.module.parameters()]
        src_params = [p.detach() for p in source.parameters()]
        torch._foreach_lerp_(ema_params, src_params, 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), source.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        """The averaged model's state dict."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore the averaged weights."""
        self.module.load_state_dict(state)
