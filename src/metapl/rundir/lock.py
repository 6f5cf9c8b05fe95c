"""One writer per run folder: an advisory lock on ``RUN_DIR/.lock`` held by the process that writes the run.

``metapl train`` (new run, ``--overwrite``, ``--resume``) and ``metapl finetune`` take it before they write anything
into the folder; under torchrun only global rank 0 writes run files, so only rank 0 takes it. The lock is
``fcntl.flock`` on the file: the kernel releases it when its holder exits, however it exits (SIGKILL, a crash, a node
reboot of a local disk), so a lock is never left stale. The file itself stays and says who holds or last held it
(``pid N on HOST: metapl train``); its holder empties it on a clean release, so text found in a file whose lock is free
means the previous writer died while holding it, and the new holder says in one line that it took over.

``eval`` and ``plot`` take no lock: they only read the run's files and write files of their own (``eval.json``,
``curves.png``), so they may run beside the trainer. On NFS, ``flock`` is mapped to the server's byte-range locks
(Linux >= 2.6.12), so two machines sharing a folder exclude each other too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from metapl.errors import UserError, reporting_os_errors
from metapl.rundir.layout import LOCK

logger = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # not POSIX: no lock, as before
    fcntl = None  # type: ignore[assignment]  # the module, or None where it does not exist


# Lock descriptors this process holds. A forked child (a DataLoader worker) would share the lock through its copy of
# the descriptor and keep it after a SIGKILL of its parent, until it noticed the parent was gone; children close them.
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


def is_writer_rank() -> bool:
    """Whether this process writes the run's files: global rank 0 under torchrun (read before joining the group)."""
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def run_lock(run_dir: Path, *, command: str, enabled: bool = True) -> Iterator[None]:
    """Hold the run folder's lock for the block; the folder is created if need be.

    Args:
        run_dir: the run folder.
        command: what this process is, for the message another writer gets (``metapl train``).
        enabled: False on the ranks that write nothing: no lock, no folder.

    Raises:
        UserError: another process holds the lock (named by its pid and host); nothing was written.
    """
    if not enabled or fcntl is None:
        yield
        return
    created = not run_dir.exists()
    with reporting_os_errors(run_dir, "create"):
        run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    with reporting_os_errors(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd) or "another process"
            raise UserError(
                f"{run_dir} is in use by {holder}; one run folder takes one writer: wait for it to end (or stop it), "
                "or pick another folder"
            ) from None
        left = _read(fd)
        if left:
            logger.info(f"{path}: its last holder ({left}) ended without releasing it; taken over")
        _write(fd, f"pid {os.getpid()} on {socket.gethostname()}: {command}")
        _HELD.add(fd)
        try:
            yield
        finally:
            _write(fd, "")  # a clean release: the next holder finds no text
            _remove_if_alone(run_dir, created)
    finally:
        _HELD.discard(fd)
        os.close(fd)  # releases the lock


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 512).decode("utf-8", "replace").strip()


def _write(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    if text:
        os.write(fd, (text + "\n").encode())


def _remove_if_alone(run_dir: Path, created: bool) -> None:
    """A folder this process created and left with nothing but the lock (a run refused early) goes again."""
    with contextlib.suppress(OSError):  # a folder that cannot be tidied is harmless
        if created and [p.name for p in run_dir.iterdir()] == [LOCK]:
            (run_dir / LOCK).unlink()
            run_dir.rmdir()
