"""One Meta Pseudo Labels update of any teacher and student ``nn.Module`` (Pham et al., CVPR 2021).

Notation follows the paper (Sec. 2 and Appendix A) and ``docs/algorithm.md``:

* teacher T with parameters θ_T, student S with θ_S; labeled (x_l, y_l); unlabeled weak view x_uw, strong x_us;
* ŷ: the teacher's pseudo labels; L_u(θ_T, θ_S) = CE(ŷ, S(x_us; θ_S)), the student's loss               (Eq. 1)
* the teacher's objective: the student's labeled loss L_l = CE(y_l, S(x_l; ·)) after learning from ŷ      (Eq. 2)
* with one look-ahead step θ'_S = θ_S − η_S ∇_{θ_S} L_u(θ_T, θ_S) in place of the argmin, L_l(θ'_S)      (Eq. 3).

The hard variant estimates the teacher's gradient with REINFORCE, h · ∇_{θ_T} CE(ŷ, T(x_us; θ_T)), where
h = η_S ∇_{θ'_S} L_l(θ'_S) · ∇_{θ_S} CE(ŷ, S(x_us; θ_S))  (Appendix A, "dot"), or to first order
h ≈ L_l(θ_S) − L_l(θ'_S) ("taylor"). The soft variant differentiates L_l(θ'_S(θ_T)) exactly through the student's
one SGD step (second order, ``torch.func.functional_call``). This module holds the update's types and its entry
point ``mpl_update``; the hard update is in ``metapl.core.hard``, the soft one in ``metapl.core.soft``, and the
pieces both use in ``metapl.core.replicas`` (``unwrap``), ``metapl.core.feedback`` (``feedback_mode``),
``metapl.core.steps`` (the optimizer step) and ``metapl.core.losses``.

Under ``torch.distributed`` (models wrapped in DDP), an update equals one process's update on the ranks'
concatenated batches (BatchNorm aside: its batch statistics are per rank): in hard mode DDP averages the gradients
and h is averaged over ranks; in soft mode the DDP teacher averages its gradients and the student's gradient and the
meta-gradient's student-side vector are all-reduced over the student's DDP process group (``metapl.core.soft``).

``mpl_update`` returns detached scalar tensors: ``loss/teacher``, ``loss/teacher_l``, ``loss/teacher_uda``,
``loss/teacher_mpl``, ``loss/student``, ``mpl/h`` (signed, before the baseline), ``mpl/baseline``,
``mpl/s_loss_l_old``, ``mpl/s_loss_l_new``, ``mask_ratio``, ``pseudo/confidence`` and, when ``batch.y_u`` is given,
``pseudo/acc`` (the fraction of correct pseudo labels among images whose label is known).

This module knows nothing of files, data or the command line. It never calls ``.item()`` or ``.cuda()``: the device
comes from the tensors, and the caller decides when to synchronise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from metapl.core.config import MPLConfig
from metapl.core.feedback import feedback_mode
from metapl.core.hard import hard_update
from metapl.core.replicas import unwrap
from metapl.core.soft import soft_update
from metapl.core.validate import MPLInputError, check_batch, check_scalars, guarded_update

__all__ = [
    "Batch",
    "MPLConfig",
    "MPLState",
    "feedback_mode",
    "mpl_update",
    "unwrap",
]  # the last two: core.feedback, core.replicas
__all__ += ["MPLInputError"]  # from core.validate; MPLConfig is declared in core.config (no torch)


class Batch(NamedTuple):
    """One MPL batch. Shapes: x_l (B, C, H, W), y_l (B,), x_uw and x_us (μB, C, H, W), y_u (μB,) or None.

    ``y_u`` holds the true labels of the unlabeled images where known (-1 elsewhere); it is used only to report the
    pseudo labels' accuracy, never to train.

    ``t_x_l``, ``t_x_uw`` and ``t_x_us`` are what the teacher reads in place of ``x_l``, ``x_uw`` and ``x_us`` (same
    leading dimension); None: the images themselves. Reduced Meta Pseudo Labels (the paper's Appendix E) passes the
    large teacher's stored log-probabilities of each image here, (B, K) and (μB, K), and a small reduced teacher
    reads them; the update itself is unchanged. The student always reads the images.
    """

    x_l: Tensor
    y_l: Tensor
    x_uw: Tensor
    x_us: Tensor
    y_u: Tensor | None = None
    t_x_l: Tensor | None = None
    t_x_uw: Tensor | None = None
    t_x_us: Tensor | None = None

    def teacher_inputs(self) -> tuple[Tensor, Tensor, Tensor]:
        """What the teacher reads for the labeled, weak and strong images: ``t_x_*`` where given, else ``x_*``."""
        return (
            self.x_l if self.t_x_l is None else self.t_x_l,
            self.x_uw if self.t_x_uw is None else self.t_x_uw,
            self.x_us if self.t_x_us is None else self.t_x_us,
        )


@dataclass
class MPLState:
    """What an MPL run carries from one update to the next: the moving-average baseline of h (a 0-d tensor)."""

    baseline: Tensor | None = field(default=None)

    def state_dict(self) -> dict:
        """For checkpoints."""
        return {"baseline": self.baseline}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``; a ValueError names what is missing or wrong."""
        if not isinstance(state, dict) or "baseline" not in state:
            raise ValueError(
                f"MPLState.load_state_dict needs the dict of state_dict() with a 'baseline' entry, got "
                f"{state!r:.60}; pass MPLState().state_dict() or a checkpoint's 'mpl_state'"
            )
        baseline = state["baseline"]
        if baseline is not None and not (isinstance(baseline, torch.Tensor) and baseline.dim() == 0):
            raise ValueError(f"MPLState.load_state_dict: 'baseline' must be None or a 0-d tensor, got {baseline!r:.60}")
        self.baseline = baseline


def mpl_update(
    teacher: nn.Module,
    student: nn.Module,
    t_optimizer: torch.optim.Optimizer | None,
    s_optimizer: torch.optim.Optimizer,
    batch: Batch,
    config: MPLConfig,
    state: MPLState | None = None,
    *,
    uda_weight: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    t_scaler: torch.amp.GradScaler | None = None,
    s_scaler: torch.amp.GradScaler | None = None,
    generator: torch.Generator | None = None,
    check_finite: bool = True,
) -> dict[str, Tensor]:
    """Perform one Meta Pseudo Labels update: the student's step, then the teacher's.

    Both models must be in train mode. The student's step size η_S is read from ``s_optimizer``'s first parameter
    group; at 0 (the recipe's "student waits" phase) the student's step is skipped and h = 0.

    Args:
        teacher, student: modules mapping (N, C, H, W) to (N, K) logits; they may differ; either may be DDP-wrapped.
        t_optimizer: stepped once. None: a fixed teacher (distillation, the control that isolates the feedback): it
            only labels, under ``torch.no_grad``, in its current mode; no teacher loss, no h (those metrics are 0).
        s_optimizer: stepped once (unless its learning rate is 0). ``batch``, ``config``: see ``Batch``, ``MPLConfig``.
        state: carries the moving-average baseline of h; required when ``config.baseline_decay > 0``.
        uda_weight: weight of the teacher's UDA loss at this step (the caller ramps it up); 0 = no UDA.
        amp_dtype: autocast dtype (bfloat16 or float16) for the forwards, or None; the feedback's L_l is measured in
            float32 or wider (h is a small difference of two losses). t_scaler, s_scaler: float16 gradient scalers.
        generator: random generator for ``pseudo_label="sample"``.
        check_finite: guard the update (``metapl.core.validate.guarded_update``: a failed update changes nothing);
            costs a copy of both models and optimizer states and one host sync. False skips both (out-of-range
            labels are then trained as class 0: check them yourself).

    Raises ``MPLInputError`` (a ValueError naming the bad field or argument: shapes, lengths, dtypes, devices,
    ``uda_weight``, learning rates; checked without a sync, or by the guard) and ValueError for options that do not go
    together. Returns named, detached scalar tensors, listed in the module docstring.
    """
    _check_arguments(batch, config, state, t_optimizer, s_optimizer, uda_weight, amp_dtype, s_scaler)
    step = hard_update if config.mode == "hard" else soft_update
    if check_finite:  # the same call, through the guard that undoes a failed update
        step = functools.partial(guarded_update, step)
    options: dict[str, Any] = dict(
        uda_weight=uda_weight, amp_dtype=amp_dtype, t_scaler=t_scaler, s_scaler=s_scaler, generator=generator
    )
    return step(teacher, student, t_optimizer, s_optimizer, batch, config, state, **options)


def _check_arguments(
    batch: Batch,
    config: MPLConfig,
    state: MPLState | None,
    t_optimizer: torch.optim.Optimizer | None,
    s_optimizer: torch.optim.Optimizer,
    uda_weight: float,
    amp_dtype: torch.dtype | None,
    s_scaler: torch.amp.GradScaler | None,
) -> None:
    """``mpl_update``'s checks before the update: metadata and Python scalars only, no host sync."""
    check_batch(batch)  # metadata only: metapl.core.validate
    check_scalars(uda_weight, {"s_optimizer": s_optimizer, "t_optimizer": t_optimizer})
    if config.baseline_decay > 0 and state is None:
        raise ValueError("config.baseline_decay > 0 needs an MPLState to carry the baseline between updates")
    if config.mode == "soft" and (amp_dtype == torch.float16 or s_scaler is not None):
        raise ValueError("soft mode does not support float16 gradient scaling; use bfloat16 autocast or float32")


# ----------------------------------------------------------------------------------------------------------------
# The two updates: metapl.core.hard (REINFORCE feedback) and metapl.core.soft (exact meta-gradient)
