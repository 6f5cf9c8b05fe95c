"""How fast is one Meta Pseudo Labels update, and how close does it come to the passes it cannot avoid?

Times ``metapl.core.mpl_update`` (hard pseudo labels with the ``taylor`` and ``dot`` feedback estimators, and soft
labels with the exact meta-gradient) on synthetic random batches: no data loading, this measures the step alone.
Two references are measured in the same run:

* ``ideal``: the sum of the passes the update cannot avoid, each timed alone (median of its own runs):
  taylor = T(x_uw) no-grad + S(x_us) fwd+bwd + S step + 2 × S(x_l) no-grad + T(cat(x_l, x_us)) fwd+bwd + T step;
  dot    = the same with one S(x_l) fwd+bwd in place of the two no-grad S(x_l) forwards.
  The S(x_l) passes run in float32 in feedback mode, as the core runs them (h is a small difference of two losses).
* ``naive``: the step of the most-used public PyTorch port (kekmodel/MPL-pytorch), re-implemented here: one teacher
  forward with a graph over cat(x_l, x_uw, x_us), one student forward with a graph over cat(x_l, x_us) (L_old read
  off that mixed batch), the student's backward and step while the teacher's graph is still alive, a no-grad student
  forward on x_l (L_new), then the teacher's loss (labeled CE + UDA + (L_new - L_old) · CE) and its backward and
  step; default-implementation SGD and one ``.item()`` per logged loss, as the port has them.

A step holds B labeled and μB unlabeled images, the unlabeled ones in a weak and a strong view: B(1 + 2μ) images,
the count that images/s uses. Shapes: ``paper`` B=64 μ=7, ``cpu`` B=32 μ=7 (configs/cifar10_cpu.yaml), ``tiny`` B=2
μ=1 (smoke test). All variants use the CIFAR recipe's losses: UDA weight 8, label smoothing 0.15, SGD Nesterov.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the warm-up and timed steps minus the memory allocated
before them. On the CPU each variant runs in a fresh process (forked from this one, which has imported the
libraries but run no tensor work); its peak RSS over the steps (the kernel's high-water mark, reset once the models,
optimizers and inputs are built) minus its RSS at that point. Both count the step's activations, gradients and
optimizer state, not the weights.

    .venv/bin/python benchmarks/step_speed.py                                   # CPU: both models, both shapes
    .venv/bin/python benchmarks/step_speed.py --models small_cnn --json out.json
    python3 benchmarks/step_speed.py --device cuda --amp bf16 --channels-last --models wrn28_2 --shapes paper
    .venv/bin/python benchmarks/step_speed.py --tiny --models small_cnn         # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common import available_cpus, median  # first: it puts src/ on sys.path when metapl is not installed
from metapl.core import Batch, MPLConfig, MPLState, feedback_mode, mpl_update
from metapl.errors import UserError
from metapl.models import create_model
from metapl.runtime import amp_dtype as resolve_amp
from metapl.runtime import make_sgd, select_device

SHAPES = {"paper": (64, 7), "cpu": (32, 7), "tiny": (2, 1)}  # name -> (B labeled, μ)
VARIANTS = ("hard-taylor", "hard-dot", "soft", "naive", "ideal")
MPL_VARIANTS = {"hard-taylor": ("hard", "taylor"), "hard-dot": ("hard", "dot"), "soft": ("soft", "taylor")}
NUM_CLASSES, IMAGE_SIZE, DROPOUT = 10, 32, 0.2
# The CIFAR recipe's settings (configs/cifar10_4k.yaml); the naive step uses the same ones.
LR, MOMENTUM, WEIGHT_DECAY, LABEL_SMOOTHING = 0.05, 0.9, 5e-4, 0.15
UDA_WEIGHT, UDA_TEMPERATURE, UDA_THRESHOLD = 8.0, 0.7, 0.6
MIB = 2**20
MEMORY_STEPS = 2  # step 1 allocates gradients and optimizer state; step 2 runs with them in place (the steady state)

# The passes each hard update cannot avoid, with how many times a step runs them.
IDEAL = {
    "ideal-taylor": {
        "teacher_fwd_nograd_uw": 1, "student_fwd_bwd_us": 1, "student_step": 1, "student_fwd_nograd_l_fp32": 2,
        "teacher_fwd_bwd_l_us": 1, "teacher_step": 1,
    },
    "ideal-dot": {
        "teacher_fwd_nograd_uw": 1, "student_fwd_bwd_us": 1, "student_step": 1, "student_fwd_bwd_l_fp32": 1,
        "teacher_fwd_bwd_l_us": 1, "teacher_step": 1,
    },
}  # fmt: skip

# (name, numerator variant, denominator variant, measure, comparison, limit)
TARGETS = (
    ("speed-up of hard-taylor over naive", "naive", "hard-taylor", "ms_per_step", ">=", 1.25),
    ("speed-up of hard-dot over naive", "naive", "hard-dot", "ms_per_step", ">=", 1.25),
    ("hard-taylor time / ideal-taylor", "hard-taylor", "ideal-taylor", "ms_per_step", "<=", 1.10),
    ("hard-dot time / ideal-dot", "hard-dot", "ideal-dot", "ms_per_step", "<=", 1.10),
    ("hard-taylor peak memory / naive", "hard-taylor", "naive", "peak_mb", "<=", 0.75),
    ("hard-dot peak memory / naive", "hard-dot", "naive", "peak_mb", "<=", 0.75),
    ("soft time / hard-taylor", "soft", "hard-taylor", "ms_per_step", "<=", 2.5),
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
    return p


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


# ----------------------------------------------------------------------------------------------------------------
# One measurement


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
        calls.update(_build(variant, job.model, b, mu, amp, device, fmt))
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


def _model(name: str, device: torch.device, fmt: torch.memory_format) -> torch.nn.Module:
    m = create_model(name, num_classes=NUM_CLASSES, in_channels=3, image_size=IMAGE_SIZE, dropout=DROPOUT)
    return m.to(device=device, memory_format=fmt).train()


def _random_batch(b: int, mu: int, device: torch.device, fmt: torch.memory_format) -> Batch:
    def images(n: int) -> torch.Tensor:
        return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, device=device).contiguous(memory_format=fmt)

    labels = torch.randint(NUM_CLASSES, (b,), device=device)
    return Batch(x_l=images(b), y_l=labels, x_uw=images(mu * b), x_us=images(mu * b))


def _build(variant: str, model: str, b: int, mu: int, amp, device: torch.device, fmt) -> dict:
    """Fresh teacher, student, optimizers and batch for ``variant``; name -> step callable (the ideal: one per pass)."""
    teacher, student = (_model(model, device, fmt) for _ in range(2))
    batch = _random_batch(b, mu, device, fmt)
    if variant == "ideal":
        return _ideal_passes(teacher, student, batch, amp, device)
    scalers = (None, None)
    if amp == torch.float16:
        scalers = (torch.amp.GradScaler(device.type), torch.amp.GradScaler(device.type))
    if variant == "naive":
        t_opt, s_opt = _port_sgd(teacher), _port_sgd(student)
        return {"naive": lambda: naive_step(teacher, student, t_opt, s_opt, batch, amp_dtype=amp,
                                            t_scaler=scalers[0], s_scaler=scalers[1])}  # fmt: skip
    mode, feedback = MPL_VARIANTS[variant]
    config = MPLConfig(mode=mode, feedback=feedback, label_smoothing=LABEL_SMOOTHING,
                       uda_temperature=UDA_TEMPERATURE, uda_threshold=UDA_THRESHOLD)  # fmt: skip
    t_opt, s_opt = (_sgd(m, device) for m in (teacher, student))
    state = MPLState()
    return {variant: lambda: mpl_update(teacher, student, t_opt, s_opt, batch, config, state, uda_weight=UDA_WEIGHT,
                                        amp_dtype=amp, t_scaler=scalers[0], s_scaler=scalers[1])}  # fmt: skip


def _sgd(model, device: torch.device) -> torch.optim.SGD:
    return make_sgd(model, lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY, device=device)


# ----------------------------------------------------------------------------------------------------------------
# The references


def _ideal_passes(teacher, student, batch: Batch, amp, device: torch.device) -> dict:
    """name -> callable running one pass that a hard update cannot avoid (see ``IDEAL``), to be timed alone."""
    x_l, y_l, x_uw, x_us, _ = batch
    y_u = torch.randint(NUM_CLASSES, (x_us.shape[0],), device=x_us.device)
    autocast = torch.autocast(device_type=device.type, dtype=amp, enabled=amp is not None)
    t_opt, s_opt = _sgd(teacher, device), _sgd(student, device)
    s_params = [p for p in student.parameters() if p.requires_grad]

    def teacher_fwd_nograd_uw():
        with torch.no_grad(), autocast:
            teacher(x_uw)

    def student_fwd_bwd_us():
        student.zero_grad(set_to_none=True)
        with autocast:
            logits = student(x_us)
        F.cross_entropy(logits.float(), y_u).backward()

    def student_fwd_nograd_l_fp32():
        with torch.no_grad(), feedback_mode(student):
            F.cross_entropy(student(x_l).float(), y_l)

    def student_fwd_bwd_l_fp32():
        with feedback_mode(student):
            torch.autograd.grad(F.cross_entropy(student(x_l).float(), y_l), s_params, allow_unused=True)

    def teacher_fwd_bwd_l_us():
        teacher.zero_grad(set_to_none=True)
        with autocast:
            logits = teacher(torch.cat([x_l, x_us]))
        F.cross_entropy(logits.float(), torch.cat([y_l, y_u])).backward()

    return {
        "teacher_fwd_nograd_uw": teacher_fwd_nograd_uw,
        "student_fwd_bwd_us": student_fwd_bwd_us,
        "student_fwd_nograd_l_fp32": student_fwd_nograd_l_fp32,
        "student_fwd_bwd_l_fp32": student_fwd_bwd_l_fp32,
        "teacher_fwd_bwd_l_us": teacher_fwd_bwd_l_us,
        "student_step": s_opt.step,  # on the gradients left by the fwd+bwd passes above
        "teacher_step": t_opt.step,
    }


def _port_sgd(model) -> torch.optim.SGD:
    """The port's optimizer: decay on everything but biases and BatchNorm, PyTorch's default implementation."""
    decay = [p for n, p in model.named_parameters() if not any(k in n for k in ("bn", "bias"))]
    no_decay = [p for n, p in model.named_parameters() if any(k in n for k in ("bn", "bias"))]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM, nesterov=True)


def naive_step(teacher, student, t_opt, s_opt, batch: Batch, *, amp_dtype=None, t_scaler=None, s_scaler=None):
    """One MPL step the way the most-used public PyTorch port writes it (our re-implementation, for reference).

    Args:
        teacher: the teacher.
        student: the student.
        t_opt: the teacher's optimizer.
        s_opt: the student's optimizer.
        batch: labeled and unlabeled images.
        amp_dtype: autocast dtype or None.
        t_scaler: the teacher's gradient scaler (float16) or None.
        s_scaler: the student's gradient scaler (float16) or None.

    Returns:
        The logged losses as Python floats (the port reads each with ``.item()`` every step).
    """
    x_l, y_l, x_uw, x_us, _ = batch
    n_l = x_l.shape[0]
    autocast = torch.autocast(device_type=x_l.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    with autocast:
        # One teacher forward with a graph over all three batches: the weak view's activations stay alive too.
        t_logits = teacher(torch.cat([x_l, x_uw, x_us])).float()  # (B + 2μB, K)
        t_logits_l = t_logits[:n_l]
        t_logits_uw, t_logits_us = t_logits[n_l:].chunk(2)
        t_loss_l = F.cross_entropy(t_logits_l, y_l, label_smoothing=LABEL_SMOOTHING)

        # UDA on the teacher; the sharpened weak-view distribution also gives the student's hard labels.
        soft_pseudo_label = F.softmax(t_logits_uw.detach() / UDA_TEMPERATURE, dim=-1)
        max_probs, hard_pseudo_label = soft_pseudo_label.max(dim=-1)
        mask = max_probs.ge(UDA_THRESHOLD).float()
        t_loss_u = (-(soft_pseudo_label * F.log_softmax(t_logits_us, dim=-1)).sum(dim=-1) * mask).mean()
        t_loss_uda = t_loss_l + UDA_WEIGHT * t_loss_u

        # Student forward with a graph over labeled + strong images; L_old comes from this mixed batch.
        s_logits = student(torch.cat([x_l, x_us])).float()  # (B + μB, K)
        s_logits_l, s_logits_us = s_logits[:n_l], s_logits[n_l:]
        s_loss_l_old = F.cross_entropy(s_logits_l.detach(), y_l)
        s_loss = F.cross_entropy(s_logits_us, hard_pseudo_label, label_smoothing=LABEL_SMOOTHING)

    _scaled(s_loss, s_scaler).backward()
    _port_step(s_opt, s_scaler)

    # L_new on the labeled batch alone, then the port's feedback (new - old) and the teacher's step.
    with autocast:
        with torch.no_grad():
            s_logits_l = student(x_l)
        s_loss_l_new = F.cross_entropy(s_logits_l.detach().float(), y_l)
        dot_product = s_loss_l_new - s_loss_l_old
        hard_pseudo_label_us = t_logits_us.detach().argmax(dim=-1)
        t_loss_mpl = dot_product * F.cross_entropy(t_logits_us, hard_pseudo_label_us)
        t_loss = t_loss_uda + t_loss_mpl

    _scaled(t_loss, t_scaler).backward()
    _port_step(t_opt, t_scaler)
    teacher.zero_grad()
    student.zero_grad()
    return {"s_loss": s_loss.item(), "t_loss": t_loss.item(), "t_loss_l": t_loss_l.item(),
            "t_loss_u": t_loss_u.item(), "t_loss_mpl": t_loss_mpl.item(), "mask": mask.mean().item()}  # fmt: skip


def _scaled(loss, scaler):
    return scaler.scale(loss) if scaler is not None else loss


def _port_step(optimizer, scaler) -> None:
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


# ----------------------------------------------------------------------------------------------------------------
# Running the jobs, reporting


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

    def job(vs: list[str], memory: bool) -> Job:
        return Job(model, shape, tuple(vs), memory, str(device), args.amp, args.channels_last, args.steps,
                   args.warmup, threads, args.seed)  # fmt: skip

    peaks = {}
    for v in timed:
        if v != "ideal":
            tick = time.perf_counter()
            peaks[v] = run(job([v], True))
            print(f"  {model} @ {shape}: peak memory of {v} ({MEMORY_STEPS} steps) {time.perf_counter() - tick:.1f} s",
                  flush=True)  # fmt: skip
    tick = time.perf_counter()
    timing = run(job(timed, False))
    print(f"  {model} @ {shape}: {args.warmup} + {args.steps} interleaved rounds of {', '.join(timed)} "
          f"{time.perf_counter() - tick:.1f} s", flush=True)  # fmt: skip

    for v in timed:
        if "error" in timing:
            rows[v] = {**base, "variant": v, "error": timing["error"]}
            continue
        seconds = timing["seconds"]
        if v == "ideal":
            for name, counts in IDEAL.items():
                components = {c: 1000 * median(seconds[c]) for c in counts}
                ms = sum(components[c] * n for c, n in counts.items())
                rows[name] = {**base, "variant": name, "ms_per_step": ms, "ms_min": None, "ms_steps": None,
                              "images_per_s": 1000 * base["images_per_step"] / ms, "peak_mb": None,
                              "components_ms": components}  # fmt: skip
            continue
        ms_steps = [1000 * s for s in seconds[v]]
        ms = median(ms_steps)
        rows[v] = {**base, "variant": v, "ms_per_step": ms, "ms_min": min(ms_steps), "ms_steps": ms_steps,
                   "images_per_s": 1000 * base["images_per_step"] / ms, "peak_mb": peaks[v].get("peak_mb"),
                   "peak_error": peaks[v].get("error")}  # fmt: skip
    order = [n for v in variants for n in ((*IDEAL,) if v == "ideal" else (v,))]
    return [rows[n] for n in order if n in rows]


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
    if name.startswith("speed-up"):
        ideal = ms.get("ideal-" + den.removeprefix("hard-"))
        if ideal:
            return (f"the unavoidable passes alone would give naive/ideal = {ms['naive'] / ideal:.2f}: "
                    "the floor is the compute of the passes the update must run")  # fmt: skip
        return "run --variants ideal too to see the floor"
    if "ideal" in name:
        return (
            f"{ms[num] - ms[den]:.1f} ms/step beyond the passes timed alone: glue (losses, feedback_mode, "
            "cat/slices, the dot product's gradient copy) and passes that do not overlap on this device"
        )
    if "memory" in name:
        return (
            "the step must hold the teacher's graph over cat(x_l, x_us) (and the student's over x_us first); "
            "on the CPU, RSS also counts pages the allocator keeps after freeing them"
        )
    return (
        "soft differentiates through the student's step: a double backward over the student's μB-image graph "
        "on top of the teacher's graph over all B + 2μB images"
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
            parts = " + ".join(f"{k} {v:.1f}" + (f" x{counts[k]}" if counts[k] > 1 else "")
                               for k, v in r["components_ms"].items())  # fmt: skip
            print(f"  {r['variant']} = {parts} (ms)")
    if targets:
        print(f"{'target':<38} {'value':>6}  {'goal':<7} result")
        for t in targets:
            goal = f"{t['op']} {t['limit']:.2f}"
            print(f"{t['name']:<38} {t['value']:>6.2f}  {goal:<7} {'PASS' if t['passed'] else 'MISS'}")
            if not t["passed"]:
                print(f"    bound: {t['bound']}")


def main(args: argparse.Namespace) -> int:
    """Run every (model, shape, variant), print a table per (model, shape), write ``--json``.

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
        print(f"step_speed: unknown shape/variant {bad} or bad --steps/--warmup; shapes: {', '.join(SHAPES)}; "
              f"variants: {', '.join(VARIANTS)}", file=sys.stderr)  # fmt: skip
        return 2
    try:
        device = select_device(args.device)
        resolve_amp(args.amp, device)
    except UserError as e:
        print(f"step_speed: {e}", file=sys.stderr)
        return 2
    threads = args.threads or available_cpus()
    torch.set_num_threads(threads)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
        memory_method = (f"torch.cuda.max_memory_allocated over {MEMORY_STEPS} steps of the variant alone minus "
                         "torch.cuda.memory_allocated before them")  # fmt: skip
    else:
        device_name = f"CPU, {threads} threads"
        memory_method = (
            f"peak RSS over {MEMORY_STEPS} steps of a fresh process per variant (kernel high-water mark, reset via "
            "/proc/self/clear_refs after building models, optimizers and inputs) minus its RSS then"
        )
    fmt = "channels_last" if args.channels_last else "contiguous"
    print(f"device {device_name}; torch {torch.__version__}; amp {args.amp}; {fmt}; timing: {steps} rounds after "
          f"{warmup} warm-up, each round one step of every variant and one run of every ideal pass (median "
          f"reported); peak memory: {memory_method}", flush=True)  # fmt: skip

    args = argparse.Namespace(**{**vars(args), "steps": steps, "warmup": warmup})  # --tiny's sizes win
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

    runtime = time.perf_counter() - started
    print(f"\nruntime {runtime:.1f} s")
    if args.json:
        report = {
            "command": [sys.executable, *sys.argv], "device": str(device), "device_name": device_name,
            "torch": torch.__version__, "threads": threads, "amp": args.amp, "channels_last": args.channels_last,
            "steps": steps, "warmup": warmup, "memory_method": memory_method, "runtime_s": runtime,
            "results": results, "targets": targets, "config": _job_config(),
        }  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0


def _job_config() -> dict:
    return {"shapes": {k: {"batch_size": b, "mu": mu} for k, (b, mu) in SHAPES.items()}, "lr": LR,
            "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, "label_smoothing": LABEL_SMOOTHING,
            "uda_weight": UDA_WEIGHT, "dropout": DROPOUT, "ideal": IDEAL}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
