"""Pieces shared by the hard-label and the soft-label MPL updates (``metapl.core.hard``, ``metapl.core.soft``).

Notation as in ``metapl.core.mpl``: teacher T, student S, labeled (x_l, y_l), unlabeled strong view x_us, and the
student's labeled loss L_l(θ_S) = CE(y_l, S(x_l; θ_S)) that the teacher's feedback measures (Eq. 2 of the paper).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from metapl.core.losses import uda_consistency


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or torch.compile) wrapper; the model itself otherwise."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def replica_group(model: nn.Module) -> dist.ProcessGroup | None:
    """The process group over which ``model`` is replicated: that of its DDP wrapper; None when it has none.

    The soft update never calls the student's DDP forward (it differentiates through a functional copy), so it
    averages the student's gradients itself, over the group the wrapper names.
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model.process_group
        if not hasattr(model, "_orig_mod"):  # torch.compile around DDP
            return None
        model = model._orig_mod


def mean_over_ranks(tensors: list[Tensor], group: dist.ProcessGroup | None = None) -> list[Tensor]:
    """Each tensor averaged over the ranks of ``group`` (the default group when None), in one all-reduce.

    Args:
        tensors: same dtype and device; not modified.
        group: the ranks to average over; identity outside ``torch.distributed`` or with one rank.

    Returns:
        New tensors (or the inputs themselves when there is nothing to average).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return tensors
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])  # one collective, not one per tensor
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


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


def rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The states of the default generators a forward on ``device`` draws from (dropout): the CPU's and, on an
    accelerator, that device's own (None on the CPU). No device sync: the states are host tensors."""
    if device.type == "cpu":
        return torch.get_rng_state(), None
    return torch.get_rng_state(), torch.get_device_module(device.type).get_rng_state(device)


@contextlib.contextmanager
def replayed_rng(state: tuple[Tensor, Tensor | None], device: torch.device):
    """Inside, the default generators restart from ``state`` (``rng_state``), so a second forward draws the same
    dropout masks as the first; on exit they are back where they were, as if nothing had run inside."""
    on_device = state[1] is not None
    with torch.random.fork_rng(devices=[device] if on_device else [], device_type=device.type):
        torch.set_rng_state(state[0])
        if on_device:
            torch.get_device_module(device.type).set_rng_state(state[1], device)
        yield


def autocast_for(x: Tensor, amp_dtype: torch.dtype | None):
    """Autocast on ``x``'s device type to ``amp_dtype``; a disabled one when ``amp_dtype`` is None."""
    return torch.autocast(device_type=x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def uda_term(t_logits_uw, t_logits_us, config, uda_weight: float, zero: Tensor) -> tuple[Tensor, Tensor]:
    """The teacher's UDA consistency loss and mask ratio under ``config`` (an ``MPLConfig``); zeros when off."""
    if uda_weight <= 0 or t_logits_uw is None:
        return zero, zero
    return uda_consistency(t_logits_uw, t_logits_us, temperature=config.uda_temperature, threshold=config.uda_threshold)


def clip_and_step(optimizer, params, scaler, grad_clip: float) -> None:
    """Clip the global gradient norm of ``params`` (when ``grad_clip`` > 0), then step, through ``scaler`` if any."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


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
