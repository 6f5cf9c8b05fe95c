"""Resumable sampling, seeded per-sample augmentation, transforms and the train/eval loaders."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from metapl.data import (
    BatchSpec,
    Cutout,
    ImageArrays,
    LabeledDataset,
    ResumableSampler,
    SourceData,
    UnlabeledDataset,
    eval_transform,
    load_dataset,
    make_eval_loader,
    make_split,
    make_train_batches,
    per_image,
    strong_view,
    weak_view,
)
from metapl.data.views.per_image import PILRandAugment, RandomFlip, ReflectPadCrop, ToNormalizedFloat


def take(iterable, n):
    return list(islice(iterable, n))


def synthetic(channels: int, size: int = 16, n: int = 60, classes: int = 3, seed: int = 0) -> SourceData:
    rng = np.random.default_rng(seed)

    def arrays(k):
        return ImageArrays(rng.integers(0, 256, (k, size, size, channels), dtype=np.uint8), np.arange(k) % classes)

    mean, std = (0.5,) * channels, (0.25,) * channels
    extra = ImageArrays(rng.integers(0, 256, (7, size, size, channels), dtype=np.uint8), np.full(7, -1))
    return SourceData(arrays(n), arrays(20), extra, [f"c{i}" for i in range(classes)], mean, std, hflip=True)


def views(data: SourceData):
    kw = {"hflip": data.hflip, "mean": data.mean, "std": data.std}
    return weak_view(data.image_size, **kw), strong_view(data.image_size, **kw)


# -- sampler ---------------------------------------------------------------------------------------------------------


def test_sampler_is_deterministic_and_seeded():
    a = take(ResumableSampler(10, seed=1), 35)
    assert a == take(ResumableSampler(10, seed=1), 35)
    assert [i for i, _ in a] != [i for i, _ in take(ResumableSampler(10, seed=2), 35)]
    # Each epoch is a permutation, and epochs are shuffled differently.
    epochs = [sorted(i for i, _ in a[e * 10 : (e + 1) * 10]) for e in range(3)]
    assert all(e == list(range(10)) for e in epochs) and a[:10] != a[10:20]
    seeds = [s for _, s in a]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)


def test_sampler_repeat_expands_the_epoch():
    items = [i for i, _ in take(ResumableSampler(4, seed=0, repeat=3), 12)]
    assert sorted(items) == sorted(list(range(4)) * 3)


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shards_are_disjoint_and_cover_the_epoch(world_size):
    n = 10  # not a multiple of 3: the last shard positions are padding, as in DistributedSampler
    samplers = [ResumableSampler(n, seed=4, rank=r, world_size=world_size) for r in range(world_size)]
    per_rank = samplers[0].per_rank
    shards = [take(s, per_rank) for s in samplers]
    assert all(len(s) == per_rank for s in shards)
    positions = [samplers[r].epoch_positions(0) for r in range(world_size)]
    flat = np.concatenate(positions)
    assert len(flat) == per_rank * world_size and set(flat.tolist()) == set(range(n))
    padding = per_rank * world_size - n
    assert len(flat) - len(set(flat.tolist())) == padding  # only the padding repeats
    seeds = [s for shard in shards for _, s in shard]
    assert len(set(seeds)) == len(seeds)  # every shard item, padding included, gets its own augmentation


@pytest.mark.parametrize("start", [0, 1, 9, 10, 11, 27])
def test_start_resumes_the_uninterrupted_stream(start):
    full = take(ResumableSampler(10, seed=5, rank=1, world_size=2), 40)
    assert take(ResumableSampler(10, seed=5, rank=1, world_size=2, start=start), 40 - start) == full[start:]


# -- per-sample augmentation ------------------------------------------------------------------------------------------


def test_augmentation_depends_only_on_sample_seed():
    data = synthetic(3)
    weak, strong = views(data)
    ds = UnlabeledDataset(data.train, np.arange(len(data.train)), per_image(weak), per_image(strong))
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    a, b, c = ds[(5, 123)], ds[(5, 123)], ds[(5, 124)]
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[1], c[1])
    assert not torch.equal(a[0], a[1])  # the weak and strong views differ


# -- transforms -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("channels", "size"), [(1, 8), (1, 28), (3, 32), (3, 40)])
def test_transforms_keep_shape_and_normalize(channels, size):
    image = torch.randint(0, 256, (channels, size, size), dtype=torch.uint8)
    mean, std = (0.4,) * channels, (0.2,) * channels
    for transform in (
        per_image(weak_view(size, hflip=True, mean=mean, std=std)),
        per_image(strong_view(size, hflip=False, mean=mean, std=std)),
    ):
        out = transform(image)
        assert out.shape == (channels, size, size) and out.dtype == torch.float32
    expected = (image.float() / 255 - 0.4) / 0.2
    assert torch.allclose(eval_transform(mean, std)(image), expected, atol=1e-5)


@pytest.mark.parametrize(("size", "padding"), [(8, 1), (32, 4), (5, 7)])
def test_reflect_pad_crop_gives_every_crop_of_the_reflect_padded_image(size, padding):
    image = torch.randint(0, 256, (2, size, size), dtype=torch.uint8)
    padded = image.float()[None]
    while padded.shape[-1] < size + 2 * padding:  # torch pads by less than the side per call; repeat to reflect more
        step = min(padded.shape[-1] - 1, (size + 2 * padding - padded.shape[-1]) // 2)
        padded = torch.nn.functional.pad(padded, (step,) * 4, mode="reflect")
    padded = padded[0].to(torch.uint8)
    offsets = 2 * padding + 1
    crops = {}  # the crop's bytes -> every offset that gives it (a lookup, not a comparison with each crop)
    for t in range(offsets):
        for c in range(offsets):
            crops.setdefault(padded[:, t : t + size, c : c + size].numpy().tobytes(), set()).add((t, c))
    crop = ReflectPadCrop(size, padding)
    seen = set()
    torch.manual_seed(0)  # once: one seeded stream of draws (re-seeding per draw cost more than the crops)
    for _ in range(20 * offsets * offsets):  # P(an offset never drawn) < offsets² · e^-20
        out = crop(image)
        assert out.shape == image.shape and out.dtype == image.dtype
        match = crops.get(out.numpy().tobytes())
        assert match, "the output is not a crop of the reflect-padded image"
        seen.update(match)
    assert seen == set().union(*crops.values())  # every offset is drawn
    assert len(seen) == offsets * offsets


def test_random_flip_flips_half_the_time():
    image = torch.arange(12, dtype=torch.uint8).view(1, 3, 4)
    flipped = 0
    for seed in range(400):
        torch.manual_seed(seed)
        out = RandomFlip()(image)
        assert torch.equal(out, image) or torch.equal(out, image.flip(-1))
        flipped += torch.equal(out, image.flip(-1))
    assert 150 < flipped < 250


@pytest.mark.parametrize("channels", [1, 3])
def test_pil_randaugment_keeps_shape_and_changes_the_image(channels):
    image = torch.randint(0, 256, (channels, 24, 24), dtype=torch.uint8)
    augment = PILRandAugment(2, 10, [128] * channels)
    outs = []
    for seed in range(20):
        torch.manual_seed(seed)
        outs.append(augment(image))
        torch.manual_seed(seed)
        assert torch.equal(augment(image), outs[-1])  # seeded like every other view
    assert all(o.shape == image.shape and o.dtype == torch.uint8 for o in outs)
    assert sum(not torch.equal(o, image) for o in outs) >= 15


def test_to_normalized_float_matches_torchvision():
    image = torch.randint(0, 256, (4, 3, 9, 9), dtype=torch.uint8)
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    assert torch.equal(ToNormalizedFloat(mean, std)(image), reference(image))
    assert torch.equal(ToNormalizedFloat(mean, std)(image[0]), reference(image[0]))


def test_cutout_fills_one_square():
    image = torch.full((3, 20, 20), 200, dtype=torch.uint8)
    torch.manual_seed(0)
    out = Cutout(6, (1, 2, 3))(image)
    filled = out[0] == 1
    rows, cols = filled.any(1).nonzero().flatten(), filled.any(0).nonzero().flatten()
    assert 1 <= len(rows) <= 6 and 1 <= len(cols) <= 6  # a square, clipped where it crosses the border
    assert filled.sum() == len(rows) * len(cols)
    assert (out[1][filled] == 2).all() and (out[2][filled] == 3).all() and (out[:, ~filled] == 200).all()
    assert (image == 200).all()  # the input is not modified in place
    assert torch.equal(Cutout(0, (0, 0, 0))(image), image)


# -- loaders ----------------------------------------------------------------------------------------------------------


def batches(data, split, steps, *, start_step=0, num_workers=0, batch_size=4, mu=3):
    weak, strong = views(data)
    spec = BatchSpec(batch_size, 11, weak, strong, mu=mu, start_step=start_step, workers=num_workers)
    labeled, unlabeled = make_train_batches(data, split, spec)
    return list(zip(take(labeled, steps), take(unlabeled, steps)))


def same(a, b) -> bool:
    return all(torch.equal(x, y) for pa, pb in zip(a, b) for x, y in zip([*pa[0], *pa[1]], [*pb[0], *pb[1]]))


def test_train_loaders_rgb_shapes_and_exact_resume():
    data = synthetic(3)
    split = make_split(data.train.labels, 9, data.num_classes, seed=0)
    run = batches(data, split, 4)
    (x_l, y_l), (x_uw, x_us, y_u) = run[0]
    assert x_l.shape == (4, 3, 16, 16) and x_l.dtype == torch.float32 and y_l.dtype == torch.int64
    assert x_uw.shape == x_us.shape == (12, 3, 16, 16) and y_u.shape == (12,)
    assert -2.5 < float(x_uw.mean()) < 2.5 and float(x_uw.std()) > 0.5  # normalized, not 0..255
    assert set(y_l.tolist()) <= set(range(3)) and set(y_u.tolist()) <= {-1, 0, 1, 2}
    assert same(batches(data, split, 2, start_step=2), run[2:])  # restarted at step 2 == uninterrupted steps 2, 3


def test_loaders_same_batches_with_workers():
    data = synthetic(1, size=8)
    split = make_split(data.train.labels, 6, data.num_classes, seed=0)
    assert same(batches(data, split, 3, num_workers=0), batches(data, split, 3, num_workers=2))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loaders_leave_the_global_rng_alone(num_workers):
    data = synthetic(3)
    split = make_split(data.train.labels, 6, data.num_classes, seed=0)
    torch.manual_seed(1)
    expected = torch.rand(4)
    torch.manual_seed(1)
    batches(data, split, 1, num_workers=num_workers)
    list(make_eval_loader(data.test, mean=data.mean, std=data.std, batch_size=8))
    assert torch.equal(torch.rand(4), expected)  # a resumed run's dropout etc. stay in step with the original


def test_extra_unlabeled_and_expand_labels():
    data = synthetic(3)
    split = make_split(data.train.labels, 3, data.num_classes, seed=0)
    weak, strong = views(data)
    spec = BatchSpec(batch_size=4, seed=0, weak=weak, strong=strong, mu=5, expand_labels_to=30, workers=0)
    labeled, unlabeled = make_train_batches(data, split, spec)
    assert labeled.sampler.repeat == 10 and len(unlabeled.dataset) == len(data.train) + 7
    seen = torch.cat([y for _, _, y in take(unlabeled, 14)])  # 280 draws from 67 items: all of them
    assert (seen == -1).sum() > 0 and (seen >= 0).sum() > 0


def test_labeled_dataset_uses_split_indices():
    data = synthetic(3)
    ds = LabeledDataset(data.train, np.array([7, 2]), eval_transform(data.mean, data.std))
    x, y = ds[(1, 0)]
    assert int(y) == int(data.train.labels[2])
    assert torch.allclose(
        x, eval_transform(data.mean, data.std)(torch.from_numpy(data.train.images[2]).permute(2, 0, 1))
    )


def test_digits_grayscale_loaders():
    data = load_dataset("digits", None)
    split = make_split(data.train.labels, 20, data.num_classes, seed=0)
    (x_l, y_l), (x_uw, x_us, y_u) = batches(data, split, 1, batch_size=8, mu=2)[0]
    assert x_l.shape == (8, 1, 8, 8) and x_us.shape == (16, 1, 8, 8) and y_u.dtype == torch.int64
    loader = make_eval_loader(data.test, mean=data.mean, std=data.std, batch_size=128)
    xs, ys = zip(*loader)
    assert sum(len(y) for y in ys) == 500 and torch.equal(torch.cat(ys), torch.from_numpy(data.test.labels))
    assert xs[0].shape == (128, 1, 8, 8) and abs(float(torch.cat(xs).mean())) < 0.2  # constants fit the data


def test_mix_seeds_equals_mix_seed_for_every_position():
    from metapl.data.sampling import mix_seed, mix_seeds

    last = np.array([0, 1, 2, 7, 12_345, 2**40 + 3, 2**62 - 1], dtype=np.int64)
    for lead in [(0,), (11, 3), (2**32 - 1, 0), (5, 2**31, 9)]:
        assert mix_seeds(*lead, last=last).tolist() == [mix_seed(*lead, int(v)) for v in last]
