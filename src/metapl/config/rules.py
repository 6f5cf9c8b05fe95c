"""Options that do nothing with the other options' values, refused in one line naming both flags.

Torch-free, as ``metapl.engine.config``, which checks every ``TrainConfig`` against these rules.
"""

from __future__ import annotations

from metapl.core.options import specs
from metapl.engine.option_text import flag, shown
from metapl.errors import UserError

# Options that do nothing unless another option has a value: (option, the option it needs, the values that make it
# count, in words, why). An option is refused only when its value differs from its default (so the user evidently
# asked for it). The first group is checked on every TrainConfig; the second ("flags") only for options given as
# command-line flags, because a recipe file (configs/*.yaml) or a library ``replace(recipe, method="supervised")`` is
# the normal way to run the labels-only baseline or the no-UDA ablation of the same recipe.
_IGNORED = (
    ("feedback", "mode", lambda m: m == "hard", "hard", "soft mode has the exact meta-gradient, no estimator of h"),
    ("baseline_decay", "mode", lambda m: m == "hard", "hard", "soft mode has no h to subtract a baseline from"),
    ("pseudo_label", "mode", lambda m: m == "hard", "hard", "soft mode's pseudo labels are the whole distribution"),
    ("teacher_batch", "mode", lambda m: m == "hard", "hard", "soft mode always runs one joint teacher forward"),
    ("soft_temperature", "mode", lambda m: m == "soft", "soft", "hard pseudo labels are the argmax or a sample"),
    (
        "reduced_hidden",
        "method",
        lambda m: m == "reduced-mpl",
        "reduced-mpl",
        "only Reduced MPL trains a reduced teacher",
    ),
    *(
        (name, "method", lambda m: m != "distill", "reduced-mpl", "distill's teacher is fixed: it takes no feedback")
        for name in ("feedback", "feedback_sign", "mpl_weight", "baseline_decay")
    ),
)
_FLAG_IGNORED = (
    tuple(
        (name, "method", lambda m: m != "supervised", "mpl", "the labels-only baseline trains the student alone")
        for name in (
            *("mode", "feedback", "feedback_sign", "pseudo_label", "label_view", "student_view", "teacher_batch"),
            *("soft_temperature", "mpl_weight", "baseline_decay"),
            *("uda_weight", "uda_steps", "uda_temperature", "uda_threshold"),
            *("teacher", "teacher_dropout", "t_lr", "t_warmup_steps"),
        )
    )
    + tuple(
        (name, "uda_weight", lambda w: w is None or w > 0, "a weight > 0", "UDA is off")
        for name in ("uda_steps", "uda_temperature", "uda_threshold")
    )
    + (("wandb_project", "wandb", bool, "", "no metrics go to Weights & Biases"),)
)


def refuse_ignored(cfg, given: set[str] | None = None) -> None:
    """Refuse an option that does nothing with the other options' values (``_IGNORED``; with ``given``, the names set
    by command-line flags, also ``_FLAG_IGNORED`` for those names), in one line naming both flags."""
    known = specs(type(cfg))
    rules = _IGNORED if given is None else [r for r in _FLAG_IGNORED if r[0] in given]
    for name, needs, counts, words, why in rules:
        value, other = getattr(cfg, name, None), getattr(cfg, needs, None)
        if name in known and value != known[name].default and not counts(other):
            use = f"--{flag(needs)} {words}".rstrip()
            raise UserError(
                f"--{flag(name)} {shown(value)} does nothing with --{flag(needs)} {shown(other)} "
                f"({why}); drop --{flag(name)} or use {use}"
            )
