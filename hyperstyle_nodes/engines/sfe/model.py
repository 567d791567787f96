"""StyleFeatureEditor inversion and editing, following the official `FSEFull` / `FSEInferenceRunner`:

    x          = the input at 256x256 in [-1, 1]                       (bilinear, as the official F.interpolate)
    codes      = latent_avg + fs_backbone(x).codes                     W+, what edits move
    F_w        = G.feature(codes, 9)                                   the generator's own 64-px feature
    fused      = fuser(cat[fs_backbone(x).feature, F_w])               the F-space tensor kept with the inversion
    e4e_codes  = latent_avg + e4e(x)                                   the editing reference
decode, for edited codes c' and e4e codes e' (the same edit; unedited: c' = codes, delta = 0):
    delta      = G.feature(e4e_codes, 9) - G.feature(e', 9)
    image      = G(c', feature 9 := feature_editor(cat[fused, delta]))
An inverter-only file (official `FSEInverter`) decodes with `fused` itself and has no feature editor for edits.
All of it runs on the pack's one StyleGAN2 (`Generator.feature`, `new_features`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ... import image_checks
from ..common import GeneratorModel, broadcast_batch, generator_bytes_per_image
from ..hyperstyle.encoders import build_encoder
from ..hyperstyle.model import build_generator, to_unit_range
from .feature_editor import FeatureStack
from .inverter import Inverter
from ...loaders import checkpoints as ckpts
from ...stylegan2.cuda_graphs import GraphedInference, fork
from ...stylegan2.generator import Generator

FEATURE_INDEX = 9  # official `w_feats[9]`: the 64-px conv's output
INPUT_SIZE = 256


class SFEEditError(ValueError):
    """An edit this model cannot run (an inverter-only file, or edited codes without their e4e twins)."""


@dataclass
class SFEInversion:
    codes: torch.Tensor  # [B, n_styles, style_dim] inverter W+ (latent_avg added): the codes edits move
    e4e_codes: Optional[torch.Tensor]  # [B, n_styles, style_dim] e4e's W+ (latent_avg added); None without e4e
    features: torch.Tensor  # [B, C, 64, 64] the fused F-space tensor (official `fused_feat`)
    images: Optional[torch.Tensor] = None  # [B, 3, R, R] in [0, 1], the reconstruction


class SFEModel(GeneratorModel, GraphedInference, nn.Module):
    def __init__(self, generator: Generator, inverter: Inverter, latent_avg: torch.Tensor,
                 e4e: Optional[nn.Module] = None, feature_editor: Optional[FeatureStack] = None, name: str = "sfe"):
        super().__init__()
        self.generator = generator
        self.inverter = inverter
        self.e4e = e4e
        self.feature_editor = feature_editor
        latent_avg = latent_avg.detach().float().reshape(-1, latent_avg.shape[-1])
        self.register_buffer("latent_avg", latent_avg.expand(generator.n_styles, -1).clone())
        self.feature_layer = FEATURE_INDEX
        self.name = name
        self.generator_signature = ""  # checkpoints.weights_signature of the generator: inversions fit only it
        self._init_graphs()  # CUDA graphs at GPU inference (cuda_graphs.py)

    # ---- properties --------------------------------------------------------------------------------------------
    # resolution, n_styles, device, dtype: GeneratorModel

    @property
    def can_edit(self) -> bool:
        """Whether edits run the feature editor (an editor file with e4e), as opposed to an inverter-only model."""
        return self.feature_editor is not None and self.e4e is not None

    # ---- public API --------------------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] or uint8 -> [B, 3, 256, 256] in [-1, 1]: the official bilinear resize
        (align_corners=False, no antialiasing) of the normalised image, on the model's device and dtype."""
        x = image_checks.rgb_bchw(images).to(self.device) * 2 - 1
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return x.to(self.dtype)

    @torch.no_grad()
    def invert(self, images: torch.Tensor, reconstruct: bool = True) -> SFEInversion:
        """Invert face-aligned images [B, 3, H, W] in [0, 1] (or uint8). reconstruct: also decode the
        reconstruction (`images`), which is what `decode(inversion)` returns."""
        x = self.preprocess(images)
        codes, e4e_codes, fused, reconstruction = self._replayed(
            ("invert", reconstruct), functools.partial(self._invert_normalized, reconstruct=reconstruct), [x])
        return SFEInversion(codes=codes, e4e_codes=e4e_codes, features=fused, images=reconstruction)

    @torch.no_grad()
    def decode(self, inversion: SFEInversion, codes: Optional[torch.Tensor] = None,
               e4e_codes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, 3, R, R] in [0, 1]. codes / e4e_codes: the edited inverter and e4e codes (the same edit applied to
        both); None: unedited. Without e4e_codes, the e4e codes move by the same W+ offset as the codes, which is
        the same edit for every additive one (InterFaceGAN, GANSpace, any W+ direction). An inversion of batch 1
        is shared by a batch of edited codes (e.g. several strengths)."""
        if codes is None:
            if e4e_codes is not None:
                raise SFEEditError("e4e_codes without codes: pass the edited inverter codes too (the same edit)")
            codes = self._checked_codes(inversion.codes, "the inversion's codes")
            return self._replayed("reconstruct", self._reconstruct, [codes, self._features(inversion, codes)])
        codes = self._checked_codes(codes, "codes")
        self.require_editing(inversion)
        batch = codes.shape[0]
        reference = self._batched(inversion.e4e_codes, batch).to(self.device, self.dtype)
        if e4e_codes is None:
            e4e_codes = reference + (codes - self._batched(inversion.codes, batch).to(self.device, self.dtype))
        e4e_codes = self._checked_codes(e4e_codes, "e4e_codes")
        return self._replayed("edit", self._edit, [codes, e4e_codes, reference, self._features(inversion, codes)])

    @torch.no_grad()
    def decode_styles(self, inversion: SFEInversion, styles: Sequence[torch.Tensor],
                      e4e_styles: Sequence[torch.Tensor]) -> torch.Tensor:
        """StyleSpace edits: `styles` / `e4e_styles` are the edited StyleSpace vectors of the inverter and e4e codes
        (`generator.styles(codes)` order, the same edit applied to both), as the official StyleSpace path."""
        self.generator.check_styles(styles)
        self.generator.check_styles(e4e_styles)
        self.require_editing(inversion)
        styles = [s.to(self.device, self.dtype) for s in styles]
        reference = self._batched(inversion.e4e_codes, styles[0].shape[0]).to(self.device, self.dtype)
        return self._image(self._features(inversion, styles[0]), styles, self.generator.styles(reference),
                           [s.to(self.device, self.dtype) for s in e4e_styles])

    # ---- steps (each a pure function of tensors: what a CUDA graph records) -------------------------------------
    def _invert_normalized(self, x: torch.Tensor, reconstruct: bool) -> tuple:
        """x at 256 px in [-1, 1] -> (codes, e4e codes or None, fused feature, reconstruction or None)."""
        e4e_codes, branch = None, None
        if self.e4e is not None:  # independent of the inverter: on a GPU, concurrently with it
            branch = fork(x)
            e4e_codes = branch.run(self._e4e_codes, x) if branch else self._e4e_codes(x)
        codes, predicted = self.inverter.fs_backbone(x)
        codes = codes + self.latent_avg.to(codes.dtype)
        own = self.generator.feature(codes, FEATURE_INDEX)
        fused = self.inverter.fuser(torch.cat([predicted, own.to(predicted.dtype)], dim=1))
        if branch is not None:
            branch.join(e4e_codes)
        return codes, e4e_codes, fused, self._reconstruct(codes, fused) if reconstruct else None

    def _e4e_codes(self, x: torch.Tensor) -> torch.Tensor:
        return self.e4e(x) + self.latent_avg.to(x.dtype)

    def _reconstruct(self, codes: torch.Tensor, fused: torch.Tensor) -> torch.Tensor:
        return self._image(fused, self.generator.styles(codes), None, None)

    def _edit(self, codes, e4e_codes, reference, fused) -> torch.Tensor:
        styles = self.generator.styles
        return self._image(fused, styles(codes), styles(reference), styles(e4e_codes))

    def _image(self, fused: torch.Tensor, styles: list, reference_styles: Optional[list],
               e4e_styles: Optional[list]) -> torch.Tensor:
        """The image for `styles` with feature 9 replaced: the fused feature edited by the feature editor for the
        move from `reference_styles` (the inversion's e4e codes) to `e4e_styles` (None: no move, delta 0)."""
        if self.feature_editor is None:  # inverter-only: the official FSEInverter decodes with the fused feature
            feature = fused
        else:
            delta = torch.zeros_like(fused) if e4e_styles is None else self._feature_move(reference_styles, e4e_styles)
            feature = self.feature_editor(torch.cat([fused, delta.to(fused.dtype)], dim=1))
        return to_unit_range(self.generator.synthesis(styles, new_features={FEATURE_INDEX: feature}))

    def _feature_move(self, reference_styles: list, e4e_styles: list) -> torch.Tensor:
        """F(reference) - F(edited e4e codes) at feature 9, the two in one generator pass of twice the batch (half
        the kernels; on an H100 its time was within the noise of two passes)."""
        batch = e4e_styles[0].shape[0]
        both = self.generator.synthesis_feature([torch.cat(pair) for pair in zip(reference_styles, e4e_styles)],
                                                FEATURE_INDEX)
        return both[:batch] - both[batch:]

    def _replayed(self, name, fn: Callable, inputs: list):
        """fn(*inputs), through a recorded CUDA graph on a GPU (copies of its outputs: the next replay overwrites
        them), else directly."""
        graphs = self._graphs()
        if graphs is None:
            return fn(*inputs)
        outputs = graphs.run(name, fn, inputs)
        if isinstance(outputs, torch.Tensor):
            return outputs.clone()
        return tuple(None if t is None else t.clone() for t in outputs)

    def _features(self, inversion: SFEInversion, like: torch.Tensor) -> torch.Tensor:
        return self._batched(inversion.features, like.shape[0]).to(self.device, self.dtype)

    def _warmup_budget(self, batch: int) -> int:
        """What a first call may add to the memory in use (`GraphCache`): about 1.5x an inversion's working set
        (the generator pass and the three 256-px backbones), at least 1 GiB."""
        size = torch.finfo(self.dtype).bits // 8
        return max(1 << 30, batch * (generator_bytes_per_image(self.generator) + 3 * 64 * 128 * 128 * size * 8))

    def encoder_parts(self) -> tuple:
        """The convolutional networks besides the generator (`channels_last_`)."""
        return self.inverter, self.feature_editor, self.e4e

    def require_editing(self, inversion: Optional[SFEInversion] = None) -> None:
        """Raises SFEEditError, saying what to load, unless this model (and the inversion, if given) can edit."""
        if self.feature_editor is None:
            raise SFEEditError(f"{self.name} is an SFE inverter (inversion only): it has no feature editor, so edits "
                               f"would lose the detail SFE keeps. Load sfe_editor_light.pt to edit.")
        if self.e4e is None or (inversion is not None and inversion.e4e_codes is None):
            raise SFEEditError("SFE edits need e4e's codes for the same image (the editing reference): load the model "
                               "with e4e=e4e_ffhq_encode.pt and invert the image again.")

    def _checked_codes(self, codes: torch.Tensor, what: str) -> torch.Tensor:
        shape = (self.n_styles, self.generator.style_dim)
        if codes.ndim != 3 or tuple(codes.shape[1:]) != shape:
            raise ValueError(f"{what} should have shape [B, {shape[0]}, {shape[1]}] for this {self.resolution}-px "
                             f"model, got {list(codes.shape)}")
        return codes.to(self.device, self.dtype)

    @staticmethod
    def _batched(t: torch.Tensor, batch: int) -> torch.Tensor:
        matched = broadcast_batch(t, batch)
        if matched is not None:
            return matched
        raise ValueError(f"the inversion has batch {t.shape[0]} but the edited codes have batch {batch}; pass codes "
                         f"for each inverted image, or invert one image to share it between several edits")


# ------------------------------------------------------------------------------------------------------------------
# Loading


def load_sfe(editor, *, e4e, generator, device="cpu", dtype=torch.float32) -> SFEModel:
    """Build SFE from the released files, read unchanged (weights only, never pickled code).

    editor: sfe_editor_light.pt (inversion and edits) or sfe_inverter_light.pt (inversion only).
    e4e: e4e_ffhq_encode.pt (the editing reference; may be None for an inverter-only file).
    generator: stylegan2-ffhq-config-f.pt (rosinality g_ema + latent_avg), or a file holding that generator.
    Wrong kinds or sizes fail with a CheckpointError naming the file and what it is.
    """
    main = ckpts.read_checkpoint(editor).expect((ckpts.SFE_EDITOR, ckpts.SFE_INVERTER),
                                                "the StyleFeatureEditor checkpoint")
    gen_ckpt = ckpts.read_checkpoint(generator)
    if "decoder" not in gen_ckpt.parts:
        gen_ckpt.expect(ckpts.GENERATOR, "the SFE generator")
    gen_ckpt.expect_size(main.output_size, "the generator", f"the SFE checkpoint {main.name}")
    gen = build_generator(gen_ckpt)
    with ckpts.contents_checked(main):
        inverter = Inverter(ckpts.sfe_inverter_config(main))
    ckpts.load_weights(inverter, main, "inverter")
    _check_widths(main, gen, inverter)
    feature_editor = None
    if main.kind == ckpts.SFE_EDITOR:
        with ckpts.contents_checked(main):
            feature_editor = FeatureStack(ckpts.sfe_editor_config(main))
        ckpts.load_weights(feature_editor, main, "feature_editor")
        channels = inverter.config.fuser.channels
        if feature_editor.config.channels != channels or feature_editor.config.in_channels != 2 * channels:
            raise ckpts.CheckpointError(f"{main.name}: its feature editor maps {feature_editor.config.in_channels} to "
                                        f"{feature_editor.config.channels} channels, but its inverter's features have "
                                        f"{channels} (expected {2 * channels} -> {channels}); the file is damaged.")
        if e4e is None:
            raise ckpts.CheckpointError(f"{main.name} edits against e4e's codes: pass e4e=e4e_ffhq_encode.pt "
                                        f"(the e4e encoder for the same generator).")
    encoder = None
    if e4e is not None:
        enc = ckpts.read_checkpoint(e4e).expect(ckpts.E4E, "the e4e encoder")
        enc.expect_size(main.output_size, "an e4e encoder", f"the SFE checkpoint {main.name}")
        with ckpts.contents_checked(enc):
            encoder = build_encoder(ckpts.encoder_config(enc))
        ckpts.load_weights(encoder, enc, "encoder")
        if encoder.config.style_dim != gen.style_dim:
            raise ckpts.CheckpointError(f"The e4e encoder {enc.name} makes {encoder.config.style_dim}-wide codes but "
                                        f"the generator {gen_ckpt.name} takes {gen.style_dim}-wide ones: they belong "
                                        f"to different models.")
    # the official code adds the generator file's latent_avg to both the inverter's and e4e's codes
    latent_avg = gen_ckpt.latent_avg if gen_ckpt.latent_avg is not None else main.latent_avg
    if latent_avg is None:
        latent_avg = gen.mean_latent(10000)[0]
    model = SFEModel(gen, inverter, latent_avg, encoder, feature_editor, name=Path(editor).name)
    model.generator_signature = ckpts.weights_signature(gen_ckpt.parts["decoder"])
    return model.eval().to(device=device, dtype=dtype).channels_last_()


def _check_widths(main: ckpts.Checkpoint, gen: Generator, inverter: Inverter) -> None:
    """The inverter's codes and features must fit the generator (else a raw shape error deep in torch)."""
    if gen.n_features - 1 <= FEATURE_INDEX:
        raise ckpts.CheckpointError(f"{main.name}: SFE replaces the generator's 64-px feature, which needs a generator "
                                    f"of at least 128 px; this one is {gen.size} px.")
    channels, _ = gen.feature_shape(FEATURE_INDEX)
    config = inverter.config
    problems = []
    if config.style_dim != gen.style_dim:
        problems.append(f"its codes are {config.style_dim} wide, the generator's {gen.style_dim}")
    if config.fuser.channels != channels or config.fuser.in_channels != config.content_channels + channels:
        problems.append(f"its features have {config.fuser.channels} channels (from {config.fuser.in_channels}), the "
                        f"generator's 64-px feature {channels}")
    if problems:
        raise ckpts.CheckpointError(f"{main.name} does not fit this generator ({'; '.join(problems)}): use the "
                                    f"generator the SFE model was trained with (stylegan2-ffhq-config-f.pt).")
