"""Every rule between options, in one place: which options do nothing with the others' values (refused, or dropped
when a recipe is switched), and which may change when a run is resumed.

Idle options. An option is *idle* when another option's value makes it do nothing: ``--feedback`` with ``--mode soft``,
``--uda-threshold`` with ``--uda-weight 0``, ``--uda-weight`` with ``--method supervised`` (each method declares its
own idle options: ``metapl.methods``). One rule for every source of a config: an idle option whose value differs from
its default is refused, in one line naming both options, when it is given together with what idles it: in one
``TrainConfig(...)`` call, one YAML file, one command line. A recipe is a set of defaults, so an option that only the
recipe set and that the command line's options make idle (``--config cifar10_4k --method supervised``: the recipe's
UDA settings) falls back to its default; the protocol's rows (``metapl.protocol.rows``) and a saved config read back
(``config_from_dict``) switch methods the same way (``drop_idle``).

Resume. A resumed run must compute what the uninterrupted run would have: the options of ``RUNTIME_KEYS`` (where and
how fast it runs) and ``--steps`` (its length, re-planned: ``metapl.training.optimizers.replan_schedules``) may change;
every other option is fixed for the run's life (``check_resume``, ``changed_options``, ``refuse_resume_flags``).

Torch-free, as the rest of ``metapl.config``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metapl.config.option_text import flag, shown
from metapl.errors import UserError, few
from metapl.methods.by_name import get_method, method_names


@dataclass(frozen=True)
class Rule:
    """``option`` does nothing unless ``needs`` has a value for which ``counts`` is true (``words`` says which)."""

    option: str
    needs: str
    counts: Callable[[Any], bool]
    words: str
    why: str


_HARD, _SOFT = (lambda m: m == "hard"), (lambda m: m == "soft")
# Checked before the method's own rules (metapl.methods: Method.idle), then the ones after.
_BEFORE = (
    Rule("feedback", "mode", _HARD, "hard", "soft mode has the exact meta-gradient, no estimator of h"),
    Rule("baseline_decay", "mode", _HARD, "hard", "soft mode has no h to subtract a baseline from"),
    Rule("pseudo_label", "mode", _HARD, "hard", "soft mode's pseudo labels are the whole distribution"),
    Rule("teacher_batch", "mode", _HARD, "hard", "soft mode always runs one joint teacher forward"),
    Rule("soft_temperature", "mode", _SOFT, "soft", "hard pseudo labels are the argmax or a sample"),
)
_AFTER = (
    *(
        Rule(name, "uda_weight", lambda w: w is None or w > 0, "a weight > 0", "UDA is off")
        for name in ("uda_steps", "uda_temperature", "uda_threshold")
    ),
    Rule("wandb_project", "wandb", bool, "", "no metrics go to Weights & Biases"),
)


def _other_than(name: str) -> Callable[[object], bool]:
    return lambda value: value != name


def _equal_to(name: str) -> Callable[[object], bool]:
    return lambda value: value == name


def rules_for(method_name: str) -> list[Rule]:
    """Every idle-option rule of a config whose ``--method`` is ``method_name``, in the order they are checked."""
    method = get_method(method_name)
    own = [Rule(name, "method", _other_than(method.name), idle.instead, idle.why) for name, idle in method.idle.items()]
    others = [get_method(name) for name in method_names() if name != method_name]
    others_own = [
        Rule(name, "method", _equal_to(other.name), other.name, f"only --method {other.name} reads it")
        for other in others
        for name in other.own_options
    ]
    return [*_BEFORE, *own, *others_own, *_AFTER]


def idle_options(values: dict, defaults: dict) -> list[Rule]:
    """The rules that ``values`` (option -> value; a missing option is at its default) break."""
    get = lambda name: values.get(name, defaults[name])  # noqa: E731
    return [r for r in rules_for(get("method")) if get(r.option) != defaults[r.option] and not r.counts(get(r.needs))]


def refuse_idle(values: dict, defaults: dict) -> None:
    """Refuse the first idle option of ``values`` that differs from its default, in one line naming both options."""
    for rule in idle_options(values, defaults):
        value, other = values.get(rule.option, defaults[rule.option]), values.get(rule.needs, defaults[rule.needs])
        use = f"--{flag(rule.needs)} {rule.words}".rstrip()
        raise UserError(
            f"--{flag(rule.option)} {shown(value)} does nothing with --{flag(rule.needs)} {shown(other)} "
            f"({rule.why}); drop --{flag(rule.option)} or use {use}"
        )


def drop_idle(values: dict, defaults: dict, *, only: set[str] | None = None, causes: set[str] | None = None) -> dict:
    """``values`` with idle options back at their defaults, and the method's own adjustments (``Method.adopt``).

    Args:
        values: option -> value.
        defaults: option -> default (``TrainConfig``'s).
        only: drop only these options (those a recipe set), or None for any.
        causes: drop an option only when what idles it is among these (those the command line set), or None for any.
            With ``only`` or ``causes``, the method's own adjustments are left out: what remains is refused.

    Returns:
        A new dict.
    """
    out = dict(values)
    if only is None and causes is None:
        out = get_method(out.get("method", defaults["method"])).adopt(out, defaults)
    for _ in range(len(out) + 1):  # a dropped option can idle another (uda_weight 0 idles uda_steps)
        drop = [
            r.option
            for r in idle_options(out, defaults)
            if (only is None or r.option in only) and (causes is None or r.needs in causes)
        ]
        if not drop:
            break
        out.update({name: defaults[name] for name in drop})
    return out


# ----------------------------------------------------------------------------------------------------------------
# Resume

# Options that change where and how fast a run executes, never what it computes: they may differ when a run is
# resumed (on another machine, with fewer workers) and are the flags --resume accepts, with --steps. Every other option
# alters the math and is fixed for the run's life.
RUNTIME_KEYS = frozenset(
    {
        "workers",
        "threads",
        "device",
        "progress",
        "cache_dir",
        "data_dir",
        "download",
        "tensorboard",
        "wandb",
        "wandb_project",
        "eval_batch_size",
        "log_every",
        "save_every",
    }
)
RESUME_FLAGS = RUNTIME_KEYS | {"steps"}  # what --resume accepts on the command line
_UNCOMPARED = RUNTIME_KEYS | {"out"}  # a run may be moved, and its runtime options may change


def changed_options(saved: dict, now: dict, *, length: bool = True) -> list[str]:
    """The options that alter the math and differ between two configs (``TrainConfig.to_dict()``), in ``now``'s order.

    Args:
        saved: the config a run was trained with.
        now: the config it would continue (or be read back) with.
        length: compare ``steps`` too (False: a run's length may change, ``--resume RUN --steps N``).
    """
    skip = _UNCOMPARED if length else _UNCOMPARED | {"steps"}
    return [k for k in now if k not in skip and k in saved and now[k] != saved[k]]


def refuse_resume_flags(given: dict, *, overwrite: bool, config: str | None) -> None:
    """``--resume`` uses the run's saved config: refuse any other option given with it (only ``RESUME_FLAGS``)."""
    refused = sorted("--" + flag(k) for k in given if k not in RESUME_FLAGS)
    refused += ["--overwrite"] if overwrite else []
    if refused or config:
        raise UserError(
            f"--resume uses the run's saved config.yaml; drop {', '.join(refused) or '--config'} (only --steps and "
            "the runtime options may be given with it: see metapl train --help)"
        )


def check_resume(now: dict, saved: dict | None, step: int, config_file: str | Path) -> None:
    """Refuse resuming a run trained with ``saved`` with ``now`` when an option that alters the math differs, or
    ``--steps`` does not extend it.

    Args:
        now: the config the run would continue with (its ``config.yaml`` and the flags given with ``--resume``).
        saved: the config its checkpoint was trained with, or None when it no longer reads (another metapl version's
            values that no longer pass: nothing to compare with).
        step: the step the checkpoint reached.
        config_file: the run's ``config.yaml``, for messages.

    Raises:
        UserError: naming the changed keys with both values, or a ``--steps`` at or below the run's step.
    """
    if saved is None:
        return
    changed = changed_options(saved, now, length=False)
    if changed:
        diffs = [f"{k} {now[k]!r} (trained with {saved[k]!r})" for k in changed]
        raise UserError(
            f"{config_file} differs from the config the checkpoint was trained with in {few(diffs, 4)}; these "
            "change the training: put the saved values back, or start a new run with another --out (on resume only "
            "--steps and the runtime options may change)"
        )
    if now["steps"] != saved["steps"] and now["steps"] <= step:
        run_dir = Path(config_file).parent
        raise UserError(
            f"--steps {now['steps']} does not extend the run in {run_dir}: it has trained {step} steps; give more"
        )
