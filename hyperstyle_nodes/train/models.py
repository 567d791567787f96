"""The networks a stage trains or freezes, built with the engine's classes from files and architecture presets.

Nothing here defines a network: the generator is `stylegan2.Generator`, the W-encoder `encoders.WEncoder` (via
`build_encoder`), the hypernetwork `hypernetwork.HyperNetwork`; checkpoints written from them load with
`load_hyperstyle` because the module names are the released ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..loaders import checkpoints as ckpts
from ..engines.hyperstyle.encoders import EncoderConfig, build_encoder
from ..engines.hyperstyle.hypernetwork import HyperNetwork, HypernetConfig, parse_layers_to_tune
from ..engines.hyperstyle.model import build_generator
from ..stylegan2.generator import Generator, GeneratorConfig, log2
from ..tiny import TINY_WIDTHS

# Architecture presets. "full" is the released models' (IR-SE-50 W-encoder, ResNet-34 hypernetwork); "tiny" is
# hyperstyle_nodes.tiny's narrow models, "micro" narrower and shallower still. Module names are the same in all,
# and the loaders read widths and depths from the weights, so every preset's checkpoints load the same way.
ARCHS = {
    "full": dict(encoder_widths=(64, 128, 256, 512), encoder_units=(3, 4, 14, 3),
                 hypernet_widths=(64, 128, 256, 512), hypernet_blocks=(3, 4, 6, 3),
                 feature_dim=512, head_channels=256, shared_head_channels=128),
    "tiny": dict(encoder_widths=TINY_WIDTHS, encoder_units=(3, 4, 14, 3),
                 hypernet_widths=TINY_WIDTHS, hypernet_blocks=(3, 4, 6, 3),
                 feature_dim=64, head_channels=32, shared_head_channels=16),
    # one unit per stage and quarter widths: CPU tests and smoke runs in seconds (the 256-px input stays)
    "micro": dict(encoder_widths=(8, 16, 32, 64), encoder_units=(1, 1, 1, 1),
                  hypernet_widths=(8, 16, 32, 64), hypernet_blocks=(1, 1, 1, 1),
                  feature_dim=32, head_channels=16, shared_head_channels=8),
}
MIN_TUNABLE_RESOLUTION = 16  # "medium + fine": the official default skips the 4- and 8-px layers


class SetupError(ValueError):
    """Files or options that do not fit together (or a run that cannot resume); the message says what to do."""


@dataclass
class GeneratorFile:
    generator: Generator
    latent_avg: Optional[torch.Tensor]  # [n_styles, D] as stored in the file, or None
    path: Path

    @property
    def config(self) -> GeneratorConfig:
        return self.generator.config


def resolve_file(name_or_path, kind: Optional[str] = None) -> Path:
    """A path, a file in the models folder, or a registry name (downloaded if needed)."""
    from ..loaders import downloads

    try:
        return downloads.resolve(name_or_path, kind=kind)
    except downloads.WeightsError as err:
        raise SetupError(str(err)) from err


def load_generator_file(name_or_path) -> GeneratorFile:
    """A StyleGAN2 generator: rosinality .pt (g_ema + latent_avg), our .safetensors, or the decoder inside a
    HyperStyle / encoder checkpoint. Size and widths come from the weights."""
    path = resolve_file(name_or_path, kind="generator")
    ckpt = ckpts.read_checkpoint(path)
    if "decoder" not in ckpt.parts:
        raise SetupError(f"{path.name} is {ckpts.KIND_DESCRIPTIONS[ckpt.kind]} without generator weights; "
                              "--generator needs a StyleGAN2 generator file (rosinality .pt with g_ema)")
    generator = build_generator(ckpt)
    for p in generator.parameters():
        p.requires_grad_(False)
    latent_avg = None if ckpt.latent_avg is None else as_styles(ckpt.latent_avg, generator.n_styles)
    return GeneratorFile(generator, latent_avg, Path(path))


def as_styles(latent_avg: torch.Tensor, n_styles: int) -> torch.Tensor:
    """[D], [1, D] or [n_styles, D] -> [n_styles, D] (the released checkpoints store it repeated)."""
    latent_avg = latent_avg.detach().float().reshape(-1, latent_avg.shape[-1])
    return latent_avg[:1].expand(n_styles, -1).clone() if latent_avg.shape[0] == 1 else latent_avg.clone()


def estimate_latent_avg(generator: Generator, samples: int = 100_000, seed: int = 0) -> torch.Tensor:
    """Average W over random z (the official trainer uses 1e5 samples when a file has no latent_avg)."""
    total, done = None, 0
    gen = torch.Generator().manual_seed(seed)
    param = generator.input.input
    with torch.no_grad():
        while done < samples:
            n = min(10_000, samples - done)
            z = torch.randn(n, generator.style_dim, generator=gen).to(param)
            w = generator.map(z).double().sum(0)
            total = w if total is None else total + w
            done += n
    return (total / samples).float()[None].expand(generator.n_styles, -1).clone().cpu()


def default_layers_to_tune(config: GeneratorConfig) -> str:
    """Non-toRGB layers at 16 px and above: '5,6,8,9,11,12,14,15,17,18,20,21,23,24' for 1024 px (the released
    HyperStyle's layers_to_tune), '5,6,...,17,18' for 256 px, and so on."""
    to_rgb = set(config.to_rgb_layers)
    layers = [i for i, size in enumerate(config.layer_sizes) if i not in to_rgb and size >= MIN_TUNABLE_RESOLUTION]
    if not layers:
        raise SetupError(f"a {config.size}-px generator has no layers at {MIN_TUNABLE_RESOLUTION} px or above; "
                              "pass --layers-to-tune explicitly")
    return ",".join(map(str, layers))


def check_layers_to_tune(text: str, config: GeneratorConfig) -> tuple:
    n = len(config.layer_shapes)
    try:
        layers = parse_layers_to_tune(text, n)
    except ValueError as err:
        raise SetupError(f"--layers-to-tune must be comma-separated layer numbers, got {text!r}") from err
    bad = [i for i in layers if not 0 <= i < n]
    if bad or not layers:
        raise SetupError(f"--layers-to-tune {text!r}: this {config.size}-px generator has layers 0..{n - 1} "
                              f"(toRGB layers: {config.to_rgb_layers})")
    return tuple(sorted(set(layers)))


def build_w_encoder(config: GeneratorConfig, arch: str = "full") -> torch.nn.Module:
    a = ARCHS[arch]
    return build_encoder(EncoderConfig(kind="w_encoder", n_styles=config.n_styles, style_dim=config.style_dim,
                                       widths=a["encoder_widths"], units=a["encoder_units"]))


def init_encoder_backbone(encoder: torch.nn.Module, weights: Optional[str] = None) -> Path:
    """Start the W-encoder's IR-SE-50 from ArcFace's weights, as pSp/e4e do (input_layer and body)."""
    from .losses import LossWeightsError, _load_state, resolve_loss_weights

    try:
        path = resolve_loss_weights("id", weights)
    except LossWeightsError as err:
        raise SetupError(f"the W-encoder starts from ArcFace's IR-SE-50 weights (as pSp/e4e), which are missing; "
                         f"pass --encoder-init none to start from random weights instead. {err}") from err
    state = _load_state(path)
    own = encoder.state_dict()
    backbone = {k: v for k, v in state.items() if k.startswith(("input_layer.", "body."))}
    wrong = [k for k, v in backbone.items() if k not in own or own[k].shape != v.shape]
    missing = [k for k in own if k.startswith(("input_layer.", "body.")) and k not in backbone]
    if wrong or missing:
        raise SetupError(f"{path.name} does not fit this W-encoder's IR-SE-50 backbone ({len(wrong)} mismatched, "
                              f"{len(missing)} missing keys); use --encoder-init none with --arch tiny")
    encoder.load_state_dict(backbone, strict=False)
    return path


@dataclass
class EncoderFile:
    encoder: torch.nn.Module
    latent_avg: Optional[torch.Tensor]
    generator: Optional[Generator]  # the decoder saved beside it
    path: Path
    output_size: int


def load_w_encoder_file(name_or_path) -> EncoderFile:
    path = resolve_file(name_or_path, kind="w_encoder")
    ckpt = ckpts.read_checkpoint(path).expect(ckpts.W_ENCODER, "--w-encoder")
    encoder = build_encoder(ckpts.encoder_config(ckpt))
    encoder.load_state_dict(ckpt.parts["encoder"], strict=True)
    for p in encoder.parameters():
        p.requires_grad_(False)
    generator = build_generator(ckpt) if "decoder" in ckpt.parts else None
    n_styles = 2 * log2(ckpt.output_size) - 2
    latent_avg = None if ckpt.latent_avg is None else as_styles(ckpt.latent_avg, n_styles)
    return EncoderFile(encoder.eval(), latent_avg, generator, Path(path), ckpt.output_size)


def build_hypernet(config: GeneratorConfig, layers: tuple, arch: str = "full", separable: bool = False) -> HyperNetwork:
    a = ARCHS[arch]
    try:
        return HyperNetwork(HypernetConfig(
            layer_shapes=tuple(config.layer_shapes), layers_to_tune=layers, separable=separable,
            widths=a["hypernet_widths"], blocks=a["hypernet_blocks"], feature_dim=a["feature_dim"],
            head_channels=a["head_channels"], shared_head_channels=a["shared_head_channels"]))
    except ValueError as err:
        raise SetupError(f"cannot build the hypernetwork for this generator: {err}. Choose other "
                              "--layers-to-tune.") from err


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)
