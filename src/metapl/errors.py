"""The exceptions that the CLI turns into one line and an exit status, and the wording of file-system errors."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(ValueError):
    """Bad input from the user: the message names the problem and the fix, in one line.

    Library code raises it for anything a user can correct (a missing folder, an unknown model name, more labels than
    images); ``metapl.commands.cli.main`` prints ``error: <message>`` to stderr and exits with status 2, without a
    traceback. A ``ValueError``, so that library users catch a bad ``TrainConfig`` value as they catch a bad
    ``MPLConfig`` one (code that catches ``ValueError`` around a call that may raise it re-raises it first).
    """


class Interrupted(Exception):
    """Training stopped on a signal after saving its state; the message says how to resume.

    Attributes:
        status: the exit status (128 + the signal number: 130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def few(names: list[str], n: int = 3) -> str:
    """The first ``n`` names, comma-separated, and how many more: keeps a message on one line."""
    return ", ".join(map(str, names[:n])) + (f" and {len(names) - n} more" if len(names) > n else "")


# What to do about the usual causes; anything else gets the generic advice.
_FIXES: dict[int | None, str] = {
    errno.ENOSPC: "free disk space or pick another folder",
    errno.EDQUOT: "free disk space or pick another folder",
    errno.EACCES: "check its permissions or pick a writable folder",
    errno.EPERM: "check its permissions or pick a writable folder",
    errno.EROFS: "the file system is read-only; pick a writable folder",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; fix the path",
    errno.EISDIR: "it is a folder; name a file",
}


def describe_os_error(
    e: OSError, path: str | os.PathLike | None = None, doing: str = "access", fix: str | None = None
) -> str:
    """One line for an ``OSError``: the path, the problem and a fix.

    Args:
        e: the error.
        path: the path it concerns; default ``e.filename``.
        doing: the verb of what failed (``write``, ``read``, ``create``...).
        fix: what to do; default: advice for the error's ``errno``.

    Returns:
        e.g. ``cannot write runs/a/checkpoint.pt (No space left on device); free disk space or pick another folder``.
    """
    where = path if path is not None else e.filename
    target = f" {os.fspath(where)}" if where is not None else ""
    # strerror is None when the error was re-raised from a data-loader worker: its text then spans many lines.
    reason = e.strerror or (str(e).splitlines() or [type(e).__name__])[0]
    return f"cannot {doing}{target} ({reason}); {fix or _FIXES.get(e.errno, 'check the path and the disk')}"


@contextmanager
def reporting_os_errors(path: str | os.PathLike, doing: str = "write", fix: str | None = None) -> Iterator[None]:
    """Turn an ``OSError`` raised inside the block into a ``UserError`` naming ``path`` (see ``describe_os_error``)."""
    try:
        yield
    except OSError as e:
        raise UserError(describe_os_error(e, path, doing, fix)) from e
