"""Text-driven edits: StyleCLIP global directions applied in StyleSpace, with the inversion's weight offsets kept.

The method of the official HyperStyle release (editing/styleclip/), from StyleCLIP (Patashnik et al.):
    t(p)     = normalise(mean over templates of normalise(CLIP_text(template.format(p))))
    Δi       = normalise(t(target) - t(neutral))
    r        = fs3 @ Δi                      relevance of every StyleSpace channel outside toRGB (fs3: [C, 512])
    ΔS       = r where |r| >= β, else 0; divided by max |ΔS|; times the per-channel std of S (`S_mean_std`)
    image    = G(S + α ΔS, offsets)
fs3's rows run over the non-toRGB layers in generator order; as in the official code, only the first
`EDITED_LAYERS` of them (up to the 128-px conv at 1024 px, 5376 of the 6048 channels) are edited, and the rest of
r is ignored.

Files (not downloaded: no Hugging Face mirror of them is known; see README): `fs3.npy`, `S_mean_std` (a Python
pickle of numpy arrays, read here without running any code, or its safetensors conversion) and `templates.txt`,
in `<models folder>/styleclip/`. The text encoder is CLIP ViT-B/32 through transformers (optional dependency).
"""
from __future__ import annotations

import codecs
import io
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..loaders import downloads

EDITED_LAYERS = 11  # the official code edits the first 11 non-toRGB layers (STYLESPACE_INDICES_WITHOUT_TORGB[:11])
CONTEXT_LENGTH = 77  # CLIP's text context, start and end tokens included
CLIP_REPO = "openai/clip-vit-base-patch32"
CLIP_FILES = ("config.json", "vocab.json", "merges.txt", "tokenizer_config.json")
CLIP_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # the first the repository has
FILES_FOLDER = "styleclip"
FS3_FILE, S_STATS_FILE, TEMPLATES_FILE = "fs3.npy", "S_mean_std", "templates.txt"
OFFICIAL_SOURCE = "github.com/yuval-alaluf/hyperstyle, folder editing/styleclip/global_directions/"
FEATURE_CACHE_SIZE = 64  # prompt pairs remembered per text encoder


class StyleClipError(ValueError):
    """Bad prompts, β or StyleCLIP files: the message says what to change."""


# ---- files ---------------------------------------------------------------------------------------------------


def find_file(name: str, folder: Optional[Path] = None) -> Path:
    """A StyleCLIP file in `folder`, else in `<models folder>/styleclip/` or the models folder itself."""
    folders = [Path(folder)] if folder is not None else [
        f for base in downloads.model_folders() for f in (base / FILES_FOLDER, base)]
    candidates = [name + ".safetensors", name] if name == S_STATS_FILE else [name]
    for f in folders:
        for candidate in candidates:
            if (f / candidate).is_file():
                return f / candidate
    raise downloads.WeightsUnavailableError(
        f"StyleCLIP file '{name}' not found in {', '.join(map(str, folders))}. Text edits need fs3.npy, S_mean_std "
        f"and templates.txt from the official HyperStyle release ({OFFICIAL_SOURCE}); put them in "
        f"{folders[0]}")


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays in plain lists/tuples/dicts and nothing else: any other global (a function or class
    that unpickling would call) is refused, so reading the file cannot run code."""

    def find_class(self, module, name):
        if (module, name) in (("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")):
            return _reconstruct
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if (module, name) == ("_codecs", "encode"):  # how protocol 2 stores bytes (str -> bytes, no side effects)
            return codecs.encode
        raise pickle.UnpicklingError(f"refused to load '{module}.{name}': only numpy arrays are accepted")


def _reconstruct(cls, shape, dtype_code):
    """numpy's array reconstructor, for ndarray only (the pickle then sets the data with ndarray.__setstate__)."""
    if cls is not np.ndarray:
        raise pickle.UnpicklingError(f"refused to reconstruct {cls!r}: only numpy.ndarray is accepted")
    return np.ndarray.__new__(np.ndarray, shape, dtype_code)


def read_s_statistics(path) -> tuple:
    """(means, stds): two lists with one float32 tensor [width] per generator layer, from `S_mean_std` (the
    official pickle, read without running code) or its safetensors conversion."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        n = len([k for k in tensors if k.startswith("std.")])
        try:
            return ([tensors[f"mean.{i}"].float() for i in range(n)], [tensors[f"std.{i}"].float() for i in range(n)])
        except KeyError as err:
            raise StyleClipError(f"{path}: not an S_mean_std conversion (missing tensor {err})") from None
    try:
        with open(path, "rb") as f:
            content = _ArraysOnly(io.BytesIO(f.read())).load()
    except pickle.UnpicklingError as err:
        raise StyleClipError(f"{path}: {err}") from None
    except Exception as err:  # truncated or not a pickle at all
        raise StyleClipError(f"{path}: not a readable S_mean_std file ({type(err).__name__}: {err})") from None
    ok = (isinstance(content, (list, tuple)) and len(content) == 2 and all(isinstance(part, (list, tuple)) and
          len(part) == len(content[0]) and all(isinstance(a, np.ndarray) and np.issubdtype(a.dtype, np.floating)
                                               for a in part) for part in content))
    if not ok:
        raise StyleClipError(f"{path}: expected (means, stds), two lists of float arrays, one per layer")
    return tuple([torch.from_numpy(np.array(a, dtype=np.float32)).reshape(-1) for a in part] for part in content)


def convert_s_statistics(source, target) -> None:
    """Write S_mean_std as safetensors (mean.i / std.i per layer)."""
    from safetensors.torch import save_file

    means, stds = read_s_statistics(source)
    tensors = {f"mean.{i}": m.contiguous() for i, m in enumerate(means)}
    tensors.update({f"std.{i}": s.contiguous() for i, s in enumerate(stds)})
    save_file(tensors, str(target), metadata={"format": "styleclip_s_mean_std"})


def read_fs3(path) -> torch.Tensor:
    """fs3.npy: [C, D] float, the CLIP image-space direction of every non-toRGB StyleSpace channel."""
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as err:
        raise StyleClipError(f"{path}: not a readable numeric .npy file ({type(err).__name__}: {err})") from None
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise StyleClipError(f"{path}: expected a 2-D float array [channels, CLIP dim], got {array.dtype} "
                             f"{list(array.shape)}")
    return torch.from_numpy(np.array(array, dtype=np.float32))


def read_templates(path) -> list:
    """Prompt templates, one per line, each with a '{}' where the prompt goes (empty lines skipped)."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [line for line in lines if "{}" not in line]
    if not lines or bad:
        raise StyleClipError(f"{path}: every line must be a prompt template with '{{}}'" +
                             (f" (e.g. {bad[0]!r})" if bad else " and the file is empty"))
    return lines


# ---- global directions ---------------------------------------------------------------------------------------


def edited_layers(widths: Sequence[int], to_rgb_layers: Sequence[int]) -> list:
    """The generator layers a global direction edits: the first EDITED_LAYERS non-toRGB layers."""
    return [layer for layer in range(len(widths)) if layer not in to_rgb_layers][:EDITED_LAYERS]


class GlobalDirections(nn.Module):
    """fs3 and the per-channel std of S, laid out for one generator (buffers: they move with the module)."""

    def __init__(self, fs3: torch.Tensor, s_std: Sequence[torch.Tensor], widths: Sequence[int],
                 to_rgb_layers: Sequence[int]):
        super().__init__()
        widths = list(widths)
        non_rgb = [layer for layer in range(len(widths)) if layer not in to_rgb_layers]
        channels = sum(widths[layer] for layer in non_rgb)
        if fs3.shape[0] != channels:
            raise StyleClipError(f"fs3 has {fs3.shape[0]} channels but this generator has {channels} outside toRGB "
                                 f"layers: fs3.npy belongs to another generator (the official one is for FFHQ 1024 px)")
        if len(s_std) != len(widths) or any(s.numel() != w for s, w in zip(s_std, widths)):
            raise StyleClipError(f"S_mean_std has per-layer widths {[s.numel() for s in s_std]}, this generator "
                                 f"{widths}: it belongs to another generator")
        self.layers = edited_layers(widths, to_rgb_layers)
        self.widths = widths
        self.register_buffer("fs3", fs3.float())
        self.register_buffer("std", torch.cat([s_std[layer].reshape(-1).float() for layer in self.layers]))
        # rows of fs3 for the edited layers: they come first, in layer order; `positions`: where their channels are
        # in all layers' styles laid end to end
        self.n_edited = sum(widths[layer] for layer in self.layers)
        starts = np.cumsum([0] + widths)
        self.register_buffer("positions", torch.cat([torch.arange(starts[layer], starts[layer + 1])
                                                     for layer in self.layers]))

    def relevance(self, delta_i: torch.Tensor) -> torch.Tensor:
        """r = fs3 @ Δi over every non-toRGB channel."""
        return self.fs3 @ delta_i.to(self.fs3)

    def delta_s(self, delta_i: torch.Tensor, beta: float) -> list:
        """ΔS for a normalised CLIP text direction Δi: one tensor [width] per generator layer (zeros where not
        edited)."""
        r = self.relevance(delta_i)
        kept = torch.where(r.abs() < beta, torch.zeros_like(r), r)
        if not kept[:self.n_edited].any():
            raise StyleClipError(f"no channel passes β={beta:g} (the largest relevance is "
                                 f"{r[:self.n_edited].abs().max():.4f}); lower β")
        # as the official code: scaled by the largest kept relevance over all of fs3's channels, edited or not
        scaled = kept[:self.n_edited] / kept.abs().max() * self.std
        flat = torch.zeros(sum(self.widths), device=scaled.device).index_copy_(0, self.positions, scaled)
        return list(flat.split(self.widths))


def load_global_directions(generator, folder: Optional[Path] = None) -> GlobalDirections:
    fs3 = read_fs3(find_file(FS3_FILE, folder))
    _, s_std = read_s_statistics(find_file(S_STATS_FILE, folder))
    return GlobalDirections(fs3, s_std, generator.style_widths(), generator.config.to_rgb_layers)


def edit_styles(styles: Sequence[torch.Tensor], delta_s: Sequence[torch.Tensor], alphas: Sequence[float]) -> list:
    """S [B, width] per layer, edited with S + α ΔS for every α: [len(alphas) * B, width], strength-major like
    Edit Sweep (rows a * B ... a * B + B - 1 are the batch at alphas[a])."""
    # all layers laid end to end: a few kernels instead of a few per layer (launches dominate at batch 1 on a GPU)
    s, d = torch.cat(list(styles), dim=1), torch.cat(list(delta_s)).to(styles[0].device)
    a = torch.tensor(list(alphas), dtype=torch.float32, device=s.device)
    edited = torch.addcmul(s.float()[None], a[:, None, None], d[None, None]).reshape(-1, s.shape[1]).to(s.dtype)
    return list(edited.split([t.shape[1] for t in styles], dim=1))


# ---- CLIP text features ----------------------------------------------------------------------------------------


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise StyleClipError("text edits need the transformers package for CLIP: pip install transformers "
                             "(or pip install 'hyperstyle-nodes[text]')") from None
    return transformers


class TextEncoder(nn.Module):
    """CLIP's text tower with projection (transformers) and its tokenizer, with the averaged-template features of
    each prompt pair remembered (`delta_i`)."""

    def __init__(self, model: nn.Module, tokenizer):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._features: OrderedDict = OrderedDict()

    def token_count(self, text: str) -> int:
        return len(self.tokenizer(text, truncation=False)["input_ids"])

    def check_prompt(self, text: str, what: str, templates: Sequence[str]) -> None:
        if not isinstance(text, str) or not text.strip():
            raise StyleClipError(f"the {what} text is empty; describe the face, e.g. 'face with hair' -> "
                                 f"'face with curly hair'")
        longest = max((template.format(text) for template in templates), key=self.token_count)
        n = self.token_count(longest)
        if n > CONTEXT_LENGTH:
            raise StyleClipError(f"the {what} text is too long for CLIP: in a template ({longest[:60]!r}...) it is "
                                 f"{n} tokens, CLIP reads at most {CONTEXT_LENGTH}; shorten it")

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP text embeddings [N, D] (projected, not normalised), as the official `encode_text`."""
        device = next(self.model.parameters()).device
        # padded to the longest: CLIP's causal attention makes what follows the end token irrelevant
        tokens = self.tokenizer(list(texts), padding=True, truncation=False, return_tensors="pt")
        out = self.model(input_ids=tokens["input_ids"].to(device))
        return out.text_embeds.float()

    def averaged(self, text: str, templates: Sequence[str]) -> torch.Tensor:
        e = self.embed([template.format(text) for template in templates])
        e = e / e.norm(dim=-1, keepdim=True)
        mean = e.mean(dim=0)
        return mean / mean.norm()

    def delta_i(self, neutral: str, target: str, templates: Sequence[str]) -> torch.Tensor:
        """Δi = normalise(t(target) - t(neutral)), cached per (neutral, target, templates)."""
        key = (neutral, target, tuple(templates))
        if key in self._features:
            self._features.move_to_end(key)
            return self._features[key]
        self.check_prompt(neutral, "neutral", templates)
        self.check_prompt(target, "target", templates)
        delta = self.averaged(target, templates) - self.averaged(neutral, templates)
        if delta.norm() == 0:
            raise StyleClipError(f"the neutral and target texts give the same CLIP features ({neutral!r}); "
                                 f"describe the change in the target text")
        delta = (delta / delta.norm()).cpu()
        self._features[key] = delta
        if len(self._features) > FEATURE_CACHE_SIZE:
            self._features.popitem(last=False)
        return delta


def clip_folder(name: str = CLIP_REPO) -> Path:
    """A local folder with the CLIP files: `name` itself if it is a folder, else `<models folder>/<repo name>`,
    downloaded from the Hugging Face Hub on first use."""
    given = Path(name).expanduser()
    if given.is_dir():
        return given
    folder = downloads.models_dir() / name.split("/")[-1]
    missing = [f for f in CLIP_FILES if not (folder / f).is_file()]
    if not any((folder / f).is_file() for f in CLIP_WEIGHTS):
        missing.append(CLIP_WEIGHTS[0])
    offline = downloads._offline_reason() if missing else None
    if offline:
        raise downloads.WeightsUnavailableError(
            f"CLIP ({name}) is not in {folder} and {offline}: download {', '.join(missing)} of the Hugging Face "
            f"repo {name} by hand into {folder}")
    if missing:
        try:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError

            for filename in missing:  # hf_hub_download writes a temporary file and renames it when complete
                try:
                    hf_hub_download(name, filename, local_dir=folder)
                except EntryNotFoundError:
                    if filename != CLIP_WEIGHTS[0]:
                        raise
                    hf_hub_download(name, CLIP_WEIGHTS[1], local_dir=folder)  # weights_only load in transformers
        except Exception as err:  # offline, no connection, 404
            raise downloads.WeightsUnavailableError(
                f"could not download CLIP ({name}: {', '.join(missing)}) from the Hugging Face Hub "
                f"({type(err).__name__}: {str(err)[:200]}). Download those files of {name} by hand into "
                f"{folder}") from None
    return folder


def load_text_encoder(name: str = CLIP_REPO) -> TextEncoder:
    transformers = _import_transformers()
    folder = clip_folder(name)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder))
    model = transformers.CLIPTextModelWithProjection.from_pretrained(str(folder))
    return TextEncoder(model.float(), tokenizer)
