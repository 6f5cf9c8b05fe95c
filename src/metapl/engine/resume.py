"""What may change when a run is resumed: the runtime options, and its length (``--resume RUN --steps N``).

A resumed run must compute what the uninterrupted run would have, so every option that alters the math (mode,
learning rates, ``num_labeled``, seed, models, ...) must equal the one its checkpoint was trained with; an edit of the
run's ``config.yaml`` is refused with one line naming the keys. The options of ``RUNTIME_KEYS`` (where and how fast the
run executes) may change, so a run can move to another machine.

Extending a run: ``--steps N`` with N above the step the run has reached re-plans both learning-rate schedules. The
rule: from the current step k on, each schedule is the one of a run planned for N steps (``warmup_cosine`` with
``total_steps=N`` and the same wait and warm-up), so the learning rate at k becomes that schedule's value at k (a warm
restart when a finished run is extended: its rate was 0) and decays by the cosine to 0 at N. The steps before k are
kept as trained. The re-plan depends only on k and N, and the extended run's checkpoints record N, so stopping and
resuming an extended run continues it bit for bit. A finished run that was finetuned is finetuned again after the
extension, on the extended student (``finetuned.pt`` is replaced; ``finetune_steps`` left unset is a tenth of N).
"""

from __future__ import annotations

from pathlib import Path

from metapl.engine.config import RUNTIME_KEYS, TrainConfig, config_from_dict
from metapl.engine.run_dir import CONFIG
from metapl.errors import UserError, few

# Not compared: the folder (a run may be moved) and the length (re-planned, see above).
_UNCOMPARED = RUNTIME_KEYS | {"out", "steps"}


def check_resume(cfg: TrainConfig, ckpt: dict, run_dir: Path) -> None:
    """Refuse resuming ``ckpt`` with ``cfg`` when an option that alters the math differs, or ``--steps`` is too low.

    Args:
        cfg: the config the run would continue with (its ``config.yaml`` and the flags given with ``--resume``).
        ckpt: the checkpoint it continues from.
        run_dir: the run folder, for messages.

    Raises:
        UserError: naming the changed keys with both values, or a ``--steps`` at or below the run's step.
    """
    try:
        saved = config_from_dict(ckpt["config"]).to_dict()
    except UserError:  # a checkpoint of another metapl version whose values no longer pass: nothing to compare with
        return
    now = cfg.to_dict()
    changed = [k for k in now if k not in _UNCOMPARED and k in saved and now[k] != saved[k]]
    if changed:
        diffs = [f"{k} {now[k]!r} (trained with {saved[k]!r})" for k in changed]
        raise UserError(
            f"{run_dir / CONFIG} differs from the config the checkpoint was trained with in {few(diffs, 4)}; these "
            "change the training: put the saved values back, or start a new run with another --out (on resume only "
            "--steps and the runtime options may change)"
        )
    step = int(ckpt["step"])
    if cfg.steps != saved["steps"] and cfg.steps <= step:
        raise UserError(
            f"--steps {cfg.steps} does not extend the run in {run_dir}: it has trained {step} steps; give more"
        )


def replan_schedules(run, saved_steps: int) -> None:
    """After restoring a run whose length changed (``run.cfg.steps`` != ``saved_steps``), set each optimizer's
    learning rate to its N-step schedule's value at the current step (the module docstring's rule).

    The schedulers were built for ``run.cfg.steps`` and hold the restored step; only the rates already set in the
    optimizers come from the old plan.
    """
    if run.cfg.steps == saved_steps:
        return
    for sched in (run.t_sched, run.s_sched):
        for group, base, multiplier in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * multiplier(sched.last_epoch)  # as LambdaLR computes it
        sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]
