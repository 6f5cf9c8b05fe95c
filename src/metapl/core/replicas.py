"""A model replicated over ranks (DistributedDataParallel, torch.compile): the module inside, its process group, and
the averages over its ranks that the updates take by hand."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or torch.compile) wrapper; the model itself otherwise."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]  # an attribute nn.Module types as Tensor | Module
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
        model = model._orig_mod  # type: ignore[assignment]  # an attribute nn.Module types as Tensor | Module


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
