"""Readers of the fixed-format named data sets: ``digits`` (bundled with scikit-learn) and torchvision's
``cifar10`` / ``cifar100`` / ``svhn`` files, plus what every named reader shares (``ReadOptions``, the known
normalisation constants). ``sources.py`` maps each data set name to its reader.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metapl.data import cache
from metapl.data.arrays import ImageArrays, SourceData
from metapl.data.imagetree import resize_arrays
from metapl.errors import UserError

DEFAULT_DATA_DIR = "data"  # torchvision downloads go here when --data-dir is not given

# Per-channel mean and std in [0, 1] units, and whether a horizontal flip keeps the label (digits and house
# numbers are not mirror-symmetric). Folders compute their statistics from their own train images.
KNOWN_STATS = {
    "digits": ((0.3053,), (0.3759,), False),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), False),
    "fashion-mnist": ((0.2860,), (0.3530,), True),
}
_PRETTY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN", "fashion-mnist": "Fashion-MNIST"}


@dataclass(frozen=True)
class ReadOptions:
    """What ``load_dataset`` passes every reader (see its arguments); a reader uses the fields it needs."""

    data_dir: str | None
    download: bool
    image_size: int | None
    test_fraction: float
    cache_dir: str | None
    skip_corrupt: bool
    seed: int
    log: Callable[[str], None]
    data_path: str = "cache"  # auto, cache or stream (folders only): stream.choose_data_path
    stream_above: int | None = None  # decoded bytes above which auto streams; None: stream.STREAM_ABOVE_BYTES


def from_cached(name: str, arrays: dict, classes: list[str]) -> SourceData:
    """A named data set's ``SourceData`` from its cached ``{train,test}_{images,labels}`` arrays."""
    mean, std, hflip = KNOWN_STATS[name]
    return SourceData(
        train=ImageArrays(arrays["train_images"], arrays["train_labels"]),
        test=ImageArrays(arrays["test_images"], arrays["test_labels"]),
        extra_unlabeled=None,
        classes=classes,
        mean=mean,
        std=std,
        hflip=hflip,
    )


# -- digits: bundled with scikit-learn, needs no files -----------------------------------------------------------------


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
    mean, std, hflip = KNOWN_STATS["digits"]
    return SourceData(
        train=ImageArrays(images[train_idx], labels[train_idx]),
        test=ImageArrays(images[test_idx], labels[test_idx]),
        extra_unlabeled=None,
        classes=[str(c) for c in bunch.target_names],
        mean=mean,
        std=std,
        hflip=hflip,
    )


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


def read_torchvision(name: str, o: ReadOptions) -> SourceData:
    """CIFAR-10, CIFAR-100 or SVHN from torchvision's files under ``o.data_dir`` (downloaded when ``o.download``)."""
    image_size, log = o.image_size, o.log
    root = Path(o.data_dir or DEFAULT_DATA_DIR).expanduser()
    pretty = _PRETTY[name]
    if not all(p.exists() for p in _tv_files(name, root)):
        if not o.download:
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
    arrays, meta = cache.load_or_build(o.cache_dir, name, parts, build, log)
    return from_cached(name, arrays, meta["classes"])
