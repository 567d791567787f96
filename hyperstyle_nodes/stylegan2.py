"""StyleGAN2 generator in the rosinality layout, in plain PyTorch, with per-sample weight offsets.

Parameter and buffer names match rosinality/stylegan2-pytorch's `Generator`, which is also the layout of the
`decoder.*` weights inside HyperStyle and e4e checkpoints, so their state dicts load with `strict=True`.

Generator layers are numbered the way HyperStyle numbers them (26 for 1024 px):
    0: conv1 (4x4), 1: to_rgb1, then per resolution r = 8, 16, ...: upsampling conv, conv, to_rgb.
A weight offset ("delta") for layer l scales its base weight per sample: W_b = W * (1 + delta_b), before
modulation and demodulation. A delta is either full, [B, out, in, k, k], or compact per (out, in) channel pair,
[B, out, in], which the official code repeats over the k x k kernel; broadcasting gives the same numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

BLUR_KERNEL = (1, 3, 3, 1)
LEAKY_SLOPE = 0.2
ACTIVATION_GAIN = math.sqrt(2.0)


@dataclass(frozen=True)
class GeneratorConfig:
    """Architecture of a generator: output size, style size, mapping depth and channels per resolution."""

    size: int = 1024
    style_dim: int = 512
    n_mlp: int = 8
    channels: tuple = ()  # one entry per resolution 4, 8, ..., size
    lr_mlp: float = 0.01

    @classmethod
    def stylegan2(cls, size: int = 1024, channel_multiplier: int = 2, narrow: float = 1.0,
                  style_dim: int = 512, n_mlp: int = 8) -> "GeneratorConfig":
        """Rosinality's channel table; `narrow` scales every width (tiny models for tests and small domains)."""
        check_size(size)
        table = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier, 128: 128 * channel_multiplier,
                 256: 64 * channel_multiplier, 512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}
        channels = tuple(max(1, int(table[4 << i] * narrow)) for i in range(log2(size) - 1))
        return cls(size=size, style_dim=style_dim, n_mlp=n_mlp, channels=channels)

    @property
    def log_size(self) -> int:
        return log2(self.size)

    @property
    def n_styles(self) -> int:
        """Number of W+ style vectors (18 for 1024 px)."""
        return 2 * self.log_size - 2

    @property
    def n_noises(self) -> int:
        return 2 * (self.log_size - 2) + 1

    @property
    def layer_shapes(self) -> list:
        """(kernel_size, in_channels, out_channels) of every generator layer, in HyperStyle's numbering."""
        c = self.channels
        shapes = [(3, c[0], c[0]), (1, c[0], 3)]
        for i in range(1, len(c)):
            shapes += [(3, c[i - 1], c[i]), (3, c[i], c[i]), (1, c[i], 3)]
        return shapes

    @property
    def to_rgb_layers(self) -> list:
        return [i for i, (k, _, out) in enumerate(self.layer_shapes) if k == 1 and out == 3]


def log2(n: int) -> int:
    return int(round(math.log2(n)))


def check_size(size: int) -> None:
    if size < 8 or size > 1024 or size & (size - 1):
        raise ValueError(f"StyleGAN2 output size must be a power of two between 8 and 1024, got {size}")


# --------------------------------------------------------------------------------------------------------------
# Plain-PyTorch replacements for the two CUDA ops of the official code (upfirdn2d, fused bias + leaky ReLU).


def blur_kernel_2d(taps: Sequence[float] = BLUR_KERNEL, gain: float = 1.0) -> torch.Tensor:
    k = torch.tensor(taps, dtype=torch.float32)
    k = k[None, :] * k[:, None]
    return k / k.sum() * gain


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad=(0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad, convolve with `kernel` (a true convolution, so flipped), downsample."""
    b, c, h, w = x.shape
    if up > 1:
        x = F.pad(x.reshape(b, c, h, 1, w, 1), (0, up - 1, 0, 0, 0, up - 1)).reshape(b, c, h * up, w * up)
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    weight = kernel.flip([0, 1]).to(x.dtype)[None, None].expand(c, 1, *kernel.shape)
    return F.conv2d(x, weight, stride=down, groups=c)


def bias_leaky_relu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """StyleGAN2's fused activation: leaky ReLU(x + bias) scaled by sqrt(2) to keep the signal's magnitude."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return F.leaky_relu(x + bias.view(shape).to(x.dtype), LEAKY_SLOPE) * ACTIVATION_GAIN


class Blur(nn.Module):
    def __init__(self, pad, gain: float = 1.0):
        super().__init__()
        self.register_buffer("kernel", blur_kernel_2d(gain=gain))
        self.pad = pad

    def forward(self, x):
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    """2x FIR upsampling of the RGB skip branch."""

    def __init__(self, factor: int = 2):
        super().__init__()
        self.register_buffer("kernel", blur_kernel_2d(gain=factor ** 2))
        p = len(BLUR_KERNEL) - factor
        self.factor = factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x):
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


# --------------------------------------------------------------------------------------------------------------
# Layers


class PixelNorm(nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class EqualLinear(nn.Module):
    """Linear layer with equalized learning rate: weights stored at unit scale, rescaled at run time."""

    def __init__(self, in_dim: int, out_dim: int, bias_init: float = 0.0, lr_mul: float = 1.0,
                 activation: Optional[str] = None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x):
        if self.activation:
            return bias_leaky_relu(F.linear(x, self.weight * self.scale), self.bias * self.lr_mul)
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class ModulatedConv2d(nn.Module):
    """StyleGAN2's modulated convolution, with an optional per-sample weight offset.

    Without an offset every sample shares one weight, so the style modulates the activations instead of the
    weight and demodulation scales the output (mathematically the same as per-sample weights, but one ordinary
    convolution for the whole batch). With an offset the weights differ per sample and we run a grouped
    convolution over the batch.
    """

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int,
                 demodulate: bool = True, upsample: bool = False):
        super().__init__()
        self.in_channel, self.out_channel, self.kernel_size = in_channel, out_channel, kernel_size
        self.upsample = upsample
        self.demodulate = demodulate
        self.scale = 1 / math.sqrt(in_channel * kernel_size ** 2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1)
        if upsample:
            # transposed conv (stride 2) followed by a blur; pads chosen so the output is exactly 2x the input
            p = (len(BLUR_KERNEL) - 2) - (kernel_size - 1)
            self.blur = Blur(pad=((p + 1) // 2 + 1, p // 2 + 1), gain=4)

    def extra_repr(self):
        return f"{self.in_channel}, {self.out_channel}, k={self.kernel_size}, upsample={self.upsample}"

    def forward(self, x: torch.Tensor, w: torch.Tensor, delta: Optional[torch.Tensor] = None) -> torch.Tensor:
        style = self.modulation(w)  # [B, in]
        if delta is None:
            return self._forward_shared_weight(x, style)
        return self._forward_per_sample_weight(x, style, delta)

    @staticmethod
    def _demodulation(weight_sq_sum: torch.Tensor) -> torch.Tensor:
        """1/||W_b[o]|| per sample and output channel, computed in fp32 (half precision overflows here)."""
        return torch.rsqrt(weight_sq_sum.float() + 1e-8)

    def _forward_shared_weight(self, x, style):
        weight = self.weight[0] * self.scale  # [out, in, k, k]
        x = x * style.to(x.dtype)[:, :, None, None]
        if self.upsample:
            out = F.conv_transpose2d(x, weight.transpose(0, 1).to(x.dtype), stride=2)
        else:
            out = F.conv2d(x, weight.to(x.dtype), padding=self.padding)
        if self.demodulate:
            # sum_{i,k} (W[o,i,k] s_b[i])^2 = sum_i (sum_k W[o,i,k]^2) s_b[i]^2
            w_sq = weight.float().pow(2).sum(dim=[2, 3])  # [out, in]
            demod = self._demodulation(style.float().pow(2) @ w_sq.t())  # [B, out]
            out = out * demod.to(out.dtype)[:, :, None, None]
        if self.upsample:
            out = self.blur(out)
        return out

    def _forward_per_sample_weight(self, x, style, delta):
        batch, in_c, h, w = x.shape
        if delta.ndim == 3:  # compact per-channel offsets: broadcast over the kernel instead of repeating them
            delta = delta[:, :, :, None, None]
        if delta.shape[0] not in (1, batch):
            raise ValueError(f"weight offsets have batch {delta.shape[0]} but the activations have batch {batch}")
        weight = self.scale * (self.weight.float() * (1 + delta.float()) * style.float()[:, None, :, None, None])
        weight = weight.expand(batch, -1, -1, -1, -1)  # [B, out, in, k, k]
        if self.demodulate:
            demod = self._demodulation(weight.pow(2).sum(dim=[2, 3, 4]))
            weight = weight * demod[:, :, None, None, None]
        weight = weight.to(x.dtype)
        k = self.kernel_size
        x = x.reshape(1, batch * in_c, h, w)
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(batch * in_c, self.out_channel, k, k)
            out = F.conv_transpose2d(x, weight, stride=2, groups=batch)
        else:
            weight = weight.reshape(batch * self.out_channel, in_c, k, k)
            out = F.conv2d(x, weight, padding=self.padding, groups=batch)
        out = out.reshape(batch, self.out_channel, *out.shape[2:])
        if self.upsample:
            out = self.blur(out)
        return out


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x, noise):
        return x + self.weight.to(x.dtype) * noise.to(x.dtype)


class ConstantInput(nn.Module):
    def __init__(self, channel: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, batch: int):
        return self.input.expand(batch, -1, -1, -1)


class StyledConv(nn.Module):
    def __init__(self, in_channel, out_channel, kernel_size, style_dim, upsample=False):
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)

    def forward(self, x, w, noise, delta=None):
        return self.activate(self.noise(self.conv(x, w, delta), noise))


class FusedLeakyReLU(nn.Module):
    """Holds the bias of a StyledConv (`activate.bias` in the checkpoints)."""

    def __init__(self, channel: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channel))

    def forward(self, x):
        return bias_leaky_relu(x, self.bias)


class ToRGB(nn.Module):
    def __init__(self, in_channel, style_dim, upsample=True):
        super().__init__()
        if upsample:
            self.upsample = Upsample()
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x, w, skip=None, delta=None):
        out = self.conv(x, w, delta) + self.bias.to(x.dtype)
        if skip is not None:
            out = out + self.upsample(skip)
        return out


# --------------------------------------------------------------------------------------------------------------
# Generator


class Generator(nn.Module):
    """Mapping network (`style.*`) + synthesis network, in rosinality's layout."""

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        check_size(config.size)
        if len(config.channels) != config.log_size - 1:
            raise ValueError(f"config.channels needs {config.log_size - 1} entries for {config.size} px")
        self.config = config
        self.size = config.size
        self.style_dim = config.style_dim
        self.n_styles = config.n_styles
        c = config.channels

        self.style = nn.Sequential(PixelNorm(), *[
            EqualLinear(config.style_dim, config.style_dim, lr_mul=config.lr_mlp, activation="fused_lrelu")
            for _ in range(config.n_mlp)])

        self.input = ConstantInput(c[0])
        self.conv1 = StyledConv(c[0], c[0], 3, config.style_dim)
        self.to_rgb1 = ToRGB(c[0], config.style_dim, upsample=False)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        for i in range(1, len(c)):
            self.convs.append(StyledConv(c[i - 1], c[i], 3, config.style_dim, upsample=True))
            self.convs.append(StyledConv(c[i], c[i], 3, config.style_dim))
            self.to_rgbs.append(ToRGB(c[i], config.style_dim))

        # fixed noise maps: the official inference runs with randomize_noise=False, i.e. these buffers
        self.noises = nn.Module()
        for i in range(config.n_noises):
            res = 4 << ((i + 1) // 2)
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, res, res))

    @property
    def n_layers(self) -> int:
        return len(self.config.layer_shapes)

    def layer_convs(self) -> list:
        """The ModulatedConv2d of every generator layer, in HyperStyle's numbering."""
        layers = [self.conv1.conv, self.to_rgb1.conv]
        for i, to_rgb in enumerate(self.to_rgbs):
            layers += [self.convs[2 * i].conv, self.convs[2 * i + 1].conv, to_rgb.conv]
        return layers

    def map(self, z: torch.Tensor) -> torch.Tensor:
        """Z -> W through the mapping network."""
        return self.style(z)

    @torch.no_grad()
    def mean_latent(self, n: int = 10000, seed: int = 0) -> torch.Tensor:
        """Average W over `n` random z (how latent_avg is estimated when a file has none)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        z = torch.randn(n, self.style_dim, generator=gen).to(self.input.input)
        return self.map(z).mean(0, keepdim=True)

    def forward(self, codes: torch.Tensor, deltas: Optional[Sequence[Optional[torch.Tensor]]] = None,
                noise_mode: str = "const") -> torch.Tensor:
        """W+ codes [B, n_styles, style_dim] (or W codes [B, style_dim]) -> image [B, 3, size, size] in ~[-1, 1].

        deltas: None, or one entry per generator layer (None where the layer is not tuned).
        noise_mode: "const" uses the stored noise maps (deterministic, as the official inference), "random" draws
        new noise for every sample.
        """
        if codes.ndim == 2:
            codes = codes[:, None].expand(-1, self.n_styles, -1)
        batch, n_codes, dim = codes.shape
        if n_codes != self.n_styles or dim != self.style_dim:
            raise ValueError(f"this {self.size}-px generator takes codes of shape [B, {self.n_styles}, "
                             f"{self.style_dim}], got {list(codes.shape)}")
        if deltas is None:
            deltas = [None] * self.n_layers
        elif len(deltas) != self.n_layers:
            raise ValueError(f"expected {self.n_layers} weight offsets (one per generator layer, None where the layer "
                             f"is not tuned), got {len(deltas)}")
        noises = self._noises(batch, noise_mode, codes)
        dtype = self.input.input.dtype
        codes = codes.to(dtype)

        out = self.conv1(self.input(batch), codes[:, 0], noises[0], deltas[0])
        skip = self.to_rgb1(out, codes[:, 1], delta=deltas[1])
        for i, to_rgb in enumerate(self.to_rgbs):
            layer, style = 2 + 3 * i, 1 + 2 * i
            out = self.convs[2 * i](out, codes[:, style], noises[1 + 2 * i], deltas[layer])
            out = self.convs[2 * i + 1](out, codes[:, style + 1], noises[2 + 2 * i], deltas[layer + 1])
            skip = to_rgb(out, codes[:, style + 2], skip, delta=deltas[layer + 2])
        return skip

    def _noises(self, batch: int, mode: str, like: torch.Tensor) -> list:
        stored = [getattr(self.noises, f"noise_{i}") for i in range(self.config.n_noises)]
        if mode == "const":
            return stored
        if mode == "random":
            return [torch.randn(batch, 1, *n.shape[2:], device=n.device, dtype=n.dtype) for n in stored]
        raise ValueError(f"noise_mode must be 'const' or 'random', got {mode!r}")
