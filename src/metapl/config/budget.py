"""Defaults that scale with the budget: every step-count setting left unset is derived from ``--steps``, so that 300,
3,000 and 30,000 steps each get a sensible run (docs/algorithm.md, "Defaults that scale with the budget", gives the
measurements behind each constant: ``benchmarks.defaults_sweep``, on validation images of the visible data sets only).

Torch-free, as the rest of ``metapl.config``. ``TrainConfig`` resolves its ``Schedule`` here once, in
``__post_init__``; ``plan_line`` is the one line a run logs about what was derived.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from metapl.methods.by_name import get_method

if TYPE_CHECKING:
    from metapl.config.fields import TrainConfig

# Defaults that scale with the budget (docs/algorithm.md, "Defaults that scale with the budget"): a step-count option
# left unset is this fraction of --steps, so 300 and 30,000 steps each get a sensible run. Chosen on validation images
# of the visible data sets (benchmarks.defaults_sweep).
BUDGET_FRACTIONS = {
    "t_warmup_steps": 0.05,
    "s_wait_steps": 0.1,
    "s_warmup_steps": 0.05,
    "uda_steps": 0.2,
    "finetune_steps": 0.1,
}
# labeled_aug auto: strong labeled views once each labeled image is seen this many times (an over-fitting regime,
# where RandAugment pays), weak below (an under-fitting one, where it costs): chosen on validation images.
STRONG_LABELED_PASSES = 100
EVALUATIONS_PER_RUN = 10
MAX_EVAL_EVERY = 1000
# The automatic validation carve-out: with at least this many labels in every class, a tenth of each class's labels
# choose the run's result (metapl.rundir.result); with fewer, the result is chosen by rule.
AUTO_VAL_MIN_PER_CLASS = 50
AUTO_VAL_FRACTION = 0.1


def fraction_text(name: str) -> str:
    """An unset step-count option's rule, in words for its --help line: ``5 % of --steps``."""
    return f"{BUDGET_FRACTIONS[name]:.0%} of --steps".replace("%", " %")


@dataclass(frozen=True)
class Schedule:
    """The step counts a run uses: the options' values or, where left unset, derived from ``--steps``."""

    t_warmup_steps: int
    s_wait_steps: int
    s_warmup_steps: int
    uda_steps: int
    finetune_steps: int
    eval_every: int
    save_every: int


def auto_val_count(num_labeled: int, num_classes: int) -> int:
    """The automatic carve-out (``--val-labeled none``): a tenth of each class's labels when every class has at
    least ``AUTO_VAL_MIN_PER_CLASS``, else 0. Class-balanced draws give each class ``num_labeled // num_classes``."""
    per_class = num_labeled // num_classes
    if per_class < AUTO_VAL_MIN_PER_CLASS:
        return 0
    return int(per_class * AUTO_VAL_FRACTION) * num_classes


def plan_schedule(cfg: TrainConfig) -> Schedule:
    """``cfg``'s step counts: each step-count option as given, or its budget rule (``BUDGET_FRACTIONS``)."""
    steps = {
        name: getattr(cfg, name) if getattr(cfg, name) is not None else _derived(cfg, name) for name in BUDGET_FRACTIONS
    }
    eval_every = cfg.eval_every or min(MAX_EVAL_EVERY, max(1, round(cfg.steps / EVALUATIONS_PER_RUN)))
    return Schedule(**steps, eval_every=eval_every, save_every=cfg.save_every or 2 * eval_every)


def _derived(cfg: TrainConfig, name: str) -> int:
    """The budget rule's value of an unset step-count option (0 where the method has no such phase)."""
    return int(BUDGET_FRACTIONS[name] * cfg.steps) if _applies(cfg, name) else 0


def _applies(cfg: TrainConfig, name: str) -> bool:
    method = get_method(cfg.method)
    return {"s_wait_steps": method.waits_for_teacher, "finetune_steps": method.finetunes}.get(name, True)


def labeled_passes(cfg: TrainConfig, num_train_labels: int) -> float:
    """How many times the run shows each of its ``num_train_labels`` labeled images (per process)."""
    return cfg.steps * cfg.batch_size / max(1, num_train_labels)


def labeled_views(cfg: TrainConfig, num_train_labels: int) -> str:
    """``labeled_aug`` with ``auto`` resolved: strong from ``STRONG_LABELED_PASSES`` passes over the labels."""
    if cfg.labeled_aug != "auto":
        return cfg.labeled_aug
    return "strong" if labeled_passes(cfg, num_train_labels) >= STRONG_LABELED_PASSES else "weak"


_WORDS = {
    "t_warmup_steps": "teacher warm-up",
    "s_wait_steps": "student waits",
    "s_warmup_steps": "student warm-up",
    "uda_steps": "UDA ramp",
    "finetune_steps": "finetuning",
    "eval_every": "evaluation every",
    "save_every": "checkpoint every",
}


def plan_line(cfg: TrainConfig, num_train_labels: int) -> str:
    """One line saying what the budget's rules chose for this run (the options left unset), and which phases
    ``--steps`` is too short for."""
    plan, parts = cfg.schedule(), []
    if cfg.labeled_aug == "auto":
        passes, views = labeled_passes(cfg, num_train_labels), labeled_views(cfg, num_train_labels)
        parts.append(f"{views} labeled views (each seen ~{passes:.0f} times; strong from {STRONG_LABELED_PASSES})")
    teacherless = not get_method(cfg.method).unlabeled
    skip = {"t_warmup_steps", "s_wait_steps", "uda_steps"} if teacherless else set()
    derived = [name for name in _WORDS if getattr(cfg, name) is None and name not in skip and _applies(cfg, name)]
    parts += [f"{_WORDS[name]} {getattr(plan, name)}" for name in derived]
    line = f"plan for {cfg.steps} steps: " + ", ".join(parts) + " (each has its flag)"
    short = [_WORDS[name] for name in derived if name in BUDGET_FRACTIONS and getattr(plan, name) == 0]
    if short:
        line += f"; --steps {cfg.steps} is too short for: {', '.join(short)} (0 steps)"
    return line
