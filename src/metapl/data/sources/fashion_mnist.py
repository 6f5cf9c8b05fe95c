"""The Fashion-MNIST reader, beside its constants: the four IDX files of Zalando's release (Xiao et al. 2017), found
in ``--data-dir``, torchvision's download folder or where Debian's ``dataset-fashion-mnist`` installs them."""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path

import numpy as np
from numpy.typing import DTypeLike

from metapl.data.sources import cache
from metapl.data.sources.imagetree import resize_arrays
from metapl.data.sources.readers import DEFAULT_DATA_DIR, DatasetStats, ReadOptions, cached_source, register_source
from metapl.data.stores import SourceData
from metapl.errors import UserError

logger = logging.getLogger(__name__)

FASHION_MNIST = DatasetStats((0.2860,), (0.3530,), hflip=True)
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
    dtypes: dict[int, DTypeLike] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
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
            raise UserError(
                f"{files[key]} holds {held} {tuple(array.shape)}, not the {key.split('_')[0]} {other}; "
                f"put the Fashion-MNIST {_FASHION_FILES[key]} file there"
            )


@register_source("fashion-mnist")
def read_fashion_mnist(o: ReadOptions) -> SourceData:
    """Fashion-MNIST's IDX files (gzip-compressed or not), downloaded by torchvision when ``o.download``."""
    image_size = o.image_size
    root = Path(o.data_dir or DEFAULT_DATA_DIR).expanduser()
    dirs = [root, root / "FashionMNIST" / "raw", root / "fashion-mnist", FASHION_SYSTEM_DIR]
    files = _find_fashion(dirs)
    if files is None and o.download:
        from torchvision import datasets

        logger.info(f"downloading Fashion-MNIST into {root}")
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

    def build() -> tuple[dict[str, np.ndarray], dict]:
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
    arrays, meta = cache.load_or_build(o.cache_dir, "fashion-mnist", parts, build)
    return cached_source(arrays, meta["classes"], FASHION_MNIST)
