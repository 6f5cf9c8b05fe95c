"""The soft-label MPL update: the teacher's pseudo labels are its distribution q(θ_T), and its gradient is exact.

Notation as in ``metapl.core.mpl`` (the paper's Sec. 2). The student's look-ahead step
θ'_S = θ_S − η_S ∇_{θ_S} CE(q(θ_T), S(x_us; θ_S)) (Eq. 3) is written as a function of θ_T with
``torch.func.functional_call``, and L_l(θ'_S(θ_T)) is differentiated through it exactly. The second-order term
needs no double backward: the student's gradient is linear in q, so one forward-mode JVP of the student along
v = ∇_{θ'_S} L_l gives the meta-gradient's q-side vector (``_look_ahead``).

Under DDP the student is replicated but its DDP forward is never called (the look-ahead is functional), so its
gradient and the meta-gradient's student-side vector are averaged over the ranks here, by hand (``_look_ahead``).

Called through ``metapl.core.mpl.mpl_update``, which checks the arguments (no float16 scaling).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from metapl.core.feedback import feedback_mode, replayed_rng, rng_state
from metapl.core.losses import pseudo_metrics, soft_cross_entropy, uda_term, upcast
from metapl.core.replicas import mean_over_ranks, replica_group, unwrap
from metapl.core.steps import autocast_for, clip_and_step
from metapl.core.validate import LABELS_OK, labels_in_range

if TYPE_CHECKING:
    import torch.distributed as dist
    from torch import nn

    from metapl.core.config import MPLConfig
    from metapl.core.mpl import Batch, MPLState

# The metrics a fixed teacher leaves at 0 (it takes no step, there is no look-ahead); ``loss/student`` follows them.
_FIXED_TEACHER_ZEROS = (
    "loss/teacher",
    "loss/teacher_l",
    "loss/teacher_uda",
    "loss/teacher_mpl",
    "mpl/h",
    "mpl/baseline",
    "mpl/s_loss_l_old",
    "mpl/s_loss_l_new",
    "mask_ratio",
)


def soft_update(
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
    """One soft-label MPL update: the teacher's step on the exact meta-gradient, then the student's step on q(θ_T).

    Arguments as ``mpl_update``'s; ``state``, ``s_scaler`` and ``generator`` are unused here.

    Returns:
        ``mpl_update``'s metrics: named, detached float32 scalars (``mpl/h`` and ``mpl/baseline`` are 0).
    """
    del s_scaler, generator, state  # float16 is refused above; soft labels draw nothing; no baseline in soft mode
    t_net, s_net = unwrap(teacher), unwrap(student)
    autocast = autocast_for(batch.x_l, amp_dtype)
    eta = s_optimizer.param_groups[0]["lr"]
    zero = batch.x_l.new_zeros((), dtype=torch.float32)
    if t_optimizer is None:
        return _fixed_teacher_update(t_net, student, s_net, s_optimizer, batch, config, eta, autocast, zero)

    t_logits_l, t_logits_src, t_logits_uw, t_logits_us = _teacher_logits(
        teacher, t_net, batch, config, uda_weight, autocast
    )
    q = F.softmax(t_logits_src / config.soft_temperature, dim=-1)  # soft pseudo labels q(θ_T), (μB, K)
    y_l, labels_ok = labels_in_range(batch.y_l, t_logits_l.shape[-1])  # K is known now; the guard refuses a bad y_l
    batch = batch._replace(y_l=y_l)

    t_loss_l = F.cross_entropy(t_logits_l, batch.y_l, label_smoothing=config.label_smoothing)
    t_loss_uda, mask_ratio = uda_term(t_logits_uw, t_logits_us, config, uda_weight, zero)
    t_loss = t_loss_l + uda_weight * t_loss_uda
    t_parts, s_parts = (t_net, t_optimizer, t_scaler), (student, s_net, s_optimizer)
    t_loss, s_loss, s_loss_l_new, meta = _look_ahead_and_steps(
        t_parts, s_parts, batch, q, t_loss, eta, config, autocast, zero
    )
    metrics = {"loss/teacher": t_loss, "loss/teacher_l": t_loss_l, "loss/teacher_uda": t_loss_uda}
    metrics.update({"loss/teacher_mpl": meta, "loss/student": s_loss, "mpl/h": zero, "mpl/baseline": zero})
    metrics.update({"mpl/s_loss_l_old": zero, "mpl/s_loss_l_new": s_loss_l_new, "mask_ratio": mask_ratio})
    metrics.update(pseudo_metrics(t_logits_src.detach(), t_logits_src.detach().argmax(-1), batch.y_u))
    metrics[LABELS_OK] = labels_ok
    return {k: v.detach().float() for k, v in metrics.items()}


def _look_ahead_and_steps(
    t_parts: tuple[nn.Module, torch.optim.Optimizer, torch.amp.GradScaler | None],
    s_parts: tuple[nn.Module, nn.Module, torch.optim.Optimizer],
    batch: Batch,
    q: Tensor,
    t_loss: Tensor,
    eta: float,
    config: MPLConfig,
    autocast: torch.autocast,
    zero: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The student's look-ahead on q (``_look_ahead``), the teacher's step, then the student's real step.

    Args:
        t_parts: ``(t_net, t_optimizer, t_scaler)``: the bare teacher, its optimizer and scaler.
        s_parts: ``(student, s_net, s_optimizer)``: the student as called (DDP or not), bare, and its optimizer.
        t_loss: the teacher's labeled + UDA loss; the meta term is added to it when η_S > 0.

    Returns:
        ``(t_loss, s_loss, s_loss_l_new, meta)``: the teacher's whole loss; the student's losses and the meta term
        (signed by ``config.feedback_sign``), zeros when η_S = 0 (the student waits).
    """
    (t_net, t_optimizer, t_scaler), (student, s_net, s_optimizer) = t_parts, s_parts
    s_loss, s_loss_l_new, meta = zero, zero, zero
    s_params = {n: p for n, p in s_net.named_parameters() if p.requires_grad}
    grads = None
    if eta > 0:
        x_u = batch.x_us if config.student_view == "strong" else batch.x_uw  # the view the student learns q on
        s_loss, s_loss_l_new, meta, grads = _look_ahead(
            s_net, s_params, (batch.x_l, batch.y_l, x_u), q, eta, autocast, replica_group(student)
        )
        meta = -meta if config.feedback_sign == "reversed" else meta
        t_loss = t_loss + config.mpl_weight * meta

    _teacher_step(t_net, t_optimizer, t_scaler, t_loss, config.grad_clip)
    if grads is not None:
        # The student's real step uses the (rank-averaged) first-order gradient already computed for the look-ahead.
        _student_step(s_optimizer, s_params, grads, config.grad_clip)
    return t_loss, s_loss, s_loss_l_new, meta


def _teacher_step(
    t_net: nn.Module,
    t_optimizer: torch.optim.Optimizer,
    t_scaler: torch.amp.GradScaler | None,
    t_loss: Tensor,
    grad_clip: float,
) -> None:
    """The teacher's step on labeled CE + UDA + the meta term: gradients into the teacher's parameters only."""
    t_params = [p for p in t_net.parameters() if p.requires_grad]
    t_optimizer.zero_grad(set_to_none=True)
    (t_scaler.scale(t_loss) if t_scaler is not None else t_loss).backward(inputs=t_params)
    if t_scaler is not None:
        t_scaler.unscale_(t_optimizer)
    clip_and_step(t_optimizer, t_params, t_scaler, grad_clip)


def _fixed_teacher_update(
    t_net: nn.Module,
    student: nn.Module,
    s_net: nn.Module,
    s_optimizer: torch.optim.Optimizer,
    batch: Batch,
    config: MPLConfig,
    eta: float,
    autocast: torch.autocast,
    zero: Tensor,
) -> dict[str, Tensor]:
    """``soft_update`` with a fixed teacher (``t_optimizer`` None): the student's step on q, detached; no look-ahead.

    Returns:
        ``mpl_update``'s metrics; the teacher's losses and the meta term are 0.
    """
    _, t_x_uw, t_x_us = batch.teacher_inputs()
    with torch.no_grad(), autocast:
        t_logits_src = upcast(t_net(t_x_uw if config.label_view == "weak" else t_x_us))  # (μB, K)
    q = F.softmax(t_logits_src / config.soft_temperature, dim=-1)
    s_loss = zero
    if eta > 0:
        s_params = {n: p for n, p in s_net.named_parameters() if p.requires_grad}
        x_u = batch.x_us if config.student_view == "strong" else batch.x_uw
        s_loss, grads = _student_gradient(s_net, s_params, x_u, q, autocast, replica_group(student))
        _student_step(s_optimizer, s_params, grads, config.grad_clip)
    metrics = dict.fromkeys(_FIXED_TEACHER_ZEROS, zero)
    metrics["loss/student"] = s_loss
    metrics.update(pseudo_metrics(t_logits_src, t_logits_src.argmax(-1), batch.y_u))
    return {k: v.detach().float() for k, v in metrics.items()}


def _student_step(
    s_optimizer: torch.optim.Optimizer, s_params: Mapping[str, Tensor], grads: Sequence[Tensor], grad_clip: float
) -> None:
    """The student's real step on its (rank-averaged) first-order gradient ``grads``."""
    s_optimizer.zero_grad(set_to_none=True)
    for p, g in zip(s_params.values(), grads):
        p.grad = g
    clip_and_step(s_optimizer, list(s_params.values()), None, grad_clip)


def _student_gradient(
    s_net: nn.Module,
    s_params: Mapping[str, Tensor],
    x_u: Tensor,
    q: Tensor,
    autocast: torch.autocast,
    group: dist.ProcessGroup | None,
) -> tuple[Tensor, list[Tensor]]:
    """The student's training forward on ``x_u`` and its gradient of CE(q, S(x_u)), averaged over ``group``'s ranks.

    Returns:
        ``(s_loss, grads)``: this rank's loss; ḡ, detached, one tensor per parameter of ``s_params``.
    """
    with autocast:
        s_logits_u = s_net(x_u)  # (μB, K); the student's training forward: running statistics advance here
    s_loss = soft_cross_entropy(upcast(s_logits_u), q.detach())
    grads = list(torch.autograd.grad(s_loss, list(s_params.values())))  # g_r, first order
    if group is not None:
        grads = mean_over_ranks(grads, group)
    return s_loss, grads


def _teacher_logits(
    teacher: nn.Module, t_net: nn.Module, batch: Batch, config: MPLConfig, uda_weight: float, autocast: torch.autocast
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """The teacher's logits, differentiable where the update needs them.

    Returns:
        ``(t_logits_l, t_logits_src, t_logits_uw, t_logits_us)``: labeled; the view that q is made from; weak
        (a target only, None when UDA is off and the strong view is labeled); the last μB logits, strong wherever
        UDA or ``label_view="strong"`` reads them.
    """
    x_l, x_uw, x_us = batch.teacher_inputs()
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
    return t_logits_l, t_logits_src, t_logits_uw, t_logits_us


def _look_ahead(
    s_net: nn.Module,
    s_params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor, Tensor],
    q: Tensor,
    eta: float,
    autocast: torch.autocast,
    group: dist.ProcessGroup | None,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """The student's look-ahead θ'_S(θ_T) = θ_S − η_S g (Eq. 3) and L_l(θ'_S), exact across the ranks of ``group``.

    One process on the N ranks' concatenated batch has g = (1/N) Σ_r g_r, g_r = ∇_{θ_S} CE(q_r, S(x_us^r; θ_S)),
    where q_r (rank r's soft labels) is the only place θ_T enters, and L_l = (1/N) Σ_r L_l^r. Hence

        ∇_{θ_T} L_l(θ'_S) = −η_S (1/N) Σ_r (∂g_r/∂θ_T)ᵀ v,    v = (1/N) Σ_r ∇_{θ'_S} L_l^r(θ'_S).

    g_r is linear in q_r: with n = μB images on this rank and J = ∂ log softmax(S(x_us^r; θ_S)) / ∂θ_S · v, (n, K),
    g_r · v = −(1/n) Σ_ik q_ik J_ik, so rank r's share −η_S (∂g_r/∂θ_T)ᵀ v = (∂q_r/∂θ_T)ᵀ (η_S J / n): one
    forward-mode JVP of the student along v replaces the double backward through g_r. Rank r all-reduces ḡ (everyone's
    step) and v (everyone's labeled gradient); the teacher's DDP average over ranks sums the shares. In one process
    (``group`` None) ḡ = g, v = ∇ L_l: the plain chain rule.

    Args:
        s_net: the unwrapped student; its buffers serve the student's forward on x_us (BatchNorm's running
            statistics advance once, as in hard mode; its batch statistics are this rank's, as in DDP training).
        s_params: the student's trainable parameters by name.
        batch: this rank's ``(x_l, y_l, x_us)``: labeled images, their labels, and the unlabeled view the student
            learns on (the strong view, or the weak one with ``student_view="weak"``), (μB, ...).
        q: this rank's soft pseudo labels q(θ_T), (μB, K), with their graph to θ_T.
        eta: the student's step size η_S.
        autocast: the autocast context of the student's forward (the JVP forward runs in it too).
        group: the process group the student is replicated over (``replica_group``), or None.

    Returns:
        ``(s_loss, s_loss_l_new, meta, grads)``: this rank's CE(q, S(x_us)); its L_l(θ'_S), detached; ``meta``, equal
        to ``s_loss_l_new`` in value, whose θ_T-gradient is this rank's share of the meta-gradient; ḡ, detached, for
        the student's real step.
    """
    x_l, y_l, x_us = batch
    # The state the student's forward starts from, for the JVP forward to replay: dropout draws and buffers.
    rng = rng_state(x_us.device)
    buffers = {n: b.clone() for n, b in s_net.named_buffers()}
    s_loss, g_mean = _student_gradient(s_net, s_params, x_us, q, autocast, group)
    s_params_new = {n: (p.detach() - eta * g).requires_grad_() for (n, p), g in zip(s_params.items(), g_mean)}
    # L_l(θ'_S) in float32 feedback mode, and this rank's ∇_{θ'_S} L_l^r, averaged into v.
    with feedback_mode(s_net):
        s_loss_l_new = F.cross_entropy(upcast(functional_call(s_net, s_params_new, (x_l,), strict=False)), y_l)
    v: Sequence[Tensor] = torch.autograd.grad(s_loss_l_new, list(s_params_new.values()), materialize_grads=True)
    if group is not None:
        v = mean_over_ranks(list(v), group)
    with replayed_rng(rng, x_us.device):
        jvp = _log_softmax_jvp(s_net, s_params, buffers, dict(zip(s_params, v)), x_us, autocast)  # J, (μB, K)
    # Surrogate: value L_l(θ'_S); gradient wrt θ_T = (∂q/∂θ_T)ᵀ (η_S J / n) = −η_S (∂g_r/∂θ_T)ᵀ v.
    link = (q * (eta / x_us.shape[0]) * jvp).sum()
    meta = s_loss_l_new.detach() + (link - link.detach())
    return s_loss, s_loss_l_new.detach(), meta, g_mean


def _log_softmax_jvp(
    s_net: nn.Module,
    s_params: Mapping[str, Tensor],
    buffers: dict[str, Tensor],
    tangents: dict[str, Tensor],
    x_us: Tensor,
    autocast: torch.autocast,
) -> Tensor:
    """J = ∂ log softmax(S(x_us; θ_S)) / ∂θ_S · v, the forward-mode derivative of the student's log-probabilities.

    The forward is the student's training forward again (the caller replays its dropout draws; BatchNorm uses the
    same batch statistics) on clones of the buffers it started from, so the module's own running statistics are
    not advanced a second time. ``torch.autograd.forward_ad`` rather than ``torch.func.jvp``: it runs under
    autocast (as the student's forward does) and lets BatchNorm update the cloned buffers in place.

    Args:
        s_net: the unwrapped student.
        s_params: its trainable parameters θ_S by name (not modified).
        buffers: clones of its buffers, as they were before the student's forward (updated in place here).
        tangents: v, by the names of ``s_params``.
        x_us: the strong view, (μB, ...).
        autocast: the autocast context of the student's forward.

    Returns:
        J, (μB, K), detached, in the precision of the losses (``upcast``).
    """
    _load_jvp_decompositions()
    with torch.no_grad(), fwAD.dual_level(), autocast:
        duals = {n: fwAD.make_dual(p.detach(), tangents[n]) for n, p in s_params.items()}
        logits = functional_call(s_net, {**buffers, **duals}, (x_us,), strict=False)
        return fwAD.unpack_dual(F.log_softmax(upcast(logits), dim=-1)).tangent


@functools.cache
def _load_jvp_decompositions() -> None:
    """Load forward-mode AD's decompositions once, with PyTorch's own deprecation notice silenced.

    The first ``make_dual`` of a process imports them, and that import calls ``torch.jit.script``, which torch 2.14
    marks deprecated: a ``FutureWarning`` about PyTorch's internals on the user's console in every soft-mode run.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        getattr(fwAD, "_maybe_load_decompositions", lambda: None)()  # private, so looked up: absent, nothing to do
