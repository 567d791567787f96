"""The generator's elementwise steps as hand-written Triton kernels: the default path at GPU inference.

torch.compile fused the same steps (noise + bias + activation, interleaving the upsampling phases, building the
per-sample weights, toRGB's bias and upsampled skip), but for static shapes: once per layer shape, batch size and
precision, 2.5 minutes before a user's first image (issue 22). These kernels take every size and stride at run
time (`triton_kernels.py`), so they compile a few times in all, and Triton keeps them in the persistent cache
folder (`warmup.py`): a restart compiles nothing.

Each launcher returns its result, or None where it does not apply or Triton failed; the caller then runs its
pure-PyTorch twin in generator.py, which gives the same results within rounding (tests/test_kernels.py compares
them). That twin is what runs on the CPU, on MPS, without Triton, under autograd and with HYPERSTYLE_COMPILE=0.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from . import warmup

_STATE = {"module": None, "failed": False, "announced": False}
_TAP_TABLES: dict = {}

# tile sizes: fixed (or, for the activation, one of three), so a new layer width or batch size compiles no new variant
ACTIVATION_TILE_ELEMENTS = 2048  # pixels x channels per program
ACTIVATION_BLOCK_C = (128, 64, 32)  # channel blocks, widest first (`activation_tile`)
WEIGHT_BLOCK_C = 64
BLUR_TILE_ELEMENTS = 1024  # pixels x channels per program of the blurred activation (four outputs each)
BLOCK_DIAGONAL_TILE = (32, 32)
RGB_BLOCK_W = 128
EPILOGUE_TILE = (64, 64)  # pixels x channels


def module():
    """`triton_kernels`, or None where Triton cannot be imported or a kernel has failed once."""
    if _STATE["failed"]:
        return None
    if _STATE["module"] is None:
        try:
            from . import triton_kernels
        except Exception:  # noqa: BLE001 - no Triton, or one that cannot load: the PyTorch path runs
            _STATE["failed"] = True
            return None
        _STATE["module"] = triton_kernels
    return _STATE["module"]


def available() -> bool:
    return module() is not None


def _launch(name: str, grid: tuple, *args, **meta) -> bool:
    """kernel[grid](*args); False (and the PyTorch path from then on) if Triton fails, e.g. no C compiler for its
    launcher or a driver too old for it."""
    mod = module()
    if mod is None:
        return False
    kernel = getattr(mod, name)
    if not _STATE["announced"]:
        _STATE["announced"] = True
        warmup.use_persistent_cache()  # before the first compile: Triton reads TRITON_CACHE_DIR then
    try:
        kernel[grid](*args, **meta)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - stay correct: the PyTorch twins take over
        _STATE["failed"] = True
        warnings.warn(f"HyperStyle: the Triton kernel {name} failed ({type(err).__name__}: {str(err)[:300]}); "
                      f"the generator and the encoders run their PyTorch steps instead (same results, slower)")
        return False
    return True


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _merged_channel_stride(t: torch.Tensor) -> Optional[int]:
    """The stride of channel b * O + o of a [B, O, ...] tensor whose batch and channels merge into one dim."""
    b, o = t.shape[:2]
    if b > 1 and t.stride(0) != o * t.stride(1):
        return None
    return t.stride(1)


def _pixel_dims(t: torch.Tensor) -> tuple:
    """(sizes, strides) of t's dims after the first two, padded in front to four."""
    sizes, strides = list(t.shape[2:]), list(t.stride()[2:])
    pad = 4 - len(sizes)
    return [1] * pad + sizes, [0] * pad + strides


def styled_activation(y: torch.Tensor, noise: torch.Tensor, noise_weight: torch.Tensor, bias: torch.Tensor,
                      out: torch.Tensor) -> Optional[torch.Tensor]:
    """out = leaky_relu(y + noise_weight * noise + bias, 0.2) * sqrt(2) (`generator.styled_activation`). y, out:
    [B, O, *pixels] (2 to 4 pixel dims, any strides with batch and channels merging); noise [1|B, 1, *pixels]."""
    if y.ndim > 6 or y.shape != out.shape or noise.shape[1] != 1 or noise.shape[2:] != y.shape[2:]:
        return None
    ysc, osc = _merged_channel_stride(y), _merged_channel_stride(out)
    if ysc is None or osc is None or noise.shape[0] not in (1, y.shape[0]):
        return None
    batch, n_out = y.shape[:2]
    sizes, ys = _pixel_dims(y)
    _, os_ = _pixel_dims(out)
    _, ns = _pixel_dims(noise)
    n_pix = math.prod(sizes)
    if n_pix == 0 or batch * n_out == 0:
        return out
    block_p, block_c = activation_tile(batch * n_out)
    grid = (_cdiv(n_pix, block_p), _cdiv(batch * n_out, block_c))
    ok = _launch("styled_activation_kernel", grid, y, out, noise, noise_weight, bias, n_pix, batch * n_out, n_out,
                 sizes[1], sizes[2], sizes[3], *ys, ysc, *os_, osc, *ns, noise.stride(0),
                 NOISE_PER_SAMPLE=noise.shape[0] > 1, BLOCK_P=block_p, BLOCK_C=block_c,
                 EVEN_C=(batch * n_out) % block_c == 0)
    return out if ok else None


def activation_tile(n_ch: int) -> tuple:
    """(pixels, channels) of a styled-activation program: the widest channel block that divides n_ch, so that no
    channel is masked and the loads and stores are vectorised along the channels. H200, one generator pass (1024 px,
    with offsets, graphed), ms/image, the former fixed 64 x 32 tile with every channel masked against unmasked tiles
    of the width this picks for the largest layers (128 channels at batch 8, 32 at batch 1): bf16 batch 8
    1.55 -> 1.08, batch 1 1.78 -> 1.41; tf32 2.06 -> 1.91 and 2.29 -> 2.21. The kernel's share of a bf16 pass at
    batch 8 fell from 5.3 to 1.3 ms (masked, each thread moved single 2-byte elements). A few variants compile in
    all (three widths, masked or not), not one per layer."""
    block_c = next((c for c in ACTIVATION_BLOCK_C if n_ch % c == 0), ACTIVATION_BLOCK_C[-1])
    return ACTIVATION_TILE_ELEMENTS // block_c, block_c


def blurred_activation(t: torch.Tensor, taps: tuple, noise: Optional[torch.Tensor],
                       noise_weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                       out: torch.Tensor) -> Optional[torch.Tensor]:
    """out = the blur (four taps) of a transposed convolution in phase form t [B, 2, 2, O, H + 1, W + 1], then
    noise + bias + activation unless noise is None (`generator.blurred_phases` and `styled_activation`). out:
    [B, O, H, 2, W, 2] (`generator.phase_view` of the packed output), noise [1|B, 1, H, 2, W, 2]; any strides."""
    if len(taps) != 4 or t.ndim != 6 or out.ndim != 6:
        return None
    batch, _, _, n_out, h1, w1 = t.shape
    height, width = h1 - 1, w1 - 1
    if out.shape != (batch, n_out, height, 2, width, 2) or t.shape[1:3] != (2, 2):
        return None
    activate = noise is not None
    if activate and (noise.shape[0] not in (1, batch) or noise.shape[1:] != (1, height, 2, width, 2)):
        return None
    if any(_extent(x) > 2 ** 31 for x in (t, out) + ((noise,) if activate else ())):
        return None
    if batch * n_out * height * width == 0:
        return out
    _, block_c = activation_tile(n_out)  # the same unmasked channel widths as the styled activation
    block_p = BLUR_TILE_ELEMENTS // block_c
    grid = (_cdiv(height * width, block_p), batch * _cdiv(n_out, block_c))
    noise_strides = (noise.stride(0), noise.stride(2), noise.stride(3), noise.stride(4), noise.stride(5)) \
        if activate else (0,) * 5
    ok = _launch("blurred_activation_kernel", grid, t, out, noise if activate else t,
                 noise_weight if activate else t, bias if activate else t, height * width, n_out, width,
                 *t.stride(), *out.stride(), *noise_strides,
                 *(float(a) for a in taps), ACTIVATE=activate,
                 NOISE_PER_SAMPLE=activate and noise.shape[0] > 1, BLOCK_P=block_p, BLOCK_C=block_c,
                 EVEN_C=n_out % block_c == 0)
    return out if ok else None


def _extent(t: torch.Tensor) -> int:
    """One past the largest element offset of t."""
    return sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1


def _tap_table(kind: str, k: int, device: torch.device) -> torch.Tensor:
    """int32 [phases, taps]: which of a k x k kernel's taps each output tap is (-1: zero). "plain": all k*k;
    "padded": the 9 taps then zeros up to 16; "transposed": the stride-2 transposed convolution's four 2x2 phase
    kernels (`generator.TRANSPOSED_TAPS`). Kept per device: made during a graph's warm-up, never inside a recording."""
    key = (kind, k, device)
    if key not in _TAP_TABLES:
        from .generator import PADDED_TAPS, TRANSPOSED_TAPS

        if kind == "plain":
            table = [list(range(k * k))]
        elif kind == "padded":
            table = [list(range(k * k)) + [-1] * (PADDED_TAPS - k * k)]
        else:
            table = [[-1 if r is None or s is None else 3 * r + s for r in row_taps for s in col_taps]
                     for row_taps in TRANSPOSED_TAPS for col_taps in TRANSPOSED_TAPS]
        _TAP_TABLES[key] = torch.tensor(table, dtype=torch.int32, device=device)
    return _TAP_TABLES[key]


def _delta_strides(delta: Optional[torch.Tensor], k: int) -> Optional[tuple]:
    """(batch, out, in, tap row, tap column) strides of an offset [B|1, O, C] or [B|1, O, C, k|1, k|1]; a batch of
    1 and 1x1 offsets broadcast (stride 0). None: an offset shape the kernel does not take."""
    if delta is None:
        return (0, 0, 0, 0, 0)
    sb = delta.stride(0) if delta.shape[0] > 1 else 0
    if delta.ndim == 3:
        return (sb, delta.stride(1), delta.stride(2), 0, 0)
    if delta.ndim == 5 and delta.shape[3:] in ((1, 1), (k, k)):
        full = delta.shape[3:] == (k, k) and k > 1
        return (sb, delta.stride(1), delta.stride(2), delta.stride(3) if full else 0, delta.stride(4) if full else 0)
    return None


def modulated_weights(weight: torch.Tensor, scale: float, style: torch.Tensor, delta: Optional[torch.Tensor],
                      demodulate: bool, out: torch.Tensor, kind: str) -> Optional[torch.Tensor]:
    """Per-sample weights into `out` (`generator._modulated`'s numbers): kind "plain" -> out [B, O, k, k, C] (any
    strides), "padded" -> [B, O, PADDED_TAPS, C], "transposed" -> [B, 4*O, 2, 2, C] (the phase kernels)."""
    _, n_out, n_in, k, _ = weight.shape
    ds = _delta_strides(delta, k)
    if ds is None:
        return None
    table = _tap_table(kind, k, weight.device)
    n_phases, n_taps = table.shape
    b = style.shape[0]
    if out.ndim == 5:  # [B, J, kh, kw, C]: tap t = row * kw + column
        if out.shape[3] > 1 and out.stride(2) != out.shape[3] * out.stride(3):
            return None
        osb, osj, ost, osc = out.stride(0), out.stride(1), out.stride(3), out.stride(4)
    else:
        osb, osj, ost, osc = out.stride()
    if b * n_phases * n_out == 0:
        return out
    ok = _launch("modulated_weight_kernel", (b * n_out,), weight, style, weight if delta is None else delta,
                 table, out, float(scale), n_out, n_in, n_taps, n_phases,
                 weight.stride(1), weight.stride(2), weight.stride(3), weight.stride(4),
                 style.stride(0), style.stride(1), *ds, osb, osj, ost, osc,
                 K=k, KK_BLOCK=_next_pow2(k * k), T_BLOCK=_next_pow2(n_phases * n_taps), BLOCK_C=WEIGHT_BLOCK_C,
                 HAS_DELTA=delta is not None, DEMODULATE=bool(demodulate))
    return out if ok else None


def block_diagonal_weight(weight: torch.Tensor, scale: float, style: torch.Tensor, delta: Optional[torch.Tensor],
                          dtype: torch.dtype) -> Optional[torch.Tensor]:
    """`generator.block_diagonal_weight`: a 1x1 layer's per-sample weights as [B*C, B*O padded to 8]."""
    _, n_out, n_in, k, _ = weight.shape
    ds = _delta_strides(delta, k)
    if ds is None or k != 1:
        return None
    b = style.shape[0]
    used = b * n_out
    out = torch.empty(b * n_in, used + (-used % 8), device=weight.device, dtype=dtype)
    block_r, block_n = BLOCK_DIAGONAL_TILE
    grid = (_cdiv(out.shape[0], block_r), _cdiv(out.shape[1], block_n))
    ok = _launch("block_diagonal_kernel", grid, weight, style, weight if delta is None else delta, out, float(scale),
                 n_out, n_in, out.shape[0], out.shape[1], used, weight.stride(1), weight.stride(2),
                 style.stride(0), style.stride(1), ds[0], ds[1], ds[2], out.stride(0), out.stride(1),
                 HAS_DELTA=delta is not None, BLOCK_R=block_r, BLOCK_N=block_n)
    return out if ok else None


def rgb_output(out: torch.Tensor, bias: torch.Tensor, skip: Optional[torch.Tensor], taps: Optional[tuple],
               contiguous: bool) -> Optional[torch.Tensor]:
    """toRGB's out [B, 3, H, W] + bias [1, 3, 1, 1] (+ skip [B, 3, H/2, W/2] upsampled 2x with `taps`,
    `generator.fir_upsample_2x`): a new image, NCHW-contiguous if asked, else in the packed order (H, W, B, C)."""
    b, c, h, w = out.shape
    if c != 3 or (skip is not None and (skip.shape != (b, 3, h // 2, w // 2) or h % 2 or w % 2)):
        return None
    if contiguous:
        image = torch.empty(out.shape, dtype=out.dtype, device=out.device)
    else:
        image = torch.empty(h, w, b, c, dtype=out.dtype, device=out.device).permute(2, 3, 0, 1)
    (t00, t01, t02), (t10, t11, t12) = taps if skip is not None else ((0.0,) * 3,) * 2
    grid = (b * 3 * h, _cdiv(w, RGB_BLOCK_W))
    ok = _launch("rgb_output_kernel", grid, image, out, bias, out if skip is None else skip, h, w,
                 *image.stride(), *out.stride(), *(out if skip is None else skip).stride(),
                 float(t00), float(t01), float(t02), float(t10), float(t11), float(t12),
                 HAS_SKIP=skip is not None, BLOCK_W=RGB_BLOCK_W)
    return image if ok else None


def channel_epilogue(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, act: int = 0,
                     slope: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None,
                     residual: Optional[torch.Tensor] = None, residual_scale: Optional[torch.Tensor] = None,
                     residual_shift: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """act((x * scale + shift) * gate + residual [* residual_scale + residual_shift]) as a new channels-last tensor
    (`fused_backbones.epilogue_reference` is its PyTorch twin; `fused_backbones.channel_epilogue` says what each
    input is). act: 0 none, 1 ReLU, 2 PReLU(slope). None where the layouts do not fit: x must be channels-last
    contiguous, residual of x's shape, every offset within int32."""
    if x.ndim != 4 or not x.is_contiguous(memory_format=torch.channels_last) or x.numel() >= 2 ** 31:
        return None
    n, c, h, w = x.shape
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or _extent(residual) > 2 ** 31):
        return None
    if gate is not None and (gate.shape != (n, c) or not gate.is_contiguous()):
        return None
    out = torch.empty_like(x, memory_format=torch.channels_last)
    if x.numel() == 0:
        return out
    res = x if residual is None else residual
    rs = (res.stride(0), res.stride(2), res.stride(3), res.stride(1))
    kind = 0 if residual is None else (2 if residual_scale is not None else 1)
    block_p, block_c = EPILOGUE_TILE
    grid = (_cdiv(n * h * w, block_p), _cdiv(c, block_c))
    ok = _launch("channel_epilogue_kernel", grid, x, out, scale, shift, x if gate is None else gate, res,
                 scale if residual_scale is None else residual_scale,
                 shift if residual_shift is None else residual_shift, scale if slope is None else slope,
                 n * h * w, c, h * w, w, *rs, HAS_GATE=gate is not None, RESIDUAL=kind, ACT=act,
                 BLOCK_P=block_p, BLOCK_C=block_c)
    return out if ok else None
