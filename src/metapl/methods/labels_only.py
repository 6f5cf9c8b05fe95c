"""``--method supervised``: the labels-only baseline. The student alone learns, by cross-entropy on the labeled
batch; no unlabeled images, no teacher step, no wait, no finetuning by default.

The teacher network is still built (and saved, untrained): it is drawn first from the seed, so the student starts
from the same weights as in the pseudo-label runs of the same seed and ``--teacher`` (``metapl compare`` pairs them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from metapl.errors import UserError
from metapl.methods.by_name import register
from metapl.methods.meta_pseudo_labels import REDUCED_ONLY
from metapl.methods.method import Idle, Method

if TYPE_CHECKING:
    from torch import Tensor

    from metapl.config.fields import TrainConfig
    from metapl.training.setup import Run

_ALONE = Idle("the labels-only baseline trains the student alone", "mpl")
# Options of the teacher's training and of the MPL update: none of them reaches the student here (nor FixMatch's).
MPL_OPTIONS = (
    *("mode", "feedback", "feedback_sign", "pseudo_label", "label_view", "student_view", "teacher_batch"),
    *("soft_temperature", "mpl_weight", "baseline_decay"),
    *("uda_weight", "uda_steps", "uda_temperature", "uda_threshold"),
    *("teacher_dropout", "t_lr", "t_warmup_steps"),
)


class Supervised(Method):
    """The labels-only baseline."""

    name = "supervised"
    label = "labels-only"
    help = "supervised: the student on the labeled data alone (a baseline)"
    idle = {"reduced_hidden": REDUCED_ONLY, **{name: _ALONE for name in MPL_OPTIONS}}

    def check(self, cfg: TrainConfig) -> None:
        """No teacher is trained: starting weights for it are refused."""
        if cfg.teacher_weights or cfg.pretrained in ("teacher", "both"):
            raise UserError(f"--method {self.name} trains no teacher; drop --teacher-weights / --pretrained teacher")

    def adopt(self, values: dict, defaults: dict) -> dict:
        """A recipe as the labels-only baseline: no teacher weights, a pretrained teacher dropped."""
        pretrained = values.get("pretrained", defaults["pretrained"])
        return {
            **values,
            "teacher_weights": None,
            "pretrained": {"both": "student", "teacher": "none"}.get(pretrained, pretrained),
        }

    def step(self, run: Run, labeled: tuple[Tensor, ...], unlabeled: tuple[Tensor, ...] | None) -> dict[str, Tensor]:
        """Cross-entropy of the student on the labeled batch, one optimizer step."""
        from metapl.core import supervised_step

        x_l, y_l, *_ = labeled
        cfg = run.cfg
        return supervised_step(
            run.student,
            run.s_opt,
            x_l,
            y_l,
            label_smoothing=cfg.label_smoothing,
            grad_clip=cfg.grad_clip,
            amp_dtype=run.amp_dtype,
            scaler=run.s_scaler,
        )


register(Supervised())
