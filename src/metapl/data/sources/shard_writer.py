"""``metapl shards``: write an image-folder tree as WebDataset-style tar shards (the format: ``shards.py``)."""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import tarfile
from pathlib import Path

from metapl.data.sources.imagetree import plan_images
from metapl.data.sources.shards import CLASSES_FILE, IMAGE_EXTS, LABEL_EXT, SHARD_GLOB, shard_name
from metapl.data.stores import open_rgb
from metapl.errors import UserError, reporting_os_errors

logger = logging.getLogger(__name__)


def write_shards(src: str | Path, out: str | Path, *, per_shard: int, skip_corrupt: bool = False) -> dict:
    """Write an image-folder tree as tar shards with a class list (``metapl shards``).

    Every image is decoded first: an unreadable one stops the command in one line naming it, before any shard is
    written, or with ``skip_corrupt`` is left out with a warning line naming it.

    Args:
        src: an ImageFolder tree (``train/<class>/*`` + ``test/<class>/*``, or ``<class>/*``).
        out: the shard folder to write; it must not hold shards yet.
        per_shard: samples per shard.
        skip_corrupt: leave unreadable images out (named) instead of stopping.

    Returns:
        ``{"classes": [...], "train": images, "test": images}`` (``test`` only for a tree with ``test/``), as written
        to ``out/classes.json``.
    """
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if per_shard < 1:
        raise UserError(f"--per-shard {per_shard} must be at least 1")
    if not src.is_dir():
        raise UserError(f"{src} is not a folder; point SRC_DIR at an extracted image-folder tree")
    if out.is_dir() and (any(out.glob(SHARD_GLOB)) or (out / CLASSES_FILE).exists()):
        raise UserError(f"{out} already holds shards; choose an empty OUT_DIR or delete its .tar files")
    classes, plan = plan_images(src)
    plan = {split: _readable(src, entries, skip_corrupt) for split, entries in plan.items()}
    with reporting_os_errors(out, "create"):
        out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"classes": classes}
    for split, entries in plan.items():
        name = "test" if split == "test" else "train"  # a tree without test/ is all training data
        starts = range(0, len(entries), per_shard)
        for s, start in enumerate(starts):
            _write_shard(out / shard_name(name, s), src, entries[start : start + per_shard], name, start)
        summary[name] = len(entries)
        logger.info(f"{name}: {len(entries)} images in {len(starts)} shards of up to {per_shard} in {out}")
    with reporting_os_errors(out / CLASSES_FILE):  # written last: its presence marks a complete shard folder
        (out / CLASSES_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _readable(src: Path, entries: list[tuple[str, int]], skip_corrupt: bool) -> list[tuple[str, int]]:
    """The entries whose image decodes; an unreadable one is a one-line error, or a warning with ``skip_corrupt``."""
    kept = []
    for name, label in entries:
        try:
            open_rgb(src / name, name=str(src / name))
        except UserError as e:
            if not skip_corrupt:
                raise UserError(f"{e}, or pass --skip-corrupt to leave it out") from None
            logger.warning("skipped unreadable image " + str(e).split("; fix")[0].removeprefix("cannot read image "))
            continue
        kept.append((name, label))
    return kept


def _write_shard(path: Path, src: Path, entries: list[tuple[str, int]], split: str, first: int) -> None:
    """One shard of ``entries``; JPEG and PNG bytes are copied as they are, other formats re-encoded as PNG."""
    tmp = path.with_name(f".{path.name}.tmp")
    with reporting_os_errors(tmp), tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        for n, (name, label) in enumerate(entries):
            key = f"{split}_{first + n:08d}"  # no dots: WebDataset splits key and extension at the first one
            ext = posixpath.splitext(name)[1].lower().lstrip(".")
            with reporting_os_errors(src / name, "read"):
                data = (src / name).read_bytes()
            if ext not in IMAGE_EXTS:
                buffer = io.BytesIO()
                open_rgb(src / name).save(buffer, format="PNG")  # lossless: the pixels stay the folder's
                data, ext = buffer.getvalue(), "png"
            for member, payload in ((f"{key}.{ext}", data), (f"{key}.{LABEL_EXT}", str(label).encode())):
                info = tarfile.TarInfo(member)
                info.size, info.mode = len(payload), 0o644  # mtime 0: the same tree gives byte-identical shards
                tf.addfile(info, io.BytesIO(payload))
    os.replace(tmp, path)
