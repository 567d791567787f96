"""What every engine's model exposes the same way: size, style count, device and precision read off its generator
and `latent_avg` buffer (so they follow `.to()` and ComfyUI's ModelPatcher without bookkeeping)."""
from __future__ import annotations

from typing import Optional

import torch


def broadcast_batch(t: torch.Tensor, batch: int) -> Optional[torch.Tensor]:
    """t itself if it has `batch` rows, a view repeating its single row `batch` times, else None (each caller says
    in its own words what did not match)."""
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    return None


def generator_bytes_per_image(generator) -> int:
    """Rough peak memory of one image's generator pass: a few of its largest activations and the per-sample
    weights (fp32). Engines add their encoders' share; the sum sizes chunks and first-call memory caps."""
    size = torch.finfo(generator.input.input.dtype).bits // 8
    config = generator.config
    largest = max(c * (4 << i) ** 2 for i, c in enumerate(config.channels))
    weights = sum(k * k * c_in * c_out for k, c_in, c_out in config.layer_shapes)
    return 5 * largest * size + 3 * 4 * weights


class GeneratorModel:
    """Mixin for an nn.Module with a `generator` (stylegan2.Generator) and a `latent_avg` buffer."""

    @property
    def resolution(self) -> int:
        return self.generator.size

    @property
    def n_styles(self) -> int:
        return self.generator.n_styles

    @property
    def device(self) -> torch.device:
        return self.latent_avg.device

    @device.setter
    def device(self, _value) -> None:
        """ComfyUI's ModelPatcher assigns `model.device` after moving the weights; we read it off the weights."""

    @property
    def dtype(self) -> torch.dtype:
        return self.generator.input.input.dtype

    def channels_last_(self):
        """Channels-last convolution weights in `encoder_parts()`: the layout cuDNN's fastest kernels use (the
        generator packs its activations the same way). Same results up to rounding. Engines mix in
        cuda_graphs.GraphedInference too: recorded graphs read the old weights, so they are dropped."""
        for part in self.encoder_parts():
            if part is not None:
                part.to(memory_format=torch.channels_last)
        self._forget_graphs()
        return self

