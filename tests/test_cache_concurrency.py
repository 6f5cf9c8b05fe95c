"""The decode cache shared by runs that start together, and by runs killed while they build it (issue 29).

Real processes (``cache_child.py``) load one new image folder into one cache folder: one builds, the others wait for
it and read its entry; a builder killed with SIGKILL leaves nothing that a later run trusts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cache_child import digest
from conftest import REPO
from metapl.data import load_dataset
from metapl.data.sources import cache, locking
from metapl.logs import capture

CHILD = Path(__file__).with_name("cache_child.py")
pytestmark = pytest.mark.skipif(locking.fcntl is None, reason="advisory file locks (fcntl) are POSIX only")


def start(tree: Path, cache_dir: Path, log: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests")])}
    cmd = [sys.executable, str(CHILD), str(tree), str(cache_dir), str(log), *flags]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def wait_for(log: Path, prefix: str, proc: subprocess.Popen, timeout: float = 60) -> str:
    """The first line of ``log`` starting with ``prefix``, once the process has written it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [line for line in lines(log) if line.startswith(prefix)]
        if found:
            return found[0]
        assert proc.poll() is None, f"the process ended ({proc.returncode}) before {prefix!r}: {proc.stderr.read()}"
        time.sleep(0.05)
    raise AssertionError(f"no {prefix!r} line within {timeout} s: {lines(log)}")


def expected_digest(tree: Path, cache_dir: Path) -> str:
    return digest(load_dataset("folder", str(tree), cache_dir=str(cache_dir)))


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".trash-", ".lock-")))


def test_three_runs_started_together_decode_once_and_read_the_same_arrays(make_tree, tmp_path):
    tree, root, go = make_tree(per_class=3), tmp_path / "cache", tmp_path / "go"
    logs = [tmp_path / f"run{i}.log" for i in range(3)]
    procs = [start(tree, root, log, "--go", str(go), "--slow-build", "1.5") for log in logs]
    for proc, log in zip(procs, logs, strict=True):
        wait_for(log, "ready", proc)
    go.touch()
    assert [proc.wait(timeout=60) for proc in procs] == [0, 0, 0], [p.stderr.read() for p in procs]

    runs = [lines(log) for log in logs]
    builders = [i for i, run in enumerate(runs) if "building" in run]
    assert len(builders) == 1, runs
    assert sum(line.startswith("decoding 18 images") for run in runs for line in run) == 1
    builder_pid = procs[builders[0]].pid
    for i, run in enumerate(runs):
        if i != builders[0]:  # the others waited, one line each, and read the builder's entry
            waits = [line for line in run if line.startswith("waiting for")]
            assert waits == [f"waiting for process {builder_pid} to finish building {root / entry_name(root)}"]
            assert f"using cached arrays in {root / entry_name(root)} (built by another process)" in run
    want = expected_digest(tree, tmp_path / "reference-cache")
    assert [next(line for line in run if line.startswith("digest")) for run in runs] == [f"digest {want}"] * 3
    assert leftovers(root) == []


def entry_name(root: Path) -> str:
    (entry,) = [p.name for p in root.iterdir() if p.name.startswith("folder-")]
    return entry


def test_a_build_killed_while_writing_leaves_nothing_trusted_and_the_next_run_rebuilds(make_tree, tmp_path):
    tree, root, log = make_tree(per_class=3), tmp_path / "cache", tmp_path / "killed.log"
    proc = start(tree, root, log, "--stall-write", "60")
    wait_for(log, "writing", proc)  # one array file of the entry is written, the rest is not
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    (tmp,) = [p for p in root.iterdir() if p.name.startswith(".tmp-folder-")]
    assert [p.suffix for p in tmp.iterdir()] == [".npy"] and not (tmp / cache.META_FILE).exists()
    assert not list(root.glob("folder-*"))  # nothing under the entry's name
    entry = tmp.name.removeprefix(".tmp-").rsplit("-", 1)[0]  # its lock file stays: the kernel released the lock
    assert leftovers(root) == sorted([tmp.name, f".lock-{entry}"])

    with capture() as seen:
        data = load_dataset("folder", str(tree), cache_dir=str(root))
    assert sum(line.startswith("decoding 18 images") for line in seen) == 1  # rebuilt, not read from the temp folder
    assert digest(data) == expected_digest(tree, tmp_path / "reference-cache")
    assert leftovers(root) == []  # the killed build's temporary folder and lock file are gone


def test_a_waiting_run_builds_the_entry_itself_when_the_builder_is_killed(make_tree, tmp_path):
    tree, root = make_tree(per_class=3), tmp_path / "cache"
    builder = start(tree, root, tmp_path / "builder.log", "--slow-build", "60")
    wait_for(tmp_path / "builder.log", "building", builder)  # it holds the entry's lock
    waiter = start(tree, root, tmp_path / "waiter.log")
    assert wait_for(tmp_path / "waiter.log", "waiting for", waiter).startswith(f"waiting for process {builder.pid} ")
    builder.send_signal(signal.SIGKILL)
    builder.wait(timeout=30)
    assert waiter.wait(timeout=60) == 0, waiter.stderr.read()
    run = lines(tmp_path / "waiter.log")
    assert sum(line.startswith("decoding 18 images") for line in run) == 1
    assert run[-2] == f"digest {expected_digest(tree, tmp_path / 'reference-cache')}"
    assert leftovers(root) == []


def test_leftovers_of_a_running_build_are_kept_and_those_of_a_dead_one_removed(tmp_path):
    entry = "folder-0123456789abcdef"
    running, dead = tmp_path / f".tmp-{entry}-abc12345", tmp_path / ".tmp-unlabeled-fedcba9876543210-xyz98765"
    trash = tmp_path / ".trash-unlabeled-fedcba9876543210-4321"
    for folder in (running, dead, trash):
        folder.mkdir()
        (folder / "train_images.npy").write_bytes(b"partial")
    (tmp_path / ".lock-unlabeled-fedcba9876543210").write_text("99999999\n")  # its holder was killed
    with locking.build_lock(tmp_path / entry) as locked:  # another build of `entry` is running (this one)
        assert locked and (tmp_path / f".lock-{entry}").read_text() == f"{os.getpid()}\n"
        cache.remove_leftovers(tmp_path)
        assert leftovers(tmp_path) == [f".lock-{entry}", running.name]
    assert leftovers(tmp_path) == [running.name]  # the lock file goes with its build
    cache.remove_leftovers(tmp_path)
    assert leftovers(tmp_path) == []


def test_build_lock_guards_a_file_entry_and_falls_back_where_locks_are_unavailable(tmp_path, monkeypatch):
    target = tmp_path / "predictions" / "0123.npz"  # the Reduced-MPL prediction cache's shape of entry
    with locking.build_lock(target) as locked:
        assert locked and (tmp_path / "predictions" / ".lock-0123.npz").is_file()
    assert list((tmp_path / "predictions").iterdir()) == []
    monkeypatch.setattr(locking, "fcntl", None)
    with locking.build_lock(target) as locked:
        assert not locked
    arrays, _ = cache.load_or_build(tmp_path / "c", "x", {"a": 1}, lambda: ({"v": [1, 2]}, {}), quiet=True)
    assert arrays["v"].tolist() == [1, 2]
