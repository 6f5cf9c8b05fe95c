"""GPU check: the step-speed benchmark under AMP, then a short CIFAR-10-4K training, with the projected wall time of
the paper's full 300k-step protocol. Runs in under 8 minutes on one H100 and downloads nothing.

One command, from the repository root of a CUDA machine (PyTorch, torchvision, PyYAML, scikit-learn, Pillow, tqdm and
tensorboard must be importable; ``metapl`` itself need not be installed when ``src`` is on ``PYTHONPATH``):

    PYTHONPATH=src python3 -m benchmarks.gpu_check                       # data: .devdata/cifar10-jpeg.tar.gz
    PYTHONPATH=src python3 -m benchmarks.gpu_check --data PATH --steps 2000 --eval-every 1000

With the device tool, after ``mkdir -p .devdata && cp ../shared/data/cifar10-jpeg.tar.gz .devdata/`` (git-ignored; carry
the archive alone, not .devdata/cache, whose decoded arrays exceed the 64 MiB that travels):

    run(command="PYTHONPATH=src python3 -m benchmarks.gpu_check", carry=[".devdata/cifar10-jpeg.tar.gz"], timeout_s=600)

Smoke test on the CPU (digits data set, small_cnn, 2 steps): ``python -m benchmarks.gpu_check --tiny`` or
``TINY=1 python -m benchmarks.gpu_check``.

What it does:
  (a) prints the GPU's name (``nvidia-smi``);
  (b) ``python -m benchmarks.step_speed --device cuda --amp bf16 --channels-last --models wrn28_2 --shapes paper``
      (hard-taylor, hard-dot, soft and the ideal floor);
  (c) ``python -m metapl train --config cifar10_4k`` for ``--steps`` steps (default 2000) on CIFAR-10 with
      bf16, channels_last, 8 loader workers and the views made on the GPU (``--augment-on device``; ``--augment-on
      loader`` for the Pillow path, ``--compile`` to add torch.compile), ``--s-wait-steps 0`` so that every step
      runs the full MPL update (the recipe's student waits 3k steps, which would make a short run time only the
      teacher), no finetuning;
      then reads RUN_DIR/metrics.jsonl and prints ms/step, images/s, the EMA student's accuracy, the peak GPU memory
      (``nvidia-smi`` memory.used, sampled every second: the whole process, CUDA context and allocator cache
      included) and the projected wall time of 300k steps: steps alone (median ms/step × 300k), and with evaluation
      and checkpoint every 1000 steps (the wall time between the last two evaluations, scaled);
  (d) writes gpu_check.log, step_speed.json, train_metrics.jsonl, train_config.yaml and summary.json into ``$OUT``
      when set (the device tool's output folder), else ``./gpu_check_out``.

The whole check stops itself within ``--budget-s`` (default 450 s): the training is interrupted when the budget runs
out, and the figures come from the steps that ran.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.harness import REPO, Log, median, stamp, stream

PROTOCOL_STEPS = 300_000
CONFIG = "cifar10_4k"  # the shipped src/metapl/configs/cifar10_4k.yaml, by name
DEFAULT_DATA = ".devdata/cifar10-jpeg.tar.gz"
SUMMARY_MARGIN_S = 20  # kept back from the budget for copying files and the summary


def get_args_parser() -> argparse.ArgumentParser:
    """The command-line flags of the GPU check.

    Returns:
        The parser.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help=f"CIFAR-10 JPEG archive or folder (default {DEFAULT_DATA})")
    p.add_argument("--cache-dir", default=".devdata/cache", help="decoded-image cache of the training run")
    p.add_argument("--steps", type=int, default=int(os.environ.get("STEPS", 2000)), help="training steps ($STEPS)")
    p.add_argument("--eval-every", type=int, default=1000, help="evaluate (and checkpoint) every this many steps")
    p.add_argument("--workers", type=int, default=8, help="data-loader worker processes")
    p.add_argument(
        "--augment-on",
        default="device",
        choices=("loader", "device"),
        help="where the training run makes its views (device: batched on the GPU, issue 13)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile both models in the training run")
    p.add_argument("--bench-steps", type=int, default=20, help="timed steps per variant of step_speed.py")
    p.add_argument("--variants", default="hard-taylor,hard-dot,soft,ideal", help="step_speed variants")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole check")
    p.add_argument("--out", default=None, help="output folder (default: $OUT, else ./gpu_check_out)")
    p.add_argument(
        "--tiny",
        action="store_true",
        default=os.environ.get("TINY") == "1",
        help="CPU smoke test: small_cnn, digits, 2 steps ($TINY=1)",
    )
    return p


class GpuMemoryPoller(threading.Thread):
    """The highest ``nvidia-smi`` memory.used (MiB) seen while it runs, sampled every ``period_s``."""

    def __init__(self, period_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.period_s = period_s
        self.peak_mib: float | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        """Sample until ``stop()``."""
        while not self._halt.is_set():
            used = _nvidia_smi(["--query-gpu=memory.used", "--format=csv,noheader,nounits"])
            if used:
                value = max(float(v) for v in used.split())
                self.peak_mib = value if self.peak_mib is None else max(self.peak_mib, value)
            self._halt.wait(self.period_s)

    def stop(self) -> None:
        """End the sampling."""
        self._halt.set()
        self.join(timeout=5)


def _nvidia_smi(args: list[str]) -> str | None:
    try:
        res = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def bench_command(args: argparse.Namespace, out: Path) -> list[str]:
    """The step_speed command line of this check."""
    json_out = str(out / "step_speed.json")
    cmd = [sys.executable, "-m", "benchmarks.step_speed", "--variants", args.variants, "--json", json_out]
    if args.tiny:
        # One thread: on 6 images, a second thread only adds synchronisation (and the smoke test runs on 2 cores).
        return cmd + ["--tiny", "--device", "cpu", "--models", "small_cnn", "--threads", "1"]
    gpu = [
        "--device",
        "cuda",
        "--amp",
        "bf16",
        "--channels-last",
        "--models",
        "wrn28_2",
        "--shapes",
        "paper",
        "--warmup",
        "5",
    ]
    return cmd + gpu + ["--steps", str(args.bench_steps)]


# The CPU smoke test's run: digits, small_cnn, 2 steps.
TINY_TRAIN = [
    "--dataset",
    "digits",
    "--teacher",
    "small_cnn",
    "--student",
    "small_cnn",
    "--num-labeled",
    "50",
    "--batch-size",
    "4",
    "--mu",
    "1",
    "--steps",
    "2",
    "--eval-every",
    "1",
    "--log-every",
    "1",
    "--save-every",
    "2",
    "--workers",
    "0",
    "--device",
    "cpu",
    "--amp",
    "none",
    "--uda-weight",
    "8",
    "--no-tensorboard",
]
# The GPU run: the shipped recipe with the paper's model and batch, bf16, channels_last. Every step runs the whole MPL
# update (--s-wait-steps 0): in the recipe the student waits its first 3k steps.
GPU_TRAIN = (
    f"--config {CONFIG} --dataset cifar10 --teacher wrn28_2 --student wrn28_2 --batch-size 64 --mu 7 --device cuda "
    "--amp bf16 --channels-last --log-every 100 --s-wait-steps 0"
).split()


def train_command(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The ``metapl train`` command line of this check."""
    cmd = [sys.executable, "-m", "metapl", "train", "--out", str(run_dir), "--finetune-steps", "0", "--no-progress"]
    if args.tiny:
        return cmd + TINY_TRAIN
    run = ["--data-dir", args.data, "--cache-dir", args.cache_dir, "--workers", str(args.workers)]
    run += ["--steps", str(args.steps), "--eval-every", str(args.eval_every), "--save-every", str(args.eval_every)]
    run += ["--augment-on", args.augment_on] + (["--compile"] if args.compile else [])
    return cmd + GPU_TRAIN + run


def summarize_training(records: list[dict], eval_times: list[tuple[int, float]]) -> dict:
    """ms/step, images/s, accuracy and the projected protocol wall time from a run's metrics and evaluation times.

    Args:
        records: the run's metrics.jsonl records.
        eval_times: (step, seconds) at which each evaluation line was printed.

    Returns:
        The figures (None where the run did not produce them).
    """
    train = [r for r in records if r.get("train/time/step_ms") is not None]
    steady = train[1:] or train  # the first interval holds cuDNN autotuning and the loaders' start
    out: dict = {"steps_done": max((r["step"] for r in records), default=0), "log_intervals": len(steady)}
    out["ms_per_step"] = median([r["train/time/step_ms"] for r in steady]) if steady else None
    out["images_per_s"] = median([r["train/time/images_per_s"] for r in steady]) if steady else None
    evals = [r for r in records if r.get("eval/ema_acc") is not None or r.get("eval/student_acc") is not None]
    out["eval_step"] = evals[-1]["step"] if evals else None
    out["ema_acc"] = evals[-1].get("eval/ema_acc") if evals else None
    out["projected_steps_h"] = PROTOCOL_STEPS * out["ms_per_step"] / 3.6e6 if out["ms_per_step"] else None
    out["projected_with_eval_h"] = None
    if len(eval_times) >= 2:
        (s0, t0), (s1, t1) = eval_times[-2:]
        if s1 > s0:
            out["projected_with_eval_h"] = PROTOCOL_STEPS * (t1 - t0) / (s1 - s0) / 3600
    return out


def main(args: argparse.Namespace) -> int:
    """Run the check; see the module's docstring.

    Args:
        args: parsed flags of ``get_args_parser()``.

    Returns:
        0 when every part ran, 1 otherwise (the figures that exist are written anyway).
    """
    started = time.perf_counter()
    out = Path(args.out or os.environ.get("OUT") or "gpu_check_out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_check.log")
    summary: dict = {"tiny": args.tiny, "budget_s": args.budget_s}
    ok = True

    # (a) The GPU.
    gpu = None if args.tiny else _nvidia_smi(["--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
    summary["gpu"] = gpu
    log(f"GPU: {'none (CPU smoke test)' if args.tiny else gpu or 'nvidia-smi found no GPU'}")

    ok &= _bench(args, out, log, summary)  # (b) the step-speed benchmark
    log("\n== training ==")  # (c) the short training
    if not Path(args.data).exists() and (REPO / args.data).exists():
        args.data = str(REPO / args.data)  # the trainer runs from the repository root; the path may be relative
    data_ok = args.tiny or Path(args.data).exists()
    remaining = args.budget_s - (time.perf_counter() - started) - SUMMARY_MARGIN_S
    if not data_ok:
        log(f"CIFAR-10 not found at {args.data}: copy ../shared/data/cifar10-jpeg.tar.gz there (and carry it)")
        ok = False
    elif remaining < 30:
        log(f"no time left for the training ({remaining:.0f} s of the budget)")
        ok = False
    else:
        ok &= _train(args, out, log, summary, remaining)

    summary["runtime_s"] = time.perf_counter() - started
    summary["stamp"] = stamp()
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(summary, log)
    log.close()
    return 0 if ok else 1


def _bench(args: argparse.Namespace, out: Path, log: Log, summary: dict) -> bool:
    """Run step_speed, keep its rows and targets in ``summary``; whether it succeeded."""
    log("\n== step_speed ==")
    rc, _ = stream(bench_command(args, out), log, timeout_s=None if args.tiny else 200)
    bench_path = out / "step_speed.json"
    if bench_path.is_file():
        bench = json.loads(bench_path.read_text())
        keys = ("model", "shape", "variant", "ms_per_step", "images_per_s", "peak_mb")
        summary["step_speed"] = {
            "rows": [{k: r.get(k) for k in keys} for r in bench["results"]],
            "targets": bench["targets"],
        }
    return rc == 0


def _train(args: argparse.Namespace, out: Path, log: Log, summary: dict, time_limit_s: float) -> bool:
    run_dir = Path(tempfile.mkdtemp(prefix="metapl-gpu-check-")) / "run"
    eval_times: list[tuple[int, float]] = []

    def on_line(line: str) -> None:
        # The trainer prints "step N: test accuracy ..." right after each evaluation.
        if line.startswith("step ") and ": test accuracy" in line:
            eval_times.append((int(line.split()[1].rstrip(":")), time.perf_counter()))

    poller = None if args.tiny else GpuMemoryPoller()
    if poller is not None:
        poller.start()
    rc, interrupted = stream(train_command(args, run_dir), log, timeout_s=time_limit_s, on_line=on_line)
    if poller is not None:
        poller.stop()
    metrics = run_dir / "metrics.jsonl"
    records = []
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        shutil.copy(metrics, out / "train_metrics.jsonl")
    if (run_dir / "config.yaml").is_file():
        shutil.copy(run_dir / "config.yaml", out / "train_config.yaml")
    shutil.rmtree(run_dir.parent, ignore_errors=True)  # checkpoints: not wanted in $OUT (size limits)
    figures = summarize_training(records, eval_times)
    figures.update(
        {
            "exit_status": rc,
            "stopped_by_budget": interrupted,
            "steps_asked": 2 if args.tiny else args.steps,
            "eval_every": 1 if args.tiny else args.eval_every,
            "peak_gpu_memory_mib": poller.peak_mib if poller is not None else None,
        }
    )
    summary["training"] = figures
    return (rc == 0 or interrupted) and bool(records)


def _fmt(value, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def _print_summary(summary: dict, log: Log) -> None:
    log("\n== GPU check summary ==")
    log(f"GPU: {summary.get('gpu') or '-'}")
    bench = summary.get("step_speed")
    if bench:
        log("step_speed (ms/step, images/s, peak MB):")
        for r in bench["rows"]:
            log(
                f"  {r['model']} @ {r['shape']} {r['variant']:<13} {_fmt(r['ms_per_step'], '9.1f')} "
                f"{_fmt(r['images_per_s'], '10.1f')} {_fmt(r['peak_mb'], '9.1f')}"
            )
        for t in bench["targets"]:
            log(f"  {t['name']:<38} {t['value']:6.2f} {t['op']} {t['limit']:.2f} {'PASS' if t['passed'] else 'MISS'}")
    tr = summary.get("training")
    if tr:
        stop = ", stopped by the time budget" if tr["stopped_by_budget"] else ""
        log(f"training: {tr['steps_done']} of {tr['steps_asked']} steps{stop} (exit status {tr['exit_status']})")
        log(
            f"  ms/step {_fmt(tr['ms_per_step'], '.1f')}, images/s {_fmt(tr['images_per_s'], '.0f')} "
            f"(median of {tr['log_intervals']} log intervals after the first)"
        )
        acc = tr["ema_acc"]
        log(f"  EMA-student test accuracy at step {tr['eval_step']}: {_fmt(acc, '.2f', '%')}")
        log(f"  peak GPU memory (nvidia-smi memory.used, whole GPU): {_fmt(tr['peak_gpu_memory_mib'], '.0f', ' MiB')}")
        log(
            f"  projected {PROTOCOL_STEPS:,} steps: {_fmt(tr['projected_steps_h'], '.2f', ' h')} of steps alone; "
            f"{_fmt(tr['projected_with_eval_h'], '.2f', ' h')} with evaluation + checkpoint every "
            f"{tr['eval_every']} steps (finetuning and the student's cheaper 3k wait steps not counted)"
        )
    log(f"runtime {summary['runtime_s']:.0f} s (budget {summary['budget_s']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
