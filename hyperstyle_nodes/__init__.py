"""hyperstyle_nodes: HyperStyle (StyleGAN2 inversion with hypernetwork weight offsets) in plain PyTorch.

Importable without ComfyUI. The main entry point is `load_hyperstyle`:

    model = load_hyperstyle("hyperstyle_ffhq.pt", w_encoder="faces_w_encoder.pt", device="cpu")
    inv = model.invert(images, n_iters=5)   # images [B, 3, H, W] in [0, 1], face-aligned
    edited = model.decode(inv.codes + direction, inv.deltas)
"""
from .checkpoints import CheckpointError, read_checkpoint
from .model import HyperStyleModel, Inversion, load_generator, load_hyperstyle

__all__ = ["load_hyperstyle", "load_generator", "HyperStyleModel", "Inversion", "CheckpointError", "read_checkpoint"]
__version__ = "0.1.0"
