"""The checkpoint policy of a run, in one object: which files exist, when they are written, and that only finite
weights ever reach them.

* ``checkpoint.pt`` (``LATEST``): the whole training state, every ``--save-every`` steps, at the last step and when a
  signal stops training; what ``--resume`` continues from.
* ``finetuned.pt`` (``FINETUNED``): the models with the finetuned student, slim (no optimizer state): written when
  finetuning ends, so the MPL checkpoint stays untouched and finetuning can be repeated with other settings.
* ``finetune-progress.pt`` (``FINETUNE_PROGRESS``): a finetuning stopped by a signal (the student, its optimizer, every
  rank's generators, the step), continued by the next run on the same MPL checkpoint with the same finetuning
  settings, bit for bit; deleted once finetuning is done. A finetuning killed outright restarts: it is short.

Every save first refuses non-finite weights, on every rank (they hold the same weights, so they stop together): a
run that diverged stops with its last good checkpoint on disk. Every rank's random generators are gathered into each
save (dropout masks and sampled pseudo labels differ per rank), so a multi-process run resumes bit-identically; a save
is therefore a collective that every rank calls, and rank 0 alone writes.
"""

from __future__ import annotations

import logging
import shlex
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from metapl.core import unwrap
from metapl.errors import Interrupted, UserError, reporting_os_errors
from metapl.rundir.checkpoint import (
    atomic_save,
    checkpoint_state,
    inference_state,
    load_checkpoint,
    nonfinite_weights,
    rng_state,
    set_rng_state,
)
from metapl.rundir.layout import FINETUNE_PROGRESS, FINETUNED, LATEST
from metapl.training.process import StopSignals, barrier

if TYPE_CHECKING:
    from metapl.training.setup import Run

logger = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """A loss or a weight became NaN or infinite; the last good checkpoint is kept."""


class CheckpointSaver:
    """Writes a run's checkpoints (the module docstring's policy); the loop asks it to save, it does not decide.

    Args:
        run: the ``metapl.training.setup.Run``.
        run_dir: its folder.
    """

    def __init__(self, run: Run, run_dir: Path) -> None:
        self.run = run
        self.run_dir = Path(run_dir)

    # ------------------------------------------------------------------------------------------------------------
    # Training: checkpoint.pt

    def save_latest(self) -> None:
        """Write ``checkpoint.pt`` of the current step (a collective: every rank calls it)."""
        run = self.run
        self.refuse_nonfinite_weights()
        ranks = self._rng_of_ranks() if run.dist.enabled else None
        if run.dist.is_main:
            state = checkpoint_state(run)
            if ranks is not None:
                state["rng_ranks"] = ranks
            atomic_save(state, self.run_dir / LATEST)
        run.saved_step = run.step
        barrier(run.dist)

    def refuse_nonfinite_weights(self) -> None:
        """Stop a run whose teacher, student or EMA weights hold a NaN or an infinity, before they are evaluated or
        saved (``TrainingDiverged``)."""
        run = self.run
        models = {"teacher": unwrap(run.teacher), "student": unwrap(run.student)}
        if run.ema is not None:
            models["ema"] = run.ema.module
        bad = nonfinite_weights({role: m.state_dict() for role, m in models.items()})
        if bad:
            raise self.diverged(f"the {' and '.join(bad)} weights became non-finite (NaN/inf) by step {run.step}")

    def diverged(self, what: str) -> TrainingDiverged:
        """The one-line stop of a diverged run: what happened, which checkpoint is left, how to start again."""
        cfg = self.run.cfg
        out = shlex.quote(cfg.out)
        if self.run.saved_step is not None:
            kept = f"the last finite checkpoint, {Path(cfg.out) / LATEST} (step {self.run.saved_step}), is kept"
        else:
            kept = "no checkpoint was saved before"
        return TrainingDiverged(
            f"{what}; training stopped and {kept}; lower the learning rates (--t-lr, --s-lr) or set --grad-clip, and "
            f"start again with --out {out} --overwrite"
        )

    def interrupted(self, stop: StopSignals) -> Interrupted:
        """The message a training stopped by a signal ends with, after ``save_latest``."""
        run = self.run
        signum = stop.signum or signal.SIGTERM  # under torchrun another rank may have been the one signalled
        return Interrupted(
            f"interrupted by {signal.Signals(signum).name} at step {run.step}; saved {Path(run.cfg.out) / LATEST}; "
            f"resume with: metapl train --resume {shlex.quote(run.cfg.out)}",
            status=128 + signum,
        )

    # ------------------------------------------------------------------------------------------------------------
    # Finetuning: finetuned.pt and finetune-progress.pt

    def refuse_nonfinite_student(self) -> None:
        """Stop before a diverged finetuned student is evaluated or saved as ``finetuned.pt``."""
        cfg = self.run.cfg
        if nonfinite_weights({"student": unwrap(self.run.student).state_dict()}):
            raise UserError(
                f"finetuning diverged: the student's weights became non-finite (NaN/inf) with learning rate "
                f"{cfg.finetune_lr}; {FINETUNED} was not written; finetune again with a lower --lr"
            )

    def save_finetuned(self) -> None:
        """Write ``finetuned.pt`` and drop the finetuning's progress file (main rank)."""
        if not self.run.dist.is_main:
            return
        atomic_save(inference_state(self.run), self.run_dir / FINETUNED)
        with reporting_os_errors(self.run_dir / FINETUNE_PROGRESS, "delete"):
            (self.run_dir / FINETUNE_PROGRESS).unlink(missing_ok=True)

    def finetune_progress(self) -> dict | None:
        """The saved progress of a stopped finetuning that the run continues (same MPL step, same settings), else
        None."""
        path = self.run_dir / FINETUNE_PROGRESS
        if not path.is_file():
            return None
        progress = load_checkpoint(path)
        if any(progress.get(k) != v for k, v in self._finetune_plan().items()):
            return None  # another MPL step (an extended run) or other settings: finetune from the MPL checkpoint
        return progress

    def restore_progress(self, opt: torch.optim.Optimizer) -> int:
        """Load a stopped finetuning's student, optimizer and generators into the run; its step (0 if none)."""
        progress = self.finetune_progress()
        if progress is None:
            return 0
        run = self.run
        unwrap(run.student).load_state_dict(progress["student"])
        opt.load_state_dict(progress["opt"])
        set_rng_state(progress["rng_ranks"][run.dist.rank])
        path = self.run_dir / FINETUNE_PROGRESS
        logger.info(f"finetuning continues at step {progress['done']} of {progress['steps']} ({path})")
        return int(progress["done"])

    def save_progress(self, opt: torch.optim.Optimizer, done: int) -> None:
        """Write a stopped finetuning's progress (a collective: rank 0 writes every rank's generators)."""
        run = self.run
        self.refuse_nonfinite_student()
        ranks = self._rng_of_ranks() if run.dist.enabled else [rng_state()]
        if run.dist.is_main:
            state = {
                "config": run.cfg.to_dict(),
                **self._finetune_plan(),
                "done": done,
                "student": unwrap(run.student).state_dict(),
                "opt": opt.state_dict(),
                "rng_ranks": ranks,
            }
            atomic_save(state, self.run_dir / FINETUNE_PROGRESS)
        barrier(run.dist)

    def finetune_interrupted(self, done: int, stop: StopSignals, resume_command: str) -> Interrupted:
        """The message a finetuning stopped by a signal ends with, after ``save_progress``."""
        signum = stop.signum or signal.SIGTERM  # under torchrun another rank may have been the one signalled
        return Interrupted(
            f"interrupted by {signal.Signals(signum).name} in finetuning at step {done} of "
            f"{self.run.cfg.planned_finetune_steps()}; saved {self.run_dir / FINETUNE_PROGRESS}; "
            f"resume with: {resume_command}",
            status=128 + signum,
        )

    def _finetune_plan(self) -> dict:
        """What a finetuning's progress must match to be continued."""
        run, cfg = self.run, self.run.cfg
        return {
            "mpl_step": run.step,
            "steps": cfg.planned_finetune_steps(),
            "lr": cfg.finetune_lr,
            "batch_size": cfg.finetune_batch_size,
            "world_size": run.dist.world_size,
        }

    def _rng_of_ranks(self) -> list:
        """Every rank's random generators, gathered on every rank (a collective)."""
        ranks: list[object] = [None] * self.run.dist.world_size
        dist.all_gather_object(ranks, rng_state())
        return ranks
