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
        message = (
            f"{images} holds labels (30,), not the train images; put the Fashion-MNIST "
            "train-images-idx3-ubyte file there"
        )
    else:
        labels.write_bytes(images.read_bytes())
        message = (
            f"{labels} holds images (30, 28, 28), not the train labels; put the Fashion-MNIST "
            "train-labels-idx1-ubyte file there"
        )
    cache = tmp_path / "cache"
    with pytest.raises(UserError) as info:
        load_dataset("fashion-mnist", str(tmp_path), cache_dir=str(cache))
    assert str(info.value) == message
    assert not [p for p in cache.rglob("*.npy")]  # no cache entry was written


def _tree(root, corrupt: bool):
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(root / c / f"{i}.jpg")
    if corrupt:
        (root / "a" / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def test_shards_decodes_every_image_and_skip_corrupt_names_what_it_leaves_out(tmp_path, capsys):
    from metapl.commands.cli import main

    src = _tree(tmp_path / "tree", corrupt=True)
    assert main(["shards", str(src), str(tmp_path / "sh")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"metapl: error: cannot read image {src / 'a' / 'bad.jpg'} (UnidentifiedImageError: ")
    assert err.endswith("; fix or delete it, or pass --skip-corrupt to leave it out\n") and err.count("\n") == 1
    assert not list((tmp_path / "sh").glob("*.tar"))
    assert main(["shards", str(src), str(tmp_path / "sh"), "--skip-corrupt"]) == 0
    out = capsys.readouterr().out
    assert f"warning: skipped unreadable image {src / 'a' / 'bad.jpg'} (UnidentifiedImageError" in out
    assert "train: 12 images in 1 shards" in out


def test_skip_corrupt_on_streamed_shards_and_a_lone_test_shard(tmp_path, log_lines):
    from metapl.data.sources.shard_writer import _write_shard

    src = _tree(tmp_path / "tree", corrupt=True)
    entries = [(f"{c}/{i}.jpg", n) for n, c in enumerate("ab") for i in range(6)] + [("a/bad.jpg", 0)]
    (tmp_path / "old").mkdir()
    _write_shard(tmp_path / "old" / "train-000000.tar", src, entries, "train", 0)  # as the old packer wrote it
    kw = {"image_size": 16, "cache_dir": str(tmp_path / "c"), "skip_corrupt": True}
    data = load_dataset("shards", str(tmp_path / "old"), **kw)
    lines = log_lines()
    assert len(data.train) + len(data.test) == 12
    warnings = [line for line in lines if line.startswith("warning")]
    shard = tmp_path / "old" / "train-000000.tar"
    assert len(warnings) == 1  # the bad image is named once, whichever split holds it
    assert warnings[0].startswith(f"warning: skipped unreadable image train_00000012 in shard {shard} (Unidentified")
    _write_shard(tmp_path / "test-000000.tar", src, entries[:-1], "test", 0)
    with pytest.raises(UserError) as info:
        load_dataset("shards", str(tmp_path / "test-000000.tar"), image_size=16, cache_dir=str(tmp_path / "c"))
    assert str(info.value) == (
        f"{tmp_path / 'test-000000.tar'} is a test shard; point --data-dir at the shard folder "
        "(train-*.tar and test-*.tar) or at a train-*.tar"
    )
