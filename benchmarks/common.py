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
