"""One supervised step: the labels-only baseline and the student's finetuning phase share it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def supervised_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    label_smoothing: float = 0.0,
    grad_clip: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, Tensor]:
    """Cross-entropy on a labeled batch and one optimizer step.

    Args:
        model: any classifier mapping (B, C, H, W) to (B, K) logits, in train mode.
        optimizer: its optimizer.
        x: (B, C, H, W) images; y: (B,) class indices.
        label_smoothing: label smoothing of the cross-entropy.
        grad_clip: max gradient norm; 0 = off.
        amp_dtype: autocast dtype, or None.
        scaler: gradient scaler for float16, or None.

    Returns:
        ``{"loss/student": loss}`` detached.
    """
    with torch.autocast(device_type=x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(x).float()
    loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return {"loss/student": loss.detach()}
