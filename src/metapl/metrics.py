"""Where a run's numbers go: a JSONL file (one record per line) and, optionally, TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path

METRICS = "metrics.jsonl"


class MetricsWriter:
    """Appends ``{"step": s, key: value, ...}`` records to ``RUN_DIR/metrics.jsonl`` and mirrors them to TensorBoard.

    On resume from step ``s``, records after ``s`` (written by the killed run after its last checkpoint) are dropped
    first, so the file never holds a step twice.

    Args:
        run_dir: the run directory.
        tensorboard: also write TensorBoard event files under ``RUN_DIR/tb``.
        resume_step: the step the run resumes from, or None for a fresh run.
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / METRICS
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a")  # noqa: SIM115 - held for the run's life, closed by close()
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step)

    def write(self, step: int, values: dict[str, float]) -> None:
        """Record ``values`` (plain floats) at ``step``."""
        record = {
            "step": step,
            **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()},
        }
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and v is not None and not math.isnan(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        """Flush and close both outputs."""
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics file (a run directory means its ``metrics.jsonl``)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a kill mid-write; its step is rewritten after resume
    return records
