"""Speed and memory of HyperStyle inversion, on the released architecture with random weights.

Builds the released model's shapes (1024 px generator, hypernetwork tuning the 14 layers of hyperstyle_ffhq.pt,
IR-SE-50 W-encoder) without any file, runs invert(n_iters=5) + decode at each batch size and precision, and prints
one JSON line per measurement (also appended to --out):

    {"kind": "invert+decode" | "decode", "gpu", "batch", "precision", "ms_per_image", "peak_alloc_gib",
     "peak_reserved_gib", "psnr_vs_fp32", ...}

ms_per_image is the median over --reps timed calls after --warmup calls, wall clock (what a user waits for).
Precisions: fp32 (TF32 off: true fp32), tf32 (PyTorch's defaults: TF32 convolutions), fp16, bf16. PSNR compares the
final images against fp32 on the same input. Optional checks: --chunk-check N (a batch of N under a --memory-cap-gib
budget vs the images one by one) and --parity (GPU vs CPU fp32 on tiny released-format checkpoints).

--fresh-process measures what a user waits for first: each batch size and precision in its own new Python process
(model already on the device, so loading is not counted), with empty compile caches and then again with the caches
the first process left (a restart), for the default path (Triton kernels) and for the path without Triton
(HYPERSTYLE_COMPILE=0; --paths compile adds torch.compile's, HYPERSTYLE_COMPILE=1). One "first_call" line each.

    python benchmarks/bench_pipeline.py                                   # the README table (CUDA)
    python benchmarks/bench_pipeline.py --device cpu --tiny --size 64    # CPU smoke test (CI)
    python benchmarks/bench_pipeline.py --fresh-process --precisions tf32,bf16 --batches 1,8   # first calls

--official DIR (a yuval-alaluf/hyperstyle checkout) also times the official code in the same run, the same way
(official_hyperstyle.py): one "official" line per batch size and precision, and a column in --table.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hyperstyle_nodes.engines.hyperstyle.encoders import EncoderConfig, build_encoder  # noqa: E402
from hyperstyle_nodes.engines.hyperstyle.hypernetwork import HyperNetwork, HypernetConfig  # noqa: E402
from hyperstyle_nodes.engines.hyperstyle.model import HyperStyleModel, load_hyperstyle  # noqa: E402
from hyperstyle_nodes.stylegan2.generator import Generator, GeneratorConfig, set_compile  # noqa: E402
from hyperstyle_nodes.tiny import (randomize_, tiny_encoder_config, tiny_generator_config,  # noqa: E402
                                   tiny_hypernet_config, write_tiny_checkpoints)

RELEASED_LAYERS = (5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 23, 24)  # hyperstyle_ffhq.pt's layers_to_tune
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GIB = 1024 ** 3


def build_model(size: int, tiny: bool, seed: int = 0) -> HyperStyleModel:
    """Random weights of the released shapes (or tiny.py's narrow ones), with non-trivial BN/bias/noise state."""
    rng = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if tiny:
        gen_config = tiny_generator_config(size)
        layers = ",".join(str(i) for i in RELEASED_LAYERS if i < len(gen_config.layer_shapes))
        hyper_config = tiny_hypernet_config(gen_config, layers)
        enc_config = tiny_encoder_config("w_encoder", gen_config)
    else:
        gen_config = GeneratorConfig.stylegan2(size)
        hyper_config = HypernetConfig(layer_shapes=tuple(gen_config.layer_shapes),
                                      layers_to_tune=tuple(i for i in RELEASED_LAYERS
                                                           if i < len(gen_config.layer_shapes)))
        enc_config = EncoderConfig(kind="w_encoder", n_styles=gen_config.n_styles)
    generator = randomize_(Generator(gen_config), rng).eval()
    hypernet = randomize_(HyperNetwork(hyper_config), rng).eval()
    encoder = randomize_(build_encoder(enc_config), rng).eval()
    with torch.no_grad():
        latent_avg = generator.mean_latent(1000)[0]
    return HyperStyleModel(generator, hypernet, latent_avg, encoder).eval()


def test_images(batch: int, size: int = 256, seed: int = 1234) -> torch.Tensor:
    """Smooth random 'faces' in [0, 1] at size x size (content does not matter for speed; smooth keeps it
    image-like)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, 16, 16, generator=g)
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


@contextlib.contextmanager
def precision_flags(precision: str):
    """fp32 means true fp32 (TF32 off); tf32 keeps PyTorch's defaults; half precisions do not use TF32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if precision != "tf32":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int) -> list:
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def reset_memory(model, device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def memory(device) -> dict:
    if device.type != "cuda":
        return {"peak_alloc_gib": None, "peak_reserved_gib": None}
    return {"peak_alloc_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GIB, 3)}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.float().cpu() - b.float().cpu()) ** 2).mean().item()
    return float("inf") if mse == 0 else round(10 * torch.log10(torch.tensor(1 / mse)).item(), 2)


class Report:
    def __init__(self, out, common: dict):
        self.out, self.common, self.rows = out, common, []

    def __call__(self, **row):
        row = {**self.common, **row}
        self.rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if self.out:
            with open(self.out, "a") as f:
                f.write(line + "\n")
        return row


def bench_precision(master, precision, args, device, images, reference, report):
    dtype = DTYPES[precision]
    with precision_flags(precision):
        model = copy.deepcopy(master).to(device=device, dtype=dtype).channels_last_()
        model.cuda_graphs = args.graphs
        for batch in args.batches:
            x = images[:batch].to(device)
            reset_memory(model, device)
            start = time.perf_counter()
            inv = model.invert(x, n_iters=args.iters, keep_steps=False)
            model.decode(inv.codes, inv.deltas)
            sync(device)
            first_call = time.perf_counter() - start
            for _ in range(args.warmup - 1):
                inv = model.invert(x, n_iters=args.iters, keep_steps=False)
                model.decode(inv.codes, inv.deltas)

            last = {}

            def pipeline():
                last["inv"] = model.invert(x, n_iters=args.iters, keep_steps=False)
                model.decode(last["inv"].codes, last["inv"].deltas)

            times = timed(pipeline, device, args.reps)
            inv = last["inv"]
            images_out = inv.images.float().cpu()
            if precision == "fp32":
                reference[batch] = images_out
            quality = psnr(images_out, reference[batch]) if batch in reference and precision != "fp32" else None
            report(kind="invert+decode", batch=batch, precision=precision,
                   ms_per_image=round(1000 * statistics.median(times) / batch, 2),
                   ms_min_per_image=round(1000 * min(times) / batch, 2), first_call_s=round(first_call, 2),
                   psnr_vs_fp32=quality, finite=bool(torch.isfinite(images_out).all()), **memory(device))

            codes, deltas = inv.codes, inv.deltas
            reset_memory(model, device)
            for _ in range(args.warmup):
                model.decode(codes, deltas)
            times = timed(lambda: model.decode(codes, deltas), device, args.reps)
            report(kind="decode", batch=batch, precision=precision,
                   ms_per_image=round(1000 * statistics.median(times) / batch, 2),
                   ms_min_per_image=round(1000 * min(times) / batch, 2), **memory(device))
            del inv, codes, deltas
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def chunk_check(master, args, device, report):
    """A batch of N within a memory budget (auto chunks; then a chunk size that runs out of memory, halved on the
    fly) must give the same results as the images one by one."""
    n = args.chunk_check
    images = test_images(n, seed=99)
    for precision in args.chunk_precisions:
        with precision_flags(precision):
            model = copy.deepcopy(master).to(device=device, dtype=DTYPES[precision]).channels_last_()
            model.cuda_graphs = args.graphs
            singles = [model.invert(images[i:i + 1].to(device), n_iters=args.iters, keep_steps=False)
                       for i in range(n)]
            single_images = torch.cat([s.images.cpu() for s in singles])
            single_codes = torch.cat([s.codes.cpu() for s in singles])
            single_deltas = [None if d is None else torch.cat([s.deltas[i].cpu() for s in singles])
                             for i, d in enumerate(singles[0].deltas)]
            del singles
            for mode in args.chunk_modes:
                reset_memory(model, device)
                model._chunk_limit = None
                cap = None
                if device.type == "cuda" and args.memory_cap_gib:
                    total = torch.cuda.get_device_properties(device).total_memory
                    cap = min(1.0, args.memory_cap_gib * GIB / total)
                    torch.cuda.set_per_process_memory_fraction(cap, device)
                planned = model._auto_chunk(n, model._bytes_per_image(inverting=True))
                error = None
                try:
                    sync(device)
                    start = time.perf_counter()
                    # CPU images, as ComfyUI passes them: the results of several chunks are gathered there
                    inv = model.invert(images, n_iters=args.iters, keep_steps=False,
                                       max_batch=n if mode == "forced" else None)
                    sync(device)
                    seconds = time.perf_counter() - start
                except Exception as err:  # reported, not hidden
                    error, seconds, inv = f"{type(err).__name__}: {err}"[:300], None, None
                finally:
                    if cap is not None:
                        torch.cuda.set_per_process_memory_fraction(1.0, device)
                row = dict(kind="chunked", batch=n, precision=precision, mode=mode, memory_cap_gib=args.memory_cap_gib,
                           planned_chunk=min(planned, n) if mode == "auto" else n, chunk_after_oom=model._chunk_limit,
                           seconds=None if seconds is None else round(seconds, 3), error=error, **memory(device))
                if inv is not None:
                    delta_diff = max([(a.cpu().float() - b.float()).abs().max().item()
                                      for a, b in zip(inv.deltas, single_deltas) if a is not None] or [0.0])
                    row.update(images_max_abs_diff=(inv.images.cpu() - single_images).abs().max().item(),
                               codes_max_abs_diff=(inv.codes.cpu().float() - single_codes.float()).abs().max().item(),
                               deltas_max_abs_diff=delta_diff,
                               identical=bool(torch.equal(inv.images.cpu(), single_images)))
                report(**row)
                del inv
            del model
            gc.collect()


def parity_check(args, device, report):
    """fp32 inversion on `device` (the library's path) vs the same tiny released-format
    checkpoint on the CPU. fp32 is true fp32; tf32 (PyTorch's default convolutions) is reported for information."""
    with tempfile.TemporaryDirectory() as folder:
        for size in args.parity_sizes:
            paths = write_tiny_checkpoints(Path(folder) / str(size), size=size, seed=0)
            x = test_images(2, seed=5)
            cpu = load_hyperstyle(paths["hyperstyle"], w_encoder=paths["w_encoder"]).invert(x, n_iters=3)
            model = load_hyperstyle(paths["hyperstyle"], w_encoder=paths["w_encoder"], device=device)
            for precision in ("fp32", "tf32"):
                with precision_flags(precision):
                    model.invert(x, n_iters=3)  # warm-up
                    gpu = model.invert(x, n_iters=3)
                img = (cpu.images - gpu.images.cpu()).abs().max().item()
                codes = (cpu.codes - gpu.codes.cpu()).abs().max().item()
                deltas = max((a - b.cpu()).abs().max().item()
                             for a, b in zip(cpu.deltas, gpu.deltas) if a is not None)
                report(kind="parity", size=size, n_iters=3, precision=precision, images_max_abs_diff=img,
                       codes_max_abs_diff=codes, deltas_max_abs_diff=deltas, ok=img <= 1e-3 and codes <= 1e-4)


def profile(master, args, device):
    """Where the time goes: one inversion per batch under torch.profiler, top kernels."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for precision in args.precisions:
        with precision_flags(precision):
            model = copy.deepcopy(master).to(device=device, dtype=DTYPES[precision]).channels_last_()
            model.cuda_graphs = False  # the profiler cannot see inside graphs
            for batch in args.batches:
                x = test_images(batch).to(device)
                for _ in range(2):
                    model.invert(x, n_iters=args.iters, keep_steps=False)
                sync(device)
                with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    model.invert(x, n_iters=args.iters, keep_steps=False)
                    sync(device)
                print(f"# profile {precision} batch {batch}", flush=True)
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.profile_rows,
                                                max_name_column_width=60), flush=True)
            del model
            gc.collect()


def invert_and_decode(model, x, iters: int):
    inv = model.invert(x, n_iters=iters, keep_steps=False)
    model.decode(inv.codes, inv.deltas)


def first_call(master, args, device, report):
    """One process's first invert + decode per precision and batch (the --fresh-process child). The model is moved
    to the device first, so this is the wait for compiling, recording graphs and choosing kernels."""
    for precision in args.precisions:
        with precision_flags(precision):
            model = copy.deepcopy(master).to(device=device, dtype=DTYPES[precision]).channels_last_()
            model.cuda_graphs = args.graphs
            for batch in args.batches:
                x = test_images(batch).to(device)
                reset_memory(model, device)
                sync(device)
                start = time.perf_counter()
                invert_and_decode(model, x, args.iters)
                sync(device)
                seconds = time.perf_counter() - start
                second = timed(lambda: invert_and_decode(model, x, args.iters), device, 1)[0]
                report(kind="first_call", batch=batch, precision=precision, first_call_s=round(seconds, 2),
                       second_call_ms_per_image=round(1000 * second / batch, 2), **memory(device))
            del model
            gc.collect()


# extra environment of each path: the default (Triton kernels), PyTorch only, torch.compile (opt-in)
PATHS = {"default": {}, "no-compile": {"HYPERSTYLE_COMPILE": "0"}, "compile": {"HYPERSTYLE_COMPILE": "1"}}


def fresh_process_runs(args, cache_root: Path) -> list:
    """(row fields, environment changes, argv) of every child process: per path, precision and batch, one with an
    empty compile cache and one with the cache that run left behind. The path without compiling has no cache to
    warm: it runs once."""
    common = ["--first-call-only", "--device", args.device, "--size", str(args.size), "--iters", str(args.iters)]
    common += ["--tiny"] * args.tiny + ["--no-graphs"] * (not args.graphs)
    runs = []
    for path in args.paths:
        for precision in args.precisions:
            for batch in args.batches:
                folder = cache_root / f"{path}-{precision}-{batch}"
                env = {"TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor"), "TRITON_CACHE_DIR": str(folder / "triton"),
                       **PATHS[path]}
                argv = common + ["--precisions", precision, "--batches", str(batch)]
                for cache in (("none",) if path == "no-compile" else ("empty", "warm")):
                    runs.append(({"path": path, "cache": cache}, env, argv))
    return runs


def run_child(argv: list, env_changes: dict) -> list:
    """Runs this script in a new Python process; its JSON lines."""
    env = {**os.environ, **env_changes}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve())] + argv, env=env, capture_output=True,
                          text=True)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0:
        rows.append({"kind": "error", "returncode": done.returncode, "stderr": done.stderr[-2000:]})
    return rows


def fresh_process(args, report, runner=run_child):
    with tempfile.TemporaryDirectory(prefix="hyperstyle-compile-cache-") as root:
        for fields, env, argv in fresh_process_runs(args, Path(root)):
            start = time.perf_counter()
            rows = runner(argv, env)
            process_s = round(time.perf_counter() - start, 1)
            found = [r for r in rows if r.get("kind") in ("first_call", "error")]
            if not found:
                found = [{"kind": "error", "stderr": "the child printed no first_call line"}]
            for row in found:
                row = {k: v for k, v in row.items() if k not in report.common}
                report(**{**row, **fields, "process_s": process_s})


def print_table(rows):
    lines = []
    if any(r["kind"] == "invert+decode" for r in rows):
        lines += ["| GPU | batch | precision | invert+decode ms/image | decode ms/image | peak alloc GiB | "
                  "peak reserved GiB | PSNR vs fp32 dB | official ms/image | ours faster |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
    decode = {(r["batch"], r["precision"]): r for r in rows if r["kind"] == "decode"}
    official = {(r["batch"], r["precision"]): r for r in rows if r["kind"] == "official" and r.get("ms_per_image")}
    for r in rows:
        if r["kind"] != "invert+decode":
            continue
        d = decode.get((r["batch"], r["precision"]), {})
        o = official.get((r["batch"], r["precision"]))
        faster = f"{o['ms_per_image'] / r['ms_per_image']:.2f}x" if o else "-"
        lines.append(f"| {r['gpu']} | {r['batch']} | {r['precision']} | {r['ms_per_image']} | "
                     f"{d.get('ms_per_image')} | {r['peak_alloc_gib']} | {r['peak_reserved_gib']} | "
                     f"{r['psnr_vs_fp32'] if r['psnr_vs_fp32'] is not None else '-'} | "
                     f"{o['ms_per_image'] if o else '-'} | {faster} |")
    first = [r for r in rows if r["kind"] == "first_call" and "path" in r]
    if first:
        lines += ["| GPU | path | batch | precision | compile cache | first call s | whole process s |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['gpu']} | {r['path']} | {r['batch']} | {r['precision']} | {r['cache']} | "
                  f"{r['first_call_s']} | {r['process_s']} |" for r in first]
    print("\n".join(lines), flush=True)


def add_model_arguments(p: argparse.ArgumentParser, precisions: str) -> None:
    """--device, --size, --tiny, --batches and --precisions (default `precisions`), as the model benchmarks take them."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=1024, help="generator resolution")
    p.add_argument("--tiny", action="store_true", help="tiny.py's narrow widths (CPU smoke tests)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--precisions", default=precisions)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, "fp32,tf32,fp16,bf16")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cudnn-benchmark", action="store_true", help="cuDNN autotuning (large memory transient)")
    p.add_argument("--chunk-check", type=int, default=0, metavar="N", help="batch of N vs one by one")
    p.add_argument("--chunk-precisions", default="fp32,fp16")
    p.add_argument("--chunk-modes", default="auto,forced",
                   help="auto: the planned chunks; forced: all N at once, halved when out of memory")
    p.add_argument("--memory-cap-gib", type=float, default=8.0, help="GPU memory budget for --chunk-check")
    p.add_argument("--parity", action="store_true", help="GPU vs CPU fp32 on tiny released-format checkpoints")
    p.add_argument("--parity-sizes", default="128,256")
    p.add_argument("--profile", action="store_true", help="print the top kernels of one eager inversion")
    p.add_argument("--profile-rows", type=int, default=30)
    p.add_argument("--skip-bench", action="store_true", help="only the checks")
    p.add_argument("--fresh-process", action="store_true",
                   help="first calls in new processes, empty and warm compile caches (implies --skip-bench)")
    p.add_argument("--paths", default="default,no-compile",
                   help="--fresh-process: default, no-compile and/or compile (torch.compile)")
    p.add_argument("--first-call-only", action="store_true", help=argparse.SUPPRESS)  # a --fresh-process child
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="neither Triton kernels nor torch.compile: PyTorch only (HYPERSTYLE_COMPILE=0)")
    p.add_argument("--torch-compile", action="store_true",
                   help="torch.compile the elementwise steps instead of the Triton kernels (HYPERSTYLE_COMPILE=1)")
    p.add_argument("--no-graphs", dest="graphs", action="store_false", help="no CUDA graphs")
    p.add_argument("--label", default="", help="free text added to every line")
    p.add_argument("--out", default=None, help="append JSON lines to this file")
    p.add_argument("--table", action="store_true", help="print a markdown table at the end")
    p.add_argument("--official", default=None, metavar="DIR",
                   help="also time the official code from this checkout of yuval-alaluf/hyperstyle (official_hyperstyle.py)")
    p.add_argument("--no-build-ops", dest="build_ops", action="store_false",
                   help="official: use plain-PyTorch stand-ins for its CUDA ops without trying to build them")
    p.add_argument("--build-timeout", type=float, default=150, help="seconds for building the official CUDA ops")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.precisions = args.precisions.split(",")
    args.chunk_precisions = args.chunk_precisions.split(",")
    args.chunk_modes = args.chunk_modes.split(",")
    unknown = set(args.chunk_modes) - {"auto", "forced"}
    if unknown:
        p.error(f"--chunk-modes: unknown {', '.join(sorted(unknown))} (use auto and/or forced)")
    args.parity_sizes = [int(s) for s in args.parity_sizes.split(",")]
    args.paths = args.paths.split(",")
    if set(args.paths) - set(PATHS):
        p.error(f"--paths: unknown {', '.join(sorted(set(args.paths) - set(PATHS)))} (use {', '.join(PATHS)})")
    if args.fresh_process or args.first_call_only:
        args.skip_bench = True
    if args.official and args.tiny:
        p.error("--tiny narrows only our networks; the official code runs the released widths (use --size 256 for a "
                "smaller generator instead)")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if not args.compile:  # else HYPERSTYLE_COMPILE decides (Triton kernels unless it is 0 or 1)
        set_compile(False)
    elif args.torch_compile:
        set_compile(True)

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = Report(args.out, {"gpu": gpu, "size": args.size, "tiny": args.tiny, "cudnn_benchmark": args.cudnn_benchmark,
                               "compile": args.compile, "torch_compile": args.torch_compile, "graphs": args.graphs, "label": args.label})
    report(kind="env", torch=torch.__version__, cuda=torch.version.cuda,
           cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
           default_tf32_conv=torch.backends.cudnn.allow_tf32, default_tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
           n_iters=args.iters, reps=args.reps, warmup=args.warmup)

    if args.fresh_process:
        fresh_process(args, report)
    if not args.skip_bench or args.chunk_check or args.profile or args.first_call_only:
        start = time.perf_counter()
        master = build_model(args.size, args.tiny)
        print(f"# built the model in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    if not args.skip_bench:
        images = test_images(max(args.batches))
        reference = {}
        order = sorted(args.precisions, key=lambda p: p != "fp32")  # fp32 first: the PSNR reference
        for precision in order:
            bench_precision(master, precision, args, device, images, reference, report)
    if args.official and not args.skip_bench:
        sys.path.insert(0, str(Path(__file__).resolve().parent))  # official_code, also when loaded by file path
        import official_hyperstyle

        official_hyperstyle.bench(args, device, report, images, precision_flags, sync, memory)
    if args.first_call_only:
        first_call(master, args, device, report)
    if args.profile:
        profile(master, args, device)
    if args.chunk_check:
        chunk_check(master, args, device, report)
    if args.parity and device.type != "cpu":
        parity_check(args, device, report)
    if args.table:
        print_table(report.rows)
    return report.rows


if __name__ == "__main__":
    main()
