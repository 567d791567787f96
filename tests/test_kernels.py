"""The Triton kernels (the default GPU inference path) give the numbers of their PyTorch twins (the path CI, the CPU,
MPS and Triton-less installs run), and the package works without Triton."""
import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hyperstyle_nodes.stylegan2 as stylegan2_package
from hyperstyle_nodes.stylegan2 import generator as stylegan2
from hyperstyle_nodes.stylegan2 import kernels
from hyperstyle_nodes.tiny import randomize_, tiny_generator_config

TESTS = Path(__file__).resolve().parent
HAS_TRITON = importlib.util.find_spec("triton") is not None
ON_GPU = torch.cuda.is_available() and HAS_TRITON


def triton_version() -> tuple:
    from importlib.metadata import version

    return tuple(int(part) for part in version("triton").split(".")[:2])


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed: the PyTorch path is all there is to test")
@pytest.mark.skipif(HAS_TRITON and triton_version() < (3, 8),
                    reason="Triton before 3.8: its interpreter hands a kernel's run-time loop bound to range() as a "
                           "one-element array, which raises TypeError (seen with 3.6); the compiled kernels are "
                           "checked on the GPU instead (test_kernels_match_their_pytorch_twins_on_the_gpu)")
def test_kernels_match_their_pytorch_twins_in_tritons_interpreter():
    """Every kernel and layout, on the CPU through Triton's interpreter (it must be on before Triton is imported,
    hence the subprocess)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, str(TESTS / "kernel_checks.py"), "cpu", "float32", "bfloat16"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "kernel checks passed" in run.stdout, run.stdout + run.stderr[-4000:]


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU with Triton (CI runs the PyTorch path on the CPU)")
def test_kernels_match_their_pytorch_twins_on_the_gpu():
    import kernel_checks  # noqa: F401 - tests/ is on sys.path under pytest's rootdir conftest

    kernel_checks.check_all(torch.device("cuda"))


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU with Triton (CI runs the PyTorch path on the CPU)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generator_on_triton_kernels_matches_the_pytorch_path(dtype, monkeypatch):
    """A whole generator pass with per-sample offsets (256 px at batch 2: every upsampling form): the default GPU
    path against HYPERSTYLE_COMPILE=0's. In bf16 both are held to the fp32 result: the kernels round once per step
    where PyTorch rounds after every operation, so they may not be further from it."""
    torch.manual_seed(0)
    gen = randomize_(stylegan2.Generator(tiny_generator_config(256)), torch.Generator().manual_seed(1)).eval()
    gen = gen.to(device="cuda")
    codes = torch.randn(2, gen.n_styles, gen.style_dim, device="cuda")
    deltas = [0.1 * torch.randn(2, o, i, device="cuda") if layer % 2 else None
              for layer, (_, i, o) in enumerate(gen.config.layer_shapes)]
    monkeypatch.setattr(stylegan2, "_COMPILE", copy.deepcopy(stylegan2._MODES["torch"]))
    with torch.no_grad():
        reference = gen(codes, deltas).float()
    gen = gen.to(dtype)
    codes, deltas = codes.to(dtype), [None if d is None else d.to(dtype) for d in deltas]
    images = {}
    # fp32 is compared in strict fp32: with TF32 convolutions (PyTorch's default) the kernels' last-bit differences
    # in the weights move TF32's rounding of whole products, which reached 1e-4 on an H100
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", dtype != torch.float32)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    for mode in ("torch", "triton"):
        monkeypatch.setattr(stylegan2, "_COMPILE", copy.deepcopy(stylegan2._MODES[mode]))
        with torch.no_grad():
            images[mode] = gen(codes, deltas).float()
    assert kernels.available()
    if dtype == torch.float32:
        torch.testing.assert_close(images["triton"], images["torch"], rtol=1e-4, atol=1e-4)
    else:
        rms = {mode: (image - reference).pow(2).mean().sqrt().item() for mode, image in images.items()}
        assert rms["triton"] <= 1.5 * rms["torch"] + 1e-3, rms


def test_modes_follow_hyperstyle_compile(monkeypatch):
    """Unset: Triton kernels; 0: PyTorch only; 1: torch.compile. set_compile(False) is the PyTorch-only path."""
    monkeypatch.setattr(stylegan2, "_COMPILE", dict(stylegan2._MODES["triton"]))
    for value, mode in ((None, "triton"), ("", "triton"), ("0", "torch"), ("1", "compile")):
        assert stylegan2.mode_from_env(value) == mode
    stylegan2.set_compile(False)
    assert stylegan2._COMPILE == stylegan2._MODES["torch"] and not stylegan2.compile_enabled()
    stylegan2.set_kernels("triton")
    assert stylegan2.compile_enabled()  # a first GPU call may compile Triton kernels: the warm-up notice shows
    with pytest.raises(ValueError, match="unknown kernel mode"):
        stylegan2.set_kernels("cuda")


def test_the_cpu_and_autograd_never_take_the_kernels(monkeypatch):
    monkeypatch.setattr(stylegan2, "_COMPILE", dict(stylegan2._MODES["triton"]))
    monkeypatch.setattr(kernels, "available", lambda: True)
    with torch.no_grad():
        assert not stylegan2.triton_runs(torch.zeros(1))
    cuda_like = type("FakeCuda", (), {"is_cuda": True})()
    with torch.no_grad():
        assert stylegan2.triton_runs(cuda_like)
    with torch.enable_grad():
        assert not stylegan2.triton_runs(cuda_like)  # training keeps the PyTorch path
    monkeypatch.setattr(stylegan2, "_COMPILE", dict(stylegan2._MODES["torch"]))
    with torch.no_grad():
        assert not stylegan2.triton_runs(cuda_like)


def test_without_triton_the_kernels_step_aside(monkeypatch):
    """A Triton-less install (Windows, macOS): importing the kernels fails quietly and the generator runs its
    PyTorch steps (same numbers as before)."""
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.delitem(sys.modules, "hyperstyle_nodes.stylegan2.triton_kernels", raising=False)
    monkeypatch.delattr(stylegan2_package, "triton_kernels", raising=False)  # else `from ... import` finds it
    monkeypatch.setattr(kernels, "_STATE", {"module": None, "failed": False, "announced": False})
    assert not kernels.available()
    monkeypatch.setattr(stylegan2, "_COMPILE", dict(stylegan2._MODES["triton"]))
    cuda_like = type("FakeCuda", (), {"is_cuda": True})()
    with torch.no_grad():
        assert not stylegan2.triton_runs(cuda_like)
    gen = stylegan2.Generator(tiny_generator_config(32)).eval()
    with torch.no_grad():
        assert torch.isfinite(gen(torch.randn(1, gen.n_styles, gen.style_dim))).all()


def test_a_failing_kernel_hands_over_to_pytorch_with_a_warning(monkeypatch):
    broken = type("Broken", (), {"__getitem__": lambda self, grid: self._fail})()
    broken._fail = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no C compiler"))
    fake = type("FakeModule", (), {"styled_activation_kernel": broken})()
    monkeypatch.setattr(kernels, "_STATE", {"module": fake, "failed": False, "announced": True})
    y = torch.zeros(1, 2, 2, 2)
    with pytest.warns(UserWarning, match="styled_activation_kernel failed"):
        assert kernels.styled_activation(y, torch.zeros(1, 1, 2, 2), torch.zeros(1), torch.zeros(2),
                                         torch.empty_like(y)) is None
    assert not kernels.available()  # from then on the PyTorch steps run


def tiny_backbones(device, dtype):
    """A tiny hypernetwork (ResNet-34 layout) and W-encoder (IR-SE-50 layout: both shortcut kinds) with non-trivial
    batch norm statistics and slopes, channels-last as the model keeps them, and inputs for each."""
    from hyperstyle_nodes.engines.hyperstyle.encoders import build_encoder
    from hyperstyle_nodes.engines.hyperstyle.hypernetwork import HyperNetwork
    from hyperstyle_nodes.tiny import tiny_encoder_config, tiny_hypernet_config

    rng = torch.Generator().manual_seed(3)
    gen_config = tiny_generator_config(64)
    hypernet = randomize_(HyperNetwork(tiny_hypernet_config(gen_config)), rng).eval()
    encoder = randomize_(build_encoder(tiny_encoder_config("w_encoder", gen_config)), rng).eval()
    nets = [net.to(device=device, dtype=dtype).to(memory_format=torch.channels_last) for net in (hypernet, encoder)]
    inputs = [torch.randn(2, c, 64, 64, generator=rng).to(device=device, dtype=dtype)
              .contiguous(memory_format=torch.channels_last) for c in (6, 3)]
    return nets, inputs


def fused_and_plain(hypernet, encoder, x6, x3):
    from hyperstyle_nodes.engines.hyperstyle import fused_backbones

    with torch.no_grad():
        fused = [fused_backbones.resnet_features(hypernet, x6)] + fused_backbones.irse_stages(encoder, x3)
        plain = [hypernet.features(x6)] + encoder.stages(x3)
    return fused, plain


def test_fused_backbones_give_the_modules_numbers_on_the_cpu():
    """The GPU inference path's backbones (batch norm folded into a scale and shift, one pass after each
    convolution, the subsampling shortcut read in place), here with the PyTorch twin of the kernel, against the
    modules' own forward (what the CPU, training and the official code run)."""
    (hypernet, encoder), (x6, x3) = tiny_backbones("cpu", torch.float32)
    fused, plain = fused_and_plain(hypernet, encoder, x6, x3)
    assert len(fused) == 5
    for got, want in zip(fused, plain):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_folded_batch_norm_follows_its_weights():
    from hyperstyle_nodes.engines.hyperstyle import fused_backbones

    bn = randomize_(torch.nn.BatchNorm2d(4), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(2, 4, 3, 3)
    for _ in range(2):  # the second time from the cache, after an in-place update
        scale, shift = fused_backbones.folded_batch_norm(bn)
        with torch.no_grad():
            torch.testing.assert_close(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), bn(x))
            bn.running_mean.add_(1.0)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU with Triton (CI runs the PyTorch path on the CPU)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backbones_on_triton_kernels_match_the_modules(dtype, monkeypatch):
    """Both backbones through HyperNetwork.features / IRSEBackbone.stages: the default GPU path (the Triton
    epilogue) against the modules' forward (HYPERSTYLE_COMPILE=0). fp32 in strict fp32; bf16 held to fp32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    (hypernet, encoder), (x6, x3) = tiny_backbones("cuda", torch.float32)
    monkeypatch.setattr(stylegan2, "_COMPILE", copy.deepcopy(stylegan2._MODES["torch"]))
    _, reference = fused_and_plain(hypernet, encoder, x6, x3)
    hypernet, encoder, x6, x3 = (t.to(dtype) for t in (hypernet, encoder, x6, x3))
    results = {}
    for mode in ("torch", "triton"):
        monkeypatch.setattr(stylegan2, "_COMPILE", copy.deepcopy(stylegan2._MODES[mode]))
        with torch.no_grad():
            results[mode] = [hypernet.features(x6)] + encoder.stages(x3)
    assert_triton_matches(results, reference, dtype)


def assert_triton_matches(results, reference, dtype):
    """results["triton"] against results["torch"] (the modules' forward): in fp32 within 1e-4; in bf16 no further
    from the fp32 reference than 1.5x the PyTorch path's own bf16 error."""
    assert kernels.available()
    for got, plain, ref in zip(results["triton"], results["torch"], reference):
        if dtype == torch.float32:
            torch.testing.assert_close(got, plain, rtol=1e-4, atol=1e-4)
        else:
            err = (got.float() - ref).pow(2).mean().sqrt().item()
            assert err <= 1.5 * (plain.float() - ref).pow(2).mean().sqrt().item() + 1e-3


def tiny_sfe_networks(device, dtype):
    """SFE's tiny inverter (IResNet blocks with and without projection, the content layer, the fuser) and a feature
    editor, channels-last as load_sfe keeps them, with inputs for each."""
    from hyperstyle_nodes.engines.sfe.feature_editor import FeatureStack, FeatureStackConfig
    from hyperstyle_nodes.engines.sfe.inverter import Inverter, InverterConfig
    from hyperstyle_nodes.tiny import TINY_SFE_UNITS, TINY_SFE_WIDTHS

    rng = torch.Generator().manual_seed(4)
    inverter = Inverter(InverterConfig(n_styles=6, style_dim=16, widths=TINY_SFE_WIDTHS, units=TINY_SFE_UNITS,
                                       content_channels=12, fuser=FeatureStackConfig(24, 12, blocks=2)))
    editor = FeatureStack(FeatureStackConfig(24, 12, blocks=3))
    nets = [randomize_(net, rng).eval().to(device=device, dtype=dtype).to(memory_format=torch.channels_last)
            for net in (inverter, editor)]
    inputs = [torch.randn(2, c, s, s, generator=rng).to(device=device, dtype=dtype) for c, s in ((3, 64), (24, 16))]
    return nets, inputs


def sfe_outputs(inverter, editor, x, features):
    with torch.no_grad():
        codes, content = inverter.fs_backbone(x)
        return [codes, content, inverter.fuser(features), editor(features)]


def test_fused_sfe_networks_give_the_modules_numbers_on_the_cpu(monkeypatch):
    """SFE's inverter and feature stacks on the GPU inference path (here with the kernel's PyTorch twin) against
    the modules' own forward."""
    from hyperstyle_nodes.engines.hyperstyle import fused_backbones

    (inverter, editor), (x, features) = tiny_sfe_networks("cpu", torch.float32)
    plain = sfe_outputs(inverter, editor, x, features)
    taken = []
    monkeypatch.setattr(fused_backbones, "applies", lambda module, t: taken.append(type(module).__name__) or True)
    fused = sfe_outputs(inverter, editor, x, features)
    assert {"FSBackbone", "ImprovedBasicBlock", "FeatureStack"} <= set(taken)
    for got, want in zip(fused, plain):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU with Triton (CI runs the PyTorch path on the CPU)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sfe_networks_on_triton_kernels_match_the_modules(dtype, monkeypatch):
    """The default GPU path (Triton epilogue) against the modules' forward (HYPERSTYLE_COMPILE=0), as for
    HyperStyle's backbones: fp32 in strict fp32, bf16 held to fp32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    (inverter, editor), (x, features) = tiny_sfe_networks("cuda", torch.float32)
    monkeypatch.setattr(stylegan2, "_COMPILE", copy.deepcopy(stylegan2._MODES["torch"]))
    reference = sfe_outputs(inverter, editor, x, features)
    inverter, editor, x, features = (t.to(dtype) for t in (inverter, editor, x, features))
    results = {}
    for mode in ("torch", "triton"):
        monkeypatch.setattr(stylegan2, "_COMPILE", copy.deepcopy(stylegan2._MODES[mode]))
        results[mode] = sfe_outputs(inverter, editor, x, features)
    assert_triton_matches(results, reference, dtype)
