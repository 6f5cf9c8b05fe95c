"""WebDataset-style tar shards (``metapl.data.sources.shards``): written by ``metapl shards``, streamed like image
folders.

One session-scoped tree of 90 small random JPEGs (plus one BMP, which the writer re-encodes as PNG) in 3 class
folders, written once as 6 shards of up to 16 samples, serves every test.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from conftest import write_noise_tree
from metapl.commands.cli import main
from metapl.config.fields import TrainConfig
from metapl.data import (
    BatchSpec,
    ImageArrays,
    ImageStore,
    ItemsSampler,
    ResumableSampler,
    load_dataset,
    make_split,
    make_train_batches,
    rank_unlabeled_items,
    strong_view,
    weak_view,
    write_shards,
)
from metapl.errors import UserError

CLASSES, PER_CLASS, SIZE, PER_SHARD = ("ant", "bee", "cat"), 30, 16, 16


@pytest.fixture(scope="session")
def tree(tmp_path_factory) -> Path:
    """``<class>/<i>.jpg``: 48x40 upscaled noise, and one ``bee/zz.bmp``."""
    root = write_noise_tree(
        tmp_path_factory.mktemp("tree"), CLASSES, PER_CLASS, noise_hw=(5, 6), size=(48, 40), quality=90
    )
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(root / "bee" / "zz.bmp")
    return root


@pytest.fixture(scope="session")
def shard_dir(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "out"
    assert main(["shards", str(tree), str(out), "--per-shard", str(PER_SHARD)]) == 0
    return out


@pytest.fixture(scope="session")
def sharded(shard_dir, tmp_path_factory):
    return load_dataset("shards", str(shard_dir), image_size=SIZE, cache_dir=str(tmp_path_factory.mktemp("c")))


def test_the_writer_records_shards_and_the_class_list(shard_dir, tree, tmp_path):
    names = sorted(p.name for p in shard_dir.iterdir())
    assert names == ["classes.json"] + [f"train-{i:06d}.tar" for i in range(6)]  # 91 images, 16 a shard
    assert json.loads((shard_dir / "classes.json").read_text()) == {"classes": list(CLASSES), "train": 91}
    with tarfile.open(shard_dir / "train-000001.tar") as tf:
        members = tf.getnames()
        assert members[:2] == ["train_00000016.jpg", "train_00000016.cls"]
        assert tf.extractfile(members[1]).read() == b"0"
    with tarfile.open(shard_dir / "train-000003.tar") as tf:
        assert "train_00000060.png" in tf.getnames()  # bee/zz.bmp, the last bee, re-encoded losslessly
    with pytest.raises(UserError, match="already holds shards; choose an empty OUT_DIR"):
        write_shards(tree, shard_dir, per_shard=PER_SHARD)
    with pytest.raises(UserError, match="--per-shard 0 must be at least 1"):
        write_shards(tree, tmp_path / "new", per_shard=0)


def test_shards_read_as_the_folder_streams(sharded, tree):
    folder = load_dataset("folder", str(tree), image_size=SIZE, data_path="stream")
    assert (len(sharded.train), len(sharded.test)) == (82, 9) and sharded.classes == list(CLASSES)
    for name in ("train", "test"):
        a, b = getattr(folder, name), getattr(sharded, name)
        assert np.array_equal(a.labels, b.labels)
        # The writer copies the JPEG bytes and stores the BMP as PNG: every eval view is the folder's, pixel for pixel.
        assert np.array_equal(a.images[:], b.images[:])
    bmp = int(np.flatnonzero(folder.train.labels == 1)[-1])
    assert folder.train.file(bmp).name == "zz.bmp"
    assert torch.equal(folder.train.image(bmp), sharded.train.image(bmp))
    assert sharded.train.image(bmp).shape == (3, 20, 30)
    assert folder.mean == sharded.mean and folder.std == sharded.std
    a = make_split(folder.train.labels, 12, 3, seed=4, val=3)
    b = make_split(sharded.train.labels, 12, 3, seed=4, val=3)
    assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("labeled", "val", "unlabeled"))


def test_arrays_streamed_files_and_shards_are_all_image_stores(sharded, tree):
    folder = load_dataset("folder", str(tree), image_size=SIZE, data_path="stream")
    arrays = ImageArrays(sharded.train.images[:4], sharded.train.labels[:4])
    for store in (arrays, folder.train, sharded.train):
        assert isinstance(store, ImageStore)
        part = store.take(np.array([2, 0]))
        assert type(part) is type(store) and part.labels.tolist() == store.labels[[2, 0]].tolist()
        assert part.images[[1]].shape == (1, SIZE, SIZE, 3) and part.image(0).dtype == torch.uint8


def _batches(data, split, start_step: int, steps: int, workers: int, items=None):
    kw = dict(hflip=True, mean=data.mean, std=data.std, crop="resized")
    weak, strong = weak_view(SIZE, **kw), strong_view(SIZE, cutout=4, **kw)
    spec = BatchSpec(3, 5, weak, strong, mu=2, start_step=start_step, unlabeled_items=items, workers=workers)
    labeled, unlabeled = make_train_batches(data, split, spec)
    l_iter, u_iter = iter(labeled), iter(unlabeled)
    return [(*next(l_iter), *next(u_iter)) for _ in range(steps)]


def test_a_fresh_loader_at_step_k_resumes_the_stream_exactly(sharded):
    split = make_split(sharded.train.labels, 9, 3, seed=0)
    whole = _batches(sharded, split, 0, 4, workers=0)
    resumed = _batches(sharded, split, 2, 2, workers=1)  # read and decoded in a worker process
    for a, b in zip(whole[2:], resumed):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(whole[0][2], whole[1][2])
    own = rank_unlabeled_items(sharded, split.unlabeled, 1, 2)  # the per-rank stream resumes exactly too
    whole, resumed = _batches(sharded, split, 0, 3, 0, own), _batches(sharded, split, 2, 1, 0, own)
    assert all(torch.equal(x, y) for x, y in zip(whole[2], resumed[0]))


def test_each_rank_streams_only_its_own_shards(sharded):
    split = make_split(sharded.train.labels, 9, 3, seed=0)
    shard_of = sharded.train.shard_of[split.unlabeled]
    for world in (2, 4):  # 6 shards: 3 each, or 2, 2, 1, 1 (the first ranks own one more)
        owned = [rank_unlabeled_items(sharded, split.unlabeled, r, world) for r in range(world)]
        assert sorted(np.concatenate(owned).tolist()) == list(range(len(split.unlabeled)))  # disjoint, complete
        for r, items in enumerate(owned):
            assert set(shard_of[items] % world) == {r}
            stream = ItemsSampler(items, seed=7, rank=r)
            first = [i for (i, _), _ in zip(stream, range(3 * len(items)))]
            assert set(first) == set(items.tolist()) and first[: len(items)] != sorted(first[: len(items)])
            resumed = ItemsSampler(items, seed=7, rank=r, start=5)
            assert [i for (i, _), _ in zip(resumed, range(10))] == first[5:15]
    assert len(owned[0]) > len(owned[3])  # rank 0 owns shards 0 and 4, rank 3 shard 3 alone
    with pytest.raises(UserError, match="6 training shards for 7 ranks"):
        rank_unlabeled_items(sharded, split.unlabeled, 0, 7)
    global_stream = ResumableSampler(len(split.unlabeled), seed=7, rank=0, world_size=2)
    assert {i for (i, _), _ in zip(global_stream, range(40))} - set(owned[0].tolist())  # the default mixes all shards


def _rank_worker(rank: int, shard_dir: str, cache: str, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        data = load_dataset("shards", shard_dir, image_size=SIZE, cache_dir=cache)
        split = make_split(data.train.labels, 9, 3, seed=0)
        own = rank_unlabeled_items(data, split.unlabeled, dist.get_rank(), dist.get_world_size())
        kw = dict(hflip=True, mean=data.mean, std=data.std, crop="resized")
        weak, strong = weak_view(SIZE, **kw), strong_view(SIZE, **kw)
        spec = BatchSpec(3, 5, weak, strong, mu=2, rank=rank, world_size=2, unlabeled_items=own, workers=0)
        _, unlabeled = make_train_batches(data, split, spec)
        sampler = unlabeled.sampler
        rows = [int(split.unlabeled[i]) for (i, _), _ in zip(sampler, range(sampler.per_rank))]
        seen = [None] * 2
        dist.all_gather_object(seen, {"shards": data.train.shard_of[rows].tolist(), "rows": rows})
        if rank == 0:
            torch.save(seen, out)
    finally:
        dist.destroy_process_group()


def test_two_ranks_stream_disjoint_shards(shard_dir, tmp_path):
    out = tmp_path / "seen.pt"
    mp.spawn(
        _rank_worker, args=(str(shard_dir), str(tmp_path / "c"), str(tmp_path / "store"), str(out)), nprocs=2, join=True
    )
    seen = torch.load(out)
    assert set(seen[0]["shards"]) == {0, 2, 4} and set(seen[1]["shards"]) == {1, 3, 5}
    assert not set(seen[0]["rows"]) & set(seen[1]["rows"])
    assert len(seen[0]["rows"]) + len(seen[1]["rows"]) == 82  # one epoch of each rank: every train image once


def test_metapl_train_runs_on_shards(shard_dir, tmp_path):
    out = tmp_path / "run"
    flags = (
        "train --dataset shards --per-rank-shards --num-labeled 9 --batch-size 2 --mu 2 --steps 3 --workers 0 "
        "--eval-every 3 --log-every 1 --finetune-steps 0 --no-tensorboard --no-progress --device cpu"
    )
    paths = ["--data-dir", str(shard_dir), "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    args = [*flags.split(), "--image-size", str(SIZE), *paths]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["num_labeled"] == 9 and summary["student_acc"] is not None
    assert "dataset: shards" in (out / "config.yaml").read_text()


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return path


def _refused(data_dir: Path | str, cache: Path, capsys, *extra: str) -> str:
    """The one-line error ``metapl train`` prints for shards at ``data_dir`` (exit status 2, no traceback)."""
    paths = ["--data-dir", str(data_dir), "--cache-dir", str(cache), "--out", str(cache / "run")]
    args = ["train", "--dataset", "shards", "--image-size", str(SIZE), "--steps", "1", *paths, *extra]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("metapl: error: ") and "Traceback" not in err
    return err


def test_bad_shards_get_one_line_errors(shard_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    (tmp_path / "empty").mkdir()
    assert "no .tar shards in" in _refused(tmp_path / "empty", cache, capsys)
    assert "no files match" in _refused(tmp_path / "empty" / "*.tar", cache, capsys)
    broken = tmp_path / "broken"
    shutil.copytree(shard_dir, broken)
    shard = broken / "train-000002.tar"
    with tarfile.open(shard) as tf:
        *_, before, last = tf.getmembers()
    # Cut inside the last image, inside a header, and between two samples (where tarfile itself sees a clean end).
    for cut in (last.offset_data + 10, last.offset + 100, before.offset):
        shard.write_bytes((shard_dir / shard.name).read_bytes()[:cut])
        assert "train-000002.tar is not a readable uncompressed tar" in _refused(broken, cache, capsys)
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    _tar(shard, {"k1.jpg": jpeg.getvalue(), "k1.cls": b"0", "k2.jpg": jpeg.getvalue()})
    err = _refused(broken, cache, capsys)
    assert "sample k2 in shard" in err and "has no k2.cls" in err
    _tar(shard, {"k1.jpg": jpeg.getvalue(), "k1.cls": b"cat"})
    assert "not a class index" in _refused(broken, cache, capsys)
    _tar(shard, {"k1.jpg": jpeg.getvalue(), "k1.cls": b"9"})
    assert "class index 9" in _refused(broken, cache, capsys)
    good = {f"k{i}.{e}": v for i in range(1, 4) for e, v in (("jpg", jpeg.getvalue()), ("cls", str(i % 2).encode()))}
    _tar(shard, {"k0.jpg": b"not a jpeg", "k0.cls": b"0", **good})
    with pytest.raises(UserError, match="cannot read image k0 in shard .*train-000002.tar"):
        data = load_dataset("shards", str(shard), image_size=SIZE, cache_dir=str(cache))
        [part.image(i) for part in (data.train, data.test) for i in range(len(part))]
    assert "always streamed" in _refused(shard_dir, cache, capsys, "--data-path", "cache")
    with pytest.raises(UserError, match="--per-rank-shards deals tar shards"):
        TrainConfig(dataset="folder", per_rank_shards=True)
