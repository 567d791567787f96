"""Training checkpoints in the released layout, plus what `--resume` needs.

    {'state_dict': {'hypernet.*' | 'encoder.*', 'decoder.*'}, 'opts': {...}, 'latent_avg': [n_styles, D],
     'step': int, 'global_step': int, 'best_val_loss': float | None,
     'optimizer': optimizer.state_dict(), 'rng': [per-process RNG states], 'data': {'epoch', 'batch_in_epoch', ...}}

The first three keys are what the nodes and the official code read; the rest are ignored by them. Everything is
plain tensors, dicts, lists, numbers and strings, so `torch.load(..., weights_only=True)` reads it.
`best_model.pt` leaves out the optimizer and RNG (it is for use, not for resuming).
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..loaders.checkpoints import torch_load_safely
from .models import SetupError

LAST, BEST = "last.pt", "best_model.pt"


def capture_rng() -> dict:
    """This process's random states (torch, CUDA, numpy, Python) as plain tensors and lists."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        # this process's own GPU only: touching the others would open a CUDA context on every GPU per process
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": list(state), "gauss": gauss},
    }


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"][0])
    n = rng["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = rng["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def save(path: Path, payload: dict) -> Path:
    """Write atomically: a crash or Ctrl-C mid-write never leaves a truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load(path) -> dict:
    obj = torch_load_safely(path)
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise SetupError(f"{path} is not a training checkpoint (no state_dict)")
    return obj


def find_resume(resume: Optional[str], out_dir: Path) -> Optional[Path]:
    """--resume PATH, or 'auto' for OUT/checkpoints/last.pt if it exists."""
    if not resume:
        return None
    if resume == "auto":
        candidate = Path(out_dir) / "checkpoints" / LAST
        return candidate if candidate.is_file() else None
    path = Path(resume)
    if path.is_dir():
        path = path / "checkpoints" / LAST if (path / "checkpoints" / LAST).is_file() else path / LAST
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no checkpoint there (expected a .pt file or a run folder with "
                                f"checkpoints/{LAST})")
    return path


def prefixed(prefix: str, module: torch.nn.Module) -> dict:
    """`prefix.name` -> a CPU copy of each tensor. Names that share a tensor (the shared hypernet, repeated under
    every shared head) share the copy, so torch.save stores it once, as in the released files."""
    copies, out = {}, {}
    for name, value in module.state_dict().items():
        key = (value.data_ptr(), tuple(value.shape), value.dtype)
        if key not in copies:
            copies[key] = value.detach().cpu().contiguous().clone()
        out[f"{prefix}.{name}"] = copies[key]
    return out


def unprefixed(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix) + 1:]: v for k, v in state_dict.items() if k.startswith(prefix + ".")}
