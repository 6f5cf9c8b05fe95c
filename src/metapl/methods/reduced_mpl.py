"""``--method reduced-mpl``: Reduced Meta Pseudo Labels (the paper's Appendix E). The large teacher (``--teacher``
started from ``--teacher-weights``) predicts every image once (``metapl.methods.large_teacher``) and is dropped; a small
reduced teacher (``metapl.models.reduced.ReducedTeacher``) over those predictions learns with the student by the usual
MPL step.

The reduced teacher reads one stored prediction per image, the same for the weak and the strong view, so UDA cannot
apply to it: ``--uda-weight`` is refused, and its default is 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from metapl.errors import UserError
from metapl.methods.by_name import register
from metapl.methods.meta_pseudo_labels import MPL
from metapl.methods.method import TeacherBuild

if TYPE_CHECKING:
    from metapl.config.fields import TrainConfig
    from metapl.training.setup import ModelStart, Run


class ReducedMPL(MPL):
    """Reduced MPL: MPL's step with a reduced teacher over a large teacher's stored predictions."""

    name = "reduced-mpl"
    label = "Reduced MPL"
    help = (
        "reduced-mpl: Reduced Meta Pseudo Labels (the paper's appendix E): --teacher with --teacher-weights (trained "
        "on your classes) is the large teacher, run once over the images, and a small reduced teacher over its "
        "predictions learns with the student"
    )
    default_uda_weight = 0.0
    image_teacher = False
    evaluated_roles = ("student",)  # the reduced teacher reads predictions: scored by extra_accuracies
    # Finetuning on the labels cost these students 1.2 to 4.8 points (benchmarks/README.md, section 8): none unless
    # asked (--finetune-steps N), and then handed back only where validation images show it better.
    finetunes = False
    result_rule = ("ema", "student", "finetuned")
    idle = {}

    def check(self, cfg: TrainConfig) -> None:
        """A large teacher's weights are needed; UDA is refused (see the module docstring)."""
        if not cfg.teacher_weights:
            # A library's pretrained head predicts the library's classes, not the data's: it is no teacher here.
            raise UserError(
                f"--method {self.name} distils a large teacher trained on your classes, but --teacher {cfg.teacher} "
                "has no such weights; pass --teacher-weights PATH (a metapl run or a weights file; train one first, "
                "e.g. with --method supervised and --pretrained student)"
            )
        if cfg.uda_weight:
            raise UserError(
                f"--uda-weight {cfg.uda_weight} does not apply to --method {self.name}: the reduced teacher reads "
                "one stored prediction per image, the same for both views; drop --uda-weight (or set it to 0)"
            )

    def adopt(self, values: dict, defaults: dict) -> dict:
        """A recipe switched to a reduced method: UDA off (weight 0; its other options are then idle)."""
        return {**values, "uda_weight": 0.0}

    def build_teacher(self, start: ModelStart) -> TeacherBuild:
        """The large teacher's predictions (made once, or read from the cache), and a reduced teacher over them."""
        from metapl.methods.large_teacher import large_teacher_predictions
        from metapl.models.reduced import ReducedTeacher

        cfg = start.cfg
        predictions = large_teacher_predictions(start)
        teacher = ReducedTeacher(start.data.num_classes, hidden=cfg.reduced_hidden)
        return TeacherBuild(teacher, f"reduced teacher over {cfg.teacher}'s predictions", predictions)

    def extra_accuracies(self, run: Run) -> dict[str, float]:
        """The reduced teacher's accuracy over the stored predictions of the test (and validation) images."""
        from metapl.core import unwrap
        from metapl.methods.large_teacher import reduced_teacher_accuracy

        teacher = unwrap(run.teacher)
        assert run.predictions is not None  # build_teacher made them
        return reduced_teacher_accuracy(teacher, run.predictions, run.data, run.split, run.device, run.cfg.eval_limit)

    def extra_summary(self, run: Run) -> dict:
        """The large teacher's own test accuracy."""
        assert run.predictions is not None  # build_teacher made them
        return {"large_teacher_acc": run.predictions.test_accuracy(run.data.test.labels)}


register(ReducedMPL())
