"""The ablation's three headline rows on CIFAR-10-4K with WRN-28-2, run concurrently on one GPU, as a table.

labels-only, UDA with h = 0 (the teacher distilled) and UDA + MPL (hard, taylor) train side by side on one GPU,
each in its own ``metapl train`` process (bf16, channels_last, its share of the CPU cores as loader workers), with
the recipe of the shipped ``cifar10_4k`` config at a short budget (default 2,000 MPL steps + 500 finetuning steps, the
labels-only run 2,500 steps). The decoded-image cache is filled once before the three start. The whole check stops
itself within ``--budget-s`` (default 540 s: 9 minutes): runs still going then are interrupted (they save a
checkpoint) and the table shows what finished. Downloads nothing.

    PYTHONPATH=src python3 -m benchmarks.gpu_ablation           # data: .devdata/cifar10-jpeg.tar.gz
    run(command="PYTHONPATH=src python3 -m benchmarks.gpu_ablation", carry=[".devdata/cifar10-jpeg.tar.gz"],
        timeout_s=600)
    python -m benchmarks.gpu_ablation --tiny                    # CPU smoke test: digits, 2 steps

Writes each run under ``--root`` (default ``$OUT/gpu_ablation`` or ``runs/gpu_ablation``) and the table to
``table.md`` there; the table is ``benchmarks.ablation``'s report, so it reads the same as the CPU tables.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks import ablation
from benchmarks.harness import REPO, available_cpus, child_env

ROWS = ("labels-only", "uda-distill", "uda-mpl")
PROTOCOL = "cifar10-gpu"
# The cifar10_4k config's recipe, at a budget that fits three concurrent runs into 9 minutes on an H200; the
# warm-up, wait and ramp lengths are scaled down with the step count.
GPU_RECIPE = dict(
    dataset="cifar10",
    num_labeled=4000,
    teacher="wrn28_2",
    student="wrn28_2",
    teacher_dropout=0.2,
    student_dropout=0.2,
    steps=2000,
    finetune_steps=500,
    finetune_lr=0.01,
    finetune_batch_size=64,
    batch_size=64,
    mu=7,
    t_lr=0.05,
    s_lr=0.05,
    weight_decay=5e-4,
    t_warmup_steps=100,
    s_wait_steps=100,
    s_warmup_steps=100,
    label_smoothing=0.15,
    uda_weight=8.0,
    uda_steps=500,
    uda_temperature=0.7,
    uda_threshold=0.6,
    randaug_n=2,
    randaug_m=16,
    cutout=16,
    ema=0.995,
    eval_every=250,
    save_every=5000,
    log_every=50,
    amp="bf16",
    channels_last=True,
    device="cuda",
    progress=False,
    tensorboard=False,
)
TINY_RECIPE = dict(
    dataset="digits",
    num_labeled=50,
    teacher="small_cnn",
    student="small_cnn",
    steps=2,
    finetune_steps=1,
    batch_size=8,
    mu=2,
    eval_every=1,
    save_every=10,
    log_every=1,
    device="cpu",
    progress=False,
    tensorboard=False,
)


def get_args_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=".devdata/cifar10-jpeg.tar.gz", help="CIFAR-10 JPEG archive or folder")
    p.add_argument("--cache-dir", default=".devdata/cache", help="decoded-image cache shared by the three runs")
    p.add_argument("--root", default=None, help="run folder (default: $OUT/gpu_ablation, else runs/gpu_ablation)")
    p.add_argument("--steps", type=int, default=None, help="MPL steps (default 2000)")
    p.add_argument("--finetune-steps", type=int, default=None, help="finetuning steps (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of the whole check")
    p.add_argument(
        "--tiny",
        action="store_true",
        default=os.environ.get("TINY") == "1",
        help="CPU smoke test: digits, small_cnn, 2 steps",
    )
    return p


def recipe(args: argparse.Namespace) -> dict:
    """The protocol's values for this invocation (tiny or GPU; step overrides applied)."""
    # An absolute path: a relative data_dir in a benchmark recipe would name a file under the data root.
    values = dict(TINY_RECIPE if args.tiny else {**GPU_RECIPE, "data_dir": str(Path(args.data).resolve())})
    values["cache_dir"] = args.cache_dir
    values["workers"] = 0 if args.tiny else max(1, (available_cpus() - len(ROWS)) // len(ROWS))
    for key in ("steps", "finetune_steps"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    return values


def launch(root: Path, row: str, seed: int) -> subprocess.Popen:
    """Start one row's ``metapl train`` from a config file written next to its run directory."""
    run_dir = root / PROTOCOL / row / f"seed{seed}"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    config = run_dir.parent / f"seed{seed}.yaml"
    config.write_text(yaml.safe_dump(ablation.run_values(PROTOCOL, row, seed) | {"out": str(run_dir)}))
    cmd = [sys.executable, "-m", "metapl", "train", "--config", str(config)]
    return subprocess.Popen(
        cmd, cwd=REPO, env=child_env(), stdout=open(run_dir.parent / f"seed{seed}.log", "w"), stderr=subprocess.STDOUT
    )


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    started = time.perf_counter()
    root = Path(
        args.root or (Path(os.environ["OUT"]) / "gpu_ablation" if os.environ.get("OUT") else "runs/gpu_ablation")
    )
    ablation.PROTOCOLS[PROTOCOL] = recipe(args)
    if not args.tiny and not Path(args.data).exists():
        print(f"CIFAR-10 not found at {args.data}: copy ../shared/data/cifar10-jpeg.tar.gz there (and carry it)")
        return 1
    from metapl.data import load_dataset
    from metapl.logs import console

    cfg = ablation.PROTOCOLS[PROTOCOL]
    with console():  # its lines printed
        load_dataset(cfg["dataset"], cfg.get("data_dir"), cache_dir=cfg["cache_dir"])  # decode once, here
    procs = {row: launch(root, row, args.seed) for row in ROWS}
    deadline = started + args.budget_s - 15
    while any(p.poll() is None for p in procs.values()) and time.perf_counter() < deadline:
        time.sleep(1)
    for row, proc in procs.items():
        if proc.poll() is None:
            print(f"{row}: interrupted at the time budget (see its log)")
            proc.send_signal(2)
            proc.wait(timeout=60)
    table = ablation.report(root, PROTOCOL)
    (root / "table.md").write_text(table + "\n")
    print(f"\n{PROTOCOL}: {', '.join(ROWS)}, seed {args.seed}, {time.perf_counter() - started:.0f} s\n{table}")
    return 0 if all(p.returncode == 0 for p in procs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
