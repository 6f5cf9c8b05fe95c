"""One Meta Pseudo Labels update of any teacher and student ``nn.Module`` (Pham et al., CVPR 2021).

Notation follows the paper (Sec. 2 and Appendix A) and ``docs/algorithm.md``:

* teacher T with parameters θ_T, student S with θ_S; labeled (x_l, y_l); unlabeled weak view x_uw, strong x_us;
* ŷ: the teacher's pseudo labels; L_u(θ_T, θ_S) = CE(ŷ, S(x_us; θ_S)), the student's loss               (Eq. 1)
* the teacher's objective: the student's labeled loss L_l = CE(y_l, S(x_l; ·)) after learning from ŷ      (Eq. 2)
* with one look-ahead step θ'_S = θ_S − η_S ∇_{θ_S} L_u(θ_T, θ_S) in place of the argmin, L_l(θ'_S)      (Eq. 3).

The hard variant estimates the teacher's gradient with REINFORCE, h · ∇_{θ_T} CE(ŷ, T(x_us; θ_T)), where
h = η_S ∇_{θ'_S} L_l(θ'_S) · ∇_{θ_S} CE(ŷ, S(x_us; θ_S))  (Appendix A, "dot"), or to first order
h ≈ L_l(θ_S) − L_l(θ'_S) ("taylor"). The soft variant differentiates L_l(θ'_S(θ_T)) exactly through the student's
one SGD step (second order, ``torch.func.functional_call``).

This module knows nothing of files, data or the command line. It never calls ``.item()`` or ``.cuda()``: the device
comes from the tensors, and the caller decides when to synchronise.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from metapl.core.losses import pseudo_labels, soft_cross_entropy, uda_consistency, upcast
from metapl.core.options import check_options, option


class Batch(NamedTuple):
    """One MPL batch. Shapes: x_l (B, C, H, W), y_l (B,), x_uw and x_us (μB, C, H, W), y_u (μB,) or None.

    ``y_u`` holds the true labels of the unlabeled images where known (-1 elsewhere); it is used only to report the
    pseudo labels' accuracy, never to train.
    """

    x_l: Tensor
    y_l: Tensor
    x_uw: Tensor
    x_us: Tensor
    y_u: Tensor | None = None


@dataclass(frozen=True)
class MPLConfig:
    """Hyper-parameters of one MPL update. Each disputed choice of the public releases is a named option.

    Each field is declared once, with its help text and allowed range (``metapl.core.options``); ``__post_init__``
    checks every value against its declaration and raises ValueError. The trainer's ``TrainConfig`` inherits these
    fields, so each is also a ``metapl train`` flag (``--soft-temperature``) and a YAML key (``soft_temperature``), with
    the help below as its ``--help`` line. Why the defaults: ``docs/algorithm.md``.
    """

    mode: Literal["hard", "soft"] = option(
        "hard", "hard pseudo labels with REINFORCE feedback, or soft labels with the exact meta-gradient (second order)"
    )
    feedback: Literal["taylor", "dot", "cosine"] = option(
        "taylor",
        "hard mode's estimator of the feedback h: taylor (L_l before minus after the student's step; one extra "
        "no-grad labeled forward), dot (the student's lr times the dot product of the two gradients; one extra labeled "
        "backward) or cosine (the cosine similarity of the same gradients, bounded in [-1, 1]; Appendix A allows it in "
        "place of the raw product, whose scale (~1e-3) makes the MPL term negligible)",
    )
    feedback_sign: Literal["derived", "reversed"] = option(
        "derived",
        "derived: h > 0 when the student's step lowered its labeled loss (the teacher then makes its pseudo labels "
        "more likely); reversed: the sign of the official release and the most-used PyTorch port",
    )
    pseudo_label: Literal["argmax", "sample"] = option(
        "argmax", "hard pseudo labels by argmax of the teacher's distribution, or sampled from it"
    )
    label_view: Literal["weak", "strong"] = option(
        "weak",
        "the unlabeled view the teacher labels: weak (clean labels, as UDA) or strong (the paper's derivation, the "
        "same view for both models)",
    )
    teacher_batch: Literal["split", "joint"] = option(
        "split",
        "split: the weak view goes through the teacher in its own no-grad forward (less memory); joint: one teacher "
        "forward over labeled, weak and strong images, so BatchNorm normalises them as one batch (as UDA's and "
        "FixMatch's releases do)",
    )
    soft_temperature: float = option(1.0, "temperature of the teacher's distribution in soft mode", gt=0)
    mpl_weight: float = option(
        1.0, "weight of the teacher's MPL term; 0 turns it off (a UDA teacher distilled into the student)", ge=0
    )
    baseline_decay: float = option(
        0.0, "rate of the moving-average baseline subtracted from h (official release: 0.01); 0 = off", ge=0, le=1
    )
    label_smoothing: float = option(
        0.0,
        "label smoothing of the teacher's labeled cross-entropy (the trainer also applies it to the student's labeled "
        "steps: --method supervised and finetuning)",
        ge=0,
        lt=1,
    )
    uda_temperature: float = option(0.7, "sharpening temperature of UDA's target distribution", gt=0)
    uda_threshold: float = option(
        0.6, "UDA's confidence threshold: unlabeled images below it add no consistency loss", ge=0, le=1
    )
    grad_clip: float = option(0.0, "max global gradient norm for both models; 0 = no clipping", ge=0)

    def __post_init__(self) -> None:
        check_options(self)


@dataclass
class MPLState:
    """What an MPL run carries from one update to the next: the moving-average baseline of h (a 0-d tensor)."""

    baseline: Tensor | None = field(default=None)

    def state_dict(self) -> dict:
        """For checkpoints."""
        return {"baseline": self.baseline}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``."""
        self.baseline = state["baseline"]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or torch.compile) wrapper; the model itself otherwise."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def feedback_mode(model: nn.Module):
    """Measure L_l(θ) comparably before and after the student's step (the "BatchNorm trap").

    Inside, BatchNorm layers normalise with the statistics of the batch they see (as in training) but leave their
    running statistics untouched, and every other module is in eval mode, so dropout and other stochastic layers
    are off. Two measurements on the same x_l then differ only through θ: with η_S = 0, h is exactly 0. The official
    release instead compares a 1,024-image mixed batch with 128 labeled images, which biases h even at η_S = 0.
    """
    saved = [(m, m.training, getattr(m, "track_running_stats", None)) for m in model.modules()]
    try:
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.train(True)
                m.track_running_stats = False
            else:
                m.training = False
        yield model
    finally:
        for m, training, track in saved:
            m.training = training
            if track is not None:
                m.track_running_stats = track


def mpl_update(
    teacher: nn.Module,
    student: nn.Module,
    t_optimizer: torch.optim.Optimizer,
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
) -> dict[str, Tensor]:
    """Perform one Meta Pseudo Labels update: the student's step, then the teacher's.

    Both models must be in train mode. The student's step size η_S is read from ``s_optimizer``'s first parameter
    group; when it is 0 (the recipe's "student waits" phase) the student's forward, backward and step are skipped
    and h = 0. Under ``torch.distributed`` (models wrapped in DDP), h is averaged over ranks, so every rank applies
    the same feedback.

    Args:
        teacher: the teacher T (any module mapping (N, C, H, W) to (N, K) logits; may be DDP-wrapped).
        student: the student S (may differ from the teacher in architecture; DDP-wrapped in hard mode only).
        t_optimizer: the teacher's optimizer; stepped once.
        s_optimizer: the student's optimizer; stepped once (unless its learning rate is 0).
        batch: the labeled and unlabeled images, see ``Batch``.
        config: see ``MPLConfig``.
        state: carries the moving-average baseline of h; required when ``config.baseline_decay > 0``.
        uda_weight: weight of the teacher's UDA loss at this step (the caller ramps it up); 0 = no UDA.
        amp_dtype: autocast dtype (``torch.bfloat16`` or ``torch.float16``) for the models' forwards, or None.
            The feedback measurements of L_l always run in float32 or wider: h is a small difference of two losses.
        t_scaler: gradient scaler for the teacher (float16 only).
        s_scaler: gradient scaler for the student (float16 only).
        generator: random generator for ``pseudo_label="sample"``.

    Raises:
        ValueError: an empty image field of ``batch`` (named), two unlabeled views of different sizes, or options
            that do not go together.

    Returns:
        Named, detached scalar tensors: ``loss/teacher``, ``loss/teacher_l``, ``loss/teacher_uda``,
        ``loss/teacher_mpl``, ``loss/student``, ``mpl/h`` (signed, before the baseline), ``mpl/baseline``,
        ``mpl/s_loss_l_old``, ``mpl/s_loss_l_new``, ``mask_ratio``, ``pseudo/confidence`` and, when ``batch.y_u`` is
        given, ``pseudo/acc`` (fraction of correct pseudo labels among images whose label is known).
    """
    _check_batch(batch)
    if config.baseline_decay > 0 and state is None:
        raise ValueError("config.baseline_decay > 0 needs an MPLState to carry the baseline between updates")
    if config.mode == "soft" and isinstance(student, nn.parallel.DistributedDataParallel):
        raise ValueError(
            "soft (exact meta-gradient) mode does not run under DDP: it differentiates through a functional copy "
            "of the student that DDP cannot synchronise; use --mode hard for multi-process training"
        )
    if config.mode == "soft" and (amp_dtype == torch.float16 or s_scaler is not None):
        raise ValueError("soft mode does not support float16 gradient scaling; use bfloat16 autocast or float32")
    step = _hard_update if config.mode == "hard" else _soft_update
    return step(
        teacher, student, t_optimizer, s_optimizer, batch, config, state,
        uda_weight=uda_weight, amp_dtype=amp_dtype, t_scaler=t_scaler, s_scaler=s_scaler, generator=generator,
    )  # fmt: skip


def _check_batch(batch: Batch) -> None:
    """Refuse a batch the update cannot learn from, naming the field (shapes only: no device sync)."""
    for name in ("x_l", "x_uw", "x_us"):
        if getattr(batch, name).shape[0] == 0:
            # The losses would average over no images: NaN, which would then poison both models silently.
            raise ValueError(f"batch.{name} is empty (0 images); every MPL update needs labeled and unlabeled images")
    if batch.x_uw.shape[0] != batch.x_us.shape[0]:
        raise ValueError(
            f"batch.x_uw has {batch.x_uw.shape[0]} images but batch.x_us has {batch.x_us.shape[0]}; they must be two "
            "views of the same unlabeled images"
        )


# ----------------------------------------------------------------------------------------------------------------
# Hard pseudo labels, REINFORCE feedback


def _hard_update(teacher, student, t_optimizer, s_optimizer, batch, config, state, *, uda_weight, amp_dtype,
                 t_scaler, s_scaler, generator) -> dict[str, Tensor]:  # fmt: skip
    x_l, y_l, x_uw, x_us, y_u = batch
    t_net, s_net = unwrap(teacher), unwrap(student)
    autocast = _autocast(x_l, amp_dtype)
    eta = s_optimizer.param_groups[0]["lr"]  # a Python float: reading it does not synchronise
    zero = x_l.new_zeros((), dtype=torch.float32)

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
    label_source = t_logits_us.detach() if config.label_view == "strong" else t_logits_uw
    y_hat = pseudo_labels(label_source, config.pseudo_label, generator)  # ŷ, (μB,)

    # Student's step on the pseudo labels (Eq. 3's look-ahead) and the teacher's feedback coefficient h (Appendix A).
    s_loss, s_loss_l_old, s_loss_l_new, h = zero, zero, zero, zero
    if eta > 0:
        if config.feedback == "taylor":
            s_loss_l_old = _labeled_loss(s_net, x_l, y_l)  # L_l(θ_S)
        with autocast:
            s_logits_us = student(x_us)  # (μB, K)
        s_loss = F.cross_entropy(upcast(s_logits_us), y_hat)
        s_params = [p for p in s_net.parameters() if p.requires_grad]
        s_optimizer.zero_grad(set_to_none=True)
        _backward(s_loss, s_scaler)
        if s_scaler is not None:
            s_scaler.unscale_(s_optimizer)
        g_us = None
        if config.feedback != "taylor":
            # ∇_{θ_S} CE(ŷ, S(x_us; θ_S)), kept before the optimizer step overwrites θ_S.
            g_us = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in s_params]
        _clip_and_step(s_optimizer, s_params, s_scaler, config.grad_clip)

        if config.feedback == "taylor":
            s_loss_l_new = _labeled_loss(s_net, x_l, y_l)  # L_l(θ'_S)
            h = s_loss_l_old - s_loss_l_new
        else:
            with torch.enable_grad(), feedback_mode(s_net):
                s_loss_l_new = F.cross_entropy(upcast(s_net(x_l)), y_l)
                g_l = torch.autograd.grad(s_loss_l_new, s_params, allow_unused=True)  # ∇_{θ'_S} L_l(θ'_S)
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
        h = _mean_over_ranks(h)

    h = -h if config.feedback_sign == "reversed" else h
    h_used = h
    if config.baseline_decay > 0:
        # Official release: m ← m − decay (m − h); the teacher uses h − m (a variance-reducing baseline).
        base = state.baseline if state.baseline is not None else zero
        state.baseline = base + config.baseline_decay * (h - base)
        h_used = h - state.baseline

    # Teacher's update: labeled CE + UDA + h · CE(ŷ, T(x_us)) (gradient of Eq. 3 by REINFORCE, Appendix A).
    if t_logits_l is None:
        t_logits_l, t_logits_us = _teacher_forward(teacher, x_l, x_us, autocast)
    t_loss_l = F.cross_entropy(t_logits_l, y_l, label_smoothing=config.label_smoothing)
    t_loss_uda, mask_ratio = _uda(t_logits_uw, t_logits_us, config, uda_weight, zero)
    t_loss_mpl = h_used.detach() * F.cross_entropy(t_logits_us, y_hat)
    t_loss = t_loss_l + uda_weight * t_loss_uda + config.mpl_weight * t_loss_mpl
    t_params = [p for p in t_net.parameters() if p.requires_grad]
    t_optimizer.zero_grad(set_to_none=True)
    _backward(t_loss, t_scaler)
    if t_scaler is not None:
        t_scaler.unscale_(t_optimizer)
    _clip_and_step(t_optimizer, t_params, t_scaler, config.grad_clip)

    metrics = {
        "loss/teacher": t_loss, "loss/teacher_l": t_loss_l, "loss/teacher_uda": t_loss_uda,
        "loss/teacher_mpl": t_loss_mpl, "loss/student": s_loss, "mpl/h": h,
        "mpl/baseline": state.baseline if state is not None and state.baseline is not None else zero,
        "mpl/s_loss_l_old": s_loss_l_old, "mpl/s_loss_l_new": s_loss_l_new, "mask_ratio": mask_ratio,
    }  # fmt: skip
    metrics.update(_pseudo_metrics(label_source, y_hat, y_u))
    return {k: v.detach().float() for k, v in metrics.items()}


# ----------------------------------------------------------------------------------------------------------------
# Soft pseudo labels, exact meta-gradient


def _soft_update(teacher, student, t_optimizer, s_optimizer, batch, config, state, *, uda_weight, amp_dtype,
                 t_scaler, s_scaler, generator) -> dict[str, Tensor]:  # fmt: skip
    del s_scaler, generator, state  # float16 is refused above; soft labels draw nothing; no baseline in soft mode
    x_l, y_l, x_uw, x_us, y_u = batch
    t_net, s_net = unwrap(teacher), unwrap(student)
    autocast = _autocast(x_l, amp_dtype)
    eta = s_optimizer.param_groups[0]["lr"]
    zero = x_l.new_zeros((), dtype=torch.float32)
    n_l, n_u = x_l.shape[0], x_us.shape[0]

    # The teacher's distribution must stay differentiable, so the labeled view, the labeled images and (for UDA)
    # the strong view go through the teacher in one forward with a graph.
    views = [x_l, x_uw if config.label_view == "weak" else x_us]
    if uda_weight > 0 and config.label_view == "weak":
        views.append(x_us)
    with autocast:
        t_logits = upcast(teacher(torch.cat(views)))
    t_logits_l = t_logits[:n_l]
    t_logits_src = t_logits[n_l : n_l + n_u]
    t_logits_us = t_logits[-n_u:]
    t_logits_uw = t_logits_src if config.label_view == "weak" else None
    if uda_weight > 0 and t_logits_uw is None:
        with torch.no_grad(), autocast:
            t_logits_uw = upcast(t_net(x_uw))
    q = F.softmax(t_logits_src / config.soft_temperature, dim=-1)  # soft pseudo labels q(θ_T), (μB, K)

    t_loss_l = F.cross_entropy(t_logits_l, y_l, label_smoothing=config.label_smoothing)
    t_loss_uda, mask_ratio = _uda(t_logits_uw, t_logits_us, config, uda_weight, zero)
    t_loss = t_loss_l + uda_weight * t_loss_uda
    s_loss, s_loss_l_new, meta = zero, zero, zero
    s_params = {n: p for n, p in s_net.named_parameters() if p.requires_grad}
    grads = None
    if eta > 0:
        # Student's step as a function of θ_T (Eq. 3's look-ahead): θ'_S = θ_S − η_S ∇_{θ_S} CE(q(θ_T), S(x_us; θ_S)).
        # Buffers are the module's own: this forward is the student's real training forward, so BatchNorm's
        # running statistics advance once, as in hard mode.
        with autocast:
            s_logits_us = functional_call(s_net, s_params, (x_us,), strict=False)
        s_loss = soft_cross_entropy(upcast(s_logits_us), q)
        grads = torch.autograd.grad(s_loss, list(s_params.values()), create_graph=True)
        s_params_new = {n: p - eta * g for (n, p), g in zip(s_params.items(), grads)}
        # L_l(θ'_S(θ_T)) in float32 feedback mode; its gradient wrt θ_T is the exact meta-gradient (Eq. 3).
        with feedback_mode(s_net):
            s_loss_l_new = F.cross_entropy(upcast(functional_call(s_net, s_params_new, (x_l,), strict=False)), y_l)
        meta = -s_loss_l_new if config.feedback_sign == "reversed" else s_loss_l_new
        t_loss = t_loss + config.mpl_weight * meta

    t_params = [p for p in t_net.parameters() if p.requires_grad]
    t_optimizer.zero_grad(set_to_none=True)
    (t_scaler.scale(t_loss) if t_scaler is not None else t_loss).backward(inputs=t_params)
    if t_scaler is not None:
        t_scaler.unscale_(t_optimizer)
    _clip_and_step(t_optimizer, t_params, t_scaler, config.grad_clip)

    if grads is not None:
        # The student's real step uses the first-order gradient already computed for the look-ahead.
        s_optimizer.zero_grad(set_to_none=True)
        for p, g in zip(s_params.values(), grads):
            p.grad = g.detach()
        _clip_and_step(s_optimizer, list(s_params.values()), None, config.grad_clip)

    metrics = {
        "loss/teacher": t_loss, "loss/teacher_l": t_loss_l, "loss/teacher_uda": t_loss_uda,
        "loss/teacher_mpl": meta, "loss/student": s_loss, "mpl/h": zero, "mpl/baseline": zero,
        "mpl/s_loss_l_old": zero, "mpl/s_loss_l_new": s_loss_l_new, "mask_ratio": mask_ratio,
    }  # fmt: skip
    metrics.update(_pseudo_metrics(t_logits_src.detach(), t_logits_src.detach().argmax(-1), y_u))
    return {k: v.detach().float() for k, v in metrics.items()}


# ----------------------------------------------------------------------------------------------------------------
# Pieces


def _autocast(x: Tensor, amp_dtype: torch.dtype | None):
    return torch.autocast(device_type=x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def _teacher_forward(teacher: nn.Module, x_l: Tensor, x_us: Tensor, autocast) -> tuple[Tensor, Tensor]:
    """One forward with a graph over labeled + strong images; BatchNorm sees them as one batch, as in UDA."""
    with autocast:
        logits = upcast(teacher(torch.cat([x_l, x_us])))  # (B + μB, K)
    return logits[: x_l.shape[0]], logits[x_l.shape[0] :]


@torch.no_grad()
def _labeled_loss(s_net: nn.Module, x_l: Tensor, y_l: Tensor) -> Tensor:
    """L_l(θ) in float32 (or float64) feedback mode (see ``feedback_mode``)."""
    with feedback_mode(s_net):
        return F.cross_entropy(upcast(s_net(x_l)), y_l)


def _uda(t_logits_uw, t_logits_us, config: MPLConfig, uda_weight: float, zero: Tensor) -> tuple[Tensor, Tensor]:
    if uda_weight <= 0 or t_logits_uw is None:
        return zero, zero
    return uda_consistency(t_logits_uw, t_logits_us, temperature=config.uda_temperature, threshold=config.uda_threshold)


def _backward(loss: Tensor, scaler: torch.amp.GradScaler | None) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def _clip_and_step(optimizer, params, scaler, grad_clip: float) -> None:
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def _mean_over_ranks(x: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x


def _pseudo_metrics(t_logits: Tensor, y_hat: Tensor, y_u: Tensor | None) -> dict[str, Tensor]:
    probs = F.softmax(t_logits.float(), dim=-1)
    out = {"pseudo/confidence": probs.amax(dim=-1).mean()}
    if y_u is not None:
        known = (y_u >= 0).float()
        correct = (y_hat == y_u).float() * known
        # NaN when no label is known in this batch: "unknown", not "0 % correct".
        out["pseudo/acc"] = correct.sum() / known.sum()
    return out
