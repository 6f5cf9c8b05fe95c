"""WebDataset-style tar shards: the format, its index, its store (``ShardImages``), its reader (``--dataset shards``).

A shard folder holds uncompressed ``train-NNNNNN.tar`` (and ``test-NNNNNN.tar``) files and ``classes.json``. Each
sample of a shard is two members sharing a key (the member name up to the first dot of its base name, WebDataset's
rule): ``<key>.jpg`` (or ``.jpeg`` / ``.png``) and ``<key>.cls``, the class index as text. ``classes.json`` holds
``{"classes": [names, index = label]}``; without it the classes are named by their index. A folder without
``test-*.tar`` (or a glob of shards) is all training data, and the seeded hold-out of image folders makes its test set.

Each shard is indexed once (a pass over its tar headers; the ``.cls`` members are read) and the index, the byte offset
and size of every image and its label, is kept in the decoded-image cache (``cache.py``) under the shard's path, size
and mtime. A loader worker then reads an image with one seek and one read and decodes it with Pillow: the shards stream
like image folders (``stores.StreamedImages``), so the seeded split, the views, ``sampling.ResumableSampler`` and exact
resume work unchanged. ``rank_unlabeled_items`` gives each rank the unlabeled images of its own shards
(``--per-rank-shards``); ``shard_writer.write_shards`` writes shards from an image folder (``metapl shards``).
"""

from __future__ import annotations

import functools
import glob
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image

from metapl.data.sources import cache, streamed
from metapl.data.sources.folder import check_test_fraction, holdout
from metapl.data.sources.readers import ReadOptions, register_source
from metapl.data.stores import SourceData, StreamedImages, StringTable, open_rgb
from metapl.errors import UserError, reporting_os_errors

logger = logging.getLogger(__name__)

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
            raise UserError(
                f"{folder} is a test shard; point --data-dir at the shard folder (train-*.tar and "
                "test-*.tar) or at a train-*.tar"
            )
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


@register_source("shards", streams=True)
def read_shards(o: ReadOptions) -> SourceData:
    """WebDataset-style tar shards (see the module docstring), always streamed; without test shards, the test set is
    held out as for image folders (so shards written from a folder give the folder's split)."""
    if not o.data_dir:
        raise UserError("--dataset shards needs --data-dir: a folder of .tar shards (`metapl shards` writes one)")
    if o.image_size is None:
        raise UserError("--dataset shards needs --image-size (the side of the streamed crops), e.g. --image-size 224")
    if o.data_path == "cache":
        raise UserError("tar shards are always streamed; drop --data-path cache, or extract them into an image folder")
    folder, found = find_shards(o.data_dir)
    sets: dict[str, StreamedImages] = {
        split: load_shards(paths, o.image_size, o.cache_dir) for split, paths in found.items()
    }
    classes = read_classes(folder, np.concatenate([s.labels for s in sets.values()]))
    images, shards = sum(map(len, sets.values())), sum(map(len, found.values()))
    logger.info(f"streaming {images} images from {shards} tar shards in {folder}: decoded in the loader workers")
    if "all" in sets:
        check_test_fraction(o.test_fraction)
        train_idx, test_idx = holdout(sets["all"].labels, o.test_fraction, o.seed)
        sets = {"train": sets["all"].take(train_idx), "test": sets["all"].take(test_idx)}
    if o.skip_corrupt:  # decoded once up front, so that training never meets an unreadable image
        sets = {split: streamed.drop_unreadable(images) for split, images in sets.items()}
    mean, std = streamed.sample_stats(sets["train"].images)
    return SourceData(sets["train"], sets["test"], None, classes, mean, std, hflip=True)


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
        raise UserError(
            f"a shard holds class index {int(labels.max())} but {path} lists {len(classes)} classes; "
            "rewrite the shards and their class list together"
        )
    return [str(c) for c in classes]


class ShardImages(StreamedImages):
    """Images stored in tar shards and their labels, read by offset (see ``StreamedImages`` and the module docstring).

    Args:
        shards: the shard paths.
        shard_of: ``(N,)`` which shard holds each image.
        offsets: ``(N,)`` byte offset of each image's data in its shard.
        sizes: ``(N,)`` byte size of each image.
        keys: each image's sample key, for error messages.
        labels: ``(N,)`` int64 class indices.
        size: side of the evaluation view.
    """

    def __init__(
        self,
        shards: Sequence[str | os.PathLike[str]],
        shard_of: ArrayLike,
        offsets: ArrayLike,
        sizes: ArrayLike,
        keys: StringTable,
        labels: ArrayLike,
        size: int,
    ) -> None:
        self.shards, self.keys, self.size = [str(p) for p in shards], keys, int(size)
        self.shard_of = np.asarray(shard_of, dtype=np.int32)
        self.offsets, self.sizes = np.asarray(offsets, dtype=np.int64), np.asarray(sizes, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)

    def read(self, i: int) -> bytes:
        """The encoded bytes of image ``i``: one seek and one read in its shard."""
        path, size = self.shards[self.shard_of[i]], int(self.sizes[i])
        # A fresh handle per image: file objects inherited by forked workers would share one file position.
        with reporting_os_errors(Path(path), "read the shard"), open(path, "rb") as f:
            f.seek(int(self.offsets[i]))
            data = f.read(size)
        if len(data) != size:
            raise UserError(
                f"shard {path} ends inside sample {self.keys[i]}: it changed after it was indexed; "
                "rewrite it (the index is rebuilt when its size or mtime change)"
            )
        return data

    def open(self, i: int, min_side: int | None = None) -> Image.Image:
        i = int(i)
        name = f"{self.keys[i]} in shard {self.shards[self.shard_of[i]]}"
        return open_rgb(io.BytesIO(self.read(i)), min_side, name=name)

    def take(self, rows: ArrayLike) -> ShardImages:
        rows = np.asarray(rows, dtype=np.int64)
        picked = (self.shard_of[rows], self.offsets[rows], self.sizes[rows], self.keys.take(rows), self.labels[rows])
        return ShardImages(self.shards, *picked, self.size)

    def __repr__(self) -> str:
        return (
            f"ShardImages({len(self)} images in {len(self.shards)} shards, views {self.size}x{self.size}x3, "
            f"labels={self.labels.dtype}{self.labels.shape})"
        )


def load_shards(paths: list[Path], size: int, cache_dir: str | None) -> ShardImages:
    """The images of ``paths`` with their labels, in shard then member order, from each shard's cached index.

    Args:
        paths: the shards.
        size: side of the evaluation view (``--image-size``).
        cache_dir: where the indexes are cached (None: ``cache.default_cache_dir()``).

    Returns:
        The ``ShardImages``.
    """
    parts = []
    for path in paths:
        # Keyed by the shard's path, size and mtime: a rewritten shard is indexed again. Quiet: a run may read
        # thousands of shards.
        key = {"source": cache.fingerprint(path)}
        arrays, _ = cache.load_or_build(cache_dir, "shard-index", key, functools.partial(index_shard, path), quiet=True)
        parts.append(arrays)
    counts = [len(a["labels"]) for a in parts]
    starts = np.cumsum([0] + [len(a["key_blob"]) for a in parts[:-1]])  # each shard's keys, after the earlier ones'
    key_offsets = np.concatenate([[0]] + [a["key_offsets"][1:] + s for a, s in zip(parts, starts)])
    keys = StringTable.from_arrays(key_offsets, np.concatenate([a["key_blob"] for a in parts]))

    def joined(name: str) -> np.ndarray:
        return np.concatenate([np.asarray(a[name]) for a in parts])

    shard_of = np.repeat(np.arange(len(paths)), counts)
    return ShardImages(paths, shard_of, joined("offsets"), joined("sizes"), keys, joined("labels"), size)


def index_shard(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Index one shard: every sample's image offset and size, and its label from its ``.cls`` member.

    Args:
        path: an uncompressed tar file.

    Returns:
        ``(arrays, meta)`` for ``cache.load_or_build``: ``offsets``, ``sizes``, ``labels``, ``key_offsets``,
        ``key_blob`` (the keys as a ``StringTable``), in the order the samples first appear in the shard.
    """
    samples: dict[str, dict[str, bytes | tuple[int, int]]] = {}
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
                    file = tf.extractfile(member)
                    assert file is not None  # a regular member
                    samples.setdefault(key, {})[ext] = file.read()
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


def _index_arrays(path: Path, samples: dict[str, dict[str, bytes | tuple[int, int]]]) -> dict[str, np.ndarray]:
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
        label = parts[LABEL_EXT]
        assert isinstance(label, bytes) and isinstance(image, tuple)  # a .cls's text; an image's (offset, size)
        text = label.decode("utf-8", "replace").strip()
        if not text.isdigit():
            raise UserError(f"{key}.cls in shard {path} holds {text[:20]!r}, not a class index; write it as text")
        offsets.append(image[0])
        sizes.append(image[1])
        labels.append(int(text))
    keys = StringTable(list(samples))
    return {
        "offsets": np.array(offsets, dtype=np.int64),
        "sizes": np.array(sizes, dtype=np.int64),
        "labels": np.array(labels, dtype=np.int64),
        "key_offsets": keys.offsets,
        "key_blob": keys.blob,
    }


def rank_unlabeled_items(data: SourceData, unlabeled: np.ndarray, rank: int, world_size: int) -> np.ndarray:
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
    store = data.train
    if not isinstance(store, ShardImages):
        raise UserError("--per-rank-shards deals tar shards to ranks; use --dataset shards or drop --per-rank-shards")
    if len(store.shards) < world_size:
        raise UserError(
            f"--per-rank-shards needs a shard per rank: {len(store.shards)} training shards for {world_size} "
            "ranks; write smaller shards (metapl shards --per-shard) or use fewer ranks"
        )
    own = np.flatnonzero(store.shard_of[np.asarray(unlabeled, dtype=np.int64)] % world_size == rank)
    if data.extra_unlabeled is not None:
        own = np.concatenate([own, len(unlabeled) + np.arange(rank, len(data.extra_unlabeled), world_size)])
    if not len(own):
        raise UserError(f"rank {rank}'s shards hold no unlabeled images; use --unlabeled all or drop --per-rank-shards")
    return own
