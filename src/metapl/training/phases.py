"""The phases of a run, as ``metapl.training.loop.run_phase`` drives them.

``TrainingPhase``: ``cfg.steps`` steps of the run's method (``Method.step``: MPL's teacher and student, or the student
alone), the student's schedule and EMA after each; metrics averaged between sync points (``--log-every``, evaluations,
saves) with a non-finite loss stopping the run; evaluation every ``eval_every`` steps; ``checkpoint.pt`` every
``save_every`` steps and at the end.

``FinetunePhase``: the paper's last phase, the student finetuned on the labeled data alone (``--finetune-steps``,
``metapl finetune``), with a fresh SGD at ``--finetune-lr`` on shuffled weak views; evaluated as often as training,
so that benchmarks can report the median of the last evaluations; ``finetuned.pt`` at the end, its progress when a
signal stops it (``metapl.training.saver``).
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from metapl import data as mdata
from metapl.core import supervised_step, unwrap
from metapl.training.evaluation import eval_line, eval_loaders, evaluate_run, evaluate_sets
from metapl.training.inputs import finetune_batches, train_batches
from metapl.training.optimizers import make_sgd
from metapl.training.process import all_reduce_mean
from metapl.training.saver import CheckpointSaver

if TYPE_CHECKING:
    from tqdm import tqdm

    from metapl.training.metrics import Writer
    from metapl.training.process import StopSignals
    from metapl.training.setup import Run

logger = logging.getLogger(__name__)


class TrainingPhase:
    """Training by the run's method, from ``run.step`` to ``cfg.steps``."""

    def __init__(self, run: Run, saver: CheckpointSaver, writer: Writer) -> None:
        self.run, self.saver, self.writer = run, saver, writer
        cfg = run.cfg
        self.plan = cfg.schedule()
        self.start, self.steps = run.step, cfg.steps
        self.batches = train_batches(run)
        self.loaders = eval_loaders(run.data, run.split, cfg.eval_batch_size, cfg.eval_limit, cfg.workers or 0)
        self.images_per_step = run.method.images_per_step(cfg.batch_size, cfg.mu) * run.dist.world_size
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.pending: list[torch.Tensor] = []  # per-step metric vectors since the last sync (no .item() per step)
        self.keys: list[str] = []
        self.shown: dict = {}  # the progress bar's figures
        self.progress = _progress_bar(run)
        self.tick = self.segment = time.perf_counter()  # interval start; start of the time not yet in run.seconds

    def step(self, done: int) -> None:
        """One step of the method, then the student's schedule and EMA; the metrics stay on the device."""
        run = self.run
        labeled = self._to_device(next(self.batches[0]), images=1)
        unlabeled_batches = self.batches[1] if run.method.unlabeled else None
        unlabeled = self._to_device(next(unlabeled_batches), images=2) if unlabeled_batches is not None else None
        metrics = run.method.step(run, labeled, unlabeled)
        with warnings.catch_warnings():
            # While the student waits, mpl_update skips its optimizer on purpose; the schedule still advances.
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            run.s_sched.step()
        if run.ema is not None:
            run.ema.update(run.student)
        run.step += 1
        self.keys = list(metrics)
        self.pending.append(torch.stack([metrics[k] for k in self.keys]))

    def _to_device(self, batch: Sequence[torch.Tensor], images: int) -> tuple[torch.Tensor, ...]:
        """A batch on the device (non-blocking), its first ``images`` tensors (B, C, H, W) in the run's memory
        format."""
        moved = [t.to(self.run.device, non_blocking=True) for t in batch]
        return tuple(t.contiguous(memory_format=self.memory_format) if i < images else t for i, t in enumerate(moved))

    def syncs(self, done: int, last: bool) -> bool:
        return done % self.run.cfg.log_every == 0 or self.evaluates(done, last) or self.saves(done, last)

    def record(self, done: int) -> None:
        """The interval's mean metrics (over steps and ranks), learning rates and speed, to the metrics files."""
        now = time.perf_counter()
        values = self._interval_metrics(now - self.tick)
        self.pending, self.tick = [], now
        self.writer.write(done, {f"train/{k}": v for k, v in values.items()})
        self.shown.update({"loss_t": values.get("loss/teacher"), "loss_s": values.get("loss/student")})

    def _interval_metrics(self, seconds: float) -> dict[str, float]:
        """The means of the pending steps' metrics (the one host sync of the interval); a non-finite loss stops."""
        run, n = self.run, len(self.pending)
        stacked = torch.stack(self.pending)  # (n_steps, n_keys)
        mean = all_reduce_mean(stacked.nanmean(dim=0), run.dist)
        rows = all_reduce_mean(stacked, run.dist).cpu()  # device sync
        for i, k in enumerate(self.keys):
            if k.startswith("loss/"):
                bad = (~torch.isfinite(rows[:, i])).nonzero()
                if len(bad):
                    first = int(bad[0, 0])
                    step = run.step - n + first + 1
                    raise self.saver.diverged(f"{k} became {rows[first, i].item()} at step {step}")
        values = {k: float(v) for k, v in zip(self.keys, mean.cpu().tolist())}
        values.update(
            {
                "lr/teacher": run.t_opt.param_groups[0]["lr"],
                "lr/student": run.s_opt.param_groups[0]["lr"],
                "time/step_ms": 1000 * seconds / n,
                "time/images_per_s": self.images_per_step * n / seconds,
            }
        )
        return values

    def evaluates(self, done: int, last: bool) -> bool:
        return done % self.plan.eval_every == 0 or last

    def evaluate(self, done: int) -> None:
        """Evaluate the finite models and log their accuracies (the result is chosen among the final ones)."""
        run = self.run
        self._count_time()
        self.saver.refuse_nonfinite_weights()
        accs = evaluate_run(run, self.loaders)
        run.last_eval = (run.step, accs)
        if run.dist.is_main:
            self.writer.write(run.step, {f"eval/{k}": v for k, v in accs.items()})
            logger.info(eval_line(run.step, accs))
        self.shown.update({k: accs[k] for k in accs if k.endswith("_acc")})
        self.tick = time.perf_counter()  # evaluation time is not step time

    def may_stop(self, done: int, last: bool) -> bool:
        return True

    def saves(self, done: int, last: bool) -> bool:
        return done % self.plan.save_every == 0 or last

    def save(self, done: int) -> None:
        self._count_time()
        self.saver.save_latest()

    def interrupted(self, done: int, stop: StopSignals) -> Exception:
        return self.saver.interrupted(stop)

    def progressed(self) -> None:
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix({k: f"{v:.3g}" for k, v in self.shown.items() if v is not None}, refresh=False)

    def close(self) -> None:
        """Close the progress bar and stop the loader workers (also when the phase stops on an error)."""
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        mdata.close_batches(*self.batches)

    def _count_time(self) -> None:
        """Add the time since the last count to ``run.seconds`` (training time, evaluations and saves included)."""
        now = time.perf_counter()
        self.run.seconds += now - self.segment
        self.segment = now


def _progress_bar(run: Run) -> tqdm | None:
    if not (run.cfg.progress and run.dist.is_main):
        return None
    from tqdm import tqdm

    # disable=None: a bar on a terminal, nothing in a log file (the per-evaluation lines remain).
    return tqdm(
        total=run.cfg.steps, initial=run.step, desc="metapl", unit="step", dynamic_ncols=True, leave=False, disable=None
    )


class FinetunePhase:
    """The student finetuned for ``cfg.planned_finetune_steps()`` steps, continuing a stopped finetuning."""

    def __init__(self, run: Run, saver: CheckpointSaver, writer: Writer, resume_command: str) -> None:
        self.run, self.saver, self.writer = run, saver, writer
        self.resume_command = resume_command
        cfg = run.cfg
        self.opt = make_sgd(  # a fresh SGD for the student: training's settings at --finetune-lr
            unwrap(run.student),
            lr=cfg.finetune_lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
            device=run.device,
        )
        self.start = saver.restore_progress(self.opt)
        self.steps = cfg.planned_finetune_steps()
        self.batches = finetune_batches(run, self.start)
        self.loaders = eval_loaders(run.data, run.split, cfg.eval_batch_size, cfg.eval_limit, cfg.workers or 0)
        self.losses: list[torch.Tensor] = []
        self.accs: dict[str, float] = {}
        run.student.train()  # DDP-wrapped under torchrun: the ranks stay in step

    def step(self, done: int) -> None:
        """One supervised step of the student on the next labeled batch; its loss stays on the device."""
        run, cfg = self.run, self.run.cfg
        x, y = (t.to(run.device, non_blocking=True) for t in next(self.batches))
        out = supervised_step(
            run.student,
            self.opt,
            x,
            y,
            label_smoothing=cfg.label_smoothing,
            grad_clip=cfg.grad_clip,
            amp_dtype=run.amp_dtype,
            scaler=None,
        )
        self.losses.append(out["loss/student"])

    def syncs(self, done: int, last: bool) -> bool:
        return done % self.run.cfg.log_every == 0

    def record(self, done: int) -> None:
        if self.run.dist.is_main:
            self.writer.write(self.run.step + done, {"finetune/loss": torch.stack(self.losses).mean().item()})
            self.losses = []

    def evaluates(self, done: int, last: bool) -> bool:
        return done % self.run.cfg.schedule().eval_every == 0 or last

    def evaluate(self, done: int) -> None:
        """Refuse a diverged student (every rank), then score it and record it (main rank; {} on the others)."""
        run = self.run
        self.saver.refuse_nonfinite_student()
        if not run.dist.is_main:
            self.accs = {}
            return
        self.accs = self._score()
        self.writer.write(run.step + done, {f"eval/{k}": v for k, v in self.accs.items()})

    def _score(self) -> dict[str, float]:
        run = self.run
        return evaluate_sets({"finetuned": unwrap(run.student)}, self.loaders, run.device, amp_dtype=run.amp_dtype)

    def may_stop(self, done: int, last: bool) -> bool:
        return not last

    def saves(self, done: int, last: bool) -> bool:
        return False  # finetuned.pt is written once it is done (finish)

    def save(self, done: int) -> None:
        self.saver.save_progress(self.opt, done)

    def interrupted(self, done: int, stop: StopSignals) -> Exception:
        return self.saver.finetune_interrupted(done, stop, self.resume_command)

    def progressed(self) -> None:
        pass

    def close(self) -> None:
        """Stop the loader workers (also when the phase stops on an error)."""
        mdata.close_batches(self.batches)

    def finish(self) -> dict:
        """After the last step: ``finetuned.pt`` and the phase's figures for the summary (main rank; the step count on
        the others). ``--steps 0`` scores and saves the student as it is."""
        run = self.run
        if self.steps == 0 and run.dist.is_main:
            self.accs = self._score()
        result: dict[str, float] = {"finetune_steps": self.steps}
        if run.dist.is_main:
            logger.info(f"finetuned student: test accuracy {self.accs['finetuned_acc']:.2f}%")
            result.update(self.accs)
        self.saver.save_finetuned()
        return result
