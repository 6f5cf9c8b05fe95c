"""The reduced teacher of Reduced Meta Pseudo Labels (Pham et al., CVPR 2021, Appendix E).

A large teacher T, trained beforehand, is run once over the training images; a small network T_r then reads T's
predicted distribution for an image, not the image, and returns the distribution the student learns from. T_r is
trained by the usual MPL update (its labeled loss + the feedback term), so it can still adapt T's targets to the
student's learning state while the two large networks are never in memory together.

The paper does not say how T_r is built or initialised. Here: it reads z = log p_T (the large teacher's
log-probabilities, (N, K)) and returns logits

    T_r(z) = exp(s) · z + W_2 GELU(W_1 softmax(z) + b_1) + b_2,

with s = 0 and W_2 = 0, b_2 = 0 at initialisation, so that softmax(T_r(z)) = softmax(z) = p_T exactly at step 0: the
run starts as plain distillation of T, and any departure from T is learned. ``s`` lets T_r sharpen or soften T as
a whole (a learned temperature); the hidden layer reads probabilities (bounded in [0, 1]) rather than log-probabilities
(unbounded below), and adds a per-class correction. With K = 10 and 64 hidden units it has 1,365 parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ReducedTeacher(nn.Module):
    """T_r: the large teacher's log-probabilities (N, K) -> logits (N, K), the identity map at initialisation.

    Args:
        num_classes: K.
        hidden: width of the hidden layer.
    """

    def __init__(self, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(()))
        self.hidden = nn.Linear(num_classes, hidden)
        self.out = nn.Linear(hidden, num_classes)
        nn.init.zeros_(self.out.weight)  # the correction starts at 0: T_r(z) = z
        nn.init.zeros_(self.out.bias)

    def forward(self, log_probs: Tensor) -> Tensor:
        """Logits (N, K) from the large teacher's log-probabilities ``log_probs`` (N, K)."""
        correction = self.out(nn.functional.gelu(self.hidden(log_probs.softmax(dim=-1))))
        return self.log_scale.exp() * log_probs + correction
