"""Weak, strong and evaluation views, with torchvision.transforms.v2 on uint8 ``(C, H, W)`` tensors (C = 1 or 3).

Every random choice draws from torch's global CPU generator, which ``loader.py`` seeds per sample, so a view depends
only on the sample's seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2


class Cutout:
    """Fill one square of side ``size`` at a uniformly random centre (clipped at the borders) with ``fill``.

    A plain callable on uint8 ``(C, H, W)`` tensors, so it composes with ``v2.Compose``; it draws its centre from
    torch's global generator like the v2 transforms do.
    """

    def __init__(self, size: int, fill: Sequence[int]):
        self.size = int(size)
        self.fill = tuple(int(f) for f in fill)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.size <= 0:
            return image
        _, height, width = image.shape
        cy = int(torch.randint(height, (1,)))
        cx = int(torch.randint(width, (1,)))
        half = self.size // 2
        y0, y1 = max(0, cy - half), min(height, cy - half + self.size)
        x0, x1 = max(0, cx - half), min(width, cx - half + self.size)
        image = image.clone()
        fill = torch.tensor(self.fill, dtype=image.dtype).view(-1, 1, 1)
        image[:, y0:y1, x0:x1] = fill.expand(image.shape[0], y1 - y0, x1 - x0)
        return image

    def __repr__(self) -> str:
        return f"Cutout(size={self.size}, fill={self.fill})"


def _fill(mean: Sequence[float]) -> list[int]:
    """The dataset's mean colour as uint8 values: what geometric ops and Cutout paint, ~0 after Normalize."""
    return [round(255 * m) for m in mean]


def _to_float(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def _weak_geometry(image_size: int, hflip: bool) -> list:
    # Pad-and-crop translates by up to 12.5% of the side, as in the paper's CIFAR setup (4 px at 32 px).
    flip = [v2.RandomHorizontalFlip()] if hflip else []
    return [*flip, v2.RandomCrop(image_size, padding=round(0.125 * image_size), padding_mode="reflect")]


def weak_transform(image_size: int, *, hflip: bool, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """The weak view: optional horizontal flip, reflect-padded random crop, then float and Normalize.

    Args:
        image_size: side of the (square) input and output.
        hflip: whether to flip horizontally with probability 0.5.
        mean: per-channel mean in [0, 1] units.
        std: per-channel std in [0, 1] units.

    Returns:
        A callable mapping uint8 ``(C, H, W)`` to normalized float32 ``(C, H, W)``.
    """
    return v2.Compose([*_weak_geometry(image_size, hflip), *_to_float(mean, std)])


def strong_transform(
    image_size: int,
    *,
    hflip: bool,
    mean: Sequence[float],
    std: Sequence[float],
    randaug_n: int = 2,
    randaug_m: int = 10,
    cutout: int | None = None,
) -> v2.Compose:
    """The strong view: the weak geometry, torchvision's RandAugment, Cutout, then float and Normalize.

    Args:
        image_size: side of the (square) input and output.
        hflip: whether to flip horizontally with probability 0.5.
        mean: per-channel mean in [0, 1] units (also the fill colour of rotations, shears and Cutout).
        std: per-channel std in [0, 1] units.
        randaug_n: RandAugment's number of ops per image.
        randaug_m: RandAugment's magnitude (0..30 on torchvision's 31-bin scale).
        cutout: side of the Cutout square in pixels; ``None`` means ``image_size // 2``, 0 turns it off.

    Returns:
        A callable mapping uint8 ``(C, H, W)`` to normalized float32 ``(C, H, W)``.
    """
    fill = _fill(mean)
    return v2.Compose(
        [
            *_weak_geometry(image_size, hflip),
            v2.RandAugment(num_ops=randaug_n, magnitude=randaug_m, fill=fill),
            Cutout(image_size // 2 if cutout is None else cutout, fill),
            *_to_float(mean, std),
        ]
    )


def eval_transform(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """The evaluation view: float and Normalize only.

    Args:
        mean: per-channel mean in [0, 1] units.
        std: per-channel std in [0, 1] units.

    Returns:
        A callable mapping uint8 ``(C, H, W)`` to normalized float32 ``(C, H, W)``.
    """
    return v2.Compose(_to_float(mean, std))
