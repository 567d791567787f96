"""Reading checkpoint files: what a file is, its options, and the architecture its weights imply.

This is the one place that knows the released file layouts:
    hyperstyle_ffhq.pt      {'state_dict': {'hypernet.*', 'decoder.*'}, 'opts': {...}, 'latent_avg': [n_styles, 512]}
    faces_w_encoder.pt      {'state_dict': {'encoder.*', 'decoder.*'}, 'opts': {'encoder_type': 'WEncoder', ...}, ...}
    e4e_ffhq_encode.pt      {'state_dict': {'encoder.*' (styles, latlayers), 'decoder.*'}, 'opts': {...}, ...}
    stylegan2-*.pt          {'g_ema': generator state dict, 'latent_avg': [512]}   (rosinality)
    sfe_editor_light.pt     {'state_dict': {'inverter.*' (fs_backbone, fuser), 'encoder.*' (the feature editor),
                            maybe 'discriminator.*'}, ...}: parts 'inverter' and 'feature_editor'
    sfe_inverter_light.pt   {'state_dict': {'encoder.*' (the inverter: fs_backbone, fuser), ...}}: part 'inverter'
    our .safetensors        the same weights, prefixed 'hypernet.' / 'decoder.' / 'encoder.', plus 'latent_avg';
                            kind and options in the metadata
Files are read with `weights_only=True`: a file whose pickle would build arbitrary Python objects is refused.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import re
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..engines.hyperstyle.encoders import EncoderConfig
from ..engines.hyperstyle.hypernetwork import SHARED_LAYERS, HypernetConfig, parse_layers_to_tune
from ..engines.sfe.feature_editor import FeatureStackConfig
from ..engines.sfe.inverter import InverterConfig
from ..stylegan2.generator import GeneratorConfig, check_size, log2

HYPERSTYLE, W_ENCODER, E4E, GENERATOR = "hyperstyle", "w_encoder", "e4e", "generator"
SFE_EDITOR, SFE_INVERTER = "sfe_editor", "sfe_inverter"
KIND_DESCRIPTIONS = {
    HYPERSTYLE: "a HyperStyle checkpoint (hypernetwork + generator, like hyperstyle_ffhq.pt)",
    W_ENCODER: "a HyperStyle W-encoder (one W code, like faces_w_encoder.pt)",
    E4E: "an e4e/pSp W+ encoder (like e4e_ffhq_encode.pt)",
    GENERATOR: "a StyleGAN2 generator (rosinality format, like stylegan2-ffhq-config-f.pt)",
    SFE_EDITOR: "a StyleFeatureEditor checkpoint (inverter + feature editor, like sfe_editor_light.pt)",
    SFE_INVERTER: "a StyleFeatureEditor inverter (inversion only, like sfe_inverter_light.pt)",
}
SAFETENSORS_FORMAT = "hyperstyle-nodes"
SAFETENSORS_VERSION = "1"
# The shared hypernet is a child of every shared head, so its weights repeat under these names in state dicts.
_SHARED_ALIAS = re.compile(r"^refinement_blocks\.(\d+)\.hypernet\.(w1|b1|w2|b2)$")


class CheckpointError(ValueError):
    """A file that is not what the caller needs, or cannot be read safely. The message says what to do."""


@dataclass
class Checkpoint:
    path: Path
    kind: str
    opts: dict
    parts: dict  # 'hypernet' / 'decoder' / 'encoder' -> state dict (unprefixed keys)
    latent_avg: Optional[torch.Tensor]
    output_size: int
    encoder_type: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    def describe(self) -> str:
        return f"{self.name} is {KIND_DESCRIPTIONS[self.kind]} for a {self.output_size}-px generator"

    def expect(self, kinds, role: str) -> "Checkpoint":
        """Raise a clear error unless this file is one of `kinds` (what the caller expected for `role`)."""
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        if self.kind not in kinds:
            wanted = " or ".join(KIND_DESCRIPTIONS[k] for k in kinds)
            hint = {
                (E4E, W_ENCODER): " Pass it as the e4e encoder (e4e=...) instead of the W-encoder.",
                (W_ENCODER, E4E): " Pass it as the W-encoder (w_encoder=...) instead of e4e.",
                (GENERATOR, HYPERSTYLE): " A generator alone cannot invert images; load hyperstyle_ffhq.pt (or your "
                                         "own trained HyperStyle checkpoint) and use the generator for domain "
                                         "adaptation.",
            }.get((self.kind, kinds[0]), "")
            raise CheckpointError(f"{self.describe()}, but {role} needs {wanted}.{hint}")
        return self

    def expect_size(self, size: int, role: str, other: str) -> "Checkpoint":
        if self.output_size != size:
            raise CheckpointError(
                f"{self.describe()} ({2 * log2(self.output_size) - 2} style codes), but {other} is {size} px "
                f"({2 * log2(size) - 2} style codes). Use {role} trained for the same {size}-px generator.")
        return self


# --------------------------------------------------------------------------------------------------------------
# Safe loading


def _safe_globals() -> list:
    allowed = [argparse.Namespace]
    try:  # numpy scalars/dtypes appear in some saved option dicts; they rebuild data, never run code
        import numpy as np
        allowed += [np.dtype, type(np.dtype("float64")), type(np.dtype("int64"))]
        allowed += [getattr(np, "_core", np.core).multiarray.scalar]
    except Exception:  # pragma: no cover - numpy layout differs across versions
        pass
    return allowed


def torch_load_safely(path) -> object:
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if not found:  # not a pickle we refuse, just not a pickle: truncated or some other file
            raise CheckpointError(f"Could not read {path.name} as a PyTorch checkpoint (is it truncated or not a "
                                  f"model file? size {path.stat().st_size} bytes)") from err
        what = f" (it asks for {found.group(1)})"
        raise CheckpointError(
            f"Refused to load {path.name}: it contains pickled Python objects{what} that could run code when "
            f"unpickled, and checkpoints are only ever read with weights_only=True. A genuine HyperStyle/e4e/"
            f"StyleGAN2 checkpoint holds only tensors and plain options. If you trust the file, re-save its tensors "
            f"(torch.save of a plain dict of tensors) or convert it to .safetensors in a trusted environment.") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise CheckpointError(f"Checkpoint not found: {path}") from err
        raise CheckpointError(f"Could not read {path.name} as a PyTorch checkpoint (is it truncated or not a "
                              f"model file? size {path.stat().st_size if path.exists() else 0} bytes): {err}") from err


def _opts_dict(opts, path: Path) -> dict:
    if opts is None:
        return {}
    if isinstance(opts, argparse.Namespace):
        return dict(vars(opts))
    if isinstance(opts, dict):
        return dict(opts)
    raise CheckpointError(f"{path.name}: its 'opts' are a {type(opts).__name__}, not a dictionary of options; the "
                          f"file is damaged or not a checkpoint this pack knows.")


def _split_prefixed(state_dict: dict) -> dict:
    parts: dict = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue
        prefix, _, rest = key.partition(".")
        if rest:
            parts.setdefault(prefix, {})[rest] = value
    return parts


# --------------------------------------------------------------------------------------------------------------
# What is this file?


def read_checkpoint(path) -> Checkpoint:
    """Open a .pt/.pth/.safetensors file and say what it is. Never builds a model."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    obj = torch_load_safely(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path.name} holds a {type(obj).__name__}, not a checkpoint dictionary; expected one of: "
                              + "; ".join(KIND_DESCRIPTIONS.values()))
    with contents_checked(path):
        if "g_ema" in obj or "style.1.weight" in obj:
            generator = obj.get("g_ema", obj)
            if not isinstance(generator, dict):
                raise CheckpointError(f"{path.name}: 'g_ema' is a {type(generator).__name__}, not a state dict")
            return _checkpoint(path, GENERATOR, {}, {"decoder": generator}, obj.get("latent_avg"))
        if "state_dict" in obj and isinstance(obj["state_dict"], dict):
            parts = _split_prefixed(obj["state_dict"])
            opts = _opts_dict(obj.get("opts"), path)
            sfe = _sfe_parts(parts)
            if sfe is not None:
                return _checkpoint(path, sfe[0], opts, sfe[1], obj.get("latent_avg"))
            if "hypernet" in parts:
                return _checkpoint(path, HYPERSTYLE, opts, parts, obj.get("latent_avg"))
            if "encoder" in parts:
                kind = _encoder_kind(path, parts["encoder"], opts)
                return _checkpoint(path, kind, opts, parts, obj.get("latent_avg"))
    raise CheckpointError(f"{path.name} is not a file this pack knows (top-level keys: {sorted(obj)[:8]}). Expected "
                          "one of: " + "; ".join(KIND_DESCRIPTIONS.values()))


def checkpoint_kind(path) -> str:
    """What a file is: one of KIND_DESCRIPTIONS' keys (hyperstyle, w_encoder, e4e, generator, sfe_editor,
    sfe_inverter), or a CheckpointError saying why it is none of them."""
    return read_checkpoint(path).kind


def _sfe_parts(parts: dict) -> Optional[tuple]:
    """(kind, parts) for a StyleFeatureEditor file, else None. The official names: in an editor file the inverter is
    `inverter.*` and the feature editor `encoder.*`; in an inverter file the inverter is `encoder.*`. Other parts
    (the training discriminator, a decoder or e4e copy) are not needed and dropped."""
    def is_inverter(name):
        return any(k.startswith("fs_backbone.") for k in parts.get(name, {}))

    if is_inverter("inverter"):
        if "encoder" in parts:
            return SFE_EDITOR, {"inverter": parts["inverter"], "feature_editor": parts["encoder"]}
        return SFE_INVERTER, {"inverter": parts["inverter"]}
    if is_inverter("encoder"):
        return SFE_INVERTER, {"inverter": parts["encoder"]}
    return None


def _encoder_kind(path: Path, encoder: dict, opts: dict) -> str:
    encoder_type = str(opts.get("encoder_type", ""))
    if "styles.0.linear.weight" not in encoder:
        if "linear.weight" in encoder:
            return W_ENCODER
        raise CheckpointError(f"{path.name} has encoder weights of an unknown type ({encoder_type or 'no opts'})")
    if "latlayer1.weight" not in encoder or encoder["input_layer.0.weight"].shape[1] != 3:
        raise CheckpointError(f"{path.name} is a ReStyle encoder ({encoder_type or 'ProgressiveBackboneEncoder'}); "
                              "this pack needs the original e4e encoder (e4e_ffhq_encode.pt) or a W-encoder.")
    return E4E


def _checkpoint(path, kind, opts, parts, latent_avg) -> Checkpoint:
    size = _output_size(path, kind, opts, parts)
    _check_latent_avg(path, latent_avg, 2 * log2(size) - 2)
    return Checkpoint(path=path, kind=kind, opts=opts, parts=parts, latent_avg=latent_avg, output_size=size,
                      encoder_type=str(opts.get("encoder_type", "")))


def _check_latent_avg(path: Path, latent_avg, n_styles: int) -> None:
    """latent_avg is [D], [1, D] or [n_styles, D] of finite floats (it is added to every code)."""
    if latent_avg is None:
        return
    if not isinstance(latent_avg, torch.Tensor) or not latent_avg.is_floating_point():
        found = latent_avg.dtype if isinstance(latent_avg, torch.Tensor) else type(latent_avg).__name__
        raise CheckpointError(f"{path.name}: 'latent_avg' is {found}, not a float tensor; the file is damaged.")
    shape = list(latent_avg.shape)
    if not (latent_avg.ndim == 1 or (latent_avg.ndim == 2 and shape[0] in (1, n_styles))) or 0 in shape:
        raise CheckpointError(f"{path.name}: 'latent_avg' has shape {shape}, expected [D], [1, D] or "
                              f"[{n_styles}, D] for its generator; the file is damaged.")
    if not torch.isfinite(latent_avg).all():
        raise CheckpointError(f"{path.name}: 'latent_avg' contains NaN or infinite values; the file is damaged. "
                              f"Download it again, or use an earlier checkpoint if it comes from training.")


def _output_size(path, kind, opts, parts) -> int:
    from_weights = None
    if "decoder" in parts:
        n_to_rgbs = len({k.split(".")[1] for k in parts["decoder"] if k.startswith("to_rgbs.")})
        from_weights = 4 << n_to_rgbs
    elif kind == E4E:
        n_styles = len({k.split(".")[1] for k in parts["encoder"] if k.startswith("styles.")})
        from_weights = 2 ** ((n_styles + 2) // 2)
    elif kind in (SFE_EDITOR, SFE_INVERTER):
        n_styles = len({k.split(".")[2] for k in parts["inverter"] if k.startswith("fs_backbone.styles.")})
        from_weights = 2 ** ((n_styles + 2) // 2)
    from_opts = opts.get("output_size", opts.get("stylegan_size"))
    if from_opts is not None:
        try:
            from_opts = int(from_opts)
        except (TypeError, ValueError):
            raise CheckpointError(f"{path.name}: its option output_size/stylegan_size is {from_opts!r}, not a whole "
                                  f"number of pixels; the file's options are damaged.") from None
    if from_opts is not None and from_weights is not None and int(from_opts) != from_weights:
        raise CheckpointError(f"{path.name}: its options say {from_opts} px but its generator weights are "
                              f"{from_weights} px; the file is inconsistent.")
    size = int(from_opts) if from_opts is not None else from_weights
    if size is None:
        raise CheckpointError(f"{path.name}: cannot tell the generator size (no output_size option, no weights)")
    check_size(size)
    return size


# --------------------------------------------------------------------------------------------------------------
# Architecture from weights (tensor shapes) + options


def generator_config(decoder: dict) -> GeneratorConfig:
    n_mlp = len([k for k in decoder if re.fullmatch(r"style\.\d+\.weight", k)])
    n_to_rgbs = len({k.split(".")[1] for k in decoder if k.startswith("to_rgbs.")})
    channels = [decoder["conv1.conv.weight"].shape[1]]
    channels += [decoder[f"convs.{2 * i}.conv.weight"].shape[1] for i in range(n_to_rgbs)]
    return GeneratorConfig(size=4 << n_to_rgbs, style_dim=decoder["style.1.weight"].shape[1], n_mlp=n_mlp,
                           channels=tuple(int(c) for c in channels))


def _stage_widths(shapes: list) -> tuple:
    """Run-length encode per-unit widths into (stage widths, units per stage)."""
    widths, counts = [], []
    for w in shapes:
        if widths and widths[-1] == w:
            counts[-1] += 1
        else:
            widths.append(w)
            counts.append(1)
    return tuple(widths), tuple(counts)


def _indexed(weights: dict, pattern: str) -> list:
    """Values of keys matching pattern (with one (\\d+) group), ordered by that index."""
    found = {int(m.group(1)): v for k, v in weights.items() if (m := re.fullmatch(pattern, k))}
    return [found[i] for i in sorted(found)]


def hypernet_config(ckpt: Checkpoint, generator: GeneratorConfig) -> HypernetConfig:
    weights, opts = ckpt.parts["hypernet"], ckpt.opts
    n_layers = len(generator.layer_shapes)
    layers = parse_layers_to_tune(opts.get("layers_to_tune"), n_layers)
    layers = tuple(i for i in layers if i < n_layers)  # the official code ignores indices past the last layer
    in_weights = tuple(sorted({int(k.split(".")[1]) for k in weights if k.startswith("refinement_blocks.")}))
    if in_weights != tuple(sorted(layers)):
        raise CheckpointError(f"{ckpt.name}: its options tune layers {list(layers)} but its weights have heads for "
                              f"{list(in_weights)}; the file is inconsistent.")
    widths, blocks = _stage_widths([int(w.shape[0]) for w in _indexed(weights, r"body\.(\d+)\.conv2\.weight")])
    w1 = weights["shared_weight_hypernet.w1"]
    heads = {i: weights.get(f"refinement_blocks.{i}.convs.0.weight") for i in layers}
    shared = [h for i, h in heads.items() if i in SHARED_LAYERS]
    channel = [h for i, h in heads.items() if i not in SHARED_LAYERS]
    encoder_type = ckpt.encoder_type or "SharedWeightsHyperNetResNet"
    if encoder_type not in ("SharedWeightsHyperNetResNet", "SharedWeightsHyperNetResNetSeparable"):
        raise CheckpointError(f"{ckpt.name}: unknown hypernetwork type {encoder_type!r}")
    return HypernetConfig(
        layer_shapes=tuple(generator.layer_shapes), layers_to_tune=layers,
        separable=encoder_type.endswith("Separable"), input_nc=int(weights["conv1.weight"].shape[1]),
        widths=widths, blocks=blocks, feature_dim=int(w1.shape[0]),
        head_channels=int(channel[0].shape[0]) if channel else 256,
        shared_head_channels=int(shared[0].shape[0]) if shared else 128)


def encoder_config(ckpt: Checkpoint) -> EncoderConfig:
    weights = ckpt.parts["encoder"]
    widths, units = _stage_widths([int(w.shape[0]) for w in _indexed(weights, r"body\.(\d+)\.res_layer\.1\.weight")])
    n_styles = 2 * log2(ckpt.output_size) - 2
    if ckpt.kind == W_ENCODER:
        kind, style_dim = "w_encoder", int(weights["linear.weight"].shape[0])
    else:
        kind = "psp" if ckpt.encoder_type == "GradualStyleEncoder" else "e4e"
        style_dim = int(weights["styles.0.linear.weight"].shape[0])
    return EncoderConfig(kind=kind, n_styles=n_styles, style_dim=style_dim, widths=widths, units=units,
                         input_nc=int(weights["input_layer.0.weight"].shape[1]))


def _feature_stack_config(weights: dict) -> FeatureStackConfig:
    conv = weights["conv.weight"]
    blocks = _indexed(weights, r"body\.(\d+)\.body\.1\.weight")
    return FeatureStackConfig(in_channels=int(conv.shape[1]), channels=int(conv.shape[0]), blocks=len(blocks))


def sfe_inverter_config(ckpt: Checkpoint) -> InverterConfig:
    """The SFE inverter's architecture from its tensor shapes (IResNet stage widths and depths, head sizes)."""
    weights = ckpt.parts["inverter"]
    stages = [_indexed(weights, rf"fs_backbone\.block_{s}\.(\d+)\.conv1\.weight") for s in range(1, 5)]
    if not all(stages):
        raise KeyError("fs_backbone.block_N.0.conv1.weight (some stage has no blocks)")
    fuser = {k[len("fuser."):]: v for k, v in weights.items() if k.startswith("fuser.")}
    return InverterConfig(
        n_styles=2 * log2(ckpt.output_size) - 2, style_dim=int(weights["fs_backbone.styles.0.weight"].shape[0]),
        widths=tuple(int(stage[0].shape[0]) for stage in stages), units=tuple(len(stage) for stage in stages),
        content_channels=int(weights["fs_backbone.content_layer.1.weight"].shape[0]),
        fuser=_feature_stack_config(fuser))


def sfe_editor_config(ckpt: Checkpoint) -> FeatureStackConfig:
    """The SFE feature editor's architecture from its tensor shapes."""
    return _feature_stack_config(ckpt.parts["feature_editor"])


def restore_shared_aliases(hypernet_weights: dict) -> dict:
    """Add the repeated `refinement_blocks.N.hypernet.*` names that our safetensors files store once."""
    weights = dict(hypernet_weights)
    for key in [k for k in weights if k.startswith("refinement_blocks.") and k.endswith(".convs.0.weight")]:
        index = key.split(".")[1]
        if f"refinement_blocks.{index}.linear.weight" in weights:  # a shared head
            for name in ("w1", "b1", "w2", "b2"):
                weights.setdefault(f"refinement_blocks.{index}.hypernet.{name}", weights[f"shared_weight_hypernet.{name}"])
    return weights


# --------------------------------------------------------------------------------------------------------------
# Contents: what a readable file with the wrong tensors or options gets instead of a raw KeyError / RuntimeError


@contextmanager
def contents_checked(ckpt_or_path):
    """Turn a missing key or an unusable value met while reading a file's architecture into a CheckpointError
    that names the file."""
    name = Path(ckpt_or_path.path if isinstance(ckpt_or_path, Checkpoint) else ckpt_or_path).name
    try:
        yield
    except CheckpointError:
        raise
    except KeyError as err:
        raise CheckpointError(f"{name}: the tensor or option {err} is missing; the file is incomplete or damaged. "
                              f"Download it again (or re-save it from its original).") from None
    except (IndexError, ValueError, TypeError, AttributeError, RuntimeError) as err:
        raise CheckpointError(f"{name}: its tensors or options do not describe a model this pack can build "
                              f"({type(err).__name__}: {err}); the file is damaged or was edited.") from None


def _shape(t) -> str:
    return str(list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _first(items: list, sep: str = ", ", n: int = 3) -> str:
    return sep.join(items[:n]) + (f"{sep}..." if len(items) > n else "")


def load_weights(module: torch.nn.Module, ckpt: Checkpoint, part: str) -> torch.nn.Module:
    """`module.load_state_dict(ckpt.parts[part], strict=True)` after checking every key, shape and value, so a
    damaged file is refused with its name, the tensor and the expected vs found shape (or its NaN/inf weights)."""
    weights, expected = ckpt.parts[part], module.state_dict()
    what = "generator" if part == "decoder" else part
    wrong = [f"'{k}' is {_shape(weights[k])}, expected {_shape(v)}" for k, v in expected.items()
             if k in weights and (not isinstance(weights[k], torch.Tensor) or weights[k].shape != v.shape)]
    missing = [repr(k) for k in expected if k not in weights]
    unexpected = [repr(k) for k in weights if k not in expected]
    if wrong or missing or unexpected:
        found = [f"{len(items)} {label} ({_first(items, sep)})" for items, label, sep in (
            (wrong, "of wrong shape", "; "), (missing, "missing", ", "), (unexpected, "unexpected", ", ")) if items]
        raise CheckpointError(f"{ckpt.name}: its {what} weights do not fit the architecture the file describes: "
                              f"{'; '.join(found)}. The file is damaged or was edited; download it again (or re-save "
                              f"it from its original).")
    # a sum is one pass without a temporary: only NaN/inf (or a sum beyond float range: then look closer) breaks it
    bad = [repr(k) for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v.sum())
           and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{ckpt.name}: {len(bad)} of its {what} tensors contain NaN or infinite values "
                              f"({_first(bad)}), so every image made with them would be NaN. The file is damaged "
                              f"(or its training diverged): download it again, or use an earlier checkpoint.")
    module.load_state_dict(weights, strict=True)
    return module


def weights_signature(weights: dict) -> str:
    """A fingerprint of a state dict's names, dtypes, shapes and bytes (sha256, 12 hex digits): the same for the
    same weights in a .pt or a converted .safetensors file, at any precision the model is later cast to. The
    released generator's 120 MB hash in about 0.1-0.3 s, once per load."""
    digest = hashlib.sha256()
    for key in sorted(weights):
        value = weights[key]
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().contiguous()
            digest.update(f"{key}:{value.dtype}:{list(value.shape)};".encode())
            digest.update(value.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:12]


# --------------------------------------------------------------------------------------------------------------
# Our own safetensors format


def save_safetensors(ckpt: Checkpoint, out_path) -> Path:
    """Write `ckpt` as .safetensors: tensors by part prefix, kind and options in the metadata."""
    from safetensors.torch import save_file

    tensors = {}
    for part, weights in ckpt.parts.items():
        for key, value in weights.items():
            if part == "hypernet" and _SHARED_ALIAS.match(key):
                continue  # same storage as shared_weight_hypernet.*; restored on load
            tensors[f"{part}.{key}"] = value.contiguous()
    if ckpt.latent_avg is not None:
        tensors["latent_avg"] = ckpt.latent_avg.contiguous()
    metadata = {"format": SAFETENSORS_FORMAT, "format_version": SAFETENSORS_VERSION, "kind": ckpt.kind,
                "output_size": str(ckpt.output_size), "source": ckpt.name,
                "opts": json.dumps(ckpt.opts, default=str, sort_keys=True)}
    out_path = Path(out_path)
    save_file(tensors, str(out_path), metadata=metadata)
    return out_path


def _read_safetensors(path: Path) -> Checkpoint:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as err:
        raise CheckpointError(f"Could not read {path.name} as safetensors (truncated or not safetensors?): {err}")
    if metadata.get("format") != SAFETENSORS_FORMAT:
        raise CheckpointError(f"{path.name} is a safetensors file but not one written by hyperstyle-nodes (its "
                              f"metadata has no format={SAFETENSORS_FORMAT!r}); convert the original .pt file with "
                              "`python -m hyperstyle_nodes.loaders.convert IN.pt OUT.safetensors`.")
    kind = metadata.get("kind")
    if kind not in KIND_DESCRIPTIONS:
        raise CheckpointError(f"{path.name}: unknown kind {kind!r} in its metadata")
    latent_avg = tensors.pop("latent_avg", None)
    parts = _split_prefixed(tensors)
    if "hypernet" in parts:
        parts["hypernet"] = restore_shared_aliases(parts["hypernet"])
    try:
        opts = json.loads(metadata.get("opts", "{}"))
    except ValueError as err:
        raise CheckpointError(f"{path.name}: its 'opts' metadata is not valid JSON ({err}); the file is damaged. "
                              f"Convert the original .pt file again.") from None
    with contents_checked(path):
        return _checkpoint(path, kind, _opts_dict(opts, path), parts, latent_avg)
