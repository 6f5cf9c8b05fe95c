"""On-disk cache of decoded image arrays, so that every image is decoded once per machine.

Where it lives: ``cache_dir`` when given, else ``$METAPL_CACHE_DIR``, else ``~/.cache/metapl``. Each decoded source gets
one subfolder ``<reader>-<hash>/`` holding one ``<name>.npy`` file per array (``train_images.npy``,
``train_labels.npy``, ...) and a ``meta.json`` (classes, normalisation, skipped files, and the key it was built from).
The hash covers the reader name, the absolute source path, a fingerprint of the source (size and mtime of a file; the
sorted list of file names, sizes and mtimes of a folder), the output image size and ``FORMAT_VERSION``, so editing
the source or changing ``--image-size`` builds a new entry. Entries are never updated in place: an entry is built
in a temporary folder and renamed into place atomically, so a crash or two concurrent runs never leave a half-written
entry. Deleting the cache folder (or one ``<reader>-<hash>`` subfolder) clears it; nothing else refers to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from metapl.errors import UserError

# Bump when the meaning of cached arrays changes (decoding, resizing, layout), so old entries are not reused.
FORMAT_VERSION = 1
META_FILE = "meta.json"


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
    for root, dirs, files in os.walk(p):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            st = os.stat(full)
            entries.append(f"{os.path.relpath(full, p)}\0{st.st_size}\0{st.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(entries).encode()).hexdigest()
    return {"path": str(p), "files": len(entries), "tree_sha256": digest}


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
    log: Callable[[str], None] = print,
) -> tuple[dict[str, np.ndarray], dict]:
    """Return cached arrays for ``(reader, parts)``, building and storing them first if they are not cached yet.

    Args:
        cache_dir: cache root; ``None`` means ``default_cache_dir()``.
        reader: reader name, see ``cache_key``.
        parts: the key parts, see ``cache_key``.
        build: called only on a cache miss; returns ``(arrays, meta)`` where ``arrays`` maps a name (a valid file
            stem) to an array and ``meta`` is a JSON-able dict.
        log: receives one line on a miss (where the entry is written) and one on a hit.

    Returns:
        ``(arrays, meta)``: arrays opened read-only with ``np.load(mmap_mode="r")``, and the stored meta dict.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / cache_key(reader, parts)
    if (final / META_FILE).is_file():
        log(f"using cached arrays in {final}")
        return _open(final)

    arrays, meta = build()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it private; a finished entry should be readable like any other folder
    except OSError as e:
        msg = f"cannot write the data cache in {root} ({e.strerror}); pass --cache-dir DIR or set METAPL_CACHE_DIR"
        raise UserError(msg) from e
    try:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
        full_meta = {"key": {"reader": reader, "format": FORMAT_VERSION, **parts}, "arrays": sorted(arrays), **meta}
        # meta.json is written last: its presence marks a complete entry.
        (tmp / META_FILE).write_text(json.dumps(full_meta, indent=1))
        if final.exists() and not (final / META_FILE).is_file():  # a damaged entry (e.g. emptied by hand)
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished the same entry first; theirs is identical, keep it.
            if not (final / META_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"cached decoded arrays in {final} (delete the folder to clear it)")
    return _open(final)


def _open(folder: Path) -> tuple[dict[str, np.ndarray], dict]:
    meta = json.loads((folder / META_FILE).read_text())
    arrays = {name: _load(folder / f"{name}.npy") for name in meta["arrays"]}
    return arrays, meta


def _load(path: Path) -> np.ndarray:
    # mmap cannot map zero bytes: an empty array (e.g. every image of a split skipped) is read normally.
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:
        return np.load(path)
