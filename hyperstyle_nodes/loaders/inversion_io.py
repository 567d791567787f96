"""Saving and loading inversions as .safetensors: HyperStyle's (latent codes + per-layer weight offsets) and
StyleFeatureEditor's (latent codes + e4e codes + F-space features).

File layout (format version 1; version 2 for SFE inversions and StyleSpace edits, so that older readers ask to update
instead of calling the file damaged):
  tensors   'codes'            [B, n_styles, style_dim]
            'delta.<layer>'    one per tuned generator layer, exactly as given: [B, out, in, k, k] (full) or
                               [B, out, in] (compact per-channel; never expanded, so files stay small)
            'sfe.<name>'       SFE only, the names of SFE_TENSORS: e4e codes (edited like the codes), the unedited
                               inversion's codes and e4e codes, its F-space features [B, C, H, W]
            'stylespace'       after a StyleSpace edit only: [B, K] amounts added to K style channels at decode
  metadata  'format'           'hyperstyle-inversion'
            'format_version'   '1'
            'model_id'         which HyperStyle model made the offsets (they only fit that generator)
            'generator_signature'  that generator's weights fingerprint (optional; compared when loaded back)
            'num_layers'       length of the offsets list (untuned layers are None and not stored)
            'delta_layers'     JSON list of the layer indices that are stored
            'dtype'            dtype of the codes (e.g. 'float32'); offsets keep their own dtype
            'extra'            JSON object from the caller (e.g. source image name, alignment info)
            'sfe_tensors'      SFE only: JSON list of the 'sfe.<name>' tensors stored
            'stylespace_channels'  with 'stylespace': JSON list of its K [generator layer, channel] pairs
Safetensors keeps every tensor's dtype and bytes, so a round trip is bit-exact.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

FORMAT_NAME = "hyperstyle-inversion"
FORMAT_VERSION = 2  # the newest this reads; HyperStyle inversions are still written as version 1
SFE_TENSORS = ("e4e_codes", "inverted_codes", "inverted_e4e_codes", "features")
_SFE_REQUIRED = ("inverted_codes", "features")
SUFFIX = ".safetensors"
_COUNTER_DIGITS = 5
_MAX_NAME_ATTEMPTS = 100


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _standalone_cpu(tensor: Tensor, seen_storages: set[int]) -> Tensor:
    """A contiguous CPU tensor that owns its storage alone: safetensors refuses tensors that share memory
    (e.g. per-layer views cut from one big buffer), so such views are copied."""
    tensor = tensor.detach().to("cpu").contiguous()
    storage = tensor.untyped_storage()
    if storage.data_ptr() in seen_storages or storage.nbytes() != tensor.nbytes:
        tensor = tensor.clone()
        storage = tensor.untyped_storage()
    seen_storages.add(storage.data_ptr())
    return tensor


def _check_inversion(codes: Tensor, deltas: Sequence[Tensor | None], model_id: str) -> None:
    if not isinstance(codes, Tensor) or codes.dim() != 3 or not codes.is_floating_point():
        found = tuple(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__
        raise ValueError(f"codes must be a float tensor [batch, n_styles, style_dim]; got {found}")
    if not isinstance(model_id, str) or not model_id:
        raise ValueError("model_id must be a non-empty string naming the HyperStyle model")
    if isinstance(deltas, Tensor) or not isinstance(deltas, Sequence):
        raise ValueError(f"deltas must be a list with one entry (tensor or None) per generator layer; "
                         f"got {type(deltas).__name__}")
    batch = codes.shape[0]
    for layer, delta in enumerate(deltas):
        if delta is None:
            continue
        if not isinstance(delta, Tensor) or delta.dim() not in (3, 5) or not delta.is_floating_point():
            found = tuple(delta.shape) if isinstance(delta, Tensor) else type(delta).__name__
            raise ValueError(f"deltas[{layer}] must be None or a float tensor [B, out, in] or [B, out, in, k, k]; "
                             f"got {found}")
        if delta.shape[0] != batch:
            raise ValueError(f"deltas[{layer}] has batch {delta.shape[0]} but codes have batch {batch}")


def _check_sfe(sfe: dict, batch: int) -> None:
    unknown = set(sfe) - set(SFE_TENSORS)
    missing = [name for name in _SFE_REQUIRED if sfe.get(name) is None]
    if unknown or missing:
        raise ValueError(f"an SFE inversion holds {', '.join(SFE_TENSORS)} ({', '.join(_SFE_REQUIRED)} required); "
                         f"got unknown {sorted(unknown)}, missing {missing}")
    for name, tensor in sfe.items():
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point() or tensor.shape[0] != batch:
            found = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(f"SFE tensor {name!r} must be a float tensor of batch {batch}; got {found}")


def _checked_channels(channels, amounts, batch: int) -> list:
    """A StyleSpace edit's (layer, channel) pairs as int tuples, checked against its amounts [batch, K]."""
    try:
        pairs = [(int(layer), int(channel)) for layer, channel in channels]
    except (TypeError, ValueError):
        raise ValueError(f"StyleSpace channels must be (layer, channel) pairs of whole numbers; got {channels!r}") \
            from None
    if not isinstance(amounts, Tensor) or not amounts.is_floating_point() or amounts.shape != (batch, len(pairs)):
        found = tuple(amounts.shape) if isinstance(amounts, Tensor) else type(amounts).__name__
        raise ValueError(f"StyleSpace amounts must be a float tensor [{batch}, {len(pairs)}] (batch, channels); "
                         f"got {found}")
    if any(layer < 0 or channel < 0 for layer, channel in pairs) or len(set(pairs)) != len(pairs):
        raise ValueError(f"StyleSpace channels must be distinct non-negative (layer, channel) pairs; got {pairs}")
    return pairs


def _next_free_path(path: Path) -> Path:
    """`path` if free, else `<stem>_NNNNN.safetensors` numbered after the highest existing one (as ComfyUI does,
    so numbers never go back and refill gaps)."""
    if not path.exists():
        return path
    pattern = re.compile(re.escape(path.stem) + r"_(\d{" + str(_COUNTER_DIGITS) + r",})" + re.escape(SUFFIX) + "$")
    used = [int(m.group(1)) for p in path.parent.iterdir() if (m := pattern.match(p.name))]
    counter = max(used, default=0) + 1
    while True:  # normally one step; guards against names that do not follow the pattern exactly
        candidate = path.with_name(f"{path.stem}_{counter:0{_COUNTER_DIGITS}d}{SUFFIX}")
        if not candidate.exists():
            return candidate
        counter += 1


def save_inversion(path, codes: Tensor, deltas: Sequence[Tensor | None], model_id: str,
                   extra: dict | None = None, overwrite: bool = False, signature: str = "",
                   sfe: dict | None = None, stylespace: tuple | None = None) -> Path:
    """Save an inversion; returns the path actually written. `sfe`: an SFE inversion's tensors by SFE_TENSORS name;
    `stylespace`: (channels, amounts) of a StyleSpace edit, ((layer, channel), ...) and [B, K].

    `path` gets '.safetensors' appended unless it already ends so; missing folders are created. With
    overwrite=False an existing file is never replaced: the next free `<stem>_00001.safetensors` style name is
    used instead.
    """
    path = Path(path)
    if path.suffix.lower() != SUFFIX:  # names like 'jane.doe' keep their dot
        path = path.with_name(path.name + SUFFIX)
    _check_inversion(codes, deltas, model_id)
    sfe = {name: tensor for name, tensor in (sfe or {}).items() if tensor is not None}
    if sfe:
        _check_sfe(sfe, codes.shape[0])
    if stylespace is not None:
        channels = _checked_channels(stylespace[0], stylespace[1], codes.shape[0])
    try:
        extra_json = json.dumps(extra or {}, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise ValueError(f"extra must be JSON-serialisable (strings, numbers, lists, dicts): {err}") from None

    seen: set[int] = set()
    tensors = {"codes": _standalone_cpu(codes, seen)}
    present = [layer for layer, delta in enumerate(deltas) if delta is not None]
    for layer in present:
        tensors[f"delta.{layer}"] = _standalone_cpu(deltas[layer], seen)
    for name, tensor in sfe.items():
        tensors[f"sfe.{name}"] = _standalone_cpu(tensor, seen)
    if stylespace is not None:
        tensors["stylespace"] = _standalone_cpu(stylespace[1], seen)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": "2" if sfe or stylespace is not None else "1",
        "model_id": model_id,
        "num_layers": str(len(deltas)),
        "delta_layers": json.dumps(present),
        "dtype": _dtype_name(codes.dtype),
        "extra": extra_json,
    }
    if signature:
        metadata["generator_signature"] = signature
    if sfe:
        metadata["sfe_tensors"] = json.dumps(list(sfe))
    if stylespace is not None:
        metadata["stylespace_channels"] = json.dumps([list(c) for c in channels])

    path.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary file first, so a crash never leaves a half-written file under the final name.
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temp_name, metadata=metadata)
        if overwrite:
            target = path
            os.replace(temp_name, target)
        else:
            target = _claim_free_name(Path(temp_name), path)
    finally:
        if os.path.exists(temp_name):
            os.remove(temp_name)
    return target


def _claim_free_name(temp: Path, wanted: Path) -> Path:
    """Move `temp` to the first free name, without replacing a file that appears in the meantime."""
    for _ in range(_MAX_NAME_ATTEMPTS):  # bounded: another writer racing us forever must not hang the node
        target = _next_free_path(wanted)
        try:
            os.link(temp, target)  # fails if target exists, unlike os.replace
        except FileExistsError:
            continue
        except OSError:
            # file systems without hard links: reserve the name exclusively, then fill it
            try:
                with open(target, "xb"):
                    pass
            except FileExistsError:
                continue
            os.replace(temp, target)
            return target
        os.remove(temp)
        return target
    raise FileExistsError(f"could not find a free file name next to {wanted}")


def _describe_foreign_file(path: Path, metadata: dict | None, names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
    fmt = (metadata or {}).get("format")
    what = f"metadata format={fmt!r}" if fmt else "no 'format' metadata"
    return (f"{path} is not a HyperStyle inversion: it has {what} and holds tensors [{shown}] "
            f"(expected 'codes' and 'delta.<layer>' with format={FORMAT_NAME!r}). "
            f"Is it a model checkpoint? Load it with the model loader instead.")


def load_inversion(path, device="cpu") -> tuple[Tensor, list[Tensor | None], dict]:
    """Load an inversion saved by `save_inversion`.

    Returns (codes, deltas, metadata): deltas is a list of length num_layers with None where a layer is not
    tuned; metadata has 'format_version' (int), 'model_id' (str), 'num_layers' (int), 'delta_layers'
    (list[int]), 'dtype' (str), 'extra' (dict), for files saved with one 'generator_signature' (str), for an
    SFE inversion 'sfe' (dict: SFE_TENSORS name -> tensor), and after a StyleSpace edit 'stylespace'
    ((layer, channel) pairs, amounts [B, K]).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"inversion file not found: {path}")
    try:
        reader_context = safe_open(str(path), framework="pt", device=str(device))
    except Exception as err:  # safetensors' own error type for files that are not safetensors at all
        raise ValueError(f"{path} is not a HyperStyle inversion (not a readable .safetensors file: {err})") from err

    with reader_context as reader:
        raw_meta = reader.metadata() or {}
        names = list(reader.keys())
        if raw_meta.get("format") != FORMAT_NAME:
            raise ValueError(_describe_foreign_file(path, raw_meta, names))
        try:
            metadata = {
                "format_version": int(raw_meta["format_version"]),
                "model_id": raw_meta["model_id"],
                "num_layers": int(raw_meta["num_layers"]),
                "delta_layers": [int(i) for i in json.loads(raw_meta["delta_layers"])],
                "dtype": raw_meta["dtype"],
                "extra": json.loads(raw_meta["extra"]),
            }
            if "generator_signature" in raw_meta:
                metadata["generator_signature"] = raw_meta["generator_signature"]
            sfe_names = [str(name) for name in json.loads(raw_meta.get("sfe_tensors", "[]"))]
            channels = json.loads(raw_meta["stylespace_channels"]) if "stylespace_channels" in raw_meta else None
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"{path}: damaged inversion metadata ({type(err).__name__}: {err})") from None
        if metadata["format_version"] > FORMAT_VERSION:
            raise ValueError(f"{path}: inversion format version {metadata['format_version']} is newer than this "
                             f"version of hyperstyle-nodes supports ({FORMAT_VERSION}); please update the node pack")

        num_layers, delta_layers = metadata["num_layers"], metadata["delta_layers"]
        expected = {"codes", *(f"delta.{i}" for i in delta_layers), *(f"sfe.{name}" for name in sfe_names),
                    *(["stylespace"] if channels is not None else [])}
        if set(names) != expected or any(not 0 <= i < num_layers for i in delta_layers):
            raise ValueError(f"{path}: damaged inversion: metadata lists layers {delta_layers} of {num_layers} "
                             f"{f'and SFE tensors {sfe_names} ' if sfe_names else ''}"
                             f"{'and StyleSpace amounts ' if channels is not None else ''}but the file holds tensors "
                             f"{sorted(names)}")
        codes = reader.get_tensor("codes")
        deltas: list[Tensor | None] = [None] * num_layers
        for layer in delta_layers:
            deltas[layer] = reader.get_tensor(f"delta.{layer}")
        if sfe_names:
            metadata["sfe"] = {name: reader.get_tensor(f"sfe.{name}") for name in sfe_names}
            try:
                _check_sfe(metadata["sfe"], codes.shape[0])
            except ValueError as err:
                raise ValueError(f"{path}: damaged inversion: {err}") from None
        if channels is not None:
            amounts = reader.get_tensor("stylespace")
            try:
                metadata["stylespace"] = (tuple(_checked_channels(channels, amounts, codes.shape[0])), amounts)
            except ValueError as err:
                raise ValueError(f"{path}: damaged inversion: {err}") from None
    return codes, deltas, metadata


def is_inversion_file(path) -> bool:
    """True for a .safetensors file written by `save_inversion` (reads only its header)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT_NAME
    except Exception:  # unreadable or not safetensors: not an inversion
        return False
