"""This process and its place in the job, shared by the commands: devices, torchrun/DDP, the CPU share, seeds and stop
signals."""

from __future__ import annotations

import inspect
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from metapl.errors import UserError

_DDP_ARGS = inspect.signature(nn.parallel.DistributedDataParallel).parameters


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, evaluates and writes checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1


def launched_world_size() -> int:
    """How many processes ``torchrun`` started for this job (``WORLD_SIZE``; 1 without torchrun).

    Readable before joining the process group, so that a setting that cannot run distributed is refused before any
    process waits for the others.
    """
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> Dist:
    """Join the process group when launched by ``torchrun`` (NCCL on CUDA, Gloo on CPU); no-op otherwise.

    On the CPU, each rank gets an equal share of the cores unless ``OMP_NUM_THREADS`` says otherwise (torchrun sets
    it to 1): N ranks each using every core would oversubscribe them N times.
    """
    world = launched_world_size()
    if world <= 1:
        return Dist()
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


_FREE_CORES: tuple[float, float] | None = None  # (time.monotonic() of the measurement, free cores)


def free_cpu_cores(sample_s: float = 0.1, max_age_s: float = 30.0) -> float:
    """How many of this process's cores other processes leave idle, from ``/proc/stat`` over ``sample_s`` seconds.

    Measured while this process sleeps, so it counts the others' load only. Cached for ``max_age_s`` seconds (the
    demo's three runs measure once: their own loader workers must not count as another user's load). Where
    ``/proc/stat`` is unreadable (not Linux), every core counts as free.
    """
    global _FREE_CORES
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    now = time.monotonic()
    if _FREE_CORES is not None and now - _FREE_CORES[0] < max_age_s:
        return min(usable, _FREE_CORES[1])
    try:
        busy0, total0 = _cpu_times()
        time.sleep(sample_s)
        busy1, total1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return float(usable)
    cores = os.cpu_count() or 1
    busy_cores = cores * (busy1 - busy0) / max(total1 - total0, 1)
    _FREE_CORES = (now, max(0.0, usable - busy_cores))
    return _FREE_CORES[1]


def _cpu_times() -> tuple[int, int]:
    # The aggregate "cpu" line of /proc/stat: user nice system idle iowait irq softirq steal ... (clock ticks).
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:9]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


@dataclass(frozen=True)
class CpuShare:
    """What one training process takes of the machine: loader worker processes and intra-op threads."""

    free_cores: float
    workers: int
    threads: int


def plan_cpu_share(
    workers: int | None, threads: int | None, device: torch.device, local_world: int = 1, *, copy_only: bool = False
) -> CpuShare:
    """Choose loader workers and intra-op threads from the cores actually free, where the user left them open.

    Oversubscribed cores are the expensive mistake: an intra-op thread pool waits at every parallel region for its
    slowest thread, and a descheduled one stalls the whole step (a 64-image forward took 420 ms with 2 threads on
    2 busy cores against 41 ms with 1; benchmarks/README.md section 1). So the training process and its loader
    workers together ask for no more cores than are free (each rank its share under torchrun); on a GPU the threads
    only launch kernels and the workers do the CPU work.

    Args:
        workers: loader workers the user asked for, or None to choose.
        threads: intra-op threads the user asked for, or None to choose (``OMP_NUM_THREADS`` counts as asking).
        device: the training device.
        local_world: processes of this job on this machine.
        copy_only: the loaders only copy cached uint8 rows (``--augment-on device``): on the CPU that copy is cheaper
            in the training process than the hand-off from a worker, so no workers; on a GPU two overlap it.

    Returns:
        The chosen share; ``free_cores`` is the measurement behind it.
    """
    if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = int(os.environ["OMP_NUM_THREADS"])
    free = free_cpu_cores() / max(1, local_world) if workers is None or threads is None else 0.0
    cores = max(1, int(free + 0.5))
    if device.type != "cpu":
        chosen = min(cores, 2 if copy_only else 16)
        return CpuShare(free, chosen if workers is None else workers, threads or torch.get_num_threads())
    if workers is None:
        # Pillow augmentation costs about as much as a small model's step on the CPU: half the free cores each, at
        # least one worker so that loading overlaps the step.
        workers = 0 if copy_only else max(1, cores // 2)
    if threads is None:
        threads = max(1, cores - workers)
    return CpuShare(free, workers, threads)


def leave_distributed() -> None:
    """Destroy the process group ``init_distributed`` joined, if any (the end of a ``torchrun`` command).

    A gloo or NCCL group still alive at interpreter shutdown can abort the rank (SIGABRT, "terminate called without an
    active exception") when its worker threads are torn down with the process.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def select_device(name: str) -> torch.device:
    """``auto`` picks the local rank's GPU when CUDA is available, else the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for CUDA, but no GPU is visible; use --device cpu")
        device = torch.device(name if ":" in name else f"cuda:{local_rank}")
        torch.cuda.set_device(device)
        # TF32 matmuls/convolutions: the usual speed-for-precision trade on Ampere and later.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        return device
    if name != "cpu":
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp``; float16 needs CUDA (it relies on a gradient scaler)."""
    if amp == "none":
        return None
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device; use --amp bf16 on the CPU")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def wrap_ddp(model: nn.Module, d: Dist, device: torch.device, *, sync_bn: bool) -> nn.Module:
    """DistributedDataParallel (with SyncBatchNorm if asked; it runs on CUDA only) when running under torchrun."""
    if not d.enabled:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    # Buffers are not broadcast every forward: BatchNorm statistics stay per rank (or synced by SyncBatchNorm).
    # Newer torch renames the flag (and deprecates the old name); both leave the initial broadcast of rank 0's
    # parameters, which is what makes every rank start from the same weights.
    sync: dict[str, Any] = (
        {"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_ARGS else {"broadcast_buffers": False}
    )
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, **sync)


def all_reduce_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Mean of ``x`` over ranks (identity in a single process)."""
    if d.enabled:
        x = x.clone()
        dist.all_reduce(x)
        x /= d.world_size
    return x


def barrier(d: Dist) -> None:
    """Wait for every rank."""
    if d.enabled:
        dist.barrier()


class StopSignals:
    """A context in which SIGINT (Ctrl-C) and SIGTERM only set ``signum``: the training loop polls it, saves and exits.

    Stopping between two steps, never inside one, keeps the teacher, the student and the optimizers consistent for
    the checkpoint. A second signal interrupts at once (``KeyboardInterrupt``), for a step that never ends. Outside
    the main thread, where Python cannot install handlers, the signals keep their usual effect.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *_exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def stop_agreed(stop: StopSignals, d: Dist, device: torch.device, synced: bool) -> bool:
    """Whether to stop after this step on a signal. Under torchrun all ranks must agree, so they compare their flags
    at the steps they synchronise anyway (``synced``); a single process stops at the next step boundary."""
    if not d.enabled:
        return stop.signum is not None
    if not synced:
        return False
    flag = torch.tensor(0.0 if stop.signum is None else 1.0, device=device)
    return bool(all_reduce_mean(flag, d) > 0)
