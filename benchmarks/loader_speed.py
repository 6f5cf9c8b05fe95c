"""Can the train loaders keep up with training? Images/s delivered by the loaders vs consumed by MPL steps.

Measures, on the real CIFAR-10 copy (decoded once into the cache first):

1. loaders alone: labeled (weak view) + unlabeled (weak + strong views) batches from ``make_train_batches``;
2. MPL alone: hard-MPL steps (``metapl.core.mpl_update``, built by ``benchmarks.steps.small_update``) of two
   ``small_cnn`` models on one fixed batch;
3. both together, as training runs them: the workers prefetch while the main process steps.

One step holds ``B`` labeled and ``mu*B`` unlabeled images; "views/s" counts ``B * (1 + 2*mu)`` per step (the
unlabeled images are seen weak and strong), the same count the trainer logs.

    python -m benchmarks.loader_speed                 # CPU config: B=32, mu=7, 2 workers
    python -m benchmarks.loader_speed --tiny          # smoke test: a few steps
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.harness import available_cpus, data_path
from benchmarks.steps import small_update
from metapl.data import BatchSpec, load_dataset, make_split, make_train_batches, strong_view, weak_view
from metapl.logs import console

DEFAULT_DATA = "cifar10-jpeg.tar.gz"  # under the data root (benchmarks.harness)


def get_args_parser() -> argparse.ArgumentParser:
    """The command-line flags of this benchmark.

    Returns:
        The parser.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help="CIFAR-10 tar, folder or torchvision root (relative: under the "
        "data root, $METAPL_DATA_ROOT or ../shared/data)",
    )
    p.add_argument("--dataset", default="cifar10", help="dataset name passed to load_dataset")
    p.add_argument(
        "--cache-dir", default=None, help="decoded-array cache (default $METAPL_CACHE_DIR or ~/.cache/metapl)"
    )
    p.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (worker start-up, allocator)")
    p.add_argument("--batch-size", type=int, default=32, help="labeled images per step")
    p.add_argument("--mu", type=int, default=7, help="unlabeled images per labeled image")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes per loader")
    p.add_argument("--num-labeled", type=int, default=4000, help="size of the labeled split")
    p.add_argument("--model", default="small_cnn", help="teacher and student architecture")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the main process (default: torch's)")
    p.add_argument("--tiny", action="store_true", help="smoke test: 3 timed steps after 1 warm-up step")
    return p


def time_steps(step, warmup: int, steps: int) -> float:
    """Seconds per call of ``step`` over ``steps`` calls, after ``warmup`` untimed ones.

    Args:
        step: a zero-argument callable.
        warmup: untimed calls first.
        steps: timed calls.

    Returns:
        Mean seconds per timed call.
    """
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main(args: argparse.Namespace) -> None:
    """Run the three measurements and print a table.

    Args:
        args: parsed flags, see ``get_args_parser``.
    """
    if args.tiny:
        args.steps, args.warmup = 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with console(fmt="  %(message)s"):  # its lines printed, indented
        data = load_dataset(args.dataset, str(data_path(args.data)), cache_dir=args.cache_dir)
    print(f"load_dataset: {time.perf_counter() - t0:.1f} s (a cache hit takes milliseconds)")
    seconds = measure(data, args)
    b, mu = args.batch_size, args.mu
    views_per_step = b * (1 + 2 * mu)
    print()
    print(
        f"{args.dataset} {data.image_size}x{data.image_size}x{data.in_channels}, B={b}, mu={mu}, "
        f"{args.workers} workers/loader, {args.model}, torch threads {torch.get_num_threads()}, "
        f"{available_cpus()} CPUs, {args.steps} timed steps"
    )
    print(f"{'measurement':<34}{'steps/s':>10}{'views/s':>10}{'ms/step':>10}")
    for name, sec in seconds.items():
        print(f"{name:<34}{1 / sec:>10.2f}{views_per_step / sec:>10.0f}{1000 * sec:>10.1f}")
    load_s, mpl_s, _ = seconds.values()
    verdict = "keep up with" if load_s <= mpl_s else "are slower than"
    print(f"\nthe loaders {verdict} the MPL step ({mpl_s / load_s:.1f}x its rate)")


def measure(data, args: argparse.Namespace) -> dict[str, float]:
    """Seconds per step: the loaders alone, the MPL step alone, the step fed by the loaders."""
    split = make_split(data.train.labels, args.num_labeled, data.num_classes, seed=0)
    kw = {"hflip": data.hflip, "mean": data.mean, "std": data.std}
    views = {"weak": weak_view(data.image_size, **kw), "strong": strong_view(data.image_size, **kw)}
    batches = dict(batch_size=args.batch_size, mu=args.mu, seed=0, **views)

    def fed(step_fn, start_step: int) -> float:
        # Fresh loaders per measurement; their workers stop when the iterators go out of scope on return.
        spec = BatchSpec(start_step=start_step, workers=args.workers, **batches)
        labeled, unlabeled = make_train_batches(data, split, spec)
        l_iter, u_iter = iter(labeled), iter(unlabeled)
        return time_steps(lambda: step_fn((*next(l_iter), *next(u_iter))), args.warmup, args.steps)

    load_s = fed(lambda parts: parts, 0)  # 1. the loaders alone
    # 2. MPL steps alone, on one fixed batch (no loading at all).
    mpl_step = small_update(data.in_channels, data.image_size, torch.device("cpu"), data.num_classes, args.model)
    labeled, unlabeled = make_train_batches(data, split, BatchSpec(workers=0, **batches))
    batch = (*next(iter(labeled)), *next(iter(unlabeled)))
    mpl_s = time_steps(lambda: mpl_step(batch), args.warmup, args.steps)
    both_s = fed(mpl_step, 1000)  # 3. both, as the trainer runs them: workers prefetch while the main process computes
    return {
        "loaders alone (delivered)": load_s,
        "hard-MPL step alone (consumed)": mpl_s,
        "MPL step fed by the loaders": both_s,
    }


if __name__ == "__main__":
    main(get_args_parser().parse_args())
