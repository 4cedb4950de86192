"""Built-in image classifiers: small residual conv nets for 1- or 3-channel images of any size.

They are architectures, not pretrained weights: a recipe trains the teacher (`finetune`) and
distills a narrower student into the same family. Residual adds and batch norm are there on
purpose: they are what real CNNs look like to export, quantization and channel pruning.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_NAME = "pixel_values"


class _Block(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (1x1 conv when the shape changes), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ConvNet(nn.Module):
    """Stem, then one stage per width (stride 2 between stages), global average pool, linear head."""

    def __init__(
        self, num_classes: int, in_channels: int = 1, widths: tuple[int, ...] = (32, 64, 128), blocks: int = 1
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        stages = []
        previous = widths[0]
        for i, width in enumerate(widths):
            layers = [_Block(previous, width, 1 if i == 0 else 2)]
            layers += [_Block(width, width, 1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            previous = width
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(previous, num_classes)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every stage (what the hidden-state KD loss compares)."""
        out = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixel_values)[-1].mean(dim=(2, 3)))


def conv_net(
    num_classes: int, in_channels: int = 1, widths: list[int] | tuple[int, ...] = (32, 64, 128), blocks: int = 1
) -> ConvNet:
    """The factory recorded in artifact metadata (`edgepipe.runtime.cnn:conv_net`)."""
    return ConvNet(num_classes, in_channels, tuple(widths), blocks)
