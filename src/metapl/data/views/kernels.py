"""Pixel kernels on uint8 ``(N, C, H, W)`` batches (C = 1 or 3), each image with its own parameters.

The per-batch backend of the views (``per_batch.py``) is built from these. Each kernel reproduces the pixel arithmetic
of the Pillow path that the per-image backend (``per_image.py``) runs (torchvision's RandAugment on a Pillow image), so
the two paths give the same views for the same random draws:

- geometry: Pillow samples output pixel ``(x, y)`` at the source point ``A @ (x + 0.5, y + 0.5, 1)`` of the inverse
  affine matrix ``A`` and takes the pixel that contains it (nearest), painting ``fill`` outside the image;
- ``Image.blend`` (Brightness, Color, Contrast, Sharpness) computes ``a + f * (b - a)`` in float32 and truncates;
- the grayscale of an RGB image is Pillow's ``(19595 R + 38470 G + 7471 B + 2**15) >> 16``;
- AutoContrast and Equalize build Pillow's per-channel lookup tables from each image's histogram.

Parameters arrive as tensors on the images' device; no kernel reads a value back to the host.
"""

from __future__ import annotations

import torch


def gather_pixels(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``out[n, c, i, j] = images[n, c, rows[n, i, j], cols[n, i, j]]`` as one gather.

    Args:
        images: uint8 ``(N, C, H, W)``.
        rows: int64 ``(N, Ho, Wo)`` source rows, in ``[0, H)``.
        cols: int64 ``(N, Ho, Wo)`` source columns, in ``[0, W)``.

    Returns:
        ``(N, C, Ho, Wo)`` of the images' dtype.
    """
    n, c, h, w = images.shape
    flat = (rows * w + cols).view(n, 1, -1).expand(n, c, -1)  # (N, C, Ho*Wo)
    return images.reshape(n, c, h * w).gather(2, flat).view(n, c, *rows.shape[1:])


def affine_nearest(images: torch.Tensor, inverse: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Pillow's ``Image.transform(AFFINE, NEAREST)`` of each image by its own inverse matrix.

    Args:
        images: uint8 ``(N, C, H, W)``.
        inverse: float64 ``(N, 2, 3)``: output pixel centre ``(x + 0.5, y + 0.5)`` -> source point ``(u, v)``.
        fill: uint8 ``(C,)``, painted where the source point falls outside the image.

    Returns:
        uint8 ``(N, C, H, W)``.
    """
    n, _, h, w = images.shape
    # float64: a source point within float32 rounding of a pixel edge would otherwise pick the neighbour Pillow's
    # double-precision (or 16.16 fixed-point) arithmetic picks less often.
    ys = torch.arange(h, device=images.device, dtype=torch.float64) + 0.5
    xs = torch.arange(w, device=images.device, dtype=torch.float64) + 0.5
    a = inverse.to(images.device, torch.float64).view(n, 6, 1, 1)
    u = (a[:, 0] * xs.view(1, 1, w) + a[:, 1] * ys.view(1, h, 1) + a[:, 2]).floor()  # (N, H, W)
    v = (a[:, 3] * xs.view(1, 1, w) + a[:, 4] * ys.view(1, h, 1) + a[:, 5]).floor()
    inside = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    out = gather_pixels(images, v.clamp(0, h - 1).long(), u.clamp(0, w - 1).long())
    return torch.where(inside.unsqueeze(1), out, fill.view(1, -1, 1, 1))


def blend(degenerate: torch.Tensor, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's ``Image.blend(degenerate, image, factor)``: ``degenerate + factor * (image - degenerate)``.

    Args:
        degenerate: uint8 or float, broadcastable to ``images``.
        images: uint8 ``(N, C, H, W)``.
        factor: ``(N,)`` per-image factors (Pillow takes them as float32).

    Returns:
        uint8 ``(N, C, H, W)``, truncated and clipped to [0, 255] as Pillow does.
    """
    f = factor.to(torch.float32).view(-1, 1, 1, 1)
    base = degenerate.to(torch.float32)
    # Two roundings (product, then sum), as Pillow's C code: a fused multiply-add could differ in the last bit.
    out = base + f * (images.to(torch.float32) - base)
    return out.clamp_(0, 255).to(torch.uint8)  # float -> uint8 truncates, like Pillow's (UINT8) cast


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """Pillow's ``convert("L")``: uint8 ``(N, 3, H, W)`` -> uint8 ``(N, 1, H, W)``; 1-channel images as they are."""
    if images.shape[1] == 1:
        return images
    r, g, b = images.to(torch.int32).unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8).unsqueeze(1)


def brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Brightness``: blend with black. ``factor``: ``(N,)``."""
    return blend(torch.zeros((), device=images.device), images, factor)


def color(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Color``: blend with the grayscale copy (a no-op on 1-channel images). ``factor``: ``(N,)``."""
    if images.shape[1] == 1:
        return images
    return blend(grayscale(images), images, factor)


def contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Contrast``: blend with the image's mean gray level, rounded half up. ``factor``: ``(N,)``."""
    gray = grayscale(images)
    mean = gray.flatten(1).to(torch.float64).mean(1)  # Pillow: sum(i * hist[i]) / count, in double
    return blend((mean + 0.5).floor().view(-1, 1, 1, 1), images, factor)


def sharpness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Sharpness``: blend with Pillow's SMOOTH filter, whose border pixels stay unfiltered.

    Args:
        images: uint8 ``(N, C, H, W)``.
        factor: ``(N,)``.

    Returns:
        uint8 ``(N, C, H, W)``.
    """
    x = images.to(torch.int32)
    # SMOOTH: 3x3 weights 1 with 5 at the centre, over 13, rounded. Pillow sums float32 weights of 1/13 and adds 0.5
    # before truncating; an integer sum S gives S / 13 a fraction k / 13, never within float error of 1/2, so the
    # integer rounding (2S + 13) // 26 is the same value, and it is exact on every device (no TF32 convolution).
    total = 4 * x[:, :, 1:-1, 1:-1]  # + 1 from the 3x3 sum below: 5 at the centre
    for dy in range(3):
        for dx in range(3):
            total = total + x[:, :, dy : dy + x.shape[2] - 2, dx : dx + x.shape[3] - 2]
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = (2 * total + 13) // 26
    return blend(degenerate, images, factor)


def posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the ``bits`` (``(N,)``, 1..8) highest bits of every value."""
    mask = (255 - (2 ** (8 - bits.to(torch.int32)) - 1)).to(torch.uint8)
    return images & mask.view(-1, 1, 1, 1)


def solarize(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert every value ``>= threshold`` (``(N,)``, in [0, 255]), as ``ImageOps.solarize``."""
    above = images.to(torch.float64) >= threshold.view(-1, 1, 1, 1)
    return torch.where(above, 255 - images, images)


def autocontrast(images: torch.Tensor) -> torch.Tensor:
    """``ImageOps.autocontrast``: stretch each channel's [min, max] to [0, 255]; a flat channel stays as it is."""
    low = images.amin((2, 3), keepdim=True).to(torch.float64)
    high = images.amax((2, 3), keepdim=True).to(torch.float64)
    flat = high <= low
    # A full tensor divided, not the number 255.0: torch computes number / tensor as number * (1 / tensor), one
    # rounding more than Pillow's Python division, and a value like 84.99999 then truncates to 85 instead of 84.
    scale = torch.full_like(high, 255.0) / torch.where(flat, 1.0, high - low)
    # Pillow's table entry is int(ix * scale + offset) with offset = -lo * scale, in double: the same two roundings.
    stretched = (images.to(torch.float64) * scale + (-low * scale)).trunc_().clamp_(0, 255).to(torch.uint8)
    return torch.where(flat, images, stretched)


def equalize(images: torch.Tensor) -> torch.Tensor:
    """``ImageOps.equalize``: per channel, Pillow's histogram-equalisation table.

    Pillow's table: ``step = (count - count of the highest occupied value) // 255``; value ``i`` maps to
    ``(step // 2 + number of pixels below i) // step``, capped at 255; a channel with one occupied value, or
    ``step == 0``, stays.

    Args:
        images: uint8 ``(N, C, H, W)``.

    Returns:
        uint8 ``(N, C, H, W)``.
    """
    n, c, h, w = images.shape
    values = images.reshape(n * c, h * w).long()
    offsets = torch.arange(n * c, device=images.device).view(-1, 1) * 256
    hist = torch.bincount((values + offsets).flatten(), minlength=n * c * 256).view(n * c, 256)
    occupied = hist > 0
    top = torch.where(occupied, torch.arange(256, device=images.device), -1).amax(1, keepdim=True)
    step = (h * w - hist.gather(1, top)) // 255  # (N*C, 1)
    below = hist.cumsum(1) - hist  # pixels strictly below each value
    table = ((step // 2 + below) // step.clamp(min=1)).clamp_(max=255)
    keep = (occupied.sum(1, keepdim=True) <= 1) | (step == 0)
    table = torch.where(keep, torch.arange(256, device=images.device), table)
    return table.gather(1, values).to(torch.uint8).view(n, c, h, w)


def cutout(images: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, size: int, fill: torch.Tensor) -> torch.Tensor:
    """Fill a ``size``-sided square centred at ``(cy, cx)`` (``(N,)`` each), clipped at the borders, with ``fill``.

    The square spans rows ``[cy - size // 2, cy - size // 2 + size)``, as ``per_image.Cutout``.

    Args:
        images: uint8 ``(N, C, H, W)``.
        cy: int64 ``(N,)`` centre rows.
        cx: int64 ``(N,)`` centre columns.
        size: side of the square; 0 leaves the images as they are.
        fill: uint8 ``(C,)``.

    Returns:
        uint8 ``(N, C, H, W)``.
    """
    if size <= 0:
        return images
    _, _, h, w = images.shape
    y0, x0 = (cy - size // 2).view(-1, 1, 1, 1), (cx - size // 2).view(-1, 1, 1, 1)
    rows = torch.arange(h, device=images.device).view(1, 1, h, 1)
    cols = torch.arange(w, device=images.device).view(1, 1, 1, w)
    inside = (rows >= y0) & (rows < y0 + size) & (cols >= x0) & (cols < x0 + size)
    return torch.where(inside, fill.view(1, -1, 1, 1), images)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` -> float32 ``(x / 255 - mean) / std``, the same operations as ``ToNormalizedFloat``.

    Args:
        images: uint8 ``(N, C, H, W)``.
        mean: float32 ``(C, 1, 1)`` on the images' device, in [0, 1] units.
        std: float32 ``(C, 1, 1)``.

    Returns:
        float32 ``(N, C, H, W)``.
    """
    return images.to(torch.float32).mul_(1 / 255).sub_(mean).div_(std)
