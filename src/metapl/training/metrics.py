"""Where a run's numbers go: a JSONL file (one record per line) and, optionally, TensorBoard and Weights & Biases."""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from metapl.errors import UserError, reporting_os_errors
from metapl.rundir.layout import METRICS, TENSORBOARD, WANDB_ID

if TYPE_CHECKING:
    from metapl.config.fields import TrainConfig


class MetricsWriter:
    """Appends ``{"step": s, key: value, ...}`` records to ``RUN_DIR/metrics.jsonl`` and mirrors them to TensorBoard
    and Weights & Biases.

    On resume from step ``s``, records after ``s`` (written by the killed run after its last checkpoint) are dropped
    first, so the file never holds a step twice; a line torn by a kill mid-write is dropped too. A file that cannot
    be written (disk full, read-only) is a ``UserError`` naming it.

    Args:
        run_dir: the run directory.
        tensorboard: also write TensorBoard event files under ``RUN_DIR/tb``.
        resume_step: the step the run resumes from, or None for a fresh run.
        wandb: the run's config (``TrainConfig.to_dict()``) to also log to W&B (into its ``wandb_project``), or None.
    """

    def __init__(
        self, run_dir: str | Path, *, tensorboard: bool, resume_step: int | None = None, wandb: dict | None = None
    ) -> None:
        self.path = Path(run_dir) / METRICS
        with reporting_os_errors(self.path):
            if self.path.exists() and (resume_step is not None or _torn(self.path)):
                kept = [r for r in read_metrics(self.path) if resume_step is None or r["step"] <= resume_step]
                self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            self._file = open(self.path, "a")  # noqa: SIM115 - held for the run's life, closed by close()
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / TENSORBOARD), purge_step=resume_step)
        self._wandb = None if wandb is None else _start_wandb(Path(run_dir), wandb)

    @classmethod
    def for_run(cls, cfg: TrainConfig, run_dir: str | Path, resume_step: int | None = None) -> MetricsWriter:
        """The writer of a ``TrainConfig``'s run: TensorBoard and W&B as its options say (rank 0 only)."""
        wandb = cfg.to_dict() if cfg.wandb else None
        return cls(run_dir, tensorboard=cfg.tensorboard, resume_step=resume_step, wandb=wandb)

    def write(self, step: int, values: dict[str, float]) -> None:
        """Record ``values`` (plain floats) at ``step``."""
        record = {
            "step": step,
            **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()},
        }
        with reporting_os_errors(self.path):
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not math.isnan(v)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            # W&B keeps a run's steps increasing: after a resume, the steps it already holds are not sent again
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        """Flush and close every output."""
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class NullWriter:
    """What ranks other than 0 get in place of a ``MetricsWriter``: they write no files."""

    def write(self, step: int, values: dict[str, float]) -> None:
        """Drop the record."""

    def close(self) -> None:
        """Nothing to close."""


Writer = MetricsWriter | NullWriter  # a run's metrics writer: rank 0's MetricsWriter, the other ranks' NullWriter


def require_wandb() -> ModuleType:
    """The ``wandb`` module, or a ``UserError`` saying how to install it (checked before a run writes anything)."""
    try:
        import wandb
    except ImportError:
        raise UserError('--wandb needs the optional package wandb: pip install "metapl[wandb]"') from None
    return wandb


def _start_wandb(run_dir: Path, config: dict) -> Any:  # a wandb Run
    """Start (or, for a run folder that has one, continue) the folder's W&B run, its files under ``RUN_DIR/wandb``.

    The run id is kept in ``RUN_DIR/wandb-id``: a resumed run logs into the same W&B run (an id derived from the
    folder's path would change when the folder moves, and repeat after ``--overwrite``, which deletes the file).
    """
    wandb = require_wandb()
    id_path = run_dir / WANDB_ID
    with reporting_os_errors(id_path):
        if not id_path.exists():
            id_path.write_text(secrets.token_hex(4) + "\n")
        run_id = id_path.read_text().strip()
    try:  # console="off": train.log already keeps the terminal, and W&B's capture would wrap the progress bar's stream
        return wandb.init(
            project=config.get("wandb_project"),
            dir=str(run_dir),
            config=config,
            name=run_dir.resolve().name,
            id=run_id,
            resume="allow",
            settings=wandb.Settings(console="off"),
        )
    except wandb.errors.Error as e:  # not logged in, no network, a refused project
        raise UserError(f"--wandb: {str(e).splitlines()[0]}; run `wandb login`, or set WANDB_MODE=offline") from None


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics file (a run directory means its ``metrics.jsonl``).

    A last line torn by a kill mid-write is skipped (a resumed run rewrites its step); any other line that is not a
    JSON record with an integer ``step`` is a ``UserError`` naming the file and the line.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    with reporting_os_errors(path, "read"):
        raw = path.read_bytes()
    lines = raw.split(b"\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict) or type(record.get("step")) is not int:
                raise ValueError("not a record with an integer step")
        except ValueError as e:  # also UnicodeDecodeError and JSONDecodeError
            if number == len(lines):  # the last line, without its newline: torn by a kill; its step is rewritten
                continue
            raise UserError(
                f"{path} line {number} is damaged ({str(e).splitlines()[0][:80]}); delete that line and try again"
            ) from None
        records.append(record)
    return records


def _torn(path: Path) -> bool:
    """Whether the file's last line lacks its newline (a kill mid-write)."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"
