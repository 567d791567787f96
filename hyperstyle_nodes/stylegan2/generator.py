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

import contextlib
import functools
import math
import os
import warnings
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels, warmup

BLUR_KERNEL = (1, 3, 3, 1)
PADDED_TAPS = 16  # 3x3 kernels padded to 16 taps for the phase matrix product
SPLIT_ROW_PARITIES_FROM = 128  # input size from which an upsampling layer runs one convolution per row parity
TRANSPOSED_UP_TO = 64  # largest input size at which an upsampling layer runs as a transposed convolution + blur
TRANSPOSED_UP_TO_ONE_IMAGE = 1 << 30  # the same with the Triton kernels at batch 1: every size
# largest batch whose weights are built ahead on a second stream (`WeightsAhead`): at batch 8 the convolutions
# fill the GPU (H100, invert(5) + decode 1% faster) and every layer's weights would be in memory at once
WEIGHTS_AHEAD_MAX_BATCH = 1
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
    def layer_sizes(self) -> list:
        """Output resolution of every generator layer, in HyperStyle's numbering (conv1 and toRGB1 at 4 px, then
        three layers per resolution from 8 px up)."""
        return [4, 4] + [4 << (1 + (layer - 2) // 3) for layer in range(2, len(self.layer_shapes))]

    @property
    def to_rgb_layers(self) -> list:
        return [i for i, (k, _, out) in enumerate(self.layer_shapes) if k == 1 and out == 3]


def style_index(layer: int) -> int:
    """Which W+ code modulates a generator layer (HyperStyle numbering): conv1 0, to_rgb1 1, then per resolution
    i = 0, 1, ...: upsampling conv 1 + 2i, conv 2 + 2i, to_rgb 3 + 2i."""
    if layer < 2:
        return layer
    i, j = divmod(layer - 2, 3)
    return 1 + 2 * i + j


def feature_layer(index: int) -> int:
    """The generator layer (numbered as above) whose output is entry `index` of the official StyleGAN2's
    `return_features` list: 0 the constant input (no layer: -1), 1 conv1, then per resolution i = 0, 1, ...: 2 + 2i
    the upsampling conv, 3 + 2i the conv. StyleFeatureEditor's entry 9 is the 64-px conv's output at any size."""
    if index < 1:
        return -1
    if index == 1:
        return 0
    i, j = divmod(index - 2, 2)
    return 2 + 3 * i + j


def log2(n: int) -> int:
    return int(round(math.log2(n)))


def check_size(size: int) -> None:
    if size < 8 or size > 1024 or size & (size - 1):
        raise ValueError(f"StyleGAN2 output size must be a power of two between 8 and 1024, got {size}")


# --------------------------------------------------------------------------------------------------------------
# Speed without changing the math (README, "Speed and memory", has the measurements).
#
# - Activations are "packed": [B, C, H, W] views of a channels-last [1, B*C, H, W] tensor (memory order H, W, B, C).
#   A per-sample convolution is then one grouped convolution (groups = B) that reads the activations in place, so
#   every 3x3 layer folds style, offset and demodulation into per-sample weights and no pass over the activations is
#   spent on modulation. (H200, bf16, 3x3 C -> C: as fast as one shared weight at batch 1. At batch 8 cuDNN runs
#   the groups one by one: the 128-512 px layers are within 10% of a shared weight, 1024 px 1.25x and the cheap
#   4-64 px ones 1.7-2.6x slower.)
# - The official upsampling layer is a stride-2 transposed convolution followed by a 4x4 blur (upfirdn2d). Both are
#   linear in the input, so together they equal four ordinary 3x3 convolutions of the low-resolution input, one per
#   output "phase" (row and column parity), whose kernels are the layer's kernel filtered by the blur taps. We run
#   those as one convolution with 4x the output channels and interleave the phases in the step that adds noise and
#   bias: no transposed convolution and no blur pass, which were 60% of the GPU time before. The phase kernels come
#   from the per-sample 3x3 kernels through one matrix product ([36, 16] @ [16, C] per output channel, the 9 taps
#   padded with zeros). From 128 px up, at batch > 1, the phases run as two convolutions, one per output row parity
#   (`upsample_plan`). Up to 64 px, where the per-sample weights outweigh the activations, and at every size for one
#   image on the Triton kernels, the layer runs as the transposed convolution itself, in phase form (four 2x2
#   kernels of the 3x3 taps, 16 taps per output channel instead of 36, no matrix product), and the epilogue applies
#   the blur to its four phases (`transposed_up_to`).
# - toRGB (1x1, 3 outputs) is one matrix product of the packed activations [H*W, B*C] with a block-diagonal
#   [B*C, B*3] weight: 4.6x faster than a batched product at batch 8 and 1024 px, where it reads 1 GB.
# - The elementwise steps (noise, bias, leaky ReLU, interleaving; building per-sample weights; toRGB's bias and
#   upsampled skip) run at GPU inference as hand-written Triton kernels (`kernels.py`, the default), which take
#   every size at run time and so compile a few times in all; everywhere else, and with HYPERSTYLE_COMPILE=0, the
#   PyTorch functions here run eagerly (the same numbers). HYPERSTYLE_COMPILE=1 instead fuses those functions
#   with torch.compile (`fused`) for static shapes: fast, but compiled once per layer shape, batch size and
#   precision (~2.5 minutes before the first image on an H100).
# - At batch 1 on a GPU, every layer's per-sample weights are built on a second CUDA stream while the first runs the
#   layers (`WeightsAhead`): they need only the styles and offsets, and the first layers' small convolutions leave
#   most of the GPU idle. H100, one generator pass graphed, ms/image: bf16 1.221 -> 1.147, tf32 1.950 -> 1.900.


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


# A stride-2 transposed 3-tap kernel w along one axis, as two 2-tap kernels over x[n - 1], x[n] (one per parity of
# its output t): t[2n] = x[n - 1] w[2] + x[n] w[0], t[2n + 1] = x[n] w[1]. Entries are indices into w, None a zero.
TRANSPOSED_TAPS = ((2, 0), (None, 1))


def blur_phase_terms(taps: Sequence[float]) -> tuple:
    """The blur (pad 1) of a signal t given as its two parities, per output parity p: ((parity of t, offset, tap),
    ...) with y[2n + p] = sum tap * t_parity[n + offset]. From y[i] = sum_a taps[a] t[i + a - 1]."""
    return tuple(tuple(((p + a - 1) % 2, (p + a - 1) // 2, float(t)) for a, t in enumerate(taps)) for p in range(2))


class Blur(nn.Module):
    """Holds the blur kernel of an upsampling conv (`conv.blur.kernel` in the checkpoints) and its phase form."""

    def __init__(self, pad, gain: float = 1.0):
        super().__init__()
        self.register_buffer("kernel", blur_kernel_2d(gain=gain))
        self.pad = pad
        a = upconv_phases(separable_taps(self.kernel))
        # [(p, q, d, e), (r, s)]: phase kernels K[p, q, d, e] = sum_{r, s} A[p, d, r] A[q, e, s] w[r, s]
        # zero columns pad the 9 taps to 16: cuBLAS ran the half-precision product with K = 9 in an unaligned kernel
        # at half the speed (H200, batch 8, 512 -> 512: 0.234 ms, padded 0.114)
        matrix = torch.einsum("pdr,qes->pqders", a, a).reshape(36, 9)
        self.register_buffer("phase_matrix", F.pad(matrix, (0, PADDED_TAPS - 9)), persistent=False)
        self.taps = tuple(separable_taps(self.kernel).tolist())

    def phase_rows(self, row_parities: tuple) -> torch.Tensor:
        """The rows of `phase_matrix` for output rows of these parities (both: all of it, a view either way)."""
        if tuple(row_parities) == (0, 1):
            return self.phase_matrix
        (p,) = row_parities
        return self.phase_matrix[18 * p:18 * (p + 1)]


class Upsample(nn.Module):
    """2x FIR upsampling of the RGB skip branch (upfirdn2d with up=2), as two taps per output phase along each axis
    (`fir_upsample_2x`), which torch.compile fuses with the toRGB output."""

    def __init__(self, factor: int = 2):
        super().__init__()
        if factor != 2:
            raise ValueError("StyleGAN2 upsamples by 2")
        self.register_buffer("kernel", blur_kernel_2d(gain=factor ** 2))
        self.taps = tuple(tuple(row) for row in skip_upsample_phases(separable_taps(self.kernel)).tolist())

    def forward(self, x):
        return fir_upsample_2x(x, self.taps)


def fir_upsample_2x(x: torch.Tensor, taps: tuple) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, 2H, 2W] with y[2n + p] = sum_d x[n + d - 1] * taps[p][d] along each axis (zero pad)."""
    b, c, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    rows = [sum(t * padded[:, :, d:d + h] for d, t in enumerate(taps[p]) if t) for p in range(2)]
    phases = [torch.stack([sum(t * r[..., e:e + w] for e, t in enumerate(taps[q]) if t) for q in range(2)], dim=-1)
              for r in rows]  # per row parity: [B, C, H, W, 2 (column parity)]
    return torch.stack(phases, dim=-3).reshape(b, c, 2 * h, 2 * w)


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
    b, o, c, kh, kw = weight.shape
    weight = weight.reshape(b * o, c, kh, kw)
    out = F.conv2d(merged(x), weight, padding=padding, groups=b)
    # callers index the result by its channels-last memory; a backend that answers in another layout gets copied
    return out.contiguous(memory_format=torch.channels_last)


def channels_last_weight(shape: tuple, device, dtype) -> torch.Tensor:
    """An empty [B, O, C, k, k] weight laid out as [B, O, k, k, C] (what channels-last convolutions read)."""
    b, o, c, kh, kw = shape
    return torch.empty(b, o, kh, kw, c, device=device, dtype=dtype).permute(0, 1, 4, 2, 3)


@contextlib.contextmanager
def tf32_matmuls():
    """TF32 matrix products inside the block. PyTorch's switch is global, so it is put back on the way out."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def tf32_for_convolutions_only() -> bool:
    """PyTorch's default TF32 flags: convolutions may use TF32 (`cudnn.allow_tf32`), matrix products may not."""
    return torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


def conv_product_uses_tf32(t: torch.Tensor, batch: int) -> bool:
    """Whether toRGB's block-diagonal product (which stands for a convolution) runs with TF32: in fp32 on CUDA
    outside autograd, at batch > 1, when convolutions may use TF32 (`cudnn.allow_tf32`, PyTorch's default) and matrix
    products may not (also the default). The official layer is a cuDNN convolution, which those flags let use TF32;
    as an SGEMM the product does its B-fold redundant work (the zero blocks) in FFMA. H200, batch 8: 1024 px
    0.53 -> 0.46 ms, 256 px 0.22 -> 0.13, pipeline 15.7 -> 15.4 ms/image. At batch 1 there are no zero blocks and
    the SGEMM was as fast or faster (1024 px: 0.13 against 0.21 ms)."""
    return (batch > 1 and t.is_cuda and t.dtype == torch.float32 and tf32_for_convolutions_only()
            and not torch.is_grad_enabled())


# ---- fusion -----------------------------------------------------------------------------------------------------

# HYPERSTYLE_COMPILE: unset -> Triton kernels (the default), "1" -> torch.compile, "0" -> PyTorch only
_MODES = {"triton": {"enabled": False, "triton": True}, "compile": {"enabled": True, "triton": False},
          "torch": {"enabled": False, "triton": False}}


def mode_from_env(value: Optional[str]) -> str:
    return {"0": "torch", "1": "compile"}.get(value or "", "triton")


_COMPILE = dict(_MODES[mode_from_env(os.environ.get("HYPERSTYLE_COMPILE"))])


def set_kernels(mode: str) -> None:
    """What runs the elementwise steps at GPU inference: "triton" (hand-written kernels, the default), "compile"
    (torch.compile, HYPERSTYLE_COMPILE=1) or "torch" (eager PyTorch only, HYPERSTYLE_COMPILE=0)."""
    if mode not in _MODES:
        raise ValueError(f"unknown kernel mode {mode!r}; use one of {', '.join(_MODES)}")
    _COMPILE.update(_MODES[mode])


def set_compile(enabled: bool) -> None:
    """torch.compile the elementwise steps on CUDA (True), or run PyTorch only, without Triton (False)."""
    set_kernels("compile" if enabled else "torch")


def triton_runs(t: torch.Tensor) -> bool:
    """Whether the Triton kernels take this step: CUDA inference in the default mode, where Triton imports."""
    return bool(_COMPILE.get("triton")) and t.is_cuda and not torch.is_grad_enabled() and kernels.available()


def fused(fn):
    """`fn` through torch.compile for CUDA tensors without autograd, eagerly otherwise. If compiling `fn` fails (no
    Triton, something the compiler cannot trace) it is reported and `fn` stays eager: same results, slower. Only
    that function: one that cannot be compiled does not slow down the others."""
    state = {"compiled": None, "failed": False}

    def compiles() -> bool:
        return _COMPILE["enabled"] and not state["failed"]

    @functools.wraps(fn)
    def wrapper(*args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if compiles() and on_gpu(tensors[0]) and not torch.is_grad_enabled():
            if state["compiled"] is None:
                if not _COMPILE.get("announced"):
                    _COMPILE["announced"] = True
                    cache = warmup.use_persistent_cache()
                    warmup.notice("HyperStyle: compiling the GPU kernels with torch.compile (HYPERSTYLE_COMPILE=1; "
                                  "the first run at each batch size and precision takes minutes)"
                                  + (f"; kept in {cache}" if cache else ""))
                _raise_recompile_limit()
                state["compiled"] = torch.compile(fn, dynamic=False, fullgraph=True)
            try:
                return state["compiled"](*args)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as err:  # noqa: BLE001 - any compiler failure: stay correct, run eagerly
                state["failed"] = True
                warnings.warn(f"torch.compile could not compile {fn.__name__} ({type(err).__name__}: "
                              f"{str(err)[:200]}); it runs eagerly (same results, slower)")
        return fn(*args)

    wrapper.compiles = compiles
    return wrapper


def compile_enabled() -> bool:
    """Whether a first call on the GPU compiles kernels (torch.compile's, or the Triton kernels' first time)."""
    return bool(_COMPILE["enabled"] or _COMPILE.get("triton"))


def on_gpu(t: torch.Tensor) -> bool:
    """Whether `fused` compiles for this tensor (CUDA only: on the CPU the eager functions are fast enough)."""
    return t.is_cuda


def _raise_recompile_limit(limit: int = 512) -> None:
    """Static shapes: each fused function is compiled once per layer shape, batch size, dtype and kind of offset,
    far more graphs than dynamo's default limit of 8 per function. (Past the limit it runs eagerly: same results.)"""
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
    elif triton_runs(y) and kernels.styled_activation(y, noise, noise_weight, bias, out) is not None:
        pass
    elif on_gpu(y) and _styled_activation_into.compiles():
        _styled_activation_into(out, y, noise, noise_weight, bias)
    else:
        # eager: two passes over the activations. leaky_relu(z) * gain == leaky_relu(z * gain) for gain > 0, so the
        # gain is applied before the activation: out = gain * y + gain * (noise_weight * noise + bias), where the
        # second term (per pixel and channel, shared by the batch) is written once, laid out like `out`. Against
        # four in-place passes (H100, without Triton, invert(5) + decode): tf32 32.8 -> 27.7 ms/image at batch 8,
        # 51.3 -> 49.0 at batch 1; bf16 22.2 -> 18.2 and 36.6 -> 34.9
        term = noise_and_bias_term(noise, noise_weight, bias, out, ACTIVATION_GAIN)
        torch.add(term, y, alpha=ACTIVATION_GAIN, out=out)
        F.leaky_relu_(out, LEAKY_SLOPE)
    return out


def noise_and_bias_term(noise: torch.Tensor, noise_weight: torch.Tensor, bias: torch.Tensor, like: torch.Tensor,
                        gain: float) -> torch.Tensor:
    """gain * (noise_weight * noise + bias) broadcast to [N, C, *like.shape[2:]] (N: the noise's batch, 1 for the
    stored maps), channels innermost in memory like the packed activations, so that a batch reads it in order."""
    n, c = noise.shape[0], like.shape[1]
    term = torch.empty(n, *like.shape[2:], c, dtype=like.dtype, device=like.device).movedim(-1, 1)
    shape = (1, -1) + (1,) * (like.ndim - 2)
    scaled_bias = bias.view(shape).to(like.dtype) * gain
    return torch.addcmul(scaled_bias, noise.to(like.dtype), noise_weight.to(like.dtype) * gain, out=term)


def _modulated(weight: torch.Tensor, scale: float, style: torch.Tensor, delta: Optional[torch.Tensor],
               demodulate: bool) -> torch.Tensor:
    """fp32 per-sample weights [B, O, k, k, C] (the layout convolutions read): scale * W * (1 + delta) * style,
    demodulated. weight [1, O, C, k, k], style [B, C], delta None, [B|1, O, C] or [B|1, O, C, k, k]."""
    w = weight.float().permute(0, 1, 3, 4, 2) * scale
    if delta is not None:
        delta = delta.float()
        delta = delta[:, :, None, None, :] if delta.ndim == 3 else delta.permute(0, 1, 3, 4, 2)
        w = w * (1 + delta)
    w = w * style.float()[:, None, None, None, :]
    if demodulate:
        w = w * torch.rsqrt(w.square().sum(dim=[2, 3, 4], keepdim=True) + 1e-8)
    return w


def _factors(weight: torch.Tensor, scale: float, style: torch.Tensor, delta: Optional[torch.Tensor],
             demodulate: bool) -> Optional[torch.Tensor]:
    """fp32 factors f [B, O|1, C] with `_modulated` = W * f broadcast over the taps, or None where the offsets differ
    between taps. The demodulation's sum over C and the taps is sum_c f^2 * sum_taps W^2, a sum over [B, O, C]: so
    without torch.compile a per-sample weight is one multiply written in place instead of ~8 passes over all the
    samples' weights."""
    if delta is not None and delta.ndim == 5:
        if delta.shape[-2:] != (1, 1):
            return None
        delta = delta.flatten(2)
    f = style.float()[:, None, :] * scale
    if delta is not None:
        f = f * (1 + delta.float())
    if demodulate:
        taps_energy = weight[0].float().square().sum(dim=(2, 3))  # [O, C]
        f = f * torch.rsqrt((f.square() * taps_energy).sum(dim=2, keepdim=True) + 1e-8)
    return f


def _scaled_into(out: torch.Tensor, weight: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """out = weight * factors (broadcast), in out's dtype, in one pass (eager PyTorch would otherwise write the fp32
    product and then copy it)."""
    torch.mul(weight, factors, out=out)
    return out


def _eager_weights() -> bool:
    """Whether the weight builders take the one-multiply path: eager inference. torch.compile fuses the plain formula
    by itself (its graphs stay the ones measured), and autograd cannot go through an `out=` product (training)."""
    return not torch.compiler.is_compiling() and not torch.is_grad_enabled()


@fused
def modulated_weight(weight: torch.Tensor, scale: float, style: torch.Tensor, delta: Optional[torch.Tensor],
                     demodulate: bool, dtype: torch.dtype) -> torch.Tensor:
    """Per-sample weights, computed in fp32 (half precision overflows in the demodulation) and returned in `dtype`:
    [B, O, C, k, k] laid out as [B, O, k, k, C]."""
    if triton_runs(weight):
        _, o, c, k, _ = weight.shape
        out = channels_last_weight((style.shape[0], o, c, k, k), weight.device, dtype)
        if kernels.modulated_weights(weight, scale, style, delta, demodulate, out.permute(0, 1, 3, 4, 2),
                                     "plain") is not None:
            return out
    factors = _factors(weight, scale, style, delta, demodulate) if _eager_weights() else None
    if factors is not None:
        _, o, c, k, _ = weight.shape
        out = channels_last_weight((style.shape[0], o, c, k, k), weight.device, dtype)
        _scaled_into(out.permute(0, 1, 3, 4, 2), weight.permute(0, 1, 3, 4, 2), factors[:, :, None, None, :])
        return out
    w = _modulated(weight, scale, style, delta, demodulate)
    batch, o, k, _, c = w.shape
    out = channels_last_weight((batch, o, c, k, k), w.device, dtype)
    out.permute(0, 1, 3, 4, 2).copy_(w)
    return out


@fused
def block_diagonal_weight(weight: torch.Tensor, scale: float, style: torch.Tensor, delta: Optional[torch.Tensor],
                          dtype: torch.dtype) -> torch.Tensor:
    """A 1x1 layer's per-sample weights (not demodulated) as one block-diagonal matrix [B*C, B*O]: sample b's
    [C, O] block at (b, b), so that packed activations [H*W, B*C] times it are every sample's output. Zero columns
    pad B*O to a multiple of 8: cuBLAS ran the product with 3 columns (batch 1, toRGB) in an unaligned kernel at
    half the speed (H200, bf16, 1024 px: 0.139 ms, padded 0.066)."""
    if triton_runs(weight):
        block = kernels.block_diagonal_weight(weight, scale, style, delta, dtype)
        if block is not None:
            return block
    w = _modulated(weight, scale, style, delta, False)  # [B, O, 1, 1, C]
    batch, o, _, _, c = w.shape
    eye = torch.eye(batch, device=w.device, dtype=w.dtype)
    w = w.reshape(batch, o, c).transpose(1, 2)  # [B, C, O]
    block = (eye[:, None, :, None] * w[:, :, None, :]).reshape(batch * c, batch * o)
    return F.pad(block, (0, -batch * o % 8)).to(dtype)


@fused
def padded_taps(weight: torch.Tensor, scale: float, style: torch.Tensor, delta: Optional[torch.Tensor],
                demodulate: bool, dtype: torch.dtype) -> torch.Tensor:
    """`modulated_weight`'s kernels as [B, O, PADDED_TAPS, C]: the 9 taps, then zeros."""
    if triton_runs(weight):
        _, o, c, _, _ = weight.shape
        out = torch.empty(style.shape[0], o, PADDED_TAPS, c, device=weight.device, dtype=dtype)
        if kernels.modulated_weights(weight, scale, style, delta, demodulate, out, "padded") is not None:
            return out
    factors = _factors(weight, scale, style, delta, demodulate) if _eager_weights() else None
    if factors is not None:
        _, o, c, k, _ = weight.shape
        taps = F.pad(weight.permute(0, 1, 3, 4, 2).reshape(1, o, k * k, c), (0, 0, 0, PADDED_TAPS - k * k))
        out = torch.empty(style.shape[0], o, PADDED_TAPS, c, device=weight.device, dtype=dtype)
        return _scaled_into(out, taps, factors[:, :, None, :])
    w = _modulated(weight, scale, style, delta, demodulate)
    batch, o, k, _, c = w.shape
    return F.pad(w.reshape(batch, o, k * k, c), (0, 0, 0, PADDED_TAPS - k * k)).to(dtype)


def phase_weights(w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per-sample kernels w [B, O, PADDED_TAPS, C] (`padded_taps`) and phase rows [9n, PADDED_TAPS] (n phases of
    `Blur.phase_rows`) -> the phase convolution's weights [B, n*O, C, 3, 3] laid out [B, n*O, 3, 3, C], output
    channel o*n + j for phase j. One matrix product straight into the layout the convolution reads (cuBLAS;
    torch.compile's lowering of the same einsum was 1.5x slower at batch 8), in the kernels' dtype: in half
    precision they are rounded before the blur taps mix them (PSNR against fp32 stayed above 43 dB)."""
    b, o, taps, c = w.shape
    n = rows.shape[0] // 9
    k = torch.matmul(rows.to(w.dtype), w.reshape(b * o, taps, c))  # [B*O, 9n, C]
    return k.view(b, o * n, 3, 3, c).permute(0, 1, 4, 2, 3)


@fused
def transposed_taps(weight: torch.Tensor, scale: float, style: torch.Tensor, delta: Optional[torch.Tensor],
                    demodulate: bool, dtype: torch.dtype) -> torch.Tensor:
    """`modulated_weight`'s 3x3 kernels as the stride-2 transposed convolution's kernels in phase form
    (`TRANSPOSED_TAPS` along each axis): [B, 4*O, C, 2, 2] laid out [B, 4*O, 2, 2, C], output channel
    (row parity, column parity, o)."""
    if triton_runs(weight):
        _, o, c, _, _ = weight.shape
        out = channels_last_weight((style.shape[0], 4 * o, c, 2, 2), weight.device, dtype)
        if kernels.modulated_weights(weight, scale, style, delta, demodulate, out.permute(0, 1, 3, 4, 2),
                                     "transposed") is not None:
            return out
    factors = _factors(weight, scale, style, delta, demodulate) if _eager_weights() else None
    if factors is not None:  # the taps of the shared weight, then one multiply by the per-sample factors
        _, o, c, _, _ = weight.shape
        taps = F.pad(weight.permute(0, 1, 3, 4, 2).reshape(o, 9, c), (0, 0, 0, 1))  # tap 9 is zero
        phases = taps[:, _transposed_tap_index(weight.device)]  # [O, 4, 2, 2, C]
        out = channels_last_weight((style.shape[0], 4 * o, c, 2, 2), weight.device, dtype)
        _scaled_into(out.permute(0, 1, 3, 4, 2).view(-1, 4, o, 2, 2, c), phases.transpose(0, 1),
                     factors[:, None, :, None, None, :])
        return out
    w = _modulated(weight, scale, style, delta, demodulate)  # [B, O, 3, 3, C]
    zero = torch.zeros_like(w[:, :, 0, 0])
    blocks = [torch.stack([torch.stack([zero if r is None or s is None else w[:, :, r, s] for s in col_taps], dim=2)
                           for r in row_taps], dim=2)
              for row_taps in TRANSPOSED_TAPS for col_taps in TRANSPOSED_TAPS]  # each [B, O, 2, 2, C]
    phase_kernels = torch.cat(blocks, dim=1)  # (not `kernels`: that would hide the module above)
    batch, n_out, kh, kw, c = phase_kernels.shape
    out = channels_last_weight((batch, n_out, c, kh, kw), w.device, dtype)
    out.permute(0, 1, 3, 4, 2).copy_(phase_kernels)
    return out


_TAP_INDEX: dict = {}


def _transposed_tap_index(device: torch.device) -> torch.Tensor:
    """[4, 2, 2] indices into a 3x3 kernel's 9 taps (9: the zero tap) giving `transposed_taps`' kernels. Kept per
    device: made during a graph's warm-up, never copied from the host inside a recording."""
    if device not in _TAP_INDEX:
        index = [[[9 if r is None or s is None else 3 * r + s for s in col_taps] for r in row_taps]
                 for row_taps in TRANSPOSED_TAPS for col_taps in TRANSPOSED_TAPS]
        _TAP_INDEX[device] = torch.tensor(index, device=device)
    return _TAP_INDEX[device]


def blurred_phases(t: torch.Tensor, terms: tuple) -> torch.Tensor:
    """The blur of a transposed convolution's output t, given in phase form [B, 2, 2, O, H + 1, W + 1] (row parity,
    column parity, o, row, column), as [B, O, H, 2, W, 2] (row, row parity, column, column parity).
    terms: `blur_phase_terms` of the blur's taps, along rows and columns alike."""
    height, width = t.shape[4] - 1, t.shape[5] - 1
    t = F.pad(t, (1, 0, 1, 0))  # index n + 1 is t's row (column) n of that parity; the blur reads n - 1 .. n + 1
    rows = []
    for p in range(2):
        columns = [sum(a * b * t[:, rp, cp, :, 1 + dn:1 + dn + height, 1 + dm:1 + dm + width]
                       for rp, dn, a in terms[p] for cp, dm, b in terms[q]) for q in range(2)]
        rows.append(torch.stack(columns, dim=-1))  # [B, O, H, W, 2]
    return torch.stack(rows, dim=3)


@fused
def _blurred_activation_into(out, t, terms, noise, noise_weight, bias):
    out.copy_(_noise_and_activation(blurred_phases(t, terms), noise, noise_weight, bias))


def blurred_into(out: torch.Tensor, t: torch.Tensor, taps: tuple, noise: Optional[torch.Tensor] = None,
                 noise_weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> None:
    """out [B, O, H, 2, W, 2] <- the blur of the transposed convolution t (`blurred_phases`), then noise, bias and
    activation unless noise is None: one Triton kernel, else torch.compile's fusion or eager PyTorch."""
    if triton_runs(t) and kernels.blurred_activation(t, taps, noise, noise_weight, bias, out) is not None:
        return
    terms = blur_phase_terms(taps)
    if noise is None:
        out.copy_(blurred_phases(t, terms))
    else:
        _blurred_activation_into(out, t, terms, noise, noise_weight, bias)


def transposed_up_to(x: torch.Tensor) -> int:
    """The largest input size at which x's upsampling layers run as the transposed form (0: none). Only where its
    blur epilogue is one fused step (the Triton kernel, or torch.compile's), and not in strict fp32: eagerly the
    epilogue is ~100 small kernels a layer (H100, eager, invert(5) + decode in one process: tf32 batch 8
    40.9 -> 33.0 ms/image, batch 1 63.9 -> 51.8; bf16 28.9 -> 22.3 and 49.9 -> 37.6 without it), and with TF32 off
    cuDNN picks an algorithm with a 65 GiB workspace for its 2x2 convolution at 64 px (batch 1, 15 ms a call).

    On the Triton kernels, one generator pass (1024 px, offsets on, graphed; H100, ms/image) against the phases at
    every size: at batch 1 the transposed form pays at every size (bf16 1.466 -> 1.375 up to 64 px -> 1.256 at all
    sizes; tf32 2.440 -> 2.234 -> 2.042); at batch 8 up to 64 px (bf16 1.127 -> 1.066, all sizes 1.277; tf32
    2.197 -> 1.909, 128 px 1.894, all sizes 2.100). README, "Speed and memory", has the whole A/B."""
    strict_fp32 = x.dtype == torch.float32 and not torch.backends.cudnn.allow_tf32
    if not on_gpu(x) or strict_fp32:
        return 0
    if triton_runs(x):
        return TRANSPOSED_UP_TO_ONE_IMAGE if x.shape[0] == 1 else TRANSPOSED_UP_TO
    return TRANSPOSED_UP_TO if _blurred_activation_into.compiles() else 0


@dataclass
class Upsampled:
    """An upsampling layer's convolution before interleaving: `parts` are [B, O, H, n, W, 2] views of the phase
    convolutions (row, row parity, column, column parity), row parities 0 then 1; or, `transposed`, one part: the
    transposed convolution in phase form for `blurred_phases`."""

    parts: list
    transposed: bool = False
    taps: tuple = ()  # the blur's 1-D taps, for the transposed form

    def into(self, out: torch.Tensor, noise: Optional[torch.Tensor] = None, noise_weight=None, bias=None):
        """Writes the layer's output into packed `out` [B, O, 2H, 2W]: the convolution alone, or with noise, bias
        and activation (StyledConv)."""
        if self.transposed:
            (t,) = self.parts
            blurred_into(phase_view(out), t, self.taps, None if noise is None else phase_view(noise), noise_weight,
                         bias)
            return out
        start = 0
        for part in self.parts:
            rows = slice(start, start + part.shape[3])
            start = rows.stop
            if noise is None:
                phase_view(out)[:, :, :, rows].copy_(part)
            else:
                styled_activation(part, phase_view(noise)[:, :, :, rows], noise_weight, bias,
                                  phase_view(out)[:, :, :, rows])
        return out


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
    grouped convolution runs the whole batch; a 1x1 layer (toRGB) is one block-diagonal matrix product. An
    upsampling layer runs as four phase convolutions (see the top of this section).
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

    def upsample_plan(self, batch: int, height: int, transposed_up_to: int = TRANSPOSED_UP_TO) -> tuple:
        """How an upsampling layer runs at this input size: "transposed", or the output row parities of each
        blur-folded phase convolution.

        Up to 64 px the transposed form: its kernels have 16 taps per output channel instead of 36 and need no
        matrix product, which pays where the per-sample weights outweigh the activations (H200, whole layer with
        weights and epilogue, batch 8: 8 -> 16 px 312 -> 227 us in bf16, 513 -> 390 in tf32). Above, the blur-folded
        phases, whose epilogue only interleaves: all four phases in one convolution, or one convolution per row
        parity where cuDNN's grouped kernels with 4x as many outputs as inputs are slow (batch 8, 256 px input:
        1.42 ms as one convolution, 0.52 ms as two; at batch 1 one is faster). `transposed_up_to`: the function of
        that name."""
        if height <= transposed_up_to:
            return "transposed"
        if batch > 1 and height >= SPLIT_ROW_PARITIES_FROM:
            return (0,), (1,)
        return ((0, 1),)

    def per_sample_weights(self, batch: int, height: int, style: torch.Tensor, delta: Optional[torch.Tensor],
                           dtype: torch.dtype, transposed_up_to: int):
        """What `convolve` convolves a packed input of this batch, height and dtype with: the per-sample weights of
        its plan (for an upsampling layer in phase form, a list of one per row-parity group). Separate from
        `convolve` so that `Generator` can build every layer's weights ahead, on a second stream."""
        if self.kernel_size == 1:
            return block_diagonal_weight(self.weight, self.scale, style, delta, dtype)
        if not self.upsample:
            return modulated_weight(self.weight, self.scale, style, delta, self.demodulate, dtype)
        plan = self.upsample_plan(batch, height, transposed_up_to)
        if plan == "transposed":
            return transposed_taps(self.weight, self.scale, style, delta, self.demodulate, dtype)
        weight = padded_taps(self.weight, self.scale, style, delta, self.demodulate, dtype)
        return [phase_weights(weight, self.blur.phase_rows(parities)) for parities in plan]

    def convolve(self, x: torch.Tensor, style: torch.Tensor, delta: Optional[torch.Tensor] = None, weights=None):
        """The convolution of packed x with this layer's modulation `style` [B, in] (`modulation(w)`), before noise
        and bias: packed [B, O, H, W], or for an upsampling layer an `Upsampled`. weights: `per_sample_weights` for
        this x, style and delta, if already built."""
        batch, c, h, wd = x.shape
        o = self.out_channel
        if style.shape[0] != batch:
            raise ValueError(f"the activations have batch {batch} but the styles have batch {style.shape[0]}")
        if delta is not None and delta.shape[0] not in (1, batch):
            raise ValueError(f"weight offsets have batch {delta.shape[0]} but the activations have batch {batch}; "
                             f"pass offsets with batch {batch} or 1")
        up_to = transposed_up_to(x) if self.upsample else 0  # only upsampling layers have forms to choose
        if weights is None:
            weights = self.per_sample_weights(batch, h, style, delta, x.dtype, up_to)
        if self.kernel_size == 1:
            # [H*W, B*C] @ block-diagonal [B*C, B*O]: one product over the packed activations, read once. (A
            # non-finite activation would reach the other samples' outputs through the zeros: 0 * inf is NaN.)
            pixels = x.as_strided((h * wd, batch * c), (batch * c, 1))
            with tf32_matmuls() if conv_product_uses_tf32(pixels, batch) else contextlib.nullcontext():
                out = pixels @ weights
            n = weights.shape[1]  # B*O, padded
            return out.as_strided((batch, o, h, wd), (o, 1, wd * n, n))
        if not self.upsample:
            out = per_sample_conv(x, weights, self.padding)
            return out.as_strided((batch, o, h, wd), (o, 1, wd * batch * o, batch * o))
        plan = self.upsample_plan(batch, h, up_to)
        if plan == "transposed":
            out = per_sample_conv(x, weights, padding=1)  # [1, B*4*O, H+1, W+1], memory (H+1, W+1, B, 2, 2, O)
            m = 4 * o
            t = out.as_strided((batch, 2, 2, o, h + 1, wd + 1), (m, 2 * o, o, 1, (wd + 1) * batch * m, batch * m))
            return Upsampled([t], transposed=True, taps=self.blur.taps)
        parts = []
        for parities, weight in zip(plan, weights):
            out = per_sample_conv(x, weight, padding=1)
            n = len(parities)  # out: [1, B*O*2n, H, W], memory (H, W, B, O, row parity, column parity)
            m = 2 * n
            parts.append(out.as_strided((batch, o, h, n, wd, 2), (m * o, m, wd * batch * m * o, 2, batch * m * o, 1)))
        return Upsampled(parts)

    def forward(self, x: torch.Tensor, w: torch.Tensor, delta: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, C, H, W] -> [B, O, H', W'] (packed), the official ModulatedConv2d's output."""
        x = pack(x)
        out = self.convolve(x, self.modulation(w), delta)
        if not self.upsample:
            return out
        b, _, h, wd = x.shape
        return out.into(packed_empty(b, self.out_channel, 2 * h, 2 * wd, like=x))


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

    def forward(self, x, style, noise, delta=None, weights=None):
        """= activate(noise(conv(x))), with the interleaving of upsampling phases, the noise, the bias and the
        activation in one step. style: the layer's modulation [B, in] (`conv.modulation(w)`, or
        `Generator.styles`); weights: as in `ModulatedConv2d.convolve`. Packed in, packed out."""
        x = pack(x)
        y = self.conv.convolve(x, style, delta, weights)
        if self.conv.upsample:
            b, _, h, wd = x.shape
            out = packed_empty(b, self.conv.out_channel, 2 * h, 2 * wd, like=x)
            return y.into(out, noise, self.noise.weight, self.activate.bias)
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

    def forward(self, x, style, skip=None, delta=None, contiguous: bool = False, weights=None):
        """RGB of x, plus the upsampled RGB of the previous resolution. style, weights: as in StyledConv. contiguous:
        return an NCHW-contiguous image (the generator's output) instead of the matrix product's layout."""
        out = self.conv.convolve(pack(x), style, delta, weights)
        taps = None if skip is None else self.upsample.taps
        if triton_runs(out):
            image = kernels.rgb_output(out, self.bias, skip, taps, contiguous)
            if image is not None:
                return image
        if not contiguous:
            return rgb_output(out, self.bias, skip, taps)
        # written in NCHW order by the fused step itself: copying the [H*W, B*3] product's layout afterwards took
        # ~270 us per generator pass at batch 8, 1024 px (H200, bf16)
        image = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        rgb_output_into(image, out, self.bias, skip, taps)
        return image


def _rgb_output(out: torch.Tensor, bias: torch.Tensor, skip: Optional[torch.Tensor], taps: Optional[tuple]):
    out = out + bias.to(out.dtype)
    return out if skip is None else out + fir_upsample_2x(skip, taps)


# toRGB's output + bias (+ the upsampled skip), fused into one step on CUDA
rgb_output = fused(_rgb_output)


@fused
def rgb_output_into(image: torch.Tensor, out: torch.Tensor, bias: torch.Tensor, skip: Optional[torch.Tensor],
                    taps: Optional[tuple]) -> None:
    image.copy_(_rgb_output(out, bias, skip, taps))


def weights_ahead(x: torch.Tensor) -> bool:
    """Whether a generator pass over x builds its layers' weights ahead on a second stream: GPU inference, up to
    WEIGHTS_AHEAD_MAX_BATCH images."""
    return x.is_cuda and not torch.is_grad_enabled() and x.shape[0] <= WEIGHTS_AHEAD_MAX_BATCH


_SIDE_STREAMS: dict = {}
_LAST_MAIN_STREAMS: dict = {}


class WeightsAhead:
    """Every layer's per-sample weights, built on a second CUDA stream while the current one runs the layers: they
    need only the styles and offsets, and at batch 1 the small convolutions of the first layers leave most of the
    GPU idle. `get(layer)` makes the current stream wait for that layer's weights; `join()` ends the pass (a CUDA
    graph recording needs the second stream joined back).

    The weights' memory belongs to the second stream, and they stay referenced until `join`, after the current
    stream's last use of them is queued: the second stream reuses that memory only in a later pass, which starts by
    waiting for the current stream, and for the one the previous pass ran on if that was another (outside a graph
    recording, which begins with the device synchronized), so nothing overwrites weights still being read."""

    def __init__(self, generator: "Generator", styles: Sequence[torch.Tensor], deltas: Sequence, x: torch.Tensor):
        device = x.device
        if device not in _SIDE_STREAMS:  # one per device: cuBLAS keeps a workspace per stream it has run on
            _SIDE_STREAMS[device] = torch.cuda.Stream(device)
        self.main, self.side = torch.cuda.current_stream(device), _SIDE_STREAMS[device]
        previous = _LAST_MAIN_STREAMS.get(device)
        if previous is not None and previous != self.main and not torch.cuda.is_current_stream_capturing():
            self.side.wait_stream(previous)
        _LAST_MAIN_STREAMS[device] = self.main
        self.side.wait_stream(self.main)  # the styles and offsets were made on the current stream
        batch, up_to = x.shape[0], transposed_up_to(x)
        self.ready = []
        with torch.cuda.stream(self.side):
            for layer, conv in enumerate(generator.layer_convs()):
                weights = conv.per_sample_weights(batch, generator.layer_input_size(layer), styles[layer],
                                                  deltas[layer], x.dtype, up_to)
                event = torch.cuda.Event()
                event.record(self.side)
                self.ready.append((event, weights))

    def get(self, layer: int):
        event, weights = self.ready[layer]
        self.main.wait_event(event)
        return weights

    def join(self) -> None:
        self.main.wait_stream(self.side)
        self.ready = []


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
        self._layer_sizes = config.layer_sizes  # read per layer on every pass (`layer_input_size`)
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

    def layer_input_size(self, layer: int) -> int:
        """The input resolution of a generator layer (HyperStyle's numbering: conv1, toRGB1, then per resolution
        the upsampling conv, the conv and toRGB)."""
        upsamples = layer >= 2 and (layer - 2) % 3 == 0  # the first layer of each resolution from 8 px
        return self._layer_sizes[layer] // 2 if upsamples else self._layer_sizes[layer]

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
                noise_mode: str = "const", new_features: Optional[Mapping[int, torch.Tensor]] = None) -> torch.Tensor:
        """W+ codes [B, n_styles, style_dim] (or W codes [B, style_dim]) -> image [B, 3, size, size] in ~[-1, 1].

        deltas: None, or one entry per generator layer (None where the layer is not tuned).
        noise_mode: "const" uses the stored noise maps (deterministic, as the official inference), "random" draws
        new noise for every sample.
        new_features: {official feature index: [B, C, H, W]} activations that replace the generator's own before
        the next convolution (see `feature_layer`; StyleFeatureEditor decodes this way).
        """
        return self.synthesis(self.styles(self.checked_codes(codes)), deltas, noise_mode, new_features)

    def feature(self, codes: torch.Tensor, index: int, deltas: Optional[Sequence[Optional[torch.Tensor]]] = None,
                noise_mode: str = "const") -> torch.Tensor:
        """The activation [B, C, H, W] at official feature index `index` for W+ codes (the official
        `return_features` list's entry), running only the layers up to it."""
        return self.synthesis_feature(self.styles(self.checked_codes(codes)), index, deltas, noise_mode)

    def checked_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """W+ codes in the generator's dtype (W codes [B, style_dim] repeated), or a clear error for a wrong shape."""
        if codes.ndim == 2:
            codes = codes[:, None].expand(-1, self.n_styles, -1)
        batch, n_codes, dim = codes.shape
        if n_codes != self.n_styles or dim != self.style_dim:
            raise ValueError(f"this {self.size}-px generator takes codes of shape [B, {self.n_styles}, "
                             f"{self.style_dim}], got {list(codes.shape)}")
        return codes.to(self.input.input.dtype)

    def synthesis(self, styles: Sequence[torch.Tensor], deltas: Optional[Sequence[Optional[torch.Tensor]]] = None,
                  noise_mode: str = "const", new_features: Optional[Mapping[int, torch.Tensor]] = None) -> torch.Tensor:
        """StyleSpace S (every layer's modulation [B, in], `styles`, possibly edited) -> image, as `forward`."""
        return self._synthesize(styles, deltas, noise_mode, new_features or {}, stop_at=None)

    def synthesis_feature(self, styles: Sequence[torch.Tensor], index: int,
                          deltas: Optional[Sequence[Optional[torch.Tensor]]] = None,
                          noise_mode: str = "const") -> torch.Tensor:
        """StyleSpace S -> the activation at official feature index `index`, as `feature`."""
        self.feature_shape(index)
        return self._synthesize(styles, deltas, noise_mode, {}, stop_at=index)

    @property
    def n_features(self) -> int:
        """Length of the official `return_features` list: the constant input, conv1, then two per resolution."""
        return 2 + 2 * len(self.to_rgbs)

    def feature_shape(self, index: int) -> tuple:
        """(channels, resolution) of the activation at official feature index `index` (1 .. n_features - 1)."""
        if not 1 <= index < self.n_features:
            raise ValueError(f"feature index {index} is outside this {self.size}-px generator's features "
                             f"1..{self.n_features - 1}")
        layer = feature_layer(index)
        return self.layer_convs()[layer].out_channel, 4 << ((layer + 1) // 3)

    def _synthesize(self, styles, deltas, noise_mode: str, new_features: Mapping[int, torch.Tensor],
                    stop_at: Optional[int]) -> torch.Tensor:
        """The synthesis network: the image, or with `stop_at` the activation at that official feature index.
        `new_features` replace activations by official index, as the official `insert_feature` (feature_scale 1):
        feature k is replaced where it enters the next convolution, so a toRGB that reads it at its own resolution
        still sees the generator's own activation."""
        self.check_styles(styles)
        batch = styles[0].shape[0]
        if deltas is None:
            deltas = [None] * self.n_layers
        elif len(deltas) != self.n_layers:
            raise ValueError(f"expected {self.n_layers} weight offsets (one per generator layer, None where the layer "
                             f"is not tuned), got {len(deltas)}")
        for layer, d in enumerate(deltas):
            if d is not None and d.shape[0] not in (1, batch):
                raise ValueError(f"weight offsets for layer {layer} have batch {d.shape[0]} but the codes have batch "
                                 f"{batch}; pass offsets with batch {batch} or 1")
        new_features = self._checked_new_features(new_features, batch)
        noises = self._noises(batch, noise_mode, styles[0])
        x = pack(self.input(batch))
        ahead = WeightsAhead(self, styles, deltas, x) if stop_at is None and weights_ahead(x) else None
        weights = ahead.get if ahead is not None else lambda layer: None
        out = self.conv1(x, styles[0], noises[0], deltas[0], weights(0))
        if stop_at == 1:
            return out
        skip = self.to_rgb1(out, styles[1], delta=deltas[1], weights=weights(1))
        for i, to_rgb in enumerate(self.to_rgbs):
            layer, feature = 2 + 3 * i, 2 + 2 * i  # feature: the official index of this upsampling conv's output
            out = new_features.get(feature - 1, out)
            out = self.convs[2 * i](out, styles[layer], noises[1 + 2 * i], deltas[layer], weights(layer))
            if stop_at == feature:
                return out
            out = new_features.get(feature, out)
            out = self.convs[2 * i + 1](out, styles[layer + 1], noises[2 + 2 * i], deltas[layer + 1],
                                        weights(layer + 1))
            if stop_at == feature + 1:
                return out
            skip = to_rgb(out, styles[layer + 2], skip, delta=deltas[layer + 2],
                          contiguous=i == len(self.to_rgbs) - 1, weights=weights(layer + 2))
        if ahead is not None:
            ahead.join()
        return skip

    def _checked_new_features(self, new_features: Mapping[int, torch.Tensor], batch: int) -> dict:
        """The replacement activations in the generator's dtype (the official `type_as`), or a clear error."""
        checked = {}
        for index, tensor in new_features.items():
            if index == self.n_features - 1:
                raise ValueError(f"feature {index} is this {self.size}-px generator's last activation: no convolution "
                                 f"reads it, so replacing it would change nothing; use a larger generator")
            channels, res = self.feature_shape(index)
            if tensor.ndim != 4 or tuple(tensor.shape) != (batch, channels, res, res):
                raise ValueError(f"new feature {index} should have shape [{batch}, {channels}, {res}, {res}], got "
                                 f"{list(tensor.shape)}")
            checked[index] = tensor.to(self.input.input.dtype)
        return checked

    def styles(self, codes: torch.Tensor) -> list:
        """Every layer's modulation [B, in] from W+ codes [B, n_styles, style_dim], in HyperStyle's layer numbering.

        All layers' affine maps run as one product of every code with all their weights stacked (18 x 26 small
        products, most of them unused): a few kernels instead of ~80 small ones per generator pass."""
        mods = [conv.modulation for conv in self.layer_convs()]
        weight = torch.cat([m.weight for m in mods]) * mods[0].scale  # every one maps style_dim, lr_mul 1
        bias = torch.cat([m.bias for m in mods]) * mods[0].lr_mul
        every = F.linear(codes, weight.to(codes.dtype), bias.to(codes.dtype))  # [B, n_styles, sum of widths]
        styles, start = [], 0
        for layer, m in enumerate(mods):
            width = m.weight.shape[0]
            styles.append(every[:, style_index(layer), start:start + width])
            start += width
        return styles

    def style_widths(self) -> list:
        """The width of every layer's style vector (its input channels), in HyperStyle's layer numbering."""
        return [conv.in_channel for conv in self.layer_convs()]

    def check_styles(self, styles: Sequence[torch.Tensor]) -> None:
        widths = self.style_widths()
        if len(styles) != len(widths):
            raise ValueError(f"this {self.size}-px generator takes {len(widths)} style vectors (one per layer), "
                             f"got {len(styles)}")
        batch = styles[0].shape[0]
        for layer, (s, width) in enumerate(zip(styles, widths)):
            if s.ndim != 2 or s.shape != (batch, width):
                raise ValueError(f"style vector {layer} should have shape [{batch}, {width}], got {list(s.shape)}")

    def _noises(self, batch: int, mode: str, like: torch.Tensor) -> list:
        stored = [getattr(self.noises, f"noise_{i}") for i in range(self.config.n_noises)]
        if mode == "const":
            return stored
        if mode == "random":
            return [torch.randn(batch, 1, *n.shape[2:], device=n.device, dtype=n.dtype) for n in stored]
        raise ValueError(f"noise_mode must be 'const' or 'random', got {mode!r}")
