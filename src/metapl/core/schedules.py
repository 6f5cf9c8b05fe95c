"""Learning-rate and loss-weight schedules of the MPL recipe, as plain functions of the step."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(*, total_steps: int, warmup_steps: int = 0, wait_steps: int = 0) -> Callable[[int], float]:
    """A multiplier for ``torch.optim.lr_scheduler.LambdaLR``: wait, linear warm-up, then cosine decay to zero.

    The student of the CIFAR recipe waits (learning rate 0) while the teacher warms up; during those steps
    ``mpl_update`` skips the student's work, so waiting costs nothing.

    Args:
        total_steps: steps of the whole run; the multiplier reaches 0 at ``total_steps``.
        warmup_steps: steps of linear warm-up after the wait.
        wait_steps: leading steps with multiplier 0.

    Returns:
        ``f(step) -> float`` in [0, 1].
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")

    def multiplier(step: int) -> float:
        if step < wait_steps:
            return 0.0
        step -= wait_steps
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        decay_steps = max(1, total_steps - wait_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def linear_ramp(step: int, *, value: float, ramp_steps: int) -> float:
    """``value`` scaled linearly from 0 at step 0 to full at ``ramp_steps`` (UDA's weight ramp-up)."""
    if ramp_steps <= 0:
        return value
    return value * min(1.0, step / ramp_steps)
