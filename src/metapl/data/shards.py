"""WebDataset-style tar shards: the format, its index, its reader (``ShardImages``) and its writer (``write_shards``).

A shard folder holds uncompressed ``train-NNNNNN.tar`` (and ``test-NNNNNN.tar``) files and ``classes.json``. Each
sample of a shard is two members sharing a key (the member name up to the first dot of its base name, WebDataset's
rule): ``<key>.jpg`` (or ``.jpeg`` / ``.png``) and ``<key>.cls``, the class index as text. ``classes.json`` holds
``{"classes": [names, index = label]}``; without it the classes are named by their index. A folder without
``test-*.tar`` (or a glob of shards) is all training data, and the seeded hold-out of image folders makes its test set.

Each shard is indexed once (a pass over its tar headers; the ``.cls`` members are read) and the index, the byte offset
and size of every image and its label, is kept in the decoded-image cache (``cache.py``) under the shard's path, size
and mtime. A loader worker then reads an image with one seek and one read and decodes it with Pillow: the shards stream
through the same ``stream.ImageFiles`` as image folders, so the seeded split, the views, ``loader.ResumableSampler``
and exact resume work unchanged. ``rank_unlabeled_items`` gives each rank the unlabeled images of its own shards
(``--per-rank-shards``).
"""

from __future__ import annotations

import glob
import io
import json
import os
import posixpath
import re
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from metapl.data import cache
from metapl.data.imagetree import plan_images
from metapl.data.stream import StreamedImages, StringTable, open_rgb
from metapl.errors import UserError, reporting_os_errors

CLASSES_FILE = "classes.json"
IMAGE_EXTS = ("jpg", "jpeg", "png")  # what a sample's image member may be called; other formats are written as PNG
LABEL_EXT = "cls"
SHARD_GLOB = "*.tar"
_KEY = re.compile(r"^((?:.*/)?[^./]+)\.([^/]*)$")  # WebDataset's split of a member name into key and extension


def shard_name(split: str, index: int) -> str:
    """The file name of shard ``index`` of ``split`` (``train`` or ``test``): ``train-000003.tar``."""
    return f"{split}-{index:06d}.tar"


# -- reading -----------------------------------------------------------------------------------------------------------


def find_shards(data_dir: str) -> tuple[Path, dict[str, list[Path]]]:
    """The shards ``--data-dir`` names: a folder of ``train-*.tar`` (+ ``test-*.tar``, or any ``*.tar``), a glob of
    shards or one shard.

    Args:
        data_dir: a folder, a glob pattern of ``.tar`` files, or one ``.tar`` file.

    Returns:
        ``(folder, splits)``: where ``classes.json`` is looked for, and ``{"train": [...], "test": [...]}`` or
        ``{"all": [...]}`` (no test shards: the test set is held out of them), each list sorted by name.
    """
    if any(c in data_dir for c in "*?["):
        tars = sorted(Path(p) for p in glob.glob(os.path.expanduser(data_dir)) if Path(p).is_file())
        if not tars:
            raise UserError(f"no files match the shard pattern {data_dir}; check --data-dir")
        return tars[0].parent, {"all": tars}
    folder = Path(data_dir).expanduser()
    if folder.is_file():  # one shard
        if folder.name.startswith("test"):
            raise UserError(f"{folder} is a test shard; point --data-dir at the shard folder (train-*.tar and "
                            "test-*.tar) or at a train-*.tar")  # fmt: skip
        return folder.parent, {"all": [folder]}
    if not folder.is_dir():
        raise UserError(f"shard folder {folder} does not exist; point --data-dir at a folder of .tar shards")
    tars = sorted(folder.glob(SHARD_GLOB))
    if not tars:
        raise UserError(f"no .tar shards in {folder}; write them with `metapl shards IMAGE_DIR {folder}`")
    train = [p for p in tars if p.name.startswith("train")]
    test = [p for p in tars if p.name.startswith("test")]
    if train and test:
        return folder, {"train": train, "test": test}
    return folder, {"all": train or tars}


def read_classes(folder: Path, labels: np.ndarray) -> list[str]:
    """The class names of a shard set: ``classes.json`` in ``folder``, else the indices as names.

    Args:
        folder: the shard folder.
        labels: every label of the set, checked against the class list.

    Returns:
        The class names, index = label.
    """
    path = folder / CLASSES_FILE
    if path.is_file():
        try:
            classes = json.loads(path.read_text())["classes"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f'{path} is not a class list ({e}); rewrite it as {{"classes": [names]}}') from None
    else:
        classes = [str(i) for i in range(int(labels.max()) + 1)]
    if len(labels) and labels.max() >= len(classes):
        raise UserError(f"a shard holds class index {int(labels.max())} but {path} lists {len(classes)} classes; "
                        "rewrite the shards and their class list together")  # fmt: skip
    return [str(c) for c in classes]


class ShardImages(StreamedImages):
    """Images stored in tar shards, read by offset (see ``StreamedImages`` and the module docstring).

    Args:
        shards: the shard paths.
        shard_of: ``(N,)`` which shard holds each image.
        offsets: ``(N,)`` byte offset of each image's data in its shard.
        sizes: ``(N,)`` byte size of each image.
        keys: each image's sample key, for error messages.
        size: side of the evaluation view.
    """

    def __init__(self, shards: list[str], shard_of, offsets, sizes, keys: StringTable, size: int):
        self.shards, self.keys, self.size = [str(p) for p in shards], keys, int(size)
        self.shard_of = np.asarray(shard_of, dtype=np.int32)
        self.offsets, self.sizes = np.asarray(offsets, dtype=np.int64), np.asarray(sizes, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, i: int) -> bytes:
        """The encoded bytes of image ``i``: one seek and one read in its shard."""
        path, size = self.shards[self.shard_of[i]], int(self.sizes[i])
        # A fresh handle per image: file objects inherited by forked workers would share one file position.
        with reporting_os_errors(Path(path), "read the shard"), open(path, "rb") as f:
            f.seek(int(self.offsets[i]))
            data = f.read(size)
        if len(data) != size:
            raise UserError(f"shard {path} ends inside sample {self.keys[i]}: it changed after it was indexed; "
                            "rewrite it (the index is rebuilt when its size or mtime change)")  # fmt: skip
        return data

    def open(self, i: int, min_side: int | None = None) -> Image.Image:
        i = int(i)
        name = f"{self.keys[i]} in shard {self.shards[self.shard_of[i]]}"
        return open_rgb(io.BytesIO(self.read(i)), min_side, name=name)

    def take(self, rows: np.ndarray) -> ShardImages:
        rows = np.asarray(rows, dtype=np.int64)
        return ShardImages(self.shards, self.shard_of[rows], self.offsets[rows], self.sizes[rows],
                           self.keys.take(rows), self.size)  # fmt: skip

    def __repr__(self) -> str:
        return f"ShardImages({len(self)} images in {len(self.shards)} shards, views {self.size}x{self.size}x3)"


def load_shards(paths: list[Path], size: int, cache_dir: str | None) -> tuple[ShardImages, np.ndarray]:
    """The images and labels of ``paths``, in shard then member order, from each shard's cached index.

    Args:
        paths: the shards.
        size: side of the evaluation view (``--image-size``).
        cache_dir: where the indexes are cached (None: ``cache.default_cache_dir()``).

    Returns:
        ``(images, labels)``.
    """
    parts = []
    for path in paths:
        # Keyed by the shard's path, size and mtime: a rewritten shard is indexed again.
        arrays, _ = cache.load_or_build(cache_dir, "shard-index", {"source": cache.fingerprint(path)},
                                        lambda path=path: index_shard(path), log=lambda _: None)  # fmt: skip
        parts.append(arrays)
    counts = [len(a["labels"]) for a in parts]
    starts = np.cumsum([0] + [len(a["key_blob"]) for a in parts[:-1]])  # each shard's keys, after the earlier ones'
    keys = StringTable.from_arrays(np.concatenate([[0]] + [a["key_offsets"][1:] + s for a, s in zip(parts, starts)]),
                                   np.concatenate([a["key_blob"] for a in parts]))  # fmt: skip
    images = ShardImages(paths, np.repeat(np.arange(len(paths)), counts),
                         np.concatenate([a["offsets"] for a in parts]), np.concatenate([a["sizes"] for a in parts]),
                         keys, size)  # fmt: skip
    return images, np.concatenate([np.asarray(a["labels"]) for a in parts])


def index_shard(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Index one shard: every sample's image offset and size, and its label from its ``.cls`` member.

    Args:
        path: an uncompressed tar file.

    Returns:
        ``(arrays, meta)`` for ``cache.load_or_build``: ``offsets``, ``sizes``, ``labels``, ``key_offsets``,
        ``key_blob`` (the keys as a ``StringTable``), in the order the samples first appear in the shard.
    """
    samples: dict[str, dict[str, object]] = {}
    end = path.stat().st_size
    try:
        with tarfile.open(path, "r:") as tf:  # "r:": compressed shards cannot be read by offset, so refuse them
            for member in tf:
                match = _KEY.match(member.name)
                if not member.isfile() or match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if member.offset_data + member.size > end:
                    raise tarfile.ReadError(f"member {member.name} runs past the end of the file")
                if ext == LABEL_EXT:
                    samples.setdefault(key, {})[ext] = tf.extractfile(member).read()
                elif ext in IMAGE_EXTS:
                    if any(e in samples.get(key, {}) for e in IMAGE_EXTS):
                        raise UserError(f"sample {key} in shard {path} has two images; keep one per key")
                    samples.setdefault(key, {})[ext] = (member.offset_data, member.size)
            # tarfile takes a header cut short for the end of the archive: only the end marker (zero blocks) tells
            # a complete shard from one truncated between two samples.
            tf.fileobj.seek(tf.offset)
            marker = tf.fileobj.read(tarfile.BLOCKSIZE)
            if len(marker) < tarfile.BLOCKSIZE or marker.count(0) != len(marker):
                raise tarfile.ReadError(f"truncated after {len(samples)} samples: no end-of-archive marker")
    except (tarfile.TarError, EOFError) as e:
        raise UserError(f"shard {path} is not a readable uncompressed tar ({e}); rewrite it (metapl shards)") from None
    return _index_arrays(path, samples), {}


def _index_arrays(path: Path, samples: dict[str, dict[str, object]]) -> dict[str, np.ndarray]:
    """The index arrays of one shard's samples (see ``index_shard``), refusing incomplete samples."""
    if not samples:
        raise UserError(f"shard {path} holds no samples; expected <key>.jpg + <key>.cls pairs")
    offsets, sizes, labels = [], [], []
    for key, parts in samples.items():
        image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
        if image is None:
            raise UserError(f"sample {key} in shard {path} has no image (.jpg, .jpeg or .png); add it or drop {key}.*")
        if LABEL_EXT not in parts:
            raise UserError(f"sample {key} in shard {path} has no {key}.cls (its class index); add it or drop {key}.*")
        text = parts[LABEL_EXT].decode("utf-8", "replace").strip()
        if not text.isdigit():
            raise UserError(f"{key}.cls in shard {path} holds {text[:20]!r}, not a class index; write it as text")
        offsets.append(image[0])
        sizes.append(image[1])
        labels.append(int(text))
    keys = StringTable(list(samples))
    return {"offsets": np.array(offsets, dtype=np.int64), "sizes": np.array(sizes, dtype=np.int64),
            "labels": np.array(labels, dtype=np.int64), "key_offsets": keys.offsets, "key_blob": keys.blob}  # fmt: skip


def rank_unlabeled_items(data, unlabeled: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """The unlabeled stream's items that rank ``rank`` reads under ``--per-rank-shards``: those of its own shards.

    Shards are dealt round-robin by global rank (shard ``s`` to rank ``s % world_size``); when their number is not a
    multiple of ``world_size`` the first ranks own one shard more, and each rank simply cycles its own items (the
    streams are endless, so no rank waits for another). Extra unlabeled images (``--unlabeled-dir``) are dealt the same
    way, image by image.

    Args:
        data: the run's ``SourceData``; its train images must be ``ShardImages``.
        unlabeled: the split's unlabeled rows of ``data.train``.
        rank: this process's global rank.
        world_size: number of processes.

    Returns:
        Positions in the ``UnlabeledDataset`` (``unlabeled`` first, then the extra images), sorted.
    """
    images = data.train.images
    if not isinstance(images, ShardImages):
        raise UserError("--per-rank-shards deals tar shards to ranks; use --dataset shards or drop --per-rank-shards")
    if len(images.shards) < world_size:
        raise UserError(
            f"--per-rank-shards needs a shard per rank: {len(images.shards)} training shards for {world_size} "
            "ranks; write smaller shards (metapl shards --per-shard) or use fewer ranks"
        )
    own = np.flatnonzero(images.shard_of[np.asarray(unlabeled, dtype=np.int64)] % world_size == rank)
    if data.extra_unlabeled is not None:
        own = np.concatenate([own, len(unlabeled) + np.arange(rank, len(data.extra_unlabeled), world_size)])
    if not len(own):
        raise UserError(f"rank {rank}'s shards hold no unlabeled images; use --unlabeled all or drop --per-rank-shards")
    return own


# -- writing -----------------------------------------------------------------------------------------------------------


def write_shards(src: str | Path, out: str | Path, *, per_shard: int, skip_corrupt: bool = False,
                 log: Callable[[str], None] = print) -> dict:  # fmt: skip
    """Write an image-folder tree as tar shards with a class list (``metapl shards``).

    Every image is decoded first: an unreadable one stops the command in one line naming it, before any shard is
    written, or with ``skip_corrupt`` is left out with a warning line naming it.

    Args:
        src: an ImageFolder tree (``train/<class>/*`` + ``test/<class>/*``, or ``<class>/*``).
        out: the shard folder to write; it must not hold shards yet.
        per_shard: samples per shard.
        skip_corrupt: leave unreadable images out (named) instead of stopping.
        log: receives one line per split and per skipped image.

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
    plan = {split: _readable(src, entries, skip_corrupt, log) for split, entries in plan.items()}
    with reporting_os_errors(out, "create"):
        out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"classes": classes}
    for split, entries in plan.items():
        name = "test" if split == "test" else "train"  # a tree without test/ is all training data
        starts = range(0, len(entries), per_shard)
        for s, start in enumerate(starts):
            _write_shard(out / shard_name(name, s), src, entries[start : start + per_shard], name, start)
        summary[name] = len(entries)
        log(f"{name}: {len(entries)} images in {len(starts)} shards of up to {per_shard} in {out}")
    with reporting_os_errors(out / CLASSES_FILE):  # written last: its presence marks a complete shard folder
        (out / CLASSES_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _readable(src: Path, entries: list[tuple[str, int]], skip_corrupt: bool, log) -> list[tuple[str, int]]:
    """The entries whose image decodes; an unreadable one is a one-line error, or a warning with ``skip_corrupt``."""
    kept = []
    for name, label in entries:
        try:
            open_rgb(src / name, name=str(src / name))
        except UserError as e:
            if not skip_corrupt:
                raise UserError(f"{e}, or pass --skip-corrupt to leave it out") from None
            log("warning: skipped unreadable image " + str(e).split("; fix")[0].removeprefix("cannot read image "))
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
