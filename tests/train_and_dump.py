"""``metapl train`` as torchrun runs it, plus a dump of this rank's final weights (a helper of test_multinode.py).

Usage: ``torchrun ... tests/train_and_dump.py DUMP_DIR TRAIN_ARGS...``. Ranks other than 0 write no run files, so
to compare the replicas the test needs each rank's weights: this script wraps ``build_run`` to keep the ``Run`` the
trainer builds, runs ``metapl train`` unchanged, then saves the parameters of the unwrapped teacher, student and EMA
student to ``DUMP_DIR/rank{RANK}.pt``. Nothing in the package is changed for the test. Buffers are left out:
BatchNorm's running statistics stay per rank by design (``metapl.training.process.wrap_ddp``; rank 0's are
checkpointed).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

import metapl.training.trainer as train_module
from metapl.commands.cli import main
from metapl.core import unwrap


def run_and_dump(dump_dir: Path, argv: list[str]) -> int:
    """Run ``metapl train argv``; save this rank's final parameters when it succeeded.

    Args:
        dump_dir: folder of the dumps (created).
        argv: the ``metapl train`` arguments.

    Returns:
        ``metapl``'s exit status.
    """
    runs = []
    build_run = train_module.build_run

    def keeping_build_run(*args, **kwargs):
        runs.append(build_run(*args, **kwargs))
        return runs[-1]

    train_module.build_run = keeping_build_run
    status = main(["train", *argv])
    if status == 0:
        run = runs[-1]
        models = {"teacher": unwrap(run.teacher), "student": unwrap(run.student)}
        if run.ema is not None:
            models["ema"] = run.ema.module
        weights = {role: {k: p.detach() for k, p in m.named_parameters()} for role, m in models.items()}
        dump_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"step": run.step, **weights}, dump_dir / f"rank{os.environ.get('RANK', '0')}.pt")
    return status


if __name__ == "__main__":
    sys.exit(run_and_dump(Path(sys.argv[1]), sys.argv[2:]))
