"""Command line of `python -m hyperstyle_nodes.train` (also under `torchrun --nproc_per_node=N`).

    encoder    train a W-encoder for a StyleGAN2 generator (needed when the domain has none)
    hypernet   train the HyperStyle hypernetwork against a frozen generator and W-encoder
    synthetic  self-check: build a random domain and run both stages on it (also: --synthetic)
"""
from __future__ import annotations

import argparse
import sys

from ..loaders.checkpoints import CheckpointError
from ..loaders.downloads import WeightsError
from .data import DataError
from .losses import LossWeightsError
from .models import SetupError

EPILOG = """examples:
  python -m hyperstyle_nodes.train encoder --generator stylegan2-cars.pt --data cars/ --domain other --out runs/cars_enc
  python -m hyperstyle_nodes.train hypernet --w-encoder runs/cars_enc/checkpoints/best_model.pt --data cars/ \\
      --domain other --out runs/cars_hyper
  torchrun --nproc_per_node=4 -m hyperstyle_nodes.train hypernet ...     (data-parallel, same options)
  python -m hyperstyle_nodes.train --synthetic --out runs/selfcheck        (no data needed)
See docs/training.md for the full recipe."""


# The synthetic self-check's size: on a GPU the full architectures (a few minutes on one H200); on CPU the micro
# ones, small enough to finish in about 10 minutes on 2 cores, domain included. Options left out take these.
SELFCHECK_DEFAULTS = {
    "gpu": dict(arch="full", size=128, train_images=8000, val_images=256, encoder_minutes=3.0, hypernet_minutes=6.0,
                lr=1e-4, val_batches=0, log_interval=50),
    # a few dozen steps on CPU: a faster rate, or they would not show learning; the stages validate on 2 batches
    # (5 passes over all 64 images took longer than the budget), the final check uses all held-out images
    "cpu": dict(arch="micro", size=64, train_images=512, val_images=64, encoder_minutes=1.5, hypernet_minutes=5.0,
                lr=1e-3, val_batches=2, log_interval=10),
}


def _selfcheck_default(key: str) -> str:
    return f"default {SELFCHECK_DEFAULTS['gpu'][key]} on a GPU, {SELFCHECK_DEFAULTS['cpu'][key]} on CPU"


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except None: the help text says what happens then (e.g. per device)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def apply_selfcheck_defaults(args, device) -> None:
    """Fill the self-check options left out with the defaults for this device."""
    for key, value in SELFCHECK_DEFAULTS["gpu" if device.type == "cuda" else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def _training_options(p: argparse.ArgumentParser, batch_size=8, val_interval=5000) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", help="one image folder, split into train/val by --val-split")
    g.add_argument("--train-dir", help="training images (with --val-dir instead of --data)")
    g.add_argument("--val-dir", help="validation images")
    g.add_argument("--val-split", type=float, default=0.05,
                   help="with --data: fraction (or, if >= 1, number) of images held out (default 0.05)")
    g.add_argument("--no-flip", action="store_true", help="no random horizontal flips (default: flip, as official)")
    g.add_argument("--workers", type=int, default=None,
                   help="data loading processes per training process (default: up to 4, one CPU left per process)")

    g = p.add_argument_group("losses (lambda 0 switches a loss off)")
    g.add_argument("--domain", choices=["faces", "other", "synthetic"],
                   help="faces: identity loss (ArcFace, lambda 0.1); other: MoCo similarity (lambda 0.5)")
    g.add_argument("--l2-lambda", type=float, default=None, help="default 1")
    g.add_argument("--lpips-lambda", type=float, default=None, help="default 0.8 (AlexNet LPIPS, needs `lpips`)")
    g.add_argument("--id-lambda", type=float, default=None, help="default 0.1 for --domain faces, else 0")
    g.add_argument("--moco-lambda", type=float, default=None, help="default 0.5 for --domain other, else 0")
    g.add_argument("--lpips-weights", help="ImageNet AlexNet weights (default: alexnet-owt-7be5be79.pth via the models "
                                           "folder / registry)")
    g.add_argument("--id-weights", help="ArcFace IR-SE-50 weights (default: model_ir_se50.pth)")
    g.add_argument("--moco-weights", help="MoCo-v2 ResNet-50 weights (default: moco_v2_800ep_pretrain.pt)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=batch_size, help=f"per process (default {batch_size})")
    g.add_argument("--val-batch-size", type=int, default=None, help="default: --batch-size")
    g.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    g.add_argument("--max-steps", type=int, default=500_000, help="stop after this many steps in total")
    g.add_argument("--max-minutes", type=float, default=None, help="stop after this much training time")
    g.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast (GPUs since Ampere)")
    g.add_argument("--arch", choices=["full", "tiny", "micro"], default="full",
                   help="full: the released architectures; tiny/micro: narrow models for tests and self-checks")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (torchrun: one GPU per process)")
    g.add_argument("--no-tf32", action="store_true", help="keep fp32 matrix products exact on NVIDIA GPUs")
    g.add_argument("--latent-avg-samples", type=int, default=100_000,
                   help="mapping-network samples for latent_avg when the generator file has none")

    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="run folder: checkpoints/, logs/, images/")
    g.add_argument("--resume", help="a last.pt (or run folder) to continue from; 'auto': OUT's own, if any")
    g.add_argument("--log-interval", type=int, default=50)
    g.add_argument("--val-interval", type=int, default=val_interval)
    g.add_argument("--val-batches", type=int, default=150, help="validation batches per process (0: all)")
    g.add_argument("--image-interval", type=int, default=500, help="training image grids every N steps (0: never)")
    g.add_argument("--save-interval", type=int, default=2000, help="write checkpoints/last.pt every N steps")
    g.add_argument("--no-tensorboard", action="store_true")
    g.add_argument("--dump-rank-params", action="store_true", help=argparse.SUPPRESS)  # tests: DDP consistency


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hyperstyle_nodes.train", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("encoder", help="train a W-encoder (IR-SE-50 -> one W code, latent_avg + E(x))",
                       formatter_class=_HelpWithDefaults)
    p.add_argument("--generator", required=True,
                   help="StyleGAN2 generator: rosinality .pt (g_ema), our .safetensors, or a registry name")
    p.add_argument("--encoder-init", choices=["arcface", "none"], default=None,
                   help="start the IR-SE-50 from ArcFace weights (default for --arch full, as pSp/e4e) or at random")
    p.add_argument("--w-norm-lambda", type=float, default=0.0, help="pSp's W-norm regulariser")
    g = p.add_argument_group("collaborative learning (Guan et al. 2020)")
    g.add_argument("--collaborative", action="store_true",
                   help="each batch, the iterator refines the encoder's codes; the best code per training image is "
                        "cached and supervises the encoder through a latent loss (checkpoints unchanged)")
    g.add_argument("--iterator-steps", type=int, default=5, help="iterator steps per batch")
    g.add_argument("--iterator-lr", type=float, default=0.01, help="the iterator's Adam learning rate")
    g.add_argument("--latent-lambda", type=float, default=1.0, help="weight of the latent loss to the cached codes")
    g.add_argument("--iterator-start", choices=["encoder", "cache"], default="encoder",
                   help="encoder: the iterator starts from the encoder's code (the paper); cache: from the image's "
                        "cached code when that one is better, so its refinement accumulates over epochs")
    _training_options(p)

    p = sub.add_parser("hypernet", help="train the HyperStyle hypernetwork (generator and W-encoder frozen)",
                       formatter_class=_HelpWithDefaults)
    p.add_argument("--w-encoder", required=True, help="W-encoder checkpoint (from the encoder stage, or released)")
    p.add_argument("--generator", help="default: the generator saved inside the W-encoder checkpoint")
    p.add_argument("--n-iters", type=int, default=5, help="refinement passes per batch, a loss after each")
    p.add_argument("--layers-to-tune", default=None,
                   help="comma-separated generator layers (default: non-toRGB layers from 16 px up)")
    p.add_argument("--separable", action="store_true", help="SharedWeightsHyperNetResNetSeparable heads")
    _training_options(p)

    p = sub.add_parser("synthetic", help="self-check: random generator + offset targets, both stages, evaluation",
                       formatter_class=_HelpWithDefaults)
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=None, help="generator size; " + _selfcheck_default("size"))
    p.add_argument("--train-images", type=int, default=None, help=_selfcheck_default("train_images"))
    p.add_argument("--val-images", type=int, default=None, help=_selfcheck_default("val_images"))
    p.add_argument("--offset-strength", type=float, default=0.3, help="std of the per-image weight offsets")
    p.add_argument("--offset-rank", type=int, default=8, help="directions the offsets of an image combine")
    p.add_argument("--arch", choices=["full", "tiny", "micro"], default=None, help=_selfcheck_default("arch"))
    p.add_argument("--encoder-steps", type=int, default=100_000)
    p.add_argument("--hypernet-steps", type=int, default=100_000)
    p.add_argument("--encoder-minutes", type=float, default=None, help=_selfcheck_default("encoder_minutes"))
    p.add_argument("--hypernet-minutes", type=float, default=None, help=_selfcheck_default("hypernet_minutes"))
    p.add_argument("--n-iters", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=None, help=_selfcheck_default("lr"))
    p.add_argument("--workers", type=int, default=None, help="default: up to 4, one CPU left per process")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-interval", type=int, default=1000)
    p.add_argument("--val-batches", type=int, default=None,
                   help="batches of each stage's validations (0: all); " + _selfcheck_default("val_batches"))
    p.add_argument("--save-interval", type=int, default=2000)
    p.add_argument("--log-interval", type=int, default=None, help=_selfcheck_default("log_interval"))
    p.add_argument("--image-interval", type=int, default=500)
    p.add_argument("--require-improvement", type=float, default=None,
                   help="exit with status 1 unless HyperStyle's held-out L2 is this fraction below the W-encoder's")
    p.add_argument("--resume", action="store_true", help="continue both stages from OUT's last checkpoints")
    p.add_argument("--no-tensorboard", action="store_true")
    p.add_argument("--dump-rank-params", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--synthetic" in argv:  # `--synthetic` is the documented spelling of the synthetic subcommand
        argv.remove("--synthetic")
        argv = ["synthetic"] + [a for a in argv if a != "synthetic"]
    parser = build_parser()
    args = parser.parse_args(argv)

    import torch

    from . import dist
    from .runs import run_stage, run_synthetic

    try:
        info = dist.setup(args.device)
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest convolutions
        if not getattr(args, "no_tf32", False):
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
    try:
        if args.command == "synthetic":
            apply_selfcheck_defaults(args, info.device)
            report = run_synthetic(args, info, parser)
            if report.get("interrupted"):
                return 130
            result = report.get("selfcheck")
            if info.is_main and args.require_improvement is not None and result is not None:
                if result["improvement"] < args.require_improvement:
                    got = result["improvement"]
                    print(f"self-check FAILED: HyperStyle's held-out L2 had to be "
                          f"{100 * args.require_improvement:.0f}% below the W-encoder's; it is {100 * abs(got):.1f}% "
                          f"{'below' if got >= 0 else 'above'}", file=sys.stderr)
                    return 1
            return 0
        summary = run_stage(args, info)
        return 130 if summary["reason"] == "interrupted" else 0
    except (DataError, LossWeightsError, SetupError, CheckpointError, WeightsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        dist.cleanup()
