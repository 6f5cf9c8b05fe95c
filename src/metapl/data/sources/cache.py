"""On-disk cache of decoded image arrays, so that every image is decoded once per machine.

Where it lives: ``cache_dir`` when given, else ``$METAPL_CACHE_DIR``, else ``~/.cache/metapl``. Each decoded source gets
one subfolder ``<reader>-<hash>/`` holding one ``<name>.npy`` file per array (``train_images.npy``,
``train_labels.npy``, ...) and a ``meta.json`` (classes, normalisation, skipped files, and the key it was built from).
The hash covers the reader name, the absolute source path, a fingerprint of the source (size and mtime of a file; the
sorted list of file names, sizes and mtimes of a folder), the output image size and ``FORMAT_VERSION``, so editing
the source or changing ``--image-size`` builds a new entry. Entries are never updated in place: an entry is built
in a temporary folder and renamed into place atomically, so a crash or two concurrent runs never leave a half-written
entry. Each hit is checked cheaply (sizes, digests of the ends of each file, meta.json's own checksum; see
``_check_entry``) and a damaged entry is rebuilt. Deleting the cache folder (or one ``<reader>-<hash>`` subfolder)
clears it; nothing else refers to it.

Concurrent runs: one builds, the others wait (``locking.build_lock``: an advisory lock on ``.lock-<entry>`` in the root,
which the kernel releases however its holder ends, SIGKILL included). A waiter that gets the lock looks for the entry
again: it finds the finished one, or, when the builder died, builds it itself. Each build first removes the temporary
folders (``.tmp-<entry>-*``) and half-deleted entries (``.trash-<entry>-*``) that a killed build left, those of entries
whose lock nobody holds; such a folder is never read. Where locks are unavailable (no ``fcntl``, a file system without
them, a cache root that cannot be written), every run builds and the first rename wins. A read-only cache serves the
entries it holds; a missing one is refused in one line naming ``--cache-dir``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from metapl.data.sources.locking import LOCK_PREFIX, build_lock, release, try_lock
from metapl.errors import UserError, describe_os_error

logger = logging.getLogger(__name__)

# Bump when the meaning of cached arrays changes (decoding, resizing, layout), so old entries are not reused.
FORMAT_VERSION = 1
META_FILE = "meta.json"
CHECKSUM = "meta_sha256"  # meta.json's own checksum, over its other keys
EDGE_BYTES = 1 << 20  # how much of each end of an array file is hashed when the entry is written and checked on a hit
# What a killed build leaves in the cache root: its temporary folder, or an entry it was deleting; group 2 is the entry.
_LEFTOVER = re.compile(r"^\.(tmp|trash)-(.+-[0-9a-f]{16})-[^-]+$")


def default_cache_dir() -> Path:
    """The cache folder used when none is given.

    Returns:
        ``$METAPL_CACHE_DIR`` if set, else ``~/.cache/metapl``.
    """
    env = os.environ.get("METAPL_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "metapl"


def fingerprint(path: str | os.PathLike) -> dict:
    """A cheap description of a file or folder that changes when its content is likely to have changed.

    Args:
        path: a file (archive, ``.mat``, IDX) or a folder tree.

    Returns:
        A JSON-able dict: the absolute path plus size and mtime of a file, or for a folder the number of files and a
        hash of the sorted ``(relative path, size, mtime)`` list. No file content is read.
    """
    p = Path(path).resolve()
    if p.is_file():
        st = p.stat()
        return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    entries = []
    for root, dirs, files in walk_folder(p):  # through linked folders, as the readers list them
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            try:
                st = os.stat(full)  # a linked file: its target's size and time
            except FileNotFoundError:  # a dangling link: the decoder reports it as an unreadable image
                st = os.lstat(full)
            entries.append(f"{os.path.relpath(full, p)}\0{st.st_size}\0{st.st_mtime_ns}")
    # surrogateescape: a file name that is not valid UTF-8 keeps its bytes (os.fsencode's rule)
    digest = hashlib.sha256("\n".join(entries).encode("utf-8", "surrogateescape")).hexdigest()
    return {"path": str(p), "files": len(entries), "tree_sha256": digest}


def walk_folder(root: str | os.PathLike) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk(root, followlinks=True)``, refusing a link to a folder that holds it (a symlink loop).

    Linked folders are followed (a data set assembled from links is common), but a loop would list the same files
    again and again, about 40 times, until the path is too long: a silently repeated data set.

    Raises:
        UserError: naming the link that closes the loop.
    """
    root = os.fspath(root)
    above = {root: frozenset([os.path.realpath(root)])}  # folder -> the real folders on its way from root
    for folder, dirs, files in os.walk(root, followlinks=True):
        chain = above.pop(folder)
        for name in dirs:
            full = os.path.join(folder, name)
            real = os.path.realpath(full)
            if real in chain:
                raise UserError(
                    f"{full} links to {real}, a folder that holds it (a symlink loop); remove or replace the link"
                )
            above[full] = chain | {real}
        yield folder, dirs, files


def cache_key(reader: str, parts: dict) -> str:
    """The subfolder name for one cache entry.

    Args:
        reader: short reader name (``folder``, ``cifar10``, ...), kept readable in the folder name.
        parts: everything else the decoded arrays depend on (fingerprint, image size, ...); must be JSON-able.

    Returns:
        ``"<reader>-<16 hex digits>"``.
    """
    blob = json.dumps({"reader": reader, "format": FORMAT_VERSION, **parts}, sort_keys=True)
    return f"{reader}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def load_or_build(
    cache_dir: str | os.PathLike | None,
    reader: str,
    parts: dict,
    build: Callable[[], tuple[dict[str, np.ndarray], dict]],
    quiet: bool = False,
) -> tuple[dict[str, np.ndarray], dict]:
    """Return cached arrays for ``(reader, parts)``, building and storing them first if they are not cached yet.

    An entry found damaged (see ``_check_entry``) is rebuilt, with one line saying so.

    Args:
        cache_dir: cache root; ``None`` means ``default_cache_dir()``.
        reader: reader name, see ``cache_key``.
        parts: the key parts, see ``cache_key``.
        build: called only on a cache miss; returns ``(arrays, meta)`` where ``arrays`` maps a name (a valid file
            stem) to an array and ``meta`` is a JSON-able dict.
        quiet: say nothing; else one line on a miss (where the entry is written) and one on a hit.

    Returns:
        ``(arrays, meta)``: arrays opened read-only with ``np.load(mmap_mode="r")``, and the stored meta dict.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / cache_key(reader, parts)
    key = {"reader": reader, "format": FORMAT_VERSION, **parts}
    if final.exists():
        try:
            opened = _open_checked(final, key)
            if not quiet:
                logger.info(f"using cached arrays in {final}")
            return opened
        except _Damaged as e:
            if not quiet:
                logger.info(f"cache entry {final} is damaged ({e}); rebuilding it")

    with build_lock(final, quiet=quiet) as locked:
        if locked:  # another process may have built it while this one waited; a killed one left nothing to trust
            remove_leftovers(root, holding=final.name)
            with contextlib.suppress(_Damaged):
                opened = _open_checked(final, key)
                if not quiet:
                    logger.info(f"using cached arrays in {final} (built by another process)")
                return opened
        _write_entry(final, key, build)
    if not quiet:
        logger.info(f"cached decoded arrays in {final} (delete the folder to clear it)")
    return _open_checked(final, key)


def remove_leftovers(root: Path, holding: str | None = None) -> None:
    """Remove what killed builds left in the cache root: their temporary folders and half-deleted entries, and their
    lock files, for each entry whose lock nobody holds (a running build holds its own; ``holding``: the entry whose
    lock this process holds). Such folders are never read: only a renamed, checked entry is."""
    try:
        names = [p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".trash-", LOCK_PREFIX))]
    except OSError:
        return
    entries: dict[str, list[Path]] = {m.group(2): [] for name in names if (m := _LEFTOVER.match(name))}
    for name in names:
        if (m := _LEFTOVER.match(name)) is not None:
            entries[m.group(2)].append(root / name)
        elif name.startswith(LOCK_PREFIX):
            entries.setdefault(name.removeprefix(LOCK_PREFIX), [])
    for entry, folders in entries.items():
        fd = None if entry == holding else try_lock(root / entry)
        if fd is None and entry != holding:
            continue  # its build is running (or locks are unavailable here): leave it alone
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        if fd is not None:
            release(root / entry, fd)


def _write_entry(final: Path, key: dict, build: Callable[[], tuple[dict[str, np.ndarray], dict]]) -> None:
    """Build an entry in a temporary folder next to ``final``, then rename it into place (``_replace_entry``).

    The folder is made before ``build`` runs, so that a cache root that cannot be written (a file in its place, a
    read-only folder) is refused before the decoding, not after it.
    """
    root = final.parent
    if root.exists() and not root.is_dir():
        raise UserError(f"the cache folder {root} is a file; pass --cache-dir DIR (a folder) or set METAPL_CACHE_DIR")
    with _reporting_cache_errors(root):
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        arrays, meta = build()
        with _reporting_cache_errors(root):
            tmp.chmod(0o755)  # mkdtemp makes it private; a finished entry should be readable like any other folder
            files = {}
            for name, array in arrays.items():
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
                files[f"{name}.npy"] = _file_summary(tmp / f"{name}.npy")
            full_meta = {"key": key, "arrays": sorted(arrays), "files": files, **meta}
            full_meta[CHECKSUM] = _meta_checksum(full_meta)
            # meta.json is written last: its presence marks a complete entry.
            (tmp / META_FILE).write_text(json.dumps(full_meta, indent=1))
            _replace_entry(tmp, final, key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _reporting_cache_errors(root: Path) -> Iterator[None]:
    """An ``OSError`` while writing an entry becomes one line naming the cache folder and the flag that moves it."""
    try:
        yield
    except OSError as e:
        full = "free disk space, or pass --cache-dir DIR on another disk (or set METAPL_CACHE_DIR)"
        if e.errno is None and "requested and" in str(e):  # numpy's short write ("147456 requested and 65408 written")
            raise UserError(f"cannot write the data cache in {root} ({e}: the disk is full); {full}") from e
        fix = (
            full
            if e.errno in (errno.ENOSPC, errno.EDQUOT)
            else "pass --cache-dir DIR (a writable folder) or set METAPL_CACHE_DIR"
        )
        raise UserError(describe_os_error(e, root, "write the data cache in", fix)) from e


class _Damaged(Exception):
    """A cache entry that cannot be used as it is; the message says why."""


def _replace_entry(tmp: Path, final: Path, key: dict) -> None:
    """Rename a finished entry into place, moving a damaged one out of the way first."""
    if final.exists():
        # Another process (a rank indexing the same shards) may have finished the entry while this one built it:
        # an intact entry is kept, since that process is reading it now.
        with contextlib.suppress(_Damaged):
            _check_entry(final, key)
            return
        # Renamed first, then deleted: a process reading the old entry keeps its open files, and no reader ever sees
        # a half-deleted folder under the entry's name.
        trash = final.with_name(f".trash-{final.name}-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):  # another process moved it already
            os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        # Another process finished the same entry first; theirs is identical, keep it.
        if not (final / META_FILE).is_file():
            raise


def _file_summary(path: Path) -> dict:
    return {"size": path.stat().st_size, "edges_sha256": _edges_digest(path)}


def _edges_digest(path: Path) -> str:
    """SHA-256 of the first and the last ``EDGE_BYTES`` of a file (the whole file when it is smaller)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(EDGE_BYTES))
        size = f.seek(0, os.SEEK_END)
        if size > EDGE_BYTES:
            f.seek(max(EDGE_BYTES, size - EDGE_BYTES))
            h.update(f.read(EDGE_BYTES))
    return h.hexdigest()


def _meta_checksum(meta: dict) -> str:
    return hashlib.sha256(
        json.dumps({k: v for k, v in meta.items() if k != CHECKSUM}, sort_keys=True).encode()
    ).hexdigest()


def _check_entry(folder: Path, key: dict) -> dict:
    """The entry's meta dict, after cheap checks; raises ``_Damaged`` saying what is wrong.

    Checked on every hit: ``meta.json`` parses, carries the key it should and its own checksum (so an edited or
    truncated meta.json is caught), and each array file has the size and the first/last-MiB digest it was written
    with. A full checksum would read gigabytes at every start; a truncated, deleted, replaced or overwritten file
    changes its size or its edges, and ``np.load`` then checks the ``.npy`` header against the size. Entries written
    before these checks existed (no ``files`` in their meta) get the ``np.load`` check alone.
    """
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except FileNotFoundError:
        raise _Damaged(f"no {META_FILE}") from None
    except (OSError, ValueError) as e:
        raise _Damaged(f"{META_FILE} is unreadable: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("arrays"), list) or meta.get("key") != key:
        raise _Damaged(f"{META_FILE} does not describe this entry")
    if CHECKSUM in meta and meta[CHECKSUM] != _meta_checksum(meta):
        raise _Damaged(f"{META_FILE} was altered")
    for name, want in meta.get("files", {}).items():
        path = folder / name
        try:
            size = path.stat().st_size
            if size != want["size"]:
                raise _Damaged(f"{name} has {size} bytes, {want['size']} were written")
            if _edges_digest(path) != want["edges_sha256"]:
                raise _Damaged(f"{name} was overwritten")
        except OSError as e:
            raise _Damaged(f"{name}: {e.strerror}") from None
    return meta


def _open_checked(folder: Path, key: dict) -> tuple[dict[str, np.ndarray], dict]:
    meta = _check_entry(folder, key)
    arrays = {}
    for name in meta["arrays"]:
        try:
            arrays[name] = _load(folder / f"{name}.npy")
        except (OSError, ValueError, EOFError) as e:
            raise _Damaged(f"{name}.npy is unreadable: {e}") from None
    return arrays, meta


def _load(path: Path) -> np.ndarray:
    # mmap cannot map zero bytes: an empty array (e.g. every image of a split skipped) is read normally.
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError:
        if path.stat().st_size == 0:
            raise
        return np.load(path, allow_pickle=False)
