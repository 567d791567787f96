"""The iterator of Guan et al., "Collaborative Learning for Faster StyleGAN Embedding" (2020): gradient descent on
an inversion's W+ codes (and, optionally, its HyperStyle weight offsets) against the target image.

    start   codes from the encoder (or any inversion), offsets from HyperStyle refinement if given
    repeat  y = G(codes, offsets); loss = mse * L2(y, x) + lpips * LPIPS(y, x) + id * ID(y, x); Adam step
The learning rate follows `schedule`: "constant" (default) keeps it; "rampdown" holds it for the first 75% of the
steps and lowers it to 0 along a half cosine over the last 25% (the StyleGAN2 projector's ramp-down, without its
warm-up: the start is already a good code). Measured on the trainer's synthetic domain (benchmarks/bench_optimize.py,
L2, lr 0.01), rampdown ended 5-14% above constant after 200 steps from every start: the constant rate was still
making progress, not jittering around an optimum. With rampdown, the result after N steps is what a run of N steps
returns (the ramp scales with N).
The losses are the trainer's (`train/losses.py`: the same networks, weights from the registry / models folder, never
an implicit download) compared at min(resolution, 256) px like training. The result is an `Inversion`, so every
edit node takes it. Runs in fp32 with autograd through the generator's eager path (the CUDA graphs are for
inference), and works inside ComfyUI's `torch.inference_mode()` by using its own copies of inference tensors.
"""
from __future__ import annotations

import copy
import functools
import math
from typing import Callable, Optional

import torch

from .model import HYPERNET_INPUT_SIZE, Inversion, _match_batch, pool_to, to_unit_range

DEFAULT_STEPS = 100
DEFAULT_LR = 0.01  # Adam on W+ codes (values of order 1): visible progress in 10s of steps without overshooting
SCHEDULES = ("constant", "rampdown")
DEFAULT_SCHEDULE = "constant"
RAMPDOWN = 0.25  # the fraction of the steps over which "rampdown" lowers the learning rate to 0


def lr_factor(step: int, steps: int, schedule: str = DEFAULT_SCHEDULE) -> float:
    """The learning rate's multiplier for update `step` (0-based) of `steps` (taken at the update's middle, so the
    last update of a short run is smaller, never zero)."""
    if schedule == "constant":
        return 1.0
    ramp = min(1.0, (1.0 - (step + 0.5) / steps) / RAMPDOWN)
    return 0.5 - 0.5 * math.cos(math.pi * ramp)


def _check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")


def image_losses(mse: float = 1.0, lpips: float = 0.0, id: float = 0.0, weights: Optional[dict] = None):
    """The trainer's ReconstructionLoss with these weights (cached: the LPIPS / ArcFace networks load once).
    weights: {'lpips': path, 'id': path} to use instead of the models folder / registry."""
    key = tuple(sorted((weights or {}).items()))
    return _cached_losses(float(mse), float(lpips), float(id), key)


@functools.lru_cache(maxsize=2)
def _cached_losses(mse: float, lpips: float, id: float, weights: tuple):
    from ...train.losses import LossWeightsError, ReconstructionLoss

    if min(mse, lpips, id) < 0:
        raise ValueError(f"loss weights must be >= 0, got mse {mse}, lpips {lpips}, id {id}")
    if mse == lpips == id == 0:
        raise ValueError("every loss weight is 0: nothing to optimise for; set mse (or lpips / id) above 0")
    try:
        with torch.inference_mode(False):  # networks built inside ComfyUI must still take part in autograd
            return ReconstructionLoss(l2_lambda=mse, lpips_lambda=lpips, id_lambda=id, weights=dict(weights))
    except LossWeightsError as err:
        raise LossWeightsError(f"{err}\nFor the iterator (HyperStyle Optimize, --optimize-steps) set the LPIPS / "
                               "identity weight to 0 to optimise without that loss.") from None


def _trainable_generator(generator: torch.nn.Module) -> torch.nn.Module:
    """The generator itself when autograd can run through it in fp32, else an fp32 copy (half-precision models;
    weights created under inference_mode, which autograd cannot save)."""
    tensors = list(generator.parameters()) + list(generator.buffers())
    if all(t.dtype == torch.float32 and not t.is_inference() for t in tensors):
        return generator
    clone = copy.deepcopy(generator).float()  # deepcopy outside inference mode gives ordinary tensors
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def optimize(model, images: torch.Tensor, codes: torch.Tensor, deltas: Optional[list] = None,
             steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR, mse: float = 1.0, lpips: float = 0.0,
             id: float = 0.0, optimize_deltas: bool = False, schedule: str = DEFAULT_SCHEDULE,
             on_step: Optional[Callable[[int, int, torch.Tensor], None]] = None,
             losses: Optional[torch.nn.Module] = None, weights: Optional[dict] = None) -> Inversion:
    """Refine an inversion of face-aligned images [B, 3, H, W] in [0, 1] for `steps` Adam steps.

    codes: [B or 1, n_styles, style_dim] starting codes (e.g. `model.encode(images)`); deltas: HyperStyle offsets to
    start from (kept fixed unless optimize_deltas; with optimize_deltas and no offsets, the hypernetwork's tuned
    layers start at zero). mse/lpips/id: loss weights. schedule: "constant" or "rampdown" (lr to 0 over the last
    quarter of the steps). on_step(done, total, current) after each step, `current`
    being the reconstruction [B, 3, s, s] in [0, 1] that step measured (for previews); it may raise to cancel.
    losses: a prebuilt loss module (y_hat, y) -> (loss, metrics) instead of `image_losses(mse, lpips, id)`.
    Each image is optimised independently of the others in the batch (per-image loss sum, per-element Adam).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if lr <= 0:
        raise ValueError(f"the learning rate must be > 0, got {lr}")
    _check_schedule(schedule)
    with torch.inference_mode(False), torch.enable_grad():
        target = model.preprocess(images).float().clone()  # [-1, 1] at 256, an ordinary tensor
        batch = target.shape[0]
        target = pool_to(target, min(model.resolution, HYPERNET_INPUT_SIZE))
        if losses is None:
            losses = image_losses(mse, lpips, id, weights)
        generator = _trainable_generator(model.generator)
        codes = _match_batch(codes, batch, "codes").to(model.device)
        offsets = _start_offsets(model, deltas, batch, optimize_deltas)
        codes, offsets = descend(generator, target, codes, offsets, losses.to(model.device), steps, lr,
                                 optimize_deltas, on_step, schedule)
        with torch.no_grad():
            final = generator(codes, offsets, noise_mode="const")
    return Inversion(codes=codes.to(model.dtype), images=to_unit_range(final),
                     deltas=list(offsets) if offsets is not None else [None] * model.generator.n_layers)


def descend(generator, target: torch.Tensor, codes: torch.Tensor, offsets: Optional[list], losses, steps: int,
            lr: float, optimize_deltas: bool = False, on_step: Optional[Callable] = None,
            schedule: str = DEFAULT_SCHEDULE) -> tuple:
    """The iteration itself, shared by `optimize` and collaborative training: Adam on fp32 copies of `codes`
    (W+ [B, n_styles, D], or W [B, D] for one code per image) and, with optimize_deltas, of `offsets`, against
    `target` [B, 3, s, s] in [-1, 1], the learning rate following `schedule` over the `steps`. Returns the detached
    (codes, offsets)."""
    _check_schedule(schedule)
    batch, size = target.shape[0], target.shape[-1]
    w = codes.detach().float().clone().requires_grad_(True)
    params = [w] + ([d for d in offsets if d is not None] if optimize_deltas else [])
    adam = torch.optim.Adam(params, lr=lr)
    for step in range(steps):
        with torch.enable_grad():
            y = generator(w, offsets, noise_mode="const")
            loss, _ = losses(y, target)
            # the sum over images (the loss is a batch mean): every image's gradient is its own loss's gradient.
            # autograd.grad, not backward: no gradients for the generator's or the loss networks' weights
            grads = torch.autograd.grad(loss * batch, params)
        for p, g in zip(params, grads):
            p.grad = g
        for group in adam.param_groups:
            group["lr"] = lr * lr_factor(step, steps, schedule)
        adam.step()
        if on_step is not None:
            on_step(step + 1, steps, to_unit_range(pool_to(y.detach(), size)))
    return w.detach(), None if offsets is None else [None if d is None else d.detach() for d in offsets]


def _start_offsets(model, deltas: Optional[list], batch: int, trainable: bool) -> Optional[list]:
    """fp32 per-image copies of the starting offsets (zeros on the tuned layers when optimising without any)."""
    n_layers = model.generator.n_layers
    if deltas is not None and len(deltas) != n_layers:
        raise ValueError(f"offsets have {len(deltas)} layers, this model has {n_layers}")
    if deltas is None and not trainable:
        return None
    start = list(deltas) if deltas is not None else [None] * n_layers
    if trainable and all(d is None for d in start):
        if getattr(model, "hypernet", None) is None:
            raise ValueError("optimising offsets needs starting offsets or a model with a hypernetwork (which "
                             "layers to tune)")
        shapes = model.hypernet.offset_shapes(batch)
        start = [torch.zeros(shapes[i]) if i in shapes else None for i in range(n_layers)]
    out = []
    for d in start:
        if d is not None:
            d = _match_batch(d, batch, "offsets").detach().to(model.device, torch.float32).clone()
            d.requires_grad_(trainable)
        out.append(d)
    return out
