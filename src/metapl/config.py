"""The trainer's hyper-parameters: one frozen dataclass, YAML defaults, command-line overrides.

Precedence, lowest first: the dataclass defaults, the ``--config`` YAML file, the command-line flags. The resolved
config is written as ``config.yaml`` into every run directory, and ``--resume`` reads it back from there.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from metapl.core import MPLConfig
from metapl.errors import UserError

CHOICES = {
    "method": ("mpl", "supervised"),
    "mode": ("hard", "soft"),
    "feedback": ("taylor", "dot", "cosine"),
    "feedback_sign": ("derived", "reversed"),
    "pseudo_label": ("argmax", "sample"),
    "label_view": ("weak", "strong"),
    "teacher_batch": ("split", "joint"),
    "unlabeled": ("all", "rest"),
    "labeled_aug": ("weak", "strong"),
    "amp": ("none", "bf16", "fp16"),
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``metapl train`` needs. Field names are the YAML keys; ``--field-name`` sets them on the CLI."""

    # Data
    dataset: str = "digits"  # digits | cifar10 | cifar100 | svhn | fashion-mnist | folder
    data_dir: str | None = None  # a root, an ImageFolder tree or a .tar(.gz) of one
    download: bool = False  # let torchvision download cifar10/cifar100/svhn
    num_labeled: int = 100  # class-balanced labeled subset of the train split
    val_labeled: int = 0  # of those, hold out this many (class-balanced) as a validation set; 0 = none
    unlabeled: str = "all"  # all: the whole train split is unlabeled data (the paper); rest: only the others
    unlabeled_dir: str | None = None  # extra images without classes (folder or tar)
    image_size: int | None = None  # resize to this size; None keeps the data set's size
    expand_labels: bool = False  # repeat the labeled set so one labeled epoch spans eval_every steps
    cache_dir: str | None = None  # decoded-image cache; default $METAPL_CACHE_DIR or ~/.cache/metapl
    skip_corrupt: bool = False  # skip unreadable images with a warning instead of stopping
    hflip: bool | None = None  # horizontal flips in both views; None: the data set's default
    randaug_n: int = 2  # RandAugment: operations per image
    randaug_m: int = 10  # RandAugment: magnitude (torchvision scale, 0-30)
    cutout: int | None = None  # Cutout side in pixels; None: half the image size
    labeled_aug: str = "weak"  # labeled images' augmentation: weak (flip + crop) or strong (+ RandAugment, Cutout)
    workers: int = 2  # data-loader worker processes
    # Models
    teacher: str = "small_cnn"
    student: str = "small_cnn"
    teacher_dropout: float = 0.0
    student_dropout: float = 0.0
    # Optimisation
    method: str = "mpl"  # mpl, or supervised: the student trained on the labeled data alone (a baseline)
    steps: int = 1000
    batch_size: int = 32  # labeled images per step (per process)
    mu: int = 7  # unlabeled images per labeled image
    t_lr: float = 0.05
    s_lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4  # not applied to biases and normalisation weights
    t_warmup_steps: int = 0
    s_wait_steps: int = 0  # student learning rate 0 (and its work skipped) for these first steps
    s_warmup_steps: int = 0
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    ema: float = 0.995  # EMA decay of the student's weights; 0 = no EMA
    # Meta Pseudo Labels (see metapl.core.MPLConfig and docs/algorithm.md)
    mode: str = "hard"
    feedback: str = "taylor"
    feedback_sign: str = "derived"
    pseudo_label: str = "argmax"
    label_view: str = "weak"
    teacher_batch: str = "split"
    soft_temperature: float = 1.0
    mpl_weight: float = 1.0
    baseline_decay: float = 0.0
    label_smoothing: float = 0.0
    uda_weight: float = 0.0  # weight of the teacher's UDA loss; 0 = no UDA
    uda_steps: int = 0  # linear ramp-up of uda_weight
    uda_temperature: float = 0.7
    uda_threshold: float = 0.6
    # Student finetuning on the labeled data after MPL (the paper's last phase)
    finetune_steps: int = 0
    finetune_lr: float = 0.01
    finetune_batch_size: int = 32
    # Run
    out: str = "runs/mpl"
    seed: int = 0
    eval_every: int = 100
    log_every: int = 10
    save_every: int = 500
    eval_batch_size: int = 512
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "none"  # none | bf16 | fp16 (fp16 on CUDA only)
    channels_last: bool = False
    compile: bool = False  # torch.compile both models
    deterministic: bool = False  # torch.use_deterministic_algorithms (bit-exact resume on CPU)
    sync_bn: bool = False  # SyncBatchNorm under DDP (CUDA only; refused on the CPU)
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"--{_flag(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        positive = ["steps", "batch_size", "mu", "eval_every", "log_every", "save_every", "eval_batch_size"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{_flag(name)} must be a positive integer, got {getattr(self, name)}")
        if self.num_labeled <= 0:
            raise UserError(f"--num-labeled must be positive, got {self.num_labeled}")
        if not 0.0 <= self.ema < 1.0:
            raise UserError(f"--ema must be in [0, 1) (0 turns EMA off), got {self.ema}")
        if self.val_labeled < 0:
            raise UserError(f"--val-labeled must be >= 0, got {self.val_labeled}")
        if self.workers < 0:
            raise UserError(f"--workers must be >= 0, got {self.workers}")
        if self.amp == "fp16" and self.mode == "soft":
            raise UserError("--amp fp16 does not work with --mode soft (second-order gradients); use --amp bf16")

    def mpl_config(self) -> MPLConfig:
        """The core's view of these settings."""
        return MPLConfig(
            mode=self.mode, feedback=self.feedback, feedback_sign=self.feedback_sign,
            pseudo_label=self.pseudo_label, label_view=self.label_view, teacher_batch=self.teacher_batch,
            soft_temperature=self.soft_temperature,
            mpl_weight=self.mpl_weight, baseline_decay=self.baseline_decay, label_smoothing=self.label_smoothing,
            uda_temperature=self.uda_temperature, uda_threshold=self.uda_threshold, grad_clip=self.grad_clip,
        )  # fmt: skip

    def to_dict(self) -> dict:
        """Plain dict, for YAML and checkpoints."""
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _field_types() -> dict[str, tuple[type, bool]]:
    """Field name -> (base type, optional)."""
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for f in fields(TrainConfig):
        tp = hints[f.name]
        args = typing.get_args(tp)
        if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
            base = next(a for a in args if a is not type(None))
            out[f.name] = (base, True)
        else:
            out[f.name] = (tp, False)
    return out


def _coerce(name: str, value, source: str):
    base, optional = _field_types()[name]
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise UserError(f"{source}: {name} cannot be empty; give a {base.__name__}")
    if base is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise UserError(f"{source}: {name} must be true or false, got {value!r}")
    try:
        if base is int:
            number = float(value)
            if not number.is_integer():
                raise ValueError
            return int(number)
        return base(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}: {name} must be a {base.__name__}, got {value!r}") from None


def load_yaml(path: str | Path) -> dict:
    """Read a config file and check its keys against ``TrainConfig``.

    Args:
        path: a YAML mapping of field names (``num_labeled`` or ``num-labeled``) to values.

    Returns:
        The mapping with canonical names and coerced values.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found; pass an existing YAML file to --config")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise UserError(f"config file {path} is not valid YAML{where}; fix its syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must be a mapping of option: value")
    names = [f.name for f in fields(TrainConfig)]
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see metapl train --help for the keys"
            raise UserError(f"unknown key {key!r} in config file {path}{hint}")
        out[name] = _coerce(name, value, f"config file {path}")
    return out


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per ``TrainConfig`` field; flags default to "not given"."""
    parser.add_argument("--config", help="YAML file of defaults; flags on the command line win")
    defaults = TrainConfig()
    for name, (base, _optional) in _field_types().items():
        flag = "--" + _flag(name)
        default = getattr(defaults, name)
        if base is bool:
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                help=f"(default: {default})",
            )  # fmt: skip
        else:
            kwargs = {"choices": CHOICES[name]} if name in CHOICES else {}
            parser.add_argument(
                flag, dest=name, default=argparse.SUPPRESS, metavar=base.__name__.upper(),
                help=f"(default: {default})", **kwargs,
            )  # fmt: skip


def resolve(args: argparse.Namespace) -> TrainConfig:
    """Defaults < ``--config`` file < flags."""
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    for f in fields(TrainConfig):
        if hasattr(args, f.name):
            values[f.name] = _coerce(f.name, getattr(args, f.name), f"--{_flag(f.name)}")
    return TrainConfig(**values)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_dict(values: dict) -> TrainConfig:
    """A ``TrainConfig`` from a saved dict, ignoring keys this version no longer knows."""
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in names})
