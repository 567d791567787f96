"""The iterator (HyperStyle Optimize) on the trainer's synthetic domain: quality after N steps from three starts,
and its speed.

Quality: with a self-check run (`python -m hyperstyle_nodes.train --synthetic --out RUN`), its W-encoder and
hypernetwork, on its held-out images, reconstruction L2 (images in [-1, 1], at the loss size) and LPIPS after
0, 10, 50, 200 steps, starting from
    (a) the average latent            latent_avg for every image, no offsets
    (b) the encoder's codes           model.encode, no offsets
    (c) encoder + HyperStyle offsets  model.invert(n_iters): its codes and offsets
and optimising, for every start alike (--optimize):
    codes            the W+ codes only; (c)'s offsets stay as HyperStyle predicted them
    codes+offsets    the codes and the offsets of the hypernetwork's tuned layers: (c) starts them at HyperStyle's
                     prediction, (a) and (b) at zero (no offsets), so every start has the same parameters
Every start gets the same steps, learning rate and schedule (--lr, --schedule: the library's default). The row for
N steps is the result of `model.optimize(..., steps=N)` (a separate run per N: the learning-rate ramp-down scales with
the run's length). LPIPS is reported only when its networks are at hand (`lpips` package + AlexNet weights,
--lpips-weights or the models folder); the iterator's own loss is L2 unless --lpips-lambda is given.
A last line per --optimize ("kind": "verdict") says whether (b) and (c) are below (a) at every step count.

Speed (--speed): Adam steps per second of the iterator alone (generator forward + backward, fp32) on a random
generator of the released shapes, at --speed-size px and batch 1.

    python benchmarks/bench_optimize.py --run runs/selfcheck                  # quality table, CPU or GPU
    python benchmarks/bench_optimize.py --speed --speed-size 1024 --device cuda
Prints one JSON line per measurement (also appended to --out).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hyperstyle_nodes import load_hyperstyle  # noqa: E402
from hyperstyle_nodes.engines.hyperstyle.model import HYPERNET_INPUT_SIZE, pool_to  # noqa: E402
from hyperstyle_nodes.engines.hyperstyle.optimize import (DEFAULT_LR, DEFAULT_SCHEDULE, SCHEDULES,  # noqa: E402
                                                          descend, image_losses)
from hyperstyle_nodes.stylegan2.generator import Generator, GeneratorConfig  # noqa: E402
from hyperstyle_nodes.train.data import find_images, load_image  # noqa: E402


def emit(row: dict, out) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def lpips_metric(weights):
    """LPIPS (AlexNet) as a metric, or None with the reason when its networks are not at hand."""
    from hyperstyle_nodes.train.losses import LossWeightsError, build_lpips

    try:
        return build_lpips(weights), None
    except LossWeightsError as err:
        return None, str(err).splitlines()[0]


STARTS = ("a_average_latent", "b_encoder", "c_encoder_hyperstyle")
MODES = ("codes", "codes+offsets")


def quality(args) -> None:
    run = Path(args.run)
    device = torch.device(args.device)
    model = load_hyperstyle(run / "hypernet/checkpoints/best_model.pt",
                            w_encoder=run / "encoder/checkpoints/best_model.pt", device=device)
    model.cuda_graphs = False
    files = find_images(run / "domain/val")[:args.images]
    images = torch.stack([load_image(f) for f in files]).to(device)
    size = min(model.resolution, HYPERNET_INPUT_SIZE)
    target = pool_to(model.preprocess(images).float(), size)
    lpips_net, why_not = lpips_metric(args.lpips_weights)
    if lpips_net is not None:
        lpips_net = lpips_net.to(device)
    losses = image_losses(1.0, args.lpips_lambda, 0.0, {"lpips": args.lpips_weights} if args.lpips_weights else None)
    losses = losses.to(device)
    with torch.no_grad():
        encoder_codes = model.encode(images)
        refined = model.invert(images, n_iters=args.n_iters, codes=encoder_codes, keep_steps=False)
    starts = {"a_average_latent": (model.latent_avg[None].expand(len(files), -1, -1).clone(), None),
              "b_encoder": (encoder_codes, None),
              "c_encoder_hyperstyle": (refined.codes, refined.deltas)}

    def measure(inv_images):
        with torch.no_grad():
            y = pool_to(inv_images.float(), size) * 2 - 1
            row = {"l2": torch.mean((y - target) ** 2).item()}
            if lpips_net is not None:
                row["lpips"] = lpips_net(y, target).mean().item()
        return row

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    table = {}
    for mode in args.optimize:
        for name in STARTS:
            codes, deltas = starts[name]
            for k in sorted(set(args.steps)):
                sync()
                t0 = time.perf_counter()
                inv = model.optimize(images, codes, deltas, steps=k, lr=args.lr, schedule=args.schedule,
                                     optimize_deltas=mode == "codes+offsets", losses=losses)
                sync()
                seconds = time.perf_counter() - t0
                row = measure(inv.images)
                table[(mode, name, k)] = row["l2"]
                offsets = ("none" if deltas is None and mode == "codes" else
                           "zero, optimised" if deltas is None else
                           "HyperStyle's, " + ("fixed" if mode == "codes" else "optimised"))
                emit({"kind": "quality", "start": name, "optimize": mode, "offsets": offsets, "steps": k, **row,
                      "lpips_note": None if lpips_net is not None else f"not measured: {why_not}",
                      "images": len(files), "lr": args.lr, "schedule": args.schedule,
                      "lpips_lambda": args.lpips_lambda, "device": str(device), "seconds": seconds,
                      "steps_per_second_batch": k / seconds if k else None}, args.out)
        below = {other: all(table[(mode, other, k)] < table[(mode, "a_average_latent", k)] for k in args.steps)
                 for other in STARTS[1:]}
        emit({"kind": "verdict", "optimize": mode, "steps": sorted(set(args.steps)),
              "b_below_a_at_every_step_count": below["b_encoder"],
              "c_below_a_at_every_step_count": below["c_encoder_hyperstyle"],
              "l2": {name: [table[(mode, name, k)] for k in sorted(set(args.steps))] for name in STARTS}}, args.out)


def speed(args) -> None:
    device = torch.device(args.device)
    torch.manual_seed(0)
    generator = Generator(GeneratorConfig.stylegan2(args.speed_size)).to(device).eval()
    for p in generator.parameters():
        p.requires_grad_(False)
    codes = generator.mean_latent(1000)[None].expand(args.speed_batch, generator.n_styles, -1).clone()
    target = torch.rand(args.speed_batch, 3, min(args.speed_size, 256), min(args.speed_size, 256), device=device) * 2 - 1
    losses = image_losses(1.0, 0.0, 0.0).to(device)
    descend(generator, target, codes, None, losses, args.speed_warmup, args.lr)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    descend(generator, target, codes, None, losses, args.speed_steps, args.lr)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    emit({"kind": "speed", "size": args.speed_size, "batch": args.speed_batch, "steps": args.speed_steps,
          "steps_per_second": args.speed_steps / seconds, "device": str(device),
          "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
          "threads": torch.get_num_threads()}, args.out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a synthetic self-check run folder (domain/, encoder/, hypernet/)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=32, help="held-out images (one batch)")
    p.add_argument("--steps", type=lambda s: [int(v) for v in s.split(",")], default=[0, 10, 50, 200])
    p.add_argument("--lr", type=float, default=DEFAULT_LR)
    p.add_argument("--schedule", choices=SCHEDULES, default=DEFAULT_SCHEDULE, help="the learning rate over a run")
    p.add_argument("--optimize", type=lambda s: [m for m in s.split(",") if m], default=list(MODES),
                   help="what every start optimises: codes, codes+offsets, or both comma-separated")
    p.add_argument("--n-iters", type=int, default=5, help="HyperStyle passes for start (c)")
    p.add_argument("--lpips-lambda", type=float, default=0.0, help="the iterator's LPIPS weight (default: L2 only)")
    p.add_argument("--lpips-weights", default=None, help="AlexNet weights for LPIPS (default: the models folder)")
    p.add_argument("--speed", action="store_true", help="measure steps/second on the released shapes")
    p.add_argument("--speed-size", type=int, default=1024)
    p.add_argument("--speed-batch", type=int, default=1)
    p.add_argument("--speed-steps", type=int, default=20)
    p.add_argument("--speed-warmup", type=int, default=3)
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = p.parse_args(argv)
    bad = [m for m in args.optimize if m not in MODES]
    if bad or not args.optimize:
        p.error(f"--optimize takes {' or '.join(MODES)} (comma-separated), got {','.join(args.optimize) or 'nothing'}")
    if not args.run and not args.speed:
        p.error("pass --run RUN (quality) and/or --speed")
    if args.run:
        quality(args)
    if args.speed:
        speed(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
