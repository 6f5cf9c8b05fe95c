"""``--method fixmatch``: FixMatch (Sohn et al., NeurIPS 2020), a one-network baseline. The student is the network: it
labels the weak view of the unlabeled images itself, keeps the labels it is confident of (``--fixmatch-threshold``
τ) and learns them on the strong view, beside its labeled cross-entropy (``metapl.core.fixmatch``, the paper's
Eq. 2-4). No teacher is trained or handed back; the EMA, the result, finetuning and export work as for the other
methods.

The teacher network is still built (and saved, untrained), as for the labels-only baseline: it is drawn first from the
seed, so the student starts from the same weights as in the other runs of the same seed (``metapl compare`` pairs
them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from metapl.methods.by_name import register
from metapl.methods.labels_only import MPL_OPTIONS, Supervised
from metapl.methods.meta_pseudo_labels import REDUCED_ONLY
from metapl.methods.method import Idle

if TYPE_CHECKING:
    from torch import Tensor

    from metapl.training.setup import Run

_ONE_NETWORK = Idle("FixMatch trains one network, the student, on its own pseudo labels", "mpl")


class FixMatch(Supervised):
    """FixMatch: the labels-only baseline's network and checks, with its own confident pseudo labels added."""

    name = "fixmatch"
    label = "FixMatch"
    help = (
        "fixmatch: FixMatch (Sohn et al. 2020), one network learning the labels and its own confident pseudo labels of "
        "the weak view on the strong view (a baseline)"
    )
    unlabeled = True
    own_options = ("fixmatch_threshold", "fixmatch_weight")
    idle = {"reduced_hidden": REDUCED_ONLY, **{name: _ONE_NETWORK for name in MPL_OPTIONS}}

    def step(self, run: Run, labeled: tuple[Tensor, ...], unlabeled: tuple[Tensor, ...] | None) -> dict[str, Tensor]:
        """``fixmatch_step`` of the student on the labeled batch and both views of the unlabeled one."""
        from metapl.core import fixmatch_step

        cfg = run.cfg
        x_l, y_l, *_ = labeled
        assert unlabeled is not None  # unlabeled = True: the phase hands them over
        x_uw, x_us, y_u, *_ = unlabeled
        return fixmatch_step(
            run.student,
            run.s_opt,
            x_l,
            y_l,
            x_uw,
            x_us,
            threshold=cfg.fixmatch_threshold,
            weight=cfg.fixmatch_weight,
            y_u=y_u,
            label_smoothing=cfg.label_smoothing,
            grad_clip=cfg.grad_clip,
            amp_dtype=run.amp_dtype,
            scaler=run.s_scaler,
        )


register(FixMatch())
