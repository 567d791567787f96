"""One input policy for images, shared by the library, the nodes, the CLI and face alignment.

Values:
- uint8 images are 0..255 and are divided by 255;
- floating-point images must be finite and in [0, 1]. Values up to OVERSHOOT outside are clamped: resampling
  overshoots at hard edges (ComfyUI's bicubic Upscale Image does not clamp, and its kernel reaches
  -0.45..1.45). Anything further out is refused with the range found and how to fix it: a 0..255 float image
  (almost any photo has a value above 1.5) or a [-1, 1] image (almost any has one below -0.5) is never guessed.
- any other dtype is refused.
Layouts:
- the library (`HyperStyleModel.invert/encode`) takes PyTorch's [B, 3, H, W] RGB;
- ComfyUI's IMAGE is [B, H, W, C] and alignment takes one [H, W] or [H, W, C] image; there C = 1 (grayscale,
  repeated to RGB), 2 (grayscale + alpha), 3 (RGB) or 4 (RGBA); alpha is ignored.
Every check runs once per call, on the whole batch (one reduction), never inside the refinement loop.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

OVERSHOOT = 0.5
CHANNELS = (1, 2, 3, 4)


def to_unit_float(x: Tensor, what: str = "image") -> Tensor:
    """uint8 or float image values -> float32 in [0, 1], or a ValueError saying what was found and what to do."""
    if x.dtype == torch.uint8:
        return x.float() / 255
    if not x.is_floating_point():
        raise ValueError(f"{what} has dtype {x.dtype}; images must be uint8 (0-255) or floating point in [0, 1]. "
                         f"Convert it first (e.g. a 16-bit image: x.float() / 65535).")
    if x.numel() == 0:
        raise ValueError(f"{what} is empty (shape {list(x.shape)})")
    low, high = torch.stack(torch.aminmax(x)).float().tolist()  # NaN and inf show up in the extremes; one sync
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{what} contains NaN or infinite values ({bad} of {x.numel()}): the step that made it "
                         f"produced invalid pixels. Fix or replace that input; no result can be made from it.")
    x = x.float()
    if low >= 0 and high <= 1:
        return x
    if low >= -OVERSHOOT and high <= 1 + OVERSHOOT:
        return x.clamp(0, 1)
    if low >= -OVERSHOOT and high <= 255 + OVERSHOOT:
        hint = "It looks like a 0-255 image stored as floats: divide it by 255 (or pass it as uint8)."
    elif low >= -1 - OVERSHOOT and high <= 1 + OVERSHOOT:
        hint = "It looks like a [-1, 1] image: convert it with (x + 1) / 2."
    else:
        hint = "Rescale it to [0, 1]."
    raise ValueError(f"{what} has values from {low:.4g} to {high:.4g}, but float images must be in [0, 1] "
                     f"(uint8 images in 0-255). {hint}")


def rgb_bchw(images: Tensor, what: str = "images") -> Tensor:
    """The library's input: [B, 3, H, W] RGB, uint8 or float in [0, 1] -> float32 [B, 3, H, W] in [0, 1] on the
    same device."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{what}: expected a torch tensor [B, 3, H, W], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        hint = ""
        if images.ndim == 4 and images.shape[-1] in CHANNELS:
            hint = " This looks like channels-last [B, H, W, C] (ComfyUI's layout): use images.permute(0, 3, 1, 2)."
        elif images.ndim == 3 and images.shape[0] == 3:
            hint = " For a single image add the batch dimension: images[None]."
        raise ValueError(f"expected {what} as [B, 3, H, W] RGB in [0, 1], got shape {list(images.shape)}.{hint}")
    if 0 in images.shape:
        raise ValueError(f"{what} is empty (shape {list(images.shape)})")
    return to_unit_float(images, what)


def _rgb_last(x: Tensor) -> Tensor:
    """[..., C] with C in CHANNELS -> [..., 3]: grayscale repeated, alpha dropped (views, no copy)."""
    if x.shape[-1] in (1, 2):
        return x[..., :1].expand(*x.shape[:-1], 3)
    return x[..., :3]


def rgb_bhwc(image: Tensor, what: str = "image") -> Tensor:
    """A ComfyUI IMAGE [B, H, W, C] (or one [H, W, C]) -> float32 [B, H, W, 3] in [0, 1] on the same device."""
    if not isinstance(image, Tensor):
        raise TypeError(f"{what}: expected an IMAGE tensor, got {type(image).__name__}")
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[-1] not in CHANNELS:
        hint = ""
        if image.ndim == 4 and image.shape[1] in CHANNELS:
            hint = " This looks like channels-first [B, C, H, W]: use image.permute(0, 2, 3, 1)."
        raise ValueError(f"{what}: expected an IMAGE of shape [batch, height, width, channels] with 1-4 channels, "
                         f"got {list(image.shape)}.{hint}")
    if image.shape[0] == 0:
        raise ValueError(f"{what}: the image batch is empty")
    if 0 in image.shape:
        raise ValueError(f"{what} is empty (shape {list(image.shape)})")
    return to_unit_float(_rgb_last(image), what)


def rgb_hwc(image: Tensor, what: str = "image") -> Tensor:
    """One image [H, W] or [H, W, C] (channels last) -> float32 [H, W, 3] in [0, 1] on the same device."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in CHANNELS:
        raise ValueError(f"{what} must have shape HxW or HxWxC with C in (1, 2, 3, 4) (channels last), got "
                         f"{tuple(image.shape)}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{what} is empty (shape {tuple(image.shape)})")
    return to_unit_float(_rgb_last(image), what)
