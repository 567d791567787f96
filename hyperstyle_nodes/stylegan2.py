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

import functools
import math
import os
import warnings
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
# Speed without changing the math (README, "Speed and memory", has the measurements).
#
# - Activations are "packed": [B, C, H, W] views of a channels-last [1, B*C, H, W] tensor (memory order H, W, B, C).
#   A per-sample convolution is then one grouped convolution (groups = B) that reads the activations in place; on an
#   H200 in bf16 it runs as fast as an ordinary convolution of the whole batch with one shared weight, so every 3x3
#   layer folds style, offset and demodulation into per-sample weights and no pass over the activations is spent
#   on modulation.
# - The official upsampling layer is a stride-2 transposed convolution followed by a 4x4 blur (upfirdn2d). Both are
#   linear in the input, so together they equal four ordinary 3x3 convolutions of the low-resolution input, one per
#   output "phase" (row and column parity), whose kernels are the layer's kernel filtered by the blur taps. We run
#   those as one convolution with 4x the output channels and interleave the phases in the step that adds noise and
#   bias: no transposed convolution and no blur pass, which were 60% of the GPU time before. The phase kernels come
#   from the per-sample 3x3 kernels through one matrix product ([36, 9] @ [9, C] per output channel).
# - toRGB (1x1, 3 outputs) is one matrix product of the packed activations [H*W, B*C] with a block-diagonal
#   [B*C, B*3] weight: 4.6x faster than a batched product at batch 8 and 1024 px, where it reads 1 GB.
# - The elementwise steps (noise, bias, leaky ReLU, interleaving; building per-sample weights) are fused by
#   torch.compile on CUDA when it is available (`fused`); everywhere else the same functions run eagerly.


def separable_taps(kernel_2d: torch.Tensor) -> torch.Tensor:
    """The 1-D taps u of a separable FIR kernel k = outer(u, u) (rosinality stores the 2-D kernel)."""
    rows = kernel_2d.double().sum(dim=1)
    return (rows / rows.sum() * kernel_2d.double().sum().sqrt()).float()


def skip_upsample_phases(taps: torch.Tensor) -> torch.Tensor:
    """[2 (output parity p), 3 (input offset d)]: FIR upsampling by 2 (upfirdn2d, up=2, pad=(2, 1)) as
    y[2n + p] = sum_d x[n + d - 1] * S[p, d]. From y[i] = sum_m x[m] u[i + 1 - 2m]."""
    s = torch.zeros(2, 3)
    for p in range(2):
        for d in range(3):
            if 0 <= p + 3 - 2 * d < len(taps):
                s[p, d] = taps[p + 3 - 2 * d]
    return s


def upconv_phases(taps: torch.Tensor) -> torch.Tensor:
    """[2 (p), 3 (d), 3 (r)]: a stride-2 transposed 3x3 convolution followed by the blur (pad 1) as an ordinary
    3x3 convolution (padding 1) per output parity p, y[2n + p] = sum_d x[n + d - 1] K_p[d], where
    K_p[d] = sum_r A[p, d, r] w[r], along each axis. From y[i] = sum_m x[m] sum_r u[2m - i + 1 + r] w[r]
    (the transposed conv puts x[m] w[r] at 2m + r; the symmetric blur reads t[i - 1 .. i + 2])."""
    a = torch.zeros(2, 3, 3)
    for p in range(2):
        for d in range(3):
            for r in range(3):
                if 0 <= 2 * d - 1 - p + r < len(taps):
                    a[p, d, r] = taps[2 * d - 1 - p + r]
    return a


class Blur(nn.Module):
    """Holds the blur kernel of an upsampling conv (`conv.blur.kernel` in the checkpoints) and its phase form."""

    def __init__(self, pad, gain: float = 1.0):
        super().__init__()
        self.register_buffer("kernel", blur_kernel_2d(gain=gain))
        self.pad = pad
        a = upconv_phases(separable_taps(self.kernel))
        # [(p, q, d, e), (r, s)]: phase kernels K[p, q, d, e] = sum_{r, s} A[p, d, r] A[q, e, s] w[r, s]
        self.register_buffer("phase_matrix", torch.einsum("pdr,qes->pqders", a, a).reshape(36, 9), persistent=False)


class Upsample(nn.Module):
    """2x FIR upsampling of the RGB skip branch (upfirdn2d with up=2), as a 3x3 depthwise conv of four phases."""

    def __init__(self, factor: int = 2):
        super().__init__()
        if factor != 2:
            raise ValueError("StyleGAN2 upsamples by 2")
        self.register_buffer("kernel", blur_kernel_2d(gain=factor ** 2))
        s = skip_upsample_phases(separable_taps(self.kernel))
        # one 3x3 kernel per (row parity, column parity); pixel_shuffle puts channel 4c + 2p + q at (2h + p, 2w + q)
        self.register_buffer("phase_kernels", (s[:, None, :, None] * s[None, :, None, :]).reshape(4, 1, 3, 3),
                             persistent=False)

    def forward(self, x):
        c = x.shape[1]
        weight = self.phase_kernels.to(x.dtype).repeat(c, 1, 1, 1)
        return F.pixel_shuffle(F.conv2d(x, weight, padding=1, groups=c), 2)


def blur_kernel_2d(taps: Sequence[float] = BLUR_KERNEL, gain: float = 1.0) -> torch.Tensor:
    k = torch.tensor(taps, dtype=torch.float32)
    k = k[None, :] * k[:, None]
    return k / k.sum() * gain


# ---- packed activations ----------------------------------------------------------------------------------------


def packed_empty(b: int, c: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(h, w, b, c, dtype=like.dtype, device=like.device).permute(2, 3, 0, 1)


def is_packed(x: torch.Tensor) -> bool:
    b, c, h, w = x.shape
    expected = (c, 1, w * b * c, b * c)
    return all(size == 1 or s == e for size, s, e in zip(x.shape, x.stride(), expected))


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] in any layout -> packed (a copy unless it already is)."""
    if is_packed(x):
        return x
    out = packed_empty(*x.shape, like=x)
    out.copy_(x)
    return out


def merged(x: torch.Tensor) -> torch.Tensor:
    """Packed [B, C, H, W] -> the channels-last [1, B*C, H, W] view a grouped convolution reads."""
    b, c, h, w = x.shape
    return x.as_strided((1, b * c, h, w), (h * w * b * c, 1, w * b * c, b * c))


def per_sample_conv(x: torch.Tensor, weight: torch.Tensor, padding: int) -> torch.Tensor:
    """Packed x [B, C, H, W], weights [B, O, C, k, k] laid out as [B, O, k, k, C] -> [1, B*O, H', W'] channels-last."""
    b, o, c, k = weight.shape[:4]
    weight = weight.reshape(b * o, c, k, k)
    out = F.conv2d(merged(x), weight, padding=padding, groups=b)
    # callers index the result by its channels-last memory; a backend that answers in another layout gets copied
    return out.contiguous(memory_format=torch.channels_last)


def channels_last_weight(shape: tuple, device, dtype) -> torch.Tensor:
    """An empty [B, O, C, k, k] weight laid out as [B, O, k, k, C] (what channels-last convolutions read)."""
    b, o, c, kh, kw = shape
    return torch.empty(b, o, kh, kw, c, device=device, dtype=dtype).permute(0, 1, 4, 2, 3)


# ---- fusion -----------------------------------------------------------------------------------------------------

_COMPILE = {"enabled": os.environ.get("HYPERSTYLE_COMPILE", "1") != "0", "failed": False}


def set_compile(enabled: bool) -> None:
    """torch.compile the elementwise steps on CUDA (default on; HYPERSTYLE_COMPILE=0 turns it off)."""
    _COMPILE["enabled"] = bool(enabled)


def fused(fn):
    """`fn` through torch.compile for CUDA tensors without autograd, eagerly otherwise. If compiling fails (no
    Triton, an unsupported setup) it is reported once and everything stays eager: same results, slower."""
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args):
        nonlocal compiled
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if (_COMPILE["enabled"] and not _COMPILE["failed"] and tensors[0].is_cuda and not torch.is_grad_enabled()):
            if compiled is None:
                if not _COMPILE.get("announced"):
                    _COMPILE["announced"] = True
                    print("HyperStyle: compiling the GPU kernels with torch.compile (the first run takes up to a minute "
                          "longer; HYPERSTYLE_COMPILE=0 turns this off)", flush=True)
                _raise_recompile_limit()
                compiled = torch.compile(fn, dynamic=True, fullgraph=True)
            try:
                return compiled(*args)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as err:  # noqa: BLE001 - any compiler failure: stay correct, run eagerly
                _COMPILE["failed"] = True
                warnings.warn(f"torch.compile is unavailable ({type(err).__name__}: {str(err)[:200]}); running "
                              "HyperStyle eagerly (same results, slower)")
        return fn(*args)

    return wrapper


def _raise_recompile_limit(limit: int = 256) -> None:
    """Each fused function sees a few dtypes, batch 1 or more and kinds of offset: more graphs than dynamo's default
    limit of 8 per function."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if getattr(dynamo_config, name, limit) < limit:
            setattr(dynamo_config, name, limit)


def bias_leaky_relu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """StyleGAN2's fused activation: leaky ReLU(x + bias) scaled by sqrt(2) to keep the signal's magnitude."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return F.leaky_relu(x + bias.view(shape).to(x.dtype), LEAKY_SLOPE) * ACTIVATION_GAIN


def _noise_and_activation(y, noise, noise_weight, bias):
    return bias_leaky_relu(y + noise_weight.to(y.dtype) * noise.to(y.dtype), bias)


@fused
def _styled_activation_into(out, y, noise, noise_weight, bias):
    out.copy_(_noise_and_activation(y, noise, noise_weight, bias))


def styled_activation(y: torch.Tensor, noise: torch.Tensor, noise_weight: torch.Tensor, bias: torch.Tensor,
                      out: torch.Tensor) -> torch.Tensor:
    """out = leaky_relu(y + noise_weight * noise + bias) * sqrt(2), written into `out` (y and out may be views in
    different layouts: that is how the upsampling phases get interleaved). Returns out."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (y, noise_weight, bias)):
        out.copy_(_noise_and_activation(y, noise, noise_weight, bias))  # copy_ keeps the graph for training
    elif y.is_cuda and _COMPILE["enabled"] and not _COMPILE["failed"]:
        _styled_activation_into(out, y, noise, noise_weight, bias)
    else:  # eager: in place, four passes and no temporaries the size of the activations
        shape = (1, -1) + (1,) * (y.ndim - 2)
        torch.add(y, noise_weight.to(y.dtype) * noise.to(y.dtype), out=out)
        out.add_(bias.view(shape).to(out.dtype))
        F.leaky_relu_(out, LEAKY_SLOPE)
        out.mul_(ACTIVATION_GAIN)
    return out


@fused
def modulated_weight(weight: torch.Tensor, style: torch.Tensor, delta: Optional[torch.Tensor], demodulate: bool,
                     dtype: torch.dtype) -> torch.Tensor:
    """Per-sample weights, computed in fp32 (half precision overflows in the demodulation) and returned in `dtype`.

    weight [1, O, C, k, k] (already scaled), style [B, C], delta None, [B|1, O, C] or [B|1, O, C, k, k].
    Returns [B, O, C, k, k] laid out as [B, O, k, k, C].
    """
    w = weight.float().permute(0, 1, 3, 4, 2)  # [1, O, k, k, C]: the layout of the result
    if delta is not None:
        delta = delta.float()
        delta = delta[:, :, None, None, :] if delta.ndim == 3 else delta.permute(0, 1, 3, 4, 2)
        w = w * (1 + delta)
    w = w * style.float()[:, None, None, None, :]
    if demodulate:
        w = w * torch.rsqrt(w.square().sum(dim=[2, 3, 4], keepdim=True) + 1e-8)
    batch, o, k, _, c = w.shape
    out = channels_last_weight((batch, o, c, k, k), w.device, dtype)
    out.permute(0, 1, 3, 4, 2).copy_(w)
    return out


def phase_weights(w: torch.Tensor, phase_matrix: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-sample 3x3 kernels w [B, O, C, 3, 3] (laid out [B, O, 3, 3, C]) -> the weights of the phase convolution,
    [B, 4*O, C, 3, 3] laid out [B, 4*O, 3, 3, C], output channels ordered (row parity p, column parity q, O)."""
    b, o, c = w.shape[:3]
    # one matrix product (cuBLAS): torch.compile's lowering of the same einsum was 1.5x slower at batch 8
    k = torch.matmul(phase_matrix.to(w.dtype), w.permute(0, 1, 3, 4, 2).reshape(b * o, 9, c))  # [B*O, 36, C]
    out = torch.empty(b, 2, 2, o, 3, 3, c, device=w.device, dtype=dtype)
    out.copy_(k.view(b, o, 2, 2, 3, 3, c).permute(0, 2, 3, 1, 4, 5, 6))
    return out.view(b, 4 * o, 3, 3, c).permute(0, 1, 4, 2, 3)


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

    Style, offset and demodulation are folded into per-sample weights (small next to the activations) and one
    grouped convolution runs the whole batch; a 1x1 layer (toRGB) is one batched matrix product. An upsampling
    layer runs as four phase convolutions (see the top of this section).
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
            if kernel_size != 3:
                raise ValueError("upsampling layers of StyleGAN2 have 3x3 kernels")
            # official: transposed conv (stride 2), then this blur with pads making the output exactly 2x the input
            p = (len(BLUR_KERNEL) - 2) - (kernel_size - 1)
            self.blur = Blur(pad=((p + 1) // 2 + 1, p // 2 + 1), gain=4)

    def extra_repr(self):
        return f"{self.in_channel}, {self.out_channel}, k={self.kernel_size}, upsample={self.upsample}"

    def per_sample_weight(self, w: torch.Tensor, delta: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """[B, O, C, k, k]; for an upsampling layer the phase convolution's weights (`phase_weights`)."""
        style = self.modulation(w)  # [B, in]
        if delta is not None and delta.shape[0] not in (1, style.shape[0]):
            raise ValueError(f"weight offsets have batch {delta.shape[0]} but the activations have batch "
                             f"{style.shape[0]}")
        if not self.upsample:
            return modulated_weight(self.weight * self.scale, style, delta, self.demodulate, dtype)
        kernels = modulated_weight(self.weight * self.scale, style, delta, self.demodulate, torch.float32)
        return phase_weights(kernels, self.blur.phase_matrix, dtype)

    def convolve(self, x: torch.Tensor, w: torch.Tensor, delta: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The convolution of packed x, before noise and bias: packed [B, O, H, W]. Upsampling: a [B, O, H, 2, W, 2]
        view of the four phases (row n, row parity, column m, column parity), i.e. the [B, O, 2H, 2W] output before
        interleaving."""
        batch, c, h, wd = x.shape
        o = self.out_channel
        weight = self.per_sample_weight(w, delta, x.dtype).expand(batch, -1, -1, -1, -1)
        if self.kernel_size == 1:
            # [H*W, B*C] @ block-diagonal [B*C, B*O]: one product over the packed activations, read once. (A
            # non-finite activation would reach the other samples' outputs through the zeros: 0 * inf is NaN.)
            weight = weight.reshape(batch, o, c).transpose(1, 2)  # [B, C, O]
            eye = torch.eye(batch, device=x.device, dtype=x.dtype)
            block = (eye[:, None, :, None] * weight[:, :, None, :]).reshape(batch * c, batch * o)
            out = x.as_strided((h * wd, batch * c), (batch * c, 1)) @ block
            return out.as_strided((batch, o, h, wd), (o, 1, wd * batch * o, batch * o))
        if not self.upsample:
            out = per_sample_conv(x, weight, self.padding)
            return out.as_strided((batch, o, h, wd), (o, 1, wd * batch * o, batch * o))
        out = per_sample_conv(x, weight, padding=1)  # [1, B*4*O, H, W], memory (H, W, B, p, q, O)
        row, col = wd * batch * 4 * o, batch * 4 * o
        return out.as_strided((batch, o, h, 2, wd, 2), (4 * o, 1, row, 2 * o, col, o))

    def forward(self, x: torch.Tensor, w: torch.Tensor, delta: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, C, H, W] -> [B, O, H', W'] (packed), the official ModulatedConv2d's output."""
        out = self.convolve(pack(x), w, delta)
        if not self.upsample:
            return out
        b, o, h, _, wd, _ = out.shape
        result = packed_empty(b, o, 2 * h, 2 * wd, like=out)
        phase_view(result).copy_(out)
        return result


def phase_view(x: torch.Tensor) -> torch.Tensor:
    """[..., 2H, 2W] -> the [..., H, 2, W, 2] view (row, row parity, column, column parity)."""
    return x.unflatten(-1, (x.shape[-1] // 2, 2)).unflatten(-3, (x.shape[-2] // 2, 2))


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
        """= activate(noise(conv(x))), with the interleaving of upsampling phases, the noise, the bias and the
        activation in one step. Packed in, packed out."""
        y = self.conv.convolve(pack(x), w, delta)
        if self.conv.upsample:
            b, o, h, _, wd, _ = y.shape
            out = packed_empty(b, o, 2 * h, 2 * wd, like=y)
            styled_activation(y, phase_view(noise), self.noise.weight, self.activate.bias, phase_view(out))
            return out
        b, o, h, wd = y.shape
        return styled_activation(y, noise, self.noise.weight, self.activate.bias, packed_empty(b, o, h, wd, like=y))


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
        out = self.conv.convolve(pack(x), w, delta) + self.bias.to(x.dtype)
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

        out = self.conv1(pack(self.input(batch)), codes[:, 0], noises[0], deltas[0])
        skip = self.to_rgb1(out, codes[:, 1], delta=deltas[1])
        for i, to_rgb in enumerate(self.to_rgbs):
            layer, style = 2 + 3 * i, 1 + 2 * i
            out = self.convs[2 * i](out, codes[:, style], noises[1 + 2 * i], deltas[layer])
            out = self.convs[2 * i + 1](out, codes[:, style + 1], noises[2 + 2 * i], deltas[layer + 1])
            skip = to_rgb(out, codes[:, style + 2], skip, delta=deltas[layer + 2])
        return skip.contiguous()

    def _noises(self, batch: int, mode: str, like: torch.Tensor) -> list:
        stored = [getattr(self.noises, f"noise_{i}") for i in range(self.config.n_noises)]
        if mode == "const":
            return stored
        if mode == "random":
            return [torch.randn(batch, 1, *n.shape[2:], device=n.device, dtype=n.dtype) for n in stored]
        raise ValueError(f"noise_mode must be 'const' or 'random', got {mode!r}")
