"""Initial encoders: image -> W+ offsets from latent_avg. Codes are `latent_avg + encoder(x)`.

- `WEncoder`: HyperStyle's W-encoder (`faces_w_encoder.pt`): IR-SE-50 -> global pool -> one W code for every style.
- `E4EEncoder`: e4e's `Encoder4Editing` (`e4e_ffhq_encode.pt`): IR-SE-50 with an FPN; style 0 from the coarse map,
  styles 1.. add deltas from coarse/middle/fine maps. With `progressive=False` it is pSp's `GradualStyleEncoder`
  (every style predicted directly), which shares the same weights layout.

Names match the `encoder.*` keys of the released checkpoints. Input: [B, 3, 256, 256] in [-1, 1].
IR-SE-50 shapes (default widths): 256x256 -> body stages 64@128, 128@64, 256@32, 512@16.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...stylegan2.generator import EqualLinear, fused
from . import fused_backbones


@dataclass(frozen=True)
class EncoderConfig:
    kind: str  # "w_encoder" | "e4e" | "psp"
    n_styles: int
    style_dim: int = 512
    widths: tuple = (64, 128, 256, 512)  # IR-SE-50 stages
    units: tuple = (3, 4, 14, 3)
    input_nc: int = 3

    @property
    def stage_ends(self) -> list:
        """Index in `body` of the last unit of each stage (2, 6, 20, 23 for IR-SE-50)."""
        ends, total = [], 0
        for n in self.units:
            total += n
            ends.append(total - 1)
        return ends


class SEModule(nn.Module):
    """Squeeze-and-excitation: channel gates from the globally pooled features."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, max(1, channels // reduction), kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(max(1, channels // reduction), channels, kernel_size=1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class BottleneckIRSE(nn.Module):
    """ArcFace's improved-residual unit with SE (`bottleneck_IR_SE` in the official code)."""

    def __init__(self, in_channel: int, depth: int, stride: int):
        super().__init__()
        if in_channel == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)  # identity, or plain subsampling when stride is 2
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channel, depth, 1, stride, bias=False),
                                                nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel),
            nn.Conv2d(in_channel, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SEModule(depth, 16),
        )

    def forward(self, x):
        return self.res_layer(x) + self.shortcut_layer(x)


class IRSEBackbone(nn.Module):
    """input_layer + body of IR-SE-50; `forward` returns the output of every stage."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        w = config.widths
        self.stage_ends = config.stage_ends
        self.input_layer = nn.Sequential(nn.Conv2d(config.input_nc, w[0], 3, 1, 1, bias=False),
                                         nn.BatchNorm2d(w[0]), nn.PReLU(w[0]))
        units, in_ch = [], w[0]
        for width, n in zip(w, config.units):
            for j in range(n):
                units.append(BottleneckIRSE(in_ch, width, 2 if j == 0 else 1))
                in_ch = width
        self.body = nn.Sequential(*units)

    def stages(self, x: torch.Tensor) -> list:
        if fused_backbones.applies(self, x):  # GPU inference with the Triton kernels
            return fused_backbones.irse_stages(self, x)
        return _stages(self, x)


@fused
def _stages(backbone: IRSEBackbone, x: torch.Tensor) -> list:
    """IR-SE-50's output at the end of each stage. Compiled on CUDA (see `fused`): batch norm, PReLU, the
    squeeze-and-excitation gates and the residual additions fuse around the convolutions."""
    x = backbone.input_layer(x)
    outputs = []
    for i, unit in enumerate(backbone.body):
        x = unit(x)
        if i in backbone.stage_ends:
            outputs.append(x)
    return outputs


class WEncoder(IRSEBackbone):
    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        self.config = config
        self.output_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = EqualLinear(config.widths[-1], config.style_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = self.stages(x)[-1]
        w = self.linear(self.output_pool(top).flatten(1))  # [B, style_dim]
        return w[:, None].expand(-1, self.config.n_styles, -1)


class GradualStyleBlock(nn.Module):
    """Feature map (spatial s) -> one style vector: log2(s) stride-2 convs, then an EqualLinear."""

    def __init__(self, in_c: int, out_c: int, spatial: int):
        super().__init__()
        self.out_c = out_c
        n_convs = int(math.log2(spatial))
        modules = [nn.Conv2d(in_c, out_c, 3, stride=2, padding=1), nn.LeakyReLU()]
        for _ in range(n_convs - 1):
            modules += [nn.Conv2d(out_c, out_c, 3, stride=2, padding=1), nn.LeakyReLU()]
        self.convs = nn.Sequential(*modules)
        self.linear = EqualLinear(out_c, out_c)

    def forward(self, x):
        return self.linear(self.convs(x).view(-1, self.out_c))


class E4EEncoder(IRSEBackbone):
    COARSE, MIDDLE = 3, 7  # styles [0, 3) read the 16x16 map, [3, 7) the 32x32 map, the rest the 64x64 map

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        self.config = config
        self.progressive = config.kind == "e4e"
        w, d = config.widths, config.style_dim
        self.styles = nn.ModuleList([
            GradualStyleBlock(w[-1], d, 16 if i < self.COARSE else 32 if i < self.MIDDLE else 64)
            for i in range(config.n_styles)])
        self.latlayer1 = nn.Conv2d(w[2], w[3], kernel_size=1)
        self.latlayer2 = nn.Conv2d(w[1], w[3], kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c1, c2, c3 = self.stages(x)  # 64x64, 32x32, 16x16
        p2 = _upsample_add(c3, self.latlayer1(c2))
        p1 = _upsample_add(p2, self.latlayer2(c1))
        maps = [c3 if i < self.COARSE else p2 if i < self.MIDDLE else p1 for i in range(self.config.n_styles)]
        styles = [block(m) for block, m in zip(self.styles, maps)]
        if self.progressive:  # e4e: style 0 is the base W, the others are deltas from it
            return torch.stack([styles[0]] + [styles[0] + s for s in styles[1:]], dim=1)
        return torch.stack(styles, dim=1)


def _upsample_add(top: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
    return F.interpolate(top, size=lateral.shape[-2:], mode="bilinear", align_corners=True) + lateral


def build_encoder(config: EncoderConfig) -> nn.Module:
    if config.kind == "w_encoder":
        return WEncoder(config)
    if config.kind in ("e4e", "psp"):
        return E4EEncoder(config)
    raise ValueError(f"unknown encoder kind {config.kind!r}")
