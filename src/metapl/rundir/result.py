"""One result per run: the model a run hands back, how it was chosen, and where its weights are.

A run trains up to four candidate networks: the teacher, the student, its EMA and (after finetuning) the finetuned
student. When the run ends it picks one of them, its **result**, and records it in ``summary.json`` under
``"result"``; ``predict``, ``export``, ``eval``'s headline, ``--teacher-weights RUN`` / ``--student-weights RUN`` and
``compare`` all read it from there (``read_result``), so every command uses the same model.

How the result is chosen (``choose_result``):

* **With validation images** (``--val-labeled``, or the automatic carve-out of ``metapl.config.fields``): the
  candidate with the highest validation accuracy; a tie goes to the earlier candidate of ``PREFERENCE``.
* **Without**: the method's rule (``Method.result_rule``: the first of an ordered list of roles), the order that the
  validation measurements of ``benchmarks.defaults_sweep`` support (docs/algorithm.md, "The model a run hands back").

The teacher is a candidate only when it is a trained image classifier of the student's architecture (``--method mpl``
with ``--teacher`` equal to ``--student``; each method says: ``Method.candidates``): a user who asked for a small
student gets a small model back. The test images choose nothing.

Importing this module does not import torch.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from metapl.errors import UserError
from metapl.methods.by_name import get_method
from metapl.rundir.layout import FINETUNED, LATEST, load_run_config, read_summary

if TYPE_CHECKING:
    from metapl.config.fields import TrainConfig

logger = logging.getLogger(__name__)

ROLES = ("teacher", "student", "ema", "finetuned")  # the candidates, as summary.json and metrics name them
# Ties on validation: the cheapest model to trust first.
PREFERENCE = ("finetuned", "ema", "student", "teacher")


@dataclass(frozen=True)
class RunResult:
    """The model a run hands back.

    Attributes:
        role: ``teacher``, ``student``, ``ema`` or ``finetuned``.
        file: the checkpoint file in the run folder that holds it (``checkpoint.pt`` or ``finetuned.pt``).
        network: the entry of that checkpoint (``teacher``, ``student`` or ``ema``; a finetuned student is the
            ``student`` entry of ``finetuned.pt``).
        chosen_by: how: ``"validation accuracy on N images"`` or the rule's words.
        val_acc: its validation accuracy in %, or None without validation images.
        test_acc: its test accuracy in % (reported, never used to choose).
    """

    role: str
    file: str
    network: str
    chosen_by: str
    val_acc: float | None
    test_acc: float | None

    def to_dict(self) -> dict:
        """The ``summary.json`` entry."""
        return asdict(self)

    def line(self) -> str:
        """The run's last words about it: which model, how it was chosen, its accuracies."""
        val = f", validation accuracy {self.val_acc:.2f}%" if self.val_acc is not None else ""
        test = f", test accuracy {self.test_acc:.2f}%" if self.test_acc is not None else ""
        return f"result: the {describe(self.role)} ({self.file}), chosen by {self.chosen_by}{val}{test}"


def describe(role: str) -> str:
    """A role in words: ``ema`` -> ``EMA student``."""
    return {"ema": "EMA student", "finetuned": "finetuned student"}.get(role, role)


def candidates(method: str, teacher: str, student: str, accs: dict) -> list[str]:
    """The roles a run may hand back, among those ``accs`` scored (``<role>_acc`` keys), as its method allows.

    Args:
        method: the run's ``--method``.
        teacher: the teacher's architecture name.
        student: the student's architecture name.
        accs: the run's final accuracies (test, and ``val_`` ones when it has validation images).
    """
    roles = [r for r in ROLES if accs.get(f"{r}_acc") is not None]
    return get_method(method).candidates(teacher, student, roles)


def rule_text(rule: tuple[str, ...]) -> str:
    """A rule in words: ``the teacher, else the finetuned student, else ...``."""
    return ", else ".join(f"the {describe(role)}" for role in rule)


def choose_result(roles: list[str], accs: dict, num_val: int, rule: tuple[str, ...]) -> RunResult:
    """Pick the result among ``roles`` (``candidates``): by validation accuracy when there are validation images,
    else by ``rule`` (the first of its roles among the candidates).

    Args:
        roles: the candidates (not empty).
        accs: the final accuracies: ``<role>_acc`` on the test set, ``val_<role>_acc`` on validation images.
        num_val: how many validation images scored them (0: none).
        rule: the method's order without validation images (``Method.result_rule``).

    Returns:
        The chosen model.
    """
    if not roles:
        raise ValueError("a run has at least one candidate model")
    ordered = [r for r in PREFERENCE if r in roles]
    if num_val > 0 and all(accs.get(f"val_{r}_acc") is not None for r in ordered):
        role = max(ordered, key=lambda r: (accs[f"val_{r}_acc"], -ordered.index(r)))
        how = f"validation accuracy on {num_val} images"
    else:
        ranked = [r for r in rule if r in roles] + [r for r in ordered if r not in rule]
        role = ranked[0]
        how = f"rule ({rule_text(tuple(ranked))}; no validation images)"
    return RunResult(
        role=role,
        file=FINETUNED if role == "finetuned" else LATEST,
        network="student" if role == "finetuned" else role,
        chosen_by=how,
        val_acc=accs.get(f"val_{role}_acc"),
        test_acc=accs.get(f"{role}_acc"),
    )


def record_result(summary: dict, cfg: TrainConfig) -> RunResult:
    """Choose a finished run's result among its final models, put it in ``summary["result"]`` and say it.

    Args:
        summary: the run's summary with its final accuracies and ``num_val`` (``run_summary``, and finetuning's).
        cfg: the run's ``TrainConfig``.
    """
    num_val = summary.get("num_val", 0)
    roles = candidates(cfg.method, cfg.teacher, cfg.student, summary)
    result = choose_result(roles, summary, num_val, get_method(cfg.method).result_rule)
    summary["result"] = result.to_dict()
    logger.info(result.line())
    return result


def read_result(run_dir: str | Path) -> RunResult:
    """The result recorded in a run's ``summary.json``; for a run that has not finished (none recorded yet), the EMA
    student of its latest checkpoint (its student without an EMA), said in a warning line.

    Raises:
        UserError: no run there, or a damaged summary or config.
    """
    run_dir = Path(run_dir)
    entry = read_summary(run_dir).get("result")
    if not isinstance(entry, dict):
        role = "ema" if load_run_config(run_dir).ema > 0 else "student"
        logger.warning(
            f"{run_dir} has not finished (its summary.json names no result yet); using the {describe(role)} "
            f"of its latest {LATEST}"
        )
        return RunResult(role, LATEST, role, "fallback (the run has not finished)", None, None)
    try:
        return RunResult(**entry)
    except TypeError:
        raise UserError(f"{run_dir}'s summary.json has a damaged 'result' entry; train the run again") from None
