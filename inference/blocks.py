"""The residual block Res-MTNet is built from (MONAI's ResNetBlock shape, in 3D)."""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlock3d(nn.Module):
    """conv-norm-act-conv-norm plus a skip; a strided 1x1x1 projection when shapes change.

    The identity path keeps gradients alive through the shared trunk, which every task head
    trains at once: the property of the seed paper that this block exists to keep.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.norm1 = nn.BatchNorm3d(out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.norm2 = nn.BatchNorm3d(out_channels)
        self.act = nn.ReLU(inplace=True)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.skip = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm3d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.skip(x))


def make_stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    """One resolution level: a (strided) block that changes shape, then identity blocks."""
    layers = [ResidualBlock3d(in_channels, out_channels, stride)]
    layers += [ResidualBlock3d(out_channels, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)
