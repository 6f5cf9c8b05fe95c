"""Readers of the fixed-format named data sets, each beside its constants: ``digits`` (bundled with scikit-learn) and
torchvision's ``cifar10`` / ``cifar100`` / ``svhn`` files (CIFAR also reads an ImageFolder tree or a tar of one).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from metapl.data.sources import cache
from metapl.data.sources.imagetree import archive_or_folder, is_split_tree, resize_arrays
from metapl.data.sources.readers import (
    DEFAULT_DATA_DIR,
    DatasetStats,
    ReadOptions,
    cached_source,
    get_reader,
    register_source,
)
from metapl.data.stores import ImageArrays, SourceData
from metapl.errors import UserError

logger = logging.getLogger(__name__)

# -- digits: bundled with scikit-learn, needs no files -----------------------------------------------------------------

DIGITS = DatasetStats((0.3053,), (0.3759,), hflip=False)


@register_source("digits")
def read_digits(o: ReadOptions) -> SourceData:
    """scikit-learn's 8x8 digits: a seeded, stratified 500-image test set; ``o.data_dir`` must be None."""
    data_dir, image_size = o.data_dir, o.image_size
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
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=500, stratify=labels, random_state=o.seed)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    if image_size is not None and image_size != 8:
        images = resize_arrays(images, image_size)
    return SourceData(
        train=ImageArrays(images[train_idx], labels[train_idx]),
        test=ImageArrays(images[test_idx], labels[test_idx]),
        extra_unlabeled=None,
        classes=[str(c) for c in bunch.target_names],
        mean=DIGITS.mean,
        std=DIGITS.std,
        hflip=DIGITS.hflip,
    )


# -- CIFAR-10, CIFAR-100, SVHN: torchvision's files -------------------------------------------------------------------

CIFAR10 = DatasetStats((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), hflip=True)
CIFAR100 = DatasetStats((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), hflip=True)
SVHN = DatasetStats((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), hflip=False)
_PRETTY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN"}


@register_source("cifar10")
def read_cifar10(o: ReadOptions) -> SourceData:
    """CIFAR-10 from torchvision's files, or from an image tree (or a tar of one) of 10 classes."""
    return _read_cifar("cifar10", 10, CIFAR10, o)


@register_source("cifar100")
def read_cifar100(o: ReadOptions) -> SourceData:
    """CIFAR-100 from torchvision's files, or from an image tree (or a tar of one) of 100 classes."""
    return _read_cifar("cifar100", 100, CIFAR100, o)


@register_source("svhn")
def read_svhn(o: ReadOptions) -> SourceData:
    """SVHN's train and test ``.mat`` files from torchvision."""
    return read_torchvision("svhn", SVHN, o)


def _read_cifar(name: str, num_classes: int, stats: DatasetStats, o: ReadOptions) -> SourceData:
    if not (o.data_dir and _is_image_tree(o.data_dir)):
        return read_torchvision(name, stats, o)
    data = get_reader("folder")(o)
    if data.num_classes != num_classes:
        raise UserError(
            f"{o.data_dir} has {data.num_classes} class folders but {name} has {num_classes}; "
            "use --dataset folder for other image trees"
        )
    data.mean, data.std, data.hflip = stats
    return data


def _is_image_tree(data_dir: str) -> bool:
    path = Path(data_dir)
    return (path.is_file() and archive_or_folder(path) == "archive") or is_split_tree(path)


def _tv_files(name: str, root: Path) -> list[Path]:
    """The files torchvision keeps for one dataset under ``root`` (what the cache fingerprints)."""
    if name == "svhn":
        return [root / "train_32x32.mat", root / "test_32x32.mat"]
    return [root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")]


def _tv_dataset(name: str, root: Path, train: bool, download: bool) -> Any:  # a torchvision data set
    from torchvision import datasets

    if name == "svhn":
        return datasets.SVHN(str(root), split="train" if train else "test", download=download)
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    return cls(str(root), train=train, download=download)


def read_torchvision(name: str, stats: DatasetStats, o: ReadOptions) -> SourceData:
    """CIFAR-10, CIFAR-100 or SVHN from torchvision's files under ``o.data_dir`` (downloaded when ``o.download``)."""
    image_size = o.image_size
    root = Path(o.data_dir or DEFAULT_DATA_DIR).expanduser()
    pretty = _PRETTY[name]
    if not all(p.exists() for p in _tv_files(name, root)):
        if not o.download:
            raise UserError(f"{pretty} not found in {root}; pass --download or point --data-dir at an existing copy")
        logger.info(f"downloading {pretty} into {root}")
        try:
            for train in (True, False):
                _tv_dataset(name, root, train, download=True)
        except (OSError, RuntimeError, ValueError) as e:
            raise UserError(f"could not download {pretty} into {root} ({e}); check the network or copy it there") from e

    def build() -> tuple[dict[str, np.ndarray], dict]:
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
    arrays, meta = cache.load_or_build(o.cache_dir, name, parts, build)
    return cached_source(arrays, meta["classes"], stats)
