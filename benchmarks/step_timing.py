"""The timing and memory measurement of ``step_speed``: one ``Job`` (a model at a batch shape) runs in a fresh process
on the CPU (its peak RSS then belongs to it alone) or in this one on CUDA, and ``measure_group`` turns its figures into
result rows.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import resource
import sys
import time
from dataclasses import dataclass
from functools import partial

import torch

from benchmarks.harness import median
from benchmarks.steps import IDEAL, SHAPES, build
from metapl.training.process import amp_dtype as resolve_amp
from metapl.training.process import select_device

MIB = 2**20
MEMORY_STEPS = 2  # step 1 allocates gradients and optimizer state; step 2 runs with them in place (the steady state)


@dataclass(frozen=True)
class Job:
    """One measurement of one model at one batch shape (picklable, for the CPU's fresh processes).

    With ``memory`` False: the interleaved timing of every variant in ``variants``. With ``memory`` True: the peak
    memory of the one variant in ``variants`` over ``MEMORY_STEPS`` steps.
    """

    model: str
    shape: str
    variants: tuple[str, ...]
    memory: bool
    device: str
    amp: str
    channels_last: bool
    steps: int
    warmup: int
    threads: int
    seed: int


def run_job(job: Job) -> dict:
    """Build fresh models and batches and measure them.

    Args:
        job: what to measure.

    Returns:
        ``{"peak_mb": MiB or None}`` for a memory job; otherwise ``{"seconds": {name: [s, ...]}}`` with one list of
        step durations per variant, and per pass of the ideal (``IDEAL``'s keys).
    """
    torch.set_num_threads(job.threads)
    device = select_device(job.device)
    amp = resolve_amp(job.amp, device)
    b, mu = SHAPES[job.shape]
    fmt = torch.channels_last if job.channels_last else torch.contiguous_format
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    calls = {}
    for variant in job.variants:
        torch.manual_seed(job.seed)  # the same weights and images for every variant
        calls.update(build(variant, job.model, b, mu, amp, device, fmt))
    if job.memory:
        memory = PeakMemory(device)
        memory.start()
        for _ in range(MEMORY_STEPS):
            for fn in calls.values():
                fn()
            sync()
        return {"peak_mb": memory.peak_mb()}
    return {"seconds": time_interleaved(calls, warmup=job.warmup, steps=job.steps, sync=sync)}


def time_interleaved(calls: dict, *, warmup: int, steps: int, sync) -> dict[str, list[float]]:
    """Seconds of each call, in rounds that call every callable once, so a drift in the machine's load hits all alike.

    Args:
        calls: name -> zero-argument callable.
        warmup: untimed rounds first.
        steps: timed rounds.
        sync: waits for the device (``torch.cuda.synchronize``; a no-op on the CPU); it brackets each call.

    Returns:
        name -> one duration per timed round.
    """
    out = {name: [] for name in calls}
    for i in range(warmup + steps):
        for name, fn in calls.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                out[name].append(time.perf_counter() - start)
    return out


def _rows(variant: str, base: dict, seconds: dict[str, list[float]], peak: dict) -> dict[str, dict]:
    """The result rows of one timed variant (``ideal``: one row per ``IDEAL`` sum, from its passes' medians)."""
    per_step = base["images_per_step"]
    if variant != "ideal":
        ms_steps = [1000 * s for s in seconds[variant]]
        ms = median(ms_steps)
        times = {"ms_per_step": ms, "ms_min": min(ms_steps), "ms_steps": ms_steps, "images_per_s": 1000 * per_step / ms}
        memory = {"peak_mb": peak.get("peak_mb"), "peak_error": peak.get("error")}
        return {variant: {**base, "variant": variant, **times, **memory}}
    rows = {}
    for name, counts in IDEAL.items():
        components = {c: 1000 * median(seconds[c]) for c in counts}
        ms = sum(components[c] * n for c, n in counts.items())
        times = {"ms_per_step": ms, "ms_min": None, "ms_steps": None, "images_per_s": 1000 * per_step / ms}
        rows[name] = {**base, "variant": name, **times, "peak_mb": None, "components_ms": components}
    return rows


class PeakMemory:
    """Peak memory of what runs after ``start()``, above the memory in use at ``start()``.

    CUDA: the caching allocator's counters. CPU: the process's resident set; the kernel's high-water mark is reset
    to the current RSS through ``/proc/self/clear_refs`` where Linux allows it, else ``ru_maxrss`` is read (then the
    process must be fresh: a high-water mark set before ``start()`` would hide a smaller peak).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0
        self.reset = False

    def start(self) -> None:
        """Take the baseline."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        self.base = _rss_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # "5": reset the peak RSS to the current RSS (Linux ≥ 4.0)
            self.reset = True
        except OSError:
            self.reset = False

    def peak_mb(self) -> float | None:
        """MiB above the baseline at the peak since ``start()``; None where the platform cannot tell."""
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / MIB
        if self.base is None:
            return None
        peak = _hwm_bytes() if self.reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return (peak - self.base) / MIB if peak is not None else None


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def _hwm_bytes() -> int | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    return None


def run_isolated(job: Job) -> dict:
    """``run_job`` in a fresh child process, whose peak RSS then belongs to this job alone.

    On Linux the child is forked from this process, which has imported the libraries but run no tensor work (so no
    thread pool exists to break across the fork, and the child pays no import); elsewhere it is spawned.

    Args:
        job: what to measure.

    Returns:
        ``run_job``'s result, or ``{"error": message}`` when the child failed or died (out of memory, say).
    """
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(job, sender), daemon=True)
    proc.start()
    sender.close()  # only the child holds the sending end now: its death ends recv() with EOFError
    try:
        result = receiver.recv()
    except EOFError:
        result = {"error": "the measuring process died; out of memory?"}
    proc.join()
    if "error" in result and proc.exitcode:
        result["error"] += f" (exit code {proc.exitcode})"
    return result


def run_in_process(job: Job) -> dict:
    """``run_job`` here (CUDA: the allocator's peak counters can be reset, no fresh process needed)."""
    try:
        return run_job(job)
    except Exception as e:  # noqa: BLE001 - one failed measurement should not lose the others' figures
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _child(job: Job, sender) -> None:
    try:
        sender.send(run_job(job))
    except Exception as e:  # noqa: BLE001 - one failed measurement should not lose the others' figures
        sender.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        sender.close()


def measure_group(model: str, shape: str, variants: list[str], args: argparse.Namespace, device, threads) -> list[dict]:
    """Every variant of one model at one batch shape: peak memory one variant at a time, then the timing of all of
    them interleaved.

    Args:
        model: model name.
        shape: a key of ``SHAPES``.
        variants: the variants asked for.
        args: the parsed flags (amp, channels_last, steps, warmup, seed).
        device: the torch device.
        threads: torch CPU threads.

    Returns:
        Result rows, one per variant (two for ``ideal``: taylor and dot).
    """
    b, mu = SHAPES[shape]
    base = {"model": model, "shape": shape, "batch_size": b, "mu": mu, "images_per_step": b * (1 + 2 * mu)}
    rows: dict[str, dict] = {}
    if "soft" in variants and args.amp == "fp16":
        rows["soft"] = {**base, "variant": "soft", "skipped": "soft mode refuses float16 scaling; use --amp bf16"}
    timed = [v for v in variants if v not in rows]
    run = run_in_process if device.type == "cuda" else run_isolated

    job = partial(Job, model, shape, device=str(device), amp=args.amp, channels_last=args.channels_last)
    job = partial(job, steps=args.steps, warmup=args.warmup, threads=threads, seed=args.seed)
    peaks = {}
    for v in timed:
        if v != "ideal":
            tick = time.perf_counter()
            peaks[v] = run(job((v,), True))
            took = time.perf_counter() - tick
            print(f"  {model} @ {shape}: peak memory of {v} ({MEMORY_STEPS} steps) {took:.1f} s", flush=True)
    tick = time.perf_counter()
    timing = run(job(tuple(timed), False))
    took = time.perf_counter() - tick
    rounds = f"{args.warmup} + {args.steps} interleaved rounds of {', '.join(timed)}"
    print(f"  {model} @ {shape}: {rounds} {took:.1f} s", flush=True)
    for v in timed:
        if "error" in timing:
            rows[v] = {**base, "variant": v, "error": timing["error"]}
        else:
            rows.update(_rows(v, base, timing["seconds"], peaks.get(v, {})))
    order = [n for v in variants for n in ((*IDEAL,) if v == "ideal" else (v,))]
    return [rows[n] for n in order if n in rows]


# ----------------------------------------------------------------------------------------------------------------
# --profile: where the soft update's time goes, operator by operator (soft / hard is a target; this explains it)

PROFILED = ("hard-taylor", "soft")


def profile_step(variant: str, model: str, shape: str, device: torch.device) -> tuple[float, dict[str, float]]:
    """One profiled step of ``variant`` after an unprofiled warm-up step, on ``build``'s batch and models.

    Returns:
        ``(wall ms of the profiled step, {operator name: self time in ms})`` (CPU self time, or device self time on a
        GPU).
    """
    from torch.profiler import ProfilerActivity, profile

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


def profile_table(model: str, shape: str, device: torch.device, top: int) -> str:
    """A title line and the Markdown table of the ``top`` operators that add most to the soft step over the hard one."""
    torch.manual_seed(0)
    (hard_ms, hard), (soft_ms, soft) = (profile_step(v, model, shape, device) for v in PROFILED)
    b, mu = SHAPES[shape]
    extra = {k: soft.get(k, 0.0) - hard.get(k, 0.0) for k in set(hard) | set(soft)}
    total = sum(extra.values())
    lines = [
        f"{model}, shape {shape} (B {b}, μ {mu}), {device}, {torch.get_num_threads()} threads: hard-taylor "
        f"{hard_ms:.0f} ms, soft {soft_ms:.0f} ms (×{soft_ms / hard_ms:.2f}, profiled step)",
        "| operator | hard ms | soft ms | soft − hard ms | share of the difference |",
        "|---|---|---|---|---|",
    ]
    for k in sorted(extra, key=extra.get, reverse=True)[:top]:
        share = f"{100 * extra[k] / total:.0f} %"
        lines.append(f"| `{k}` | {hard.get(k, 0.0):.0f} | {soft.get(k, 0.0):.0f} | {extra[k]:+.0f} | {share} |")
    lines.append(f"| all operators | {sum(hard.values()):.0f} | {sum(soft.values()):.0f} | {total:+.0f} | |")
    return "\n".join(lines)
