"""hyperstyle_nodes: HyperStyle (StyleGAN2 inversion with hypernetwork weight offsets) in plain PyTorch.

Importable without ComfyUI. The main entry point is `load_hyperstyle`:

    model = load_hyperstyle("hyperstyle_ffhq.pt", w_encoder="faces_w_encoder.pt", device="cpu")
    inv = model.invert(images, n_iters=5)   # images [B, 3, H, W] in [0, 1], face-aligned
    edited = model.decode(inv.codes + direction, inv.deltas)
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

# Loaded on first use (PEP 562), so `python -m hyperstyle_nodes edit --help` answers without importing torch.
_LAZY_NAMES = {
    "CheckpointError": "loaders.checkpoints", "read_checkpoint": "loaders.checkpoints",
    "HyperStyleModel": "engines.hyperstyle.model", "Inversion": "engines.hyperstyle.model",
    "load_generator": "engines.hyperstyle.model", "load_hyperstyle": "engines.hyperstyle.model",
}

if TYPE_CHECKING:
    from .loaders.checkpoints import CheckpointError, read_checkpoint
    from .engines.hyperstyle.model import HyperStyleModel, Inversion, load_generator, load_hyperstyle

__all__ = ["load_hyperstyle", "load_generator", "HyperStyleModel", "Inversion", "CheckpointError", "read_checkpoint"]
__version__ = "0.1.0"


def __getattr__(name: str):
    module = _LAZY_NAMES.get(name)
    if module is None:  # AttributeError lets `from hyperstyle_nodes import ops` fall back to the submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY_NAMES))
