"""One FixMatch step (Sohn et al., NeurIPS 2020, arXiv 2001.07685): one network, pseudo labels from its own weak view.

The paper's Eq. 2-4, with B labeled and μB unlabeled images:

    ℓ_s = (1/B)  Σ_b H(p_b, p_m(y | α(x_b)))                               (Eq. 2: labeled cross-entropy)
    ℓ_u = (1/μB) Σ_b 1[max(q_b) ≥ τ] H(argmax(q_b), p_m(y | A(u_b)))       (Eq. 3, q_b = p_m(y | α(u_b)))
    ℓ   = ℓ_s + λ_u ℓ_u                                                     (Eq. 4)

α is the weak view, A the strong one; q_b is not differentiated (the release detaches it). The mean of ℓ_u runs over
all μB images, masked ones counting zero, as in the release. As the release does, the labeled, weak and strong images
go through the network in one forward, so BatchNorm normalises them as one batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metapl.core.losses import pseudo_metrics, upcast
from metapl.core.steps import autocast_for, clip_and_step


def fixmatch_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x_l: Tensor,
    y_l: Tensor,
    x_uw: Tensor,
    x_us: Tensor,
    *,
    threshold: float,
    weight: float,
    y_u: Tensor | None = None,
    label_smoothing: float = 0.0,
    grad_clip: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, Tensor]:
    """ℓ_s + λ_u ℓ_u on one labeled and one unlabeled batch (both views), and one optimizer step.

    Args:
        model: any classifier mapping (B, C, H, W) to (B, K) logits, in train mode.
        optimizer: its optimizer.
        x_l: (B, C, H, W) labeled images; y_l: (B,) their classes.
        x_uw: (μB, C, H, W) weak views of the unlabeled images; x_us: (μB, C, H, W) their strong views.
        threshold: τ, the confidence q_b must reach for image b to count (FixMatch: 0.95).
        weight: λ_u, the weight of the unlabeled loss (FixMatch: 1).
        y_u: (μB,) the unlabeled images' true classes (-1 where unknown), for the pseudo labels' accuracy; or None.
        label_smoothing: label smoothing of ℓ_s.
        grad_clip: max gradient norm; 0 = off.
        amp_dtype: autocast dtype, or None.
        scaler: gradient scaler for float16, or None.

    Returns:
        Detached scalars: ``loss/student`` (ℓ), ``loss/student_l`` (ℓ_s), ``loss/student_u`` (ℓ_u), ``mask_ratio``
        (the share of the μB images that passed τ), ``pseudo/confidence`` (mean max q_b) and, with ``y_u``,
        ``pseudo/acc`` (NaN when no label is known in the batch).
    """
    b, mu_b = x_l.shape[0], x_uw.shape[0]
    with autocast_for(x_l, amp_dtype):
        logits = model(torch.cat([x_l, x_uw, x_us]))  # (B + 2μB, K): one forward, one BatchNorm batch
    logits = upcast(logits)
    logits_l, logits_uw, logits_us = logits.split([b, mu_b, mu_b])

    # Labeled cross-entropy (Eq. 2)
    loss_l = F.cross_entropy(logits_l, y_l, label_smoothing=label_smoothing)

    # Pseudo-label cross-entropy (Eq. 3): the weak view's argmax where it is confident, the strong view learns it
    logits_uw = logits_uw.detach()
    confidence, y_hat = F.softmax(logits_uw, dim=-1).max(dim=-1)  # (μB,), (μB,)
    mask = (confidence >= threshold).to(logits.dtype)
    loss_u = (F.cross_entropy(logits_us, y_hat, reduction="none") * mask).mean()

    loss = loss_l + weight * loss_u  # Eq. 4
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    clip_and_step(optimizer, model.parameters(), scaler, grad_clip)
    return {
        "loss/student": loss.detach(),
        "loss/student_l": loss_l.detach(),
        "loss/student_u": loss_u.detach(),
        "mask_ratio": mask.mean(),
        **pseudo_metrics(logits_uw, y_hat, y_u),
    }
