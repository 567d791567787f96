"""Latent editing: InterFaceGAN-style directions, GANSpace components and strength sweeps.

Everything here works on latent codes only (`codes`: float tensor [B, n_styles, style_dim]). HyperStyle keeps
the identity of an edited face because the hypernetwork's weight offsets are applied unchanged to the edited
codes, so no function in this module takes or returns offsets (apart from `deltas_for_sweep`, which only
re-orders them to line up with a sweep's batch).
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

DIRECTION_SUFFIXES = (".pt", ".pth", ".npy", ".safetensors")


# ---------------------------------------------------------------------------------------------------------------
# Reading tensors from user files
# ---------------------------------------------------------------------------------------------------------------

def _unpickler_reason(err: Exception) -> str:
    """The one useful line of torch's long weights_only message (e.g. 'Unsupported global: GLOBAL exec ...')."""
    for line in str(err).splitlines():
        if "WeightsUnpickler error:" in line:
            return " (" + line.split("WeightsUnpickler error:", 1)[1].split(". Please", 1)[0].strip() + ")"
    return ""


def _read_tensor_file(path: Path) -> object:
    """Read a .pt/.pth/.npy/.safetensors file without ever running pickled code.

    Returns a tensor, or for torch/safetensors files holding several tensors a dict of them.
    """
    suffix = path.suffix.lower()
    if suffix not in DIRECTION_SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(DIRECTION_SUFFIXES)}")
    if not path.is_file():
        raise FileNotFoundError(f"direction file not found: {path}")

    if suffix in (".pt", ".pth"):
        try:
            # map_location: the released pose.pt was saved on a CUDA device. weights_only: refuse arbitrary pickles.
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"{path}: refused to load. The file contains pickled Python objects other than plain tensors, and "
                f"unpickling them could run code. Re-save it as a plain tensor (torch.save(tensor, ...)) or as "
                f".npy/.safetensors.{_unpickler_reason(err)}"
            ) from err
        except Exception as err:  # truncated or corrupt archives raise assorted errors
            raise ValueError(f"{path}: not a readable PyTorch file ({type(err).__name__}: {err})") from err

    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)  # object arrays need pickle: refuse them
        except Exception as err:
            if "allow_pickle" in str(err):
                raise ValueError(f"{path}: refused to load a pickled (object) .npy array; save a numeric array") from err
            raise ValueError(f"{path}: not a readable .npy file ({type(err).__name__}: {err})") from err
        if not np.issubdtype(array.dtype, np.number):
            raise ValueError(f"{path}: expected a numeric array, found dtype {array.dtype}")
        return torch.from_numpy(np.ascontiguousarray(array))

    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            written_as = (f.metadata() or {}).get("format")
        tensors = load_file(str(path), device="cpu")
    except Exception as err:
        raise ValueError(f"{path}: not a readable .safetensors file ({type(err).__name__}: {err})") from err
    if written_as in _NOT_DIRECTIONS:
        raise ValueError(f"{path}: this is {_NOT_DIRECTIONS[written_as]}, not an edit direction. {_DIRECTION_HINT}")
    return tensors


# Files that hold tensors but are no direction: a checkpoint's latent_avg or an inversion's codes would otherwise
# be taken as one (and move every code by the average latent).
_CHECKPOINT_KEYS = ("state_dict", "g_ema", "opts", "latent_avg")
_NOT_DIRECTIONS = {"hyperstyle-nodes": "a model checkpoint (converted to safetensors)",
                   "hyperstyle-inversion": "a saved inversion (load it with Load Inversion)"}
_DIRECTION_HINT = ("An edit direction is a single tensor of shape (512,), (1, 512), (n_styles, 512) or "
                   "(1, n_styles, 512), e.g. InterFaceGAN's age.pt; models go into Load HyperStyle or Load Generator.")


def _pick_tensor(content: object, path: Path, preferred_key: str) -> Tensor:
    """A file may hold one tensor, or a dict in which one tensor is named `preferred_key` (or is the only one)."""
    if isinstance(content, Tensor):
        return content
    if isinstance(content, dict):
        if preferred_key in content and isinstance(content[preferred_key], Tensor):
            return content[preferred_key]
        found = [k for k in _CHECKPOINT_KEYS if k in content]
        if found:
            raise ValueError(f"{path}: this is a model checkpoint (it holds {', '.join(map(repr, found))}), not an "
                             f"edit direction. {_DIRECTION_HINT}")
        tensors = {k: v for k, v in content.items() if isinstance(v, Tensor)}
        if len(tensors) == 1:
            return next(iter(tensors.values()))
        raise ValueError(
            f"{path}: holds {len(tensors)} tensors ({', '.join(map(str, list(tensors)[:8]))}); "
            f"expected a single tensor or one named {preferred_key!r}"
        )
    raise ValueError(f"{path}: expected a tensor, found {type(content).__name__}")


# ---------------------------------------------------------------------------------------------------------------
# Directions (InterFaceGAN and any user direction)
# ---------------------------------------------------------------------------------------------------------------

def _accepted_shapes_text(n_styles: int | None, style_dim: int) -> str:
    n = n_styles if n_styles is not None else "n_styles"
    return (f"({style_dim},), (1, {style_dim}), ({n}, {style_dim}) or (1, {n}, {style_dim}) (also flattened, "
            f"(1, {n}*{style_dim}))")


def _as_direction_matrix(raw: Tensor, n_styles: int | None, style_dim: int, source: str) -> Tensor:
    """Normalise an accepted direction shape to float32 [1, style_dim] (W) or [n_styles, style_dim] (W+)."""
    shape = tuple(raw.shape)

    def wrong(reason: str) -> ValueError:
        model = f"the model has n_styles={n_styles}" if n_styles is not None else "n_styles not given"
        return ValueError(
            f"{source}: direction has shape {shape}; {reason}. Accepted shapes: "
            f"{_accepted_shapes_text(n_styles, style_dim)} ({model}, style_dim={style_dim})"
        )

    if raw.is_complex() or raw.dtype == torch.bool:
        raise wrong(f"dtype {raw.dtype} is not a real number type")
    if len(shape) == 1:
        matrix = raw.reshape(1, -1)
    elif len(shape) == 2:
        matrix = raw
    elif len(shape) == 3 and shape[0] == 1:
        matrix = raw[0]
    else:
        raise wrong(f"{len(shape)} dimensions are not a W or W+ direction")
    if matrix.shape[0] == 1 and matrix.shape[-1] > style_dim and matrix.shape[-1] % style_dim == 0:
        matrix = matrix.reshape(-1, style_dim)  # a flattened W+ direction (1, n_styles * D): SFE's fs_* boundaries

    if matrix.shape[-1] != style_dim:
        raise wrong(f"its last dimension is {matrix.shape[-1]}, not the latent size {style_dim}")
    rows = matrix.shape[0]
    if rows == 0:
        raise wrong("it is empty")
    if rows > 1 and n_styles is not None and rows != n_styles:
        raise wrong(f"a W+ direction with {rows} styles does not fit a latent with {n_styles} styles")

    matrix = matrix.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if not torch.isfinite(matrix).all():
        raise wrong("it contains NaN or infinite values")
    return matrix


def load_direction(path_or_tensor, n_styles: int | None = None, style_dim: int = 512) -> Tensor:
    """Load an editing direction as float32 [1, style_dim] (a W direction) or [n_styles, style_dim] (W+).

    Accepts a path to .pt/.pth (plain tensors only; pickled code is refused), .npy, or .safetensors (a single
    tensor or one named 'direction'), or a tensor / numpy array. Accepted shapes: (D,), (1, D), (n_styles, D),
    (1, n_styles, D), and W+ flattened as (1, n_styles * D). Pass the model's `n_styles` so that a W+ direction
    made for another resolution is refused here, with a clear message, instead of failing later inside the generator.
    """
    if isinstance(path_or_tensor, Tensor):
        raw, source = path_or_tensor, "direction tensor"
    elif isinstance(path_or_tensor, np.ndarray):
        raw, source = torch.from_numpy(np.ascontiguousarray(path_or_tensor)), "direction array"
    else:
        path = Path(path_or_tensor)
        raw, source = _pick_tensor(_read_tensor_file(path), path, "direction"), str(path)
    return _as_direction_matrix(raw, n_styles, style_dim, source)


def _check_codes(codes: Tensor) -> None:
    if not isinstance(codes, Tensor) or codes.dim() != 3 or not codes.is_floating_point():
        shape = tuple(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__
        raise ValueError(f"codes must be a float tensor [batch, n_styles, style_dim]; got {shape}")


def _style_range(layers: tuple[int, int] | None, n_styles: int) -> tuple[int, int]:
    """Resolve an optional (start, end) style range; end is clamped to n_styles, anything else invalid is refused."""
    if layers is None:
        return 0, n_styles
    try:
        start, end = (int(v) for v in layers)
    except (TypeError, ValueError):
        raise ValueError(f"layers must be a (start, end) pair of integers; got {layers!r}") from None
    end = min(end, n_styles)  # lets a UI default like (0, 18) work on a 14- or 16-style model
    if start < 0 or start >= end:
        raise ValueError(
            f"layers=({layers[0]}, {layers[1]}) selects no styles: need 0 <= start < end, "
            f"and start < n_styles={n_styles} (end is clamped to n_styles)"
        )
    return start, end


def apply_direction(codes: Tensor, direction: Tensor, strength: float,
                    layers: tuple[int, int] | None = None) -> Tensor:
    """Return `codes + strength * direction` (a new tensor; `codes` is never modified).

    A W direction [1, D] moves every style by the same vector; a W+ direction [n_styles, D] moves each style by
    its own row. With `layers=(start, end)` only styles start <= i < end move (end clamped to n_styles).
    Only latent codes are edited: HyperStyle's weight offsets stay as they are, which keeps the identity.
    """
    _check_codes(codes)
    _, n_styles, style_dim = codes.shape
    if isinstance(direction, np.ndarray):
        direction = torch.from_numpy(np.ascontiguousarray(direction))
    direction = _as_direction_matrix(direction, n_styles, style_dim, "direction")
    start, end = _style_range(layers, n_styles)

    per_style_step = torch.zeros(n_styles, style_dim, dtype=torch.float32)
    per_style_step[start:end] = direction.expand(n_styles, style_dim)[start:end] * float(strength)
    return codes + per_style_step.to(device=codes.device, dtype=codes.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Sweeps: one latent -> a batch over a range of strengths
# ---------------------------------------------------------------------------------------------------------------

def linspace_strengths(start: float, end: float, steps: int) -> list[float]:
    """`steps` evenly spaced strengths from start to end, both included (steps=1 gives [start])."""
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"steps must be at least 1; got {steps}")
    if steps == 1:
        return [float(start)]
    # computed from the ends (not by accumulating a step) so the last value is exactly `end`
    return [float(start) + (float(end) - float(start)) * i / (steps - 1) for i in range(steps)]


def sweep(codes: Tensor, direction: Tensor, strengths: Sequence[float],
          layers: tuple[int, int] | None = None) -> Tensor:
    """Apply a direction at each strength; returns [len(strengths) * B, n_styles, D].

    Order is strengths-major: rows s*B .. s*B + B - 1 hold the whole input batch edited with strengths[s], so a
    single latent (B = 1) gives one row per strength, in the order given. Use `sweep_source_indices` /
    `deltas_for_sweep` to line the weight offsets up with this batch.
    """
    _check_codes(codes)
    if len(strengths) == 0:
        raise ValueError("sweep needs at least one strength")
    return torch.cat([apply_direction(codes, direction, s, layers) for s in strengths], dim=0)


def sweep_source_indices(batch_size: int, num_strengths: int) -> Tensor:
    """For each row of a `sweep` output, the index of the input latent it came from (strengths-major order)."""
    return torch.arange(batch_size).repeat(num_strengths)


def deltas_for_sweep(deltas: Sequence[Tensor | None], num_strengths: int) -> list[Tensor | None]:
    """Repeat each sample's weight offsets so they line up with a `sweep` batch (values are not changed).

    Note the memory: full offsets are repeated num_strengths times; a generator that can index offsets per sample
    can use `sweep_source_indices` instead.
    """
    return [None if d is None else d.repeat(num_strengths, *([1] * (d.dim() - 1))) for d in deltas]


# ---------------------------------------------------------------------------------------------------------------
# GANSpace (as applied by encoder4editing and HyperStyle)
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GanspacePCA:
    """A GANSpace PCA of W space, as in e4e's `ffhq_pca.pt` / `cars_pca.pt`.

    The files store 'comp' [K, 1, D] (unit-length components), 'std' [K] (the spread of W along each one) and
    'mean' [1, D]; here they are kept flattened to comp [K, D], std [K], mean [D] (float32, CPU).
    """
    comp: Tensor
    std: Tensor
    mean: Tensor
    source: str = ""

    @property
    def n_components(self) -> int:
        return self.comp.shape[0]

    @property
    def style_dim(self) -> int:
        return self.comp.shape[1]


def load_ganspace(path_or_dict) -> GanspacePCA:
    """Load a GANSpace PCA file (.pt/.pth/.safetensors holding 'comp', 'std' and 'mean'), or such a dict."""
    if isinstance(path_or_dict, dict):
        content, source = path_or_dict, "GANSpace dict"
    else:
        path = Path(path_or_dict)
        content, source = _read_tensor_file(path), str(path)
    if not isinstance(content, dict) or not all(isinstance(content.get(k), Tensor) for k in ("comp", "std", "mean")):
        found = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise ValueError(f"{source}: not a GANSpace PCA file; expected tensors 'comp', 'std', 'mean', found {found}")

    raw_comp, raw_std, raw_mean = content["comp"], content["std"], content["mean"]
    n_components = raw_comp.shape[0] if raw_comp.dim() > 0 else 0
    comp = raw_comp.reshape(n_components, -1).to(torch.float32)
    style_dim = comp.shape[1]
    if raw_std.numel() != n_components or raw_mean.numel() != style_dim or n_components == 0:
        raise ValueError(
            f"{source}: inconsistent GANSpace shapes comp={tuple(raw_comp.shape)}, std={tuple(raw_std.shape)}, "
            f"mean={tuple(raw_mean.shape)}; expected comp (K, 1, D), std (K,), mean (1, D)"
        )
    return GanspacePCA(comp=comp.contiguous(), std=raw_std.reshape(-1).to(torch.float32),
                       mean=raw_mean.reshape(-1).to(torch.float32), source=source)


def apply_ganspace(codes: Tensor, pca: GanspacePCA, component: int, start: int, end: int,
                   strength: float) -> Tensor:
    """GANSpace edit exactly as e4e's `editings/ganspace.py` (`get_delta` / `edit`) and HyperStyle's CarsEditor.

    For each sample, with c = comp[component], s = std[component], and w0 = the sample's FIRST style vector:
        coord = dot(w0 - mean, c) / s                 (where the sample sits on that component, in std units)
        delta = (strength - coord) * c * s
        codes[start:end] += delta                     (same delta on every style in the range)
    So `strength` is the target coordinate, not a step: every selected style is moved by the vector that would
    put w0 at `strength` standard deviations along the component; strength 0 is therefore NOT the identity.
    `end` is clamped to n_styles. Returns a new tensor in the dtype of `codes`.
    """
    _check_codes(codes)
    _, n_styles, style_dim = codes.shape
    if isinstance(component, bool) or not isinstance(component, (int, np.integer)) \
            or not 0 <= int(component) < pca.n_components:
        raise ValueError(
            f"GANSpace component {component!r} is out of range: {pca.source or 'this PCA'} has "
            f"{pca.n_components} components (0 .. {pca.n_components - 1})"
        )
    if style_dim != pca.style_dim:
        raise ValueError(f"codes have style_dim {style_dim} but the GANSpace PCA has {pca.style_dim}")
    first, stop = _style_range((start, end), n_styles)

    work = codes.to(torch.float32)  # project in float32 even for half-precision codes
    unit = pca.comp[int(component)].to(work.device)
    spread = pca.std[int(component)].to(work.device)
    mean = pca.mean.to(work.device)

    coord = ((work[:, 0, :] - mean) @ unit) / spread                      # [B]
    delta = (float(strength) - coord)[:, None] * unit[None, :] * spread  # [B, D]
    edited = work.clone()
    edited[:, first:stop, :] += delta[:, None, :]
    return edited.to(codes.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Files for node dropdowns
# ---------------------------------------------------------------------------------------------------------------

def list_direction_files(folder) -> list[str]:
    """Direction files under `folder` (subfolders included), as sorted '/'-separated relative paths.

    A missing folder gives an empty list, so a fresh install shows an empty dropdown instead of an error.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    found = (
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in DIRECTION_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    return sorted(found)
