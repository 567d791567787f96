"""What the nodes and the CLI do, on ComfyUI's image layout, with models from the shared manager.

ComfyUI's IMAGE is a float tensor [B, H, W, C] in [0, 1]; the engine works on [B, 3, H, W]. The values that flow
between nodes are the small dataclasses below: a handle to a manager-owned model, latent codes and compact offsets,
each tagged with the model they belong to: its name (for messages) and its generator's signature (compared: codes
and offsets fit only the generator they were made for; another HyperStyle file with the same generator may use
them). Codes and offsets live on the CPU between nodes (like IMAGE), so nothing stays on the GPU after a prompt
except the models the manager keeps.

Two engines share the graph: HyperStyle (codes + weight offsets) and StyleFeatureEditor (SFE: codes + an F-space
feature tensor, edited by its feature editor). The checkpoint decides which one Load HyperStyle builds; an SFE
inversion travels on the same latent edge, its extra tensors in `Latent.sfe`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .loaders import checkpoints as ckpts
from . import image_checks, safe_paths
from .loaders import downloads
from .editing import directions as editing
from .editing import menu
from .loaders import inversion_io
from .editing import styleclip
from .faces.face_detect import FaceDetector, load_face_detector
from .loaders.manager import file_identity, get_manager
from .engines.hyperstyle.model import HyperStyleModel, load_generator, load_hyperstyle
from .stylegan2.generator import Generator


# ---------------------------------------------------------------------------------------------------------------
# Values on graph edges


HYPERSTYLE, SFE = "hyperstyle", "sfe"  # the engines
SFE_KINDS = (ckpts.SFE_EDITOR, ckpts.SFE_INVERTER)
SFE_GENERATOR = "stylegan2-ffhq-config-f"  # the StyleGAN2 the released SFE files were trained on


@dataclass
class LoadedModel:
    """HYPERSTYLE_MODEL: a manager-owned HyperStyle or SFE model and what identifies it."""

    handle: object  # manager.ModelHandle
    model_id: str
    resolution: int
    n_styles: int
    encoder_kind: Optional[str] = None
    signature: str = ""  # the generator's weights fingerprint (HyperStyleModel.generator_signature)
    engine: str = HYPERSTYLE  # or SFE
    kind: str = ckpts.HYPERSTYLE  # the checkpoint's kind: hyperstyle, sfe_editor or sfe_inverter

    def use(self) -> HyperStyleModel:
        return self.handle.use()


@dataclass
class SFEState:
    """What an SFE inversion carries beside its codes. Edits move `e4e_codes` as they move the codes; the unedited
    inversion stays, because SFE's feature editor measures an edit against it (the e4e reconstruction before and
    after the edit) to adjust the F-space features."""

    e4e_codes: Optional[torch.Tensor]  # [B, n_styles, style_dim], edited like the codes; None: inverter-only model
    inverted_codes: torch.Tensor  # the unedited inversion: inverter codes,
    inverted_e4e_codes: Optional[torch.Tensor]  # e4e codes
    features: torch.Tensor  # and F-space features [B, C, H, W]

    def tensors(self) -> dict:
        return {name: value for name, value in vars(self).items() if value is not None}

    def repeated(self, times: int) -> "SFEState":
        """Each tensor repeated `times` times along the batch (strength-major, as a sweep's codes)."""
        return SFEState(**{name: None if t is None else t.repeat(times, *([1] * (t.dim() - 1)))
                           for name, t in vars(self).items()})


@dataclass
class StyleSpaceEdit:
    """StyleSpace moves on top of the codes (SFE's StyleSpace edits): Decode adds `amounts[:, k]` to channel
    `channels[k][1]` of generator layer `channels[k][0]`'s style vector (for an SFE inversion, of both its codes' and
    its e4e codes' styles)."""

    channels: tuple  # ((layer, channel), ...), distinct
    amounts: torch.Tensor  # [B, len(channels)]

    def repeated(self, times: int) -> "StyleSpaceEdit":
        return StyleSpaceEdit(self.channels, self.amounts.repeat(times, 1))

    def plus(self, channels: tuple, amounts: torch.Tensor) -> "StyleSpaceEdit":
        """Another move added: amounts [B, len(channels)] (channels already moved add up)."""
        merged = self.channels + tuple(c for c in channels if c not in self.channels)
        total = torch.zeros(amounts.shape[0], len(merged))
        total[:, :len(self.channels)] = self.amounts
        for k, channel in enumerate(channels):
            total[:, merged.index(channel)] += amounts[:, k]
        return StyleSpaceEdit(merged, total)


@dataclass
class Latent:
    """HYPERSTYLE_LATENT: W+ codes [B, n_styles, style_dim] and the model they came from; for an SFE inversion, also
    its e4e codes and F-space features (`sfe`); after a StyleSpace edit, its channel moves (`stylespace`)."""

    codes: torch.Tensor
    model_id: str
    signature: str = ""  # of the model's generator; "" (unknown: older saved files) is not compared
    sfe: Optional[SFEState] = None
    stylespace: Optional[StyleSpaceEdit] = None

    @property
    def batch(self) -> int:
        return self.codes.shape[0]

    @property
    def engine(self) -> str:
        return HYPERSTYLE if self.sfe is None else SFE


@dataclass
class Offsets:
    """HYPERSTYLE_DELTAS: per generator layer None, [B, out, in, k, k] or compact [B, out, in]; batch-aligned."""

    deltas: list
    model_id: str
    signature: str = ""  # as Latent.signature

    @property
    def batch(self) -> int:
        return next((d.shape[0] for d in self.deltas if d is not None), 1)


@dataclass
class LoadedGenerator:
    """HYPERSTYLE_GENERATOR: another StyleGAN2 generator of the same architecture (domain adaptation)."""

    handle: object
    name: str
    resolution: int


# ---------------------------------------------------------------------------------------------------------------
# Images


def image_to_bchw(image: torch.Tensor, what: str = "image") -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C] (C = 1, 2, 3 or 4) -> RGB [B, 3, H, W] float in [0, 1] on the CPU.

    The values follow image_checks' policy (uint8 /255; floats finite and in [0, 1]); grayscale is repeated to RGB
    and an alpha channel is ignored.
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
    return image_checks.rgb_bhwc(image, what).permute(0, 3, 1, 2).contiguous()


def bchw_to_image(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> ComfyUI IMAGE [B, H, W, 3] float32 on the CPU."""
    return x.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().contiguous()


def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


# ---------------------------------------------------------------------------------------------------------------
# Models


def resolve(name_or_path, kind: Optional[str] = None):
    """`downloads.resolve`; while a node runs (safe_paths.confined), only files inside the models folders."""
    return safe_paths.check_model_file(downloads.resolve(name_or_path, kind=kind), downloads.model_folders())


def load_model(checkpoint: str, encoder: Optional[str] = None, precision: str = "auto",
               device: str = "auto", generator: str = SFE_GENERATOR) -> LoadedModel:
    """Resolve (download if needed) and load HyperStyle or StyleFeatureEditor + an initial encoder through the
    shared manager.

    The files' own contents say what they are: the checkpoint whether it is HyperStyle or SFE (editor, or inverter
    alone), the encoder whether it is a W-encoder or an e4e encoder. `generator` (the StyleGAN2 file SFE decodes
    with) is read for SFE only.
    """
    manager = get_manager()
    torch_device = manager.get_device(device)
    dtype = manager.get_dtype(precision, torch_device)
    main_path = resolve(checkpoint, kind=_registry_kind(checkpoint, (ckpts.HYPERSTYLE,) + SFE_KINDS))
    kind = ckpts.checkpoint_kind(main_path)
    enc_path = encoder_kind = None
    if encoder and encoder != "none":
        enc_path = resolve(encoder)
        encoder_kind = ckpts.read_checkpoint(enc_path).kind
    if kind in SFE_KINDS:
        return _load_sfe(main_path, kind, enc_path, encoder_kind, generator, torch_device, dtype)
    key = ("hyperstyle", file_identity(main_path), None if enc_path is None else file_identity(enc_path))

    def build():
        kwargs = {}
        if encoder_kind == ckpts.E4E:
            kwargs["e4e"] = enc_path
        elif enc_path is not None:
            kwargs["w_encoder"] = enc_path  # load_hyperstyle names the file's kind if it is not a W-encoder
        return load_hyperstyle(main_path, device="cpu", dtype=torch.float32, **kwargs)

    handle = manager.load(key, build, device=torch_device, dtype=dtype)
    model = handle.model
    return LoadedModel(handle=handle, model_id=f"{main_path.name}:{main_path.stat().st_size}",
                       resolution=model.resolution, n_styles=model.n_styles, encoder_kind=encoder_kind,
                       signature=model.generator_signature)


def _registry_kind(name, kinds: tuple) -> str:
    """The registry kind of `name` if it is one of `kinds`, else the first of them (what `resolve` then checks)."""
    entry = downloads.load_registry().get(str(name).strip())
    return entry.kind if entry is not None and entry.kind in kinds else kinds[0]


def _load_sfe(main_path, kind: str, enc_path, encoder_kind, generator: str, torch_device, dtype) -> LoadedModel:
    """StyleFeatureEditor: its checkpoint, the e4e encoder (the reference its feature editor measures edits with)
    and the StyleGAN2 generator it decodes with."""
    if encoder_kind != ckpts.E4E and (kind == ckpts.SFE_EDITOR or enc_path is not None):
        found = ("no initial encoder" if enc_path is None
                 else f"{enc_path.name}, {ckpts.KIND_DESCRIPTIONS[encoder_kind]}")
        raise ValueError(f"{main_path.name} is a StyleFeatureEditor checkpoint: its initial encoder must be the e4e "
                         f"encoder (e4e_ffhq_encode), which SFE's feature editor edits against, but it got {found}. "
                         f"Choose e4e_ffhq_encode as the initial encoder.")
    gen_path = resolve(generator, kind="generator")
    key = ("sfe", file_identity(main_path), None if enc_path is None else file_identity(enc_path),
           file_identity(gen_path))

    def build():
        from .engines.sfe.model import load_sfe
        model = load_sfe(main_path, e4e=enc_path, generator=gen_path, device="cpu", dtype=torch.float32)
        if not getattr(model, "generator_signature", ""):  # as HyperStyle's: of the generator file's weights
            model.generator_signature = ckpts.weights_signature(ckpts.read_checkpoint(gen_path).parts["decoder"])
        return model

    handle = get_manager().load(key, build, device=torch_device, dtype=dtype)
    model = handle.model
    return LoadedModel(handle=handle, model_id=f"{main_path.name}:{main_path.stat().st_size}",
                       resolution=model.resolution, n_styles=model.generator.config.n_styles, encoder_kind=encoder_kind,
                       signature=model.generator_signature, engine=SFE, kind=kind)


def load_domain_generator(name: str, device: str = "auto", precision: str = "auto") -> LoadedGenerator:
    manager = get_manager()
    torch_device = manager.get_device(device)
    path = resolve(name, kind="generator")
    handle = manager.load(("generator", file_identity(path)), lambda: load_generator(path),
                          device=torch_device, dtype=manager.get_dtype(precision, torch_device))
    return LoadedGenerator(handle=handle, name=path.name, resolution=handle.model.size)


def load_detector(name: str = "retinaface_resnet50", device: str = "auto") -> FaceDetector:
    """RetinaFace weights through the registry/models folder (never facexlib's own downloader)."""
    manager = get_manager()
    torch_device = manager.get_device(device)
    path = resolve(name, kind="face_detector")
    # the backbone is read from the file's keys, so a renamed file loads too
    handle = manager.load(("face_detector", file_identity(path)),
                          lambda: load_face_detector(path, "auto", device="cpu"), device=torch_device)
    handle.use()
    return handle.model


# ---------------------------------------------------------------------------------------------------------------
# Encode / refine / decode


def _on_model(model: HyperStyleModel, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.to(model.device)


def _broadcast_batches(**batches: int) -> int:
    """The common batch size; 1 broadcasts against N, anything else must match."""
    sizes = {name: b for name, b in batches.items() if b is not None}
    n = max(sizes.values())
    bad = {name: b for name, b in sizes.items() if b not in (1, n)}
    if bad:
        listing = ", ".join(f"{name} {b}" for name, b in sizes.items())
        raise ValueError(f"batch sizes do not match ({listing}). Connect inputs with the same batch size, or a "
                         f"batch of 1 to apply to every item.")
    return n


def _check_signature(model: LoadedModel, value, what: str, made_by: str) -> None:
    """Codes and offsets fit only the generator they were made with (an unknown signature is not compared)."""
    if value.signature and model.signature and value.signature != model.signature:
        raise ValueError(f"{what.capitalize()} from {value.model_id} (generator {value.signature}) cannot be used with "
                         f"{model.model_id} (generator {model.signature}): they fit only the generator they were made "
                         f"with. Connect the {what} from this model's {made_by} (or Load Inversion of a file saved "
                         f"with it), or load {value.model_id.rsplit(':', 1)[0]} in Load HyperStyle.")


def _check_engine(model: LoadedModel, latent: Latent) -> None:
    """An SFE inversion decodes only with the SFE model, a HyperStyle latent only with a HyperStyle model."""
    if latent.engine == model.engine:
        return
    if latent.engine == SFE:
        raise ValueError(f"this latent is a StyleFeatureEditor inversion (from {latent.model_id}), but the model is "
                         f"HyperStyle ({model.model_id}). Connect the model from the Load HyperStyle node that loaded "
                         f"the SFE checkpoint, or encode with this HyperStyle model.")
    raise ValueError(f"this latent has no StyleFeatureEditor inversion (it comes from {latent.model_id}), but the "
                     f"model {model.model_id} is SFE, which needs its own inversion's e4e codes and F-space features. "
                     f"Encode the image with this SFE model's e4e Encode (or Load Inversion of a file saved from it).")


def _check_latent(model: LoadedModel, latent: Latent) -> None:
    _check_engine(model, latent)
    if latent.codes.shape[1] != model.n_styles:
        raise ValueError(f"this latent has {latent.codes.shape[1]} style codes (from {latent.model_id}) but the "
                         f"model {model.model_id} is {model.resolution} px with {model.n_styles}; encode with the "
                         f"same model")
    _check_signature(model, latent, "latent", "e4e Encode")


def _check_offsets(loaded: LoadedModel, model: HyperStyleModel, offsets: Offsets) -> None:
    _check_signature(loaded, offsets, "offsets", "HyperStyle Refine")
    shapes = model.generator.config.layer_shapes
    if len(offsets.deltas) != len(shapes):
        raise ValueError(f"these offsets have {len(offsets.deltas)} layers (from {offsets.model_id}) but the model "
                         f"has {len(shapes)}; refine with the same model")
    for layer, (delta, (k, c_in, c_out)) in enumerate(zip(offsets.deltas, shapes)):
        if delta is not None and tuple(delta.shape[1:3]) != (c_out, c_in):
            raise ValueError(f"offsets for layer {layer} have shape {list(delta.shape)} but the model's layer is "
                             f"{c_in}->{c_out}; these offsets come from another model ({offsets.model_id})")


def _hyperstyle_only(model: LoadedModel, latent: Optional[Latent], node: str, instead: str) -> None:
    """Refine, Optimize and Text Edit work on HyperStyle inversions: say what to connect for an SFE one."""
    if model.engine == SFE or (latent is not None and latent.engine == SFE):
        what = f"model ({model.model_id})" if model.engine == SFE else f"latent (from {latent.model_id})"
        raise ValueError(f"{node} works with HyperStyle models, and this is a StyleFeatureEditor {what}. {instead}")


SFE_DONE = ("SFE's e4e Encode already gives the finished inversion (codes + F-space features): connect its latent "
            "straight to Apply Edit Direction / Decode.")


def encode(model: LoadedModel, image: torch.Tensor) -> tuple:
    """Initial encoder -> (Latent, reconstruction IMAGE at generator resolution); for SFE, its whole inversion."""
    if model.engine == SFE:
        return _encode_sfe(model, image)
    hs = model.use()
    if hs.encoder is None:
        raise ValueError("this HyperStyle model was loaded without an initial encoder; choose faces_w_encoder or "
                         "e4e_ffhq_encode in Load HyperStyle")
    x = image_to_bchw(image)
    codes = hs.encode(x)
    recon = hs.decode(codes)
    return Latent(codes.float().cpu(), model.model_id, model.signature), bchw_to_image(recon)


def _encode_sfe(model: LoadedModel, image: torch.Tensor) -> tuple:
    sfe = model.use()
    inv = sfe.invert(image_to_bchw(image))
    cpu = [None if t is None else t.float().cpu() for t in (inv.codes, inv.e4e_codes, inv.features)]
    state = SFEState(e4e_codes=cpu[1], inverted_codes=cpu[0], inverted_e4e_codes=cpu[1], features=cpu[2])
    return Latent(cpu[0], model.model_id, model.signature, state), bchw_to_image(inv.images)


def refine(model: LoadedModel, image: torch.Tensor, latent: Latent, iterations: int = 5,
           offsets: Optional[Offsets] = None, on_step: Optional[Callable[[int, int], None]] = None) -> tuple:
    """HyperStyle refinement -> (Offsets, refined reconstruction IMAGE)."""
    _hyperstyle_only(model, latent, "HyperStyle Refine", SFE_DONE)
    hs = model.use()
    _check_latent(model, latent)
    x = image_to_bchw(image)
    if offsets is not None:
        _check_offsets(model, hs, offsets)
    _broadcast_batches(images=x.shape[0], latent=latent.batch, offsets=None if offsets is None else offsets.batch)
    deltas = None if offsets is None else [_on_model(hs, d) for d in offsets.deltas]
    inv = hs.invert(x, n_iters=iterations, codes=_on_model(hs, latent.codes), deltas=deltas, keep_steps=False,
                    on_step=on_step)
    out = Offsets([None if d is None else d.cpu() for d in inv.deltas], model.model_id, model.signature)
    return out, bchw_to_image(inv.images)


OPTIMIZE_TARGETS = ("codes", "codes + offsets")


def optimize(model: LoadedModel, image: torch.Tensor, latent: Latent, steps: int = 100, learning_rate: float = 0.01,
             mse: float = 1.0, lpips: float = 0.0, identity: float = 0.0, target: str = "codes",
             offsets: Optional[Offsets] = None, on_step: Optional[Callable] = None) -> tuple:
    """The iterator (optimize.py) from a latent (+ offsets) -> (Latent, Offsets, reconstruction IMAGE).
    target: what is optimised, "codes" (offsets, if given, stay fixed) or "codes + offsets"."""
    if target not in OPTIMIZE_TARGETS:
        raise ValueError(f"target must be one of {OPTIMIZE_TARGETS}, got {target!r}")
    _hyperstyle_only(model, latent, "HyperStyle Optimize", "SFE's inversion keeps the detail in its F-space "
                     "features, which the iterator does not optimise. " + SFE_DONE)
    hs = model.use()
    _check_latent(model, latent)
    x = image_to_bchw(image)
    if offsets is not None:
        _check_offsets(model, hs, offsets)
    batch = _broadcast_batches(images=x.shape[0], latent=latent.batch,
                               offsets=None if offsets is None else offsets.batch)
    if x.shape[0] != batch:
        x = x.expand(batch, -1, -1, -1)
    deltas = None if offsets is None else [_on_model(hs, d) for d in offsets.deltas]
    inv = hs.optimize(x, _on_model(hs, latent.codes), deltas, steps=steps, lr=learning_rate, mse=mse, lpips=lpips,
                      id=identity, optimize_deltas=target == "codes + offsets", on_step=on_step)
    out = Offsets([None if d is None else d.cpu() for d in inv.deltas], model.model_id, model.signature)
    return Latent(inv.codes.float().cpu(), model.model_id, model.signature), out, bchw_to_image(inv.images)


def decode(model: LoadedModel, latent: Latent, offsets: Optional[Offsets] = None, output_size: str = "native",
           generator: Optional[LoadedGenerator] = None) -> torch.Tensor:
    """Codes (+ offsets) -> IMAGE; with `generator`, decode on another domain's generator (domain adaptation).
    An SFE inversion decodes through SFE's feature editor, which adjusts its F-space features to the edit."""
    if model.engine == SFE or latent.engine == SFE:
        return _decode_sfe(model, latent, offsets, output_size, generator)
    hs = model.use()
    _check_latent(model, latent)
    batch = _broadcast_batches(latent=latent.batch, offsets=None if offsets is None else offsets.batch)
    codes = _on_model(hs, latent.codes).expand(batch, -1, -1)
    deltas = None
    if offsets is not None:
        _check_offsets(model, hs, offsets)
        deltas = [None if d is None else _on_model(hs, d).expand(batch, *d.shape[1:]) for d in offsets.deltas]
    other: Optional[Generator] = None
    if generator is not None:
        other = generator.handle.use()
        if other.config.layer_shapes != hs.generator.config.layer_shapes or other.style_dim != hs.generator.style_dim:
            raise ValueError(f"generator {generator.name} ({generator.resolution} px) has a different architecture "
                             f"from the model's ({model.resolution} px); domain adaptation needs the same one")
        deltas = domain_adaptation_deltas(deltas)
    if latent.stylespace is not None:
        if other is not None:
            raise ValueError("a StyleSpace edit cannot be decoded on another domain's generator (its channels are "
                             "the FFHQ generator's); disconnect the generator input of Decode, or use a W-space edit")
        images = hs.decode_styles(_moved_styles(hs.stylespace(codes), latent.stylespace, model.resolution), deltas)
    else:
        images = hs.decode(codes, deltas, generator=other)
    if output_size != "native":
        images = resize_square(images, int(output_size))
    return bchw_to_image(images)


def _moved_styles(styles: list, stylespace: Optional[StyleSpaceEdit], resolution: int) -> list:
    """StyleSpace S with a latent's StyleSpace moves added (new tensors; `styles` may be views of one tensor)."""
    if stylespace is None:
        return styles
    widths = [t.shape[1] for t in styles]
    missing = [channel for channel in stylespace.channels
               if not (0 <= channel[0] < len(widths) and 0 <= channel[1] < widths[channel[0]])]
    if missing:
        raise ValueError(f"this latent's StyleSpace edit moves (layer, channel) {missing}, which this {resolution}-px "
                         f"generator does not have (its {len(widths)} layers have {widths} channels): SFE's StyleSpace "
                         f"edits are made for the 1024-px FFHQ StyleGAN2")
    moved = [t.clone() for t in styles]
    batch = moved[0].shape[0]
    amounts = stylespace.amounts.to(moved[0].device, moved[0].dtype)
    if amounts.shape[0] != batch:
        _broadcast_batches(latent=amounts.shape[0], styles=batch)
        amounts = amounts.expand(batch, -1)
    for k, (layer, channel) in enumerate(stylespace.channels):
        moved[layer][:, channel] += amounts[:, k]
    return moved


_NO_SFE_OFFSETS = ("StyleFeatureEditor inversions have no HyperStyle offsets (deltas): disconnect the deltas input "
                   "of {node} (the SFE inversion's F-space features carry the detail instead).")


def _decode_sfe(model: LoadedModel, latent: Latent, offsets: Optional[Offsets], output_size: str,
                generator: Optional[LoadedGenerator]) -> torch.Tensor:
    _check_latent(model, latent)
    if offsets is not None:
        raise ValueError(_NO_SFE_OFFSETS.format(node="Decode"))
    if generator is not None:
        raise ValueError("decoding on another domain's generator works with HyperStyle offsets only; disconnect "
                         "the generator input of Decode for a StyleFeatureEditor inversion.")
    from .engines.sfe.model import SFEInversion

    sfe = model.use()
    state = latent.sfe
    on_model = {name: _on_model(sfe, t) for name, t in vars(state).items()}
    inv = SFEInversion(codes=on_model["inverted_codes"], e4e_codes=on_model["inverted_e4e_codes"],
                       features=on_model["features"], images=None)
    edited = not (torch.equal(latent.codes, state.inverted_codes) and (
        state.e4e_codes is None or torch.equal(state.e4e_codes, state.inverted_e4e_codes)))
    if latent.stylespace is not None:  # the same StyleSpace moves on the codes' and e4e codes' styles
        sfe.require_editing(inv)
        moved = [_moved_styles(sfe.generator.styles(codes.to(sfe.dtype)), latent.stylespace, model.resolution)
                 for codes in (_on_model(sfe, latent.codes), on_model["e4e_codes"])]
        images = sfe.decode_styles(inv, *moved)
    elif edited:  # the feature editor adjusts the features to the edit, measured on the e4e codes before and after
        images = sfe.decode(inv, codes=_on_model(sfe, latent.codes), e4e_codes=on_model["e4e_codes"])
    else:
        images = sfe.decode(inv)
    if output_size != "native":
        images = resize_square(images, int(output_size))
    return bchw_to_image(images)


# The official domain adaptation (utils/domain_adaptation_utils.py) keeps the offsets of the fine convolutions only
# (generator convs 8-15, the 128-1024 px layers): the coarse and middle layers of a fine-tuned generator (toonify,
# StyleGAN-NADA) no longer match the FFHQ ones the offsets were predicted for.
DOMAIN_ADAPTATION_LAYERS = (14, 15, 17, 18, 20, 21, 23, 24)


def domain_adaptation_deltas(deltas: Optional[list]) -> Optional[list]:
    """Offsets to apply on another domain's generator: only on DOMAIN_ADAPTATION_LAYERS."""
    if deltas is None:
        return None
    return [d if i in DOMAIN_ADAPTATION_LAYERS else None for i, d in enumerate(deltas)]


# ---------------------------------------------------------------------------------------------------------------
# Edits


def direction_choices() -> list:
    """Registry directions (InterFaceGAN, GANSpace, SFE's), SFE's named GANSpace edits and the user's files in
    models/hyperstyle/directions/."""
    from .loaders.downloads import list_local_models, models_dir
    names = [n for n in list_local_models("direction") + list_local_models("ganspace") if "/" not in n]
    names = [n for n in dict.fromkeys(names) if not n.endswith((".pt", ".pth", ".npy", ".safetensors"))]
    named = [n for n, edit in menu.NAMED_EDITS.items()
             if (edit.is_ganspace and edit.file in names) or edit.is_stylespace]
    return names + named + [f"directions/{f}" for f in editing.list_direction_files(models_dir() / "directions")]


def _style_range(start: int, end: int, n_styles: int) -> tuple:
    return (start, n_styles if end < 0 else end)


def load_edit(direction: str, n_styles: int, style_dim: int):
    """('direction', tensor), ('ganspace', GanspacePCA) or ('stylespace', menu.NamedEdit: no file) for a registry
    name, a named edit or a file."""
    named = menu.NAMED_EDITS.get(direction)
    if named is not None and named.is_stylespace:
        return "stylespace", named
    path = resolve(menu.file_of(direction))
    try:
        return "direction", editing.load_direction(path, n_styles=n_styles, style_dim=style_dim)
    except ValueError as direction_error:
        try:
            return "ganspace", editing.load_ganspace(path)
        except Exception:
            raise direction_error from None


def _edit_function(direction: str, n_styles: int, style_dim: int, layer_start: int, layer_end: int,
                   ganspace_component: int) -> Callable:
    """codes, strength -> edited codes. A named GANSpace edit (menu.NAMED_EDITS) brings its own component and
    layers, as in SFE's editing menu."""
    named = menu.NAMED_EDITS.get(direction)
    if named is not None and named.is_ganspace:
        ganspace_component, (layer_start, layer_end) = named.component, named.layers
    kind, edit = load_edit(direction, n_styles, style_dim)
    start, end = _style_range(layer_start, layer_end, n_styles)
    if kind == "ganspace":
        return lambda codes, strength: editing.apply_ganspace(codes, edit, ganspace_component, start,
                                                              min(end, n_styles), strength)
    return lambda codes, strength: editing.apply_direction(codes, edit, strength, (start, end))


def _edited(latent: Latent, codes: torch.Tensor, sfe_edit: Callable, repeats: int = 1) -> Latent:
    """The latent with new codes; an SFE inversion's e4e codes get the same edit (`sfe_edit(e4e_codes)`) and its
    unedited inversion (and any StyleSpace moves) are repeated to the new batch."""
    state = latent.sfe
    if state is not None:
        moved = None if state.e4e_codes is None else sfe_edit(state.e4e_codes)
        state = replace(state.repeated(repeats) if repeats > 1 else state, e4e_codes=moved)
    stylespace = latent.stylespace
    if stylespace is not None and repeats > 1:
        stylespace = stylespace.repeated(repeats)
    return Latent(codes, latent.model_id, latent.signature, state, stylespace)


def _stylespace_edited(latent: Latent, named: "menu.NamedEdit", strengths: list) -> Latent:
    """A named StyleSpace edit at each strength (strength-major): codes unchanged (repeated for several strengths),
    each of its channels moved by STYLESPACE_STEP * strength."""
    repeats = len(strengths)
    steps = torch.tensor([menu.STYLESPACE_STEP * float(s) for s in strengths]).repeat_interleave(latent.batch)
    amounts = steps[:, None].expand(-1, len(named.channels))
    base = _edited(latent, latent.codes.repeat(repeats, 1, 1) if repeats > 1 else latent.codes,
                   lambda c: c.repeat(repeats, 1, 1) if repeats > 1 else c, repeats)
    stylespace = (StyleSpaceEdit((), torch.zeros(amounts.shape[0], 0)) if base.stylespace is None
                  else base.stylespace).plus(named.channels, amounts)
    return replace(base, stylespace=stylespace)


def apply_edit(latent: Latent, direction: str, strength: float, layer_start: int = 0, layer_end: int = -1,
               ganspace_component: int = 0) -> Latent:
    """Move the codes along a direction (offsets are untouched: that is why HyperStyle edits keep identity; an SFE
    inversion's e4e codes move the same way, for its feature editor). A named StyleSpace edit moves style channels
    instead, applied by Decode."""
    named = menu.NAMED_EDITS.get(direction)
    if named is not None and named.is_stylespace:
        return _stylespace_edited(latent, named, [strength])
    codes = latent.codes
    move = _edit_function(direction, codes.shape[1], codes.shape[2], layer_start, layer_end, ganspace_component)
    return _edited(latent, move(codes, strength), lambda c: move(c, strength))


def edit_sweep(latent: Latent, direction: str, strength_from: float, strength_to: float, steps: int,
               layer_start: int = 0, layer_end: int = -1, offsets: Optional[Offsets] = None) -> tuple:
    """One latent batch -> a batch over a strength range (strength-major), with offsets repeated to match."""
    codes = latent.codes
    strengths = editing.linspace_strengths(strength_from, strength_to, steps)
    named = menu.NAMED_EDITS.get(direction)
    if named is not None and named.is_stylespace:
        sweep = None
    else:
        move = _edit_function(direction, codes.shape[1], codes.shape[2], layer_start, layer_end, 0)
        sweep = lambda c: torch.cat([move(c, s) for s in strengths])  # noqa: E731
    swept = None
    if offsets is not None:
        _broadcast_batches(latent=latent.batch, offsets=offsets.batch)
        deltas = offsets.deltas
        if offsets.batch != latent.batch:  # one set of offsets for every latent
            deltas = [None if d is None else d.expand(latent.batch, *d.shape[1:]) for d in deltas]
        swept = Offsets(editing.deltas_for_sweep(deltas, len(strengths)), offsets.model_id, offsets.signature)
    if sweep is None:
        return _stylespace_edited(latent, named, strengths), swept
    return _edited(latent, sweep(codes), sweep, repeats=len(strengths)), swept


# ---------------------------------------------------------------------------------------------------------------
# Text edits (StyleCLIP global directions)


def _text_encoder(clip_model: str, device) -> "styleclip.TextEncoder":
    """CLIP's text tower from the shared manager (unloadable like the other models); it remembers each prompt
    pair's features."""
    folder = styleclip.clip_folder(clip_model)
    weights = next((folder / f for f in styleclip.CLIP_WEIGHTS if (folder / f).is_file()), folder / "config.json")
    key = ("styleclip_text", file_identity(weights))
    return get_manager().load(key, lambda: styleclip.load_text_encoder(str(folder)), device=device,
                              dtype=torch.float32).use()


def _global_directions(hs: HyperStyleModel, files_dir) -> "styleclip.GlobalDirections":
    fs3 = styleclip.find_file(styleclip.FS3_FILE, files_dir)
    stats = styleclip.find_file(styleclip.S_STATS_FILE, files_dir)
    key = ("styleclip_directions", file_identity(fs3), file_identity(stats), tuple(hs.generator.style_widths()))
    return get_manager().load(key, lambda: styleclip.load_global_directions(hs.generator, files_dir),
                              device=hs.device, dtype=torch.float32).use()


def text_direction(model: LoadedModel, neutral_text: str, target_text: str, beta: float,
                   clip_model: str = styleclip.CLIP_REPO, files_dir=None) -> list:
    """ΔS (one tensor per generator layer) of a StyleCLIP global direction; CLIP's features cached per prompts."""
    hs = model.use()
    templates = styleclip.read_templates(styleclip.find_file(styleclip.TEMPLATES_FILE, files_dir))
    directions = _global_directions(hs, files_dir)
    delta_i = _text_encoder(clip_model, hs.device).delta_i(neutral_text, target_text, templates)
    return directions.delta_s(delta_i, beta)


def text_edit(model: LoadedModel, latent: Latent, neutral_text: str, target_text: str, alphas, beta: float,
              offsets: Optional[Offsets] = None, output_size: str = "native", clip_model: str = styleclip.CLIP_REPO,
              files_dir=None) -> torch.Tensor:
    """StyleCLIP global direction for `neutral_text` -> `target_text`, applied in StyleSpace at every strength in
    `alphas` (a number or a list), offsets kept -> IMAGE [len(alphas) * B, ...] (strength-major, as Edit Sweep)."""
    alphas = [float(alphas)] if isinstance(alphas, (int, float)) else [float(a) for a in alphas]
    if model.engine == SFE or latent.engine == SFE:
        return _text_edit_sfe(model, latent, neutral_text, target_text, alphas, beta, offsets, output_size,
                              clip_model, files_dir)
    hs = model.use()
    _check_latent(model, latent)
    batch = _broadcast_batches(latent=latent.batch, offsets=None if offsets is None else offsets.batch)
    delta_s = text_direction(model, neutral_text, target_text, beta, clip_model, files_dir)
    styles = _moved_styles(hs.stylespace(_on_model(hs, latent.codes).expand(batch, -1, -1)), latent.stylespace,
                           model.resolution)
    edited = styleclip.edit_styles(styles, delta_s, alphas)
    deltas = None
    if offsets is not None:
        _check_offsets(model, hs, offsets)
        # strength-major like the styles; one set of offsets broadcasts as it is
        deltas = [None if d is None else _on_model(hs, d) if d.shape[0] == 1 else
                  _on_model(hs, d).repeat(len(alphas), *([1] * (d.ndim - 1))) for d in offsets.deltas]
    images = hs.decode_styles(edited, deltas)
    if output_size != "native":
        images = resize_square(images, int(output_size))
    return bchw_to_image(images)


def _text_edit_sfe(model: LoadedModel, latent: Latent, neutral_text: str, target_text: str, alphas: list,
                   beta: float, offsets: Optional[Offsets], output_size: str, clip_model: str,
                   files_dir) -> torch.Tensor:
    """SFE's StyleCLIP global edit (its `styleclip_global_` path): the same ΔS moves the StyleSpace of the inverter's
    and of e4e's codes, and the feature editor adjusts the F-space features to the e4e move."""
    _check_latent(model, latent)
    if offsets is not None:
        raise ValueError(_NO_SFE_OFFSETS.format(node="Text Edit"))
    from .engines.sfe.model import SFEInversion

    sfe = model.use()
    state = latent.sfe.repeated(len(alphas)) if len(alphas) > 1 else latent.sfe
    inv = SFEInversion(codes=_on_model(sfe, state.inverted_codes), e4e_codes=_on_model(sfe, state.inverted_e4e_codes),
                       features=_on_model(sfe, state.features))
    sfe.require_editing(inv)  # an inverter-only model, or an inversion without e4e codes: said before CLIP runs
    delta_s = text_direction(model, neutral_text, target_text, beta, clip_model, files_dir)
    styles, e4e_styles = (
        styleclip.edit_styles(_moved_styles(sfe.generator.styles(_on_model(sfe, codes).to(sfe.dtype)),
                                            latent.stylespace, model.resolution), delta_s, alphas)
        for codes in (latent.codes, latent.sfe.e4e_codes))
    images = sfe.decode_styles(inv, styles, e4e_styles)
    if output_size != "native":
        images = resize_square(images, int(output_size))
    return bchw_to_image(images)


# ---------------------------------------------------------------------------------------------------------------
# Saved inversions


def save_inversion(folder, prefix: str, latent: Latent, offsets: Optional[Offsets] = None):
    """Codes + offsets + model id -> `<folder>/<prefix>_00001.safetensors` (never overwrites).

    The prefix must stay inside `folder` (as ComfyUI's own save nodes require): '../x' or '/abs/x' are refused.
    """
    codes, deltas = latent.codes, []
    if offsets is not None:  # a file holds matching batches: expand a batch of 1 on either side
        if latent.signature and offsets.signature and latent.signature != offsets.signature:
            raise ValueError(f"the latent ({latent.model_id}, generator {latent.signature}) and the offsets "
                             f"({offsets.model_id}, generator {offsets.signature}) come from different models; "
                             f"save a latent and offsets made with the same model")
        batch = _broadcast_batches(latent=latent.batch, offsets=offsets.batch)
        codes = codes.expand(batch, -1, -1)
        deltas = [None if d is None else d.expand(batch, *d.shape[1:]) for d in offsets.deltas]
    if latent.sfe is not None and offsets is not None:
        raise ValueError("this latent is a StyleFeatureEditor inversion, which has no HyperStyle offsets: disconnect "
                         "the deltas input of Save Inversion.")
    base = safe_paths.path_under(folder, prefix, "filename_prefix", "the output folder", "hyperstyle/inversion")
    target = base.with_name(f"{base.name}.safetensors")
    target.parent.mkdir(parents=True, exist_ok=True)
    return inversion_io.save_inversion(target, codes, deltas, latent.model_id, overwrite=False,
                                       signature=latent.signature or (offsets.signature if offsets else ""),
                                       sfe=None if latent.sfe is None else latent.sfe.tensors(),
                                       stylespace=None if latent.stylespace is None else (
                                           latent.stylespace.channels,
                                           latent.stylespace.amounts.expand(codes.shape[0], -1)))


def load_inversion(path) -> tuple:
    codes, deltas, meta = inversion_io.load_inversion(path)
    model_id, signature = meta.get("model_id", ""), meta.get("generator_signature", "")
    state = None
    if "sfe" in meta:
        state = SFEState(**{name: meta["sfe"].get(name) for name in SFEState.__dataclass_fields__})
    stylespace = StyleSpaceEdit(*meta["stylespace"]) if "stylespace" in meta else None
    return Latent(codes, model_id, signature, state, stylespace), (Offsets(deltas, model_id, signature)
                                                       if any(d is not None for d in deltas) else None)


def saved_inversions(folder) -> list:
    """Inversion files under `folder` (relative paths), newest first, for a dropdown."""
    from pathlib import Path
    root = Path(folder)
    if not root.is_dir():
        return []
    files = [p for p in root.rglob("*.safetensors") if inversion_io.is_inversion_file(p)]
    return [str(p.relative_to(root)) for p in sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)]
