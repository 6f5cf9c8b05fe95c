"""Data files in the wrong place are refused in one line naming them, before anything is cached."""

from __future__ import annotations

import numpy as np
import pytest

from metapl.data import load_dataset
from metapl.errors import UserError


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize("swap", ["labels as images", "images as labels"])
def test_fashion_labels_file_in_place_of_the_images_file(tmp_path, swap):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        (tmp_path / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(rng.integers(0, 256, (n, 28, 28))))
        (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(rng.integers(0, 10, n)))
    images, labels = tmp_path / "train-images-idx3-ubyte", tmp_path / "train-labels-idx1-ubyte"
    if swap == "labels as images":
        images.write_bytes(labels.read_bytes())
        message = (f"{images} holds labels (30,), not the train images; put the Fashion-MNIST "
                   "train-images-idx3-ubyte file there")  # fmt: skip
    else:
        labels.write_bytes(images.read_bytes())
        message = (f"{labels} holds images (30, 28, 28), not the train labels; put the Fashion-MNIST "
                   "train-labels-idx1-ubyte file there")  # fmt: skip
    cache = tmp_path / "cache"
    with pytest.raises(UserError) as info:
        load_dataset("fashion-mnist", str(tmp_path), cache_dir=str(cache), log=lambda _: None)
    assert str(info.value) == message
    assert not [p for p in cache.rglob("*.npy")]  # no cache entry was written
