"""The per-image backend of the views: a ``ViewSpec`` run in the loader workers on uint8 ``(C, H, W)`` tensors (C = 1
or 3), composed with torchvision.transforms.v2; and the evaluation view, ``eval_transform``.

Every random choice draws from torch's global CPU generator, which ``datasets.py`` seeds per sample, so a view depends
only on the sample's seed.

The flip, the reflect-padded crop and the float conversion are small plain callables instead of their v2
counterparts: on a 32x32 image v2's per-call dispatch costs more than the work (pad + crop 150 us against 20 us
for one gather, flip 40 us against 5 us, ToDtype + Normalize 85 us against 10 us), and the loader runs them
~500 times per training step (``benchmarks/loader_speed.py``). RandAugment is torchvision's, run on a Pillow copy
of the image: its rotate/shear/translate take ~30 us there against ~380 us on a small tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from metapl.data.views.spec import RESIZED_CROP_SCALE, ViewSpec, reflect_index


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


class RandomFlip:
    """Flip a ``(C, H, W)`` tensor left-right with probability 0.5."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.flip(-1) if bool(torch.rand(()) < 0.5) else image

    def __repr__(self) -> str:
        return "RandomFlip()"


class ReflectPadCrop:
    """Reflect-pad a ``(C, H, W)`` tensor by ``padding`` on every side, then crop ``size x size`` at a uniformly random
    offset: the same views as ``v2.RandomCrop(size, padding, padding_mode="reflect")``, as one gather per axis.

    Args:
        size: side of the output.
        padding: pixels of reflection added on each side before cropping.
    """

    def __init__(self, size: int, padding: int):
        self.size, self.padding = int(size), int(padding)
        self._index: dict[int, torch.Tensor] = {}

    def _axis(self, length: int) -> torch.Tensor:
        if length not in self._index:
            if length + 2 * self.padding < self.size:
                raise ValueError(f"a {length}-pixel side padded by {self.padding} is smaller than the crop {self.size}")
            self._index[length] = reflect_index(length, self.padding)
        return self._index[length]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        rows, cols = self._axis(image.shape[-2]), self._axis(image.shape[-1])
        top = int(torch.randint(len(rows) - self.size + 1, ()))
        left = int(torch.randint(len(cols) - self.size + 1, ()))
        out = image.index_select(-2, rows[top : top + self.size])
        return out.index_select(-1, cols[left : left + self.size])

    def __repr__(self) -> str:
        return f"ReflectPadCrop(size={self.size}, padding={self.padding})"


class ToNormalizedFloat:
    """uint8 ``(C, H, W)`` or ``(N, C, H, W)`` -> float32 ``(x / 255 - mean) / std`` per channel.

    Args:
        mean: per-channel mean in [0, 1] units.
        std: per-channel std in [0, 1] units.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.to(torch.float32).mul_(1 / 255).sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return f"ToNormalizedFloat(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


class PILRandAugment:
    """torchvision's ``v2.RandAugment`` applied to a Pillow copy of a uint8 ``(C, H, W)`` tensor (C = 1 or 3).

    Same ops, magnitudes and random draws (torch's global generator) as on the tensor; only the pixel kernels are
    Pillow's, which are several times faster on small images.

    Args:
        num_ops: ops per image.
        magnitude: magnitude on torchvision's 31-bin scale.
        fill: uint8 fill colour of rotations, shears and translations, one value per channel.
    """

    def __init__(self, num_ops: int, magnitude: int, fill: Sequence[int]):
        fill = [int(f) for f in fill]
        self.randaugment = v2.RandAugment(
            num_ops=num_ops, magnitude=magnitude, fill=fill[0] if len(fill) == 1 else fill
        )

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        array = image.permute(1, 2, 0).numpy()
        out = np.array(self.randaugment(Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)))
        return torch.from_numpy(out[None] if out.ndim == 2 else out.transpose(2, 0, 1).copy())

    def __repr__(self) -> str:
        return f"PILRandAugment({self.randaugment!r})"


def per_image(spec: ViewSpec) -> v2.Compose:
    """The view ``spec`` as a callable on one image.

    Args:
        spec: the view.

    Returns:
        A callable mapping uint8 ``(C, H, W)`` to normalized float32 ``(C, spec.size, spec.size)``.
    """
    flip = [RandomFlip()] if spec.hflip else []
    if spec.crop == "resized":  # images of any size (streamed): a random area and aspect ratio, resized to the side
        geometry = [v2.RandomResizedCrop(spec.size, scale=RESIZED_CROP_SCALE, antialias=True), *flip]
    else:
        geometry = [*flip, ReflectPadCrop(spec.size, padding=spec.padding)]
    # RandAugment with no ops and Cutout of side 0 would leave the image as it is and draw nothing: left out.
    randaugment = [PILRandAugment(spec.randaug_n, spec.randaug_m, spec.fill)] if spec.randaug_n > 0 else []
    cutout = [Cutout(spec.cutout, spec.fill)] if spec.cutout > 0 else []
    return v2.Compose([*geometry, *randaugment, *cutout, ToNormalizedFloat(spec.mean, spec.std)])


def eval_transform(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """The evaluation view: float and Normalize only.

    Args:
        mean: per-channel mean in [0, 1] units.
        std: per-channel std in [0, 1] units.

    Returns:
        A callable mapping uint8 ``(C, H, W)`` to normalized float32 ``(C, H, W)``.
    """
    return v2.Compose([ToNormalizedFloat(mean, std)])
