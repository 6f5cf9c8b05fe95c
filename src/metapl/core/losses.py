"""Loss pieces of Meta Pseudo Labels and UDA, shared by the hard and soft updates.

Every function takes logits as float tensors of shape (B, K) and returns a scalar mean over the batch, so that the
losses of batches of different sizes weigh the same per image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from metapl.core.config import MPLConfig


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Cross-entropy against a distribution: mean over the batch of -sum_k q_k log softmax(logits)_k.

    Args:
        logits: (B, K) scores.
        target_probs: (B, K) rows that sum to one. Gradients flow into it unless the caller detaches it (the soft
            MPL update relies on that: the target is the teacher's distribution).

    Returns:
        A scalar tensor.
    """
    return -(target_probs * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def upcast(logits: Tensor) -> Tensor:
    """``logits`` in the precision losses are computed in: float16/bfloat16 (autocast) go up to float32.

    float32 and float64 stay as they are. A plain ``.float()`` would round a float64 model's logits to float32, and
    with them h (a small difference of two losses) and every comparison against a float64 reference.

    Args:
        logits: (B, K) scores of any floating dtype.

    Returns:
        ``logits`` itself, or a float32 copy of it.
    """
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def pseudo_labels(logits: Tensor, how: str, generator: torch.Generator | None = None) -> Tensor:
    """The teacher's hard labels for unlabeled images (paper, Sec. 2: ŷ ~ T(x_u; θ_T)).

    Args:
        logits: (B, K) teacher scores; they are not differentiated.
        how: ``"argmax"`` (the most likely class) or ``"sample"`` (a draw from softmax(logits)).
        generator: optional generator for ``"sample"``, for reproducible draws.

    Returns:
        (B,) int64 class indices.
    """
    if how == "argmax":
        return logits.argmax(dim=-1)
    if how == "sample":
        probs = F.softmax(logits.detach().float(), dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    raise ValueError(f"pseudo_label must be 'argmax' or 'sample', got {how!r}")


def uda_consistency(
    t_logits_uw: Tensor, t_logits_us: Tensor, *, temperature: float, threshold: float
) -> tuple[Tensor, Tensor]:
    """UDA's consistency loss for the teacher (Xie et al. 2020; MPL paper, Appendix C).

    The target is the teacher's sharpened, stop-gradient distribution on the weak view; only images whose
    (unsharpened) confidence reaches ``threshold`` count. Masked images contribute zero, and the mean runs over the
    whole batch, as in UDA's release, so the loss shrinks when few images pass the threshold.

    Args:
        t_logits_uw: (B, K) teacher logits on the weak view (no gradient needed).
        t_logits_us: (B, K) teacher logits on the strong view (differentiated).
        temperature: sharpening temperature; < 1 sharpens.
        threshold: confidence threshold in [0, 1].

    Returns:
        (loss, mask_ratio): the scalar loss and the fraction of images that passed the threshold.
    """
    t_logits_uw = upcast(t_logits_uw.detach())
    target = F.softmax(t_logits_uw / temperature, dim=-1)  # (B, K)
    confidence = F.softmax(t_logits_uw, dim=-1).amax(dim=-1)  # (B,)
    mask = (confidence >= threshold).float()
    per_image = -(target * F.log_softmax(upcast(t_logits_us), dim=-1)).sum(dim=-1)  # (B,)
    return (per_image * mask).mean(), mask.mean()


def uda_term(
    t_logits_uw: Tensor | None, t_logits_us: Tensor, config: MPLConfig, uda_weight: float, zero: Tensor
) -> tuple[Tensor, Tensor]:
    """The teacher's UDA consistency loss and mask ratio under ``config`` (an ``MPLConfig``); zeros when off."""
    if uda_weight <= 0 or t_logits_uw is None:
        return zero, zero
    return uda_consistency(t_logits_uw, t_logits_us, temperature=config.uda_temperature, threshold=config.uda_threshold)


def pseudo_metrics(t_logits: Tensor, y_hat: Tensor, y_u: Tensor | None) -> dict[str, Tensor]:
    """The teacher's mean confidence and, when ``y_u`` is given, the accuracy of the pseudo labels ``y_hat``."""
    probs = F.softmax(t_logits.float(), dim=-1)
    out = {"pseudo/confidence": probs.amax(dim=-1).mean()}
    if y_u is not None:
        known = (y_u >= 0).float()
        correct = (y_hat == y_u).float() * known
        # NaN when no label is known in this batch: "unknown", not "0 % correct".
        out["pseudo/acc"] = correct.sum() / known.sum()
    return out
