"""The mechanics around one optimizer step of the MPL updates: autocast, gradient clipping, the gradient scaler."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def autocast_for(x: Tensor, amp_dtype: torch.dtype | None) -> torch.autocast:
    """Autocast on ``x``'s device type to ``amp_dtype``; a disabled one when ``amp_dtype`` is None."""
    return torch.autocast(device_type=x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def clip_and_step(
    optimizer: torch.optim.Optimizer,
    params: Iterable[Tensor],
    scaler: torch.amp.GradScaler | None,
    grad_clip: float,
) -> None:
    """Clip the global gradient norm of ``params`` (when ``grad_clip`` > 0), then step, through ``scaler`` if any."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
