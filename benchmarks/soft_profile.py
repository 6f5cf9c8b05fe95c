"""Where the soft update's time goes: an operator-level profile of one soft and one hard MPL step, side by side.

``step_speed.py`` measures soft / hard (issue target ≤ 2.5×); this script says which operators make up the
difference, so the bound is explained by measurement, not by guesswork. Both steps run on the same synthetic
batch and the same model builder as ``step_speed.py`` (``step_variants.build``), after one unprofiled warm-up step.

    python benchmarks/soft_profile.py --model wrn28_2 --shape paper        # CPU, ~3 min on 2 idle cores
    python benchmarks/soft_profile.py --model small_cnn --shape tiny       # smoke test
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import common  # noqa: F401 - first: it puts src/ on sys.path when metapl is not installed
from metapl.engine.runtime import select_device
from step_variants import SHAPES, build

VARIANTS = ("hard-taylor", "soft")


def profile_step(variant: str, model: str, shape: str, device: torch.device) -> tuple[float, dict[str, float]]:
    """One profiled step of ``variant`` after a warm-up step.

    Returns:
        ``(wall ms of the profiled step, {operator name: self time in ms})`` (CPU self time, plus CUDA self time
        on a GPU).
    """
    b, mu = SHAPES[shape]
    step = build(variant, model, b, mu, None, device, torch.contiguous_format)[variant]
    step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        step()
        sync()
        wall_ms = 1e3 * (time.perf_counter() - start)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return wall_ms, {e.key: getattr(e, attr) / 1e3 for e in prof.key_averages()}


def table(hard: dict[str, float], soft: dict[str, float], top: int) -> str:
    """The operators that add most to the soft step, with each one's share of the difference."""
    extra = {k: soft.get(k, 0.0) - hard.get(k, 0.0) for k in set(hard) | set(soft)}
    total_extra = sum(extra.values())
    lines = ["| operator | hard ms | soft ms | soft − hard ms | share of the difference |", "|---|---|---|---|---|"]
    for k in sorted(extra, key=extra.get, reverse=True)[:top]:
        lines.append(f"| `{k}` | {hard.get(k, 0.0):.0f} | {soft.get(k, 0.0):.0f} | {extra[k]:+.0f} | "
                     f"{100 * extra[k] / total_extra:.0f} % |")  # fmt: skip
    lines.append(f"| all operators | {sum(hard.values()):.0f} | {sum(soft.values()):.0f} | {total_extra:+.0f} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="wrn28_2")
    p.add_argument("--shape", default="paper", choices=sorted(SHAPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--top", type=int, default=12, help="operators listed")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    torch.manual_seed(0)
    results = {v: profile_step(v, args.model, args.shape, device) for v in VARIANTS}
    (hard_ms, hard), (soft_ms, soft) = results["hard-taylor"], results["soft"]
    b, mu = SHAPES[args.shape]
    print(f"{args.model}, shape {args.shape} (B {b}, μ {mu}), {device}, {torch.get_num_threads()} threads: "
          f"hard-taylor {hard_ms:.0f} ms, soft {soft_ms:.0f} ms (×{soft_ms / hard_ms:.2f}, profiled step)")  # fmt: skip
    print(table(hard, soft, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
