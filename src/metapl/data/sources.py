"""Dataset readers: every source becomes uint8 ``(N, H, W, C)`` arrays plus int64 labels, decoded once and cached.

Sources: ``digits`` (scikit-learn's bundled 8x8 digits, offline), ``cifar10`` / ``cifar100`` / ``svhn`` (torchvision's
files, downloaded on request), ``fashion-mnist`` (IDX files), and ``folder`` (an ImageFolder tree or a tar of one).
The image-folder decoder (directories and tars, decoded in parallel) is ``imagetree.py``; the cache is ``cache.py``.
"""

from __future__ import annotations

import gzip
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metapl.data import cache
from metapl.data.imagetree import archive_or_folder, channel_stats, decode_tree, is_split_tree, resize_arrays
from metapl.errors import UserError

DATASETS = ("digits", "cifar10", "cifar100", "svhn", "fashion-mnist", "folder")

# Per-channel mean and std in [0, 1] units, and whether a horizontal flip keeps the label (digits and house
# numbers are not mirror-symmetric). Folders compute their statistics from their own train images.
_KNOWN_STATS = {
    "digits": ((0.3053,), (0.3759,), False),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), False),
    "fashion-mnist": ((0.2860,), (0.3530,), True),
}
_PRETTY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN", "fashion-mnist": "Fashion-MNIST"}
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
DEFAULT_DATA_DIR = "data"  # torchvision downloads go here when --data-dir is not given


@dataclass
class ImageArrays:
    """Decoded images and their labels; ``images`` is often a read-only ``np.memmap`` into the cache.

    Attributes:
        images: ``(N, H, W, C)`` uint8, C = 1 (grayscale) or 3 (RGB).
        labels: ``(N,)`` int64 class indices, -1 where the class is unknown (extra unlabeled images).
    """

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        kind = " memmap" if isinstance(self.images, np.memmap) else ""
        images, labels = self.images, self.labels
        return f"ImageArrays(images={images.dtype}{images.shape}{kind}, labels={labels.dtype}{labels.shape})"

    def __getstate__(self) -> dict:
        # Loader workers started with "spawn" pickle the dataset: send a whole-file memmap as its path, not its bytes.
        return {name: _memmap_ref(getattr(self, name)) for name in ("images", "labels")}

    def __setstate__(self, state: dict) -> None:
        for name, value in state.items():
            if isinstance(value, tuple):
                path, shape = value
                value = np.load(path, mmap_mode="r").reshape(shape)
            setattr(self, name, value)


@dataclass
class SourceData:
    """A dataset ready for splitting and loading.

    Attributes:
        train: labeled training images (the labels of the "unlabeled" part are kept to report pseudo-label accuracy).
        test: held-out evaluation images.
        extra_unlabeled: images without classes from ``--unlabeled-dir`` (labels all -1), or None.
        classes: class names, index = label.
        mean: per-channel mean in [0, 1] units, for ``Normalize``.
        std: per-channel standard deviation in [0, 1] units.
        hflip: whether the weak view should flip horizontally by default.
    """

    train: ImageArrays
    test: ImageArrays
    extra_unlabeled: ImageArrays | None
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[3])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[1])


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
) -> SourceData:
    """Read a dataset, decoding its images once into the cache (see ``metapl.data.cache``) and memory-mapping them.

    Args:
        name: one of ``DATASETS``.
        data_dir: where the data is. ``cifar10``/``cifar100``/``svhn``: torchvision's root folder (default ``./data``),
            or for CIFAR an ImageFolder tree / ``.tar.gz`` of one. ``fashion-mnist``: a folder with the four IDX files
            (also searched in ``<dir>/FashionMNIST/raw`` and ``/usr/share/datasets/fashion-mnist``). ``folder``: an
            ImageFolder tree (``train/<class>/*`` + ``test/<class>/*``, or ``<class>/*``) or a tar of one. ``digits``
            reads none: giving one is an error rather than silently ignored.
        download: let torchvision download a missing ``cifar10``/``cifar100``/``svhn``/``fashion-mnist``.
        image_size: resize (shorter side, then centre crop) every image to this square size; needed when a folder's
            images differ in size.
        unlabeled_dir: optional folder or tar of extra images without classes, searched recursively.
        test_fraction: share of each class held out as test set when a folder has no ``test/`` subtree.
        cache_dir: cache root (default ``$METAPL_CACHE_DIR`` or ``~/.cache/metapl``).
        skip_corrupt: skip unreadable images with a warning instead of stopping.
        seed: seeds the train/test split of ``digits`` and of folders without ``test/``.
        log: receives progress lines.

    Returns:
        The ``SourceData``.
    """
    name = name.lower().replace("_", "-")
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if image_size is not None and image_size < 4:
        raise UserError(f"--image-size {image_size} is too small; use at least 4 pixels")
    opts = {"image_size": image_size, "cache_dir": cache_dir, "skip_corrupt": skip_corrupt, "log": log}
    if name == "digits":
        data = _load_digits(data_dir, image_size, seed)
    elif name == "folder" or (name in ("cifar10", "cifar100") and data_dir and _is_image_tree(data_dir)):
        data = _load_folder(data_dir, test_fraction=test_fraction, seed=seed, **opts)
        if name != "folder":
            expected = 10 if name == "cifar10" else 100
            if data.num_classes != expected:
                raise UserError(
                    f"{data_dir} has {data.num_classes} class folders but {name} has {expected}; "
                    "use --dataset folder for other image trees"
                )
            data.mean, data.std, data.hflip = _KNOWN_STATS[name]
    elif name == "fashion-mnist":
        data = _load_fashion_mnist(data_dir, download, **opts)
    else:
        data = _load_torchvision(name, data_dir or DEFAULT_DATA_DIR, download, **opts)
    if unlabeled_dir is not None:
        data.extra_unlabeled = _load_unlabeled(unlabeled_dir, data, **opts)
    log(
        f"{name}: {len(data.train)} train / {len(data.test)} test images"
        + (f" + {len(data.extra_unlabeled)} extra unlabeled" if data.extra_unlabeled is not None else "")
        + f", {data.image_size}x{data.image_size}x{data.in_channels}, {data.num_classes} classes"
    )
    return data


def _is_image_tree(data_dir: str) -> bool:
    path = Path(data_dir)
    return (path.is_file() and archive_or_folder(path) == "archive") or is_split_tree(path)


# -- digits: bundled with scikit-learn, needs no files -----------------------------------------------------------------


def _load_digits(data_dir: str | None, image_size: int | None, seed: int) -> SourceData:
    if data_dir:  # silently training on digits instead of the folder the user named would be worse than an error
        raise UserError(
            f"--dataset digits is bundled with scikit-learn and reads no --data-dir ({data_dir}); to train on that "
            "folder pass --dataset folder (or cifar10, fashion-mnist, ...), else drop --data-dir"
        )
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # Pixel values are counts 0..16 on an 8x8 grid; stretch them to the usual 0..255.
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=500, stratify=labels, random_state=seed)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    if image_size is not None and image_size != 8:
        images = resize_arrays(images, image_size)
    mean, std, hflip = _KNOWN_STATS["digits"]
    return SourceData(
        train=ImageArrays(images[train_idx], labels[train_idx]),
        test=ImageArrays(images[test_idx], labels[test_idx]),
        extra_unlabeled=None,
        classes=[str(c) for c in bunch.target_names],
        mean=mean,
        std=std,
        hflip=hflip,
    )


# -- torchvision: CIFAR-10, CIFAR-100, SVHN ----------------------------------------------------------------------------


def _tv_files(name: str, root: Path) -> list[Path]:
    """The files torchvision keeps for one dataset under ``root`` (what the cache fingerprints)."""
    if name == "svhn":
        return [root / "train_32x32.mat", root / "test_32x32.mat"]
    return [root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")]


def _tv_dataset(name: str, root: Path, train: bool, download: bool):
    from torchvision import datasets

    if name == "svhn":
        return datasets.SVHN(str(root), split="train" if train else "test", download=download)
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    return cls(str(root), train=train, download=download)


def _load_torchvision(name, data_dir, download, *, image_size, cache_dir, skip_corrupt, log) -> SourceData:
    root = Path(data_dir).expanduser()
    pretty = _PRETTY[name]
    if not all(p.exists() for p in _tv_files(name, root)):
        if not download:
            raise UserError(f"{pretty} not found in {root}; pass --download or point --data-dir at an existing copy")
        log(f"downloading {pretty} into {root}")
        try:
            for train in (True, False):
                _tv_dataset(name, root, train, download=True)
        except (OSError, RuntimeError, ValueError) as e:
            raise UserError(f"could not download {pretty} into {root} ({e}); check the network or copy it there") from e

    def build():
        arrays = {}
        for split in ("train", "test"):
            try:
                ds = _tv_dataset(name, root, split == "train", download=False)
            except RuntimeError as e:  # torchvision's md5 check failed
                msg = f"{pretty} in {root} is incomplete or corrupt ({e}); delete it and pass --download"
                raise UserError(msg) from e
            # SVHN is stored (N, C, H, W) with labels in .labels; CIFAR is (N, H, W, C) with .targets.
            images = ds.data.transpose(0, 2, 3, 1) if name == "svhn" else ds.data
            labels = ds.labels if name == "svhn" else ds.targets
            if image_size is not None and image_size != images.shape[1]:
                images = resize_arrays(images, image_size)
            arrays[f"{split}_images"] = np.ascontiguousarray(images, dtype=np.uint8)
            arrays[f"{split}_labels"] = np.asarray(labels, dtype=np.int64)
        classes = [str(c) for c in range(10)] if name == "svhn" else list(ds.classes)
        return arrays, {"classes": classes}

    parts = {"source": [cache.fingerprint(p) for p in _tv_files(name, root)], "image_size": image_size}
    arrays, meta = cache.load_or_build(cache_dir, name, parts, build, log)
    return _from_cached(name, arrays, meta["classes"])


def _from_cached(name: str, arrays: dict, classes: list[str]) -> SourceData:
    mean, std, hflip = _KNOWN_STATS[name]
    return SourceData(
        train=ImageArrays(arrays["train_images"], arrays["train_labels"]),
        test=ImageArrays(arrays["test_images"], arrays["test_labels"]),
        extra_unlabeled=None,
        classes=classes,
        mean=mean,
        std=std,
        hflip=hflip,
    )


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


def _load_fashion_mnist(data_dir, download, *, image_size, cache_dir, skip_corrupt, log) -> SourceData:
    root = Path(data_dir or DEFAULT_DATA_DIR).expanduser()
    dirs = [root, root / "FashionMNIST" / "raw", root / "fashion-mnist", FASHION_SYSTEM_DIR]
    files = _find_fashion(dirs)
    if files is None and download:
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
    arrays, meta = cache.load_or_build(cache_dir, "fashion-mnist", parts, build, log)
    return _from_cached("fashion-mnist", arrays, meta["classes"])


# -- image folders and tars --------------------------------------------------------------------------------------------


def _load_folder(data_dir, *, test_fraction, seed, image_size, cache_dir, skip_corrupt, log) -> SourceData:
    if not data_dir:
        raise UserError("--dataset folder needs --data-dir pointing at an image folder or a .tar/.tar.gz of one")
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"--test-fraction {test_fraction} must be between 0 and 1 (exclusive)")
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise UserError(f"data directory {path} does not exist; point --data-dir at an image folder or archive")
    archive_or_folder(path)  # raises on a file that is not an archive

    def build():
        return decode_tree(path, image_size=image_size, skip_corrupt=skip_corrupt, log=log)

    parts = {"source": cache.fingerprint(path), "image_size": image_size}
    arrays, meta = cache.load_or_build(cache_dir, "folder", parts, build, log)
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


def _load_unlabeled(unlabeled_dir, data: SourceData, *, image_size, cache_dir, skip_corrupt, log) -> ImageArrays:
    path = Path(unlabeled_dir).expanduser()
    if not path.exists():
        raise UserError(f"unlabeled directory {path} does not exist; fix --unlabeled-dir")
    archive_or_folder(path)
    channels = data.in_channels

    def build():
        return decode_tree(
            path, image_size=image_size, skip_corrupt=skip_corrupt, log=log, flat=True, channels=channels
        )

    parts = {"source": cache.fingerprint(path), "image_size": image_size, "channels": channels}
    arrays, meta = cache.load_or_build(cache_dir, "unlabeled", parts, build, log)
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


def _memmap_ref(array: np.ndarray):
    """``(path, shape)`` for a C-contiguous memmap that covers its whole .npy file, else the array itself."""
    if isinstance(array, np.memmap) and array.filename and array.flags.c_contiguous:
        try:
            if array.offset + array.nbytes == os.path.getsize(array.filename):
                return (array.filename, array.shape)
        except OSError:
            pass
    return np.asarray(array)


# -- image-tree decoder: folders and tars of images --------------------------------------------------------------------
