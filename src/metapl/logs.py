"""Where metapl's lines go: the ``metapl`` logger, configured here and nowhere else.

Every module logs to ``logging.getLogger(__name__)``, a child of ``metapl``. Used as a library, metapl prints nothing
(``metapl/__init__.py`` gives the ``metapl`` logger a ``NullHandler``): a script that wants the lines configures
logging as usual, or wraps its calls in ``console()``. The ``metapl`` command runs every subcommand inside
``console()``: each line alone on stdout, as ``print`` would show it, a warning as ``warning: ...``, on rank 0 only
under torchrun. While a run trains, ``run_log`` also writes its lines to ``RUN_DIR/train.log``; ``quiet()`` silences
the console (and any handler of the user's) for a block, ``train.log`` still written.

A user's own handler on the root logger sees metapl's INFO lines while ``console()`` or ``run_log`` holds the
``metapl`` logger at INFO, and its warnings always.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO, TypeVar

from metapl.errors import reporting_os_errors

LOGGER = logging.getLogger("metapl")


def process_rank() -> int:
    """This process's rank in its job: torch.distributed's once a group is initialised, else torchrun's ``RANK``,
    else 0 (torch is never imported here: a command that did not import it has no group)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return int(os.environ.get("RANK", "0"))


class RankZeroFilter(logging.Filter):
    """Passes records on rank 0 only (``process_rank``): a job of several processes shows each line once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return process_rank() == 0


class LineFormatter(logging.Formatter):
    """A record as the line metapl has always shown: the message alone, a warning as ``warning: <message>``."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.WARNING:  # a copy: other handlers see the record as it was
            record = logging.makeLogRecord({**record.__dict__, "message": f"warning: {record.message}"})
        return super().formatMessage(record)


class _Muted(logging.Filter):
    """Drops every record inside ``quiet()``."""

    depth = 0

    def filter(self, record: logging.LogRecord) -> bool:
        return _Muted.depth == 0


class _Stdout(logging.StreamHandler):
    """A handler writing to whatever ``sys.stdout`` is at each line (a redirect, pytest's capture), as ``print``."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


_H = TypeVar("_H", bound=logging.Handler)


def _lines(handler: _H, fmt: str = "%(message)s", *, mutable: bool = True) -> _H:
    """``handler`` set to show metapl's lines: INFO and above, ``LineFormatter``, rank 0, muted by ``quiet()``
    when ``mutable``."""
    handler.setLevel(logging.INFO)
    handler.setFormatter(LineFormatter(fmt))
    handler.addFilter(RankZeroFilter())
    if mutable:
        handler.addFilter(_Muted())
    return handler


@contextmanager
def _at_info() -> Iterator[None]:
    """The ``metapl`` logger passes INFO records for the block (its level is restored after)."""
    previous = LOGGER.level
    if not LOGGER.isEnabledFor(logging.INFO):
        LOGGER.setLevel(logging.INFO)
    try:
        yield
    finally:
        LOGGER.setLevel(previous)


@contextmanager
def console(fmt: str = "%(message)s") -> Iterator[None]:
    """metapl's lines on stdout for the block, as the ``metapl`` command shows them (it runs inside this).

    Args:
        fmt: the ``logging.Formatter`` format of a line (the message alone; a benchmark may indent it).
    """
    if any(isinstance(h, _Stdout) for h in LOGGER.handlers):  # already printing: a nested call adds nothing
        yield
        return
    handler = _lines(_Stdout(sys.stdout), fmt)
    LOGGER.addHandler(handler)
    try:
        with _at_info():
            yield
    finally:
        LOGGER.removeHandler(handler)


class _Collect(logging.Handler):
    """Appends each formatted line to a list."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__()
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextmanager
def capture() -> Iterator[list[str]]:
    """The lines metapl logs during the block, as its console would show them, in a list (for tools and tests; the
    console, if any, still shows them)."""
    lines: list[str] = []
    handler = _lines(_Collect(lines), mutable=False)
    LOGGER.addHandler(handler)
    try:
        with _at_info():
            yield lines
    finally:
        LOGGER.removeHandler(handler)


@contextmanager
def quiet() -> Iterator[None]:
    """No lines from metapl on the console for the block, warnings included, nor on a handler of the user's root
    logger; a run's ``train.log`` is still written."""
    propagate = LOGGER.propagate
    LOGGER.propagate = False
    _Muted.depth += 1
    try:
        yield
    finally:
        _Muted.depth -= 1
        LOGGER.propagate = propagate


class RunLog(logging.Handler):
    """``RUN_DIR/train.log``: the lines a run showed on the terminal, whether or not a console shows them.

    Lines logged before the run folder exists (data, models) are held in memory and written when ``open`` is called,
    so a run refused before it starts leaves no file. The file is appended to (a resumed run continues it) and flushed
    after every line, so it holds what the terminal showed up to a kill. A line that cannot be written stops the run
    with a ``UserError`` naming the file, not a traceback on stderr.
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending: list[str] = []
        self._file: TextIO | None = None
        self.path: Path | None = None

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        if self._file is None or self.path is None:
            self._pending.append(line)
            return
        with reporting_os_errors(self.path):
            self._file.write(line + "\n")
            self._file.flush()

    def open(self, path: str | os.PathLike[str]) -> None:
        """Start writing into ``path`` (appending), beginning with the lines held so far."""
        self.path = Path(path)
        with reporting_os_errors(self.path):
            self._file = open(self.path, "a")  # noqa: SIM115 - held for the run's life, closed by close()
            self._file.write("".join(line + "\n" for line in self._pending))
            self._file.flush()
        self._pending = []

    def close(self) -> None:
        """Close the file (lines logged afterwards are held again)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        super().close()


@contextmanager
def run_log() -> Iterator[RunLog]:
    """A ``RunLog`` on the ``metapl`` logger for the block (the run's life); the caller ``open``s it once the run
    folder exists. Rank 0 alone writes (``RankZeroFilter``); ``quiet()`` does not silence it."""
    handler = _lines(RunLog(), mutable=False)
    LOGGER.addHandler(handler)
    try:
        with _at_info():
            yield handler
    finally:
        LOGGER.removeHandler(handler)
        handler.close()
