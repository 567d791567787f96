"""The residual convolution stack SFE uses twice on F-space features (official `ContentLayerDeepFast`):

- the inverter's *fuser*: [its predicted feature, the generator's own feature for the codes] -> the fused feature;
- the *feature editor*: [fused feature, delta] -> the edited feature, delta being how an edit moves e4e's feature.

    x = conv1x1(input); then for each block: x = x + block(x)
    block = BN -> conv3x3 -> BN -> PReLU -> conv3x3 -> BN        (no biases in the 3x3 convolutions)

Names match the official state dicts (`conv.*`, `body.N.body.M.*`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..hyperstyle import fused_backbones


@dataclass(frozen=True)
class FeatureStackConfig:
    in_channels: int = 1024
    channels: int = 512
    blocks: int = 5  # the official ContentLayerDeepFast(len=6) has len - 1 residual blocks


class ResidualFeatureBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.PReLU(channels),
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class FeatureStack(nn.Module):
    def __init__(self, config: FeatureStackConfig):
        super().__init__()
        self.config = config
        self.conv = nn.Conv2d(config.in_channels, config.channels, 1)
        self.body = nn.ModuleList([ResidualFeatureBlock(config.channels) for _ in range(config.blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_backbones.applies(self, x):  # GPU inference with the Triton kernels
            return fused_backbones.feature_stack(self, x)
        x = self.conv(x)
        for block in self.body:
            x = x + block(x)
        return x
