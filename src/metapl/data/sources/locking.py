"""One process builds a cache entry, the others wait: ``build_lock``, an advisory lock per entry.

The lock is an ``flock`` on ``.lock-<entry>`` beside the entry (a decoded-image folder of ``cache.py``, a file such as
the Reduced-MPL predictions). The kernel releases it when its holder ends, SIGKILL included, so a lock is never stale;
the holder removes the file when it lets go. Where locks are unavailable (no ``fcntl``, a file system without them, a
folder that cannot be written) nothing is locked: concurrent processes each build, and atomic renames keep the entry
whole.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent runs each build, and the first rename wins
    fcntl = None  # type: ignore[assignment]  # the module, or None where it does not exist

logger = logging.getLogger(__name__)

LOCK_PREFIX = ".lock-"


@contextlib.contextmanager
def build_lock(path: str | os.PathLike, *, quiet: bool = False) -> Iterator[bool]:
    """Hold the build lock of one cache entry (a folder or a file), waiting while another process holds it.

    The lock is an advisory ``flock`` on ``.lock-<name>`` beside ``path``; the kernel releases it when its holder
    ends, however it ends. Check for the entry again inside the block: the process that held the lock before may have
    finished it, or died without. Use: ``with build_lock(path): <read path; if absent or bad, build and rename it>``.

    Args:
        path: the entry, e.g. ``<cache>/folder-0123456789abcdef`` or ``<cache>/predictions/<digest>.npz``; its folder
            is created if need be.
        quiet: say nothing; else one line (``logging``) when this process has to wait for another's build.

    Yields:
        True while the lock is held; False where locking is unavailable (no ``fcntl``, a file system without locks,
        a folder that cannot be written): then concurrent processes each build, and should rename atomically.
    """

    def say(who: str) -> None:
        if not quiet:
            logger.info(f"waiting for {who} to finish building {path}")

    fd = _acquire(lock_file(path), wait=True, log=say)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            release(path, fd)


def lock_file(path: str | os.PathLike) -> Path:
    """The lock file of the entry ``path``: ``.lock-<name>`` beside it."""
    return Path(path).with_name(LOCK_PREFIX + Path(path).name)


def try_lock(path: str | os.PathLike) -> int | None:
    """The build lock of ``path`` if nobody holds it (a descriptor to pass to ``release``), else None."""
    return _acquire(lock_file(path), wait=False)


def _acquire(lock: Path, *, wait: bool, log: Callable[[str], None] | None = None) -> int | None:
    """An open descriptor holding ``lock`` exclusively, or None (locking unavailable, or held and ``wait`` False)."""
    if fcntl is None:
        return None
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError:  # read-only or full cache root, a file in the way: no lock, the build reports the problem
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    os.close(fd)
                    return None
                if log is not None:
                    log(_holder(fd))
                log = None  # one line, however often the lock file is replaced while this process waits
                fcntl.flock(fd, fcntl.LOCK_EX)
            # The previous holder unlinks the file before it lets go: a lock on a file no longer at that path guards
            # nothing, so take the current one.
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                with contextlib.suppress(OSError):  # the id only names the builder to waiters (a full disk: no id)
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                return fd
        except FileNotFoundError:
            pass
        except OSError:  # ENOLCK, EOPNOTSUPP: a file system without locks
            os.close(fd)
            return None
        os.close(fd)


def _holder(fd: int) -> str:
    """``process 1234`` (read from the lock file), or ``another process`` before its holder wrote its id."""
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process"


def release(path: str | os.PathLike, fd: int) -> None:
    """Let go of the build lock of ``path`` held by ``fd`` (``try_lock``'s)."""
    # Unlinked while still held, so that no lock file outlives its build and no waiter can lock a file that is gone.
    with contextlib.suppress(OSError):
        os.unlink(lock_file(path))
    os.close(fd)
