"""Two small-image models: ``small_cnn`` for quick CPU runs and ``resnet18_cifar`` (ResNet-18 with a CIFAR stem)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from metapl.models.registry import register_model

LEAKY_SLOPE = 0.1


def _conv_bn_act(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
    ]


class SmallCNN(nn.Module):
    """Three conv stages with 2×2 max-pools between them, global average pooling, dropout and a linear classifier.

    Built to make 2-core CPU runs on 32×32 images practical; it also takes 28×28 and 8×8 inputs because a pool is
    skipped whenever it would shrink the feature map below 2×2. The defaults are sized by measurement: one
    forward+backward of 512 images of 32×32 takes about 0.45 s on 2 CPU cores, where (32, 64, 128) channels with two
    convs per stage took about 2 s; most of the cost is at full resolution, hence a single conv in the first stage.

    Args:
        num_classes: Number of output logits.
        in_channels: Channels of the input images.
        dropout: Dropout probability before the final linear layer.
        widths: Channels of each stage.
        convs_per_stage: conv-BN-leaky-ReLU units in each stage (same length as ``widths``).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
        widths: tuple[int, ...] = (16, 32, 64),
        convs_per_stage: tuple[int, ...] = (1, 2, 2),
    ) -> None:
        super().__init__()
        if len(widths) != len(convs_per_stage):
            raise ValueError(f"widths {widths} and convs_per_stage {convs_per_stage} must have the same length")
        stages = []
        prev = in_channels
        for width, num_convs in zip(widths, convs_per_stage):
            layers = []
            for _ in range(num_convs):
                layers += _conv_bn_act(prev, width)
                prev = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(prev, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=LEAKY_SLOPE, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, stage in enumerate(self.stages):
            # A Python branch on the shape: fine in eager mode, and torch.compile specialises on the input size anyway.
            if i > 0 and min(x.shape[-2:]) >= 4:
                x = self.pool(x)  # (B, C, H/2, W/2)
            x = stage(x)
        x = x.mean(dim=(2, 3))  # (B, widths[-1]); global average pooling
        return self.fc(self.dropout(x))  # (B, num_classes)


class _BasicBlock(nn.Module):
    """Post-activation ResNet basic block (He et al. 2016): conv-BN-ReLU-conv-BN plus shortcut, then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU(inplace=True)
        if stride != 1 or in_ch != out_ch:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))  # (B, out_ch, H/stride, W/stride)
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNet18Cifar(nn.Module):
    """ResNet-18 for 32×32 images: a 3×3 stride-1 stem and no max-pool, so the last stage still sees 4×4 maps.

    Args:
        num_classes: Number of output logits.
        in_channels: Channels of the input images.
        dropout: Dropout probability before the final linear layer.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
        layers = []
        prev = 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_BasicBlock(prev, width, stride), _BasicBlock(width, width, 1)]
            prev = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))  # (B, 512, H/8, W/8)
        x = self.pool(x).flatten(1)  # (B, 512)
        return self.fc(self.dropout(x))  # (B, num_classes)


@register_model("small_cnn")
def small_cnn(*, num_classes: int, in_channels: int = 3, dropout: float = 0.0, **kwargs: Any) -> SmallCNN:
    """A small CNN (70k parameters) for fast CPU runs; see :class:`SmallCNN`.

    Args:
        num_classes: Number of output logits.
        in_channels: Channels of the input images.
        dropout: Dropout probability before the final linear layer.
        **kwargs: Passed to :class:`SmallCNN` (``widths``, ``convs_per_stage``).

    Returns:
        The model.
    """
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, dropout=dropout, **kwargs)


@register_model("resnet18_cifar")
def resnet18_cifar(*, num_classes: int, in_channels: int = 3, dropout: float = 0.0, **kwargs: Any) -> ResNet18Cifar:
    """ResNet-18 (11M parameters) with a CIFAR stem; see :class:`ResNet18Cifar`.

    Args:
        num_classes: Number of output logits.
        in_channels: Channels of the input images.
        dropout: Dropout probability before the final linear layer.
        **kwargs: Passed to :class:`ResNet18Cifar`.

    Returns:
        The model.
    """
    return ResNet18Cifar(num_classes=num_classes, in_channels=in_channels, dropout=dropout, **kwargs)
