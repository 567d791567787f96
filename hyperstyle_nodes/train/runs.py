"""From parsed options to a finished stage: load and check the files, build losses, data and the stage, train.

`run_encoder`, `run_hypernet` and `run_synthetic` are what the subcommands of `python -m hyperstyle_nodes.train`
call; they take the argparse namespaces of cli.py.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .. import __version__
from .data import ImageFolderDataset, default_workers, describe_split, split_files
from .dist import DistInfo, barrier, broadcast_object
from .loop import LoopConfig, Trainer
from .losses import ReconstructionLoss
from .models import (SetupError, build_hypernet, build_w_encoder, check_layers_to_tune, default_layers_to_tune,
                     estimate_latent_avg, init_encoder_backbone, load_generator_file, load_w_encoder_file, same_weights)
from .stages import EncoderStage, HypernetStage

log = logging.getLogger("hyperstyle_nodes.train")
DOMAIN_DEFAULTS = {"faces": {"id_lambda": 0.1, "moco_lambda": 0.0}, "other": {"id_lambda": 0.0, "moco_lambda": 0.5},
                   "synthetic": {"id_lambda": 0.0, "moco_lambda": 0.0, "lpips_lambda": 0.0}}


def say(info: DistInfo, message: str) -> None:
    if info.is_main:
        print(message, flush=True)


def loss_lambdas(args) -> dict:
    """The recipe's lambdas: L2 1, LPIPS 0.8, identity 0.1 (faces) or MoCo 0.5 (other domains); flags override."""
    if args.domain is None and (args.id_lambda is None or args.moco_lambda is None):
        raise SetupError("pass --domain faces (ArcFace identity loss) or --domain other (MoCo similarity "
                              "loss), or set --id-lambda and --moco-lambda yourself")
    defaults = {"l2_lambda": 1.0, "lpips_lambda": 0.8, **DOMAIN_DEFAULTS.get(args.domain or "", {})}
    return {k: (getattr(args, k) if getattr(args, k) is not None else defaults.get(k, 0.0))
            for k in ("l2_lambda", "lpips_lambda", "id_lambda", "moco_lambda")}


def _losses(args, lambdas: dict) -> ReconstructionLoss:
    return ReconstructionLoss(**lambdas, weights={"lpips": args.lpips_weights, "id": args.id_weights,
                                                  "moco": args.moco_weights})


def _datasets(args, target_size: int):
    train, val = split_files(args.data, args.train_dir, args.val_dir, args.val_split, args.seed)
    return ImageFolderDataset(train, target_size), ImageFolderDataset(val, target_size), describe_split(train, val)


def _loop_config(args, out_dir: Path) -> LoopConfig:
    return LoopConfig(
        out_dir=out_dir, batch_size=args.batch_size, val_batch_size=args.val_batch_size or args.batch_size,
        lr=args.lr, max_steps=args.max_steps, max_seconds=args.max_minutes * 60 if args.max_minutes else None,
        log_interval=args.log_interval, val_interval=args.val_interval, image_interval=args.image_interval,
        save_interval=args.save_interval, val_batches=args.val_batches or None,
        workers=args.workers if args.workers is not None else default_workers(_processes_on_this_machine()),
        flip=not args.no_flip, seed=args.seed, resume=args.resume, tensorboard=not args.no_tensorboard,
        dump_rank_params=args.dump_rank_params)


def _processes_on_this_machine() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))  # set by torchrun


def _common_opts(args, stage: str, size: int, lambdas: dict, generator_path) -> dict:
    """Options saved in checkpoints: the official names where they exist, plain values only."""
    return {"output_size": size, "stylegan_weights": str(generator_path), "exp_dir": str(args.out),
            "batch_size": args.batch_size, "test_batch_size": args.val_batch_size or args.batch_size,
            "learning_rate": args.lr, "optim_name": "adam", "max_steps": args.max_steps, **lambdas,
            "checkpoint_path": None, "device": "cpu", "train_decoder": False, "arch": args.arch, "seed": args.seed,
            "precision": args.precision, "trainer": f"hyperstyle_nodes.train {__version__}", "trainer_stage": stage}


def _target_size(generator) -> int:
    return min(generator.size, 256)  # the official losses compare at 256 px (face_pool); smaller models at their size


def _latent_avg(stored, generator, args, info: DistInfo, what: str) -> torch.Tensor:
    if stored is not None:
        return stored
    say(info, f"{what} has no latent_avg: estimating it from {args.latent_avg_samples} samples of the mapping network")
    return estimate_latent_avg(generator, args.latent_avg_samples, seed=0)


def _finish(args, info: DistInfo, stage, train_set, val_set) -> dict:
    trainer = Trainer(stage, train_set, val_set, _loop_config(args, Path(args.out)), info)
    summary = trainer.run()
    if info.is_main:
        (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def run_encoder(args, info: DistInfo) -> dict:
    gen_file = load_generator_file(args.generator)
    generator = gen_file.generator
    lambdas = loss_lambdas(args)
    train_set, val_set, described = _datasets(args, _target_size(generator))
    latent_avg = _latent_avg(gen_file.latent_avg, generator, args, info, gen_file.path.name)
    torch.manual_seed(args.seed)  # the same initial weights on every process
    encoder = build_w_encoder(generator.config, args.arch)
    init = args.encoder_init or ("arcface" if args.arch == "full" else "none")
    if init == "arcface":
        path = init_encoder_backbone(encoder, args.id_weights)
        say(info, f"W-encoder backbone initialised from {path.name} (as pSp/e4e); --encoder-init none to skip")
    opts = {**_common_opts(args, "encoder", generator.size, lambdas, gen_file.path), "encoder_type": "WEncoder",
            "input_nc": 3, "dataset_type": f"{args.domain or 'custom'}_encode", "start_from_latent_avg": True,
            "w_norm_lambda": args.w_norm_lambda, "encoder_init": init}
    stage_class, extra = EncoderStage, {}
    if getattr(args, "collaborative", False):
        from .collaborative import CollaborativeEncoderStage

        stage_class = CollaborativeEncoderStage
        extra = dict(iterator_steps=args.iterator_steps, iterator_lr=args.iterator_lr, latent_lambda=args.latent_lambda,
                     iterator_start=args.iterator_start)
        opts.update(collaborative=True, **extra)
    stage = stage_class(generator, encoder, latent_avg, _losses(args, lambdas), info, bf16=args.precision == "bf16",
                        w_norm_lambda=args.w_norm_lambda, opts=opts, **extra)
    say(info, f"encoder stage{' (collaborative: ' + str(extra) + ')' if extra else ''}: {generator.size}-px "
              f"generator {gen_file.path.name}, {described}, {info.world_size} process(es) on {info.device}, "
              f"losses {lambdas}")
    return _finish(args, info, stage, train_set, val_set)


def run_hypernet(args, info: DistInfo) -> dict:
    enc_file = load_w_encoder_file(args.w_encoder)
    if args.generator:
        gen_file = load_generator_file(args.generator)
        generator, generator_path = gen_file.generator, gen_file.path
        if enc_file.generator is not None and not same_weights(enc_file.generator, generator):
            say(info, f"warning: {enc_file.path.name} holds a different generator than {gen_file.path.name}; "
                      "the W-encoder's codes may not fit it (train the encoder stage with this --generator)")
    elif enc_file.generator is not None:
        gen_file, generator, generator_path = None, enc_file.generator, enc_file.path
    else:
        raise SetupError(f"{enc_file.path.name} has no generator weights inside; pass --generator")
    for p in generator.parameters():
        p.requires_grad_(False)
    if enc_file.output_size != generator.size:
        raise SetupError(
            f"the W-encoder {enc_file.path.name} was trained for a {enc_file.output_size}-px generator but the "
            f"generator is {generator.size} px ({generator.n_styles} style codes). Train a W-encoder for this "
            f"generator first: python -m hyperstyle_nodes.train encoder --generator {generator_path} ...")
    enc_dim = enc_file.encoder.config.style_dim
    if enc_dim != generator.style_dim:
        raise SetupError(f"the W-encoder {enc_file.path.name} outputs {enc_dim}-d codes but the generator's "
                              f"W space is {generator.style_dim}-d; train a W-encoder for this generator first")
    # the W-encoder's codes are offsets from the latent_avg it was trained with (load_hyperstyle uses the
    # HyperStyle checkpoint's latent_avg for them), so that one goes into our checkpoints
    stored = enc_file.latent_avg if enc_file.latent_avg is not None else (gen_file.latent_avg if gen_file else None)
    latent_avg = _latent_avg(stored, generator, args, info, enc_file.path.name)
    layers_text = args.layers_to_tune or default_layers_to_tune(generator.config)
    layers = check_layers_to_tune(layers_text, generator.config)
    layers_text = ",".join(map(str, layers))
    lambdas = loss_lambdas(args)
    train_set, val_set, described = _datasets(args, _target_size(generator))
    torch.manual_seed(args.seed)
    hypernet = build_hypernet(generator.config, layers, args.arch, args.separable)
    opts = {**_common_opts(args, "hypernet", generator.size, lambdas, generator_path),
            "encoder_type": "SharedWeightsHyperNetResNet" + ("Separable" if args.separable else ""),
            "input_nc": 6, "layers_to_tune": layers_text, "n_iters_per_batch": args.n_iters,
            "load_w_encoder": True, "w_encoder_checkpoint_path": str(enc_file.path), "w_encoder_type": "WEncoder",
            "dataset_type": f"{args.domain or 'custom'}_hypernet"}
    stage = HypernetStage(generator, enc_file.encoder, hypernet, latent_avg, _losses(args, lambdas), info,
                          n_iters=args.n_iters, bf16=args.precision == "bf16", opts=opts)
    say(info, f"hypernet stage: {generator.size}-px generator, W-encoder {enc_file.path.name}, layers "
              f"{layers_text}, {args.n_iters} passes per batch, {described}, {info.world_size} process(es) on "
              f"{info.device}, losses {lambdas}")
    return _finish(args, info, stage, train_set, val_set)


def run_synthetic(args, info: DistInfo, stage_parser) -> dict:
    """Build the synthetic domain, then run `encoder` and `hypernet` on it as ordinary command lines."""
    from .synthetic import SyntheticDomain, build_domain, describe_result, evaluate
    from ..tiny import tiny_generator_config

    out = Path(args.out)
    domain = SyntheticDomain(size=args.size, train_images=args.train_images, val_images=args.val_images,
                             seed=args.seed, offset_strength=args.offset_strength, offset_rank=args.offset_rank)
    layers = default_layers_to_tune(tiny_generator_config(args.size, domain.narrow, domain.style_dim))
    arch = args.arch
    say(info, f"self-check on {info.device}: {arch} architectures, a {args.size}-px generator, {args.train_images} "
              f"training and {args.val_images} held-out images, {args.encoder_minutes:g} + {args.hypernet_minutes:g} "
              f"minutes of training (encoder + hypernetwork), learning rate {args.lr:g}")
    paths = None
    if info.is_main:
        paths = build_domain(out / "domain", domain, check_layers_to_tune(layers, tiny_generator_config(
            args.size, domain.narrow, domain.style_dim)), device=info.device, log=print)
    barrier(info)
    paths = broadcast_object(info, paths)
    common = ["--domain", "synthetic", "--train-dir", str(paths["train"]), "--val-dir", str(paths["val"]),
              "--arch", arch, "--batch-size", str(args.batch_size),
              "--precision", args.precision, "--device", args.device, "--no-flip", "--seed", str(args.seed),
              "--val-batches", str(args.val_batches), "--log-interval", str(args.log_interval),
              "--image-interval", str(args.image_interval), "--lr", str(args.lr)]
    if args.workers is not None:
        common += ["--workers", str(args.workers)]
    if args.no_tensorboard:
        common.append("--no-tensorboard")
    if args.dump_rank_params:
        common.append("--dump-rank-params")
    resume = ["--resume", "auto"] if args.resume else []
    # a random domain: nothing to gain from the face-recognition backbone (and no weights to download)
    enc_cmd = ["encoder", "--generator", str(paths["generator"]), "--out", str(out / "encoder"), "--encoder-init", "none",
               "--max-steps", str(args.encoder_steps), "--val-interval", str(args.val_interval),
               "--save-interval", str(args.save_interval)] + common + resume
    if args.encoder_minutes:
        enc_cmd += ["--max-minutes", str(args.encoder_minutes)]
    enc_ckpt = out / "encoder" / "checkpoints" / "best_model.pt"
    hyp_cmd = ["hypernet", "--w-encoder", str(enc_ckpt), "--out", str(out / "hypernet"),
               "--max-steps", str(args.hypernet_steps), "--n-iters", str(args.n_iters),
               "--val-interval", str(args.val_interval), "--save-interval", str(args.save_interval)] + common + resume
    if args.hypernet_minutes:
        hyp_cmd += ["--max-minutes", str(args.hypernet_minutes)]
    summaries = {}
    for name, cmd in (("encoder", enc_cmd), ("hypernet", hyp_cmd)):
        say(info, "\n$ python -m hyperstyle_nodes.train " + " ".join(cmd))
        summaries[name] = run_stage(stage_parser.parse_args(cmd), info)
        if summaries[name]["reason"] == "interrupted":
            return {"interrupted": True, **summaries}
        barrier(info)
    report = {"domain": vars(args) | {"arch": arch, "layers_to_tune": layers},
              "world_size": info.world_size, "device": str(info.device),
              "gpu": torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else None, **summaries}
    if info.is_main:
        hyper_ckpt = Path(summaries["hypernet"]["best"])
        result = evaluate(hyper_ckpt, enc_ckpt, paths, args.n_iters, out, device=info.device)
        report["selfcheck"] = result
        (out / "selfcheck.json").write_text(json.dumps(report, indent=1, default=str))
        print(f"\n{describe_result(result, args.n_iters)}\nreport {out / 'selfcheck.json'}, "
              f"images {result.get('grid')}", flush=True)
    barrier(info)
    return report


def run_stage(args, info: DistInfo) -> dict:
    if args.command == "encoder":
        return run_encoder(args, info)
    if args.command == "hypernet":
        return run_hypernet(args, info)
    raise ValueError(f"unknown stage {args.command!r}")
