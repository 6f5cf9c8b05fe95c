"""The steps that ``step_speed.py`` times: the MPL update's variants and the two references, ideal and naive.

* ``hard-taylor``, ``hard-dot``, ``soft``: ``metapl.core.mpl_update`` with the CIFAR recipe's losses.
* ``ideal``: the passes a hard update cannot avoid (``IDEAL``), each a callable timed alone.
* ``naive``: the step of the most-used public PyTorch port (kekmodel/MPL-pytorch), re-implemented in ``naive_step``.
* ``distill``, ``reduced-taylor``, ``reduced-dot``, ``reduced-cosine``: Reduced MPL (``mpl_update`` with a
  ``ReducedTeacher`` reading stored log-probabilities, ``Batch.t_x_*``) and its control, a fixed teacher; no image
  teacher exists in these variants (the large teacher predicted beforehand), and no UDA (it does not apply there).

Every builder makes fresh models, optimizers and a synthetic batch; ``build`` returns name -> zero-argument callable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import common  # noqa: F401 - first: it puts src/ on sys.path when metapl is not installed
from metapl.core import Batch, MPLConfig, MPLState, feedback_mode, mpl_update
from metapl.engine.runtime import make_sgd
from metapl.models import create_model
from metapl.models.reduced import ReducedTeacher

SHAPES = {"paper": (64, 7), "cpu": (32, 7), "recipe": (16, 4), "tiny": (2, 1)}  # (B labeled, μ); recipe: CPU configs
REDUCED_VARIANTS = {"distill": None, "reduced-taylor": "taylor", "reduced-dot": "dot", "reduced-cosine": "cosine"}
VARIANTS = ("hard-taylor", "hard-dot", "soft", "naive", "ideal", *REDUCED_VARIANTS)
MPL_VARIANTS = {"hard-taylor": ("hard", "taylor"), "hard-dot": ("hard", "dot"), "soft": ("soft", "taylor")}
NUM_CLASSES, IMAGE_SIZE, DROPOUT = 10, 32, 0.2
# The CIFAR recipe's settings (src/metapl/configs/cifar10_4k.yaml); the naive step uses the same ones.
LR, MOMENTUM, WEIGHT_DECAY, LABEL_SMOOTHING = 0.05, 0.9, 5e-4, 0.15
UDA_WEIGHT, UDA_TEMPERATURE, UDA_THRESHOLD = 8.0, 0.7, 0.6

# The passes each hard update cannot avoid, with how many times a step runs them.
IDEAL = {
    "ideal-taylor": {
        "teacher_fwd_nograd_uw": 1, "student_fwd_bwd_us": 1, "student_step": 1, "student_fwd_nograd_l_fp32": 2,
        "teacher_fwd_bwd_l_us": 1, "teacher_step": 1,
    },
    "ideal-dot": {
        "teacher_fwd_nograd_uw": 1, "student_fwd_bwd_us": 1, "student_step": 1, "student_fwd_bwd_l_fp32": 1,
        "teacher_fwd_bwd_l_us": 1, "teacher_step": 1,
    },
}  # fmt: skip


def _model(name: str, device: torch.device, fmt: torch.memory_format) -> torch.nn.Module:
    m = create_model(name, num_classes=NUM_CLASSES, in_channels=3, image_size=IMAGE_SIZE, dropout=DROPOUT)
    return m.to(device=device, memory_format=fmt).train()


def _random_batch(b: int, mu: int, device: torch.device, fmt: torch.memory_format) -> Batch:
    def images(n: int) -> torch.Tensor:
        return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, device=device).contiguous(memory_format=fmt)

    labels = torch.randint(NUM_CLASSES, (b,), device=device)
    return Batch(x_l=images(b), y_l=labels, x_uw=images(mu * b), x_us=images(mu * b))


def build(variant: str, model: str, b: int, mu: int, amp, device: torch.device, fmt) -> dict:
    """Fresh teacher, student, optimizers and batch for ``variant``; name -> step callable (the ideal: one per pass).

    Every callable runs ``mpl_update`` as the trainer does, with ``check_finite=False`` (no copy, no sync per step).
    """
    if variant in REDUCED_VARIANTS:
        return _reduced(variant, _model(model, device, fmt), _random_batch(b, mu, device, fmt), device)
    teacher, student = (_model(model, device, fmt) for _ in range(2))
    batch = _random_batch(b, mu, device, fmt)
    if variant == "ideal":
        return ideal_passes(teacher, student, batch, amp, device)
    scalers = (None, None)
    if amp == torch.float16:
        scalers = (torch.amp.GradScaler(device.type), torch.amp.GradScaler(device.type))
    if variant == "naive":
        t_opt, s_opt = _port_sgd(teacher), _port_sgd(student)
        return {"naive": lambda: naive_step(teacher, student, t_opt, s_opt, batch, amp_dtype=amp,
                                            t_scaler=scalers[0], s_scaler=scalers[1])}  # fmt: skip
    mode, feedback = MPL_VARIANTS[variant]
    config = MPLConfig(mode=mode, feedback=feedback, label_smoothing=LABEL_SMOOTHING,
                       uda_temperature=UDA_TEMPERATURE, uda_threshold=UDA_THRESHOLD)  # fmt: skip
    t_opt, s_opt = (_sgd(m, device) for m in (teacher, student))
    state = MPLState()
    return {variant: lambda: mpl_update(teacher, student, t_opt, s_opt, batch, config, state, uda_weight=UDA_WEIGHT,
                                        amp_dtype=amp, t_scaler=scalers[0], s_scaler=scalers[1],
                                        check_finite=False)}  # fmt: skip


def _reduced(variant: str, student, batch: Batch, device: torch.device) -> dict:
    """A Reduced MPL step (or, for ``distill``, its fixed-teacher control) over stored log-probabilities."""
    g = torch.Generator().manual_seed(0)
    stored = [torch.log_softmax(3 * torch.randn(n, NUM_CLASSES, generator=g), 1).to(device)
              for n in (batch.x_l.shape[0], batch.x_uw.shape[0])]  # fmt: skip
    batch = batch._replace(t_x_l=stored[0], t_x_uw=stored[1], t_x_us=stored[1])
    teacher = ReducedTeacher(NUM_CLASSES).to(device)
    feedback = REDUCED_VARIANTS[variant]
    config = MPLConfig(feedback=feedback or "taylor", label_smoothing=LABEL_SMOOTHING)
    t_opt = None if feedback is None else _sgd(teacher, device)
    s_opt, state = _sgd(student, device), MPLState()
    return {variant: lambda: mpl_update(teacher, student, t_opt, s_opt, batch, config, state, check_finite=False)}


def _sgd(model, device: torch.device) -> torch.optim.SGD:
    return make_sgd(model, lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY, device=device)


# ----------------------------------------------------------------------------------------------------------------
# The references


def ideal_passes(teacher, student, batch: Batch, amp, device: torch.device) -> dict:
    """name -> callable running one pass that a hard update cannot avoid (see ``IDEAL``), to be timed alone."""
    x_l, y_l, x_uw, x_us = batch.x_l, batch.y_l, batch.x_uw, batch.x_us
    y_u = torch.randint(NUM_CLASSES, (x_us.shape[0],), device=x_us.device)
    autocast = torch.autocast(device_type=device.type, dtype=amp, enabled=amp is not None)
    t_opt, s_opt = _sgd(teacher, device), _sgd(student, device)
    s_params = [p for p in student.parameters() if p.requires_grad]

    def teacher_fwd_nograd_uw():
        with torch.no_grad(), autocast:
            teacher(x_uw)

    def student_fwd_bwd_us():
        student.zero_grad(set_to_none=True)
        with autocast:
            logits = student(x_us)
        F.cross_entropy(logits.float(), y_u).backward()

    def student_fwd_nograd_l_fp32():
        with torch.no_grad(), feedback_mode(student):
            F.cross_entropy(student(x_l).float(), y_l)

    def student_fwd_bwd_l_fp32():
        with feedback_mode(student):
            torch.autograd.grad(F.cross_entropy(student(x_l).float(), y_l), s_params, allow_unused=True)

    def teacher_fwd_bwd_l_us():
        teacher.zero_grad(set_to_none=True)
        with autocast:
            logits = teacher(torch.cat([x_l, x_us]))
        F.cross_entropy(logits.float(), torch.cat([y_l, y_u])).backward()

    return {
        "teacher_fwd_nograd_uw": teacher_fwd_nograd_uw,
        "student_fwd_bwd_us": student_fwd_bwd_us,
        "student_fwd_nograd_l_fp32": student_fwd_nograd_l_fp32,
        "student_fwd_bwd_l_fp32": student_fwd_bwd_l_fp32,
        "teacher_fwd_bwd_l_us": teacher_fwd_bwd_l_us,
        "student_step": s_opt.step,  # on the gradients left by the fwd+bwd passes above
        "teacher_step": t_opt.step,
    }


def _port_sgd(model) -> torch.optim.SGD:
    """The port's optimizer: decay on everything but biases and BatchNorm, PyTorch's default implementation."""
    decay = [p for n, p in model.named_parameters() if not any(k in n for k in ("bn", "bias"))]
    no_decay = [p for n, p in model.named_parameters() if any(k in n for k in ("bn", "bias"))]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM, nesterov=True)


def naive_step(teacher, student, t_opt, s_opt, batch: Batch, *, amp_dtype=None, t_scaler=None, s_scaler=None):
    """One MPL step the way the most-used public PyTorch port writes it (our re-implementation, for reference).

    Args:
        teacher: the teacher.
        student: the student.
        t_opt: the teacher's optimizer.
        s_opt: the student's optimizer.
        batch: labeled and unlabeled images.
        amp_dtype: autocast dtype or None.
        t_scaler: the teacher's gradient scaler (float16) or None.
        s_scaler: the student's gradient scaler (float16) or None.

    Returns:
        The logged losses as Python floats (the port reads each with ``.item()`` every step).
    """
    x_l, y_l, x_uw, x_us = batch.x_l, batch.y_l, batch.x_uw, batch.x_us
    n_l = x_l.shape[0]
    autocast = torch.autocast(device_type=x_l.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    with autocast:
        # One teacher forward with a graph over all three batches: the weak view's activations stay alive too.
        t_logits = teacher(torch.cat([x_l, x_uw, x_us])).float()  # (B + 2μB, K)
        t_logits_l = t_logits[:n_l]
        t_logits_uw, t_logits_us = t_logits[n_l:].chunk(2)
        t_loss_l = F.cross_entropy(t_logits_l, y_l, label_smoothing=LABEL_SMOOTHING)

        # UDA on the teacher; the sharpened weak-view distribution also gives the student's hard labels.
        soft_pseudo_label = F.softmax(t_logits_uw.detach() / UDA_TEMPERATURE, dim=-1)
        max_probs, hard_pseudo_label = soft_pseudo_label.max(dim=-1)
        mask = max_probs.ge(UDA_THRESHOLD).float()
        t_loss_u = (-(soft_pseudo_label * F.log_softmax(t_logits_us, dim=-1)).sum(dim=-1) * mask).mean()
        t_loss_uda = t_loss_l + UDA_WEIGHT * t_loss_u

        # Student forward with a graph over labeled + strong images; L_old comes from this mixed batch.
        s_logits = student(torch.cat([x_l, x_us])).float()  # (B + μB, K)
        s_logits_l, s_logits_us = s_logits[:n_l], s_logits[n_l:]
        s_loss_l_old = F.cross_entropy(s_logits_l.detach(), y_l)
        s_loss = F.cross_entropy(s_logits_us, hard_pseudo_label, label_smoothing=LABEL_SMOOTHING)

    _scaled(s_loss, s_scaler).backward()
    _port_step(s_opt, s_scaler)

    # L_new on the labeled batch alone, then the port's feedback (new - old) and the teacher's step.
    with autocast:
        with torch.no_grad():
            s_logits_l = student(x_l)
        s_loss_l_new = F.cross_entropy(s_logits_l.detach().float(), y_l)
        dot_product = s_loss_l_new - s_loss_l_old
        hard_pseudo_label_us = t_logits_us.detach().argmax(dim=-1)
        t_loss_mpl = dot_product * F.cross_entropy(t_logits_us, hard_pseudo_label_us)
        t_loss = t_loss_uda + t_loss_mpl

    _scaled(t_loss, t_scaler).backward()
    _port_step(t_opt, t_scaler)
    teacher.zero_grad()
    student.zero_grad()
    return {"s_loss": s_loss.item(), "t_loss": t_loss.item(), "t_loss_l": t_loss_l.item(),
            "t_loss_u": t_loss_u.item(), "t_loss_mpl": t_loss_mpl.item(), "mask": mask.mean().item()}  # fmt: skip


def _scaled(loss, scaler):
    return scaler.scale(loss) if scaler is not None else loss


def _port_step(optimizer, scaler) -> None:
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
