"""The one training loop. A run has phases (training, by its method's step; then finetuning the student on the
labels: ``metapl.training.phases``), and every phase runs through ``run_phase``, which reads top to bottom:

    for each step of the phase:
        one step                      (the phase's: Method.step, or a finetuning step)
        record the metrics            (at the phase's sync points: the one host sync of an interval)
        evaluate                      (every --eval-every steps and at the end)
        stop on a signal?             (SIGINT/SIGTERM, agreed by every rank at a sync point)
        save                          (the phase's checkpoints, via the run's CheckpointSaver; always when stopping)
        stopped: raise Interrupted    (with how to resume)

What differs between phases is what a step is, when they sync and save, and what they write; the order of the work
and the stop protocol are the loop's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from metapl.training.process import StopSignals, stop_agreed

if TYPE_CHECKING:
    from metapl.training.setup import Run


class Phase(Protocol):
    """One phase of a run, as ``run_phase`` drives it. ``done`` counts the phase's steps, from 1."""

    start: int  # steps already done (a resumed phase)
    steps: int  # the phase's last step

    def step(self, done: int) -> None:
        """Run the phase's step ``done``."""

    def syncs(self, done: int, last: bool) -> bool:
        """Whether step ``done`` is a sync point (its metrics are recorded, a stop may be agreed)."""

    def record(self, done: int) -> None:
        """Record the metrics since the last sync point (the one host sync of the interval)."""

    def evaluates(self, done: int, last: bool) -> bool:
        """Whether to evaluate after step ``done``."""

    def evaluate(self, done: int) -> None:
        """Evaluate the phase's models after step ``done`` (refusing non-finite weights first)."""

    def may_stop(self, done: int, last: bool) -> bool:
        """Whether a signal may stop the phase after step ``done``."""

    def saves(self, done: int, last: bool) -> bool:
        """Whether to save after step ``done`` without a signal."""

    def save(self, done: int) -> None:
        """Save the phase's state after step ``done`` (through the run's ``CheckpointSaver``)."""

    def interrupted(self, done: int, stop: StopSignals) -> Exception:
        """The ``Interrupted`` to stop with after a signal, once saved."""

    def progressed(self) -> None:
        """After each step: the progress bar, if the phase shows one."""


def run_phase(phase: Phase, run: Run, stop: StopSignals | None) -> None:
    """Run ``phase`` from ``phase.start`` to ``phase.steps`` (the module docstring's order).

    Args:
        phase: the phase.
        run: the ``metapl.training.setup.Run`` (its place in the job and device, for stopping together).
        stop: the signal flag to poll at sync points, or None (signals keep their usual effect).

    Raises:
        TrainingDiverged: a loss or weight became non-finite (from the phase's record, evaluate or save).
        Interrupted: SIGINT or SIGTERM, after the phase saved.
    """
    for done in range(phase.start + 1, phase.steps + 1):
        phase.step(done)
        last = done == phase.steps
        synced = phase.syncs(done, last)
        if synced:
            phase.record(done)
        if phase.evaluates(done, last):
            phase.evaluate(done)
        stopping = stop is not None and phase.may_stop(done, last) and stop_agreed(stop, run.dist, run.device, synced)
        if phase.saves(done, last) or stopping:
            phase.save(done)
        if stopping:
            assert stop is not None  # stopping on its signal
            raise phase.interrupted(done, stop)
        phase.progressed()
