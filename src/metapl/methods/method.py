"""What a training method is: one object that the config, the trainer and the commands ask, never its name.

A method declares, once: how its teacher is built, the update one training step runs, the networks it evaluates and
may hand back, the options it leaves idle (refused when given with it, dropped when a recipe is switched to it), and
its defaults (UDA weight, the student's wait, finetuning, the validation carve-out). ``metapl.methods.by_name`` holds
one instance per ``--method`` name.

Importing this module (and the method modules) does not import torch: ``metapl --help`` and the config layer read the
declarations; the behaviour imports the core and torch on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from torch import Tensor, nn

    from metapl.config.fields import TrainConfig
    from metapl.methods.large_teacher import TeacherPredictions
    from metapl.training.setup import ModelStart, Run


@dataclass(frozen=True)
class Idle:
    """An option that does nothing with this method: refused when it differs from its default.

    Attributes:
        why: the reason, in the refusal's parentheses.
        instead: the method the refusal suggests (``use --method <instead>``).
    """

    why: str
    instead: str


@dataclass(frozen=True)
class TeacherBuild:
    """What a method's ``build_teacher`` returns.

    Attributes:
        teacher: the run's teacher network, on the CPU.
        name: how the log names it (``wrn28_2``, ``reduced teacher over wrn28_2's predictions``).
        predictions: a large teacher's stored predictions (``metapl.methods.large_teacher``), or None.
    """

    teacher: nn.Module
    name: str
    predictions: TeacherPredictions | None = None


class Method:
    """The base of every method: the declarations' defaults (the most conservative: no unlabeled images, no trained
    teacher) and the behaviour most methods share. Each method module subclasses it;
    ``metapl.methods.meta_pseudo_labels`` is the paper's.
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""  # what a message calls its runs ("a labels-only run")
    help: ClassVar[str] = ""  # its part of --method's help line
    unlabeled: ClassVar[bool] = False  # trains on unlabeled images: the batches carry their weak and strong views
    waits_for_teacher: ClassVar[bool] = False  # the student's learning rate waits --s-wait-steps (default 10 %)
    finetunes: ClassVar[bool] = False  # --finetune-steps left unset is 10 % of --steps (else none)
    auto_validation: ClassVar[bool] = False  # the automatic validation carve-out applies (--val-labeled none)
    default_uda_weight: ClassVar[float] = 0.0  # --uda-weight left unset
    image_teacher: ClassVar[bool] = True  # the checkpoint's teacher is an image classifier of --teacher
    trains_teacher: ClassVar[bool] = False  # the teacher takes optimizer steps
    evaluated_roles: ClassVar[tuple[str, ...]] = ("student",)  # scored after each evaluation, the EMA besides
    # The run's result without validation images: the first of these among its candidates (metapl.rundir.result;
    # the measurements behind each order: docs/algorithm.md, "The model a run hands back").
    result_rule: ClassVar[tuple[str, ...]] = ("ema", "student")
    idle: ClassVar[dict[str, Idle]] = {}  # option -> why it does nothing here
    # Options that only this method reads: idle with every other method (metapl.config.rules.rules_for).
    own_options: ClassVar[tuple[str, ...]] = ()

    def check(self, cfg: TrainConfig) -> None:
        """Refuse what cannot work with this method beyond idle options (a ``UserError`` naming the fix)."""

    def adopt(self, values: dict, defaults: dict) -> dict:
        """A recipe's values switched to this method: its idle options back at their defaults (``row_config``, a
        saved config read back). ``config.rules.drop_idle`` applies the idle options; this hook adds the rest."""
        return values

    def build_teacher(self, start: ModelStart) -> TeacherBuild:
        """The run's teacher. ``start`` is the run's ``metapl.training.setup.ModelStart`` (``start.model(role)``)."""
        return TeacherBuild(start.model("teacher"), start.cfg.teacher)

    def step(self, run: Run, labeled: tuple[Tensor, ...], unlabeled: tuple[Tensor, ...] | None) -> dict[str, Tensor]:
        """One training step on the next batches (on the device); the named metrics, detached, not synchronised.

        Args:
            run: the ``metapl.training.setup.Run`` (models, optimizers, schedules, state, the step about to run).
            labeled: ``(x_l, y_l, *t_x_l)``: images (B, C, H, W), labels (B,), and a large teacher's predictions
                (B, K) for a method that has one.
            unlabeled: ``(x_uw, x_us, y_u, *t_x_u)`` when ``unlabeled``, else None.
        """
        raise NotImplementedError(f"method {self.name!r} declares no step")

    def evaluated_models(self, run: Run) -> dict[str, nn.Module]:
        """The networks scored after each evaluation: ``evaluated_roles`` and the EMA student, unwrapped."""
        from metapl.core import unwrap

        models = {"teacher": unwrap(run.teacher), "student": unwrap(run.student)}
        models = {role: m for role, m in models.items() if role in self.evaluated_roles}
        if run.ema is not None:
            models["ema"] = run.ema.module
        return models

    def extra_accuracies(self, run: Run) -> dict[str, float]:
        """Accuracies of networks that do not read images (a reduced teacher); none here."""
        return {}

    def extra_summary(self, run: Run) -> dict:
        """What ``summary.json`` adds for this method; nothing here."""
        return {}

    def candidates(self, teacher: str, student: str, roles: list[str]) -> list[str]:
        """The roles a run may hand back (``metapl.rundir.result``), among the scored ``roles``: the teacher only when
        it is a trained image classifier of the student's architecture (``teacher``, ``student``: their names), so a
        user who asked for a small student gets a small model back."""
        keep_teacher = self.trains_teacher and self.image_teacher and teacher == student
        return [r for r in roles if r != "teacher" or keep_teacher]

    def images_per_step(self, batch_size: int, mu: int) -> int:
        """Images one process reads per step: the labeled batch, and both views of the unlabeled ones."""
        return batch_size * (1 + 2 * mu if self.unlabeled else 1)
