"""The views, declared once: ``ViewSpec`` says what a weak or strong view of an image does, and both backends run it.

A view is: an optional horizontal flip and a random crop, then (strong views) torchvision's RandAugment (Cubuk et al.
2020) and Cutout (DeVries & Taylor 2017), then the float conversion and Normalize. ``per_image.per_image`` runs a spec
on one uint8 ``(C, H, W)`` image at a time in the loader workers, ``per_batch.BatchView`` on whole uint8
``(N, C, H, W)`` batches on the training device, with the same pixel arithmetic; the evaluation view is Normalize
alone (``per_image.eval_transform``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from metapl.data.stores import SourceData

import torch

# Area range of the "resized" crop. Not the supervised ImageNet recipe's (0.08, 1): the weak view is also what the
# teacher's pseudo labels and UDA targets are read from, and a crop of under a quarter of the image often misses the
# object, so its target is noise (or masked out by the UDA threshold, a wasted image). (0.25, 1) keeps the scale and
# aspect jitter that large-image training needs while most crops still show the object.
RESIZED_CROP_SCALE = (0.25, 1.0)
CROPS = ("pad", "resized")


@dataclass(frozen=True)
class ViewSpec:
    """One random view of an image: [flip], crop, [RandAugment], [Cutout], Normalize.

    Attributes:
        size: side of the (square) output; with ``crop="pad"`` also of the input.
        hflip: flip left-right with probability 1/2 (before the crop).
        mean: per-channel mean in [0, 1] units (its uint8 colour, ``fill``, paints rotations, shears and Cutout).
        std: per-channel std in [0, 1] units.
        crop: ``"pad"``: reflect-padded random crop of a square input (the paper's CIFAR views); ``"resized"``:
            RandomResizedCrop of an input of any size (``RESIZED_CROP_SCALE``; streamed images, loader workers only).
        randaug_n: RandAugment's ops per image; 0: none (the weak view).
        randaug_m: RandAugment's magnitude bin (0 .. 30 on torchvision's 31-bin scale).
        cutout: side of the Cutout square in pixels; 0: none.
    """

    size: int
    hflip: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop: str = "pad"
    randaug_n: int = 0
    randaug_m: int = 0
    cutout: int = 0

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"unknown crop {self.crop!r}; choose one of {', '.join(CROPS)}")
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))

    @property
    def padding(self) -> int:
        """The reflection around a ``"pad"`` crop: 12.5% of the side, as in the paper's CIFAR setup (4 px at 32 px)."""
        return round(0.125 * self.size)

    @property
    def fill(self) -> list[int]:
        """The fill colour of geometric ops and Cutout (``fill_colour(mean)``)."""
        return fill_colour(self.mean)


def weak_view(
    image_size: int, *, hflip: bool, mean: Sequence[float], std: Sequence[float], crop: str = "pad"
) -> ViewSpec:
    """The weak view: optional horizontal flip, a random crop, then float and Normalize.

    Args:
        image_size: side of the (square) output; with ``crop="pad"`` also of the input.
        hflip: whether to flip horizontally with probability 0.5.
        mean: per-channel mean in [0, 1] units.
        std: per-channel std in [0, 1] units.
        crop: ``"pad"`` or ``"resized"`` (see ``ViewSpec``; ``train_crop`` picks it for a data set).

    Returns:
        The ``ViewSpec``.
    """
    return ViewSpec(image_size, hflip, tuple(mean), tuple(std), crop=crop)


def strong_view(
    image_size: int,
    *,
    hflip: bool,
    mean: Sequence[float],
    std: Sequence[float],
    randaug_n: int = 2,
    randaug_m: int = 10,
    cutout: int | None = None,
    crop: str = "pad",
) -> ViewSpec:
    """The strong view: the weak view's flip and crop, RandAugment, Cutout, then float and Normalize.

    Args:
        image_size: side of the (square) output; with ``crop="pad"`` also of the input.
        hflip: whether to flip horizontally with probability 0.5.
        mean: per-channel mean in [0, 1] units (also the fill colour of rotations, shears and Cutout).
        std: per-channel std in [0, 1] units.
        randaug_n: RandAugment's number of ops per image.
        randaug_m: RandAugment's magnitude (0..30 on torchvision's 31-bin scale).
        cutout: side of the Cutout square in pixels; ``None`` means ``image_size // 2``, 0 turns it off.
        crop: the crop, as in ``weak_view``.

    Returns:
        The ``ViewSpec``.
    """
    side = image_size // 2 if cutout is None else cutout
    return ViewSpec(image_size, hflip, tuple(mean), tuple(std), crop, int(randaug_n), int(randaug_m), int(side))


def train_crop(data: SourceData) -> str:
    """The training views' crop for a ``SourceData``: ``"resized"`` (RandomResizedCrop) for streamed images, whose
    sizes differ, ``"pad"`` (the reflect-padded crop of the paper's CIFAR recipe) for cached arrays."""
    return "resized" if data.streamed else "pad"


def fill_colour(mean: Sequence[float]) -> list[int]:
    """The dataset's mean colour as uint8 values: what geometric ops and Cutout paint, ~0 after Normalize.

    Args:
        mean: per-channel mean in [0, 1] units.

    Returns:
        One uint8 value per channel.
    """
    return [round(255 * m) for m in mean]


@functools.lru_cache(maxsize=64)
def reflect_index(length: int, padding: int) -> torch.Tensor:
    """The source index of each position of an axis of ``length`` reflect-padded by ``padding`` on both sides.

    "Reflect" does not repeat the edge pixel; a padding longer than the axis reflects again.

    Args:
        length: pixels along the axis.
        padding: pixels added on each side.

    Returns:
        int64 ``(length + 2 * padding,)``, shared between calls (cached): index with it, never write to it.
    """
    pos = torch.arange(-padding, length + padding)
    if length == 1:
        return torch.zeros_like(pos)
    period = 2 * (length - 1)
    pos = pos.remainder(period)
    return torch.where(pos >= length, period - pos, pos)
