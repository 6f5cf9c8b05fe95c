"""``--method mpl``: Meta Pseudo Labels (Pham et al., CVPR 2021): an image teacher and a student, one
``metapl.core.mpl_update`` per step (the student learns on the teacher's pseudo labels, the teacher on its labeled loss,
UDA and the student's feedback), then the student finetuned on the labels."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from metapl.methods.by_name import register
from metapl.methods.method import Idle, Method

if TYPE_CHECKING:
    from torch import Tensor

    from metapl.training.setup import Run

REDUCED_ONLY = Idle("only Reduced MPL trains a reduced teacher", "reduced-mpl")


class MPL(Method):
    """The paper's method; the reduced methods (``reduced_mpl``, ``distill``) run the same step."""

    name = "mpl"
    label = "Meta Pseudo Labels"
    help = "mpl"
    unlabeled = True
    waits_for_teacher = True
    finetunes = True
    auto_validation = True
    default_uda_weight = 1.0
    trains_teacher = True
    evaluated_roles: ClassVar[tuple[str, ...]] = ("teacher", "student")
    # At budgets of 300 to 3,000 steps the teacher led its own students on validation images in most cells, and
    # finetuning lifted the student above its EMA in all but one (benchmarks.defaults_sweep).
    result_rule: ClassVar[tuple[str, ...]] = ("teacher", "finetuned", "ema", "student")
    idle = {"reduced_hidden": REDUCED_ONLY}

    def step(self, run: Run, labeled: tuple[Tensor, ...], unlabeled: tuple[Tensor, ...] | None) -> dict[str, Tensor]:
        """One ``mpl_update`` of the teacher (not of a fixed one) and the student; the trained teacher's schedule
        steps."""
        from metapl.core import Batch, linear_ramp, mpl_update

        cfg = run.cfg
        x_l, y_l, *t_x_l = labeled
        assert unlabeled is not None  # the method reads unlabeled batches (Method.unlabeled)
        x_uw, x_us, y_u, *t_x_u = unlabeled
        # Reduced MPL: the teacher reads the large teacher's stored prediction of each image, the same for both views.
        t_x = (t_x_l[0], t_x_u[0], t_x_u[0]) if t_x_l else (None, None, None)
        batch = Batch(x_l, y_l, x_uw, x_us, y_u, *t_x)
        uda_weight = linear_ramp(run.step, value=cfg.planned_uda_weight(), ramp_steps=cfg.schedule().uda_steps)
        metrics = mpl_update(
            run.teacher,
            run.student,
            run.t_opt if self.trains_teacher else None,
            run.s_opt,
            batch,
            cfg.mpl_config(),
            run.state,
            uda_weight=uda_weight,
            amp_dtype=run.amp_dtype,
            t_scaler=run.t_scaler,
            s_scaler=run.s_scaler,
            check_finite=False,  # no sync per step: the loop checks the weights when it syncs (TrainingDiverged)
        )
        if self.trains_teacher:  # a fixed teacher takes no optimizer step, so its schedule has nothing to follow
            run.t_sched.step()
        return metrics


register(MPL())
