"""Loader workers and intra-op threads chosen from the free cores (metapl.training.process.plan_cpu_share)."""

import os

import pytest
import torch

from metapl.training import process as runtime

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def free(monkeypatch):
    """Pretend this many cores are free, and no OMP_NUM_THREADS is set."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def set_free(cores: float):
        monkeypatch.setattr(runtime, "free_cpu_cores", lambda: cores)

    return set_free


@pytest.mark.parametrize(
    ("cores", "workers", "threads"), [(0.3, 1, 1), (1.2, 1, 1), (2.0, 1, 1), (4.0, 2, 2), (16.0, 8, 8)]
)
def test_cpu_share_never_asks_for_more_than_the_free_cores(free, cores, workers, threads):
    free(cores)
    share = runtime.plan_cpu_share(None, None, CPU)
    assert (share.workers, share.threads) == (workers, threads)


def test_cpu_share_splits_the_free_cores_between_local_ranks(free):
    free(8.0)
    share = runtime.plan_cpu_share(None, None, CPU, local_world=4)
    assert (share.free_cores, share.workers, share.threads) == (2.0, 1, 1)


def test_cpu_share_keeps_what_the_user_chose(free, monkeypatch):
    free(1.0)
    share = runtime.plan_cpu_share(3, 5, CPU)
    assert (share.workers, share.threads) == (3, 5)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.plan_cpu_share(0, None, CPU).threads == 3  # OMP_NUM_THREADS counts as asking
    free(8.0)
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert runtime.plan_cpu_share(None, None, CPU).workers == 4
    assert runtime.plan_cpu_share(2, None, CPU).threads == 6  # the rest of the free cores


def test_cpu_share_on_a_gpu_gives_the_cores_to_the_loader(free):
    free(12.0)
    assert runtime.plan_cpu_share(None, 2, CUDA).workers == 12
    free(64.0)
    assert runtime.plan_cpu_share(None, 2, CUDA).workers == 16


def test_free_cores_counts_the_other_processes_busy_time(monkeypatch):
    # Two /proc/stat readings 1,000 ticks apart on all cores, 250 of them busy: a quarter of the machine is taken.
    readings = iter([(5_000, 20_000), (5_250, 21_000)])
    monkeypatch.setattr(runtime, "_cpu_times", lambda: next(readings))
    monkeypatch.setattr(runtime, "_FREE_CORES", None)
    monkeypatch.setattr(runtime.time, "sleep", lambda s: None)
    usable = len(os.sched_getaffinity(0))
    expected = max(0.0, usable - (os.cpu_count() or 1) * 0.25)
    assert runtime.free_cpu_cores() == pytest.approx(expected)
    assert runtime.free_cpu_cores() == pytest.approx(expected)  # cached: no third reading


def test_free_cores_without_proc_stat_counts_every_core_free(monkeypatch):
    def unreadable():
        raise OSError("no /proc")

    monkeypatch.setattr(runtime, "_cpu_times", unreadable)
    monkeypatch.setattr(runtime, "_FREE_CORES", None)
    assert runtime.free_cpu_cores() == len(os.sched_getaffinity(0))


def test_cpu_share_with_device_augmentation_copies_rows_in_the_training_process(free):
    free(2.0)
    share = runtime.plan_cpu_share(None, None, CPU, copy_only=True)
    assert (share.workers, share.threads) == (0, 2)
    free(12.0)
    assert runtime.plan_cpu_share(None, None, CUDA, copy_only=True).workers == 2
    assert runtime.plan_cpu_share(3, None, CPU, copy_only=True).workers == 3  # asked for: kept
