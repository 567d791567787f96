"""The two training stages: what one step computes, what validation measures, what a checkpoint holds.

encoder   codes = latent_avg + E(x); y = G(codes)                 trains the W-encoder E (G frozen)
hypernet  codes = latent_avg + E(x) (E frozen); y_0 = G(codes); then T passes of HyperStyleModel.refine_step,
          each with its own loss and backward, offsets and reconstruction detached between passes (the official
          coach); trains the hypernetwork (G and E frozen)
Both use HyperStyleModel's building blocks, so training runs exactly the code inference runs.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..engines.hyperstyle.model import HyperStyleModel, pool_to
from .dist import DistInfo
from .losses import ReconstructionLoss


def _ddp(module: nn.Module, info: DistInfo) -> nn.Module:
    if not info.distributed:
        return module
    return DistributedDataParallel(module, device_ids=[info.device.index] if info.device.type == "cuda" else None)


class Stage:
    name = ""

    def __init__(self, info: DistInfo, losses: ReconstructionLoss, bf16: bool):
        self.info, self.losses, self.bf16 = info, losses.to(info.device), bf16

    def autocast(self):
        return torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @property
    def trainable(self) -> nn.Module:
        raise NotImplementedError

    def parameters(self):
        return [p for p in self.trainable.parameters() if p.requires_grad]


class EncoderStage(Stage):
    name = "encoder"

    def __init__(self, generator, encoder, latent_avg, losses, info: DistInfo, bf16=False, w_norm_lambda=0.0,
                 opts: Optional[dict] = None):
        super().__init__(info, losses, bf16)
        self.encoder = encoder.to(info.device)
        self.generator = generator.to(info.device).eval()
        self.w_norm_lambda = w_norm_lambda
        self.opts = opts or {}
        # the same codes as inference: encode_normalized = encoder(x) + latent_avg
        self.model = HyperStyleModel(self.generator, None, latent_avg, encoder=_ddp(self.encoder, info)).to(info.device)
        self.eval_model = HyperStyleModel(self.generator, None, latent_avg, encoder=self.encoder).to(info.device)

    @property
    def trainable(self):
        return self.encoder

    def set_train(self, mode: bool):
        self.encoder.train(mode)

    def _forward(self, model, x, y):
        with self.autocast():
            codes = model.encode_normalized(x)
            out = model.synthesize(codes)
        loss, metrics = self.losses(out, y)
        if self.w_norm_lambda > 0:  # pSp's W-norm: keep codes near latent_avg
            w_norm = (codes.float() - model.encoder_latent_avg).flatten(1).norm(dim=1).mean()
            loss = loss + self.w_norm_lambda * w_norm
            metrics.update(w_norm=w_norm.detach(), loss=loss.detach())
        return loss, metrics, out, codes

    def train_step(self, x, y, want_images=False):
        loss, metrics, out, _ = self._forward(self.model, x, y)
        loss.backward()
        return metrics, ([x, pool_to(out.detach().float())] if want_images else None)

    @torch.no_grad()
    def evaluate(self, x, y):
        _, metrics, out, _ = self._forward(self.eval_model, x, y)
        return metrics, [x, pool_to(out.float())]

    def payload(self) -> dict:
        from .checkpoint import prefixed

        return {"state_dict": {**prefixed("encoder", self.encoder), **prefixed("decoder", self.generator)},
                "opts": dict(self.opts), "latent_avg": self.eval_model.latent_avg.detach().cpu().clone()}

    def load_trainable(self, state_dict: dict) -> None:
        from .checkpoint import unprefixed

        self.encoder.load_state_dict(unprefixed(state_dict, "encoder"), strict=True)


class HypernetStage(Stage):
    name = "hypernet"

    def __init__(self, generator, encoder, hypernet, latent_avg, losses, info: DistInfo, n_iters=5, bf16=False,
                 opts: Optional[dict] = None):
        super().__init__(info, losses, bf16)
        self.generator = generator.to(info.device).eval()
        self.encoder = encoder.to(info.device).eval()
        self.hypernet = hypernet.to(info.device)
        if info.distributed and info.device.type == "cuda":
            # the hypernetwork runs channels-last on CUDA; DDP's gradient buckets must have that layout too
            self.hypernet.to(memory_format=torch.channels_last)
        self.n_iters = n_iters
        self.opts = opts or {}
        self.ddp_hypernet = _ddp(self.hypernet, info)
        self.model = HyperStyleModel(self.generator, self.ddp_hypernet, latent_avg, self.encoder).to(info.device)
        self.eval_model = HyperStyleModel(self.generator, self.hypernet, latent_avg, self.encoder).to(info.device)

    @property
    def trainable(self):
        return self.hypernet

    def set_train(self, mode: bool):
        self.hypernet.train(mode)  # the encoder (BatchNorm) and generator stay in eval mode

    @torch.no_grad()
    def _initial(self, model, x):
        with self.autocast():
            codes = model.encode_normalized(x)
            return codes, model.synthesize(codes).float()

    def _passes(self, model, x, y, train: bool, want_images: bool):
        codes, initial = self._initial(model, x)
        y_hat = pool_to(initial)
        metrics = {"l2_initial": torch.nn.functional.mse_loss(pool_to(initial, y.shape[-1]), y.float())}
        columns = [x, y_hat] if want_images else None
        deltas = None
        for t in range(self.n_iters):
            last = t == self.n_iters - 1
            # gradients from every pass add up locally; DDP all-reduces them once, with the last backward
            sync = self.ddp_hypernet.no_sync() if train and not last and self.info.distributed else contextlib.nullcontext()
            with sync:
                with self.autocast():
                    deltas, out = model.refine_step(x, y_hat, codes, deltas)
                loss, terms = self.losses(out, y)
                if train:
                    loss.backward()
            # the next pass starts from this one's offsets and reconstruction, detached (the official coach)
            deltas = [None if d is None else d.detach().float() for d in deltas]  # accumulate in fp32 under bf16
            y_hat = pool_to(out.detach().float())
            metrics[f"l2_pass{t + 1}"] = terms["l2"]
            if want_images:
                columns.append(y_hat)
        metrics.update(terms)  # loss, l2, lpips, ... after the last pass
        return metrics, columns

    def train_step(self, x, y, want_images=False):
        return self._passes(self.model, x, y, train=True, want_images=want_images)

    @torch.no_grad()
    def evaluate(self, x, y):
        return self._passes(self.eval_model, x, y, train=False, want_images=True)

    def payload(self) -> dict:
        from .checkpoint import prefixed

        return {"state_dict": {**prefixed("hypernet", self.hypernet), **prefixed("decoder", self.generator)},
                "opts": dict(self.opts), "latent_avg": self.eval_model.latent_avg.detach().cpu().clone()}

    def load_trainable(self, state_dict: dict) -> None:
        from .checkpoint import unprefixed

        self.hypernet.load_state_dict(unprefixed(state_dict, "hypernet"), strict=True)
