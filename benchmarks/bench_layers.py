"""GPU time of each upsampling layer of the generator in each form the library can run it, to decide where each pays.

The generator is most of an inversion's time (seven passes per invert(5) + decode), and its upsampling layers run
as blur-folded phase convolutions above 64 px (four 3x3 kernels per output channel: 36 taps, against 16 for the
official transposed convolution, which then needs a blur). This times, for every upsampling layer of the released
generator at each batch size and precision, the layer's convolution (per-sample weights built, then convolved:
`ModulatedConv2d.convolve`) as

    phases       the blur folded into the phase kernels, all four phases in one convolution
    split        the same, one convolution per output row parity
    transposed   the stride-2 transposed convolution in phase form (2x2 kernels), its blur not yet applied

and the whole layer (convolution, noise, bias, activation, phases interleaved: `StyledConv`) as the library runs it
now ("layer") and in the transposed form with its blur epilogue ("transposed+blur": the Triton kernel by default,
torch.compile's fusion with HYPERSTYLE_COMPILE=1, eager PyTorch with HYPERSTYLE_COMPILE=0). Each measurement replays a CUDA
graph of 10 calls (no launch overhead), median of --reps replays, per image; on the CPU it runs eagerly (smoke test).
Random weights; one JSON line per measurement, --table for a markdown table:

    python benchmarks/bench_layers.py --precisions tf32,bf16 --batches 1,8 --table
    python benchmarks/bench_layers.py --device cpu --size 64 --batches 1 --precisions fp32   # CPU smoke test
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hyperstyle_nodes.stylegan2.generator import Generator, GeneratorConfig, ModulatedConv2d  # noqa: E402
from hyperstyle_nodes.tiny import randomize_  # noqa: E402
from bench_pipeline import DTYPES, precision_flags  # noqa: E402

FORMS = ("phases", "split", "transposed", "layer", "transposed+blur")
PLANS = {"phases": ((0, 1),), "split": ((0,), (1,)), "transposed": "transposed"}
CALLS_PER_GRAPH = 10


def forced_plan(plan):
    """An `upsample_plan` that always answers `plan`."""
    return lambda self, batch, height, transposed_up_to=0: plan


def timer(fn, device: torch.device, reps: int):
    """Median ms of one fn() call: CUDA-graph replays of CALLS_PER_GRAPH calls on a GPU, eager calls elsewhere."""
    if device.type != "cuda":
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - start))
        return statistics.median(times)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS_PER_GRAPH):
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / CALLS_PER_GRAPH)
    return statistics.median(times)


def layer_runs(styled, x, style, noise, form: str):
    """A no-argument function running `form` of the upsampling StyledConv `styled` on packed x."""
    conv = styled.conv
    if form in PLANS:
        return lambda: conv.convolve(x, style)
    out = torch.empty(x.shape[0], conv.out_channel, 2 * x.shape[2], 2 * x.shape[3], device=x.device, dtype=x.dtype)
    return lambda: conv.convolve(x, style).into(out, noise, styled.noise.weight, styled.activate.bias)


def macs(form: str, batch: int, height: int, c_in: int, c_out: int) -> int:
    """Multiply-adds of the convolution itself (weights not counted)."""
    taps = {"phases": 36, "split": 36, "transposed": 16, "layer": 36, "transposed+blur": 16}[form]
    extent = (height + 1) ** 2 if form.startswith("transposed") else height ** 2
    return batch * extent * taps * c_in * c_out


def bench(args, report) -> None:
    device = torch.device(args.device)
    generator = randomize_(Generator(GeneratorConfig.stylegan2(args.size)), torch.Generator().manual_seed(0)).eval()
    for precision in args.precisions:
        with precision_flags(precision), torch.no_grad():
            gen = copy.deepcopy(generator).to(device=device, dtype=DTYPES[precision])
            for level in range(len(gen.to_rgbs)):
                styled = gen.convs[2 * level]
                height, c_in, c_out = 4 << level, styled.conv.in_channel, styled.conv.out_channel
                noise = getattr(gen.noises, f"noise_{2 * level + 1}")
                for batch in args.batches:
                    g = torch.Generator().manual_seed(level)
                    x = torch.randn(height, height, batch, c_in, generator=g).permute(2, 3, 0, 1)  # packed
                    x = x.to(device=device, dtype=gen.input.input.dtype)
                    style = torch.randn(batch, c_in, generator=g).to(x) + 1
                    for form in args.forms:
                        plan = PLANS.get(form, "transposed" if form == "transposed+blur" else None)
                        original = ModulatedConv2d.upsample_plan
                        if plan is not None:
                            ModulatedConv2d.upsample_plan = forced_plan(plan)
                        try:
                            ms = timer(layer_runs(styled, x, style, noise, form), device, args.reps)
                            error = None
                        except Exception as err:  # noqa: BLE001 - a form cuDNN or memory refuses: say so, go on
                            ms, error = None, f"{type(err).__name__}: {str(err)[:160]}"
                        finally:
                            ModulatedConv2d.upsample_plan = original
                        report(kind="layer", level=level, input=height, c_in=c_in, c_out=c_out, batch=batch,
                               precision=precision, form=form, error=error,
                               ms_per_image=None if ms is None else round(ms / batch, 4),
                               gmac_per_image=round(macs(form, 1, height, c_in, c_out) / 1e9, 3))
            del gen


def print_table(rows, forms) -> None:
    print("| precision | batch | input px | in -> out | " + " | ".join(f"{f} ms/image" for f in forms) + " |")
    print("|---|---|---|---|" + "---|" * len(forms))
    keys = sorted({(r["precision"], r["batch"], r["input"], r["c_in"], r["c_out"]) for r in rows},
                  key=lambda k: (k[0], k[1], k[2]))
    for precision, batch, height, c_in, c_out in keys:
        cells = []
        for form in forms:
            hit = [r for r in rows if (r["precision"], r["batch"], r["input"], r["form"]) == (precision, batch,
                                                                                             height, form)]
            cells.append("-" if not hit else ("failed" if hit[0]["error"] else f"{hit[0]['ms_per_image']:.3f}"))
        print(f"| {precision} | {batch} | {height} | {c_in} -> {c_out} | " + " | ".join(cells) + " |")


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=1024, help="generator resolution")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--precisions", default="tf32,bf16")
    p.add_argument("--forms", default=",".join(FORMS))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None, help="append JSON lines to this file")
    p.add_argument("--table", action="store_true")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.precisions = args.precisions.split(",")
    args.forms = args.forms.split(",")
    unknown = set(args.forms) - set(FORMS)
    if unknown:
        p.error(f"unknown forms {sorted(unknown)}; choose from {', '.join(FORMS)}")
    rows = []
    bench(args, json_reporter(args.device, args.out, rows))
    if args.table:
        print_table(rows, args.forms)
    return rows


def json_reporter(device: str, out, rows: list):
    """report(**row): the row, with the GPU's name and torch's version, appended to `rows`, printed as a JSON line
    and appended to the file `out` (if given)."""
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"

    def report(**row):
        row = {"gpu": gpu, "torch": torch.__version__, **row}
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            with open(out, "a") as f:
                f.write(line + "\n")

    return report


if __name__ == "__main__":
    main()
