"""Helpers shared by the benchmark scripts.

Importing this module also puts the repository's ``src/`` on ``sys.path`` when ``metapl`` is not installed, so that
the scripts run from a bare checkout (the GPU machine has PyTorch but no ``pip install -e .`` of this project).
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"

if importlib.util.find_spec("metapl") is None and SRC.is_dir():
    sys.path.insert(0, str(SRC))


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``).

    Returns:
        At least 1.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS and Windows have no affinity mask
        return max(1, os.cpu_count() or 1)


def median(values: list[float]) -> float:
    """The median of a non-empty list.

    Args:
        values: numbers.

    Returns:
        The median (mean of the two middle values for an even count).
    """
    return statistics.median(values)


def child_env() -> dict[str, str]:
    """The environment for a child Python process of this repository: ``src/`` first on ``PYTHONPATH``, unbuffered.

    Returns:
        A copy of ``os.environ`` with those two changes.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def train_once(out: Path, values: dict, log_line: str | None = None) -> dict:
    """One ``metapl train`` run from a flat dict of config values, unless ``out/summary.json`` already exists.

    A run killed before its summary is started again from scratch (benchmark runs are short and one run per
    command, so a sweep can be killed and resumed at any time).

    Args:
        out: the run directory.
        values: ``TrainConfig`` field values (``out`` is set here).
        log_line: printed with the summary's accuracies when the run finishes (e.g. "fashion uda seed 0").

    Returns:
        The run's summary dict, with ``wall_seconds`` added.
    """
    import shutil
    import time

    from metapl.engine.config import TrainConfig
    from metapl.engine.run_dir import SUMMARY, read_summary, write_summary
    from metapl.engine.train import train

    if (out / SUMMARY).exists():
        return read_summary(out)
    if out.exists():
        shutil.rmtree(out)
    cfg = TrainConfig(**{**values, "out": str(out)})
    start = time.perf_counter()
    summary = train(cfg, log=lambda *a, **k: None)
    summary["wall_seconds"] = round(time.perf_counter() - start, 1)
    write_summary(out, summary)
    if log_line:
        accs = {k: round(v, 2) for k, v in summary.items() if k.endswith("_acc") and v is not None}
        print(f"{log_line}: {accs} ({summary['wall_seconds']:.0f} s)", flush=True)
    return summary


def last_evaluations(run: Path, key: str, count: int = 5) -> list[float]:
    """The last ``count`` logged values of ``eval/KEY`` in a run's ``metrics.jsonl`` (oldest first)."""
    from metapl.engine.metrics import read_metrics

    return [r[f"eval/{key}"] for r in read_metrics(run) if r.get(f"eval/{key}") is not None][-count:]
