"""The soft-label MPL update: the teacher's pseudo labels are its distribution q(θ_T), and its gradient is exact.

Notation as in ``metapl.core.mpl`` (the paper's Sec. 2). The student's look-ahead step
θ'_S = θ_S − η_S ∇_{θ_S} CE(q(θ_T), S(x_us; θ_S)) (Eq. 3) is written as a function of θ_T with
``torch.func.functional_call``, and L_l(θ'_S(θ_T)) is differentiated through it (second order).

Called through ``metapl.core.mpl.mpl_update``, which checks the arguments (no DDP student, no float16 scaling).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from metapl.core.losses import soft_cross_entropy, upcast
from metapl.core.parts import autocast_for, clip_and_step, feedback_mode, pseudo_metrics, uda_term, unwrap


def soft_update(teacher, student, t_optimizer, s_optimizer, batch, config, state, *, uda_weight, amp_dtype,
                t_scaler, s_scaler, generator) -> dict[str, Tensor]:  # fmt: skip
    """One soft-label MPL update: the teacher's step on the exact meta-gradient, then the student's step on q(θ_T).

    Arguments as ``mpl_update``'s; ``state``, ``s_scaler`` and ``generator`` are unused here.

    Returns:
        ``mpl_update``'s metrics: named, detached float32 scalars (``mpl/h`` and ``mpl/baseline`` are 0).
    """
    del s_scaler, generator, state  # float16 is refused above; soft labels draw nothing; no baseline in soft mode
    x_l, y_l, x_uw, x_us, y_u = batch
    t_net, s_net = unwrap(teacher), unwrap(student)
    autocast = autocast_for(x_l, amp_dtype)
    eta = s_optimizer.param_groups[0]["lr"]
    zero = x_l.new_zeros((), dtype=torch.float32)

    t_logits_l, t_logits_src, t_logits_uw, t_logits_us = _teacher_logits(teacher, t_net, batch, config, uda_weight,
                                                                         autocast)  # fmt: skip
    q = F.softmax(t_logits_src / config.soft_temperature, dim=-1)  # soft pseudo labels q(θ_T), (μB, K)

    t_loss_l = F.cross_entropy(t_logits_l, y_l, label_smoothing=config.label_smoothing)
    t_loss_uda, mask_ratio = uda_term(t_logits_uw, t_logits_us, config, uda_weight, zero)
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
    clip_and_step(t_optimizer, t_params, t_scaler, config.grad_clip)

    if grads is not None:
        # The student's real step uses the first-order gradient already computed for the look-ahead.
        s_optimizer.zero_grad(set_to_none=True)
        for p, g in zip(s_params.values(), grads):
            p.grad = g.detach()
        clip_and_step(s_optimizer, list(s_params.values()), None, config.grad_clip)

    metrics = {
        "loss/teacher": t_loss, "loss/teacher_l": t_loss_l, "loss/teacher_uda": t_loss_uda,
        "loss/teacher_mpl": meta, "loss/student": s_loss, "mpl/h": zero, "mpl/baseline": zero,
        "mpl/s_loss_l_old": zero, "mpl/s_loss_l_new": s_loss_l_new, "mask_ratio": mask_ratio,
    }  # fmt: skip
    metrics.update(pseudo_metrics(t_logits_src.detach(), t_logits_src.detach().argmax(-1), y_u))
    return {k: v.detach().float() for k, v in metrics.items()}


def _teacher_logits(teacher, t_net, batch, config, uda_weight: float, autocast):
    """The teacher's logits, differentiable where the update needs them.

    Returns:
        ``(t_logits_l, t_logits_src, t_logits_uw, t_logits_us)``: labeled; the view that q is made from; weak
        (a target only, None when UDA is off and the strong view is labeled); the last μB logits, strong wherever
        UDA or ``label_view="strong"`` reads them.
    """
    x_l, _, x_uw, x_us, _ = batch
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
