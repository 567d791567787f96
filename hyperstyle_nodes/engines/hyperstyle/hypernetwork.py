"""HyperStyle's hypernetwork: a ResNet-34 over cat([input, reconstruction]) and one refinement head per tuned layer.

Module and parameter names match the released `hyperstyle_ffhq.pt` (`hypernet.*` keys), so it loads with
`strict=True`. Shapes, for the released 1024-px model:

    input [B, 6, 256, 256] -> conv1/bn1/relu [B, 64, 128, 128] -> body (16 basic blocks) -> features [B, 512, 16, 16]
    shared heads   (3x3, 512->512 layers): features -> code [B, 512] -> shared hypernet -> delta [B, 512, 512, 3, 3]
    per-channel heads (other 3x3 layers):  features -> [B, out*in] -> compact delta [B, out, in]
    toRGB heads (only if a checkpoint tunes them): features -> delta [B, 3, in, 1, 1]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

from ...stylegan2.generator import EqualLinear, fused, tf32_for_convolutions_only, tf32_matmuls
from . import fused_backbones

# Layers whose offsets come from the one shared hypernet: the 3x3 convs of the 512-channel resolutions (4-64 px).
SHARED_LAYERS = (0, 2, 3, 5, 6, 8, 9, 11, 12)
FEATURE_SPATIAL = 16  # the backbone's output is 16x16 for a 256x256 input


@dataclass(frozen=True)
class HypernetConfig:
    """Architecture of the hypernetwork. Defaults are the released model's; widths shrink for tiny test models."""

    layer_shapes: tuple  # (kernel, in, out) per generator layer, from GeneratorConfig.layer_shapes
    layers_to_tune: tuple
    separable: bool = False  # SharedWeightsHyperNetResNetSeparable heads for the non-shared layers
    input_nc: int = 6
    widths: tuple = (64, 128, 256, 512)  # ResNet-34 stages
    blocks: tuple = (3, 4, 6, 3)
    feature_dim: int = 512  # channels into each head's output and size of the shared hypernet's code
    head_channels: int = 256  # inner width of per-layer heads
    shared_head_channels: int = 128  # inner width of shared-hypernet heads

    def __post_init__(self):
        n = len(self.layer_shapes)
        bad = [i for i in self.layers_to_tune if not 0 <= i < n]
        if bad:
            raise ValueError(f"layers_to_tune {bad} do not exist: this generator has layers 0..{n - 1}")

    @property
    def shared_layers(self) -> list:
        return [i for i in self.layers_to_tune if i in SHARED_LAYERS]

    @property
    def shared_channels(self) -> int:
        """In/out channels of the layers the shared hypernet serves (512 in every released model)."""
        return self.layer_shapes[0][1]


def parse_layers_to_tune(value, n_layers: int) -> tuple:
    """The official opts store layers_to_tune as a comma-separated string; empty means every layer."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return tuple(range(n_layers))
    if isinstance(value, str):
        return tuple(int(v) for v in value.split(",") if v.strip())
    return tuple(int(v) for v in value)


class SharedWeightsHypernet(nn.Module):
    """Two-step factorised hypernet: code z [B, z] -> kernel [B, out, in, 3, 3]."""

    def __init__(self, channels: int, z_dim: int, kernel_size: int = 3):
        super().__init__()
        self.channels, self.z_dim, self.kernel_size = channels, z_dim, kernel_size
        # official init: N(0, 1)/40, folded into (-2, 2)
        self.w1 = nn.Parameter(torch.fmod(torch.randn(z_dim, channels * kernel_size ** 2) / 40, 2))
        self.b1 = nn.Parameter(torch.fmod(torch.randn(channels * kernel_size ** 2) / 40, 2))
        self.w2 = nn.Parameter(torch.fmod(torch.randn(z_dim, channels * z_dim) / 40, 2))
        self.b2 = nn.Parameter(torch.fmod(torch.randn(channels * z_dim) / 40, 2))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch, k = z.shape[0], self.kernel_size
        h_in = (z @ self.w2 + self.b2).view(batch, self.channels, self.z_dim)
        if tf32_emulates_fp32(h_in, self.w1):
            h_final = addmm_3xtf32(self.b1, h_in.view(-1, self.z_dim), self.w1)
        else:
            h_final = h_in @ self.w1 + self.b1  # [B, in, out*k*k]
        # The released weights were trained with this memory layout read back as [out, in, k, k]: a view, not a
        # transpose, so it must stay a view to reproduce them.
        return h_final.view(batch, self.channels, self.channels, k, k)


def tf32_emulates_fp32(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `addmm_3xtf32` replaces a strict-fp32 product: on CUDA, in fp32, outside autograd, when the user
    lets convolutions use TF32 (PyTorch's default) but not matrix products (also the default). The strict-fp32
    mode (TF32 off everywhere) keeps cuBLAS's SGEMM."""
    return (a.is_cuda and a.dtype == b.dtype == torch.float32 and tf32_for_convolutions_only()
            and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)))


def split_tf32(t: torch.Tensor) -> tuple:
    """t = hi + lo exactly: hi keeps t's 11 leading significant bits (a TF32 value), lo the 13 bits below them."""
    hi = (t.view(torch.int32) & -(1 << 13)).view(torch.float32)
    return hi, t - hi


def addmm_3xtf32(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bias + a @ b to fp32 accuracy on TF32 tensor cores ("3xTF32"): a_hi b_hi is exact per term, and the
    correction a_hi b_lo + a_lo b_hi (one product over the concatenated K) is off by ~2^-22 relative; only
    a_lo b_lo (~2^-24) is left out. The shared hypernet's second product (batch 8: [24576, 512] @ [512, 4608]) took
    2.70 ms per pass as SGEMM on an H200 and 1.30 ms this way, max error against float64 3.1e-7 (SGEMM 2.2e-7)."""
    a_hi, a_lo = split_tf32(a)
    b_hi, b_lo = split_tf32(b)
    with tf32_matmuls():
        out = torch.addmm(bias, a_hi, b_hi)
        # the small terms in their own product: added to the large ones inside one accumulator they lost bits
        return out.addmm_(torch.cat([a_hi, a_lo], dim=1), torch.cat([b_lo, b_hi]))


def _conv_stack(channels: list, strides: list) -> nn.Sequential:
    """Conv3x3 + LeakyReLU(0.01) pairs; indices 0, 2, 4, ... hold the weights, as in the checkpoints."""
    modules = []
    for (c_in, c_out), stride in zip(zip(channels[:-1], channels[1:]), strides):
        modules += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.LeakyReLU()]
    return nn.Sequential(*modules)


class SharedHead(nn.Module):
    """features [B, C, 16, 16] -> code [B, feature_dim] for the shared hypernet (HyperRefinementBlock)."""

    def __init__(self, hypernet: SharedWeightsHypernet, in_channels: int, inner: int, feature_dim: int):
        super().__init__()
        self.feature_dim = feature_dim
        # 16 -> 16 -> 8 -> 4 -> 2 -> 1
        self.convs = _conv_stack([in_channels, inner, inner, inner, inner, feature_dim], [1, 2, 2, 2, 2])
        self.linear = EqualLinear(feature_dim, feature_dim)
        self.hypernet = hypernet  # the same module in every shared head (its keys repeat in the checkpoints)

    def code(self, features: torch.Tensor) -> torch.Tensor:
        return self.finish(self.convs(features))

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The output of `convs` [B, feature_dim, 1, 1] -> the code."""
        return self.linear(x.reshape(-1, self.feature_dim))

    def forward(self, features):
        return self.hypernet(self.code(features))


class ChannelHead(nn.Module):
    """features -> compact per-(out, in) offsets [B, out, in] (3x3 layers) or a 1x1 kernel [B, 3, in, 1, 1] (toRGB).

    The official RefinementBlock repeats the 3x3 case over the kernel; we keep it compact and let the generator
    broadcast it.
    """

    def __init__(self, shape: tuple, in_channels: int, inner: int, feature_dim: int):
        super().__init__()
        self.kernel_size, self.in_ch, self.out_ch = shape
        n_convs = 3 if self.kernel_size == 3 else 4  # 16 -> 2 (then average-pooled), or 16 -> 1
        widths = [in_channels] + [inner] * (n_convs - 1) + [feature_dim]
        self.convs = _conv_stack(widths, [2] * n_convs)
        projection = nn.Conv2d(feature_dim, self.in_ch * self.out_ch, kernel_size=1)
        if self.kernel_size == 1:
            self.output = nn.Sequential(projection)
        else:
            self.output = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), projection)

    def forward(self, features):
        return self.finish(self.convs(features))

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The output of `convs` -> the offsets. The 1x1 projection runs as a matrix product: cuDNN ran it with an
        unaligned kernel 5x slower than cuBLAS at batch 8 (it reads up to 134 MB of weights)."""
        projection = self.output[-1]
        x = x.flatten(1) if self.kernel_size == 1 else x.mean(dim=(2, 3))  # = AdaptiveAvgPool2d(1)
        x = F.linear(x, projection.weight.flatten(1), projection.bias)
        if self.kernel_size == 1:
            return x.view(-1, self.out_ch, self.in_ch, 1, 1)
        return x.view(-1, self.out_ch, self.in_ch)


class SeparableKernel(nn.Module):
    """Low-rank full kernel [B, out, in, k, k] from a code (SeparableBlock of the official code)."""

    def __init__(self, feature_dim: int, in_ch: int, out_ch: int, kernel_size: int):
        super().__init__()
        self.feature_dim, self.in_ch, self.out_ch, self.k = feature_dim, in_ch, out_ch, kernel_size
        self.make_kernel_in = nn.Linear(feature_dim, kernel_size ** 2 * in_ch)
        self.make_kernel_out = nn.Linear(feature_dim, kernel_size ** 2 * out_ch)
        self.kernel_linear_in = nn.Linear(in_ch, in_ch)
        self.kernel_linear_out = nn.Linear(out_ch, out_ch)

    def forward(self, features):
        f = features.view(-1, self.feature_dim)
        k = self.k
        kernel_in = self.make_kernel_in(f).view(-1, k, k, 1, self.in_ch)
        kernel_out = self.make_kernel_out(f).view(-1, k, k, self.out_ch, 1)
        kernel = kernel_out @ kernel_in  # [B, k, k, out, in] (rank one per tap)
        kernel = self.kernel_linear_in(kernel).permute(0, 1, 2, 4, 3)  # mix input channels -> [B, k, k, in, out]
        kernel = self.kernel_linear_out(kernel)  # mix output channels
        return kernel.permute(0, 4, 3, 1, 2)  # [B, out, in, k, k]


class SeparableHead(nn.Module):
    """features -> full offsets [B, out, in, k, k] through a separable kernel (RefinementBlockSeparable)."""

    def __init__(self, shape: tuple, in_channels: int, inner: int, feature_dim: int):
        super().__init__()
        self.kernel_size, self.in_ch, self.out_ch = shape
        # 16 -> 8 -> 4 -> 2 -> 1
        self.convs = _conv_stack([in_channels, inner, inner, inner, feature_dim], [2, 2, 2, 2])
        if self.kernel_size == 1:
            self.output = nn.Sequential(nn.Conv2d(feature_dim, self.in_ch * self.out_ch, kernel_size=1))
        else:
            self.output = nn.Sequential(SeparableKernel(feature_dim, self.in_ch, self.out_ch, self.kernel_size))

    def forward(self, features):
        return self.finish(self.convs(features))

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The output of `convs` -> the offsets."""
        x = self.output(x)
        if self.kernel_size == 1:
            return x.view(-1, self.out_ch, self.in_ch, 1, 1)
        return x


class HyperNetwork(nn.Module):
    """cat([x, y_hat]) [B, 6, 256, 256] in [-1, 1] -> one offset (or None) per generator layer."""

    def __init__(self, config: HypernetConfig):
        super().__init__()
        self.config = config
        w = config.widths
        self.conv1 = nn.Conv2d(config.input_nc, w[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.relu = nn.PReLU(w[0])
        self.body = nn.Sequential(*_resnet_blocks(w, config.blocks))

        self.shared_weight_hypernet = SharedWeightsHypernet(config.shared_channels, config.feature_dim)
        heads = []
        for layer, shape in enumerate(config.layer_shapes):
            if layer not in config.layers_to_tune:
                heads.append(None)
            elif layer in SHARED_LAYERS:
                if shape != (3, config.shared_channels, config.shared_channels):
                    raise ValueError(f"layer {layer} has shape {shape}; the shared hypernet serves only 3x3 "
                                     f"{config.shared_channels}->{config.shared_channels} layers")
                heads.append(SharedHead(self.shared_weight_hypernet, w[-1], config.shared_head_channels,
                                        config.feature_dim))
            elif config.separable:
                heads.append(SeparableHead(shape, w[-1], config.head_channels, config.feature_dim))
            else:
                heads.append(ChannelHead(shape, w[-1], config.head_channels, config.feature_dim))
        self.refinement_blocks = nn.ModuleList(heads)
        self._levels_cache: dict = {}  # head group -> (weights' signature, StackedLevels), see _stacked_levels

    def tuned_layers(self) -> list:
        return [i for i, head in enumerate(self.refinement_blocks) if head is not None]

    def offset_shapes(self, batch: int) -> dict:
        """Shape of the offsets forward() returns for each tuned layer (compact [B, out, in] for per-channel heads)."""
        shapes = {}
        for i in self.tuned_layers():
            k, c_in, c_out = self.config.layer_shapes[i]
            head = self.refinement_blocks[i]
            compact = isinstance(head, ChannelHead) and k == 3
            shapes[i] = (batch, c_out, c_in) if compact else (batch, c_out, c_in, k, k)
        return shapes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if fused_backbones.applies(self, x):  # GPU inference with the Triton kernels
            return fused_backbones.resnet_features(self, x)
        return _backbone(self, x)

    def forward(self, x: torch.Tensor) -> list:
        features = self.features(x)
        heads = self.refinement_blocks
        # the heads' convolution stacks, batched: 3-5 convolutions per kind of head instead of per head
        stack_outputs = {}
        for layers in self.head_groups():
            stack_outputs.update(zip(layers, run_conv_stacks(self._stacked_levels(layers), features)))
        deltas = [None] * len(heads)
        shared = [i for i, h in enumerate(heads) if isinstance(h, SharedHead)]
        if shared:
            # one pair of matrix products for all shared layers instead of one per layer
            codes = torch.cat([heads[i].finish(stack_outputs[i]) for i in shared])
            kernels = self.shared_weight_hypernet(codes).split(features.shape[0])
            for i, kernel in zip(shared, kernels):
                deltas[i] = kernel
        for i, head in enumerate(heads):
            if head is not None and not isinstance(head, SharedHead):
                deltas[i] = head.finish(stack_outputs[i])
        return deltas

    def head_groups(self) -> list:
        """Tuned layers grouped by the shape of their heads' convolution stacks (same shapes: run together)."""
        groups: dict = {}
        for i in self.tuned_layers():
            convs = [m for m in self.refinement_blocks[i].convs if isinstance(m, nn.Conv2d)]
            key = tuple((c.in_channels, c.out_channels, c.stride, c.padding) for c in convs)
            groups.setdefault(key, []).append(i)
        return list(groups.values())

    def _stacked_levels(self, layers: list) -> "StackedLevels":
        """`stack_levels` of these layers' heads, kept between calls at inference: concatenating the heads' weights
        on every pass cost ~16 copies (0.5 ms) per batch-1 inversion on an H200. Built again when a weight is
        replaced, moved or changed in place (its address or version changes), and never kept under autograd.
        Weights created under torch.inference_mode (as ComfyUI may move them) have no version counter: for those
        only a replaced or moved weight is seen."""
        stacks = [self.refinement_blocks[i].convs for i in layers]
        params = [p for stack in stacks for p in stack.parameters()]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return stack_levels(stacks)
        signature = tuple((p.data_ptr(), -1 if p.is_inference() else p._version, p.dtype) for p in params)
        entry = self._levels_cache.get(tuple(layers))
        if entry is None or entry[0] != signature:
            entry = self._levels_cache[tuple(layers)] = (signature, stack_levels(stacks))
        return entry[1]

    def _apply(self, fn, *args, **kwargs):
        # moved or cast weights: drop the kept copies, so that offloading the model frees their GPU memory too
        self._levels_cache = {}
        return super()._apply(fn, *args, **kwargs)


@fused
def _backbone(net: HyperNetwork, x: torch.Tensor) -> torch.Tensor:
    """The ResNet-34 features. Compiled on CUDA (see `fused`): batch norm, activations and residual additions run
    fused after each convolution instead of as ~120 small kernels per pass (H200, bf16, batch 1: invert + decode
    18.4 -> 16.2 ms/image together with the encoder's backbone)."""
    return net.body(net.relu(net.bn1(net.conv1(x))))


@dataclass(frozen=True)
class StackedLevels:
    """Several `_conv_stack`s of the same shapes as one convolution per depth: (weight, bias, stride, padding,
    groups) per depth, the first reading the common input with all the stacks' kernels, the later ones grouped
    (one group per stack)."""

    levels: tuple
    n_stacks: int
    slope: float


def stack_levels(stacks: list) -> StackedLevels:
    depth = [[m for m in stack if isinstance(m, nn.Conv2d)] for stack in stacks]
    (slope,) = {m.negative_slope for stack in stacks for m in stack if isinstance(m, nn.LeakyReLU)}
    levels = []
    for level, convs in enumerate(zip(*depth)):
        levels.append((torch.cat([c.weight for c in convs]), torch.cat([c.bias for c in convs]), convs[0].stride,
                       convs[0].padding, 1 if level == 0 else len(convs)))
    return StackedLevels(tuple(levels), len(stacks), slope)


def run_conv_stacks(stacked: StackedLevels, features: torch.Tensor) -> list:
    """Each stack's output for the same input (`stack_levels`). Same math as running the stacks one by one; at
    batch 1 the GPU ran ~140 small kernels per pass that way."""
    x = features
    for weight, bias, stride, padding, groups in stacked.levels:
        x = F.leaky_relu(F.conv2d(x, weight, bias, stride=stride, padding=padding, groups=groups), stacked.slope)
    return list(x.chunk(stacked.n_stacks, dim=1))


def _resnet_blocks(widths: tuple, blocks: tuple) -> list:
    """torchvision's ResNet-34 stages flattened into one list (the checkpoints' `body.N`), without the max-pool."""
    modules, in_ch = [], widths[0]
    for stage, (width, n) in enumerate(zip(widths, blocks)):
        for j in range(n):
            stride = 2 if stage > 0 and j == 0 else 1
            downsample = None
            if stride != 1 or in_ch != width:
                downsample = nn.Sequential(nn.Conv2d(in_ch, width, 1, stride=stride, bias=False),
                                           nn.BatchNorm2d(width))
            modules.append(BasicBlock(in_ch, width, stride=stride, downsample=downsample))
            in_ch = width
    return modules
