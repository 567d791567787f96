"""SFE's inverter (official `Inverter`): `fs_backbone` maps an image to W+ codes and a predicted F-space feature,
`fuser` merges that feature with the generator's own feature for the codes.

The backbone is ArcFace's IResNet-50 (official `FSLikeBackbone`): a stem, four stages of improved basic blocks, with
the third stage's stride set to 1 so that it ends at 64x64 for a 256x256 input (the resolution of the feature SFE
replaces). From the third stage a `content_layer` predicts the feature; every stage's output, average-pooled to 3x3
and concatenated, feeds one linear head per style code.

    256x256 -> stem 64@256 -> block_1 64@128 -> block_2 128@64 -> block_3 256@64 -> block_4 512@32   (default widths)
                                                         content_layer(block_3) -> 512@64

Names match the official state dicts (`fs_backbone.conv.*`, `fs_backbone.block_N.*`, `fs_backbone.content_layer.*`,
`fs_backbone.styles.N.*`, `fuser.*`). Input: [B, 3, 256, 256] in [-1, 1]. Codes come out without latent_avg.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..hyperstyle import fused_backbones
from .feature_editor import FeatureStack, FeatureStackConfig

STAGE_STRIDES = (2, 2, 1, 2)  # IResNet's are all 2; SFE keeps block_3 at the input's resolution / 4
POOLED = 3  # every stage's output is average-pooled to 3x3 for the style heads


@dataclass(frozen=True)
class InverterConfig:
    n_styles: int
    style_dim: int = 512
    widths: tuple = (64, 128, 256, 512)  # IResNet-50 stages
    units: tuple = (3, 4, 14, 3)
    content_channels: int = 512  # the predicted feature
    fuser: FeatureStackConfig = FeatureStackConfig()

    @property
    def head_features(self) -> int:
        return sum(self.widths) * POOLED * POOLED


class ImprovedBasicBlock(nn.Module):
    """ArcFace's IBasicBlock: BN -> conv3x3 -> BN -> PReLU -> conv3x3 (stride) -> BN, plus the (projected) input."""

    def __init__(self, in_channels: int, channels: int, stride: int, project: bool):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.downsample = (nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                         nn.BatchNorm2d(channels)) if project else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_backbones.applies(self, x):  # GPU inference with the Triton kernels
            return fused_backbones.improved_basic_block(self, x)
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class FSBackbone(nn.Module):
    def __init__(self, config: InverterConfig):
        super().__init__()
        w = config.widths
        self.conv = nn.Sequential(nn.Conv2d(3, w[0], 3, 1, 1, bias=False), nn.BatchNorm2d(w[0]), nn.PReLU(w[0]))
        in_channels = w[0]
        for stage, (width, n, stride) in enumerate(zip(w, config.units, STAGE_STRIDES), start=1):
            # every stage's first block projects its input (IResNet's strides are all 2, so the file always has one)
            blocks = [ImprovedBasicBlock(in_channels if j == 0 else width, width, stride if j == 0 else 1, j == 0)
                      for j in range(n)]
            setattr(self, f"block_{stage}", nn.Sequential(*blocks))
            in_channels = width
        c = config.content_channels
        self.content_layer = nn.Sequential(
            nn.BatchNorm2d(w[2]), nn.Conv2d(w[2], c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.PReLU(c),
            nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))
        self.avg_pool = nn.AdaptiveAvgPool2d((POOLED, POOLED))
        self.styles = nn.ModuleList([nn.Linear(config.head_features, config.style_dim)
                                     for _ in range(config.n_styles)])

    def forward(self, x: torch.Tensor) -> tuple:
        """[B, 3, 256, 256] in [-1, 1] -> (codes [B, n_styles, style_dim] without latent_avg, feature [B, C, 64, 64])."""
        fused = fused_backbones.applies(self, x)  # GPU inference with the Triton kernels
        x = self.block_1(fused_backbones.stem(self.conv, x) if fused else self.conv(x))
        pooled = [self.avg_pool(x)]
        x = self.block_2(x)
        pooled.append(self.avg_pool(x))
        x = self.block_3(x)
        pooled.append(self.avg_pool(x))
        content = fused_backbones.pre_activated_pair(self.content_layer, x) if fused else self.content_layer(x)
        x = self.block_4(x)
        pooled.append(self.avg_pool(x))
        flat = torch.cat(pooled, dim=1).flatten(1)
        return torch.stack([head(flat) for head in self.styles], dim=1), content


class Inverter(nn.Module):
    def __init__(self, config: InverterConfig):
        super().__init__()
        self.config = config
        self.fs_backbone = FSBackbone(config)
        self.fuser = FeatureStack(config.fuser)
