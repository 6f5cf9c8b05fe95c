"""What ``mpl_update`` checks about what it is handed, and the guard that keeps a failed update from changing anything.

Three kinds of check, by what they cost:

* **Metadata** (``check_batch``, ``check_scalars``): shapes, lengths, dtypes, devices of the ``Batch`` fields and the
  Python numbers (``uda_weight``, the optimizers' learning rates). No kernel runs and nothing synchronises.
* **Label range** (``labels_in_range``): y_l ∈ [0, K) needs K, which is known only once the teacher's logits exist.
  The update then trains on labels clamped into range (so no kernel can fail on them: on CUDA a bad target is a
  device-side assert that ends the process) and reports a 0-d flag on the device; no sync there.
* **Finiteness** (``guarded_update``): after the update, one flag on the device says that the labels were in range,
  both losses are finite and every parameter and buffer of both models is finite. Reading it is the one host sync
  this module adds per call. When it is false, both models (parameters and buffers) and both optimizers' states are
  put back from a copy taken before the update, and ``MPLInputError`` names the cause. The copy costs one clone of
  both models' parameters, buffers and optimizer states per call (memory and one pass of device bandwidth); the
  sync ends the CPU's run-ahead once per step (on a GPU: the host waits for the step to finish before queueing the
  next). Measured on the CPU (small_cnn, 32 + 224 images of 32x32, a loaded 2-core machine): within the noise,
  hard 618 ms vs 703 ms per update without the guard, soft 1106 vs 1189 ms. ``mpl_update(..., check_finite=False)``
  skips both; the trainer does (``metapl.training``: it checks the weights at its periodic sync, and its labels were
  checked when the data set was read), so training keeps no host sync per step.

Raising rather than returning a flag: a library user who never reads a flag would go on training on the same bad
batch; a caller that must not sync passes ``check_finite=False`` and checks the weights at its own sync points.

Batch fields are read generically by name (``batch._fields``): ``x_*`` are images (or feature vectors), ``y_*``
labels, and optional ``t_x_*`` fields are the teacher's own inputs in place of the matching ``x_*`` (same number of
rows; any trailing shape, the same for all of them).

Pure PyTorch: no files, no command line.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from metapl.core.replicas import unwrap

if TYPE_CHECKING:
    from metapl.core.mpl import Batch

LABELS_OK = "check/labels_ok"  # the metric key hard/soft updates report the label-range flag under; popped here


class MPLInputError(ValueError):
    """``mpl_update`` was handed something it cannot learn from; the message names the field (``batch.y_l``)."""


def _field_kind(name: str) -> str:
    if name.startswith("t_x_"):
        return "teacher input"
    return {"x": "images", "y": "labels"}.get(name.split("_")[0], "other")


def check_batch(batch: Batch) -> None:
    """Refuse a batch by its metadata alone (no kernel, no sync), naming the first bad field.

    Checks: every ``x_*`` (and given ``t_x_*``) field is a floating tensor with a leading batch dimension, none empty;
    x_l, x_uw and x_us share their trailing shape (same image size); x_uw and x_us have the same number of rows, and
    each ``t_x_*`` the rows of its ``x_*``; ``y_l`` (and ``y_u`` if given) is a 1-D integer tensor with one label per
    row of x_l (x_uw); every tensor is on x_l's device.

    Raises:
        MPLInputError: naming the field.
    """
    values = {name: getattr(batch, name) for name in batch._fields}
    for name, value in values.items():
        kind = _field_kind(name)
        if value is None and (name == "y_u" or kind == "teacher input"):
            continue
        if not isinstance(value, Tensor):
            raise MPLInputError(f"batch.{name} is a {type(value).__name__}, not a tensor; pass a torch.Tensor")
        if value.device != values["x_l"].device:
            raise MPLInputError(
                f"batch.{name} is on {value.device} but batch.x_l on {values['x_l'].device}; "
                "move every field to one device"
            )
        if kind in ("images", "teacher input"):
            _check_inputs(name, value)
        elif kind == "labels":
            _check_labels(name, value, values["x_l" if name == "y_l" else "x_uw"].shape[0])
    x_l, x_uw, x_us = values["x_l"], values["x_uw"], values["x_us"]
    if x_uw.shape[0] != x_us.shape[0]:
        raise MPLInputError(
            f"batch.x_uw has {x_uw.shape[0]} images but batch.x_us has {x_us.shape[0]}; they must be two "
            "views of the same unlabeled images"
        )
    for name, x in (("x_uw", x_uw), ("x_us", x_us)):
        if x.shape[1:] != x_l.shape[1:]:
            raise MPLInputError(
                f"batch.{name} has images of shape {tuple(x.shape[1:])} but batch.x_l "
                f"{tuple(x_l.shape[1:])}; resize labeled and unlabeled images to one size"
            )
    _check_teacher_inputs(values)


def _check_inputs(name: str, x: Tensor) -> None:
    if not x.is_floating_point():
        raise MPLInputError(f"batch.{name} has dtype {x.dtype}; images must be floating point (normalise them)")
    if x.dim() < 2:
        raise MPLInputError(
            f"batch.{name} has shape {tuple(x.shape)}; expected a leading batch dimension, "
            "(N, C, H, W) images or (N, D) vectors"
        )
    if x.shape[0] == 0:
        # The losses would average over no images: NaN, which would then poison both models silently.
        raise MPLInputError(f"batch.{name} is empty (0 images); every MPL update needs labeled and unlabeled images")


def _check_labels(name: str, y: Tensor, rows: int) -> None:
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise MPLInputError(f"batch.{name} has dtype {y.dtype}; labels must be class indices (torch.long)")
    if y.dim() != 1:
        raise MPLInputError(f"batch.{name} has shape {tuple(y.shape)}; expected one class index per image, (N,)")
    if y.shape[0] != rows:
        images = "x_l" if name == "y_l" else "x_uw"
        raise MPLInputError(
            f"batch.{name} has {y.shape[0]} labels but batch.{images} {rows} images; pass one label per image"
        )


def _check_teacher_inputs(values: dict) -> None:
    """The teacher's own inputs (``t_x_l``...), where given: the rows of their ``x_*`` and one trailing shape."""
    given = {n: v for n, v in values.items() if n.startswith("t_x_") and v is not None}
    for name, t_x in given.items():
        own = name[2:]
        if own in values and t_x.shape[0] != values[own].shape[0]:
            raise MPLInputError(
                f"batch.{name} has {t_x.shape[0]} rows but batch.{own} {values[own].shape[0]}; "
                "the teacher's input must describe the same images"
            )
    shapes = {tuple(v.shape[1:]) for v in given.values()}
    if len(shapes) > 1:
        listed = ", ".join(f"{n} {tuple(v.shape[1:])}" for n, v in given.items())
        raise MPLInputError(f"the teacher's inputs differ in shape ({listed}); give them one trailing shape")


def check_scalars(uda_weight: float, optimizers: dict) -> None:
    """Refuse a non-finite or negative ``uda_weight`` and a non-finite or negative learning rate (no sync for
    Python-float learning rates; a tensor learning rate is read once).

    Args:
        uda_weight: ``mpl_update``'s argument.
        optimizers: ``{"s_optimizer": ..., "t_optimizer": ...}``; a None optimizer is skipped.

    Raises:
        MPLInputError: naming the argument.
    """
    if isinstance(uda_weight, bool) or not isinstance(uda_weight, (int, float)) or not math.isfinite(uda_weight):
        raise MPLInputError(f"uda_weight {uda_weight!r} is not a finite number; pass a float >= 0 (0 = no UDA)")
    if uda_weight < 0:
        raise MPLInputError(f"uda_weight {uda_weight!r} is negative; pass a float >= 0 (0 = no UDA)")
    for name, optimizer in optimizers.items():
        if optimizer is None:
            continue
        for i, group in enumerate(optimizer.param_groups):
            lr = float(group["lr"])
            if not math.isfinite(lr) or lr < 0:
                raise MPLInputError(
                    f"{name}.param_groups[{i}]['lr'] is {lr!r}; a learning rate must be a finite "
                    "number >= 0 (check the schedule)"
                )


def labels_in_range(y: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """The labels with any outside [0, K) replaced by 0, and a 0-d bool tensor: were all in range. No sync.

    The update trains on the replaced labels (no kernel can then fail on them); ``guarded_update`` refuses the result
    when the flag is false, so those labels never reach the models.
    """
    inside = (y >= 0) & (y < num_classes)
    return torch.where(inside, y, torch.zeros_like(y)), inside.all()


class _Snapshot:
    """Copies of both models' parameters and buffers and both optimizers' states, to put back after a failure."""

    def __init__(self, models: list[nn.Module], optimizers: list[torch.optim.Optimizer | None]) -> None:
        self.tensors = [t for m in models for t in (*unwrap(m).parameters(), *unwrap(m).buffers())]
        with torch.no_grad():
            self.copies = [t.detach().clone() for t in self.tensors]
        self.optimizers = [o for o in optimizers if o is not None]
        self.states = [
            {p: {k: v.clone() if isinstance(v, Tensor) else v for k, v in s.items()} for p, s in o.state.items()}
            for o in self.optimizers
        ]

    def finite(self) -> Tensor:
        """A 0-d bool tensor on the device: every parameter and buffer (floating ones) is finite."""
        flags = [torch.isfinite(t).all() for t in self.tensors if t.is_floating_point()]
        return torch.stack(flags).all() if flags else torch.tensor(True)

    def restore(self) -> None:
        with torch.no_grad():
            for t, c in zip(self.tensors, self.copies):
                t.copy_(c)
        for o, state in zip(self.optimizers, self.states):
            o.state.clear()
            o.state.update(state)
            o.zero_grad(set_to_none=True)


def guarded_update(
    step: Callable[..., dict[str, Tensor]],
    teacher: nn.Module,
    student: nn.Module,
    t_optimizer: torch.optim.Optimizer | None,
    s_optimizer: torch.optim.Optimizer,
    batch: Batch,
    *args: Any,
    **kwargs: Any,
) -> dict[str, Tensor]:
    """Run ``step`` (``hard_update`` or ``soft_update``) so that a failed update changes nothing.

    Fails, with both models and optimizer states as they were before the call, when: a label was out of range, a loss
    or a weight became non-finite (one host sync, see the module docstring), or torch raised on the batch (e.g. a
    model that does not take these images, or teacher and student with different numbers of classes).

    Returns:
        ``step``'s metrics (without the label-range flag).

    Raises:
        MPLInputError: naming the cause.
    """
    snapshot = _Snapshot([teacher, student], [t_optimizer, s_optimizer])
    try:
        metrics = step(teacher, student, t_optimizer, s_optimizer, batch, *args, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, IndexError, ValueError) as e:
        snapshot.restore()
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise MPLInputError(
            f"the update failed on this batch ({type(e).__name__}: {first}); check that both models "
            "take the batch's inputs and output the same number of classes"
        ) from e
    labels_ok = metrics.pop(LABELS_OK, None)
    flags = [snapshot.finite(), torch.isfinite(metrics["loss/teacher"]), torch.isfinite(metrics["loss/student"])]
    if labels_ok is not None:
        flags.append(labels_ok.bool())
    if bool(torch.stack(flags).all()):  # the one host sync
        return metrics
    snapshot.restore()
    raise MPLInputError(_diagnose(batch, labels_ok))


def _diagnose(batch: Batch, labels_ok: Tensor | None) -> str:
    """Why the guard failed, in one line (the failure path: syncs freely)."""
    if labels_ok is not None and not bool(labels_ok):
        y = batch.y_l
        return (
            f"batch.y_l holds labels outside the models' classes (min {int(y.min())}, max {int(y.max())}); "
            "pass class indices in [0, K); both models were left unchanged"
        )
    for name in batch._fields:
        value = getattr(batch, name)
        if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"batch.{name} holds non-finite values (NaN/inf); both models were left unchanged; drop or fix them"
    return (
        "the update produced a non-finite loss or weight; both models and optimizers were left unchanged; lower "
        "the learning rates or uda_weight, or clip gradients (grad_clip)"
    )
