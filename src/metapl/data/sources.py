"""Data sets by name: ``READERS`` maps each name to a reader, and every reader returns uint8 ``(N, H, W, C)`` arrays
plus int64 labels (``arrays.py``), decoded once and cached (``cache.py``).

Sources: ``digits`` (scikit-learn's bundled 8x8 digits, offline) and ``cifar10`` / ``cifar100`` / ``svhn``
(torchvision's files, downloaded on request) are read in ``readers.py``; ``fashion-mnist`` (IDX files), ``folder``
(an ImageFolder tree or a tar of one; CIFAR also reads one), ``shards`` (WebDataset-style tar shards, ``shards.py``)
and extra unlabeled images are read here, with the image-folder decoder (directories and tars, decoded in parallel)
in ``imagetree.py``.
"""

from __future__ import annotations

import gzip
import os
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from metapl.data import cache, shards, stream
from metapl.data.arrays import ImageArrays, SourceData
from metapl.data.imagetree import (
    archive_or_folder,
    channel_stats,
    decode_tree,
    is_split_tree,
    plan_images,
    resize_arrays,
)
from metapl.data.readers import DEFAULT_DATA_DIR, KNOWN_STATS, ReadOptions, from_cached, read_digits, read_torchvision
from metapl.errors import UserError

__all__ = ["DATASETS", "READERS", "ImageArrays", "SourceData", "channel_stats", "load_dataset", "read_idx"]

_FASHION_CLASSES = [
    *("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"),
    *("Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
]
_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # where Debian's dataset-fashion-mnist installs


def load_dataset(
    name: str,
    data_dir: str | None,
    *,
    download: bool = False,
    image_size: int | None = None,
    unlabeled_dir: str | None = None,
    test_fraction: float = 0.1,
    cache_dir: str | None = None,
    skip_corrupt: bool = False,
    seed: int = 0,
    log: Callable[[str], None] = print,
    data_path: str | None = None,
    stream_above: int | None = None,
) -> SourceData:
    """Read a dataset, decoding its images once into the cache (see ``metapl.data.cache``) and memory-mapping them.

    Args:
        name: one of ``DATASETS``.
        data_dir: where the data is. ``cifar10``/``cifar100``/``svhn``: torchvision's root folder (default ``./data``),
            or for CIFAR an ImageFolder tree / ``.tar.gz`` of one. ``fashion-mnist``: a folder with the four IDX files
            (also searched in ``<dir>/FashionMNIST/raw`` and ``/usr/share/datasets/fashion-mnist``). ``folder``: an
            ImageFolder tree (``train/<class>/*`` + ``test/<class>/*``, or ``<class>/*``) or a tar of one. ``shards``:
            a folder (or glob) of WebDataset-style ``.tar`` shards (``shards.py``). ``digits`` reads none: giving
            one is an error rather than silently ignored.
        download: let torchvision download a missing ``cifar10``/``cifar100``/``svhn``/``fashion-mnist``.
        image_size: resize (shorter side, then centre crop) every image to this square size; needed when a folder's
            images differ in size.
        unlabeled_dir: optional folder or tar of extra images without classes, searched recursively.
        test_fraction: share of each class held out as test set when a folder has no ``test/`` subtree.
        cache_dir: cache root (default ``$METAPL_CACHE_DIR`` or ``~/.cache/metapl``).
        skip_corrupt: skip unreadable images with a warning instead of stopping.
        seed: seeds the train/test split of ``digits`` and of folders without ``test/``.
        log: receives progress lines.
        data_path: ``cache`` (decode once into the cache), ``stream`` (keep file paths, decode in the loader workers;
            ``folder`` data sets; ``shards`` always stream) or ``auto`` (stream a folder whose decoded size exceeds
            ``stream_above``); None: ``stream`` for ``shards``, else ``cache``.
        stream_above: decoded bytes above which ``auto`` streams; None: ``stream.STREAM_ABOVE_BYTES``.

    Returns:
        The ``SourceData``; on the streaming path its ``train`` and ``test`` are ``stream.ImageFiles``.
    """
    name = name.lower().replace("_", "-")
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if image_size is not None and image_size < 4:
        raise UserError(f"--image-size {image_size} is too small; use at least 4 pixels")
    data_path = data_path or ("stream" if name == "shards" else "cache")
    if data_path == "stream" and name not in ("folder", "shards"):
        raise UserError(
            f"--data-path stream reads image folders and tar shards only, not {name}; use --dataset folder or "
            "--data-path cache"
        )
    opts = ReadOptions(data_dir, download, image_size, test_fraction, cache_dir, skip_corrupt, seed, log, data_path,
                       stream_above)  # fmt: skip
    data = READERS[name](opts)
    if unlabeled_dir is not None:
        data.extra_unlabeled = _load_unlabeled(unlabeled_dir, data, opts)
    log(
        f"{name}: {len(data.train)} train / {len(data.test)} test images"
        + (f" + {len(data.extra_unlabeled)} extra unlabeled" if data.extra_unlabeled is not None else "")
        + f", {data.image_size}x{data.image_size}x{data.in_channels}, {data.num_classes} classes"
    )
    return data


def _is_image_tree(data_dir: str) -> bool:
    path = Path(data_dir)
    return (path.is_file() and archive_or_folder(path) == "archive") or is_split_tree(path)


def _read_cifar(name: str, o: ReadOptions) -> SourceData:
    """CIFAR from torchvision's files, or from an image tree (or a tar of one) with the right number of classes."""
    if not (o.data_dir and _is_image_tree(o.data_dir)):
        return read_torchvision(name, o)
    data = _read_folder(o)
    expected = 10 if name == "cifar10" else 100
    if data.num_classes != expected:
        raise UserError(
            f"{o.data_dir} has {data.num_classes} class folders but {name} has {expected}; "
            "use --dataset folder for other image trees"
        )
    data.mean, data.std, data.hflip = KNOWN_STATS[name]
    return data


# -- Fashion-MNIST: IDX files ------------------------------------------------------------------------------------------


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (the MNIST family's format), gzip-compressed or not.

    Args:
        path: the file; a ``.gz`` suffix means gzip.

    Returns:
        The array with the file's dtype and shape (uint8 ``(N, H, W)`` images or ``(N,)`` labels for MNIST files).
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {path} ({e}); replace it with an intact copy") from e
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    # Header: two zero bytes, a dtype code, the number of dimensions, then each dimension as big-endian uint32.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in dtypes:
        raise UserError(f"{path} is not an IDX file; point --data-dir at the original Fashion-MNIST files")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtypes[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise UserError(f"{path} is truncated ({data.size} values for shape {shape}); replace it with an intact copy")
    return data.reshape(shape)


def _find_fashion(dirs: list[Path]) -> dict[str, Path] | None:
    for d in dirs:
        found = {}
        for key, stem in _FASHION_FILES.items():
            for candidate in (d / stem, d / f"{stem}.gz"):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == len(_FASHION_FILES):
            return found
    return None


def _check_fashion_shapes(arrays: dict[str, np.ndarray], files: dict[str, Path]) -> None:
    """Refuse a labels file in place of an images file (or the reverse) before anything is cached, naming it."""
    for key, array in arrays.items():
        want, other = (1, "labels") if key.endswith("labels") else (3, "images")
        if array.ndim != want:
            held = "labels" if array.ndim == 1 else f"{array.ndim}-D data" if array.ndim != 3 else "images"
            raise UserError(f"{files[key]} holds {held} {tuple(array.shape)}, not the {key.split('_')[0]} {other}; "
                            f"put the Fashion-MNIST {_FASHION_FILES[key]} file there")  # fmt: skip


def _read_fashion_mnist(o: ReadOptions) -> SourceData:
    image_size, log = o.image_size, o.log
    root = Path(o.data_dir or DEFAULT_DATA_DIR).expanduser()
    dirs = [root, root / "FashionMNIST" / "raw", root / "fashion-mnist", FASHION_SYSTEM_DIR]
    files = _find_fashion(dirs)
    if files is None and o.download:
        from torchvision import datasets

        log(f"downloading Fashion-MNIST into {root}")
        try:
            datasets.FashionMNIST(str(root), download=True)
        except (OSError, RuntimeError, ValueError) as e:
            raise UserError(f"could not download Fashion-MNIST into {root} ({e}); check the network") from e
        files = _find_fashion(dirs)
    if files is None:
        raise UserError(
            f"Fashion-MNIST not found in {root} (nor {root}/FashionMNIST/raw, {FASHION_SYSTEM_DIR}); "
            "pass --download or point --data-dir at the four *-ubyte[.gz] IDX files"
        )

    def build():
        arrays = {key: read_idx(path) for key, path in files.items()}
        _check_fashion_shapes(arrays, files)
        for split in ("train", "test"):
            n_images, n_labels = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
            if n_images != n_labels:
                raise UserError(
                    f"{files[f'{split}_images']} holds {n_images} images but {files[f'{split}_labels']} holds "
                    f"{n_labels} labels; the two files must come from the same Fashion-MNIST copy"
                )
            images = arrays[f"{split}_images"][..., None]
            if image_size is not None and image_size != images.shape[1]:
                images = resize_arrays(images, image_size)
            arrays[f"{split}_images"] = images
            arrays[f"{split}_labels"] = arrays[f"{split}_labels"].astype(np.int64)
        return arrays, {"classes": _FASHION_CLASSES}

    parts = {"source": [cache.fingerprint(files[k]) for k in sorted(files)], "image_size": image_size}
    arrays, meta = cache.load_or_build(o.cache_dir, "fashion-mnist", parts, build, log)
    return from_cached("fashion-mnist", arrays, meta["classes"])


# -- image folders and tars --------------------------------------------------------------------------------------------


def _read_folder(o: ReadOptions) -> SourceData:
    data_dir, test_fraction, seed = o.data_dir, o.test_fraction, o.seed
    image_size, skip_corrupt, log = o.image_size, o.skip_corrupt, o.log
    if not data_dir:
        raise UserError("--dataset folder needs --data-dir pointing at an image folder or a .tar/.tar.gz of one")
    _check_test_fraction(test_fraction)
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise UserError(f"data directory {path} does not exist; point --data-dir at an image folder or archive")
    if archive_or_folder(path) == "folder" and o.data_path != "cache":  # raises on a file that is not an archive
        classes, plan = plan_images(path)
        n = sum(len(entries) for entries in plan.values())
        cache_dir = o.cache_dir or cache.default_cache_dir()
        if stream.choose_data_path(o.data_path, n, image_size, cache_dir, threshold=o.stream_above) == "stream":
            return _stream_folder(path, classes, plan, o)
    elif o.data_path == "stream":
        raise UserError(f"--data-path stream needs an extracted folder, not the archive {path}; extract it first")

    def build():
        return decode_tree(path, image_size=image_size, skip_corrupt=skip_corrupt, log=log)

    parts = {"source": cache.fingerprint(path), "image_size": image_size}
    arrays, meta = cache.load_or_build(o.cache_dir, "folder", parts, build, log)
    _report_skipped(meta["skipped"], skip_corrupt, log)
    if "all_images" in arrays:  # one class tree: hold out a seeded, stratified test share
        train_idx, test_idx = _holdout(arrays["all_labels"], test_fraction, seed)
        train = ImageArrays(arrays["all_images"][train_idx], arrays["all_labels"][train_idx])
        test = ImageArrays(arrays["all_images"][test_idx], arrays["all_labels"][test_idx])
        mean, std = channel_stats(train.images)
    else:
        train = ImageArrays(arrays["train_images"], arrays["train_labels"])
        test = ImageArrays(arrays["test_images"], arrays["test_labels"])
        mean, std = tuple(meta["mean"]), tuple(meta["std"])
    return SourceData(train, test, None, list(meta["classes"]), mean, std, hflip=True)


def _stream_folder(path: Path, classes: list[str], plan: dict, o: ReadOptions) -> SourceData:
    """A folder on the streaming path: file lists, the same train/test split as the cache path, sampled statistics."""
    o.log(f"streaming {sum(map(len, plan.values()))} images from {path}: decoded in the loader workers, not cached")
    if "test" in plan:
        train = stream.ImageFiles.from_entries(path, plan["train"], o.image_size)
        test = stream.ImageFiles.from_entries(path, plan["test"], o.image_size)
    else:  # one class tree (or train/ alone): the seeded, stratified hold-out of the cache path, on the same order
        every = stream.ImageFiles.from_entries(path, plan.get("train", plan.get("all")), o.image_size)
        train_idx, test_idx = _holdout(every.labels, o.test_fraction, o.seed)
        train, test = every.take(train_idx), every.take(test_idx)
    if o.skip_corrupt:  # decoded once up front, so that training never meets an unreadable file
        train, test = stream.drop_unreadable(train, o.log), stream.drop_unreadable(test, o.log)
    mean, std = stream.sample_stats(train.images)
    return SourceData(train, test, None, list(classes), mean, std, hflip=True)


def _read_shards(o: ReadOptions) -> SourceData:
    """WebDataset-style tar shards (``shards.py``), always streamed; without test shards, the test set is held out as
    for image folders (so shards written from a folder give the folder's split)."""
    if not o.data_dir:
        raise UserError("--dataset shards needs --data-dir: a folder of .tar shards (`metapl shards` writes one)")
    if o.image_size is None:
        raise UserError("--dataset shards needs --image-size (the side of the streamed crops), e.g. --image-size 224")
    if o.data_path == "cache":
        raise UserError("tar shards are always streamed; drop --data-path cache, or extract them into an image folder")
    folder, found = shards.find_shards(o.data_dir)
    sets = {split: stream.ImageFiles(*shards.load_shards(paths, o.image_size, o.cache_dir))
            for split, paths in found.items()}  # fmt: skip
    classes = shards.read_classes(folder, np.concatenate([s.labels for s in sets.values()]))
    o.log(f"streaming {sum(map(len, sets.values()))} images from {sum(map(len, found.values()))} tar shards in "
          f"{folder}: decoded in the loader workers")  # fmt: skip
    if "all" in sets:
        _check_test_fraction(o.test_fraction)
        train_idx, test_idx = _holdout(sets["all"].labels, o.test_fraction, o.seed)
        sets = {"train": sets["all"].take(train_idx), "test": sets["all"].take(test_idx)}
    if o.skip_corrupt:  # decoded once up front, so that training never meets an unreadable image
        sets = {split: stream.drop_unreadable(images, o.log) for split, images in sets.items()}
    mean, std = stream.sample_stats(sets["train"].images)
    return SourceData(sets["train"], sets["test"], None, classes, mean, std, hflip=True)


def _load_unlabeled(unlabeled_dir: str, data: SourceData, o: ReadOptions) -> ImageArrays:
    image_size, skip_corrupt, log = o.image_size, o.skip_corrupt, o.log
    path = Path(unlabeled_dir).expanduser()
    if not path.exists():
        raise UserError(f"unlabeled directory {path} does not exist; fix --unlabeled-dir")
    if isinstance(data.train, stream.ImageFiles):  # the labeled data streams: so do the extra images
        if archive_or_folder(path) != "folder":
            raise UserError(f"--data-path stream needs an extracted --unlabeled-dir, not the archive {path}")
        return stream.ImageFiles.from_entries(path, plan_images(path, flat=True)[1]["all"], data.image_size)
    archive_or_folder(path)
    channels = data.in_channels

    def build():
        return decode_tree(
            path, image_size=image_size, skip_corrupt=skip_corrupt, log=log, flat=True, channels=channels
        )

    parts = {"source": cache.fingerprint(path), "image_size": image_size, "channels": channels}
    arrays, meta = cache.load_or_build(o.cache_dir, "unlabeled", parts, build, log)
    _report_skipped(meta["skipped"], skip_corrupt, log)
    images = arrays["all_images"]
    if images.shape[1:3] != (data.image_size, data.image_size):
        raise UserError(
            f"unlabeled images in {path} are {images.shape[1]}x{images.shape[2]} but the labeled ones are "
            f"{data.image_size}x{data.image_size}; pass --image-size {data.image_size}"
        )
    return ImageArrays(images, np.full(len(images), -1, dtype=np.int64))


def _report_skipped(skipped: list[list[str]], skip_corrupt: bool, log) -> None:
    """Replay what happened to unreadable images, also on a cache hit (the cache holds only the readable ones)."""
    if not skipped:
        return
    name, reason = skipped[0]
    if not skip_corrupt:
        raise UserError(f"cannot read image {name} ({reason}); fix or delete it, or pass --skip-corrupt")
    for name, reason in skipped:
        log(f"warning: skipped unreadable image {name} ({reason})")
    warnings.warn(f"skipped {len(skipped)} unreadable image(s), first: {skipped[0][0]}", stacklevel=3)


def _check_test_fraction(fraction: float) -> None:
    if not 0.0 < fraction < 1.0:
        # A library argument (load_dataset's), not a flag: metapl train holds out a fixed tenth.
        raise UserError(f"load_dataset(test_fraction={fraction!r}) is out of range; use a number in (0, 1)")


def _holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded ``fraction`` (at least one image, never all) goes to the test set."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            raise UserError(f"class {int(c)} has {len(idx)} image; a held-out test split needs at least 2 per class")
        k = min(max(1, round(fraction * len(idx))), len(idx) - 1)
        test.append(rng.permutation(idx)[:k])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


# -- the table: data set name -> reader --------------------------------------------------------------------------------

READERS: dict[str, Callable[[ReadOptions], SourceData]] = {
    "digits": read_digits,
    "cifar10": partial(_read_cifar, "cifar10"),
    "cifar100": partial(_read_cifar, "cifar100"),
    "svhn": partial(read_torchvision, "svhn"),
    "fashion-mnist": _read_fashion_mnist,
    "folder": _read_folder,
    "shards": _read_shards,
}
DATASETS = tuple(READERS)
