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

import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...loaders import checkpoints as ckpts
from ... import image_checks
from ..common import GeneratorModel, broadcast_batch, generator_bytes_per_image
from ...stylegan2.cuda_graphs import GraphedInference
from .encoders import build_encoder
from .hypernetwork import HyperNetwork
from ...stylegan2.generator import Generator

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
    """The official `face_pool` (adaptive average pooling to size x size), used between iterations. Where the size
    divides the image that is the mean of each k x k block, which `avg_pool2d` computes faster on the GPU."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    if h % size == 0 and w % size == 0:
        return F.avg_pool2d(images, (h // size, w // size))
    return F.adaptive_avg_pool2d(images, size)


def add_deltas(previous: Optional[Deltas], new: Deltas, in_place: bool = False) -> Deltas:
    if previous is None:
        return list(new)
    if len(previous) != len(new):
        raise ValueError(f"offsets to continue from have {len(previous)} layers, this model has {len(new)}")
    add = torch.Tensor.add_ if in_place else torch.add
    return [p if n is None else (n if p is None else add(p, n)) for p, n in zip(previous, new)]


def slice_deltas(deltas: Optional[Deltas], start: int, end: int) -> Optional[Deltas]:
    if deltas is None:
        return None
    return [None if d is None else (d if d.shape[0] == 1 else d[start:end]) for d in deltas]


class HyperStyleModel(GeneratorModel, GraphedInference, nn.Module):
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
        # the generator's weights fingerprint (checkpoints.weights_signature): codes and offsets fit only it
        self.generator_signature = ""
        self._chunk_limit: Optional[int] = None  # largest chunk known to fit, after an out-of-memory retry
        self._init_graphs()  # CUDA graphs at GPU inference (cuda_graphs.py)

    # ---- properties --------------------------------------------------------------------------------------------
    # resolution, n_styles, device, dtype: GeneratorModel

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

    def refine_step(self, x: torch.Tensor, y_hat: torch.Tensor, codes: torch.Tensor, deltas: Optional[Deltas],
                    in_place: bool = False):
        """One hypernetwork pass: returns (accumulated deltas, full-resolution output in ~[-1, 1]). in_place: add
        the new offsets into the given tensors (no autograd)."""
        deltas = add_deltas(deltas, self.hypernet(torch.cat([x, y_hat.to(x.dtype)], dim=1)), in_place)
        return deltas, self.synthesize(codes, deltas)

    # ---- public API --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Initial-encoder codes [B, n_styles, style_dim] for [B, 3, H, W] images in [0, 1] (or uint8)."""
        return self.encode_normalized(self.preprocess(image_checks.rgb_bchw(images)))

    @torch.no_grad()
    def invert(self, images: torch.Tensor, n_iters: int = 5, codes: Optional[torch.Tensor] = None,
               deltas: Optional[Deltas] = None, keep_steps: bool = True,
               on_step: Optional[Callable[[int, int], None]] = None, max_batch: Optional[int] = None) -> Inversion:
        """Invert face-aligned images [B, 3, H, W] in [0, 1] or uint8 (resized to 256 inside; see image_checks).

        codes/deltas: start from an earlier inversion (e.g. to refine further) instead of the initial encoder.
        A batch of 1 code/offset set broadcasts against B images. on_step(i, total) is called after each
        iteration (progress bars, cancellation); over several chunks it counts the iterations of all of them.
        max_batch: most images per chunk (default: what free GPU memory allows). A chunk that runs out of memory is
        retried in halves; every image's result is the same as running it alone. With several chunks the results
        are gathered on the device of `images`, so a large batch never needs all its results in GPU memory.
        """
        images = image_checks.rgb_bchw(images)  # once per call: dtype, range, finiteness, layout
        batch = images.shape[0]
        codes = None if codes is None else _match_batch(codes, batch, "codes")
        deltas = None if deltas is None else [None if d is None else _match_batch(d, batch, "offsets")
                                              for d in deltas]

        def run(start, end, chunk_index, n_chunks):
            def progress(i, n):
                if on_step is not None:
                    on_step(chunk_index * n + i, n_chunks * n)
            return self._invert_chunk(images[start:end], n_iters, None if codes is None else codes[start:end],
                                      slice_deltas(deltas, start, end), keep_steps, progress)

        parts = self._in_chunks(batch, max_batch, run, self._bytes_per_image(inverting=True), images.device)
        if len(parts) == 1:
            return parts[0]
        return Inversion(codes=torch.cat([p.codes for p in parts]),
                         deltas=[None if d is None else torch.cat([p.deltas[i] for p in parts])
                                 for i, d in enumerate(parts[0].deltas)],
                         images=torch.cat([p.images for p in parts]),
                         steps=[torch.cat(s) for s in zip(*[p.steps for p in parts])])

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, deltas: Optional[Deltas] = None, generator: Optional[Generator] = None,
               noise_mode: str = "const", max_batch: Optional[int] = None) -> torch.Tensor:
        """Codes (+ offsets) -> [B, 3, R, R] in [0, 1]. deltas=None decodes with the unmodified generator.
        Chunked like `invert`."""
        batch = codes.shape[0]
        deltas = None if deltas is None else [None if d is None else _match_batch(d, batch, "offsets")
                                              for d in deltas]

        def run(start, end, chunk_index, n_chunks):
            chunk = codes[start:end].to(self.device, self.dtype)
            chunk_deltas = self._chunk_deltas(deltas, start, end)
            graphs = self._graphs() if generator is None and noise_mode == "const" else None
            if graphs is None:
                return to_unit_range(self.synthesize(chunk, chunk_deltas, noise_mode, generator))
            layers, flat = self._flat_deltas(chunk_deltas, chunk.shape[0])
            decode = functools.partial(self._graphed_decode, layers)
            return to_unit_range(graphs.run(("decode", layers), decode, [chunk] + flat))

        return torch.cat(self._in_chunks(batch, max_batch, run, self._bytes_per_image(inverting=False), codes.device))

    def optimize(self, images: torch.Tensor, codes: torch.Tensor, deltas: Optional[Deltas] = None, **options) -> Inversion:
        """Refine codes (and optionally offsets) by gradient descent against the images: see optimize.optimize
        (steps, lr, mse, lpips, id, optimize_deltas, on_step, losses, weights)."""
        from .optimize import optimize

        return optimize(self, images, codes, deltas, **options)

    @torch.no_grad()
    def stylespace(self, codes: torch.Tensor) -> list:
        """StyleSpace S of W+ codes: every generator layer's style vector [B, in] (HyperStyle's layer numbering,
        which is the official StyleSpace order: conv, toRGB, then per resolution upsampling conv, conv, toRGB).
        Views of one tensor: edits make new tensors (`styleclip.edit_styles`), so nothing is copied here."""
        return self.generator.styles(codes.to(self.device, self.dtype))

    @torch.no_grad()
    def decode_styles(self, styles, deltas: Optional[Deltas] = None, max_batch: Optional[int] = None) -> torch.Tensor:
        """StyleSpace S (`stylespace`, possibly edited) + offsets -> [B, 3, R, R] in [0, 1]: the generator pass of
        `decode` after its style step; unedited S gives decode's images bit for bit. Chunked like `decode`."""
        self.generator.check_styles(styles)
        batch = styles[0].shape[0]
        deltas = None if deltas is None else [None if d is None else _match_batch(d, batch, "offsets")
                                              for d in deltas]

        def run(start, end, chunk_index, n_chunks):
            chunk = [s[start:end].to(self.device, self.dtype) for s in styles]
            chunk_deltas = self._chunk_deltas(deltas, start, end)
            graphs = self._graphs()
            if graphs is None:
                return to_unit_range(self.generator.synthesis(chunk, chunk_deltas))
            layers, flat = self._flat_deltas(chunk_deltas, end - start)
            decode = functools.partial(self._graphed_style_decode, layers)
            # the styles end to end: one input to copy into the graph instead of one per layer
            return to_unit_range(graphs.run(("decode_styles", layers), decode, [torch.cat(chunk, dim=1)] + flat))

        return torch.cat(self._in_chunks(batch, max_batch, run, self._bytes_per_image(inverting=False),
                                         styles[0].device))

    def _chunk_deltas(self, deltas: Optional[Deltas], start: int, end: int) -> Optional[Deltas]:
        chunk_deltas = slice_deltas(deltas, start, end)
        return None if chunk_deltas is None else [None if d is None else d.to(self.device) for d in chunk_deltas]

    @staticmethod
    def _flat_deltas(deltas: Optional[Deltas], batch: int) -> tuple:
        """(layers with offsets, their offsets expanded to the batch): a graph's inputs."""
        layers = tuple(i for i, d in enumerate(deltas or []) if d is not None)
        return layers, [deltas[i].expand(batch, *deltas[i].shape[1:]) for i in layers]

    def _invert_chunk(self, images, n_iters, codes, deltas, keep_steps, on_step) -> Inversion:
        x = self.preprocess(images)
        graphs = self._graphs()
        if deltas is not None and not self._graphable_offsets(deltas, x.shape[0]):
            graphs = None  # starting offsets the step graph does not carry: the eager path handles every case
        if graphs is not None:
            x = x.contiguous(memory_format=torch.channels_last)
        if codes is None and deltas is None and graphs is not None and self.encoder is not None:
            codes, y, y_hat = graphs.run("start", self._start, [x])
        else:
            if codes is None:
                codes = self.encode_normalized(x)
            codes = codes.to(self.device, self.dtype)
            deltas = None if deltas is None else [None if d is None else d.to(self.device) for d in deltas]
            y = self.synthesize(codes, deltas)
            y_hat = pool_to(y)
        steps = [to_unit_range(y_hat)] if keep_steps else []
        if graphs is not None and n_iters > 0:
            # every tuned layer gets a tensor (zeros before the first pass: 0 + offset == offset exactly)
            layers = self.hypernet.tuned_layers()
            shapes = self.hypernet.offset_shapes(x.shape[0])
            if deltas is None:
                deltas = [None] * self.generator.n_layers
            flat = [torch.zeros(shapes[i], device=self.device, dtype=self.dtype) if deltas[i] is None
                    else deltas[i].to(self.device, self.dtype).expand(shapes[i]) for i in layers]
        for i in range(n_iters):
            if graphs is not None:
                flat, y, y_hat = graphs.run("step", self._graphed_step, [x, y_hat, codes, *flat])
            else:
                deltas, y = self.refine_step(x, y_hat, codes, deltas)
                y_hat = pool_to(y)
            if keep_steps:
                steps.append(to_unit_range(y_hat))
            if on_step is not None:
                on_step(i + 1, n_iters)
        if graphs is not None:  # the graph's buffers are overwritten by its next replay: keep copies
            codes = codes.clone()
            if n_iters > 0:
                deltas = [None] * self.generator.n_layers
                for layer, d in zip(self.hypernet.tuned_layers(), flat):
                    deltas[layer] = d.clone()
        if deltas is None:
            deltas = [None] * self.generator.n_layers
        return Inversion(codes=codes, deltas=deltas, images=to_unit_range(y), steps=steps)

    # ---- CUDA graphs (inference on a GPU; the cache itself: GraphedInference) ---------------------------------
    def _graphable_offsets(self, deltas: Deltas, batch: int) -> bool:
        """Offsets only on tuned layers, each in the shape the hypernetwork gives (or broadcastable from batch 1)."""
        shapes = self.hypernet.offset_shapes(batch)
        return all(d is None or (i in shapes and tuple(d.shape[1:]) == shapes[i][1:])
                   for i, d in enumerate(deltas))

    def _graphed_decode(self, layers, codes, *flat):
        return self.synthesize(codes, self._unflat_deltas(layers, flat))

    def _graphed_style_decode(self, layers, styles, *flat):
        styles = list(styles.split(self.generator.style_widths(), dim=1))
        return self.generator.synthesis(styles, self._unflat_deltas(layers, flat))

    def _unflat_deltas(self, layers, flat) -> Optional[Deltas]:
        if not layers:
            return None
        deltas = [None] * self.generator.n_layers
        for layer, d in zip(layers, flat):
            deltas[layer] = d
        return deltas

    def _start(self, x):
        codes = self.encode_normalized(x)
        y = self.synthesize(codes)
        return codes, y, pool_to(y)

    def _graphed_step(self, x, y_hat, codes, *flat):
        """`refine_step` adding the new offsets into the graph's own offset tensors in place and returning those, so
        the next step passes them straight back and `GraphCache.run` copies nothing. Same sums, bit-identical
        images; one set of offset buffers fewer (H200, batch 8, peak 6.72 -> 6.29 GiB in tf32, 3.45 -> 3.23 GiB in
        bf16; time within noise)."""
        deltas = [None] * self.generator.n_layers
        for layer, d in zip(self.hypernet.tuned_layers(), flat):
            deltas[layer] = d
        _, y = self.refine_step(x, y_hat, codes, deltas, in_place=True)
        return list(flat), y, pool_to(y)

    def encoder_parts(self) -> tuple:
        """The convolutional networks besides the generator (`channels_last_`)."""
        return self.hypernet, self.encoder

    # ---- large batches -----------------------------------------------------------------------------------------
    def _in_chunks(self, batch: int, max_batch: Optional[int], run: Callable, per_image: int, gather) -> list:
        """run(start, end, chunk_index, n_chunks) over chunks of the batch, halving a chunk that runs out of memory."""
        size = max_batch or self._auto_chunk(batch, per_image)
        if self._chunk_limit is not None and max_batch is None:
            size = min(size, self._chunk_limit)
        size = max(1, min(size, batch))
        parts, start = [], 0
        while start < batch:
            end = min(batch, start + size)
            try:
                part = run(start, end, start // size, -(-batch // size))
            except torch.cuda.OutOfMemoryError:
                if end - start == 1:
                    raise
                self._forget_graphs()  # recorded graphs hold their memory pool; free it before retrying
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                size = (end - start) // 2
                self._chunk_limit = size  # remembered: the next large batch starts at a size that fits
                warnings.warn(f"out of GPU memory; continuing in chunks of {size} images")
                continue
            parts.append(_to_device(part, gather) if size < batch else part)
            start = end
        return parts

    def _auto_chunk(self, batch: int, per_image: int) -> int:
        if self.device.type != "cuda":
            return batch
        free, total = torch.cuda.mem_get_info(self.device)
        allocated = torch.cuda.memory_allocated(self.device)
        free += torch.cuda.memory_reserved(self.device) - allocated
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        if fraction is not None:  # a cap set with set_per_process_memory_fraction, which mem_get_info does not show
            free = min(free, int(fraction(self.device) * total) - allocated)
        return max(1, int(0.8 * free) // per_image)

    def _warmup_budget(self, batch: int) -> int:
        """What a first call may add to the memory in use (`GraphCache`): the planner's estimate for an inversion of
        this batch (about 1.5x what it uses), at least 1 GiB."""
        return max(1 << 30, batch * self._bytes_per_image(inverting=True))

    def _bytes_per_image(self, inverting: bool) -> int:
        """Rough peak memory per image: a few of the largest activations, per-sample weights (fp32) and offsets."""
        size = torch.finfo(self.dtype).bits // 8
        config = self.generator.config
        estimate = generator_bytes_per_image(self.generator)
        if inverting:
            offsets = sum(k * k * c_in * c_out for layer, (k, c_in, c_out) in enumerate(config.layer_shapes)
                          if self.hypernet.refinement_blocks[layer] is not None)
            estimate += 3 * offsets * size + 64 * 128 * 128 * size * 8  # offsets; hypernet activations
        return estimate


def _to_device(result, device):
    if isinstance(result, Inversion):
        return Inversion(codes=result.codes.to(device), images=result.images.to(device),
                         deltas=[None if d is None else d.to(device) for d in result.deltas],
                         steps=[s.to(device) for s in result.steps])
    return result.to(device)


def _as_styles(latent_avg: torch.Tensor, n_styles: int) -> torch.Tensor:
    """latent_avg is stored as [512], [1, 512] or [n_styles, 512] depending on the file; use [n_styles, 512]."""
    latent_avg = latent_avg.detach().float()
    if latent_avg.ndim == 1:
        latent_avg = latent_avg[None]
    if latent_avg.shape[0] not in (1, n_styles):
        raise ValueError(f"latent_avg has shape {list(latent_avg.shape)}, expected [{n_styles}, D] or [D]")
    return latent_avg.expand(n_styles, -1).clone()


def _match_batch(t: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    matched = broadcast_batch(t, batch)
    if matched is not None:
        return matched
    raise ValueError(f"{what} have batch size {t.shape[0]} but there are {batch} images; use matching batches "
                     f"or a single set of {what} to apply to every image")


# ------------------------------------------------------------------------------------------------------------------
# Loading


def build_generator(ckpt: ckpts.Checkpoint) -> Generator:
    with ckpts.contents_checked(ckpt):
        generator = Generator(ckpts.generator_config(ckpt.parts["decoder"]))
    return ckpts.load_weights(generator, ckpt, "decoder").eval()


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
    with ckpts.contents_checked(main):
        hypernet = HyperNetwork(ckpts.hypernet_config(main, generator.config))
    ckpts.load_weights(hypernet, main, "hypernet")

    encoder, encoder_latent_avg = None, None
    if w_encoder is not None or e4e is not None:
        kind, path, role = ((ckpts.W_ENCODER, w_encoder, "the W-encoder") if w_encoder is not None
                            else (ckpts.E4E, e4e, "the e4e encoder"))
        enc = ckpts.read_checkpoint(path).expect(kind, role)
        enc.expect_size(main.output_size, "an encoder", f"the HyperStyle checkpoint {main.name}")
        with ckpts.contents_checked(enc):
            encoder_config = ckpts.encoder_config(enc)
            encoder = build_encoder(encoder_config)
        ckpts.load_weights(encoder, enc, "encoder")
        if encoder_config.style_dim != generator.config.style_dim:  # else Encode fails with a raw size mismatch
            raise ckpts.CheckpointError(
                f"{role[0].upper() + role[1:]} {enc.name} makes {encoder_config.style_dim}-wide latent codes, but "
                f"the generator of the HyperStyle checkpoint {main.name} takes {generator.config.style_dim}-wide "
                f"codes: they belong to different models. Use the encoder trained with this checkpoint (faces_w_encoder or "
                f"e4e_ffhq_encode for hyperstyle_ffhq).")
        if kind == ckpts.E4E and enc.latent_avg is not None:
            encoder_latent_avg = enc.latent_avg  # e4e was trained around its own average code
        # the W-encoder's codes are offsets from HyperStyle's latent_avg, as in the official code

    model = HyperStyleModel(generator, hypernet, _latent_avg(main, generator), encoder, encoder_latent_avg,
                            name=Path(checkpoint).name)
    model.generator_signature = ckpts.weights_signature(main.parts["decoder"])
    return model.eval().to(device=device, dtype=dtype).channels_last_()
