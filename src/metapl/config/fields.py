"""The trainer's hyper-parameters: one frozen dataclass, YAML defaults, command-line flags, all from one declaration.

Design: ``TrainConfig`` is a frozen dataclass *subclass* of the core's ``MPLConfig``. Each MPL option is declared once,
in ``MPLConfig`` (with its help text and range, ``metapl.core.options.option``); the trainer's own options are declared
once below, the same way. Every field, inherited or not, is a constructor keyword (``TrainConfig(mode="soft",
uda_weight=1.0)``), a YAML key (``uda_weight``) and a flag (``--uda-weight``) whose ``--help`` line is built from the
field's help, range and default, and whose ``choices`` are the field's ``Literal`` type (``--method``: the registered
methods). A new ``MPLConfig`` field therefore reaches the flags, the YAML files and ``mpl_config()`` with no edit here.
One check (``check_options``) validates every field in ``__post_init__``: library calls, YAML files and flags all pass
through it; here it raises ``UserError`` naming the flag (``--t-lr``), in ``MPLConfig`` a ValueError naming
``MPLConfig.t_lr``.

Precedence, lowest first: the dataclass defaults, the ``--config`` YAML file, the command-line flags. The resolved
config is written as ``config.yaml`` into every run directory (grouped as in ``--help``: data, models, optimisation,
MPL, finetuning, run), and ``--resume`` reads it back from there. The flags: ``metapl.config.flags``; the rules between
options (idle options, resume): ``metapl.config.rules``; the methods' own declarations: ``metapl.methods``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Literal

import metapl.methods  # noqa: F401  (registers the methods: --method's choices)
from metapl.config.budget import (
    AUTO_VAL_MIN_PER_CLASS,
    EVALUATIONS_PER_RUN,
    MAX_EVAL_EVERY,
    STRONG_LABELED_PASSES,
    Schedule,
    fraction_text,
    labeled_views,
    plan_schedule,
)
from metapl.config.option_text import flag
from metapl.config.rules import drop_idle, refuse_idle
from metapl.core.config import MPLConfig
from metapl.core.options import check_options, option, specs
from metapl.errors import UserError
from metapl.methods.by_name import get_method, method_names, methods_help

_MPL_SECTION = "Meta Pseudo Labels (metapl.core.MPLConfig; docs/algorithm.md)"

# --help groups and the order of a saved config.yaml: each section starts at the named TrainConfig field and runs to the
# next one; MPLConfig's fields open the MPL section.
_SECTIONS = {
    "dataset": "data",
    "teacher": "models",
    "method": "optimisation",
    "uda_weight": _MPL_SECTION,
    "fixmatch_threshold": "FixMatch (--method fixmatch; metapl.core.fixmatch)",
    "finetune_steps": "student finetuning on the labeled data after MPL (the paper's last phase)",
    "out": "run",
}
FINETUNE_STEPS_IF_NONE = 1000  # metapl finetune's steps when neither --steps nor the run's plan gives any
_BATCH = 65536  # cap of every batch size: a sanity bound, far above what fits in memory per process


@dataclass(frozen=True, kw_only=True)
class TrainConfig(MPLConfig):
    """Everything ``metapl train`` needs: the fields of ``MPLConfig`` and the trainer's own, declared below."""

    dataset: str = option("digits", "data set: digits, cifar10, cifar100, svhn, fashion-mnist, folder or shards")
    data_dir: str | None = option(
        None,
        "a data root, an ImageFolder tree or a .tar(.gz) of one, or a folder (or glob) of .tar shards for "
        "--dataset shards (written by metapl shards); none: the default root",
    )
    download: bool = option(False, "let torchvision download cifar10, cifar100 or svhn into --data-dir")
    num_labeled: int = option(100, "size of the class-balanced labeled subset of the train split", ge=1)
    val_labeled: int | None = option(
        None,
        "of the labeled images, hold out this many (class-balanced) as validation images, which choose the model the "
        "run hands back; 0 = none; none: automatic (a tenth of each class's labels when every class has at least "
        f"{AUTO_VAL_MIN_PER_CLASS} and the run trains more than one model, else none)",
        ge=0,
    )
    unlabeled: Literal["all", "rest"] = option(
        "all", "all: the whole train split is unlabeled data (the paper); rest: only the images left unlabeled"
    )
    unlabeled_dir: str | None = option(None, "extra images without classes (a folder or a tar)")
    image_size: int | None = option(
        None, "resize images to this side, in pixels; none keeps the data set's size", ge=8, le=4096
    )
    data_path: Literal["auto", "cache", "stream"] = option(
        "auto",
        "cache: decode a folder once into the cache; stream: keep file paths and decode in the loader workers "
        "with random-resized crops (needs --image-size); auto: stream folders over 8 GiB decoded; shards always stream",
    )
    per_rank_shards: bool = option(
        False,
        "--dataset shards: each rank streams the unlabeled images of its own shards only (dealt round-robin by "
        "global rank), not a share of all of them; the labeled set stays global",
    )
    expand_labels: bool = option(False, "repeat the labeled set so that one labeled epoch spans --eval-every steps")
    cache_dir: str | None = option(None, "decoded-image cache; none: $METAPL_CACHE_DIR or ~/.cache/metapl")
    skip_corrupt: bool = option(
        False,
        "skip unreadable images with a warning instead of stopping (streamed folders and tar shards: every "
        "image is decoded once before training)",
    )
    hflip: bool | None = option(None, "horizontal flips in both views; none: the data set's default")
    randaug_n: int = option(2, "RandAugment: operations per image", ge=0, le=14)
    randaug_m: int = option(10, "RandAugment: magnitude, on torchvision's 0-30 scale", ge=0, le=30)
    cutout: int | None = option(
        None,
        "side of the Cutout square, in pixels, at most the image size; 0 = off; none: half the image size",
        ge=0,
        le=4096,
    )
    labeled_aug: Literal["auto", "weak", "strong"] = option(
        "auto",
        "augmentation of the labeled images: weak (flip + crop) or strong (+ RandAugment and Cutout); auto: strong "
        f"when the run shows each labeled image at least {STRONG_LABELED_PASSES} times (--steps x --batch-size / "
        "labeled images), else weak",
    )
    workers: int | None = option(
        None,
        "data-loader worker processes; 0 loads in the training process; none: chosen from the free cores",
        ge=0,
        le=256,
    )
    threads: int | None = option(
        None,
        "intra-op threads of the training process; none: $OMP_NUM_THREADS, else chosen from the free cores",
        ge=1,
        le=1024,
    )
    augment_on: Literal["loader", "device"] = option(
        "loader",
        "where the views are augmented: loader (per image with Pillow, in the workers) or device (whole "
        "batches on --device; the workers only copy uint8 images)",
    )

    teacher: str = option(
        "small_cnn", "teacher network: a registered name (small_cnn, wrn28_2, ...), tv:NAME, timm:NAME"
    )
    student: str = option("small_cnn", "student network, named as --teacher")
    imports: str | None = option(
        None,
        "Python modules to import before the models are built (comma-separated, e.g. mypkg.models): they "
        "register your own models with metapl.models.register_model; recorded in the run, so eval, predict, "
        "finetune and export import them again (also --import)",
    )
    teacher_dropout: float = option(0.0, "dropout before the teacher's classifier", ge=0, lt=1)
    student_dropout: float = option(0.0, "dropout before the student's classifier", ge=0, lt=1)
    pretrained: Literal["none", "teacher", "student", "both"] = option(
        "none",
        "start these models from their library's pretrained weights (torchvision: the torch hub cache; timm: "
        "the Hugging Face cache); a head of another class count is replaced",
    )
    teacher_weights: str | None = option(
        None,
        "start the teacher from these weights: a metapl run folder (its finetuned or EMA student), a checkpoint "
        "(.pt; add :student, :ema or :teacher to pick the network), a state_dict file or a .safetensors file",
    )
    student_weights: str | None = option(None, "start the student from these weights, given as --teacher-weights")
    reduced_hidden: int = option(
        64,
        "--method reduced-mpl: hidden units of the reduced teacher, a small network over the large teacher's "
        "predicted distribution",
        ge=1,
        le=65536,
    )

    method: str = option("mpl", methods_help(), choices=method_names())
    steps: int = option(1000, "training steps (one teacher and one student update each)", ge=1)
    batch_size: int = option(32, "labeled images per step, per process", ge=1, le=_BATCH)
    mu: int = option(7, "unlabeled images per labeled image in a step", ge=1, le=1024)
    t_lr: float = option(0.05, "teacher's peak learning rate (warmup, then cosine decay); 0 freezes the teacher", ge=0)
    s_lr: float = option(0.05, "student's peak learning rate (wait, warmup, then cosine decay)", gt=0)
    momentum: float = option(0.9, "SGD momentum of both models", ge=0, lt=1)
    nesterov: bool = option(True, "Nesterov momentum (ignored when --momentum is 0)")
    weight_decay: float = option(5e-4, "SGD weight decay, not applied to biases and normalisation weights", ge=0, lt=1)
    t_warmup_steps: int | None = option(
        None, f"teacher's linear learning-rate warmup, in steps; none: {fraction_text('t_warmup_steps')}", ge=0
    )
    s_wait_steps: int | None = option(
        None,
        "student's learning rate is 0 (and its work skipped) for these first steps while the teacher learns; none: "
        f"{fraction_text('s_wait_steps')} (0 for the methods without a teacher: supervised, fixmatch)",
        ge=0,
    )
    s_warmup_steps: int | None = option(
        None,
        f"student's linear learning-rate warmup after the wait, in steps; none: {fraction_text('s_warmup_steps')}",
        ge=0,
    )
    ema: float = option(
        0.995,
        "EMA decay of the student's weights, per step, reached after a warm-up (min(decay, (t+1)/(t+10)) at step t, "
        "as the official release); 0 = no EMA",
        ge=0,
        lt=1,
    )

    uda_weight: float | None = option(
        None,
        "weight of the teacher's UDA consistency loss; 0 = no UDA; none: 1 for --method mpl, 0 otherwise (a "
        "reduced teacher reads one stored prediction per image, the same for both views: UDA cannot apply)",
        ge=0,
    )
    uda_steps: int | None = option(
        None,
        f"linear ramp-up of --uda-weight from 0, in steps; 0 = full weight at once; none: {fraction_text('uda_steps')}",
        ge=0,
    )

    fixmatch_threshold: float = option(
        0.95,
        "--method fixmatch: the confidence (max probability on the weak view) an unlabeled image needs for its "
        "pseudo label to count (the paper's tau)",
        ge=0,
        le=1,
    )
    fixmatch_weight: float = option(
        1.0, "--method fixmatch: weight of the unlabeled loss beside the labeled one (the paper's lambda_u)", ge=0
    )

    finetune_steps: int | None = option(
        None,
        f"student finetuning steps after MPL; 0 = none; none: {fraction_text('finetune_steps')} (none for --method "
        "supervised or fixmatch); the finetuned student is handed back only where validation images show it better",
        ge=0,
    )
    finetune_lr: float = option(0.01, "finetuning learning rate (constant)", gt=0)
    finetune_batch_size: int = option(32, "labeled images per finetuning step", ge=1, le=_BATCH)

    out: str = option("runs/mpl", "run directory: config, split, metrics, checkpoints")
    seed: int = option(0, "seed of the labeled split, the initialisation and the data order", ge=0, le=2**32 - 1)
    eval_every: int | None = option(
        None,
        f"evaluate on the test (and validation) images every this many steps; none: {EVALUATIONS_PER_RUN} times a run, "
        f"at most every {MAX_EVAL_EVERY} steps",
        ge=1,
    )
    log_every: int = option(10, "log training metrics every this many steps", ge=1)
    save_every: int | None = option(
        None, "write a checkpoint every this many steps; none: every second evaluation", ge=1
    )
    eval_batch_size: int = option(512, "images per evaluation batch", ge=1, le=_BATCH)
    eval_limit: int | None = option(
        None, "evaluate on the first N test (and validation) images only, for quick checks; none: all", ge=1
    )
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    amp: Literal["none", "bf16", "fp16"] = option("none", "mixed precision: none, bf16, or fp16 (CUDA only)")
    channels_last: bool = option(False, "channels-last memory format (faster convolutions on recent GPUs)")
    compile: bool = option(False, "torch.compile both models")
    deterministic: bool = option(False, "torch.use_deterministic_algorithms (bit-exact resume on the CPU)")
    sync_bn: bool = option(False, "SyncBatchNorm under DDP (CUDA only; refused on the CPU)")
    tensorboard: bool = option(True, "write TensorBoard event files into the run directory")
    wandb: bool = option(
        False,
        'also log the metrics to Weights & Biases (pip install "metapl[wandb]"); a resumed run continues the '
        "same W&B run; WANDB_MODE=offline keeps it in RUN_DIR/wandb",
    )
    wandb_project: str | None = option(None, "W&B project of --wandb; none: $WANDB_PROJECT or W&B's default")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        check_options(self, UserError, lambda name: "--" + flag(name))
        if self.per_rank_shards and self.dataset != "shards":
            raise UserError("--per-rank-shards deals tar shards to ranks; use --dataset shards or drop the flag")
        if self.amp == "fp16" and self.mode == "soft":
            raise UserError("--amp fp16 does not work with --mode soft (second-order gradients); use --amp bf16")
        if self.cutout is not None and self.image_size is not None and self.cutout > self.image_size:
            raise UserError(
                f"--cutout {self.cutout} exceeds --image-size {self.image_size}; use at most the image size"
            )
        get_method(self.method).check(self)
        refuse_idle(dataclasses.asdict(self), _defaults())
        try:  # built (and checked beyond its fields' ranges) once per config, not once per training step
            mpl = MPLConfig(**{f.name: getattr(self, f.name) for f in fields(MPLConfig)})
        except ValueError as e:
            raise UserError(str(e)) from None
        object.__setattr__(self, "_mpl_config", mpl)  # frozen: not a field, so not in eq, repr, asdict or replace
        object.__setattr__(self, "_schedule", plan_schedule(self))

    def schedule(self) -> Schedule:
        """The run's step counts, resolved once in ``__post_init__`` (``metapl.config.budget.plan_schedule``)."""
        return self._schedule  # type: ignore[attr-defined]  # set by __post_init__, not a field

    def planned_labeled_aug(self, num_train_labels: int) -> str:
        """``labeled_aug`` with ``auto`` resolved for ``num_train_labels`` labeled training images
        (``metapl.config.budget.labeled_views``)."""
        return labeled_views(self, num_train_labels)

    def planned_uda_weight(self) -> float:
        """``uda_weight``, with its default resolved: the method's (1 for ``--method mpl``, 0 otherwise)."""
        if self.uda_weight is not None:
            return self.uda_weight
        return get_method(self.method).default_uda_weight

    def planned_finetune_steps(self) -> int:
        """``finetune_steps``, with its default resolved (``schedule()``): none after a labels-only run."""
        return self._schedule.finetune_steps  # type: ignore[attr-defined]  # as above

    def mpl_config(self) -> MPLConfig:
        """The core's view of these settings: the values of ``MPLConfig``'s fields, built once in ``__post_init__``
        (the training step asks for it every step)."""
        return self._mpl_config  # type: ignore[attr-defined]  # as above

    def to_dict(self) -> dict:
        """Plain dict, for YAML and checkpoints, in the order of ``--help``."""
        values = dataclasses.asdict(self)
        return {name: values[name] for _, names in sections() for name in names}


def sections() -> list[tuple[str, list[str]]]:
    """``TrainConfig``'s field names grouped as ``--help`` shows them: (title, names) per section."""
    mpl = [f.name for f in fields(MPLConfig)]
    out: list[tuple[str, list[str]]] = []
    for f in fields(TrainConfig):
        if f.name in _SECTIONS:
            title = _SECTIONS[f.name]
            out.append((title, list(mpl) if title == _MPL_SECTION else []))
        if f.name not in mpl:
            out[-1][1].append(f.name)
    return out


def config_from_dict(values: dict) -> TrainConfig:
    """A ``TrainConfig`` from saved or derived values (a run's ``config.yaml``, a recipe with a protocol's changes).

    Keys this version no longer knows are ignored, and options that do nothing with the others' values (idle options,
    ``metapl.config.rules``) fall back to their defaults: a recipe switched to another method, or a run saved by a
    version that kept them, reads as the same run.
    """
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**drop_idle({k: v for k, v in values.items() if k in names}, _defaults()))


def _defaults() -> dict:
    """Every ``TrainConfig`` option's default."""
    return {name: spec.default for name, spec in specs(TrainConfig).items()}
