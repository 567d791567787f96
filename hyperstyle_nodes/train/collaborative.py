"""Collaborative training of the W-encoder (Guan et al., "Collaborative Learning for Faster StyleGAN Embedding",
2020): each batch, the iterator (hyperstyle_nodes/engines/hyperstyle/optimize.py) refines the encoder's codes for a
few steps; a cache keeps every training image's best code so far (replaced only by one with a lower loss); the
encoder learns from the image losses plus a latent loss towards the cached codes:
    loss = image losses(G(E(x)), x) + latent_lambda * |E(x) - cache[x]|^2
iterator_start "encoder" (the paper's) starts the iterator from the encoder's code each time; "cache" starts it
from the image's cached code when that reconstructs the image better than the encoder's, so an image's code keeps
improving each epoch it comes back (its refinement accumulates over epochs instead of restarting).
The checkpoints are the encoder stage's (released W-encoder format); only training differs.

Images are identified by a hash of their target pixels, so the cache needs nothing from the data loader (a flipped
image is another image with its own code). Under torchrun every process gathers all processes' candidates each
step, so every cache holds the same codes. The cache lives for one run (a resumed run starts it afresh).
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from ..engines.hyperstyle.model import pool_to
from ..engines.hyperstyle.optimize import descend
from .dist import DistInfo
from .stages import EncoderStage


def image_keys(images: torch.Tensor) -> torch.Tensor:
    """A 64-bit key per image [B, ...] from its exact values (int64 on the images' device)."""
    arrays = images.detach().float().cpu().numpy()
    keys = [int.from_bytes(hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=8).digest(), "little",
                           signed=True) for a in arrays]
    return torch.tensor(keys, dtype=torch.int64, device=images.device)


class CodeCache:
    """The best code so far per image key, with its loss; grows as new images arrive."""

    def __init__(self, dim: int, device):
        self.rows: dict = {}
        self.codes = torch.zeros(0, dim, device=device)
        self.losses = torch.zeros(0, device=device)

    def __len__(self):
        return len(self.rows)

    def offer(self, keys: torch.Tensor, codes: torch.Tensor, losses: torch.Tensor) -> int:
        """Keep each candidate whose image is new or whose loss beats the cached one; returns how many were kept."""
        kept = 0
        for key, code, loss in zip(keys.tolist(), codes.detach().float(), losses.detach().float()):
            row = self.rows.get(key)
            if row is None:
                row = self.rows[key] = len(self.rows)
                if row >= self.codes.shape[0]:  # grow by doubling
                    grow = max(64, self.codes.shape[0])
                    self.codes = torch.cat([self.codes, self.codes.new_zeros(grow, self.codes.shape[1])])
                    self.losses = torch.cat([self.losses, self.losses.new_full((grow,), float("inf"))])
            if loss < self.losses[row]:
                self.codes[row], self.losses[row] = code, loss
                kept += 1
        return kept

    def find(self, keys: torch.Tensor) -> tuple:
        """(known [B] bool, codes [B, D], losses [B]) for images that may not have been offered yet (then inf)."""
        rows = [self.rows.get(k, -1) for k in keys.tolist()]
        known = torch.tensor([r >= 0 for r in rows], device=self.codes.device)
        index = torch.tensor([max(r, 0) for r in rows], device=self.codes.device)
        if self.codes.shape[0] == 0:
            return known, self.codes.new_zeros(len(rows), self.codes.shape[1]), self.losses.new_full((len(rows),),
                                                                                                    float("inf"))
        losses = torch.where(known, self.losses[index], torch.full_like(self.losses[index], float("inf")))
        return known, self.codes[index], losses

    def lookup(self, keys: torch.Tensor) -> tuple:
        """(codes [B, D], losses [B]) of the given images, which must have been offered."""
        rows = torch.tensor([self.rows[k] for k in keys.tolist()], device=self.codes.device)
        return self.codes[rows], self.losses[rows]


def _gather(info: DistInfo, *tensors):
    if not info.distributed:
        return tensors
    import torch.distributed as dist

    gathered = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(info.world_size)]
        dist.all_gather(parts, t.contiguous())
        gathered.append(torch.cat(parts))
    return gathered


ITERATOR_STARTS = ("encoder", "cache")


class CollaborativeEncoderStage(EncoderStage):
    """The encoder stage with the iterator and the code cache in its training step; validation, checkpoints and
    resume are the encoder stage's."""

    def __init__(self, *args, iterator_steps: int = 5, iterator_lr: float = 0.01, latent_lambda: float = 1.0,
                 iterator_start: str = "encoder", **kwargs):
        super().__init__(*args, **kwargs)
        if iterator_steps < 1:
            raise ValueError(f"--iterator-steps must be >= 1 with --collaborative, got {iterator_steps}")
        if iterator_start not in ITERATOR_STARTS:
            raise ValueError(f"--iterator-start must be one of {', '.join(ITERATOR_STARTS)}, got {iterator_start!r}")
        self.iterator_steps, self.iterator_lr, self.latent_lambda = iterator_steps, iterator_lr, latent_lambda
        self.iterator_start = iterator_start
        self.cache = CodeCache(self.generator.style_dim, self.info.device)

    @torch.no_grad()
    def _per_image_losses(self, codes, y) -> torch.Tensor:
        out = self.generator(codes)
        return torch.stack([self.losses(out[i:i + 1], y[i:i + 1])[0] for i in range(y.shape[0])])

    def train_step(self, x, y, want_images=False):
        loss, metrics, out, codes = self._forward(self.model, x, y)
        w = codes[:, 0].float()  # a W-encoder: one code per image (repeated over the styles)
        keys = image_keys(y)
        start = w.detach()
        if self.iterator_start == "cache":  # continue from the cached code where it beats the encoder's
            known, cached, cached_losses = self.cache.find(keys)
            if bool(known.any()):
                with torch.no_grad():
                    mine = torch.stack([self.losses(out[i:i + 1].float(), y[i:i + 1].float())[0]
                                        for i in range(y.shape[0])])
                start = torch.where((cached_losses < mine)[:, None], cached, start)
        refined, _ = descend(self.generator, y.float(), start, None, self.losses, self.iterator_steps,
                             self.iterator_lr)
        all_keys, all_codes, all_losses = _gather(self.info, keys, refined, self._per_image_losses(refined, y.float()))
        kept = self.cache.offer(all_keys, all_codes, all_losses)
        target, target_losses = self.cache.lookup(keys)
        latent = F.mse_loss(w, target)
        loss = loss + self.latent_lambda * latent
        loss.backward()
        device = self.info.device
        metrics.update(latent=latent.detach(), loss=loss.detach(), cache_loss=target_losses.mean(),
                       cache_kept=torch.tensor(kept / all_keys.shape[0], device=device),
                       cache_images=torch.tensor(float(len(self.cache)), device=device))
        if not want_images:
            return metrics, None
        with torch.no_grad():  # input, the encoder's reconstruction, the cached code's
            return metrics, [x, pool_to(out.detach().float()), pool_to(self.generator(target).float())]
