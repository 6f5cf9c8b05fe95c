"""The library's own update, built in one place for every timing benchmark: no benchmark writes an MPL step.

Every step here is ``metapl.core.mpl_update`` (hard or soft; soft runs ``metapl.core.soft``) with optimizers from
``metapl.training.optimizers.make_sgd``, the ones the trainer builds, on synthetic batches (no data loading):

* ``hard-taylor``, ``hard-dot``, ``soft``: with the CIFAR recipe's losses (``build``).
* ``ideal``: the passes a hard update cannot avoid (``IDEAL``), each a callable timed alone: a floor to compare the
  update with, not an update.
* ``distill``, ``reduced-taylor``, ``reduced-dot``, ``reduced-cosine``: Reduced MPL (``mpl_update`` with a
  ``ReducedTeacher`` reading stored log-probabilities, ``Batch.t_x_*``) and its control, a fixed teacher; no image
  teacher exists in these variants (the large teacher predicted beforehand), and no UDA (it does not apply there).

* ``config_step``: a shipped config's update as the trainer builds it (models, optimizers, MPL settings, EMA).
* ``small_update``: the hard update of two ``small_cnn`` models fed real loader batches (loader and augmentation
  benchmarks).

Every builder makes fresh models, optimizers and a synthetic batch; ``build`` returns name -> zero-argument callable.
The naive re-implementation of a public port's step that earlier revisions timed here is retired (see the report).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metapl.core import Batch, MPLConfig, MPLState, feedback_mode, mpl_update
from metapl.models import create_model
from metapl.models.reduced import ReducedTeacher
from metapl.training.optimizers import make_sgd

SHAPES = {"paper": (64, 7), "cpu": (32, 7), "recipe": (16, 4), "tiny": (2, 1)}  # (B labeled, μ); recipe: CPU configs
REDUCED_VARIANTS = {"distill": None, "reduced-taylor": "taylor", "reduced-dot": "dot", "reduced-cosine": "cosine"}
VARIANTS = ("hard-taylor", "hard-dot", "soft", "ideal", *REDUCED_VARIANTS)
MPL_VARIANTS = {"hard-taylor": ("hard", "taylor"), "hard-dot": ("hard", "dot"), "soft": ("soft", "taylor")}
NUM_CLASSES, IMAGE_SIZE, DROPOUT = 10, 32, 0.2
# The CIFAR recipe's settings (src/metapl/configs/cifar10_4k.yaml).
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
    mode, feedback = MPL_VARIANTS[variant]
    config = MPLConfig(
        mode=mode,
        feedback=feedback,
        # The split teacher forward every recorded figure was timed with (joint became the default later, issue 26).
        **({"teacher_batch": "split"} if mode == "hard" else {}),
        label_smoothing=LABEL_SMOOTHING,
        uda_temperature=UDA_TEMPERATURE,
        uda_threshold=UDA_THRESHOLD,
    )
    t_opt, s_opt = (_sgd(m, device) for m in (teacher, student))
    state = MPLState()
    return {
        variant: lambda: mpl_update(
            teacher,
            student,
            t_opt,
            s_opt,
            batch,
            config,
            state,
            uda_weight=UDA_WEIGHT,
            amp_dtype=amp,
            t_scaler=scalers[0],
            s_scaler=scalers[1],
            check_finite=False,
        )
    }


def _reduced(variant: str, student, batch: Batch, device: torch.device) -> dict:
    """A Reduced MPL step (or, for ``distill``, its fixed-teacher control) over stored log-probabilities."""
    g = torch.Generator().manual_seed(0)
    stored = [
        torch.log_softmax(3 * torch.randn(n, NUM_CLASSES, generator=g), 1).to(device)
        for n in (batch.x_l.shape[0], batch.x_uw.shape[0])
    ]
    batch = batch._replace(t_x_l=stored[0], t_x_uw=stored[1], t_x_us=stored[1])
    teacher = ReducedTeacher(NUM_CLASSES).to(device)
    feedback = REDUCED_VARIANTS[variant]
    config = MPLConfig(feedback=feedback or "taylor", teacher_batch="split", label_smoothing=LABEL_SMOOTHING)
    t_opt = None if feedback is None else _sgd(teacher, device)
    s_opt, state = _sgd(student, device), MPLState()
    return {variant: lambda: mpl_update(teacher, student, t_opt, s_opt, batch, config, state, check_finite=False)}


def _sgd(model, device: torch.device) -> torch.optim.SGD:
    return make_sgd(model, lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY, device=device)


# ----------------------------------------------------------------------------------------------------------------
# The floor: the passes alone


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


# ----------------------------------------------------------------------------------------------------------------
# A shipped config's update, and the small update the data benchmarks feed


def config_step(cfg, shape: dict, device: torch.device):
    """A config's models, optimizers and one synthetic batch as the trainer builds them; returns ``(step, info)``.

    Args:
        cfg: a ``TrainConfig``.
        shape: ``{"classes", "channels", "size", "batch", "mu"}``.
        device: where to run.

    Returns:
        A zero-argument callable running one ``mpl_update`` plus the EMA update, and the parameter counts.
    """
    from metapl.core import ModelEMA
    from metapl.models import count_parameters
    from metapl.training.process import amp_dtype

    torch.manual_seed(cfg.seed)
    fmt = torch.channels_last if cfg.channels_last and device.type == "cuda" else torch.preserve_format
    kw = dict(num_classes=shape["classes"], in_channels=shape["channels"], image_size=shape["size"])
    teacher = create_model(cfg.teacher, dropout=cfg.teacher_dropout, **kw).to(device, memory_format=fmt)
    student = create_model(cfg.student, dropout=cfg.student_dropout, **kw).to(device, memory_format=fmt)
    opt = dict(momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay, device=device)
    t_opt, s_opt = make_sgd(teacher, lr=cfg.t_lr, **opt), make_sgd(student, lr=cfg.s_lr, **opt)
    ema = ModelEMA(student, cfg.ema) if cfg.ema > 0 else None
    b, n_u, c, s = shape["batch"], shape["batch"] * shape["mu"], shape["channels"], shape["size"]

    def images(n: int) -> torch.Tensor:  # (n, C, S, S)
        return torch.randn(n, c, s, s, device=device).contiguous(memory_format=fmt)

    batch = Batch(images(b), torch.randint(shape["classes"], (b,), device=device), images(n_u), images(n_u))
    dtype = amp_dtype(cfg.amp, device) if device.type == "cuda" else None
    if dtype == torch.float16:
        raise SystemExit("fp16 needs GradScalers: measure with amp bf16 or none")
    mpl_cfg, state = cfg.mpl_config(), MPLState()

    def step() -> None:
        mpl_update(teacher, student, t_opt, s_opt, batch, mpl_cfg, state, uda_weight=cfg.uda_weight, amp_dtype=dtype)
        if ema is not None:
            ema.update(student)

    return step, {"teacher_params": count_parameters(teacher), "student_params": count_parameters(student)}


def small_update(channels: int, size: int, device: torch.device, classes: int = 10, model: str = "small_cnn"):
    """The hard update of two fresh models on batches given per call: ``step((x_l, y_l, x_uw, x_us, y_u))``.

    The data benchmarks' step: SGD as the trainer builds it (``make_sgd``; learning rate 0.05, Nesterov momentum 0.9,
    no weight decay) and the core's default hard-mode settings.
    """

    def make():
        net = create_model(model, num_classes=classes, in_channels=channels, image_size=size).to(device)
        return net, make_sgd(net, lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=0.0, device=device)

    (teacher, t_opt), (student, s_opt) = make(), make()
    config, state = MPLConfig(mode="hard", teacher_batch="split"), MPLState()
    return lambda parts: mpl_update(teacher, student, t_opt, s_opt, Batch(*parts), config, state)
