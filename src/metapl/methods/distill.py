"""``--method distill``: Reduced MPL's control. The same large teacher's stored predictions and the same reduced
teacher, fixed at its initialisation (the identity map): the student learns on the large teacher's predictions alone
(plain distillation), and the teacher takes no step and no feedback."""

from __future__ import annotations

from metapl.methods.by_name import register
from metapl.methods.meta_pseudo_labels import REDUCED_ONLY
from metapl.methods.method import Idle
from metapl.methods.reduced_mpl import ReducedMPL

_FIXED = Idle("distill's teacher is fixed: it takes no feedback", "reduced-mpl")


class Distill(ReducedMPL):
    """Reduced MPL with the reduced teacher fixed: ``mpl_update`` gets no teacher optimizer."""

    name = "distill"
    label = "distillation"
    help = (
        "distill: the same with the reduced teacher fixed at the identity (plain distillation; reduced-mpl's control)"
    )
    trains_teacher = False
    idle = {
        "reduced_hidden": REDUCED_ONLY,
        **{name: _FIXED for name in ("feedback", "feedback_sign", "mpl_weight", "baseline_decay")},
    }


register(Distill())
