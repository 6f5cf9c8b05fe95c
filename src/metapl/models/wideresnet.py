"""WideResNet as used by the Meta Pseudo Labels and FixMatch CIFAR recipes (WRN-28-2, WRN-28-8).

Differences from the original WideResNet (Zagoruyko & Komodakis) follow the TensorFlow code of those papers:
leaky ReLU with slope 0.1, BatchNorm with TF decay 0.99 (PyTorch momentum 0.01), the very first block feeds its
pre-activation to the shortcut too (``activate_before_residual``), and dropout sits only before the classifier.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from metapl.models.registry import register_model

LEAKY_SLOPE = 0.1


class _PreActBlock(nn.Module):
    """Pre-activation basic block: BN-act-conv3x3-BN-act-conv3x3 plus a shortcut."""

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, bn_momentum: float, activate_before_residual: bool
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch, momentum=bn_momentum)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)
        self.activate_before_residual = activate_before_residual
        # A 1x1 projection only where the shape changes; otherwise the identity keeps gradients flowing unchanged.
        needs_projection = in_ch != out_ch or stride != 1
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = self.act(self.bn1(x))  # (B, in_ch, H, W)
        # As in the TF reference: the residual branch always starts from the pre-activation, the shortcut only in the
        # very first block (right after the stem conv, whose raw output has not been normalised yet).
        shortcut_in = preact if self.activate_before_residual else x
        out = self.conv1(preact)  # (B, out_ch, H/stride, W/stride)
        out = self.conv2(self.act(self.bn2(out)))
        shortcut = shortcut_in if self.shortcut is None else self.shortcut(shortcut_in)
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-depth-widen for small images (CIFAR recipe); global average pooling makes any size ≥ 8 work.

    Args:
        depth: Total depth; ``(depth - 4)`` must be divisible by 6 (28 gives 4 blocks per group).
        widen: Width multiplier of the three groups (16, 32, 64 channels times ``widen``).
        num_classes: Number of output logits.
        in_channels: Channels of the input images.
        dropout: Dropout probability before the final linear layer.
        bn_momentum: PyTorch BatchNorm momentum (``1 - TF decay``).
    """

    def __init__(
        self,
        depth: int = 28,
        widen: int = 2,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
        bn_momentum: float = 0.01,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n+4 with n ≥ 1, got {depth}")
        blocks_per_group = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        groups = []
        for g, stride in enumerate((1, 2, 2)):
            blocks = [
                _PreActBlock(
                    widths[g] if i == 0 else widths[g + 1],
                    widths[g + 1],
                    stride if i == 0 else 1,
                    bn_momentum,
                    activate_before_residual=g == 0 and i == 0,
                )
                for i in range(blocks_per_group)
            ]
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(widths[3], momentum=bn_momentum)
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(widths[3], num_classes)
        self.num_features = widths[3]
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=LEAKY_SLOPE, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(self.stem(x))  # (B, 64*widen, H/4, W/4)
        x = self.pool(self.act(self.bn(x))).flatten(1)  # (B, 64*widen)
        return self.fc(self.dropout(x))  # (B, num_classes)


@register_model("wrn28_2")
def wrn28_2(*, num_classes: int, in_channels: int = 3, dropout: float = 0.0, **kwargs: Any) -> WideResNet:
    """WRN-28-2 (1.5M parameters), the CIFAR-10 / SVHN model of Meta Pseudo Labels and FixMatch.

    Args:
        num_classes: Number of output logits.
        in_channels: Channels of the input images.
        dropout: Dropout probability before the final linear layer.
        **kwargs: Passed to :class:`WideResNet` (e.g. ``bn_momentum``).

    Returns:
        The model.
    """
    return WideResNet(28, 2, num_classes=num_classes, in_channels=in_channels, dropout=dropout, **kwargs)


@register_model("wrn28_8")
def wrn28_8(*, num_classes: int, in_channels: int = 3, dropout: float = 0.0, **kwargs: Any) -> WideResNet:
    """WRN-28-8 (23M parameters), the CIFAR-100 model of Meta Pseudo Labels and FixMatch.

    Args:
        num_classes: Number of output logits.
        in_channels: Channels of the input images.
        dropout: Dropout probability before the final linear layer.
        **kwargs: Passed to :class:`WideResNet` (e.g. ``bn_momentum``).

    Returns:
        The model.
    """
    return WideResNet(28, 8, num_classes=num_classes, in_channels=in_channels, dropout=dropout, **kwargs)
