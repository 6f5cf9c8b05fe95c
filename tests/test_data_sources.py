"""Dataset readers, the decode-once cache, and the one-line errors for bad input."""

from __future__ import annotations

import gzip
import os
import pickle
import tarfile
import warnings

import numpy as np
import pytest

from conftest import TEST_CACHE, class_value, make_tar, write_image
from metapl.data import DATASETS, list_sources, load_dataset, register_source
from metapl.data.sources import fashion_mnist, imagetree
from metapl.data.sources.fashion_mnist import read_idx
from metapl.data.sources.imagetree import channel_stats
from metapl.errors import UserError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def user_error(fn, *args, **kwargs) -> str:
    """Run ``fn``, expect a UserError, and return its message after checking it is one line."""
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


def forbid_decoding(monkeypatch) -> None:
    """Make any image decode fail from now on, to prove that the next load is served by the cache."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("an image was decoded although the cache holds it")

    monkeypatch.setattr(imagetree, "_decode_chunk", refuse)
    monkeypatch.setattr(fashion_mnist, "read_idx", refuse)


# -- named datasets --------------------------------------------------------------------------------------------------


def test_digits_offline_split_and_constants():
    data = load_dataset("digits", None)
    assert (len(data.train), len(data.test)) == (1297, 500)
    assert data.train.images.shape[1:] == (8, 8, 1) and data.train.images.dtype == np.uint8
    assert data.classes == [str(c) for c in range(10)] and data.num_classes == 10
    assert (data.in_channels, data.image_size, data.hflip) == (1, 8, False)
    assert data.train.images.max() == 255  # 16 -> 255: the full uint8 range is used
    # Stratified: every class has 49..51 of the 500 test images (each class is ~10% of the 1,797).
    assert np.bincount(data.test.labels, minlength=10).min() >= 45
    # The hard-coded normalisation constants match the pixels.
    all_images = np.concatenate([data.train.images, data.test.images])
    mean, std = channel_stats(all_images)
    assert np.allclose(mean, data.mean, atol=2e-3) and np.allclose(std, data.std, atol=2e-3)
    other = load_dataset("digits", None, seed=1)
    assert not np.array_equal(other.test.labels, data.test.labels) or not np.array_equal(
        other.test.images, data.test.images
    )
    resized = load_dataset("digits", None, image_size=16)
    assert resized.train.images.shape[1:] == (16, 16, 1)


def test_fashion_mnist_from_shared(fashion_dir, tmp_path, monkeypatch):
    data = load_dataset("fashion-mnist", str(fashion_dir), cache_dir=str(tmp_path))
    assert data.train.images.shape == (60000, 28, 28, 1) and data.test.images.shape == (10000, 28, 28, 1)
    assert set(np.unique(data.train.labels)) == set(range(10)) == set(np.unique(data.test.labels))
    mean, std = channel_stats(data.train.images)
    assert np.allclose(mean, data.mean, atol=2e-3) and np.allclose(std, data.std, atol=2e-3)
    assert data.classes[0] == "T-shirt/top" and len(data.classes) == 10
    forbid_decoding(monkeypatch)
    again = load_dataset("fashion-mnist", str(fashion_dir), cache_dir=str(tmp_path))
    assert np.array_equal(again.test.images[-5:], data.test.images[-5:])


def test_fashion_mnist_torchvision_layout_and_plain_idx(tmp_path):
    """Uncompressed IDX files in ``<root>/FashionMNIST/raw`` (torchvision's layout) are found and parsed."""
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(images))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(labels))
        if prefix == "train":
            expected_images, expected_labels = images, labels
    data = load_dataset("fashion-mnist", str(tmp_path), cache_dir=str(tmp_path / "cache"))
    assert np.array_equal(data.train.images[..., 0], expected_images)
    assert np.array_equal(data.train.labels, expected_labels) and data.train.labels.dtype == np.int64
    assert len(data.test) == 10


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.tobytes()


def test_read_idx_gzip_and_bad_file(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx(array)))
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04garbage")
    assert "not an IDX file" in user_error(read_idx, tmp_path / "bad")


def test_cifar10_tar_shapes_classes_and_cache(cifar10, cifar10_tar, monkeypatch):
    assert cifar10.train.images.shape == (50000, 32, 32, 3) and cifar10.test.images.shape == (10000, 32, 32, 3)
    assert cifar10.classes == CIFAR10_CLASSES
    assert np.bincount(cifar10.train.labels).tolist() == [5000] * 10
    assert np.bincount(cifar10.test.labels).tolist() == [1000] * 10
    assert isinstance(cifar10.train.images, np.memmap)  # served from the cache, not held in memory
    # Decoded pixels have CIFAR-10's statistics (a wrong channel order or a broken decode would not).
    mean, _ = channel_stats(cifar10.test.images)
    assert np.allclose(mean, cifar10.mean, atol=0.01)
    forbid_decoding(monkeypatch)
    again = load_dataset("cifar10", str(cifar10_tar), cache_dir=str(TEST_CACHE))
    assert np.array_equal(again.train.images[:100], cifar10.train.images[:100])
    assert np.array_equal(again.test.labels, cifar10.test.labels)


def test_memmap_arrays_pickle_by_reference(cifar10):
    blob = pickle.dumps(cifar10.train)
    assert len(blob) < 1_000_000  # the 150 MB of images travel as a file path
    back = pickle.loads(blob)
    assert np.array_equal(back.images[12345], cifar10.train.images[12345])


def test_download_needed_but_off(tmp_path):
    message = user_error(load_dataset, "cifar10", str(tmp_path))
    assert "CIFAR-10 not found" in message and "--download" in message
    assert "--download" in user_error(load_dataset, "svhn", str(tmp_path))


def test_unknown_dataset_lists_valid_names():
    message = user_error(load_dataset, "imagenet-21k", None)
    assert "imagenet-21k" in message and "cifar10" in message and "folder" in message


# -- image folders ---------------------------------------------------------------------------------------------------


def test_folder_mixed_modes_and_sizes(make_tree, tmp_path, monkeypatch):
    root = make_tree(mode="mixed", sizes=((12, 12), (20, 16)), per_class=4)
    data = load_dataset("folder", str(root), image_size=10, cache_dir=str(tmp_path / "c"))
    assert data.train.images.shape == (12, 10, 10, 3) and data.test.images.shape == (12, 10, 10, 3)
    assert data.classes == ["ant", "bee", "cat"]
    # Labels follow sorted class names, and each image still shows its class's gray level (up to JPEG loss).
    centres = data.train.images[:, 5, 5, :].astype(int)
    expected = np.array([class_value(label) for label in data.train.labels])[:, None]
    assert np.abs(centres - expected).max() <= 8
    mean, std = channel_stats(data.train.images)
    assert data.mean == mean and data.std == std  # folder statistics come from its train images
    forbid_decoding(monkeypatch)
    again = load_dataset("folder", str(root), image_size=10, cache_dir=str(tmp_path / "c"))
    assert np.array_equal(again.train.images, data.train.images) and again.mean == data.mean


def test_folder_all_grayscale_has_one_channel(make_tree, tmp_path):
    root = make_tree(mode="L", ext=".jpg")
    data = load_dataset("folder", str(root), cache_dir=str(tmp_path / "c"))
    assert data.in_channels == 1 and data.image_size == 12 and len(data.mean) == 1


def test_folder_sizes_differ_needs_image_size(make_tree, tmp_path):
    root = make_tree(sizes=((12, 12), (16, 16)))
    assert "--image-size" in user_error(load_dataset, "folder", str(root), cache_dir=str(tmp_path / "c"))


def test_folder_tar_gz_matches_folder(make_tree, tmp_path):
    root = make_tree()
    from_dir = load_dataset("folder", str(root), cache_dir=str(tmp_path / "c"))
    archive = make_tar(root, tmp_path / "tree.tar.gz", wrapper="mydata")  # archives often wrap the tree in one folder
    from_tar = load_dataset("folder", str(archive), cache_dir=str(tmp_path / "c"))
    assert np.array_equal(from_dir.train.images, from_tar.train.images)
    assert np.array_equal(from_dir.test.labels, from_tar.test.labels) and from_dir.classes == from_tar.classes


def test_cifar10_name_reads_folder_and_checks_class_count(make_tree, tmp_path):
    root = make_tree()
    message = user_error(load_dataset, "cifar10", str(make_tar(root, tmp_path / "t.tar")), cache_dir=str(tmp_path))
    assert "3 class folders" in message and "--dataset folder" in message


def test_single_tree_seeded_holdout(make_tree, tmp_path):
    root = make_tree(splits=(), per_class=10)
    kw = {"cache_dir": str(tmp_path / "c"), "test_fraction": 0.2}
    a = load_dataset("folder", str(root), seed=0, **kw)
    b = load_dataset("folder", str(root), seed=0, **kw)
    c = load_dataset("folder", str(root), seed=1, **kw)
    assert (len(a.train), len(a.test)) == (24, 6) and np.bincount(a.test.labels).tolist() == [2, 2, 2]
    assert np.array_equal(a.test.images, b.test.images)
    assert not np.array_equal(a.test.images, c.test.images)


def test_a_bad_test_fraction_names_the_argument_not_a_flag(make_tree, tmp_path):
    root = make_tree(splits=(), per_class=2)
    message = user_error(load_dataset, "folder", str(root), test_fraction=1.5, cache_dir=str(tmp_path))
    assert message == "load_dataset(test_fraction=1.5) is out of range; use a number in (0, 1)"


def test_cache_entry_layout_and_invalidation(make_tree, tmp_path, monkeypatch):
    root = make_tree()
    cache = tmp_path / "c"
    load_dataset("folder", str(root), cache_dir=str(cache))
    (entry,) = [p for p in cache.iterdir()]
    assert entry.name.startswith("folder-")
    assert {p.name for p in entry.iterdir()} == {
        "meta.json",
        *(f"{s}_{k}.npy" for s in ("train", "test") for k in ("images", "labels")),
    }
    # Editing the source changes the key: the next load decodes again into a new entry.
    victim = root / "train" / "ant" / "000.png"
    write_image(victim, 2, (12, 12), "RGB")
    os.utime(victim, ns=(1, 1))
    data = load_dataset("folder", str(root), cache_dir=str(cache))
    assert len(list(cache.iterdir())) == 2
    assert abs(int(data.train.images[0, 6, 6, 0]) - class_value(2)) <= 4


def test_extra_unlabeled_folder(make_tree, tmp_path):
    root = make_tree(mode="L")
    extra = tmp_path / "extra"
    write_image(extra / "a" / "deep" / "x.png", 1, (30, 20), "RGB")  # RGB into a grayscale dataset, other size
    write_image(extra / "y.jpg", 2, (12, 12), "L")
    (extra / "notes.txt").write_text("not an image")
    data = load_dataset("folder", str(root), unlabeled_dir=str(extra), image_size=12, cache_dir=str(tmp_path / "c"))
    assert data.extra_unlabeled.images.shape == (2, 12, 12, 1)
    assert data.extra_unlabeled.labels.tolist() == [-1, -1]


def test_extra_unlabeled_size_mismatch(make_tree, tmp_path):
    root = make_tree()
    write_image(tmp_path / "extra" / "x.png", 1, (30, 30), "RGB")
    message = user_error(
        load_dataset, "folder", str(root), unlabeled_dir=str(tmp_path / "extra"), cache_dir=str(tmp_path / "c")
    )
    assert "--image-size 12" in message


# -- bad input: one UserError each ------------------------------------------------------------------------------------


def test_missing_data_dir(tmp_path):
    message = user_error(load_dataset, "folder", str(tmp_path / "nope"))
    assert "does not exist" in message and "nope" in message


def test_empty_data_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no class folders" in user_error(load_dataset, "folder", str(tmp_path / "empty"), cache_dir=str(tmp_path))


def test_class_folder_without_images(make_tree, tmp_path):
    root = make_tree()
    (root / "train" / "dog").mkdir()
    (root / "train" / "dog" / "readme.txt").write_text("todo")
    message = user_error(load_dataset, "folder", str(root), cache_dir=str(tmp_path / "c"))
    assert "train/dog" in message and "no images" in message


def test_corrupt_image_names_file_and_can_be_skipped(make_tree, tmp_path, log_lines):
    root = make_tree()
    (root / "train" / "bee" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    cache = str(tmp_path / "c")
    message = user_error(load_dataset, "folder", str(root), cache_dir=cache)
    assert "train/bee/broken.png" in message and "--skip-corrupt" in message
    with pytest.warns(UserWarning, match="broken.png"):
        data = load_dataset("folder", str(root), cache_dir=cache, skip_corrupt=True)
    assert len(data.train) == 12 and any(
        "warning: skipped unreadable image" in line and "broken.png" in line for line in log_lines()
    )
    # The cache holds only the readable images; without --skip-corrupt the error comes back.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "broken.png" in user_error(load_dataset, "folder", str(root), cache_dir=cache)


def test_train_and_test_classes_differ(make_tree, tmp_path):
    root = make_tree()
    write_image(root / "test" / "dog" / "0.png", 0, (12, 12), "RGB")
    message = user_error(load_dataset, "folder", str(root), cache_dir=str(tmp_path / "c"))
    assert "only in test: ['dog']" in message


def test_not_an_archive(tmp_path):
    (tmp_path / "data.zip").write_bytes(b"PK\x03\x04 nope")
    assert ".tar" in user_error(load_dataset, "folder", str(tmp_path / "data.zip"))


@pytest.mark.parametrize("suffix", [".tar.gz", ".tar"])
def test_truncated_archive(make_tree, tmp_path, suffix):
    archive = make_tar(make_tree(), tmp_path / f"full{suffix}")
    data = archive.read_bytes()
    with tarfile.open(archive) as tf:
        header = tf.getmembers()[5].offset  # cutting a plain tar right at a header is what tarfile itself ignores
    cuts = [header] if suffix == ".tar" else [len(data) // 3, len(data) - 12]
    for i, cut in enumerate(cuts):
        (tmp_path / f"cut{i}{suffix}").write_bytes(data[:cut])
        message = user_error(load_dataset, "folder", str(tmp_path / f"cut{i}{suffix}"), cache_dir=str(tmp_path))
        assert "cannot read archive" in message and f"cut{i}{suffix}" in message
    assert len(load_dataset("folder", str(archive), cache_dir=str(tmp_path)).train) == 12


def test_the_source_registry_refuses_a_second_reader_for_a_name():
    expected = ["digits", "cifar10", "cifar100", "svhn", "fashion-mnist", "folder", "shards"]
    assert list(DATASETS) == list_sources() == expected  # the order the refusal of an unknown name lists them in
    with pytest.raises(ValueError, match="'cifar10' is already registered"):
        register_source("cifar10")(lambda options: None)
    assert list_sources() == list(DATASETS)
