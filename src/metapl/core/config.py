"""``MPLConfig``: the hyper-parameters of one Meta Pseudo Labels update, each declared once with its help and range.

Pure Python (no torch), so that the trainer's config and the ``metapl`` command line can declare their flags from
these fields without importing torch (``metapl --help`` stays fast). ``metapl.core.mpl`` re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from metapl.core.options import check_options, option, specs

# Options that ``mpl_update`` reads in one mode only: (option, the mode that reads it, why the other mode does not).
# A value other than the default in the other mode would be silently ignored, so it is refused instead.
MODE_ONLY = (
    ("feedback", "hard", "soft mode has the exact meta-gradient, no estimator of h"),
    ("baseline_decay", "hard", "soft mode has no h to subtract a baseline from"),
    ("pseudo_label", "hard", "soft mode's pseudo labels are the whole distribution"),
    ("teacher_batch", "hard", "soft mode always runs one joint teacher forward"),
    ("soft_temperature", "soft", "hard pseudo labels are the argmax or a sample"),
)


@dataclass(frozen=True)
class MPLConfig:
    """Hyper-parameters of one MPL update. Each disputed choice of the public releases is a named option.

    Each field is declared once, with its help text and allowed range (``metapl.core.options``); ``__post_init__``
    checks every value against its declaration and raises ValueError. The trainer's ``TrainConfig`` inherits these
    fields, so each is also a ``metapl train`` flag (``--soft-temperature``) and a YAML key (``soft_temperature``), with
    the help below as its ``--help`` line. Why the defaults: ``docs/algorithm.md``.
    """

    mode: Literal["hard", "soft"] = option(
        "hard", "hard pseudo labels with REINFORCE feedback, or soft labels with the exact meta-gradient (second order)"
    )
    feedback: Literal["taylor", "dot", "cosine"] = option(
        "taylor",
        "hard mode's estimator of the feedback h: taylor (L_l before minus after the student's step; one extra "
        "no-grad labeled forward), dot (the student's lr times the dot product of the two gradients; one extra labeled "
        "backward) or cosine (the cosine similarity of the same gradients, bounded in [-1, 1]; Appendix A allows it in "
        "place of the raw product, whose scale (~1e-3) makes the MPL term negligible)",
    )
    feedback_sign: Literal["derived", "reversed"] = option(
        "derived",
        "derived: h > 0 when the student's step lowered its labeled loss (the teacher then makes its pseudo labels "
        "more likely); reversed: the sign of the official release and the most-used PyTorch port",
    )
    pseudo_label: Literal["argmax", "sample"] = option(
        "argmax", "hard pseudo labels by argmax of the teacher's distribution, or sampled from it"
    )
    label_view: Literal["weak", "strong"] = option(
        "weak",
        "the unlabeled view the teacher labels: weak (clean labels, as UDA) or strong (the paper's derivation, the "
        "same view for both models)",
    )
    student_view: Literal["strong", "weak"] = option(
        "strong",
        "the unlabeled view the student learns from: strong (the paper: the student is noised) or weak (the view the "
        "teacher labels: the student without its noise, an ablation)",
    )
    teacher_batch: Literal["joint", "split"] = option(
        "joint",
        "joint: one teacher forward over labeled, weak and strong images, so BatchNorm normalises them as one batch "
        "(as UDA's and FixMatch's releases do; soft mode always does); split: the weak view goes through the teacher "
        "in its own no-grad forward (less memory and compute)",
    )
    soft_temperature: float = option(1.0, "temperature of the teacher's distribution in soft mode", gt=0)
    mpl_weight: float = option(
        1.0, "weight of the teacher's MPL term; 0 turns it off (a UDA teacher distilled into the student)", ge=0
    )
    baseline_decay: float = option(
        0.0, "rate of the moving-average baseline subtracted from h (official release: 0.01); 0 = off", ge=0, le=1
    )
    label_smoothing: float = option(
        0.0,
        "label smoothing of the teacher's labeled cross-entropy (the trainer also applies it to the student's labeled "
        "steps: --method supervised, fixmatch and finetuning)",
        ge=0,
        lt=1,
    )
    uda_temperature: float = option(0.7, "sharpening temperature of UDA's target distribution", gt=0)
    uda_threshold: float = option(
        0.6, "UDA's confidence threshold: unlabeled images below it add no consistency loss", ge=0, le=1
    )
    grad_clip: float = option(0.0, "max global gradient norm for both models; 0 = no clipping", ge=0)

    def __post_init__(self) -> None:
        check_options(self)
        self._refuse_ignored()

    def _refuse_ignored(self) -> None:
        """Raise ValueError, naming the field, for a value that ``mpl_update`` would ignore in this ``mode``."""
        defaults = specs(MPLConfig)
        for name, mode, why in MODE_ONLY:
            value, default = getattr(self, name), defaults[name].default
            if self.mode != mode and value != default:
                raise ValueError(
                    f"MPLConfig.{name}={value!r} does nothing with mode={self.mode!r} ({why}); leave {name} at its "
                    f"default {default!r} or use mode={mode!r}"
                )
