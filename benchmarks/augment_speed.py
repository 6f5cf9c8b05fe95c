"""Augmentation on the device vs in the loader workers: views/s of each path, and the MPL step fed by each.

For each shape (32x32x3 with src/metapl/configs/cifar10_cpu.yaml's batch and RandAugment settings, 28x28x1 with
src/metapl/configs/fashion_100_cpu.yaml's), on synthetic uint8 images of that shape:

1. views alone: one step's views (``B`` labeled weak, ``mu*B`` unlabeled weak + strong) by the Pillow path
   (``per_image(weak_view(...))`` / ``per_image(strong_view(...))``, one image at a time, in this process) and by the
   device path (``BatchView`` of the same specs on whole batches, on ``--device``);
2. hard-MPL steps of two ``small_cnn`` models on one fixed batch (no data work at all), the library's update as
   ``benchmarks.steps.small_update`` builds it;
3. the same steps fed by ``make_train_batches`` with ``augment_on="loader"`` and with ``augment_on="device"``, as
   the trainer runs them.

"views/s" counts ``B * (1 + 2*mu)`` per step, the count the trainer logs.

    python -m benchmarks.augment_speed                  # CPU, both shapes, 1 worker per loader
    python -m benchmarks.augment_speed --device cuda --workers 4
    python -m benchmarks.augment_speed --tiny           # smoke test: a few steps
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from benchmarks.harness import available_cpus, shipped_recipe
from benchmarks.loader_speed import time_steps
from benchmarks.steps import small_update
from metapl.data import (
    BatchSpec,
    BatchView,
    ImageArrays,
    SourceData,
    make_split,
    make_train_batches,
    per_image,
    strong_view,
    weak_view,
)

SHAPES = {"cifar10": ((32, 3), "cifar10_cpu"), "fashion": ((28, 1), "fashion_100_cpu")}
ROWS = (
    "views, Pillow path (per image)",
    "views, device path (batched)",
    "MPL step alone",
    "step fed by the loader path",
    "step fed by the device path",
)


def get_args_parser() -> argparse.ArgumentParser:
    """The command-line flags of this benchmark.

    Returns:
        The parser.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="cifar10,fashion", help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--device", default="cpu", help="where the device path and the MPL step run")
    p.add_argument("--workers", type=int, default=1, help="loader worker processes per loader (the configs' 1)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--images", type=int, default=2000, help="synthetic train images per shape")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the main process (default: torch's)")
    p.add_argument("--tiny", action="store_true", help="smoke test: 2 timed steps after 1 warm-up step")
    return p


def shape_config(name: str) -> tuple[int, int, str, dict]:
    """A shape's image side, channels, shipped config name and that config's values (read by the config layer).

    Args:
        name: a key of ``SHAPES``.

    Returns:
        ``(size, channels, config name, config dict)``.
    """
    (size, channels), config = SHAPES[name]
    return size, channels, config, shipped_recipe(config)


def synthetic_data(size: int, channels: int, n: int, seed: int = 0) -> SourceData:
    """Smooth random uint8 images (upsampled noise, so every op has edges and a range to work on), 10 classes.

    Args:
        size: image side.
        channels: 1 or 3.
        n: train images (the test split gets a tenth).
        seed: numpy seed.

    Returns:
        The data set.
    """
    rng = np.random.default_rng(seed)

    def arrays(k: int) -> ImageArrays:
        coarse = torch.from_numpy(rng.integers(0, 256, (k, channels, 6, 6)).astype(np.float32))
        up = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        images = up.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return ImageArrays(images, np.arange(k) % 10)

    mean, std = (0.5,) * channels, (0.25,) * channels
    return SourceData(arrays(n), arrays(max(10, n // 10)), None, [str(i) for i in range(10)], mean, std, True)


def measure_shape(name: str, args: argparse.Namespace) -> dict[str, float]:
    """Seconds per step of every row of ``ROWS`` for one shape.

    Args:
        name: a key of ``SHAPES``.
        args: parsed flags.

    Returns:
        ``{row: seconds per step}``.
    """
    size, channels, _, cfg = shape_config(name)
    b, mu, device = cfg["batch_size"], cfg["mu"], torch.device(args.device)
    data = synthetic_data(size, channels, args.images)
    split = make_split(data.train.labels, min(cfg["num_labeled"], args.images // 2), 10, seed=0)
    kw = {"hflip": True, "mean": data.mean, "std": data.std}
    strong_kw = {"randaug_n": cfg["randaug_n"], "randaug_m": cfg["randaug_m"], "cutout": cfg["cutout"]}
    weak_s, strong_s = weak_view(size, **kw), strong_view(size, **kw, **strong_kw)
    weak, strong = per_image(weak_s), per_image(strong_s)
    weak_b, strong_b = BatchView(weak_s), BatchView(strong_s)
    images = torch.from_numpy(data.train.images[: b * (1 + mu)]).permute(0, 3, 1, 2).contiguous()
    x_l, x_u = images[:b], images[b:]
    on_device = images.to(device)
    generator = torch.Generator().manual_seed(0)

    def pillow_views():
        return [weak(x) for x in x_l] + [(weak(x), strong(x)) for x in x_u]

    def device_views():
        out = (weak_b(on_device[:b], generator), weak_b(on_device[b:], generator), strong_b(on_device[b:], generator))
        if device.type == "cuda":
            torch.cuda.synchronize()  # the kernels are asynchronous: time their completion
        return out

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the Pillow path runs in workers with one thread each
    seconds = {ROWS[0]: time_steps(pillow_views, args.warmup, args.steps)}
    torch.set_num_threads(threads)
    seconds[ROWS[1]] = time_steps(device_views, args.warmup, args.steps)
    return seconds | _fed_steps(data, split, (weak_s, strong_s), (b, mu, channels, size), device, args)


def _fed_steps(data, split, views: tuple, shape: tuple, device: torch.device, args: argparse.Namespace) -> dict:
    """Seconds per MPL step alone, fed by the loader path and fed by the device path (``ROWS[2:]``)."""
    b, mu, channels, size = shape
    weak, strong = views
    seconds = {}
    mpl_step = small_update(channels, size, device)
    loader = dict(batch_size=b, mu=mu, seed=0, weak=weak, strong=strong, workers=args.workers)
    li, ui = make_train_batches(data, split, BatchSpec(**loader, augment_on="device", device=device))
    batch = (*next(li), *next(ui))  # one fixed batch, already on the device
    seconds[ROWS[2]] = time_steps(lambda: _sync(mpl_step(batch), device), args.warmup, args.steps)
    labeled, unlabeled = make_train_batches(data, split, BatchSpec(**loader))
    li, ui = iter(labeled), iter(unlabeled)
    seconds[ROWS[3]] = time_steps(
        lambda: _sync(mpl_step(_to(device, *next(li), *next(ui))), device), args.warmup, args.steps
    )
    li, ui = make_train_batches(data, split, BatchSpec(**loader, augment_on="device", device=device))
    seconds[ROWS[4]] = time_steps(lambda: _sync(mpl_step((*next(li), *next(ui))), device), args.warmup, args.steps)
    return seconds


def _to(device: torch.device, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device, non_blocking=True) for t in tensors)


def _sync(out, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out


def main(args: argparse.Namespace) -> None:
    """Measure every shape and print one table per shape.

    Args:
        args: parsed flags, see ``get_args_parser``.
    """
    if args.tiny:
        args.steps, args.warmup, args.images = 2, 1, 200
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.shapes.split(","):
        size, channels, config, cfg = shape_config(name)
        b, mu = cfg["batch_size"], cfg["mu"]
        views = b * (1 + 2 * mu)
        seconds = measure_shape(name, args)
        print(
            f"\n== {size}x{size}x{channels} (src/metapl/configs/{config}.yaml: B={b}, mu={mu}, m={cfg['randaug_m']}, "
            f"cutout={cfg['cutout']}), device {args.device}, {args.workers} workers/loader, torch threads "
            f"{torch.get_num_threads()}, {available_cpus()} CPUs, {args.steps} timed steps"
        )
        print(f"{'measurement':<34}{'ms/step':>10}{'views/s':>10}")
        for row in ROWS:
            print(f"{row:<34}{1000 * seconds[row]:>10.2f}{views / seconds[row]:>10.0f}")
        print(f"device path / Pillow path views/s: {seconds[ROWS[0]] / seconds[ROWS[1]]:.1f}x")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
