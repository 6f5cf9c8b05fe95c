"""The soak benchmark (issue 29): one long run with evaluation, saving and logging cycling, then resumed and extended,
while its process is watched for slow leaks.

A child process trains digits (bundled, no files) through the library: ``--steps`` steps, then the same run resumed
with its length extended to ``--extend-to`` (in the same process, so that whatever the first ``train()`` call leaves
behind is still there in the second). Every ``--every`` steps it evaluates and saves; it logs every ``--log-every``
steps, to ``metrics.jsonl``, ``train.log`` and TensorBoard. This process samples the child every ``--interval``
seconds: its resident memory (``VmRSS``), open file descriptors, threads, child processes (data-loader workers) and
the run folder's size, split into the files a run keeps (checkpoints, config, split) and its logs. It writes the
samples (``soak.json``, with ``harness.record``'s stamp) and their curves (``soak.png``), and prints the growth of
each after the warm-up (the first ``--warmup`` share of the samples) against the targets:

* resident memory grows by less than 50 MB;
* descriptors, threads and child processes are flat (the median of the last tenth equals that of the first tenth);
* the kept files stay within the kept set plus one file being replaced (an atomic save writes a temporary copy);
* the logs grow linearly: bytes per training step within a factor 2 between the two phases.

    python -m benchmarks.soak                                # 30,000 steps, extended to 40,000: ~15 min on 2 cores
    python -m benchmarks.soak --steps 40 --extend-to 60 --every 20 --log-every 10 --interval 0.2   # a smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.harness import REPO, RESULTS, child_env, git_revision, record

OUT_DIR = RESULTS / "soak"
RSS_LIMIT_MB = 50.0
LOG_FILES = ("metrics.jsonl", "train.log")  # with everything under tb/: the files that grow with the run
STEP_LINE = re.compile(r"^step (\d+):")


def _engine():
    """Every trainer import of this benchmark, in one place."""
    from metapl.config.fields import TrainConfig
    from metapl.logs import console
    from metapl.protocol.rows import train_row
    from metapl.training.trainer import train

    return TrainConfig, train_row, train, console


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=30_000, help="steps of the first phase")
    p.add_argument("--extend-to", type=int, default=40_000, help="the resumed run's --steps (more than --steps)")
    p.add_argument("--every", type=int, default=250, help="evaluate and save every this many steps")
    p.add_argument("--log-every", type=int, default=50, help="log the training metrics every this many steps")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    p.add_argument("--warmup", type=float, default=0.1, help="share of the samples left out as warm-up")
    p.add_argument("--root", default=str(REPO / "runs" / "soak"), help="the run folder (deleted first)")
    p.add_argument("--cache-dir", default=None, help="decoded-image cache (digits caches nothing)")
    p.add_argument("--out-dir", default=str(OUT_DIR), help="where soak.json and soak.png go")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # the training process itself
    return p


def run_values(args: argparse.Namespace) -> dict:
    """The run's ``TrainConfig`` values: small digits batches, one loader worker, every output on."""
    return dict(
        dataset="digits",
        num_labeled=50,
        batch_size=8,
        mu=2,
        steps=args.steps,
        workers=1,
        threads=1,
        device="cpu",
        eval_every=args.every,
        save_every=args.every,
        log_every=args.log_every,
        tensorboard=True,
        progress=False,
        cache_dir=args.cache_dir,
        out=args.root,
    )


def child(args: argparse.Namespace) -> int:
    """Train the run, then resume it extended to ``--extend-to`` in this same process; phases marked on stdout."""
    TrainConfig, train_row, train, console = _engine()
    cfg = TrainConfig(**run_values(args))
    print("PHASE train", flush=True)
    with console():
        train_row(cfg, fresh=True)
    print("PHASE extend", flush=True)
    with console():
        train(dataclasses.replace(cfg, steps=args.extend_to), resume=True)
    print("PHASE done", flush=True)
    return 0


# -- sampling -----------------------------------------------------------------------------------------------------


def _status(pid: int) -> dict[str, int]:
    """VmRSS (kB) and Threads of ``/proc/PID/status``."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                out[key] = int(value.split()[0])
    return out


def _children(pid: int) -> int:
    """How many live processes have ``pid`` as their parent (the data-loader workers)."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # it ended meanwhile
                continue
            count += fields[0] != "Z" and int(fields[1]) == pid
    return count


def folder_bytes(run: Path) -> tuple[int, int]:
    """``(kept, logs)``: bytes of the files a run keeps (checkpoints, config, split, ...) and of its logs."""
    kept = logs = 0
    for root, _, files in os.walk(run):
        for name in files:
            try:
                size = os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # a temporary file renamed meanwhile
                continue
            if name in LOG_FILES or Path(root).name == "tb":
                logs += size
            else:
                kept += size
    return kept, logs


def sample(pid: int, run: Path, start: float, step: int, phase: str) -> dict:
    """One sample of the training process and its run folder."""
    status = _status(pid)
    kept, logs = folder_bytes(run)
    return {
        "t": round(time.monotonic() - start, 2),
        "phase": phase,
        "step": step,
        "rss_mb": round(status["VmRSS"] / 1024, 2),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": status["Threads"],
        "children": _children(pid),
        "kept_mb": round(kept / 2**20, 4),
        "logs_mb": round(logs / 2**20, 4),
    }


def watch(args: argparse.Namespace) -> tuple[list[dict], int]:
    """Start the training child and sample it until it ends; returns ``(samples, its exit status)``."""
    run = Path(args.root)
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "benchmarks.soak", "--child", *sys.argv[1:]] if args.argv is None else args.argv
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    seen = {"step": 0, "phase": "start"}

    def read_output():
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith("PHASE "):
                seen["phase"] = line.split()[1]
                print(line, flush=True)
            elif match := STEP_LINE.match(line):
                seen["step"] = int(match.group(1))
            elif "rror" in line or "Traceback" in line:
                print(line, flush=True)

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    samples, start = [], time.monotonic()
    while proc.poll() is None:
        try:
            samples.append(sample(proc.pid, run, start, seen["step"], seen["phase"]))
        except (FileNotFoundError, ProcessLookupError, KeyError):  # it ended between poll() and the reads
            break
        time.sleep(args.interval)
    rc = proc.wait()
    reader.join(timeout=10)
    return samples, rc


# -- the figures ----------------------------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def growth(samples: list[dict], key: str, warmup: float) -> dict:
    """A quantity after the warm-up: the medians of its first and last tenth, their difference, its range."""
    after = samples[int(len(samples) * warmup) :] or samples
    tenth = max(1, len(after) // 10)
    first, last = _median([s[key] for s in after[:tenth]]), _median([s[key] for s in after[-tenth:]])
    values = [s[key] for s in after]
    return {"first": first, "last": last, "growth": round(last - first, 4), "min": min(values), "max": max(values)}


def log_rate(samples: list[dict], phase: str) -> float | None:
    """Log bytes per training step within one phase (None without two samples at different steps)."""
    inside = [s for s in samples if s["phase"] == phase and s["step"] > 0]
    if len(inside) < 2 or inside[-1]["step"] == inside[0]["step"]:
        return None
    a, b = inside[0], inside[-1]
    return round((b["logs_mb"] - a["logs_mb"]) * 2**20 / (b["step"] - a["step"]), 2)


def evaluate(samples: list[dict], run: Path, warmup: float) -> dict:
    """Each figure against its target."""
    figures = {key: growth(samples, key, warmup) for key in ("rss_mb", "fds", "threads", "children", "kept_mb")}
    kept_files = [p.stat().st_size for p in run.iterdir() if p.is_file()] if run.is_dir() else [0]
    bound_mb = (sum(kept_files) + max(kept_files, default=0)) / 2**20
    rates = {phase: log_rate(samples, phase) for phase in ("train", "extend")}
    ratio = rates["extend"] / rates["train"] if rates["train"] and rates["extend"] else None
    rss = figures["rss_mb"]["growth"]
    targets = {
        "rss_growth_mb": (rss, f"< {RSS_LIMIT_MB:g}", rss < RSS_LIMIT_MB),
        "fds_growth": (figures["fds"]["growth"], "<= 0", figures["fds"]["growth"] <= 0),
        "threads_growth": (figures["threads"]["growth"], "<= 0", figures["threads"]["growth"] <= 0),
        "children_growth": (figures["children"]["growth"], "<= 0", figures["children"]["growth"] <= 0),
        "kept_peak_mb": (figures["kept_mb"]["max"], f"<= {bound_mb:.2f}", figures["kept_mb"]["max"] <= bound_mb),
        "log_rate_ratio": (ratio, "in [0.5, 2]", ratio is not None and 0.5 <= ratio <= 2),
    }
    return {
        "figures": figures,
        "log_bytes_per_step": rates,
        "targets": {k: {"value": v, "target": t, "met": bool(ok)} for k, (v, t, ok) in targets.items()},
    }


def plot(samples: list[dict], path: Path, warmup: float) -> None:
    """The four curves against time, the warm-up shaded and the resume marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] / 60 for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
    panels = (
        ("resident memory (MB)", [("rss_mb", "RSS (start-up clipped)")]),
        ("count", [("fds", "open fds"), ("children", "child processes")]),
        ("threads", [("threads", "threads")]),
        ("run folder (MB)", [("kept_mb", "kept files"), ("logs_mb", "logs")]),
    )
    resumed = next((s["t"] / 60 for s in samples if s["phase"] == "extend"), None)
    for ax, (label, series) in zip(axes, panels, strict=True):
        for key, name in series:
            ax.plot(t, [s[key] for s in samples], label=name, lw=1)
        if samples:
            ax.axvspan(0, t[int(len(t) * warmup)], color="0.9", lw=0)
        if resumed is not None:
            ax.axvline(resumed, color="k", ls="--", lw=0.8)
        ax.set_ylabel(label)
        ax.legend(loc="upper left", fontsize=8)
    after = [s["rss_mb"] for s in samples[int(len(samples) * warmup) :]]
    if after:  # the scale of the growth, not of the start-up: 50 MB must show
        axes[0].set_ylim(min(after) - 2 * RSS_LIMIT_MB, max(after) + 2 * RSS_LIMIT_MB)
    axes[-1].set_xlabel("minutes (grey: warm-up; dashed: resumed and extended)")
    fig.suptitle("soak: digits, evaluation and checkpoint every few hundred steps")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the soak (or, with ``--child``, be its training process) and print its figures against the targets."""
    args = get_args_parser().parse_args(argv)
    if args.extend_to <= args.steps:
        get_args_parser().error(f"--extend-to {args.extend_to} must exceed --steps {args.steps}")
    if args.child:
        return child(args)
    args.argv = None if argv is None else [sys.executable, "-m", "benchmarks.soak", "--child", *argv]
    began, revision = time.time(), git_revision()  # the code that runs; record() stamps the tree when it ends
    samples, rc = watch(args)
    result = {
        "revision_at_start": revision,
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "argv")},
        "run": run_values(args),
        "exit_status": rc,
        "wall_seconds": round(time.time() - began, 1),
        **evaluate(samples, Path(args.root), args.warmup),
        "samples": samples,
    }
    out = Path(args.out_dir)
    record(out / "soak.json", result)
    plot(samples, out / "soak.png", args.warmup)
    print(f"{len(samples)} samples over {result['wall_seconds']:.0f} s; training exit status {rc}")
    for name, target in result["targets"].items():
        print(f"{name:>16}: {target['value']} (target {target['target']}): {'met' if target['met'] else 'MISSED'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
