"""Decoding an ImageFolder tree (a directory or a tar of one) into uint8 arrays, in parallel where it pays.

The folder reader (``folder.py``) and CIFAR's image trees use this machinery: listing, planning the class layout,
streaming tars, decoding with Pillow, resizing, and ``channel_stats``; ``decode_image`` is also ``metapl predict``'s
decoder.
"""

from __future__ import annotations

import bz2
import gzip
import io
import logging
import lzma
import multiprocessing
import os
import posixpath
import sys
import tarfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import IO, TypeVar

import numpy as np
from PIL import Image, ImageOps

from metapl.data.sources.cache import walk_folder
from metapl.data.stores import printable
from metapl.errors import UserError

logger = logging.getLogger(__name__)


def channel_stats(images: np.ndarray, chunk: int = 8192) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images, in [0, 1] units.

    Args:
        images: ``(N, H, W, C)`` uint8, possibly a memmap (read in chunks, never copied whole).
        chunk: images per chunk.

    Returns:
        ``(mean, std)``, one float per channel, rounded to 4 decimals.
    """
    # A 256-bin histogram per channel gives exact moments and is ~10x faster than float arithmetic on every pixel.
    hist = np.zeros((images.shape[3], 256), dtype=np.int64)
    for start in range(0, len(images), chunk):
        block = np.asarray(images[start : start + chunk])
        for c in range(images.shape[3]):
            hist[c] += np.bincount(block[..., c].ravel(), minlength=256)
    values = np.arange(256) / 255.0
    n = np.maximum(hist.sum(axis=1), 1)
    mean = hist @ values / n
    std = np.sqrt(np.maximum(hist @ values**2 / n - mean**2, 0.0))
    return tuple(round(float(m), 4) for m in mean), tuple(round(float(s), 4) for s in std)


_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_IMAGE_SUFFIXES = frozenset(Image.registered_extensions())  # every format this Pillow can open
_CHUNK = 256  # images per decode task: large enough to amortise the inter-process transfer
_PARALLEL_MIN = 2048  # below this, starting worker processes costs more than it saves


def archive_or_folder(path: Path) -> str:
    """``"archive"`` for a tar file, ``"folder"`` for a directory; a UserError for any other file."""
    if path.is_dir():
        return "folder"
    if path.name.lower().endswith(_ARCHIVE_SUFFIXES) or tarfile.is_tarfile(path):
        return "archive"
    raise UserError(f"{path} is a file but not a .tar/.tar.gz archive; point the option at a folder or an archive")


def is_split_tree(path: Path) -> bool:
    """True for a folder holding ``train/`` (possibly inside one wrapper folder), i.e. an ImageFolder split."""
    if not path.is_dir():
        return False
    if (path / "train").is_dir():
        return True
    subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return len(subdirs) == 1 and (subdirs[0] / "train").is_dir()


def _hidden(relpath: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in relpath.split("/"))


def _is_image(relpath: str) -> bool:
    return posixpath.splitext(relpath)[1].lower() in _IMAGE_SUFFIXES


def _clean(name: str) -> str:
    return posixpath.normpath(name).lstrip("/").removeprefix("./")


def _list_tree(path: Path) -> tuple[list[str], set[str]]:
    """Relative POSIX paths of the files and folders below ``path`` (a folder or a tar), hidden entries left out."""
    files: list[str] = []
    dirs: set[str] = set()
    if archive_or_folder(path) == "folder":
        for root, subdirs, names in walk_folder(path):
            rel = Path(root).relative_to(path).as_posix()
            rel = "" if rel == "." else rel + "/"
            dirs.update(rel + d for d in subdirs)
            files.extend(rel + n for n in names)
    else:
        for _, member in _iter_tar(path):
            (files.append if member.isfile() else dirs.add)(_clean(member.name))
    files = [f for f in files if not _hidden(f)]
    dirs = {d for d in dirs if d and not _hidden(d)}
    dirs.update(posixpath.dirname(f) for f in files if "/" in f)
    return files, dirs


# The folders a split tree may hold at its top, and the split each one is: ``val/`` is the validation images beside a
# ``test/``, and the test images without one (the ImageNet layout, whose labeled val/ is what people report on).
SPLIT_FOLDERS = {"train": "train", "test": "test", "val": "val", "validation": "val", "valid": "val"}


def _split_folders(source: Path, top_dirs: set[str]) -> dict[str, str] | None:
    """The split folders of a tree (split -> folder name), or None for a one-tree ``<class>/*`` layout.

    Raises:
        UserError: a split tree with another folder beside its splits (it would be ignored), or test/ or val/
            without train/.
    """
    named = {d: SPLIT_FOLDERS[d] for d in top_dirs if d in SPLIT_FOLDERS}
    if not named:
        return None
    if "train" not in named:
        raise UserError(
            f"{source} has {', '.join(sorted(d + '/' for d in named))} but no train/; put the training images in "
            "train/<class>/, or use one <class>/ tree for everything (a test share is then held out)"
        )
    others = sorted(top_dirs - set(named))
    if others:
        raise UserError(
            f"{source} holds {', '.join(d + '/' for d in others)} beside its train/ folder; it would be ignored: move "
            "it out, or pass it as --unlabeled-dir (the folders metapl reads: train/, test/ and val/)"
        )
    if len([d for d in named if named[d] == "val"]) > 1:
        raise UserError(f"{source} has more than one validation folder ({sorted(named)}); keep one, named val/")
    folders = {split: d for d, split in named.items()}
    if "test" not in folders and "val" in folders:  # the ImageNet layout: its labeled val/ is the test set
        folders["test"] = folders.pop("val")
    return folders


def describe_layout(source: Path, folders: dict[str, str] | None, counts: dict[str, int]) -> str:
    """One line saying which folder of ``source`` serves as what (``counts``: images per split of the plan)."""
    if folders is None:
        count = counts.get("all", 0)
        return f"{source}: one <class>/ tree of {count} images: a tenth of each class is held out as test"
    roles = {"train": "training images", "test": "test images", "val": "validation images (they choose the result)"}
    parts = [
        f"{folders[split]}/ = {roles[split]} ({counts.get(split, 0)})"
        for split in ("train", "test", "val")
        if split in folders
    ]
    if "test" not in folders:
        parts.append("no test/: a tenth of each class of train/ is held out as test")
    return f"{source}: " + ", ".join(parts)


def _plan_tree(source: Path, files: list[str], dirs: set[str]) -> tuple[list[str], dict, dict[str, str] | None]:
    """Find the classes, the ``(file, label)`` lists of each split (``train``/``test``/``val``, or ``all`` for one
    tree) and the folder of each split (``_split_folders``; None for one tree)."""
    images = sorted(f for f in files if _is_image(f))
    prefix = ""
    # Archives often wrap the tree in one folder ("cifar10/train/..."): strip it while images stay inside classes.
    while images:
        tops = {f[len(prefix) :].split("/", 1)[0] for f in images}
        top = next(iter(tops))
        if len(tops) != 1 or top in SPLIT_FOLDERS or any(f[len(prefix) :].count("/") < 2 for f in images):
            break
        prefix += top + "/"
    top_dirs = {d[len(prefix) :] for d in dirs if d.startswith(prefix) and "/" not in d[len(prefix) :]}
    folders = _split_folders(source, top_dirs)
    trees = {"all": prefix} if folders is None else {split: f"{prefix}{d}/" for split, d in folders.items()}
    expected = "train/<class>/<image> and test/<class>/<image>, or <class>/<image>"
    per_tree: dict[str, dict[str, list[str]]] = {}
    for split, root in trees.items():
        class_dirs = sorted(d[len(root) :] for d in dirs if d.startswith(root) and "/" not in d[len(root) :])
        groups: dict[str, list[str]] = {c: [] for c in class_dirs}
        for f in images:  # one pass, in sorted order (a scan per class is 1000 x 1.28M prefix tests on ImageNet)
            rest = f[len(root) :] if f.startswith(root) else ""
            if "/" in rest and rest.split("/", 1)[0] in groups:
                groups[rest.split("/", 1)[0]].append(f)
        for c, members in groups.items():
            if not members:
                raise UserError(f"class folder {root}{c} in {source} has no images; add images or remove the folder")
        per_tree[split] = groups
    classes = sorted(per_tree.get("train", per_tree.get("all", {})))
    if not classes:
        raise UserError(f"no class folders with images in {source}; expected {expected}")
    if len(classes) < 2:
        raise UserError(f"{source} has only one class folder ({classes[0]}); a classifier needs at least two")
    for split in ("test", "val"):
        if split in per_tree and set(per_tree[split]) != set(classes):
            assert folders is not None  # a test/ or val/ tree has its folder
            name = folders[split]
            only_train = sorted(set(classes) - set(per_tree[split]))
            only_other = sorted(set(per_tree[split]) - set(classes))
            raise UserError(
                f"train and {name} classes differ in {source} (only in train: {only_train}, only in {name}: "
                f"{only_other}); make both folders hold the same class folders"
            )
    plan = {
        split: [(f, label) for label, c in enumerate(classes) for f in groups[c]] for split, groups in per_tree.items()
    }
    return classes, plan, folders


def plan_layout(path: Path) -> tuple[list[str], dict[str, list[tuple[str, int]]], dict[str, str] | None]:
    """``plan_images`` of a class tree, with the folder each split came from (None for one ``<class>/`` tree)."""
    files, dirs = _list_tree(path)
    return _plan_tree(path, files, dirs)


def plan_images(path: Path, *, flat: bool = False) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """List and validate an image tree without decoding it: its classes and the ``(file, label)`` pairs of each split.

    Args:
        path: a folder, or a tar archive (read once, in streaming mode).
        flat: ignore folder structure and label every image -1 (``--unlabeled-dir``).

    Returns:
        ``(classes, plan)``: class names (index = label) and, per split (``train``/``test``/``val`` for a split tree,
        ``all`` for one tree), the relative POSIX paths of its images with their labels, in label then file order.
    """
    if not flat:
        return plan_layout(path)[:2]
    files, _ = _list_tree(path)
    plan = {"all": [(f, -1) for f in sorted(files) if _is_image(f)]}
    if not plan["all"]:
        raise UserError(f"no images found in {path}; point the option at a folder (or tar) that holds images")
    return [], plan


def decode_tree(
    path: Path,
    *,
    image_size: int | None,
    skip_corrupt: bool,
    flat: bool = False,
    channels: int | None = None,
) -> tuple[dict[str, np.ndarray], dict]:
    """Decode every image of a folder or tar (the ``build`` step of the folder cache entry).

    Args:
        path: a folder, or a tar archive read in streaming mode.
        image_size: resize (shorter side, then centre crop) to this square size; without it all images must share
            one square size.
        skip_corrupt: leave out unreadable images (listed in ``meta["skipped"]``) instead of raising.
        flat: ignore folder structure and label everything -1 (``--unlabeled-dir``).
        channels: force 1 (grayscale) or 3 (RGB) channels; ``None`` picks 1 only when every image is grayscale.

    Returns:
        ``(arrays, meta)``: ``train_*``/``test_*`` (and ``val_*``) arrays for a split tree or ``all_*`` for one tree
        (``*_images`` uint8 ``(N, H, W, C)``, ``*_labels`` int64), and ``meta`` with ``classes``, ``skipped`` ([file,
        reason] pairs), ``layout`` (``plan_layout``'s folders) and, for a split tree, the train ``mean``/``std``.
    """
    if flat:
        (classes, plan), folders = plan_images(path, flat=True), None
    else:
        classes, plan, folders = plan_layout(path)
    entries = [entry for split_entries in plan.values() for entry in split_entries]
    n = len(entries)
    logger.info(f"decoding {n} images from {path} (once: later runs read the cache)")
    start = time.perf_counter()
    force_mode = {None: None, 1: "L", 3: "RGB"}[channels]
    images, ok, skipped = _decode_entries(path, [f for f, _ in entries], image_size, force_mode, skip_corrupt)
    logger.info(f"decoded {n} images in {time.perf_counter() - start:.1f} s")
    if images.shape[1] != images.shape[2]:
        raise UserError(
            f"images in {path} are {images.shape[1]}x{images.shape[2]}, not square; pass --image-size N to crop them"
        )
    labels = np.array([label for _, label in entries], dtype=np.int64)
    arrays = _per_split(plan, images, labels, ok if skipped else None)
    meta = {"classes": classes, "skipped": skipped, "layout": folders}
    if "train_images" in arrays and "test_images" not in arrays:  # train/ without test/: hold out like one tree
        arrays["all_images"], arrays["all_labels"] = arrays.pop("train_images"), arrays.pop("train_labels")
    if "train_images" in arrays:
        meta["mean"], meta["std"] = channel_stats(arrays["train_images"])
    return arrays, meta


def _per_split(plan: dict, images: np.ndarray, labels: np.ndarray, ok: np.ndarray | None) -> dict[str, np.ndarray]:
    """``<split>_images`` and ``<split>_labels`` of each split of ``plan``, the decoded rows where ``ok`` is set."""
    arrays, offset = {}, 0
    for split, split_entries in plan.items():
        part = slice(offset, offset + len(split_entries))
        keep = ok[part] if ok is not None else slice(None)  # a view, not a copy, when nothing was skipped
        arrays[f"{split}_images"] = images[part][keep]
        arrays[f"{split}_labels"] = labels[part][keep]
        offset += len(split_entries)
    return arrays


def _decode_entries(
    path: Path, names: list[str], image_size: int | None, force_mode: str | None, skip_corrupt: bool
) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
    """Decode ``names`` (in that order) into one array; returns ``(images, ok mask, skipped [name, reason] list)``."""
    slots = {name: i for i, name in enumerate(names)}
    images, ok = None, np.zeros(len(names), dtype=bool)
    skipped: list[list[str]] = []
    size_of: tuple[str, tuple[int, ...]] = ("", ())  # the first image's name and size
    for slot, array, reason in _decode_parallel(path, slots, image_size, force_mode):
        if array is None:
            # The messages and meta.json hold text only; a missing array always comes with its reason.
            name, reason = printable(names[slot]), printable(str(reason))
            if not skip_corrupt:
                raise UserError(f"cannot read image {name} ({reason}); fix or delete it, or pass --skip-corrupt")
            skipped.append([name, reason])
            continue
        if images is None:
            images = np.zeros((len(names), *array.shape), dtype=np.uint8)
            size_of = (names[slot], array.shape[:2])
        elif array.shape[:2] != images.shape[1:3]:
            raise UserError(
                f"images differ in size ({size_of[0]} is {size_of[1][0]}x{size_of[1][1]}, {names[slot]} is "
                f"{array.shape[0]}x{array.shape[1]}); pass --image-size N to resize them all"
            )
        if array.shape[2] > images.shape[2]:  # first colour image after grayscale ones: widen the buffer once
            images = np.repeat(images, 3, axis=3)
        images[slot] = array  # a grayscale image broadcasts into all three channels of an RGB buffer
        ok[slot] = True
    if images is None:
        raise UserError(f"none of the {len(names)} images in {path} could be read; check the files")
    return images, ok, skipped


def _decode_parallel(
    path: Path, slots: dict[str, int], image_size: int | None, force_mode: str | None
) -> Iterator[_Decoded]:
    """Yield ``(slot, array or None, reason)`` per image, decoding chunks in worker processes when there are many."""
    tasks = ((chunk, image_size, force_mode) for chunk in _batched(_read_entries(path, slots), _CHUNK))
    workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)
    # Pillow holds the GIL for most of a small image's decode, so threads do not help; fork()ed processes do (1.6x
    # on 2 cores for CIFAR-10). fork needs no importable __main__; it is only safe enough on Linux.
    if len(slots) >= _PARALLEL_MIN and workers > 1 and sys.platform == "linux":
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for results in pool.imap(_decode_chunk, tasks):
                yield from results
    else:
        for task in tasks:
            yield from _decode_chunk(task)


def _read_entries(path: Path, slots: dict[str, int]) -> Iterator[tuple[int, bytes | str]]:
    """``(slot, file path)`` for a folder; ``(slot, bytes)`` for a tar, streamed once in archive order."""
    if path.is_dir():
        for name, slot in slots.items():
            yield slot, str(path / name)
        return
    for tf, member in _iter_tar(path):
        found = slots.get(_clean(member.name)) if member.isfile() else None
        if found is not None:
            file = tf.extractfile(member)
            assert file is not None  # a regular member
            yield found, file.read()


_DECOMPRESSORS: dict[bytes, Callable[[IO[bytes]], io.BufferedIOBase]] = {
    b"\x1f\x8b": lambda f: gzip.GzipFile(fileobj=f),
    b"BZh": bz2.BZ2File,
    b"\xfd7zXZ\x00": lzma.LZMAFile,
}


def _iter_tar(path: Path) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """Stream the members of a plain, gzip, bzip2 or xz tar once, in order, without extracting; fail on a cut-off file.

    tarfile stops quietly when an archive ends inside a header, so a truncated download would pass for a smaller data
    set. Draining the decompressor (which checks its end marker and CRC) or, for a plain tar, finding the zero block
    that ends every archive catches that.
    """
    try:
        with open(path, "rb") as raw:
            magic = raw.read(6)
            raw.seek(0)
            opener = next((fn for prefix, fn in _DECOMPRESSORS.items() if magic.startswith(prefix)), None)
            stream = opener(raw) if opener else raw
            with tarfile.open(fileobj=stream, mode="r|") as tf:  # "|": sequential reads only, no seeking
                yield from ((tf, member) for member in tf)
                end = tf.offset
            if opener:
                while stream.read(1 << 20):
                    pass
            else:
                raw.seek(end)
                tail = raw.read(512)
                if len(tail) < 512 or any(tail):
                    raise EOFError("the archive ends without its end-of-archive block")
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise UserError(f"cannot read archive {path} ({e}); check the file (a cut-off copy?) or extract it") from e


_T = TypeVar("_T")


def _batched(items: Iterable[_T], n: int) -> Iterator[list[_T]]:
    it = iter(items)
    while chunk := list(islice(it, n)):
        yield chunk


def _decode_chunk(task: tuple[list[tuple[int, bytes | str]], int | None, str | None]) -> list[_Decoded]:
    chunk, image_size, force_mode = task
    return [_decode_one(slot, src, image_size, force_mode) for slot, src in chunk]


# An image's slot, its pixels (None: unreadable) and why it is unreadable.
_Decoded = tuple[int, np.ndarray | None, str | None]


def _decode_one(slot: int, src: bytes | str, image_size: int | None, force_mode: str | None) -> _Decoded:
    try:
        return slot, decode_image(src, image_size, force_mode), None
    except Exception as e:  # Pillow raises many exception types for broken files; all of them mean "unreadable"
        return slot, None, f"{type(e).__name__}: {e}"


def decode_image(
    src: bytes | str | os.PathLike[str] | IO[bytes], image_size: int | None, mode: str | None = None
) -> np.ndarray:
    """Decode one image file as the folder cache does: the one decoder of training, ``eval`` and ``predict``.

    Args:
        src: a path, a binary file object or the file's bytes.
        image_size: resize (shorter side, then centre crop, bicubic) to this square size, letting a JPEG decode at
            1/2, 1/4 or 1/8 scale first when that stays at least this large; None keeps the size.
        mode: ``L`` or ``RGB``; None: ``L`` for a grayscale image, else ``RGB``.

    Returns:
        uint8 ``(H, W, C)``, C = 1 or 3. Pillow's exception when the file cannot be read.
    """
    with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
        mode = mode or ("L" if im.mode in _GRAY_MODES else "RGB")
        if image_size is not None:
            im.draft(mode, (image_size, image_size))  # JPEG only: decode at 1/2, 1/4, 1/8 scale when that fits
            out = ImageOps.fit(im.convert(mode), (image_size, image_size), Image.Resampling.BICUBIC)
        else:
            out = im.convert(mode)
        array = np.asarray(out)
    return array[..., None] if array.ndim == 2 else array


def resize_arrays(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 ``(N, H, W, C)`` images to ``(N, size, size, C)`` (shorter side, then centre crop; bicubic).

    Args:
        images: the images.
        size: output side length.

    Returns:
        A new uint8 array.
    """
    out = np.empty((len(images), size, size, images.shape[3]), dtype=np.uint8)
    for i, image in enumerate(images):
        pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
        out[i] = np.asarray(ImageOps.fit(pil, (size, size), Image.Resampling.BICUBIC)).reshape(size, size, -1)
    return out
