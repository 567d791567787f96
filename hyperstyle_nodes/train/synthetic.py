"""The self-check domain: a small random StyleGAN2 generator and images it draws with per-image weight offsets.

Targets are G(w, deltas) with w drawn from the generator's own W space and random offsets on the layers the
hypernetwork tunes, so a W-encoder alone cannot reach them exactly, and HyperStyle's refinement has something to
recover. The offsets of an image are a random combination of a few fixed directions per layer (`rank`), i.e. a
low-dimensional family a hypernetwork can learn, like the detail a real generator misses:
    delta_l(image) = strength * sum_k a_k(image) B_l,k      a ~ N(0, 1/rank), B_l,k ~ N(0, 1) [out, in]
No data has to be at hand: the domain is written as an ordinary image folder plus a generator file, and the
normal `encoder` and `hypernet` stages train on it.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..tiny import make_generator, tiny_generator_config
from .models import estimate_latent_avg


@dataclass
class SyntheticDomain:
    size: int = 128
    train_images: int = 8000
    val_images: int = 256
    seed: int = 0
    truncation: float = 0.7
    offset_strength: float = 0.3
    offset_rank: int = 8
    narrow: float = 1 / 16
    style_dim: int = 64


@torch.no_grad()
def calibrate_(generator, latent_avg, truncation: float, target_std: float = 0.45, seed: int = 0):
    """Scale the toRGB layers and shift the last toRGB bias so images sit in [-1, 1] (std ~0.45, mean ~0) instead
    of clipping: a random generator draws much too bright, saturated images, and clipped targets would put a
    floor under every reconstruction error."""
    z = torch.randn(256, generator.style_dim, generator=torch.Generator().manual_seed(seed + 11))
    w = latent_avg[0] + truncation * (generator.map(z.to(latent_avg)) - latent_avg[0])
    images = generator(w)
    scale = target_std / images.std().item()
    for to_rgb in [generator.to_rgb1, *generator.to_rgbs]:
        to_rgb.conv.weight.mul_(scale)
        to_rgb.bias.mul_(scale)
    generator.to_rgbs[-1].bias.sub_(generator(w).mean(dim=(0, 2, 3)).view(1, 3, 1, 1))
    return generator


def _offset_bases(generator, layers: tuple, rank: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed + 7)
    shapes = generator.config.layer_shapes
    return {layer: torch.randn(rank, shapes[layer][2], shapes[layer][1], generator=g) for layer in layers}


def _render(generator, latent_avg, bases, domain: SyntheticDomain, n: int, seed: int, device):
    """Yields (uint8 images [B, H, W, 3], w [B, D], coefficients [B, rank]) batches."""
    g = torch.Generator().manual_seed(seed)
    n_layers = len(generator.config.layer_shapes)
    for start in range(0, n, 64):
        b = min(64, n - start)
        z = torch.randn(b, generator.style_dim, generator=g)
        a = torch.randn(b, domain.offset_rank, generator=g) / domain.offset_rank ** 0.5
        with torch.no_grad():
            w = generator.map(z.to(device))
            w = latent_avg[0].to(device) + domain.truncation * (w - latent_avg[0].to(device))
            deltas = [None] * n_layers
            for layer, basis in bases.items():
                deltas[layer] = domain.offset_strength * torch.einsum("bk,koi->boi", a.to(device), basis.to(device))
            images = generator(w, deltas)
        pixels = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
        yield pixels.numpy(), w.cpu(), a


def _write_pngs(folder: Path, first_index: int, pixels: np.ndarray, pool: ThreadPoolExecutor) -> list:
    def write(i):
        Image.fromarray(pixels[i]).save(folder / f"{first_index + i:06d}.png", compress_level=1)

    return [pool.submit(write, i) for i in range(len(pixels))]


def build_domain(folder, domain: SyntheticDomain, layers: tuple, device="cpu", log=print) -> dict:
    """Write generator.pt, train/ and val/ image folders and domain.json into `folder`; returns their paths."""
    folder = Path(folder)
    paths = {"generator": folder / "generator.pt", "train": folder / "train", "val": folder / "val",
             "val_codes": folder / "val_codes.pt", "info": folder / "domain.json"}
    if paths["info"].is_file():
        info = json.loads(paths["info"].read_text())
        if info.get("domain") == asdict(domain) and info.get("layers") == list(layers):
            log(f"synthetic domain already in {folder}; reusing it")
            return paths
    for key in ("train", "val"):
        paths[key].mkdir(parents=True, exist_ok=True)
        for old in paths[key].glob("*.png"):
            old.unlink()
    total = domain.train_images + domain.val_images
    log(f"building the synthetic domain in {folder}: a {domain.size}-px random generator and {total} images")
    generator = make_generator(tiny_generator_config(domain.size, domain.narrow, domain.style_dim), domain.seed)
    generator = generator.to(device)
    latent_avg = estimate_latent_avg(generator, 100_000, seed=domain.seed).to(device)
    calibrate_(generator, latent_avg, domain.truncation, seed=domain.seed)
    torch.save({"g_ema": {k: v.cpu() for k, v in generator.state_dict().items()}, "latent_avg": latent_avg[0].cpu()},
               paths["generator"])
    bases = _offset_bases(generator, layers, domain.offset_rank, domain.seed)
    val_w, val_a = [], []
    with ThreadPoolExecutor(8) as pool, tqdm(total=total, desc="synthetic domain", unit="img", dynamic_ncols=True,
                                             mininterval=1.0) as bar:
        jobs = []
        for split, n, seed in (("train", domain.train_images, domain.seed + 1), ("val", domain.val_images, domain.seed + 2)):
            index = 0
            for pixels, w, a in _render(generator, latent_avg, bases, domain, n, seed, device):
                jobs += _write_pngs(paths[split], index, pixels, pool)
                index += len(pixels)
                bar.update(len(pixels))
                if split == "val":
                    val_w.append(w)
                    val_a.append(a)
        for job in jobs:
            job.result()
    torch.save({"w": torch.cat(val_w), "coefficients": torch.cat(val_a)}, paths["val_codes"])
    paths["info"].write_text(json.dumps({"domain": asdict(domain), "layers": list(layers)}, indent=1))
    log(f"synthetic domain: {domain.size}-px random generator, {domain.train_images} training and "
        f"{domain.val_images} validation images with offsets on layers {list(layers)} in {folder}")
    return paths


@torch.no_grad()
def evaluate(hyperstyle_ckpt, w_encoder_ckpt, paths: dict, n_iters: int, out_dir, device="cpu", grid_rows=6) -> dict:
    """Held-out L2 through the inference path (load_hyperstyle + invert): W-encoder alone vs HyperStyle."""
    from torchvision.utils import save_image

    from .. import load_hyperstyle
    from ..engines.hyperstyle.model import pool_to
    from .data import find_images, load_image

    model = load_hyperstyle(hyperstyle_ckpt, w_encoder=w_encoder_ckpt, device=device)
    files = find_images(paths["val"])
    sums = {"w_encoder": 0.0, "hyperstyle": 0.0, "w_oracle": 0.0}
    per_pass = [0.0] * (n_iters + 1)
    truth = torch.load(paths["val_codes"], weights_only=True)
    grid = None
    for start in tqdm(range(0, len(files), 32), desc="held-out check", unit="batch", dynamic_ncols=True, leave=False):
        images = torch.stack([load_image(f) for f in files[start:start + 32]]).to(device)
        target = images * 2 - 1
        try:
            inv = model.invert(images, n_iters=n_iters)
        except RuntimeError as err:  # the inference fast path (CUDA graphs) failed: measure with plain PyTorch
            if not getattr(model, "cuda_graphs", False):
                raise
            print(f"warning: invert with CUDA graphs failed ({err}); evaluating without them", flush=True)
            model.cuda_graphs = False
            inv = model.invert(images, n_iters=n_iters)
        w_only = model.decode(inv.codes) * 2 - 1
        final = inv.images * 2 - 1
        # the best any W code can do here is at most the true w without the offsets
        oracle = model.decode(truth["w"][start:start + 32].to(device)[:, None].expand(-1, model.n_styles, -1)) * 2 - 1
        n = images.shape[0]
        sums["w_encoder"] += torch.mean((w_only - target) ** 2).item() * n
        sums["hyperstyle"] += torch.mean((final - target) ** 2).item() * n
        sums["w_oracle"] += torch.mean((oracle - target) ** 2).item() * n
        target256 = pool_to(images)
        for t, step in enumerate(inv.steps):
            per_pass[t] += torch.mean((step * 2 - 1 - (target256 * 2 - 1)) ** 2).item() * n
        if grid is None:
            rows = min(grid_rows, n)
            grid = [target256[:rows]] + [s[:rows] for s in inv.steps]
    count = len(files)
    result = {f"l2_{k}": v / count for k, v in sums.items()}
    result["l2_per_pass_at_256"] = [v / count for v in per_pass]
    result["improvement"] = 1 - result["l2_hyperstyle"] / result["l2_w_encoder"]
    result["val_images"] = count
    if grid is not None:
        cells = torch.stack([col[i] for i in range(grid[0].shape[0]) for col in grid]).cpu()
        path = Path(out_dir) / "selfcheck_grid.png"
        save_image(cells, path, nrow=len(grid), padding=2, pad_value=1.0)
        result["grid"] = str(path)
    return result


def describe_result(result: dict, n_iters: int) -> str:
    """The self-check's summary line, worded by the sign of the change (never "-45% lower")."""
    before, after = result["l2_w_encoder"], result["l2_hyperstyle"]
    change = 100 * abs(result["improvement"])
    head = (f"self-check on {result['val_images']} held-out images: L2 W-encoder alone {before:.4f}, HyperStyle "
            f"after {n_iters} passes {after:.4f}")
    if after < before:
        verdict = f"{change:.1f}% lower: the hypernetwork's offsets recover detail the W code misses"
    elif after > before:
        verdict = (f"{change:.1f}% HIGHER: the refinement made the reconstructions worse, i.e. the hypernetwork "
                   "has not learned enough yet (train longer: --hypernet-minutes / --hypernet-steps)")
    else:
        verdict = "no change: the refinement did nothing"
    return f"{head} ({verdict}; a W code without the offsets: {result['l2_w_oracle']:.4f})."
