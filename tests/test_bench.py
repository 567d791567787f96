"""CPU smoke test of benchmarks/bench_pipeline.py at a tiny size: it runs and writes well-formed JSON lines."""
import importlib.util
import json
import types
from pathlib import Path

import pytest
import torch

from graph_replay import GraphReplay  # tests/ is on sys.path under pytest's rootdir conftest
from hyperstyle_nodes.engines.hyperstyle.model import HyperStyleModel

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_bench():
    return load_benchmark("bench_pipeline")


def test_bench_pipeline_on_cpu(tmp_path):
    out = tmp_path / "results.jsonl"
    load_bench().main(["--device", "cpu", "--tiny", "--size", "32", "--batches", "1,2", "--precisions", "fp32,bf16",
                       "--iters", "1", "--reps", "1", "--warmup", "1", "--chunk-check", "2",
                       "--chunk-precisions", "fp32", "--out", str(out), "--table"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["kind"] == "env" and rows[0]["torch"]
    timed = [r for r in rows if r["kind"] in ("invert+decode", "decode")]
    assert {(r["kind"], r["batch"], r["precision"]) for r in timed} == {
        (k, b, p) for k in ("invert+decode", "decode") for b in (1, 2) for p in ("fp32", "bf16")}
    for r in timed:
        assert r["ms_per_image"] > 0 and r["gpu"] == "cpu" and r["size"] == 32
        assert {"peak_alloc_gib", "peak_reserved_gib"} <= set(r)
    pipeline = {(r["batch"], r["precision"]): r for r in timed if r["kind"] == "invert+decode"}
    assert pipeline[(1, "fp32")]["psnr_vs_fp32"] is None and pipeline[(2, "fp32")]["finite"]
    assert pipeline[(2, "bf16")]["psnr_vs_fp32"] >= 30  # a real comparison, not a copy (that would be inf)
    chunked = [r for r in rows if r["kind"] == "chunked"]
    assert {r["mode"] for r in chunked} == {"auto", "forced"}
    for r in chunked:
        assert r["error"] is None and r["images_max_abs_diff"] <= 1e-5 and r["codes_max_abs_diff"] <= 1e-5


def test_out_of_memory_halves_the_chunk_and_keeps_results(tiny_model, face_batch):
    """Chunks that run out of GPU memory are retried in halves; the results equal one unchunked run (simulated on
    the CPU: chunks of more than one image raise CUDA's out-of-memory error)."""
    import warnings

    import torch

    images = torch.cat([face_batch, face_batch.flip(0), face_batch[:1]])  # 5 images
    whole = tiny_model.invert(images, n_iters=2)
    real_chunk = type(tiny_model)._invert_chunk
    sizes = []

    def tight(self, chunk, *args, **kwargs):
        sizes.append(chunk.shape[0])
        if chunk.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real_chunk(self, chunk, *args, **kwargs)

    steps = []
    try:
        type(tiny_model)._invert_chunk = tight
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            chunked = tiny_model.invert(images, n_iters=2, max_batch=4, on_step=lambda i, n: steps.append((i, n)))
    finally:
        type(tiny_model)._invert_chunk = real_chunk
        tiny_model._chunk_limit = None
    assert sizes[:3] == [4, 2, 1] and set(sizes[3:]) == {1}
    assert torch.allclose(chunked.images, whole.images, atol=1e-5)
    assert torch.allclose(chunked.codes, whole.codes, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(chunked.deltas, whole.deltas) if a is not None)
    assert len(chunked.steps) == 3 and chunked.steps[0].shape[0] == 5
    assert steps[-1][0] == steps[-1][1]  # progress ends at 100%


def test_graph_path_gives_the_eager_results(tiny_model, face_batch, monkeypatch):
    """The CUDA-graph code path (zero offsets before the first pass, flattened offsets, copies of the graph's
    buffers) returns what the eager path returns; checked on the CPU with a stand-in for the graph cache."""
    eager = tiny_model.invert(face_batch, n_iters=3)
    eager_decode = tiny_model.decode(eager.codes, eager.deltas)
    replay = GraphReplay()
    monkeypatch.setattr(type(tiny_model), "_graphs", lambda self: replay)
    graphed = tiny_model.invert(face_batch, n_iters=3)
    graphed_decode = tiny_model.decode(graphed.codes, graphed.deltas)
    assert replay.calls == ["start", "step", "step", "step", "decode"]
    assert torch.allclose(graphed.images, eager.images, atol=1e-6)
    assert torch.allclose(graphed.codes, eager.codes, atol=1e-6)
    for a, b in zip(graphed.deltas, eager.deltas):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6)
    for a, b in zip(graphed.steps, eager.steps):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(graphed_decode, eager_decode, atol=1e-6)


def test_graph_path_leaves_the_starting_offsets_alone(tiny_model, face_batch, monkeypatch):
    """The step graph accumulates offsets in place in its own tensors: offsets passed in to refine further must come
    back unchanged, and the result must be the eager one."""
    start = tiny_model.invert(face_batch, n_iters=1)
    kept = [None if d is None else d.clone() for d in start.deltas]
    eager = tiny_model.invert(face_batch, n_iters=2, codes=start.codes, deltas=start.deltas)
    replay = GraphReplay()
    monkeypatch.setattr(type(tiny_model), "_graphs", lambda self: replay)
    graphed = tiny_model.invert(face_batch, n_iters=2, codes=start.codes, deltas=start.deltas)
    assert replay.calls == ["step", "step"]
    assert all(torch.equal(a, b) for a, b in zip(start.deltas, kept) if a is not None)
    assert torch.allclose(graphed.images, eager.images, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(graphed.deltas, eager.deltas) if a is not None)


def test_starting_offsets_the_step_graph_does_not_carry_run_eagerly(tiny_model, face_batch, monkeypatch):
    """Offsets on a layer the hypernetwork does not tune (e.g. from another model) must not be dropped by the graph
    path: such a start runs eagerly and gives the eager result."""
    untuned = next(i for i, head in enumerate(tiny_model.hypernet.refinement_blocks) if head is None)
    k, c_in, c_out = tiny_model.generator.config.layer_shapes[untuned]
    deltas = [None] * tiny_model.generator.n_layers
    deltas[untuned] = 0.3 * torch.randn(1, c_out, c_in, k, k, generator=torch.Generator().manual_seed(0))
    codes = tiny_model.encode(face_batch)
    eager = tiny_model.invert(face_batch, n_iters=2, codes=codes, deltas=deltas)
    replay = GraphReplay()
    monkeypatch.setattr(type(tiny_model), "_graphs", lambda self: replay)
    graphed = tiny_model.invert(face_batch, n_iters=2, codes=codes, deltas=deltas)
    assert replay.calls == []
    assert torch.allclose(graphed.images, eager.images, atol=1e-6)
    assert graphed.deltas[untuned] is not None


def test_weights_watch_sees_replaced_weights(tiny_model):
    """Recorded CUDA graphs are keyed by the weights' addresses; the cheap check must see a replaced parameter (how
    ComfyUI patches weights) and weights moved in place, and copies must not inherit the original's graphs."""
    import copy

    from hyperstyle_nodes.stylegan2.cuda_graphs import WeightsWatch, weights_signature

    model = copy.deepcopy(tiny_model)
    assert model._graph_cache is None
    watch = WeightsWatch()
    first = watch.signature(model)
    gathered = watch._tensors
    assert first == weights_signature(model)
    assert watch.signature(model) == first and watch._tensors is gathered  # nothing registered: no new walk
    conv = model.generator.conv1.conv
    conv.weight = torch.nn.Parameter(conv.weight.detach().clone())  # registers a parameter
    second = watch.signature(model)
    assert second != first and second == weights_signature(model)
    bias = model.generator.conv1.activate.bias
    bias.data = bias.data.clone()  # moved in place: no registration
    third = watch.signature(model)
    assert third != second and third == weights_signature(model)


def test_chunk_size_respects_a_per_process_memory_cap(monkeypatch):
    """mem_get_info reports the whole card; a cap set with set_per_process_memory_fraction must shrink the chunks."""
    gib = 1024 ** 3
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * gib, 140 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * gib)
    fraction = {"value": 1.0}
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: fraction["value"],
                        raising=False)
    model = types.SimpleNamespace(device=torch.device("cuda", 0))
    uncapped = HyperStyleModel._auto_chunk(model, batch=1000, per_image=gib)
    assert uncapped == int(0.8 * 101 * gib) // gib  # free memory plus what the cache holds unused
    fraction["value"] = 10 / 140  # a 10 GiB cap, 2 GiB of it in use
    assert HyperStyleModel._auto_chunk(model, batch=1000, per_image=gib) == int(0.8 * 8 * gib) // gib


def test_graphs_warm_up_on_one_stream_per_device(monkeypatch):
    """cuBLAS keeps a workspace per stream for the life of the process: recording graphs must not make new streams."""
    from hyperstyle_nodes.stylegan2 import cuda_graphs

    made = []
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: made.append(device) or object())
    monkeypatch.setattr(cuda_graphs, "_WARMUP_STREAMS", {})
    first = cuda_graphs.warmup_stream(torch.device("cuda", 0))
    assert cuda_graphs.warmup_stream(torch.device("cuda", 0)) is first
    assert cuda_graphs.warmup_stream(torch.device("cuda", 1)) is not first
    assert len(made) == 2


def test_chunk_check_runs_only_the_modes_asked_for(tmp_path):
    bench = load_bench()
    rows = bench.main(["--device", "cpu", "--tiny", "--size", "32", "--iters", "1", "--skip-bench",
                       "--chunk-check", "2", "--chunk-precisions", "fp32", "--chunk-modes", "auto"])
    assert [r["mode"] for r in rows if r["kind"] == "chunked"] == ["auto"]
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--chunk-modes", "auto,sometimes"])


def test_fresh_process_plan_isolates_each_shape_and_reuses_its_cache(tmp_path):
    """--fresh-process: per path, precision and batch a new process with an empty compile cache of its own, then one
    with the cache that run left (the default path only: without compiling there is no cache to warm)."""
    bench = load_bench()
    args = types.SimpleNamespace(device="cuda", size=1024, iters=5, tiny=False, graphs=True, paths=["default", "no-compile"],
                                 precisions=["tf32", "bf16"], batches=[1, 8])
    runs = bench.fresh_process_runs(args, tmp_path)
    assert len(runs) == 2 * 2 * 3  # 4 shapes x (empty + warm) on the default path, 4 x once without compiling
    by_shape = {}
    for fields, env, argv in runs:
        precision, batch = argv[argv.index("--precisions") + 1], int(argv[argv.index("--batches") + 1])
        assert "--first-call-only" in argv
        assert env["TORCHINDUCTOR_CACHE_DIR"].startswith(str(tmp_path))
        assert env["TRITON_CACHE_DIR"].startswith(str(tmp_path))
        assert (env.get("HYPERSTYLE_COMPILE") == "0") == (fields["path"] == "no-compile")
        by_shape.setdefault((fields["path"], precision, batch), []).append((fields["cache"], env["TORCHINDUCTOR_CACHE_DIR"]))
    assert len(by_shape) == 8
    for (path, _, _), caches in by_shape.items():
        assert [c for c, _ in caches] == (["empty", "warm"] if path == "default" else ["none"])
        assert len({folder for _, folder in caches}) == 1  # the warm run reads what the empty one wrote
    folders = {caches[0][1] for caches in by_shape.values()}
    assert len(folders) == 8  # no shape starts with another shape's kernels


def test_fresh_process_reports_each_child_and_its_failures(tmp_path):
    bench = load_bench()
    out = tmp_path / "rows.jsonl"
    calls = []

    def fake_child(argv, env):
        calls.append(env.get("HYPERSTYLE_COMPILE"))
        if len(calls) == 2:
            return [{"kind": "error", "returncode": 1, "stderr": "boom"}]
        return [{"kind": "env"}, {"kind": "first_call", "gpu": "x", "batch": 1, "precision": "bf16",
                                  "first_call_s": 1.5}]

    ns = types.SimpleNamespace(device="cpu", size=32, iters=1, tiny=True, graphs=True, paths=["default", "no-compile"],
                               precisions=["bf16"], batches=[1])
    report = bench.Report(str(out), {"gpu": "cpu"})
    bench.fresh_process(ns, report, runner=fake_child)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert calls == [None, None, "0"]
    assert [(r["kind"], r["path"], r["cache"]) for r in rows] == [
        ("first_call", "default", "empty"), ("error", "default", "warm"), ("first_call", "no-compile", "none")]
    assert rows[0]["first_call_s"] == 1.5 and rows[0]["gpu"] == "cpu" and rows[0]["process_s"] >= 0


def test_first_call_child_reports_one_line_per_shape(tmp_path, monkeypatch):
    """What a --fresh-process child runs (here in this process, on the CPU): one first_call line per shape; the
    HYPERSTYLE_COMPILE setting is left alone unless --no-compile is given."""
    bench = load_bench()
    seen = []
    monkeypatch.setattr(bench, "set_compile", lambda enabled: seen.append(enabled))
    rows = bench.main(["--device", "cpu", "--tiny", "--size", "32", "--iters", "1", "--first-call-only",
                       "--precisions", "fp32", "--batches", "1,2", "--table"])
    first = [r for r in rows if r["kind"] == "first_call"]
    assert [(r["batch"], r["precision"]) for r in first] == [(1, "fp32"), (2, "fp32")]
    assert all(r["first_call_s"] > 0 and r["second_call_ms_per_image"] > 0 for r in first)
    assert seen == []
    bench.main(["--device", "cpu", "--tiny", "--size", "32", "--iters", "1", "--first-call-only", "--no-compile",
                "--precisions", "fp32", "--batches", "1"])
    assert seen == [False]
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--fresh-process", "--paths", "default,turbo"])


# ---- benchmarks/bench_sfe.py (StyleFeatureEditor, ours vs the official code) -------------------------------------

def load_bench_sfe():
    return load_benchmark("bench_sfe")


def test_bench_sfe_on_cpu(tmp_path):
    out = tmp_path / "sfe.jsonl"
    rows = load_bench_sfe().main(["--device", "cpu", "--tiny", "--size", "128", "--input-size", "256",
                                  "--batches", "1,2", "--precisions", "fp32", "--reps", "1", "--warmup", "0",
                                  "--out", str(out), "--table"])
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == rows and rows[0]["kind"] == "env" and rows[0]["torch"]
    timed = [r for r in rows if r["kind"] == "sfe"]
    assert {(r["impl"], r["batch"], r["precision"]) for r in timed} == {("ours", 1, "fp32"), ("ours", 2, "fp32")}
    for r in timed:
        assert r["ms_per_image"] > 0 and r["invert_ms_per_image"] > 0 and r["edit_ms_per_image"] > 0
        # one timed call: the total is its two phases
        assert abs(r["invert_ms_per_image"] + r["edit_ms_per_image"] - r["ms_per_image"]) < 0.01
        assert r["finite"] and r["gpu"] == "cpu" and r["size"] == 128 and r["peak_alloc_gib"] is None


def test_official_reference_ops_follow_the_official_definitions():
    """The plain-PyTorch stand-ins for the official fused_act / upfirdn2d CUDA extensions (HyperStyle's and SFE's)."""
    load_bench_sfe()  # puts benchmarks/ on the path, as the benchmarks do
    ops = load_benchmark("official_code").reference_ops_module("op")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    bias = torch.tensor([0.5, -1.0, 2.0])
    expected = torch.where(x + bias[:, None, None] > 0, x + bias[:, None, None], 0.2 * (x + bias[:, None, None]))
    torch.testing.assert_close(ops.fused_leaky_relu(x, bias), expected * 2 ** 0.5)
    act = ops.FusedLeakyReLU(3)
    assert list(act.state_dict()) == ["bias"] and torch.equal(act(x), ops.fused_leaky_relu(x, torch.zeros(3)))
    torch.testing.assert_close(ops.fused_leaky_relu(x[:, :, 0, 0], bias), expected[:, :, 0, 0] * 2 ** 0.5)
    one = torch.ones(1, 1)
    up = ops.upfirdn2d(x, one, up=2)  # zero insertion
    assert up.shape == (2, 3, 16, 16) and torch.equal(up[..., ::2, ::2], x)
    assert up[..., 1::2, :].abs().sum() == 0 and up[..., :, 1::2].abs().sum() == 0
    assert torch.equal(ops.upfirdn2d(x, one, pad=(-1, -2)), x[..., 1:-2, 1:-2])  # negative padding crops
    assert torch.equal(ops.upfirdn2d(x, one, down=2), x[..., ::2, ::2])
    impulse = torch.zeros(1, 1, 5, 5)
    impulse[..., 2, 2] = 1
    kernel = torch.arange(9.0).view(3, 3)
    # a true convolution: the impulse response is the kernel itself, not its mirror image
    assert torch.equal(ops.upfirdn2d(impulse, kernel, pad=(1, 1))[0, 0, 1:4, 1:4], kernel)


def test_bench_sfe_official_needs_a_checkout(tmp_path):
    bench = load_bench_sfe()
    with pytest.raises(SystemExit, match="not a StyleFeatureEditor checkout"):
        bench.main(["--device", "cpu", "--official", str(tmp_path), "--skip-bench"])
    with pytest.raises(SystemExit):  # argparse: --parity needs the official code
        bench.main(["--device", "cpu", "--parity"])


@pytest.mark.skipif(not __import__("os").environ.get("HYPERSTYLE_OFFICIAL_DIR"),
                    reason="set HYPERSTYLE_OFFICIAL_DIR to a yuval-alaluf/hyperstyle checkout to time the official "
                           "code beside ours (CPU here: a few minutes)")
def test_bench_pipeline_times_the_official_code_beside_ours(tmp_path):
    """--official DIR in a fresh process (the official top-level `models` package would collide with other imports):
    its classes with random weights, its CUDA ops replaced by the stand-ins on the CPU; one "official" line per
    batch size in fp32, an error line for bf16 (it has no half precision), and the table's speed-up column."""
    import os
    import subprocess
    import sys

    out = tmp_path / "official.jsonl"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_pipeline.py"), "--device", "cpu", "--size", "256",
                           "--batches", "1", "--precisions", "fp32,bf16", "--iters", "1", "--reps", "1",
                           "--warmup", "1", "--official", os.environ["HYPERSTYLE_OFFICIAL_DIR"], "--table",
                           "--out", str(out)], capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    official = {r["precision"]: r for r in rows if r["kind"] == "official"}
    assert official["fp32"]["ms_per_image"] > 0 and official["fp32"]["finite"]
    assert official["fp32"]["ops"].startswith("reference")
    assert official["bf16"]["ms_per_image"] is None and "half-precision" in official["bf16"]["error"]
    assert "| official ms/image | ours faster |" in done.stdout


def test_bench_layers_on_cpu(tmp_path):
    """benchmarks/bench_layers.py runs every form of every upsampling layer (eagerly on the CPU) and reports each."""
    out = tmp_path / "layers.jsonl"
    rows = load_benchmark("bench_layers").main(["--device", "cpu", "--size", "16", "--batches", "1,2",
                                                "--precisions", "fp32", "--reps", "1", "--out", str(out)])
    forms = ("phases", "split", "transposed", "layer", "transposed+blur")
    assert {(r["level"], r["batch"], r["form"]) for r in rows} == {(lv, b, f) for lv in (0, 1) for b in (1, 2)
                                                                   for f in forms}
    assert all(r["error"] is None and r["ms_per_image"] > 0 for r in rows)
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    transposed = next(r for r in rows if r["form"] == "transposed" and r["level"] == 1)
    phases = next(r for r in rows if r["form"] == "phases" and r["level"] == 1)
    assert phases["gmac_per_image"] > transposed["gmac_per_image"]  # 36 taps against 16


def test_bench_generator_on_cpu(tmp_path):
    out = tmp_path / "generator.jsonl"
    rows = load_benchmark("bench_generator").main(["--device", "cpu", "--tiny", "--size", "32", "--batches", "1,2",
                                                   "--precisions", "fp32", "--reps", "1", "--out", str(out),
                                                   "--table"])
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert [(r["batch"], r["precision"], r["path"]) for r in rows] == [(1, "fp32", "default"), (2, "fp32", "default")]
    for r in rows:
        assert r["ms_per_image"] > 0 and r["kernels"] > 0
        assert abs(sum(r["family_ms"].values()) - r["profiled_ms"]) < 0.01


def test_bench_generator_sorts_kernels_into_families():
    family = load_benchmark("bench_generator").family
    assert family("styled_activation_kernel") == "activation"
    assert family("modulated_weight_kernel") == "weights"
    assert family("void nhwcSliceCKernel<__nv_bfloat16, __nv_bfloat16, float, true>") == "channel slices"
    assert family("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64") == \
        "convolution"
    assert family("void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop_optimized_bf16_64x64>") == \
        "convolution"
    assert family("nvjet_sm90_tst_256x40_64x5_2x1_v_bz_NNT") == "matmul"
    assert family("cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8") == "matmul"
    assert family("void at::native::vectorized_elementwise_kernel<4>") == "other"
