"""Where one generator pass spends its GPU time: the pass replayed as a CUDA graph (ms/image), then one eager pass
under torch.profiler with its GPU kernels summed by family.

The generator is seven of the passes in an invert(5) + decode, so this is the measurement that says what to speed
up next. Released 1024-px shapes with random weights, and per-sample offsets from the hypernetwork on every tuned
layer, as in an inversion. Families (a kernel's name decides):

    activation      noise + bias + leaky ReLU, interleaving the upsampling phases (Triton `styled_activation_kernel`)
    weights         per-sample weights (`modulated_weight_kernel`, `block_diagonal_kernel`)
    rgb             toRGB's bias and upsampled skip (`rgb_output_kernel`)
    convolution     cuDNN's convolution kernels
    channel slices  cuDNN copying each group's channels of a grouped convolution (`nhwcSliceCKernel`)
    matmul          cuBLAS products (the phase kernels, toRGB's block-diagonal product)
    other           everything else (PyTorch's own elementwise kernels on the paths without Triton)

One JSON line per (precision, batch), with per-launch microseconds of the Triton families in launch order, and
--table for a markdown table:

    python benchmarks/bench_generator.py --precisions bf16,tf32 --batches 1,8 --table
    python benchmarks/bench_generator.py --no-triton --precisions bf16 --batches 8 --table   # the PyTorch path
    python benchmarks/bench_generator.py --device cpu --tiny --size 64 --batches 1 --precisions fp32   # smoke test
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hyperstyle_nodes.engines.hyperstyle.model import pool_to  # noqa: E402
from hyperstyle_nodes.stylegan2 import generator as stylegan2  # noqa: E402
from bench_layers import json_reporter, timer  # noqa: E402
from bench_pipeline import DTYPES, add_model_arguments, build_model, precision_flags, test_images  # noqa: E402

FAMILIES = (("activation", ("styled_activation",)), ("weights", ("modulated_weight", "block_diagonal")),
            ("rgb", ("rgb_output",)), ("channel slices", ("nhwcSliceC",)),
            ("convolution", ("fprop", "cudnn", "conv")), ("matmul", ("nvjet", "gemm", "gemv")))
PER_LAUNCH = ("activation", "weights", "rgb")


def family(kernel_name: str) -> str:
    return next((name for name, keys in FAMILIES if any(k in kernel_name for k in keys)), "other")


def device_kernels(prof, device: torch.device) -> list:
    """(name, microseconds) of every kernel the profiler saw, in launch order; on the CPU, every top-level op."""
    if device.type == "cuda":
        events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    else:
        events = [e for e in prof.events() if e.cpu_parent is None]
    events.sort(key=lambda e: e.time_range.start)
    return [(e.name, e.time_range.elapsed_us()) for e in events]


def bench(args, report) -> None:
    device = torch.device(args.device)
    saved_mode = dict(stylegan2._COMPILE)
    if args.no_triton:
        stylegan2.set_kernels("torch")
    try:
        run(args, report, device)
    finally:
        stylegan2._COMPILE.update(saved_mode)


def run(args, report, device) -> None:
    master = build_model(args.size, args.tiny)
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    for precision in args.precisions:
        with precision_flags(precision), torch.no_grad():
            model = copy.deepcopy(master).to(device=device, dtype=DTYPES[precision]).channels_last_()
            for batch in args.batches:
                x = model.preprocess(test_images(batch).to(device)).contiguous(memory_format=torch.channels_last)
                codes = model.encode_normalized(x)
                deltas = model.hypernet(torch.cat([x, pool_to(model.synthesize(codes))], dim=1))

                def one_pass(model=model, codes=codes, deltas=deltas):
                    return model.synthesize(codes, deltas)

                ms = timer(one_pass, device, args.reps)
                one_pass()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                with profile(activities=activities) as prof:
                    one_pass()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                kernels = device_kernels(prof, device)
                sums, launches = {}, {}
                for name, us in kernels:
                    fam = family(name)
                    sums[fam] = sums.get(fam, 0.0) + us
                    if fam in PER_LAUNCH:
                        launches.setdefault(fam, []).append(round(us, 1))
                report(kind="generator_pass", precision=precision, batch=batch, size=args.size,
                       path="no-triton" if args.no_triton else "default", ms_per_image=round(ms / batch, 4),
                       profiled_ms=round(sum(sums.values()) / 1000, 3), kernels=len(kernels),
                       family_ms={k: round(v / 1000, 3) for k, v in sorted(sums.items())}, launches_us=launches)
            del model


def print_table(rows) -> None:
    names = [name for name, _ in FAMILIES] + ["other"]
    print("| path | precision | batch | pass ms/image (graph) | profiled pass ms (eager) | "
          + " | ".join(f"{n} ms" for n in names) + " |")
    print("|---|---|---|---|---|" + "---|" * len(names))
    for r in rows:
        cells = [f"{r['family_ms'].get(n, 0.0):.3f}" for n in names]
        print(f"| {r['path']} | {r['precision']} | {r['batch']} | {r['ms_per_image']:.3f} | {r['profiled_ms']:.3f} | "
              + " | ".join(cells) + " |")


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, "bf16,tf32")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--no-triton", action="store_true", help="the PyTorch path (HYPERSTYLE_COMPILE=0)")
    p.add_argument("--out", default=None, help="append JSON lines to this file")
    p.add_argument("--table", action="store_true")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.precisions = args.precisions.split(",")
    rows = []
    bench(args, json_reporter(args.device, args.out, rows))
    if args.table:
        print_table(rows)
    return rows


if __name__ == "__main__":
    main()
