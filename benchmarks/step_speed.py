"""How fast is one Meta Pseudo Labels update, and how close does it come to the passes it cannot avoid?

Times ``metapl.core.mpl_update`` (hard pseudo labels with the ``taylor`` and ``dot`` feedback estimators, and soft
labels with the exact meta-gradient) on synthetic random batches: no data loading, this measures the step alone.
One reference is measured in the same run, **ideal**: the sum of the passes the update cannot avoid, each timed
alone (median of its own runs):
  taylor = T(x_uw) no-grad + S(x_us) fwd+bwd + S step + 2 × S(x_l) no-grad + T(cat(x_l, x_us)) fwd+bwd + T step;
  dot    = the same with one S(x_l) fwd+bwd in place of the two no-grad S(x_l) forwards.
The S(x_l) passes run in float32 in feedback mode, as the core runs them (h is a small difference of two losses).
Every step is built by ``benchmarks.steps`` from the library (``mpl_update``, ``make_sgd``). The ``naive`` variant of
earlier revisions (a hand-written copy of a public port's step) is retired: its figures are historical (report).

A step holds B labeled and μB unlabeled images, the unlabeled ones in a weak and a strong view: B(1 + 2μ) images,
the count that images/s uses. Shapes: ``paper`` B=64 μ=7, ``cpu`` B=32 μ=7 (the cifar10_cpu config), ``tiny`` B=2
μ=1 (smoke test). All variants use the CIFAR recipe's losses: UDA weight 8, label smoothing 0.15, SGD Nesterov.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the warm-up and timed steps minus the memory allocated
before them. On the CPU each variant runs in a fresh process (forked from this one, which has imported the
libraries but run no tensor work); its peak RSS over the steps (the kernel's high-water mark, reset once the models,
optimizers and inputs are built) minus its RSS at that point. Both count the step's activations, gradients and
optimizer state, not the weights.

    python -m benchmarks.step_speed                                   # CPU: both models, both shapes
    python -m benchmarks.step_speed --models small_cnn --json out.json
    python -m benchmarks.step_speed --device cuda --amp bf16 --channels-last --models wrn28_2 --shapes paper
    python -m benchmarks.step_speed --tiny --models small_cnn         # smoke test
    python -m benchmarks.step_speed --profile --models wrn28_2 --shapes paper --top 14   # where soft's time goes

This file holds the command line, the targets and the report; the steps are built in ``benchmarks.steps``, timed
and measured in ``benchmarks.step_timing`` (which also holds ``--profile``: an operator profile of soft vs hard).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.harness import available_cpus, record, stamp
from benchmarks.step_timing import MEMORY_STEPS, measure_group, profile_table
from benchmarks.steps import DROPOUT, IDEAL, LABEL_SMOOTHING, LR, MOMENTUM, SHAPES, UDA_WEIGHT, VARIANTS, WEIGHT_DECAY
from metapl.errors import UserError
from metapl.training.process import amp_dtype as resolve_amp
from metapl.training.process import select_device

# (name, numerator variant, denominator variant, measure, comparison, limit)
TARGETS = (
    ("hard-taylor time / ideal-taylor", "hard-taylor", "ideal-taylor", "ms_per_step", "<=", 1.10),
    ("hard-dot time / ideal-dot", "hard-dot", "ideal-dot", "ms_per_step", "<=", 1.10),
    ("soft time / hard-taylor", "soft", "hard-taylor", "ms_per_step", "<=", 2.5),
    *(
        (f"{v} time / distill", v, "distill", "ms_per_step", "<=", 1.15)
        for v in ("reduced-taylor", "reduced-dot", "reduced-cosine")
    ),
)


def get_args_parser() -> argparse.ArgumentParser:
    """The command-line flags of this benchmark.

    Returns:
        The parser.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="wrn28_2,small_cnn", help="comma-separated model names (teacher = student)")
    p.add_argument("--shapes", default="paper,cpu", help=f"comma-separated batch shapes out of {', '.join(SHAPES)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, out of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, cuDNN autotuning)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast dtype of the forwards")
    p.add_argument("--channels-last", action="store_true", help="models and images in channels_last memory format")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the cores available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="smoke test: shape tiny (B=2, μ=1), 2 steps after 1 warm-up")
    p.add_argument("--json", metavar="OUT", default=None, help="write every figure to this JSON file")
    p.add_argument("--profile", action="store_true", help="instead: an operator profile of one soft and one hard step")
    p.add_argument("--top", type=int, default=12, help="with --profile: operators listed")
    return p


def check_targets(rows: list[dict]) -> list[dict]:
    """The issue's targets (ratios, so machine noise cancels) for one model and shape.

    Args:
        rows: the result rows of one (model, shape).

    Returns:
        One dict per target whose two variants were both measured: ``name``, ``value``, ``op``, ``limit``,
        ``passed`` and, for a miss, ``bound``: what limits it, from the measured figures where they tell.
    """
    by_variant = {r["variant"]: r for r in rows}
    out = []
    for name, num, den, measure, op, limit in TARGETS:
        a, b = by_variant.get(num, {}).get(measure), by_variant.get(den, {}).get(measure)
        if a is None or b is None or b <= 0:
            continue
        value = a / b
        passed = value >= limit if op == ">=" else value <= limit
        target = {"name": name, "value": value, "op": op, "limit": limit, "passed": passed}
        if not passed:
            target["bound"] = _bound(name, num, den, by_variant)
        out.append(target)
    return out


def _bound(name: str, num: str, den: str, by_variant: dict) -> str:
    ms = {k: v.get("ms_per_step") for k, v in by_variant.items()}
    if "ideal" in name:
        return (
            f"{ms[num] - ms[den]:.1f} ms/step beyond the passes timed alone: glue (losses, feedback_mode, "
            "cat/slices, the dot product's gradient copy) and passes that do not overlap on this device"
        )
    if den == "distill":
        return (
            "the feedback's own passes over the B labeled images: two no-grad student forwards (taylor), or a forward "
            "and a backward (dot, cosine), beside the student's forward and backward over its μB images"
        )
    return (
        "soft differentiates through the student's step: a forward-mode JVP of the student over its μB images "
        "(about 3 forwards) on top of the teacher's graph over all B + 2μB images"
    )


def print_table(rows: list[dict], targets: list[dict], header: str) -> None:
    """Print one (model, shape)'s figures and its targets."""
    print(f"\n== {header} ==")
    print(f"{'variant':<14} {'ms/step':>10} {'fastest':>10} {'images/s':>10} {'peak MB':>9}")
    for r in rows:
        if "error" in r or "skipped" in r:
            print(f"{r['variant']:<14} {'-':>10} {'-':>10} {'-':>10} {'-':>9}  {r.get('error') or r.get('skipped')}")
            continue
        peak = f"{r['peak_mb']:.1f}" if r.get("peak_mb") is not None else "-"
        fastest = f"{r['ms_min']:.1f}" if r.get("ms_min") is not None else "-"
        note = f"  (peak memory: {r['peak_error']})" if r.get("peak_error") else ""
        print(f"{r['variant']:<14} {r['ms_per_step']:>10.1f} {fastest:>10} {r['images_per_s']:>10.1f} {peak:>9}{note}")
    for r in rows:
        if "components_ms" in r:
            counts = IDEAL[r["variant"]]
            parts = " + ".join(
                f"{k} {v:.1f}" + (f" x{counts[k]}" if counts[k] > 1 else "") for k, v in r["components_ms"].items()
            )
            print(f"  {r['variant']} = {parts} (ms)")
    if targets:
        print(f"{'target':<38} {'value':>6}  {'goal':<7} result")
        for t in targets:
            goal = f"{t['op']} {t['limit']:.2f}"
            print(f"{t['name']:<38} {t['value']:>6.2f}  {goal:<7} {'PASS' if t['passed'] else 'MISS'}")
            if not t["passed"]:
                print(f"    bound: {t['bound']}")


def main(args: argparse.Namespace) -> int:
    """Run every (model, shape, variant), print a table per (model, shape), write ``--json``; or ``--profile``.

    Args:
        args: parsed flags of ``get_args_parser()``.

    Returns:
        The exit status: 0, or 2 for bad flags.
    """
    started = time.perf_counter()
    models = [m for m in args.models.split(",") if m]
    shapes = ["tiny"] if args.tiny else [s for s in args.shapes.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    steps, warmup = (2, 1) if args.tiny else (args.steps, args.warmup)
    bad = [s for s in shapes if s not in SHAPES] + [v for v in variants if v not in VARIANTS]
    if bad or steps < 1 or warmup < 0:
        print(
            f"step_speed: unknown shape/variant {bad} or bad --steps/--warmup; shapes: {', '.join(SHAPES)}; "
            f"variants: {', '.join(VARIANTS)}",
            file=sys.stderr,
        )
        return 2
    try:
        device = select_device(args.device)
        resolve_amp(args.amp, device)
    except UserError as e:
        print(f"step_speed: {e}", file=sys.stderr)
        return 2
    threads = args.threads or available_cpus()
    torch.set_num_threads(threads)
    if args.profile:
        for model in models:
            for shape in shapes:
                print(profile_table(model, shape, device, args.top))
        return 0
    args = argparse.Namespace(**{**vars(args), "steps": steps, "warmup": warmup})  # --tiny's sizes win
    report = measure_all(models, shapes, variants, args, device, threads)
    report["runtime_s"] = time.perf_counter() - started
    print(f"\nruntime {report['runtime_s']:.1f} s")
    if args.json:
        record(args.json, report)
    return 0


def measure_all(models, shapes, variants, args: argparse.Namespace, device: torch.device, threads: int) -> dict:
    """Every (model, shape): measured, printed as a table; returns the JSON report (figures, settings, stamp)."""
    device_name, memory_method = _describe(device, threads)
    fmt = "channels_last" if args.channels_last else "contiguous"
    print(
        f"device {device_name}; torch {torch.__version__}; amp {args.amp}; {fmt}; timing: {args.steps} rounds after "
        f"{args.warmup} warm-up, each round one step of every variant and one run of every ideal pass (median "
        f"reported); peak memory: {memory_method}",
        flush=True,
    )
    results, targets = [], []
    for model in models:
        for shape in shapes:
            group = measure_group(model, shape, variants, args, device, threads)
            b, mu = SHAPES[shape]
            header = f"{model} @ {shape}: B={b}, mu={mu}, {b * (1 + 2 * mu)} images/step; {device_name}, amp {args.amp}"
            group_targets = [{"model": model, "shape": shape, **t} for t in check_targets(group)]
            print_table(group, group_targets, header)
            results += group
            targets += group_targets
    return {
        "command": [sys.executable, *sys.argv],
        **stamp(),
        "device": str(device),
        "device_name": device_name,
        "torch": torch.__version__,
        "threads": threads,
        "amp": args.amp,
        "channels_last": args.channels_last,
        "steps": args.steps,
        "warmup": args.warmup,
        "memory_method": memory_method,
        "results": results,
        "targets": targets,
        "config": _job_config(),
    }


def _describe(device: torch.device, threads: int) -> tuple[str, str]:
    """The device's name and how peak memory is measured on it, for the header and the JSON."""
    if device.type == "cuda":
        memory_method = (
            f"torch.cuda.max_memory_allocated over {MEMORY_STEPS} steps of the variant alone minus "
            "torch.cuda.memory_allocated before them"
        )
        return torch.cuda.get_device_name(device), memory_method
    memory_method = (
        f"peak RSS over {MEMORY_STEPS} steps of a fresh process per variant (kernel high-water mark, reset via "
        "/proc/self/clear_refs after building models, optimizers and inputs) minus its RSS then"
    )
    return f"CPU, {threads} threads", memory_method


def _job_config() -> dict:
    shapes = {k: {"batch_size": b, "mu": mu} for k, (b, mu) in SHAPES.items()}
    recipe = {"lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, "label_smoothing": LABEL_SMOOTHING}
    return {"shapes": shapes, **recipe, "uda_weight": UDA_WEIGHT, "dropout": DROPOUT, "ideal": IDEAL}


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
