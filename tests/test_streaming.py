"""The streaming path for large image folders (``metapl.data.sources.streamed``): file lists decoded in the loader
workers.

One session-scoped folder of 240 random 500x375 JPEGs in 4 class folders serves every test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import write_noise_tree
from metapl.commands.cli import main
from metapl.data import (
    BatchSpec,
    FolderImages,
    ImageArrays,
    choose_data_path,
    load_dataset,
    make_eval_loader,
    make_split,
    make_train_batches,
    per_image,
    strong_view,
    weak_view,
)
from metapl.errors import UserError
from metapl.models import create_model
from metapl.training.evaluation import eval_loaders, evaluate_sets

CLASSES, PER_CLASS, SIZE = ("ant", "bee", "cat", "dog"), 60, 32
WORLD = 2


@pytest.fixture(scope="session")
def jpeg_tree(tmp_path_factory) -> Path:
    """``<class>/<i>.jpg``: smooth random colour fields (a 20x15 noise image upscaled), 500x375, one tree."""
    return write_noise_tree(
        tmp_path_factory.mktemp("jpegs"), CLASSES, PER_CLASS, noise_hw=(15, 20), size=(500, 375), quality=85
    )


def _stream(tree: Path, **kw):
    return load_dataset("folder", str(tree), image_size=SIZE, data_path="stream", **kw)


@pytest.fixture(scope="session")
def streamed(jpeg_tree):
    return _stream(jpeg_tree)


def _views(data):
    kw = dict(hflip=True, mean=data.mean, std=data.std, crop="resized")
    return weak_view(SIZE, **kw), strong_view(SIZE, cutout=8, **kw)


def test_views_have_the_configured_size_and_dtype(streamed):
    data = streamed
    assert isinstance(data.train, FolderImages) and isinstance(data.test, FolderImages)
    assert (len(data.train), len(data.test)) == (216, 24)  # the cache path's 10 % hold-out per class
    assert (data.image_size, data.in_channels, data.num_classes) == (SIZE, 3, 4)
    whole = data.train.image(0)
    assert whole.shape == (3, 375, 500) and whole.dtype == torch.uint8  # the training views crop the whole image
    assert data.train.images[3].shape == (SIZE, SIZE, 3) and data.train.images[[1, 2]].dtype == np.uint8
    weak, strong = _views(data)
    for view in (per_image(weak), per_image(strong)):
        x = view(whole)
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
    x, y = next(iter(make_eval_loader(data.test, mean=data.mean, std=data.std, batch_size=5)))
    assert x.shape == (5, 3, SIZE, SIZE) and x.dtype == torch.float32 and y.tolist() == data.test.labels[:5].tolist()


def test_auto_streams_above_the_threshold(jpeg_tree, tmp_path):
    decoded = 240 * SIZE * SIZE * 3
    assert choose_data_path("auto", 240, SIZE, tmp_path, threshold=decoded) == "cache"
    assert choose_data_path("auto", 240, SIZE, tmp_path, threshold=decoded - 1) == "stream"
    assert choose_data_path("auto", 240, None, tmp_path, threshold=0) == "cache"  # no crop size: cannot stream
    kw = dict(image_size=SIZE, data_path="auto", cache_dir=str(tmp_path))
    assert isinstance(load_dataset("folder", str(jpeg_tree), stream_above=decoded - 1, **kw).train, FolderImages)
    assert not list(tmp_path.iterdir())  # streamed: nothing was written to the cache
    assert isinstance(load_dataset("folder", str(jpeg_tree), stream_above=decoded, **kw).train, ImageArrays)
    with pytest.raises(UserError, match="--image-size"):
        choose_data_path("stream", 240, None, tmp_path)
    with pytest.raises(UserError, match="image folders and tar shards only"):
        load_dataset("digits", None, data_path="stream")


def test_the_seeded_split_is_the_cache_paths(streamed, jpeg_tree, tmp_path):
    cached = load_dataset("folder", str(jpeg_tree), image_size=SIZE, data_path="cache", cache_dir=str(tmp_path))
    assert np.array_equal(cached.train.labels, streamed.train.labels)
    assert np.array_equal(cached.test.labels, streamed.test.labels) and cached.classes == streamed.classes
    a = make_split(cached.train.labels, 20, 4, seed=3, val=4)
    b = make_split(streamed.train.labels, 20, 4, seed=3, val=4)
    assert np.array_equal(a.labeled, b.labeled) and np.array_equal(a.val, b.val)
    assert np.array_equal(a.unlabeled, b.unlabeled)


def _batches(data, split, start_step: int, steps: int, workers: int, rank: int = 0, world: int = 1):
    weak, strong = _views(data)
    spec = BatchSpec(3, 5, weak, strong, mu=2, start_step=start_step, rank=rank, world_size=world, workers=workers)
    labeled, unlabeled = make_train_batches(data, split, spec)
    out, l_iter, u_iter = [], iter(labeled), iter(unlabeled)
    for _ in range(steps):
        out.append((*next(l_iter), *next(u_iter)))
    return out


def test_a_fresh_loader_at_step_k_resumes_the_stream_exactly(streamed):
    split = make_split(streamed.train.labels, 8, 4, seed=0)
    whole = _batches(streamed, split, 0, 4, workers=0)
    resumed = _batches(streamed, split, 2, 2, workers=1)  # in a worker process: the same images, the same crops
    for a, b in zip(whole[2:], resumed):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(whole[0][2], whole[1][2])  # the stream moves on: the check is not vacuous
    x_l, y_l, x_uw, x_us, _ = whole[0]
    assert x_l.shape == (3, 3, SIZE, SIZE) and x_uw.shape == x_us.shape == (6, 3, SIZE, SIZE)
    assert not torch.equal(x_uw, x_us)


def test_metapl_train_runs_on_the_streaming_path(jpeg_tree, tmp_path):
    out = tmp_path / "run"
    flags = (
        "train --dataset folder --data-path stream --num-labeled 8 --val-labeled 4 --batch-size 2 --mu 2 --steps 3 "
        "--workers 0 --eval-every 3 --log-every 1 --eval-limit 8 --finetune-steps 0 --no-tensorboard --no-progress "
        "--device cpu"
    )
    args = [*flags.split(), "--data-dir", str(jpeg_tree), "--image-size", str(SIZE), "--out", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["num_labeled"] == 4  # 8 labels, 4 of them held out for validation
    assert "val_student_acc" in summary
    assert "data_path: stream" in (out / "config.yaml").read_text()


def test_a_streamed_eval_decodes_in_workers_with_the_same_accuracies(streamed, jpeg_tree, tmp_path):
    torch.manual_seed(0)
    models = {"student": create_model("small_cnn", num_classes=4, in_channels=3, image_size=SIZE)}
    split = make_split(streamed.train.labels, 8, 4, seed=0, val=4)
    by_workers = {}
    for workers in (0, 2):
        loaders = eval_loaders(streamed, split, 7, workers=workers)
        assert [loader.num_workers for loader in loaders.values()] == [workers, workers]
        by_workers[workers] = evaluate_sets(models, loaders, torch.device("cpu"))
    assert by_workers[0] == by_workers[2] and set(by_workers[0]) >= {"student_acc", "val_student_acc"}
    cached = load_dataset("folder", str(jpeg_tree), image_size=SIZE, data_path="cache", cache_dir=str(tmp_path))
    assert eval_loaders(cached, split, 7, workers=2)[""].num_workers == 0  # cached arrays: in the process


def _rank_worker(rank: int, tree: str, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        data = _stream(Path(tree))
        split = make_split(data.train.labels, 8, 4, seed=0)
        batches = _batches(data, split, 0, 1, workers=0, rank=rank, world=WORLD)
        weak, strong = _views(data)
        spec = BatchSpec(3, 5, weak, strong, mu=2, rank=rank, world_size=WORLD, workers=0)
        _, unlabeled = make_train_batches(data, split, spec)
        sampler = unlabeled.sampler
        first_epoch = [i for i, _ in zip(sampler, range(sampler.per_rank))]
        seen = [None] * WORLD
        dist.all_gather_object(seen, {"items": first_epoch, "x_us": batches[0][3]})
        if rank == 0:
            torch.save(seen, out)
    finally:
        dist.destroy_process_group()


def test_two_ranks_read_disjoint_images(jpeg_tree, tmp_path):
    out = tmp_path / "seen.pt"
    mp.spawn(_rank_worker, args=(str(jpeg_tree), str(tmp_path / "store"), str(out)), nprocs=WORLD, join=True)
    seen = torch.load(out)
    a, b = (set(s["items"]) for s in seen)
    assert len(a) == len(b) == 108 and not a & b  # 216 unlabeled images, half each, none on both ranks
    assert not torch.equal(seen[0]["x_us"], seen[1]["x_us"])
