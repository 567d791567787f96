"""The encoders' backbones at GPU inference, with each convolution's batch norm, activation and residual in one pass.
Both engines' backbones: HyperStyle's ResNet-34 and IR-SE-50 here, SFE's IResNet-50 blocks and feature stacks too.

The hypernetwork's ResNet-34 (five passes per inversion) and IR-SE-50 (the W-encoder, e4e) spent a third of their
GPU time outside convolutions: cuDNN's batch norm, ReLU/PReLU, the squeeze-and-excitation product, the residual
addition and the identity shortcut's copy, each a pass over the activations (H100, tf32, batch 8: batch norm alone
took 28% of the two backbones' time). Here an eval-mode batch norm is a per-channel scale and shift, and everything
after a convolution up to the next one is `channel_epilogue`: one Triton kernel (`stylegan2/kernels.py`).

This runs only where the generator's Triton kernels run (CUDA inference, the default mode). Everywhere else (CPU,
MPS, no Triton, autograd, training, HYPERSTYLE_COMPILE=0 or 1) the modules' own forward runs, unchanged.
`channel_epilogue`'s PyTorch twin gives the same numbers as the kernel and as the modules (tests/test_kernels.py).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ...stylegan2 import kernels
from ...stylegan2.generator import triton_runs

RELU, PRELU = 1, 2


def applies(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether `module`'s backbone takes the fused path for input x."""
    return triton_runs(x) and not module.training


def folded_batch_norm(bn: nn.BatchNorm2d) -> tuple:
    """An eval-mode batch norm as fp32 (scale, shift) with bn(x) = x * scale + shift. Kept on the module until its
    tensors change (moved, replaced or updated in place); not kept while a CUDA graph records, where the values
    would only be computed at replay."""
    tensors = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
    key = tuple((t.data_ptr(), t._version) for t in tensors) + (bn.eps,)
    cached = bn.__dict__.get("_folded")
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        scale = bn.weight.float() * torch.rsqrt(bn.running_var.float() + bn.eps)
        shift = bn.bias.float() - bn.running_mean.float() * scale
    if not (scale.is_cuda and torch.cuda.is_current_stream_capturing()):
        bn.__dict__["_folded"] = (key, (scale, shift))
    return scale, shift


def channel_epilogue(x: torch.Tensor, bn: nn.BatchNorm2d, act: Union[None, str, nn.PReLU] = None,
                     gate: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                     residual_bn: Optional[nn.BatchNorm2d] = None) -> torch.Tensor:
    """act(bn(x) * gate + residual_bn(residual)), channels-last, computed in fp32 and rounded once.

    x [N, C, H, W]; gate [N, C] (squeeze-and-excitation) or None; residual of x's shape (any strides) or None,
    through its own batch norm if residual_bn; act None, "relu" or a PReLU module."""
    scale, shift = folded_batch_norm(bn)
    code = 0 if act is None else (RELU if act == "relu" else PRELU)
    slope = None if code != PRELU else act.weight.expand(x.shape[1]).contiguous()
    res_scale, res_shift = folded_batch_norm(residual_bn) if residual_bn is not None else (None, None)
    if triton_runs(x):
        out = kernels.channel_epilogue(x, scale, shift, code, slope, gate, residual, res_scale, res_shift)
        if out is not None:
            return out
    return epilogue_reference(x, scale, shift, code, slope, gate, residual, res_scale, res_shift)


def epilogue_reference(x, scale, shift, act: int = 0, slope=None, gate=None, residual=None, residual_scale=None,
                       residual_shift=None) -> torch.Tensor:
    """`kernels.channel_epilogue` in PyTorch (its arguments): what runs where the kernel does not."""
    per_channel = (1, -1, 1, 1)
    v = x.float() * scale.view(per_channel) + shift.view(per_channel)
    if gate is not None:
        v = v * gate.float()[:, :, None, None]
    if residual is not None:
        r = residual.float()
        if residual_scale is not None:
            r = r * residual_scale.view(per_channel) + residual_shift.view(per_channel)
        v = v + r
    if act == RELU:
        v = torch.relu(v)
    elif act == PRELU:
        v = torch.where(v > 0, v, v * slope.float().view(per_channel))
    return v.to(x.dtype).contiguous(memory_format=torch.channels_last)


def resnet_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """HyperNetwork's ResNet-34 (`hypernetwork._backbone`): stem conv -> bn -> PReLU, then torchvision's basic
    blocks, relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut), two passes after convolutions per block."""
    x = x.contiguous(memory_format=torch.channels_last)  # cat([x, y_hat]) comes in plain layout
    x = channel_epilogue(net.conv1(x), net.bn1, act=net.relu)
    for block in net.body:
        out = channel_epilogue(block.conv1(x), block.bn1, act="relu")
        if block.downsample is not None:
            residual, residual_bn = block.downsample[0](x), block.downsample[1]
        else:
            residual, residual_bn = x, None
        x = channel_epilogue(block.conv2(out), block.bn2, act="relu", residual=residual, residual_bn=residual_bn)
    return x


def irse_stages(backbone: nn.Module, x: torch.Tensor) -> list:
    """IRSEBackbone's output at the end of each stage (`encoders._stages`)."""
    conv, bn, prelu = backbone.input_layer
    x = channel_epilogue(conv(x.contiguous(memory_format=torch.channels_last)), bn, act=prelu)
    outputs = []
    for i, unit in enumerate(backbone.body):
        x = _irse_unit(unit, x)
        if i in backbone.stage_ends:
            outputs.append(x)
    return outputs


def _irse_unit(unit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """BottleneckIRSE: res = se(bn_out(conv2(prelu(conv1(bn_in(x)))))), out = res + shortcut(x). The gate reads the
    mean of bn_out's output, which is bn_out applied to the convolution's mean; the product with the gate, bn_out,
    the shortcut's batch norm and the addition are one pass. The shortcut without a convolution is MaxPool2d(1, s):
    the input itself, every s-th pixel, read in place instead of copied."""
    bn_in, conv1, prelu, conv2, bn_out, se = unit.res_layer
    y = conv2(prelu(conv1(channel_epilogue(x, bn_in))))
    scale, shift = folded_batch_norm(bn_out)
    pooled = y.mean((2, 3), dtype=torch.float32) * scale + shift
    gate = se.sigmoid(se.fc2(se.relu(se.fc1(pooled.to(y.dtype)[:, :, None, None])))).flatten(1)
    shortcut = unit.shortcut_layer
    if isinstance(shortcut, nn.MaxPool2d):
        stride = shortcut.stride if isinstance(shortcut.stride, int) else shortcut.stride[0]
        residual, residual_bn = x[:, :, ::stride, ::stride], None
    else:
        residual, residual_bn = shortcut[0](x), shortcut[1]
    return channel_epilogue(y, bn_out, gate=gate.contiguous(), residual=residual, residual_bn=residual_bn)


# ---- StyleFeatureEditor's backbones (engines/sfe) ----------------------------------------------------------------

def stem(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """conv -> batch norm -> PReLU."""
    conv, bn, prelu = layers
    return channel_epilogue(conv(x.contiguous(memory_format=torch.channels_last)), bn, act=prelu)


def improved_basic_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ArcFace's IBasicBlock (`sfe.inverter.ImprovedBasicBlock`): bn3(conv2(prelu(bn2(conv1(bn1(x)))))) + shortcut,
    the shortcut's batch norm and the addition in the last pass."""
    x = x.contiguous(memory_format=torch.channels_last)
    out = channel_epilogue(block.conv1(channel_epilogue(x, block.bn1)), block.bn2, act=block.prelu)
    if block.downsample is not None:
        residual, residual_bn = block.downsample[0](x), block.downsample[1]
    else:
        residual, residual_bn = x, None
    return channel_epilogue(block.conv2(out), block.bn3, residual=residual, residual_bn=residual_bn)


def pre_activated_pair(layers: nn.Sequential, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3 -> BN (+ residual): SFE's content layer and each residual block of its
    feature stacks."""
    bn_in, conv1, bn_mid, prelu, conv2, bn_out = layers
    x = x.contiguous(memory_format=torch.channels_last)
    out = channel_epilogue(conv1(channel_epilogue(x, bn_in)), bn_mid, act=prelu)
    return channel_epilogue(conv2(out), bn_out, residual=residual)


def feature_stack(stack: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`sfe.feature_editor.FeatureStack`: conv1x1, then x = x + block(x) per block, the addition in the block's
    last pass."""
    x = stack.conv(x.contiguous(memory_format=torch.channels_last)).contiguous(memory_format=torch.channels_last)
    for block in stack.body:
        x = pre_activated_pair(block.body, x, residual=x)
    return x
