"""HyperStyle inversion: initial encoder -> iterative hypernetwork refinement -> generator with weight offsets.

`invert` follows the official `run_inversion`:
    codes   = latent_avg + encoder(x)                       x: the input at 256x256 in [-1, 1]
    y_hat   = pool256(G(codes))                             the initial reconstruction
    repeat n_iters times:
        deltas += hypernet(cat([x, y_hat]))                 offsets accumulate over iterations
        y      = G(codes, deltas)                           full resolution
        y_hat  = pool256(y)
Training uses the same modules and `refine_step`; there is no second copy of any network.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoints as ckpts
from .encoders import build_encoder
from .hypernetwork import HyperNetwork
from .stylegan2 import Generator

HYPERNET_INPUT_SIZE = 256
Deltas = list  # one entry per generator layer: None, [B, out, in, k, k] or compact [B, out, in]


@dataclass
class Inversion:
    codes: torch.Tensor  # [B, n_styles, style_dim]
    deltas: Deltas  # accumulated offsets per generator layer (compact where the layer is per-channel)
    images: torch.Tensor  # [B, 3, R, R] in [0, 1], final reconstruction at full generator resolution
    steps: list = field(default_factory=list)  # [B, 3, 256, 256] in [0, 1]: initial, then after each iteration


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Generator output (~[-1, 1]) -> [0, 1]."""
    return ((images.float() + 1) / 2).clamp_(0, 1)


def pool_to(images: torch.Tensor, size: int = HYPERNET_INPUT_SIZE) -> torch.Tensor:
    """The official `face_pool` (adaptive average pooling), used between iterations."""
    return images if images.shape[-1] == size and images.shape[-2] == size else F.adaptive_avg_pool2d(images, size)


def add_deltas(previous: Optional[Deltas], new: Deltas) -> Deltas:
    if previous is None:
        return list(new)
    if len(previous) != len(new):
        raise ValueError(f"offsets to continue from have {len(previous)} layers, this model has {len(new)}")
    return [None if n is None else (n if p is None else p + n) for p, n in zip(previous, new)]


def slice_deltas(deltas: Optional[Deltas], start: int, end: int) -> Optional[Deltas]:
    if deltas is None:
        return None
    return [None if d is None else (d if d.shape[0] == 1 else d[start:end]) for d in deltas]


class HyperStyleModel(nn.Module):
    def __init__(self, generator: Generator, hypernet: HyperNetwork, latent_avg: torch.Tensor,
                 encoder: Optional[nn.Module] = None, encoder_latent_avg: Optional[torch.Tensor] = None,
                 name: str = "hyperstyle"):
        super().__init__()
        self.generator = generator
        self.hypernet = hypernet
        self.encoder = encoder
        self.register_buffer("latent_avg", _as_styles(latent_avg, generator.n_styles))
        offset = latent_avg if encoder_latent_avg is None else encoder_latent_avg
        self.register_buffer("encoder_latent_avg", _as_styles(offset, generator.n_styles))
        self.name = name

    # ---- properties --------------------------------------------------------------------------------------------
    @property
    def resolution(self) -> int:
        return self.generator.size

    @property
    def n_styles(self) -> int:
        return self.generator.n_styles

    @property
    def device(self) -> torch.device:
        return self.latent_avg.device

    @device.setter
    def device(self, _value) -> None:
        """ComfyUI's ModelPatcher assigns `model.device` after moving the weights; we read it off the weights."""

    @property
    def dtype(self) -> torch.dtype:
        return self.generator.input.input.dtype

    # ---- building blocks (shared with training) ----------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, 3, 256, 256] in [-1, 1] on the model's device and dtype."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images as [B, 3, H, W] RGB in [0, 1], got shape {list(images.shape)}")
        x = images.to(self.device, torch.float32)
        if x.shape[-2:] != (HYPERNET_INPUT_SIZE, HYPERNET_INPUT_SIZE):
            x = F.interpolate(x, size=(HYPERNET_INPUT_SIZE, HYPERNET_INPUT_SIZE), mode="bilinear",
                              align_corners=False, antialias=True)
        return (x * 2 - 1).to(self.dtype)

    def encode_normalized(self, x: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            raise RuntimeError("this model has no initial encoder: load it with w_encoder=... or e4e=..., or pass "
                               "starting codes to invert()")
        return self.encoder(x) + self.encoder_latent_avg.to(x.dtype)

    def synthesize(self, codes, deltas=None, noise_mode="const", generator: Optional[Generator] = None):
        """Raw generator output in ~[-1, 1] at full resolution."""
        return (generator or self.generator)(codes.to(self.device), deltas, noise_mode=noise_mode)

    def refine_step(self, x: torch.Tensor, y_hat: torch.Tensor, codes: torch.Tensor, deltas: Optional[Deltas]):
        """One hypernetwork pass: returns (accumulated deltas, full-resolution output in ~[-1, 1])."""
        deltas = add_deltas(deltas, self.hypernet(torch.cat([x, y_hat.to(x.dtype)], dim=1)))
        return deltas, self.synthesize(codes, deltas)

    # ---- public API --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Initial-encoder codes [B, n_styles, style_dim] for [B, 3, H, W] images in [0, 1]."""
        return self.encode_normalized(self.preprocess(images))

    @torch.no_grad()
    def invert(self, images: torch.Tensor, n_iters: int = 5, codes: Optional[torch.Tensor] = None,
               deltas: Optional[Deltas] = None, keep_steps: bool = True,
               on_step: Optional[Callable[[int, int], None]] = None) -> Inversion:
        """Invert face-aligned images [B, 3, H, W] in [0, 1] (resized to 256 inside).

        codes/deltas: start from an earlier inversion (e.g. to refine further) instead of the initial encoder.
        A batch of 1 code/offset set broadcasts against B images. on_step(i, n_iters) is called after each
        iteration (progress bars, cancellation).
        """
        x = self.preprocess(images)
        batch = x.shape[0]
        if codes is None:
            codes = self.encode_normalized(x)
        codes = _match_batch(codes.to(self.device, self.dtype), batch, "codes")
        deltas = None if deltas is None else [None if d is None else _match_batch(d.to(self.device), batch, "offsets")
                                              for d in deltas]
        y = self.synthesize(codes, deltas)
        y_hat = pool_to(y)
        steps = [to_unit_range(y_hat)] if keep_steps else []
        for i in range(n_iters):
            deltas, y = self.refine_step(x, y_hat, codes, deltas)
            y_hat = pool_to(y)
            if keep_steps:
                steps.append(to_unit_range(y_hat))
            if on_step is not None:
                on_step(i + 1, n_iters)
        if deltas is None:
            deltas = [None] * self.generator.n_layers
        return Inversion(codes=codes, deltas=deltas, images=to_unit_range(y), steps=steps)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, deltas: Optional[Deltas] = None, generator: Optional[Generator] = None,
               noise_mode: str = "const") -> torch.Tensor:
        """Codes (+ offsets) -> [B, 3, R, R] in [0, 1]. deltas=None decodes with the unmodified generator."""
        return to_unit_range(self.synthesize(codes.to(self.dtype), deltas, noise_mode, generator))


def _as_styles(latent_avg: torch.Tensor, n_styles: int) -> torch.Tensor:
    """latent_avg is stored as [512], [1, 512] or [n_styles, 512] depending on the file; use [n_styles, 512]."""
    latent_avg = latent_avg.detach().float()
    if latent_avg.ndim == 1:
        latent_avg = latent_avg[None]
    if latent_avg.shape[0] not in (1, n_styles):
        raise ValueError(f"latent_avg has shape {list(latent_avg.shape)}, expected [{n_styles}, D] or [D]")
    return latent_avg.expand(n_styles, -1).clone()


def _match_batch(t: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise ValueError(f"{what} have batch size {t.shape[0]} but there are {batch} images; use matching batches "
                     f"or a single set of {what} to apply to every image")


# ------------------------------------------------------------------------------------------------------------------
# Loading


def build_generator(ckpt: ckpts.Checkpoint) -> Generator:
    generator = Generator(ckpts.generator_config(ckpt.parts["decoder"]))
    generator.load_state_dict(ckpt.parts["decoder"], strict=True)
    return generator.eval()


def _latent_avg(ckpt: ckpts.Checkpoint, generator: Generator) -> torch.Tensor:
    if ckpt.latent_avg is not None:
        return ckpt.latent_avg
    return generator.mean_latent(10000)[0]


def load_generator(path, device="cpu", dtype=torch.float32) -> Generator:
    """A StyleGAN2 generator file (rosinality `g_ema`), or the decoder inside a HyperStyle/encoder checkpoint."""
    ckpt = ckpts.read_checkpoint(path)
    if "decoder" not in ckpt.parts:
        ckpt.expect(ckpts.GENERATOR, "a generator")
    return build_generator(ckpt).to(device=device, dtype=dtype)


def load_hyperstyle(checkpoint, w_encoder=None, e4e=None, device="cpu", dtype=torch.float32) -> HyperStyleModel:
    """Build HyperStyle from a released (or our safetensors) checkpoint, with an optional initial encoder.

    checkpoint: a HyperStyle file (hyperstyle_ffhq.pt). w_encoder: a W-encoder (faces_w_encoder.pt).
    e4e: an e4e/pSp W+ encoder (e4e_ffhq_encode.pt). Wrong kinds or sizes fail with a message naming both.
    """
    if w_encoder is not None and e4e is not None:
        raise ValueError("pass either w_encoder or e4e as the initial encoder, not both")
    main = ckpts.read_checkpoint(checkpoint).expect(ckpts.HYPERSTYLE, "the HyperStyle checkpoint")
    generator = build_generator(main)
    hypernet = HyperNetwork(ckpts.hypernet_config(main, generator.config))
    hypernet.load_state_dict(main.parts["hypernet"], strict=True)

    encoder, encoder_latent_avg = None, None
    if w_encoder is not None or e4e is not None:
        kind, path, role = ((ckpts.W_ENCODER, w_encoder, "the W-encoder") if w_encoder is not None
                            else (ckpts.E4E, e4e, "the e4e encoder"))
        enc = ckpts.read_checkpoint(path).expect(kind, role)
        enc.expect_size(main.output_size, "an encoder", f"the HyperStyle checkpoint {main.name}")
        encoder = build_encoder(ckpts.encoder_config(enc))
        encoder.load_state_dict(enc.parts["encoder"], strict=True)
        if kind == ckpts.E4E and enc.latent_avg is not None:
            encoder_latent_avg = enc.latent_avg  # e4e was trained around its own average code
        # the W-encoder's codes are offsets from HyperStyle's latent_avg, as in the official code

    model = HyperStyleModel(generator, hypernet, _latent_avg(main, generator), encoder, encoder_latent_avg,
                            name=Path(checkpoint).name)
    return model.eval().to(device=device, dtype=dtype)
