"""Tiny random models written in the released checkpoint formats.

Tests, CI, the benchmark's CPU mode and the trainer's self-check need real files without downloading gigabytes:
these have the released top-level structure (`state_dict` with `hypernet.*`/`encoder.*`/`decoder.*` keys, `opts`,
`latent_avg`; rosinality `g_ema` for generators) and the released key names, only narrower.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .engines.hyperstyle.encoders import EncoderConfig, build_encoder
from .engines.hyperstyle.hypernetwork import HyperNetwork, HypernetConfig
from .stylegan2.generator import Generator, GeneratorConfig

TINY_LAYERS_TO_TUNE = "0,2,3,5,6,8,9,11,12,14,15"  # shared 3x3 layers and the per-channel 128-px layers
TINY_WIDTHS = (16, 32, 64, 128)


def tiny_generator_config(size: int = 128, narrow: float = 1 / 16, style_dim: int = 64) -> GeneratorConfig:
    return GeneratorConfig.stylegan2(size=size, narrow=narrow, style_dim=style_dim)


def tiny_hypernet_config(gen: GeneratorConfig, layers_to_tune: str = TINY_LAYERS_TO_TUNE, separable=False,
                         widths=TINY_WIDTHS) -> HypernetConfig:
    from .engines.hyperstyle.hypernetwork import parse_layers_to_tune
    layers = tuple(i for i in parse_layers_to_tune(layers_to_tune, len(gen.layer_shapes)) if i < len(gen.layer_shapes))
    return HypernetConfig(layer_shapes=tuple(gen.layer_shapes), layers_to_tune=layers, separable=separable,
                          widths=widths, feature_dim=64, head_channels=32, shared_head_channels=16)


def tiny_encoder_config(kind: str, gen: GeneratorConfig, widths=TINY_WIDTHS) -> EncoderConfig:
    return EncoderConfig(kind=kind, n_styles=gen.n_styles, style_dim=gen.style_dim, widths=widths)


@torch.no_grad()
def randomize_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Make zero/one-initialised state non-trivial (BN statistics, PReLU slopes, biases, noise strengths) so a
    comparison between implementations exercises every parameter."""
    for name, m in module.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=generator)
            m.running_var.uniform_(0.5, 1.5, generator=generator)
            m.weight.uniform_(0.8, 1.2, generator=generator)
            m.bias.normal_(0, 0.1, generator=generator)
        elif isinstance(m, nn.PReLU):
            m.weight.uniform_(0.1, 0.4, generator=generator)
    for name, p in module.named_parameters():
        if name.endswith("noise.weight"):
            p.uniform_(0.05, 0.2, generator=generator)
        elif name.endswith("activate.bias") or (name.endswith(".bias") and "to_rgb" in name):
            p.normal_(0, 0.1, generator=generator)
    return module


def make_generator(config: GeneratorConfig, seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    return randomize_(Generator(config), torch.Generator().manual_seed(seed)).eval()


def _state(prefix: str, module: nn.Module) -> dict:
    return {f"{prefix}.{k}": v.clone() for k, v in module.state_dict().items()}


def write_tiny_checkpoints(folder, size: int = 128, seed: int = 0, layers_to_tune: str = TINY_LAYERS_TO_TUNE,
                           separable: bool = False, narrow: float = 1 / 16) -> dict:
    """Write hyperstyle.pt, w_encoder.pt, e4e.pt and generator.pt (released formats) into `folder`.

    `narrow` scales the generator's channels (1: StyleGAN2's full width, for tests that need a model of some size).
    Returns {'hyperstyle': path, 'w_encoder': path, 'e4e': path, 'generator': path}.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen_config = tiny_generator_config(size, narrow)
    generator = make_generator(gen_config, seed)
    latent_avg = generator.mean_latent(2000).repeat(gen_config.n_styles, 1)
    rng = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 1)
    hypernet = randomize_(HyperNetwork(tiny_hypernet_config(gen_config, layers_to_tune, separable)), rng)
    w_encoder = randomize_(build_encoder(tiny_encoder_config("w_encoder", gen_config)), rng)
    e4e = randomize_(build_encoder(tiny_encoder_config("e4e", gen_config)), rng)

    common = {"output_size": size, "dataset_type": "ffhq_hypernet", "device": "cpu", "checkpoint_path": None}
    paths = {name: folder / f"{name}.pt" for name in ("hyperstyle", "w_encoder", "e4e", "generator")}
    decoder = _state("decoder", generator)
    torch.save({"state_dict": {**_state("hypernet", hypernet), **decoder}, "latent_avg": latent_avg,
                "opts": {**common, "encoder_type": "SharedWeightsHyperNetResNet" + ("Separable" if separable else ""),
                         "input_nc": 6, "layers_to_tune": layers_to_tune, "w_encoder_type": "WEncoder",
                         "load_w_encoder": True, "n_iters_per_batch": 5}}, paths["hyperstyle"])
    torch.save({"state_dict": {**_state("encoder", w_encoder), **decoder}, "latent_avg": latent_avg,
                "opts": {**common, "encoder_type": "WEncoder", "input_nc": 3}}, paths["w_encoder"])
    _save_e4e(paths["e4e"], e4e, generator, latent_avg)
    torch.save({"g_ema": generator.state_dict(), "latent_avg": latent_avg[0]}, paths["generator"])
    return paths


def _save_e4e(path: Path, e4e: nn.Module, generator: Generator, latent_avg: torch.Tensor) -> None:
    """e4e_ffhq_encode.pt's layout: the encoder and its generator under `state_dict`, options, latent_avg."""
    torch.save({"state_dict": {**_state("encoder", e4e), **_state("decoder", generator)}, "latent_avg": latent_avg,
                "opts": {"stylegan_size": generator.size, "encoder_type": "Encoder4Editing",
                         "start_from_latent_avg": True, "device": "cpu", "dataset_type": "ffhq_encode"}}, path)


TINY_SFE_WIDTHS = (8, 16, 24, 32)  # IResNet and e4e stages (released: 64, 128, 256, 512); distinct, as e4e reads stages off them
TINY_SFE_UNITS = (1, 2, 2, 1)  # blocks per stage (the released 3, 4, 14, 3): each stage has a plain block after its first


def make_tiny_sfe(folder, size: int = 128, seed: int = 0, narrow: float = 1 / 16) -> dict:
    """Write StyleFeatureEditor's four files in the released layouts into `folder`: sfe_editor.pt (`inverter.*` +
    `encoder.*` = the feature editor, under `state_dict`, with a stray `discriminator.*` tensor as the training files
    carry), sfe_inverter.pt (`encoder.*` = the inverter), e4e.pt and generator.pt. size >= 128 (SFE replaces the
    generator's 64-px feature). The encoders are narrower than `write_tiny_checkpoints`' so that a CPU inversion takes
    a fraction of a second. Returns {'sfe_editor', 'sfe_inverter', 'e4e', 'generator'} -> path."""
    from .engines.sfe.feature_editor import FeatureStack, FeatureStackConfig
    from .engines.sfe.inverter import Inverter, InverterConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen_config = tiny_generator_config(size, narrow)
    generator = make_generator(gen_config, seed)
    latent_avg = generator.mean_latent(2000).repeat(gen_config.n_styles, 1)
    channels, _ = generator.feature_shape(9)
    rng = torch.Generator().manual_seed(seed + 2)
    torch.manual_seed(seed + 2)
    inverter = randomize_(Inverter(InverterConfig(
        n_styles=gen_config.n_styles, style_dim=gen_config.style_dim, widths=TINY_SFE_WIDTHS, units=TINY_SFE_UNITS,
        content_channels=channels, fuser=FeatureStackConfig(2 * channels, channels))), rng)
    editor = randomize_(FeatureStack(FeatureStackConfig(2 * channels, channels)), rng)
    e4e = randomize_(build_encoder(tiny_encoder_config("e4e", gen_config, widths=TINY_SFE_WIDTHS)), rng)
    discriminator = {"discriminator.final_linear.0.weight": torch.randn(8, 16, generator=rng)}
    paths = {name: folder / f"{name}.pt" for name in ("sfe_editor", "sfe_inverter", "e4e", "generator")}
    torch.save({"state_dict": {**_state("inverter", inverter), **_state("encoder", editor), **discriminator},
                "latent_avg": latent_avg[0]}, paths["sfe_editor"])
    torch.save({"state_dict": {**_state("encoder", inverter), **discriminator}, "latent_avg": latent_avg[0]},
               paths["sfe_inverter"])
    _save_e4e(paths["e4e"], e4e, generator, latent_avg)
    torch.save({"g_ema": generator.state_dict(), "latent_avg": latent_avg[0]}, paths["generator"])
    return paths


def write_tiny_clip(folder, seed: int = 0, projection_dim: int = 16) -> Path:
    """A tiny random CLIP text tower (transformers format) with a byte-level tokenizer (no merges): what
    `styleclip.load_text_encoder(folder)` reads, for tests without the 600 MB download."""
    import json

    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # byte-level BPE's alphabet: printable bytes stand for themselves, the others for the code points from 256 on
    printable = [b for b in range(256) if chr(b).isprintable() and b != 32 and not 127 <= b <= 160 and b != 173]
    others = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>",
                                                                                   "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=projection_dim,
                            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                            pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(seed)
    CLIPTextModelWithProjection(config).save_pretrained(str(folder))
    from transformers import CLIPTokenizer

    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(str(folder))
    return folder


def write_tiny_styleclip_files(folder, generator: Generator, clip_dim: int = 16, seed: int = 0) -> Path:
    """Synthetic fs3.npy, S_mean_std (the official pickle layout: ([mean [1, width]], [std [1, width]])) and
    templates.txt for `generator`."""
    import pickle

    import numpy as np

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    widths = generator.style_widths()
    channels = sum(w for layer, w in enumerate(widths) if layer not in generator.config.to_rgb_layers)
    fs3 = rng.standard_normal((channels, clip_dim)).astype(np.float32)
    # rows of norm 0.28: relevances to a unit text direction stay below 0.28, as the official ones stay small, so
    # the node's largest β (0.3) keeps no channel and its default (0.13) keeps a few percent
    np.save(folder / "fs3.npy", 0.28 * fs3 / np.linalg.norm(fs3, axis=1, keepdims=True))
    means = [rng.standard_normal((1, w)).astype(np.float32) for w in widths]
    stds = [rng.uniform(0.1, 0.5, (1, w)).astype(np.float32) for w in widths]
    with open(folder / "S_mean_std", "wb") as f:
        pickle.dump([means, stds], f, protocol=3)
    (folder / "templates.txt").write_text("a photo of a {}.\na bad photo of the {}.\nart of a {}.\n",
                                          encoding="utf-8")
    return folder
