"""What one MPL step of a shipped config costs: time per step and peak memory, on synthetic tensors of its shape.

Builds the config's teacher and student (``create_model``), its optimizers (``make_sgd``), its MPL settings and its
autocast / channels-last choices (``benchmarks.steps.config_step``), then times ``metapl.core.mpl_update`` plus the
schedule-free rest of a trainer step (EMA) on random batches of B labeled and μB unlabeled images (two views each) at
the config's image size. No data loading:
this is the step alone, the number that fills a config's "expected GPU memory and time per step" header line.
``--batch-scale`` shrinks B (CPU checks of big configs); peak memory is measured as in ``step_speed.py``
(``step_timing.PeakMemory``: CUDA allocator peak, or the CPU's resident-set high-water mark, above the baseline
taken once models and inputs exist; so it counts activations, gradients and optimizer state, not the weights).

    python -m benchmarks.config_cost svhn_1k --batch-scale 0.125                  # CPU; a shipped name or a file
    python -m benchmarks.config_cost imagenet_10pct --device cuda --steps 10      # GPU, its B
    python -m benchmarks.config_cost src/metapl/configs/svhn_1k.yaml --tiny       # smoke test
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from benchmarks.harness import median, record
from benchmarks.step_timing import PeakMemory
from benchmarks.steps import config_step
from metapl.config.fields import TrainConfig
from metapl.config.recipes import find_config, load_yaml
from metapl.training.process import select_device

# dataset -> (classes, native image side, channels); folders take --num-classes and the config's --image-size.
SHAPES = {
    "digits": (10, 8, 1),
    "cifar10": (10, 32, 3),
    "cifar100": (100, 32, 3),
    "svhn": (10, 32, 3),
    "fashion-mnist": (10, 28, 1),
}


def get_args_parser() -> argparse.ArgumentParser:
    """The command-line flags of this benchmark.

    Returns:
        The parser.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", help="a shipped config's name (svhn_1k) or a YAML file")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (the config's amp applies on CUDA only)")
    p.add_argument("--batch-scale", type=float, default=1.0, help="multiply the config's labeled batch by this")
    p.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of a folder data set (ImageNet: 1000)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--tiny", action="store_true", help="smoke test: 1 labeled image, mu 1, at most 32 px, 1 step")
    p.add_argument("--json", default=None, help="also write the result to this file")
    return p


def step_shape(cfg: TrainConfig, args: argparse.Namespace) -> dict:
    """The synthetic batch's shape: classes, channels, image side, labeled batch B and μ.

    Args:
        cfg: the config.
        args: the flags (``--batch-scale``, ``--tiny``, ``--num-classes``).

    Returns:
        ``{"classes", "channels", "size", "batch", "mu"}``.
    """
    classes, size, channels = SHAPES.get(cfg.dataset, (args.num_classes, None, 3))
    size = cfg.image_size or size
    if size is None:
        raise SystemExit(f"{args.config}: dataset {cfg.dataset} needs image_size in the config")
    batch, mu = max(1, math.ceil(cfg.batch_size * args.batch_scale)), cfg.mu
    if args.tiny:
        batch, mu, size = 1, 1, min(size, 32)
    return {"classes": classes, "channels": channels, "size": size, "batch": batch, "mu": mu}


def measure(cfg: TrainConfig, args: argparse.Namespace) -> dict:
    """Time ``args.steps`` steps after ``args.warmup`` and take the peak memory over them.

    Args:
        cfg: the config.
        args: the flags.

    Returns:
        The shape, parameter counts, ``ms_per_step`` (median), ``images_per_s`` and ``peak_mb``.
    """
    device = select_device(args.device)
    shape = step_shape(cfg, args)
    step, info = config_step(cfg, shape, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    memory = PeakMemory(device)
    memory.start()
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    ms = 1000 * median(times)
    images = shape["batch"] * (1 + 2 * shape["mu"])
    return {
        **shape,
        **info,
        "device": str(device),
        "amp": cfg.amp if device.type == "cuda" else "none",
        "ms_per_step": round(ms, 2),
        "images_per_s": round(1000 * images / ms, 1),
        "peak_mb": None if memory.peak_mb() is None else round(memory.peak_mb(), 1),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print one line per figure.

    Args:
        argv: the flags; None reads ``sys.argv``.

    Returns:
        ``measure``'s dict.
    """
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(**load_yaml(find_config(args.config)))
    if args.tiny:
        args.steps, args.warmup = 1, 0
    result = {"config": args.config, **measure(cfg, args)}
    print(
        f"== {args.config}: {cfg.teacher} / {cfg.student}, B={result['batch']} mu={result['mu']} at "
        f"{result['size']} px on {result['device']} (amp {result['amp']})"
    )
    for key in ("teacher_params", "student_params", "ms_per_step", "images_per_s", "peak_mb"):
        print(f"{key:>15}: {result[key]}")
    if args.json:
        record(args.json, result)
    return result


if __name__ == "__main__":
    main()
