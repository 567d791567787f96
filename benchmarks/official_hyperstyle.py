"""The official HyperStyle code timed the way bench_pipeline.py times ours (`bench_pipeline.py --official DIR`).

DIR is a checkout of yuval-alaluf/hyperstyle; nothing of it is in this repository. Its classes get random weights in
the released shapes (the 1024-px generator, the hypernetwork tuning hyperstyle_ffhq.pt's 14 layers, the IR-SE-50
W-encoder; at --size 256/512 the same layers below that size) and run what its inference script runs:
`run_inversion` with --iters iterations at full resolution (resize_outputs=False), then one decode of the final
codes and offsets, as `invert` + `decode` do for ours. PyTorch's defaults are kept (it has no half-precision mode,
so fp16/bf16 get an "error" line); fp32 turns TF32 off as for ours. Its CUDA ops are built first in a child process
(`official_code.build_official_ops`); where they cannot build (CPU, no nvcc) plain-PyTorch stand-ins run and the
"ops" field says so. One "official" JSON line per batch size and precision, with the same timing and memory fields
as ours.
"""
from __future__ import annotations

import importlib
from contextlib import nullcontext
import os
import statistics
import sys
import time
import types
from argparse import Namespace
from pathlib import Path

import torch

from official_code import build_official_ops, patched, reference_ops_module

OFFICIAL_OPS = "models.stylegan2.op"
RELEASED_LAYERS = (5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 23, 24)  # hyperstyle_ffhq.pt's layers_to_tune
N_OUTPUTS = {1024: 26, 512: 23, 256: 20}  # the official set_hypernet's layer counts


def import_official(official_dir, device: torch.device, build_ops: bool = True,
                    build_timeout: float = 150) -> types.SimpleNamespace:
    root = Path(official_dir).resolve()
    if not (root / "models" / "hyperstyle.py").is_file() or not (root / "utils" / "inference_utils.py").is_file():
        raise SystemExit(f"--official {official_dir}: not a HyperStyle checkout (no models/hyperstyle.py or "
                         f"utils/inference_utils.py); clone github.com/yuval-alaluf/hyperstyle there.")
    taken = [name for name in ("models", "utils", "configs")
             if name in sys.modules and not str(getattr(sys.modules[name], "__file__", "") or
                                                 getattr(sys.modules[name], "__path__", [""])[0]).startswith(str(root))]
    if taken:
        raise RuntimeError(f"top-level modules {taken} are already imported from elsewhere; run the official code "
                           f"in a fresh process")
    if not build_ops:
        ops = "reference (not built: --no-build-ops)"
    else:
        ops = build_official_ops(root, OFFICIAL_OPS, device, build_timeout)
    sys.path.insert(0, str(root))
    if ops != "cuda-ext":
        sys.modules[OFFICIAL_OPS] = reference_ops_module(OFFICIAL_OPS)
    elif "torch.utils.cpp_extension" in sys.modules and os.environ.get("CUDA_HOME"):
        sys.modules["torch.utils.cpp_extension"].CUDA_HOME = os.environ["CUDA_HOME"]  # the child builds' toolkit
    hyperstyle = importlib.import_module("models.hyperstyle")
    w_encoder = importlib.import_module("models.encoders.w_encoder")
    hypernetwork = importlib.import_module("models.hypernetworks.hypernetwork")
    inference = importlib.import_module("utils.inference_utils")
    import torchvision.models

    # its ResNet-34 backbone asks torchvision for ImageNet weights (a download): random ones, as everything else here
    hypernetwork.resnet34 = lambda pretrained=False, **kwargs: torchvision.models.resnet34(weights=None)
    return types.SimpleNamespace(root=root, ops=ops, HyperStyle=hyperstyle.HyperStyle,
                                 WEncoder=w_encoder.WEncoder, run_inversion=inference.run_inversion)


def build_official(off, size: int, iters: int, device: torch.device, seed: int = 0):
    """(the official HyperStyle with random weights, its options). load_weights reads the checkpoint and the
    W-encoder's file; here the W-encoder and the average latent are random instead."""
    layers = ",".join(str(i) for i in RELEASED_LAYERS if i < N_OUTPUTS[size])
    opts = Namespace(output_size=size, encoder_type="SharedWeightsHyperNetResNet", input_nc=6, layers_to_tune=layers,
                     load_w_encoder=True, w_encoder_type="WEncoder", device=str(device), checkpoint_path=None,
                     w_encoder_checkpoint_path=None, dataset_type="ffhq_hypernet", n_iters_per_batch=iters,
                     resize_outputs=False)

    def random_weights(net):
        net.latent_avg = 0.1 * torch.randn(net.n_styles, 512)
        net.w_encoder = off.WEncoder(50, "ir_se", net.opts).eval()

    torch.manual_seed(seed)
    # the shared hypernetwork moves its parameters with .cuda() while it is built; on the CPU that is a no-op here
    no_cuda = patched(torch.Tensor, "cuda", lambda t, *a, **k: t) if device.type != "cuda" else nullcontext()
    with patched(off.HyperStyle, "load_weights", random_weights), no_cuda:
        net = off.HyperStyle(opts)
    net = net.eval().requires_grad_(False).to(device)
    net.latent_avg = net.latent_avg.to(device)
    return net, opts


def bench(args, device: torch.device, report, images: torch.Tensor, precision_flags, sync, memory) -> None:
    """One "official" line per precision and batch size; bench_pipeline's own timing conventions."""
    off = import_official(args.official, device, args.build_ops, args.build_timeout)
    report(kind="official_ops", ops=off.ops)
    net, opts = build_official(off, args.size, args.iters, device)
    for precision in args.precisions:
        for batch in args.batches:
            common = dict(kind="official", impl="official", ops=off.ops, batch=batch, precision=precision)
            if precision in ("fp16", "bf16"):
                report(**common, ms_per_image=None, error="the official code has no half-precision mode")
                continue
            x = images[:batch].to(device) * 2 - 1  # its inputs are in [-1, 1]

            def call():
                with torch.no_grad():
                    _, _, deltas, codes = off.run_inversion(x, net, opts)
                    return net.decoder([codes], weights_deltas=deltas, input_is_latent=True, randomize_noise=False)[0]

            with precision_flags(precision):
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
                call()
                sync(device)
                first = time.perf_counter() - start
                for _ in range(args.warmup - 1):
                    call()
                times = []
                for _ in range(args.reps):
                    sync(device)
                    start = time.perf_counter()
                    out = call()
                    sync(device)
                    times.append(time.perf_counter() - start)
            report(**common, ms_per_image=round(1000 * statistics.median(times) / batch, 2),
                   ms_min_per_image=round(1000 * min(times) / batch, 2), first_call_s=round(first, 2),
                   finite=bool(torch.isfinite(out).all()), **memory(device))
