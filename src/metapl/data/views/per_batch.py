"""The per-batch backend of the views: a ``ViewSpec`` run on whole uint8 batches on the training device.

``per_image.per_image`` augments one image at a time in the loader workers; ``BatchView`` takes a uint8
``(N, C, H, W)`` batch on any device (CPU or CUDA) and applies the same chain with every image's own random draws:
optional flip, reflect-padded random crop, then (strong) torchvision's RandAugment and Cutout, then the float
conversion and Normalize.

Randomness: every draw (flips, crop offsets, RandAugment's ops, signs, Cutout centres) comes from the CPU
``torch.Generator`` the caller passes (``batches.DeviceViews`` seeds it from the batch's sample seeds), so a view
depends only on the batch and the seed, on the CPU and on CUDA alike, and the global generators are never touched.
The draws are small ``(N,)`` tensors; only they, not per-pixel indices, travel to the device.

RandAugment keeps torchvision's ``v2.RandAugment`` semantics: ``num_ops`` ops per image, each drawn uniformly from
the 14 of ``OPS``; the magnitude is bin ``magnitude`` of 31; signed ops are negated with probability 1/2;
rotations, shears and translations are nearest-neighbour and paint ``fill``. The pixel kernels
(``kernels.py``) reproduce the Pillow path's arithmetic. Each op runs once per op slot on the images
that drew it: the batch is sorted by op, so each op works on one contiguous slice (the five geometric ops share one
gather), and the sort is undone at the end.
"""

from __future__ import annotations

import torch

from metapl.data.views import kernels
from metapl.data.views.spec import ViewSpec, reflect_index

# torchvision's v2.RandAugment._AUGMENTATION_SPACE, in its order (the op index is the drawn integer).
OPS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)
SIGNED = torch.tensor([name in OPS[1:10] for name in OPS])  # ShearX .. Sharpness take a random sign
_GEOMETRIC = (1, 6)  # OPS[1:6]: one affine gather for all of them
_ENHANCE = (6, 7, 8, 9)  # parameter 1 + magnitude: Pillow's ImageEnhance factor
_KERNELS = {
    6: kernels.brightness,
    7: kernels.color,
    8: kernels.contrast,
    9: kernels.sharpness,
    10: kernels.posterize,
    11: kernels.solarize,
    12: lambda x, _: kernels.autocontrast(x),
    13: lambda x, _: kernels.equalize(x),
}


def op_magnitudes(magnitude: int, height: int, width: int, num_bins: int = 31) -> torch.Tensor:
    """Each op's unsigned magnitude at bin ``magnitude``, as torchvision computes it (0 for ops without one).

    Args:
        magnitude: the bin, 0 .. ``num_bins - 1``.
        height: image height (TranslateY's range).
        width: image width (TranslateX's range).
        num_bins: bins of the magnitude scale.

    Returns:
        float64 ``(len(OPS),)``, indexed like ``OPS``.
    """

    def bin_of(values: torch.Tensor) -> float:
        return float(values[magnitude])  # float32 table, then a Python float: torchvision's own rounding

    shear, enhance = bin_of(torch.linspace(0.0, 0.3, num_bins)), bin_of(torch.linspace(0.0, 0.9, num_bins))
    posterize = bin_of((8 - (torch.arange(num_bins) / ((num_bins - 1) / 4))).round().int())
    return torch.tensor([
        0.0, shear, shear,
        bin_of(torch.linspace(0.0, 150.0 / 331.0 * width, num_bins)),
        bin_of(torch.linspace(0.0, 150.0 / 331.0 * height, num_bins)),
        bin_of(torch.linspace(0.0, 30.0, num_bins)),
        enhance, enhance, enhance, enhance, posterize,
        bin_of(torch.linspace(1.0, 0.0, num_bins)), 0.0, 0.0,
    ], dtype=torch.float64)  # fmt: skip


def draw_ops(
    generator: torch.Generator, n: int, num_ops: int, magnitudes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RandAugment's random choices for ``n`` images: which op in each slot, and its signed magnitude.

    Args:
        generator: CPU generator to draw from.
        n: images.
        num_ops: op slots per image.
        magnitudes: ``op_magnitudes(...)``.

    Returns:
        ``(ops, signed)``: int64 ``(num_ops, n)`` indices into ``OPS`` and float64 ``(num_ops, n)`` magnitudes.
    """
    ops = torch.randint(len(OPS), (num_ops, n), generator=generator)
    negative = torch.rand((num_ops, n), generator=generator, dtype=torch.float64) <= 0.5  # torchvision: rand <= 0.5
    return ops, magnitudes[ops] * torch.where(negative & SIGNED[ops], -1.0, 1.0)


def inverse_matrices(ops: torch.Tensor, magnitudes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pillow's inverse affine matrices of geometric ops, as torchvision's RandAugment builds them.

    ShearX/ShearY shear about the top-left corner, TranslateX/Y shift by the magnitude truncated to whole pixels,
    Rotate turns counter-clockwise by the magnitude in degrees about the image centre.

    Args:
        ops: int64 ``(M,)`` indices into ``OPS``, each a geometric op (1 .. 5).
        magnitudes: float64 ``(M,)`` signed magnitudes.
        height: image height.
        width: image width.

    Returns:
        float64 ``(M, 2, 3)``: output pixel centre -> source point.
    """
    m = magnitudes.to(torch.float64)
    a = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64).repeat(len(ops), 1)
    a[:, 1] = torch.where(ops == 1, m, 0.0)  # ShearX: u = x + m y
    a[:, 3] = torch.where(ops == 2, m, 0.0)  # ShearY: v = m x + y
    shift = -m.trunc()  # torchvision passes int(magnitude) pixels
    a[:, 2] = torch.where(ops == 3, shift, 0.0)
    a[:, 5] = torch.where(ops == 4, shift, 0.0)
    rotate = ops == 5
    if rotate.any():
        # Image.rotate: the inverse turn by -angle about (W/2, H/2).
        theta = -torch.deg2rad(m[rotate])
        cos, sin = theta.cos(), theta.sin()
        cx, cy = width / 2, height / 2
        a[rotate] = torch.stack([cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy], dim=1)
    return a.view(-1, 2, 3)


def rand_augment(images: torch.Tensor, ops: torch.Tensor, magnitudes: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Apply drawn RandAugment ops, slot after slot, each op to the images that drew it.

    Args:
        images: uint8 ``(N, C, H, W)`` on any device.
        ops: int64 ``(num_ops, N)`` on the CPU, from ``draw_ops``.
        magnitudes: float64 ``(num_ops, N)`` on the CPU, from ``draw_ops``.
        fill: uint8 ``(C,)`` on the images' device.

    Returns:
        uint8 ``(N, C, H, W)``.
    """
    for slot_ops, slot_magnitudes in zip(ops, magnitudes):
        images = _apply_slot(images, slot_ops, slot_magnitudes, fill)
    return images


def _apply_slot(images: torch.Tensor, ops: torch.Tensor, magnitudes: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    device, (_, _, height, width) = images.device, images.shape
    # Sort by op (on the CPU, where the draws live): each op's images form one slice, sized without a device sync.
    order = torch.argsort(ops, stable=True)
    ops, magnitudes = ops[order], magnitudes[order]
    ends = torch.bincount(ops, minlength=len(OPS)).cumsum(0).tolist()
    starts = [0, *ends[:-1]]
    enhance = torch.isin(ops, torch.tensor(_ENHANCE))
    params = torch.where(enhance, 1.0 + magnitudes, torch.where(ops == 11, 255.0 * magnitudes, magnitudes))
    params = params.to(device, non_blocking=True)
    x = images.index_select(0, order.to(device, non_blocking=True))
    chunks = [x[: ends[0]]]  # Identity
    lo, hi = starts[_GEOMETRIC[0]], ends[_GEOMETRIC[1] - 1]
    if hi > lo:
        inverse = inverse_matrices(ops[lo:hi], magnitudes[lo:hi], height, width)
        chunks.append(kernels.affine_nearest(x[lo:hi], inverse.to(device, non_blocking=True), fill))
    for k, kernel in _KERNELS.items():
        if ends[k] > starts[k]:
            chunks.append(kernel(x[starts[k] : ends[k]], params[starts[k] : ends[k]]))
    unsort = torch.empty_like(order)
    unsort[order] = torch.arange(len(order))
    return torch.cat(chunks).index_select(0, unsort.to(device, non_blocking=True))


class BatchView:
    """A ``ViewSpec`` run on uint8 ``(N, C, H, W)`` batches: flip, reflect-pad crop, [RandAugment, Cutout], Normalize.

    Args:
        spec: the view; its crop must be ``"pad"`` (the batches are the cache's arrays, all of one size).
    """

    def __init__(self, spec: ViewSpec):
        if spec.crop != "pad":
            raise ValueError(f"batched views take reflect-padded crops of cached arrays, not {spec.crop!r} crops")
        self.spec = spec
        self.size, self.hflip, self.padding = spec.size, spec.hflip, spec.padding
        self.randaug_n, self.randaug_m, self.cutout = spec.randaug_n, spec.randaug_m, spec.cutout
        self._magnitudes = op_magnitudes(self.randaug_m, self.size, self.size)  # RandAugment sees the crop
        mean, std = (torch.tensor(list(v), dtype=torch.float32).view(-1, 1, 1) for v in (spec.mean, spec.std))
        self._stats = (mean, std, torch.tensor(spec.fill, dtype=torch.uint8))
        self._on: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _device_stats(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        # mean, std, fill: copied to each device once, not per batch.
        if device not in self._on:
            self._on[device] = tuple(t.to(device) for t in self._stats)
        return self._on[device]

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a batch.

        Args:
            images: uint8 ``(N, C, H, W)`` on the training device.
            generator: CPU generator; every random draw comes from it.

        Returns:
            float32 ``(N, C, image_size, image_size)``, normalized, on the images' device.
        """
        n, _, height, width = images.shape
        mean, std, fill = self._device_stats(images.device)
        # Draw everything first (flip, crop, ops, Cutout): the same order for every batch of a given shape.
        flip = torch.rand(n, generator=generator) < 0.5 if self.hflip else torch.zeros(n, dtype=torch.bool)
        top = torch.randint(height + 2 * self.padding - self.size + 1, (n,), generator=generator)
        left = torch.randint(width + 2 * self.padding - self.size + 1, (n,), generator=generator)
        ops, signed = draw_ops(generator, n, self.randaug_n, self._magnitudes)
        centre = torch.randint(self.size, (2, n), generator=generator) if self.cutout > 0 else None
        x = self._crop_flip(images, flip, top, left)
        x = rand_augment(x, ops, signed, fill)
        if centre is not None:
            cy, cx = centre.to(images.device, non_blocking=True)
            x = kernels.cutout(x, cy, cx, self.cutout, fill)
        return kernels.normalize(x, mean, std)

    def _crop_flip(
        self, images: torch.Tensor, flip: torch.Tensor, top: torch.Tensor, left: torch.Tensor
    ) -> torch.Tensor:
        """Flip, then crop the reflect-padded image: one gather, as ``RandomFlip`` + ``ReflectPadCrop``."""
        n, _, height, width = images.shape
        if min(height, width) + 2 * self.padding < self.size:
            raise ValueError(f"a {height}x{width} image padded by {self.padding} is smaller than the crop {self.size}")
        device, span = images.device, torch.arange(self.size)
        rows = reflect_index(height, self.padding)[top.view(-1, 1) + span]  # (N, S), CPU: built from (N,) draws
        cols = reflect_index(width, self.padding)[left.view(-1, 1) + span]
        # The reflection of a flipped image is the flipped reflection: column c of the flip is column W-1-c.
        cols = torch.where(flip.view(-1, 1), width - 1 - cols, cols)
        rows = rows.to(device, non_blocking=True).view(n, -1, 1).expand(n, self.size, self.size)
        cols = cols.to(device, non_blocking=True).view(n, 1, -1).expand(n, self.size, self.size)
        return kernels.gather_pixels(images, rows, cols)

    def __repr__(self) -> str:
        return f"BatchView({self.spec!r})"
