"""Augmentation on the training device (``--augment-on device``): each batched op against the Pillow path the loader
workers run, the op and pixel statistics of whole views, determinism, the resume contract and the trainer end to
end."""

from __future__ import annotations

import math
import os
import signal

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

import metapl.core
import metapl.training.trainer
from metapl.commands.cli import main
from metapl.data import (
    BatchSpec,
    BatchView,
    Cutout,
    ImageArrays,
    SourceData,
    make_split,
    make_train_batches,
    per_image,
    strong_view,
    weak_view,
)
from metapl.data.views import kernels as ops_
from metapl.data.views.per_batch import OPS, SIGNED, draw_ops, op_magnitudes, rand_augment
from metapl.rundir.checkpoint import load_checkpoint
from metapl.rundir.layout import LATEST

MEAN3, STD3, FILL3 = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26), [125, 122, 115]


def smooth_images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 ``(n, C, size, size)`` images with structure (upsampled noise), so every op changes them visibly."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 256, (n, channels, 6, 6), generator=g).float()
    up = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return up.round().clamp(0, 255).to(torch.uint8)


def pillow_op(image: torch.Tensor, name: str, magnitude: float, fill: list[int]) -> torch.Tensor:
    """What the loader path's RandAugment does for op ``name`` at signed ``magnitude`` on a Pillow copy of ``image``."""
    ra = v2.RandAugment(fill=fill[0] if len(fill) == 1 else fill)
    array = image.permute(1, 2, 0).numpy()
    pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    # The transform's own op dispatch (private): exactly the code behind PILRandAugment's random draws.
    out = np.array(
        ra._apply_image_or_video_transform(pil, name, magnitude, interpolation=ra.interpolation, fill=ra._fill)
    )
    return torch.from_numpy(out[None] if out.ndim == 2 else out.transpose(2, 0, 1).copy())


# -- the op table ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("magnitude", [0, 9, 10, 30])
def test_op_table_is_torchvisions(magnitude):
    space = v2.RandAugment._AUGMENTATION_SPACE
    assert tuple(space) == OPS and SIGNED.tolist() == [space[name][1] for name in OPS]
    table = op_magnitudes(magnitude, 28, 32)
    for k, name in enumerate(OPS):
        values = space[name][0](31, 28, 32)
        assert table[k].item() == (0.0 if values is None else float(values[magnitude])), name


# -- each op against the Pillow path ------------------------------------------------------------------------------

# Signed magnitudes at the bins used by the configs (m = 9, 10) and at the extremes (m = 30).
CASES = [("Identity", 0.0), ("ShearX", 0.1), ("ShearX", -0.3), ("ShearY", 0.09), ("ShearY", -0.3),
         ("TranslateX", 4.834), ("TranslateX", -14.5), ("TranslateY", -3.8), ("TranslateY", 12.0), ("Rotate", 10.0),
         ("Rotate", -30.0), ("Brightness", 0.3), ("Brightness", -0.9), ("Color", 0.27), ("Color", -0.3),
         ("Contrast", 0.3), ("Contrast", -0.9), ("Sharpness", 0.9), ("Sharpness", -0.3), ("Posterize", 7.0),
         ("Posterize", 4.0), ("Solarize", 2 / 3), ("Solarize", 0.0), ("AutoContrast", 0.0),
         ("Equalize", 0.0)]  # fmt: skip


@pytest.mark.parametrize("channels,size", [(3, 32), (1, 28)])
def test_every_op_equals_the_pillow_path_pixel_for_pixel(channels, size):
    # Tolerance 0, for the geometric ops too: the gather samples the source pixel Pillow samples (the pixel holding
    # A @ (x + 0.5, y + 0.5)), computed in float64; it could only differ where that point lies within Pillow's 16.16
    # fixed-point rounding (~1e-5 px) of a pixel edge, which none of these magnitudes hits.
    fill = FILL3[:channels]
    g = torch.Generator().manual_seed(1)
    noise = torch.randint(0, 256, (len(CASES), channels, size, size), generator=g, dtype=torch.uint8)
    images = torch.cat([smooth_images(len(CASES), channels, size), noise])
    ops = torch.tensor([OPS.index(name) for name, _ in CASES] * 2).view(1, -1)
    magnitudes = torch.tensor([m for _, m in CASES] * 2, dtype=torch.float64).view(1, -1)
    # One batch holding every op: checks the kernels and the sort-by-op / unsort of the batched dispatch.
    out = rand_augment(images, ops, magnitudes, torch.tensor(fill, dtype=torch.uint8))
    for i, (name, magnitude) in enumerate(CASES * 2):
        assert torch.equal(out[i], pillow_op(images[i], name, magnitude, fill)), (name, magnitude, i)


@pytest.mark.parametrize("flip", [False, True])
def test_crop_and_flip_equal_the_loader_geometry(flip):
    images = smooth_images(3, 3, 32)
    view = BatchView(weak_view(32, hflip=True, mean=MEAN3, std=STD3))
    top, left = torch.tensor([0, 4, 8]), torch.tensor([8, 0, 3])  # corners and an inner offset of the 40x40 pad
    out = view._crop_flip(images, torch.full((3,), flip), top, left)
    for i in range(3):
        source = images[i].flip(-1) if flip else images[i]  # RandomFlip comes before ReflectPadCrop
        padded = F.pad(source, [4], padding_mode="reflect")
        assert torch.equal(out[i], padded[:, top[i] : top[i] + 32, left[i] : left[i] + 32])


def test_cutout_equals_transforms_cutout_at_every_centre(monkeypatch):
    image = smooth_images(1, 3, 12)[0]
    fill = torch.tensor(FILL3, dtype=torch.uint8)
    cy, cx = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    cy, cx = cy.flatten(), cx.flatten()
    out = ops_.cutout(image.expand(len(cy), -1, -1, -1), cy, cx, 5, fill)
    cpu = Cutout(5, FILL3)
    draws = iter(torch.stack([cy, cx], 1).flatten().split(1))
    monkeypatch.setattr(torch, "randint", lambda *a, **k: next(draws))  # Cutout draws cy, then cx, from here
    for i in range(len(cy)):
        assert torch.equal(out[i], cpu(image)), (int(cy[i]), int(cx[i]))


def test_normalize_equals_to_normalized_float():
    images = smooth_images(2, 3, 8)
    mean = torch.tensor(MEAN3).view(-1, 1, 1)
    std = torch.tensor(STD3).view(-1, 1, 1)
    weak = per_image(weak_view(8, hflip=False, mean=MEAN3, std=STD3))
    expected = torch.stack([weak.transforms[-1](x) for x in images])
    assert torch.equal(ops_.normalize(images, mean, std), expected)


# -- random draws and whole views ------------------------------------------------------------------------------------


def test_ops_are_drawn_uniformly_with_random_signs():
    n = 28_000
    ops, signed = draw_ops(torch.Generator().manual_seed(0), n, 2, op_magnitudes(10, 32, 32))
    counts = torch.bincount(ops.flatten(), minlength=len(OPS)).double()
    p, total = 1 / len(OPS), 2 * n
    # Binomial counts: each op within 4.5 standard deviations of total / 14 (a false alarm about once in 10^4 runs).
    assert ((counts - total * p).abs() <= 4.5 * math.sqrt(total * p * (1 - p))).all(), counts
    signed_ops = SIGNED[ops] & (op_magnitudes(10, 32, 32)[ops] > 0)
    negative = (signed[signed_ops] < 0).double()
    assert abs(float(negative.mean()) - 0.5) <= 4.5 * math.sqrt(0.25 / len(negative))
    assert (signed[~SIGNED[ops]] >= 0).all()  # unsigned ops keep their magnitude


# Per-view statistics: brightness, contrast, edge energy (shears, rotations, sharpness, posterize add edges) and the
# share of saturated pixels (solarize, autocontrast, equalize, brightness push values to the ends of the range).
STATISTICS = (
    lambda x: x.mean((1, 2, 3)),
    lambda x: x.std((1, 2, 3)),
    lambda x: (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3)),
    lambda x: ((x <= x.amin()) | (x >= x.amax())).float().mean((1, 2, 3)),
)


@pytest.mark.parametrize("channels,size,m,cutout", [(3, 32, 10, 16), (1, 28, 9, 8)])
def test_strong_and_weak_views_have_the_pillow_paths_pixel_statistics(channels, size, m, cutout):
    # The same 16 images, 1,536 views each way. Per view, its mean and std over pixels; their averages over views must
    # agree within 4.5 standard errors of the difference of two independent means.
    n, pool = 1536, smooth_images(16, channels, size, seed=3)
    mean, std = (0.5,) * channels, (0.25,) * channels
    kw = {"hflip": True, "mean": mean, "std": std}
    for spec in (strong_view(size, **kw, randaug_m=m, cutout=cutout), weak_view(size, **kw)):
        pillow, device = per_image(spec), BatchView(spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            a = torch.stack([pillow(pool[i % 16]) for i in range(n)])
        g = torch.Generator().manual_seed(0)
        b = torch.cat([device(pool[torch.arange(256) % 16], g) for _ in range(n // 256)])
        for stat in STATISTICS:
            sa, sb = stat(a).double(), stat(b).double()
            se = math.sqrt(float(sa.var()) / n + float(sb.var()) / n)
            assert abs(float(sa.mean() - sb.mean())) <= 4.5 * se, (float(sa.mean()), float(sb.mean()), se)


def test_views_are_deterministic_under_a_seed_and_differ_across_seeds():
    view = BatchView(strong_view(32, hflip=True, mean=MEAN3, std=STD3))
    images = smooth_images(8, 3, 32)

    def run(seed):
        return view(images, torch.Generator().manual_seed(seed))

    a = run(5)
    assert a.shape == (8, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, run(5)) and not torch.equal(a, run(6))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_views_equal_cpu_views():
    for channels, size in ((3, 32), (1, 28)):
        view = BatchView(strong_view(size, hflip=True, mean=MEAN3[:channels], std=STD3[:channels]))
        images = smooth_images(64, channels, size)
        cpu = view(images, torch.Generator().manual_seed(1))
        cuda = view(images.cuda(), torch.Generator().manual_seed(1))
        assert torch.equal(cuda.cpu(), cpu)


# -- loaders ---------------------------------------------------------------------------------------------------------


def synthetic(channels: int = 3, size: int = 16) -> SourceData:
    rng = np.random.default_rng(0)

    def arrays(k):
        return ImageArrays(rng.integers(0, 256, (k, size, size, channels), dtype=np.uint8), np.arange(k) % 3)

    extra = ImageArrays(rng.integers(0, 256, (7, size, size, channels), dtype=np.uint8), np.full(7, -1))
    return SourceData(arrays(60), arrays(20), extra, ["a", "b", "c"], (0.5,) * channels, (0.25,) * channels, True)


def device_batches(data, split, steps, *, start_step=0, num_workers=0):
    kw = {"hflip": True, "mean": data.mean, "std": data.std}
    weak, strong = weak_view(16, **kw), strong_view(16, **kw)
    spec = BatchSpec(4, 11, weak, strong, mu=3, start_step=start_step, augment_on="device", workers=num_workers)
    labeled, unlabeled = make_train_batches(data, split, spec)
    return [(*next(labeled), *next(unlabeled)) for _ in range(steps)]


def test_device_batches_resume_exactly_and_ignore_workers():
    data = synthetic()
    split = make_split(data.train.labels, 9, 3, seed=0)
    run = device_batches(data, split, 4)
    x_l, y_l, x_uw, x_us, y_u = run[0]
    assert x_l.shape == (4, 3, 16, 16) and x_uw.shape == x_us.shape == (12, 3, 16, 16) and y_u.shape == (12,)
    assert not torch.equal(x_uw, x_us)
    for a, b in zip(device_batches(data, split, 2, start_step=2), run[2:]):  # resumed at step 2 == steps 2, 3
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    for a, b in zip(device_batches(data, split, 3, num_workers=2), run[:3]):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_device_batches_draw_the_loader_paths_images_and_leave_the_global_rng_alone():
    data = synthetic()
    split = make_split(data.train.labels, 9, 3, seed=0)
    kw = {"hflip": True, "mean": data.mean, "std": data.std}
    spec = BatchSpec(4, 11, weak_view(16, **kw), strong_view(16, **kw), mu=3, workers=0)
    labeled, unlabeled = make_train_batches(data, split, spec)
    torch.manual_seed(1)
    expected = torch.rand(4)
    torch.manual_seed(1)
    run = device_batches(data, split, 3)
    assert torch.equal(torch.rand(4), expected)
    for (_, y_l), (_, _, y_u), batch in zip(labeled, unlabeled, run):  # the same images (labels) at every step
        assert torch.equal(y_l, batch[1]) and torch.equal(y_u, batch[4])


# -- the trainer -----------------------------------------------------------------------------------------------------

TINY = ["--dataset", "digits", "--num-labeled", "20", "--batch-size", "8", "--mu", "2", "--workers", "0",
        "--eval-every", "4", "--log-every", "2", "--save-every", "2", "--no-tensorboard", "--no-progress",
        "--device", "cpu", "--steps", "6", "--augment-on", "device", "--deterministic", "--labeled-aug", "strong",
        "--finetune-steps", "0"]  # fmt: skip


def test_cli_trains_with_device_augmentation_and_a_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    full = tmp_path / "full"
    assert main(["train", *TINY, "--out", str(full)]) == 0
    assert yaml.safe_load((full / "config.yaml").read_text())["augment_on"] == "device"

    real, calls = metapl.core.mpl_update, []

    def update_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop finishes step 3, saves it and stops
        return real(*args, **kwargs)

    monkeypatch.setattr(metapl.core, "mpl_update", update_then_signal)
    killed = tmp_path / "killed"
    assert main(["train", *TINY, "--out", str(killed)]) == 143
    assert load_checkpoint(killed / LATEST)["step"] == 3
    monkeypatch.undo()
    assert main(["train", "--resume", str(killed)]) == 0

    a, b = (torch.load(d / LATEST, weights_only=False) for d in (full, killed))
    for role in ("teacher", "student", "ema"):
        assert all(torch.equal(a[role][k], b[role][k]) for k in a[role]), role
