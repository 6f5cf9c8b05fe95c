"""The hard-label MPL update: the teacher's pseudo labels ŷ are classes, and its gradient is estimated by REINFORCE.

Notation as in ``metapl.core.mpl`` (the paper's Sec. 2 and Appendix A). The student takes one step on
L_u = CE(ŷ, S(x_us; θ_S)) (Eq. 1, the look-ahead of Eq. 3); the teacher's gradient of L_l(θ'_S) is estimated as
h · ∇_{θ_T} CE(ŷ, T(x_us; θ_T)), with h = η_S ∇_{θ'_S} L_l(θ'_S) · ∇_{θ_S} CE(ŷ, S(x_us; θ_S)) ("dot", Appendix A),
its cosine form ("cosine"), or to first order h ≈ L_l(θ_S) − L_l(θ'_S) ("taylor").

Called through ``metapl.core.mpl.mpl_update``, which checks the arguments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metapl.core.feedback import feedback_mode
from metapl.core.losses import pseudo_labels, pseudo_metrics, uda_term, upcast
from metapl.core.replicas import mean_over_ranks, unwrap
from metapl.core.steps import autocast_for, clip_and_step
from metapl.core.validate import LABELS_OK, labels_in_range

if TYPE_CHECKING:
    from metapl.core.config import MPLConfig
    from metapl.core.mpl import Batch, MPLState

# (the model as called (DDP or not), the bare model, its optimizer, its gradient scaler)
Parts = tuple[nn.Module, nn.Module, torch.optim.Optimizer, torch.amp.GradScaler | None]
# The teacher's logits before the student's step (labeled, weak, strong), None where that forward made none.
TeacherLogits = tuple[Tensor | None, Tensor | None, Tensor | None]

# The metrics of the teacher's step: all 0 when the teacher is fixed (it takes no step).
_TEACHER_METRICS = (
    "loss/teacher",
    "loss/teacher_l",
    "loss/teacher_uda",
    "loss/teacher_mpl",
    "mpl/h",
    "mpl/baseline",
    "mask_ratio",
)


def hard_update(
    teacher: nn.Module,
    student: nn.Module,
    t_optimizer: torch.optim.Optimizer | None,
    s_optimizer: torch.optim.Optimizer,
    batch: Batch,
    config: MPLConfig,
    state: MPLState | None,
    *,
    uda_weight: float,
    amp_dtype: torch.dtype | None,
    t_scaler: torch.amp.GradScaler | None,
    s_scaler: torch.amp.GradScaler | None,
    generator: torch.Generator | None,
) -> dict[str, Tensor]:
    """One hard-label MPL update: the student's step on ŷ, then the teacher's (see ``mpl_update`` for the arguments).

    Returns:
        ``mpl_update``'s metrics: named, detached float32 scalars.
    """
    t_net, s_net = unwrap(teacher), unwrap(student)
    autocast = autocast_for(batch.x_l, amp_dtype)
    eta = s_optimizer.param_groups[0]["lr"]  # a Python float: reading it does not synchronise
    zero = batch.x_l.new_zeros((), dtype=torch.float32)
    frozen = t_optimizer is None  # a fixed teacher: it labels, nothing more (distillation)

    t_logits: TeacherLogits = (None, None, None)
    if frozen:
        label_source = _frozen_label_source(t_net, batch, config, autocast)
    else:
        t_logits_l, t_logits_uw, t_logits_us, label_source = _label_source(
            teacher, t_net, batch, config, uda_weight, autocast
        )
        t_logits = (t_logits_l, t_logits_uw, t_logits_us)
    y_hat = pseudo_labels(label_source, config.pseudo_label, generator)  # ŷ, (μB,)
    y_l, labels_ok = labels_in_range(batch.y_l, label_source.shape[-1])  # K is known now; the guard refuses a bad y_l
    batch = batch._replace(y_l=y_l)

    # Student's step on the pseudo labels (Eq. 3's look-ahead) and the teacher's feedback coefficient h (Appendix A).
    s_loss, s_loss_l_old, s_loss_l_new, h = zero, zero, zero, zero
    if eta > 0:
        s_parts = (student, s_net, s_optimizer, s_scaler)
        s_loss, s_loss_l_old, s_loss_l_new, h = _student_step(
            s_parts, batch, y_hat, config, autocast, eta, zero, measure=not frozen
        )
    metrics = {"loss/student": s_loss, "mpl/s_loss_l_old": s_loss_l_old, "mpl/s_loss_l_new": s_loss_l_new}
    if frozen:
        metrics.update(dict.fromkeys(_TEACHER_METRICS, zero))
    else:
        assert t_optimizer is not None  # not frozen
        t_parts = (teacher, t_net, t_optimizer, t_scaler)
        metrics.update(_teacher_step(t_parts, batch, t_logits, y_hat, h, config, state, uda_weight, autocast, zero))
    metrics.update(pseudo_metrics(label_source, y_hat, batch.y_u))
    metrics[LABELS_OK] = labels_ok
    return {k: v.detach().float() for k, v in metrics.items()}


def _teacher_step(
    t_parts: Parts,
    batch: Batch,
    t_logits: TeacherLogits,
    y_hat: Tensor,
    h: Tensor,
    config: MPLConfig,
    state: MPLState | None,
    uda_weight: float,
    autocast: torch.autocast,
    zero: Tensor,
) -> dict[str, Tensor]:
    """The teacher's update: labeled CE + UDA + h · CE(ŷ, T(x_us)) (gradient of Eq. 3 by REINFORCE, Appendix A).

    Args:
        t_parts: ``(teacher, t_net, t_optimizer, t_scaler)``: the teacher as called, bare, its optimizer, scaler.
        t_logits: ``(t_logits_l, t_logits_uw, t_logits_us)`` from ``_label_source`` (None where it made none).
        h: the feedback coefficient, before its sign and the baseline.

    Returns:
        The teacher's metrics (losses, h, baseline, UDA mask ratio).
    """
    teacher, t_net, t_optimizer, t_scaler = t_parts
    t_logits_l, t_logits_uw, t_logits_us = t_logits
    h = -h if config.feedback_sign == "reversed" else h
    h_used = h
    if config.baseline_decay > 0:
        assert state is not None  # mpl_update refuses a baseline without an MPLState
        # Official release: m ← m − decay (m − h); the teacher uses h − m (a variance-reducing baseline).
        base = state.baseline if state.baseline is not None else zero
        state.baseline = base + config.baseline_decay * (h - base)
        h_used = h - state.baseline

    t_x_l, _, t_x_us = batch.teacher_inputs()
    if t_logits_l is None or t_logits_us is None:
        t_logits_l, t_logits_us = _teacher_forward(teacher, t_x_l, t_x_us, autocast)
    t_loss_l = F.cross_entropy(t_logits_l, batch.y_l, label_smoothing=config.label_smoothing)
    t_loss_uda, mask_ratio = uda_term(t_logits_uw, t_logits_us, config, uda_weight, zero)
    t_loss_mpl = h_used.detach() * F.cross_entropy(t_logits_us, y_hat)
    t_loss = t_loss_l + uda_weight * t_loss_uda + config.mpl_weight * t_loss_mpl
    t_params = [p for p in t_net.parameters() if p.requires_grad]
    t_optimizer.zero_grad(set_to_none=True)
    _backward(t_loss, t_scaler)
    if t_scaler is not None:
        t_scaler.unscale_(t_optimizer)
    clip_and_step(t_optimizer, t_params, t_scaler, config.grad_clip)
    return {
        "loss/teacher": t_loss,
        "loss/teacher_l": t_loss_l,
        "loss/teacher_uda": t_loss_uda,
        "loss/teacher_mpl": t_loss_mpl,
        "mpl/h": h,
        "mpl/baseline": state.baseline if state is not None and state.baseline is not None else zero,
        "mask_ratio": mask_ratio,
    }


@torch.no_grad()
def _frozen_label_source(t_net: nn.Module, batch: Batch, config: MPLConfig, autocast: torch.autocast) -> Tensor:
    """A fixed teacher's logits on the view it labels, (μB, K): one forward without a graph."""
    _, t_x_uw, t_x_us = batch.teacher_inputs()
    with autocast:
        return upcast(t_net(t_x_uw if config.label_view == "weak" else t_x_us))


def _label_source(
    teacher: nn.Module, t_net: nn.Module, batch: Batch, config: MPLConfig, uda_weight: float, autocast: torch.autocast
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor]:
    """The teacher's forwards before the student's step.

    Returns:
        ``(t_logits_l, t_logits_uw, t_logits_us, label_source)``: the labeled and strong logits with a graph where
        this forward already made them (None otherwise: the teacher's update makes them), the weak logits (a
        target only, or None when nothing needs them) and the logits whose distribution gives ŷ.
    """
    x_l, x_uw, x_us = batch.teacher_inputs()
    t_logits_uw = t_logits_l = t_logits_us = None
    needs_weak = config.label_view == "weak" or uda_weight > 0
    if needs_weak and config.teacher_batch == "joint":
        # One forward over all three views (BatchNorm sees them as one batch); the weak logits are only a target.
        with autocast:
            t_logits = upcast(teacher(torch.cat([x_l, x_uw, x_us])))  # (B + 2μB, K)
        n_l, n_u = x_l.shape[0], x_uw.shape[0]
        t_logits_l, t_logits_uw, t_logits_us = t_logits[:n_l], t_logits[n_l : n_l + n_u].detach(), t_logits[-n_u:]
    elif needs_weak:
        # Teacher on the weak view: only a target, so no graph is kept (saves a third of the naive step's memory).
        with torch.no_grad(), autocast:
            t_logits_uw = upcast(t_net(x_uw))  # (μB, K)
    if config.label_view == "strong" and t_logits_us is None:
        t_logits_l, t_logits_us = _teacher_forward(teacher, x_l, x_us, autocast)
    label_source = t_logits_us.detach() if t_logits_us is not None and config.label_view == "strong" else t_logits_uw
    assert label_source is not None  # the view ŷ is read from was made above
    return t_logits_l, t_logits_uw, t_logits_us, label_source


def _student_step(
    s_parts: Parts,
    batch: Batch,
    y_hat: Tensor,
    config: MPLConfig,
    autocast: torch.autocast,
    eta: float,
    zero: Tensor,
    *,
    measure: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The student's step on ŷ and the feedback h it gives the teacher (Appendix A), before sign and baseline.

    Args:
        s_parts: ``(student, s_net, s_optimizer, s_scaler)``, as ``_teacher_step``'s ``t_parts``.
        measure: measure the feedback h; False (a fixed teacher) skips every labeled forward and returns h = 0.

    Returns:
        ``(s_loss, s_loss_l_old, s_loss_l_new, h)``; L_l(θ_S) is measured by the taylor estimator only (zero else).
    """
    student, s_net, s_optimizer, s_scaler = s_parts
    x_l, y_l = batch.x_l, batch.y_l
    x_u = batch.x_us if config.student_view == "strong" else batch.x_uw  # the view the student learns ŷ on
    s_loss_l_old = zero
    if measure and config.feedback == "taylor":
        s_loss_l_old = _labeled_loss(s_net, x_l, y_l)  # L_l(θ_S)
    with autocast:
        s_logits_u = student(x_u)  # (μB, K)
    s_loss = F.cross_entropy(upcast(s_logits_u), y_hat)
    s_params = [p for p in s_net.parameters() if p.requires_grad]
    s_optimizer.zero_grad(set_to_none=True)
    _backward(s_loss, s_scaler)
    if s_scaler is not None:
        s_scaler.unscale_(s_optimizer)
    g_us = None
    if measure and config.feedback != "taylor":
        # ∇_{θ_S} CE(ŷ, S(x_us; θ_S)), kept before the optimizer step overwrites θ_S.
        g_us = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in s_params]
    clip_and_step(s_optimizer, s_params, s_scaler, config.grad_clip)

    if not measure:
        return s_loss, zero, zero, zero
    s_loss_l_new, h = _feedback(s_net, s_params, x_l, y_l, s_loss_l_old, g_us, eta, config, zero)
    return s_loss, s_loss_l_old, s_loss_l_new, h


def _feedback(
    s_net: nn.Module,
    s_params: list[nn.Parameter],
    x_l: Tensor,
    y_l: Tensor,
    s_loss_l_old: Tensor,
    g_us: list[Tensor] | None,
    eta: float,
    config: MPLConfig,
    zero: Tensor,
) -> tuple[Tensor, Tensor]:
    """The feedback h of the student's step (Appendix A), before sign and baseline; the same on every rank.

    Args:
        s_loss_l_old: L_l(θ_S) (the taylor estimator's; zero else).
        g_us: ∇_{θ_S} CE(ŷ, S(x_us; θ_S)), taken before the step (the dot and cosine estimators'; None else).

    Returns:
        ``(s_loss_l_new, h)``: L_l(θ'_S), detached, and h averaged over ranks.
    """
    if config.feedback == "taylor":
        s_loss_l_new = _labeled_loss(s_net, x_l, y_l)  # L_l(θ'_S)
        h = s_loss_l_old - s_loss_l_new
    else:
        with torch.enable_grad(), feedback_mode(s_net):
            s_loss_l_new = F.cross_entropy(upcast(s_net(x_l)), y_l)
            g_l = torch.autograd.grad(s_loss_l_new, s_params, allow_unused=True)  # ∇_{θ'_S} L_l(θ'_S)
        assert g_us is not None  # taken by the dot and cosine estimators
        pairs = [(gl, gu) for gl, gu in zip(g_l, g_us) if gl is not None]
        dot = torch.stack([(gl * gu).sum() for gl, gu in pairs]).sum()
        if config.feedback == "dot":
            h = eta * dot
        else:  # cosine: the same direction test, free of both gradients' scale (and of η_S)
            norm_l = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(gl) for gl, _ in pairs]))
            norm_us = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(gu) for _, gu in pairs]))
            h = dot / (norm_l * norm_us).clamp_min(torch.finfo(dot.dtype).tiny)
        s_loss_l_new = s_loss_l_new.detach()
    # A float16 step that the scaler skipped leaves inf/nan here; it carries no information about ŷ.
    h = torch.where(torch.isfinite(h), h, zero)
    return s_loss_l_new, mean_over_ranks([h])[0]  # every rank applies the same h


def _teacher_forward(teacher: nn.Module, x_l: Tensor, x_us: Tensor, autocast: torch.autocast) -> tuple[Tensor, Tensor]:
    """One forward with a graph over labeled + strong images; BatchNorm sees them as one batch, as in UDA."""
    with autocast:
        logits = upcast(teacher(torch.cat([x_l, x_us])))  # (B + μB, K)
    return logits[: x_l.shape[0]], logits[x_l.shape[0] :]


@torch.no_grad()
def _labeled_loss(s_net: nn.Module, x_l: Tensor, y_l: Tensor) -> Tensor:
    """L_l(θ) in float32 (or float64) feedback mode (see ``feedback_mode``)."""
    with feedback_mode(s_net):
        return F.cross_entropy(upcast(s_net(x_l)), y_l)


def _backward(loss: Tensor, scaler: torch.amp.GradScaler | None) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()
