"""The two measurements of the student's labeled loss L_l(θ_S) that the teacher's feedback compares (Eq. 2 of the
paper), made comparable: BatchNorm on batch statistics without updating its running ones, other layers in eval mode,
and the dropout masks of the first forward replayed in the second.

Notation as in ``metapl.core.mpl``: teacher T, student S, labeled (x_l, y_l).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


@contextlib.contextmanager
def feedback_mode(model: nn.Module) -> Iterator[nn.Module]:
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
def replayed_rng(state: tuple[Tensor, Tensor | None], device: torch.device) -> Iterator[None]:
    """Inside, the default generators restart from ``state`` (``rng_state``), so a second forward draws the same
    dropout masks as the first; on exit they are back where they were, as if nothing had run inside."""
    on_device = state[1] is not None
    with torch.random.fork_rng(devices=[device] if on_device else [], device_type=device.type):
        torch.set_rng_state(state[0])
        if on_device:
            torch.get_device_module(device.type).set_rng_state(state[1], device)
        yield
