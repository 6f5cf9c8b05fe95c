"""The one harness of the benchmarks: data root, runs, stamps, paired-seed statistics and result files.

* **Data root** (one place): a relative ``data_dir`` in a benchmark recipe names a file or folder under the data root:
  ``--data-root`` where a benchmark has it, else ``$METAPL_DATA_ROOT``, else ``../shared/data`` beside the repository
  (the folder the tests read too). The library itself takes ``--data-dir`` as given; only the benchmarks resolve.
* **Runs** go through the library: values are checked by ``TrainConfig`` (the config layer; a recipe with a row's
  changes reads as ``config_from_dict`` reads it: the options that do nothing with the row's method fall back to their
  defaults), shipped recipes are read with ``load_yaml`` (its key and value checks), and
  ``metapl.protocol.rows.train_row`` trains. A finished run (its
  ``summary.json`` exists) is skipped, so a table is built one run per command and resumed at will; a killed one is
  trained again from scratch (its wall time stays one process's).
* **Stamps**: date, machine and git revision, written beside every result (``record``).
* **Paired seeds**: ``paired_lines`` turns per-seed figures into Markdown rows of differences with 95 % t-intervals
  (the statistics live in ``metapl.protocol.paired``, which ``metapl compare`` uses too).

Run the benchmarks as modules from the repository root: ``python -m benchmarks.ablation ...``; where ``metapl`` is
not installed (a bare GPU machine), put ``src`` on the path: ``PYTHONPATH=src python3 -m benchmarks.gpu_check``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from metapl.protocol.paired import mean_sd, paired_interval
from metapl.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
RESULTS = REPO / "benchmarks" / "results"
DATA_ENV = "METAPL_DATA_ROOT"
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data"
_data_root: Path | None = None  # --data-root, once given

__all__ = ["mean_sd", "paired_interval", "read_metrics"]  # re-exported for the benchmarks


def protocol_model(summary: dict) -> str:
    """The model the ablation and Reduced-MPL protocols report, as they were measured: the finetuned student of a
    pseudo-label run, the student of a labels-only one (not the run's result, which those protocols predate)."""
    return "finetuned" if summary.get("finetuned_acc") is not None else "student"


def set_data_root(path: str | Path | None) -> None:
    """Use ``path`` as the data root for the rest of this process (``--data-root``); None keeps the default."""
    global _data_root
    _data_root = Path(path) if path else None


def data_root() -> Path:
    """The data root: ``--data-root``, else ``$METAPL_DATA_ROOT``, else ``../shared/data`` beside the repository."""
    if _data_root is not None:
        return _data_root
    return Path(os.environ[DATA_ENV]) if os.environ.get(DATA_ENV) else DEFAULT_DATA_ROOT


def data_path(name: str | Path) -> Path:
    """``name`` under the data root, unless it is absolute."""
    path = Path(name)
    return path if path.is_absolute() else data_root() / path


def resolve_data_dir(values: dict) -> dict:
    """A copy of run values whose relative ``data_dir`` now points under the data root."""
    if values.get("data_dir"):
        return {**values, "data_dir": str(data_path(values["data_dir"]))}
    return dict(values)


def shipped_recipe(name: str) -> dict:
    """A shipped config's values, read and checked by the config layer (``load_yaml``, then ``TrainConfig``)."""
    from metapl.config.fields import TrainConfig
    from metapl.config.recipes import find_config, load_yaml

    values = load_yaml(find_config(name))
    TrainConfig(**values)  # the cross-field checks too
    return values


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS and Windows have no affinity mask
        return max(1, os.cpu_count() or 1)


def median(values: list[float]) -> float:
    """The median of a non-empty list."""
    return statistics.median(values)


def child_env() -> dict[str, str]:
    """The environment of a child Python process of this repository: ``src/`` first on ``PYTHONPATH``, unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def git_revision() -> str | None:
    """The checkout's short revision, with ``+dirty`` when tracked files differ from it; None outside git."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=REPO, capture_output=True, text=True)
    except OSError:
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def stamp() -> dict:
    """Date (UTC), machine and git revision of a measurement."""
    import torch

    machine = f"{platform.machine()}, {available_cpus()} CPUs, torch {torch.__version__}"
    if torch.cuda.is_available():
        machine += ", " + torch.cuda.get_device_name(0)
    now = datetime.datetime.now(datetime.timezone.utc)
    return {"date": now.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine, "revision": git_revision()}


def command_line() -> str:
    """This process's command line as it would be typed from the repository root."""
    module = sys.modules["__main__"].__spec__
    head = f"python -m {module.name}" if module is not None else f"python {sys.argv[0]}"
    return " ".join([head, *sys.argv[1:]])


def record(path: str | Path, data, command: str | None = None) -> Path:
    """Write ``data`` as JSON to ``path`` (its shape untouched) and the command that made it, with the stamp, as the
    line for that file in ``command.txt`` beside it (one line per result file, replaced when rewritten)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    s = stamp()
    line = f"{path.name}: {command or command_line()}  # {s['date']}, {s['machine']}, revision {s['revision']}"
    log = path.parent / "command.txt"
    kept = [x for x in log.read_text().splitlines() if not x.startswith(f"{path.name}: ")] if log.exists() else []
    log.write_text("\n".join([*kept, line]) + "\n")
    return path


def train_once(out: Path, values: dict, log_line: str | None = None) -> dict:
    """One training run through the library unless ``out/summary.json`` exists; returns its summary.

    Args:
        out: the run directory.
        values: ``TrainConfig`` field values (``out`` is set here; a relative ``data_dir`` is under the data root).
        log_line: printed with the summary's accuracies when the run finishes (e.g. "fashion uda seed 0").

    Returns:
        The run's summary dict, with ``wall_seconds`` added.
    """
    from metapl.config.fields import config_from_dict
    from metapl.logs import quiet
    from metapl.protocol.rows import train_row
    from metapl.rundir.layout import SUMMARY, read_summary, write_summary

    if (out / SUMMARY).exists():
        return read_summary(out)
    cfg = config_from_dict({**resolve_data_dir(values), "out": str(out)})  # a recipe switched to the row's method
    start = time.perf_counter()
    with quiet():  # the runs' own lines are in their train.log
        summary, _ = train_row(cfg, fresh=out.exists())
    summary["wall_seconds"] = round(time.perf_counter() - start, 1)
    write_summary(out, summary)
    if log_line:
        accs = {k: round(v, 2) for k, v in summary.items() if k.endswith("_acc") and v is not None}
        print(f"{log_line}: {accs} ({summary['wall_seconds']:.0f} s)", flush=True)
    return summary


def last_evaluations(run: Path, key: str, count: int = 5) -> list[float]:
    """The last ``count`` logged values of ``eval/KEY`` in a run's ``metrics.jsonl`` (oldest first)."""
    return [r[f"eval/{key}"] for r in read_metrics(run) if r.get(f"eval/{key}") is not None][-count:]


def add_run_arguments(p: argparse.ArgumentParser, *, root: str, seeds: str = "0,1,2") -> None:
    """The flags every run-table benchmark shares: seeds, run root, step override, caches, data root, report."""
    p.add_argument("--seeds", default=seeds)
    p.add_argument("--root", default=root, help="where the runs go")
    p.add_argument("--steps", type=int, default=None, help="override the step budget (smoke tests)")
    p.add_argument("--cache-dir", default=None, help="decoded-image cache (default: metapl's)")
    p.add_argument("--data-root", default=None, help=f"where the data sets are (default ${DATA_ENV} or ../shared/data)")
    p.add_argument("--report", action="store_true", help="print the tables of the finished runs instead")
    p.add_argument("--json", default=None, help="with --report: write every run's figures (per seed) here")


def run_rows(parser: argparse.ArgumentParser, args: argparse.Namespace, rows: dict, groups: dict, run) -> None:
    """Train ``args.rows`` (names or groups) for each of ``args.seeds``, seed by seed: ``run(row, seed)``."""
    names = [r for item in args.rows.split(",") for r in groups.get(item, [item])]
    unknown = [r for r in names if r not in rows]
    if unknown:
        parser.error(f"unknown row(s) {unknown}; choose from {', '.join(rows)} or a group ({', '.join(groups)})")
    for seed in (int(s) for s in args.seeds.split(",")):
        for row in dict.fromkeys(names):
            run(row, seed)


def paired_lines(runs: dict[str, dict[int, dict]], pairs: list[tuple[str, str]]) -> list[str]:
    """Markdown rows of the paired differences row − partner with 95 % intervals, for the final models and again for
    the students before finetuning (a labels-only partner has no finetuning: its final model is its student)."""
    lines = []
    for key, suffix in (("final", ""), ("student", " (before finetuning)")):
        for row, partner in pairs:
            if row not in runs or partner not in runs:
                continue
            other = "final" if partner.endswith("labels-only") else key
            stats = paired_interval(
                {s: v[key] for s, v in runs[row].items()}, {s: v[other] for s, v in runs[partner].items()}
            )
            if stats is not None:
                mean, half, n = stats
                interval = f"[{mean - half:+.2f}, {mean + half:+.2f}]"
                lines.append(f"| {row} − {partner}{suffix} | {n} | {mean:+.2f} | {interval} |")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Child commands under a time budget, logged (the GPU check)


class Log:
    """Prints lines and appends them to a file."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "a")  # noqa: SIM115 - held for the check's life, closed by close()

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()

    def close(self) -> None:
        """Close the file."""
        self.file.close()


def stream(cmd: list[str], log: Log, *, timeout_s: float | None, on_line=None) -> tuple[int, bool]:
    """Run ``cmd`` from the repository root (``child_env``: ``src`` on the path), logging its output line by line;
    interrupt it after ``timeout_s``.

    Args:
        cmd: the command.
        log: where its output goes.
        timeout_s: seconds until it is sent SIGINT (then killed 20 s later if still running); None = no limit.
        on_line: called with each output line (without its newline) as it arrives.

    Returns:
        (exit status, whether it was interrupted for the time limit).
    """
    log("$ " + " ".join(cmd))
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    stopped = threading.Event()

    def interrupt():
        if proc.poll() is None:
            stopped.set()
            proc.send_signal(signal.SIGINT)  # the trainer stops cleanly; metrics.jsonl keeps what was logged
            _daemon_timer(20, lambda: proc.poll() is None and proc.kill())

    timer = _daemon_timer(timeout_s, interrupt) if timeout_s is not None else None
    for line in proc.stdout:
        line = line.rstrip("\n")
        log(line)
        if on_line is not None:
            on_line(line)
    rc = proc.wait()
    if timer is not None:
        timer.cancel()
    return rc, stopped.is_set()


def _daemon_timer(seconds: float, fn) -> threading.Timer:
    timer = threading.Timer(seconds, fn)
    timer.daemon = True  # a pending timer must not keep the check alive after its command ended
    timer.start()
    return timer
