"""Running an official implementation beside ours in the benchmarks (bench_sfe.py, bench_pipeline.py --official):
building its StyleGAN2 CUDA ops in a child process, or plain-PyTorch stand-ins where they cannot build, and small
patching helpers. Nothing from the official code is here; the checkout is given on the command line."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def reference_ops_module(name: str) -> types.ModuleType:
    """Plain-PyTorch stand-ins for an official StyleGAN2 `op` package (rosinality's fused_act + upfirdn2d CUDA
    extensions, which HyperStyle and StyleFeatureEditor both carry),
    written from their definitions: fused_leaky_relu = leaky_relu(x + bias, 0.2) * sqrt(2); upfirdn2d = zero-insertion
    upsampling, padding (negative: cropping), a true convolution with the FIR kernel, then subsampling."""
    module = types.ModuleType(name)

    def fused_leaky_relu(input, bias, negative_slope=0.2, scale=2 ** 0.5):
        shape = [1, -1] + [1] * (input.ndim - 2)
        return F.leaky_relu(input + bias.view(shape).to(input.dtype), negative_slope) * scale

    class FusedLeakyReLU(nn.Module):
        def __init__(self, channel, negative_slope=0.2, scale=2 ** 0.5):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(channel))
            self.negative_slope, self.scale = negative_slope, scale

        def forward(self, input):
            return fused_leaky_relu(input, self.bias, self.negative_slope, self.scale)

    def upfirdn2d(input, kernel, up=1, down=1, pad=(0, 0)):
        b, c, h, w = input.shape
        x = input.reshape(b * c, 1, h, 1, w, 1)
        if up > 1:
            x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(b * c, 1, h * up, w * up)
        p0, p1 = pad
        x = F.pad(x, [max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)])
        x = x[..., max(-p0, 0):x.shape[-2] - max(-p1, 0), max(-p0, 0):x.shape[-1] - max(-p1, 0)]
        x = F.conv2d(x, torch.flip(kernel, [0, 1])[None, None].to(x.dtype))
        x = x[..., ::down, ::down]
        return x.reshape(b, c, x.shape[-2], x.shape[-1])

    module.fused_leaky_relu, module.FusedLeakyReLU, module.upfirdn2d = fused_leaky_relu, FusedLeakyReLU, upfirdn2d
    return module


def stub(name: str, **attrs) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module


def cuda_home():
    """The CUDA toolkit's root (bin/nvcc and lib64/libcudart.so): torch guesses it from nvcc's folder, which for a
    wrapper script in /usr/local/bin gives /usr/local, where the link then finds no libcudart."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                  *sorted(str(p) for p in Path("/usr/local").glob("cuda-*"))[::-1]]
    for home in filter(None, candidates):
        if Path(home, "bin", "nvcc").exists() and any(Path(home).glob("lib*/libcudart.so*")):
            return home
    return None


def build_official_ops(root: Path, package: str, device: torch.device, timeout: float) -> str:
    """Build the official CUDA extensions of the op package `package` (dotted, under the checkout `root`) in child
    processes (so a hang or a compiler error cannot take this process down), within `timeout` seconds; return
    "cuda-ext" when they load and run, else "reference (why)"."""
    if device.type != "cuda":
        return "reference (not a CUDA device)"
    missing = [tool for tool in ("nvcc", "ninja") if shutil.which(tool) is None
               and not (tool == "nvcc" and os.environ.get("CUDA_HOME") and
                        Path(os.environ["CUDA_HOME"], "bin", "nvcc").exists())]
    if missing:
        return f"reference ({' and '.join(missing)} not found: the CUDA extensions cannot build)"
    # pip's CUDA wheels carry headers (cusparse.h, ...) that torch's extension headers include but a bare toolkit
    # may lack; CPATH reaches both the host compiler and nvcc without changing the build's hash
    wheel_includes = [str(d) for d in sorted(Path(torch.__file__).resolve().parents[1].glob("nvidia/*/include"))]
    if wheel_includes:
        os.environ["CPATH"] = os.pathsep.join(wheel_includes + [p for p in [os.environ.get("CPATH")] if p])
    home = cuda_home()
    if home:
        os.environ["CUDA_HOME"] = home
    env = dict(os.environ)
    if "TORCH_CUDA_ARCH_LIST" not in env:
        major, minor = torch.cuda.get_device_capability(device)
        env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    op_dir = root.joinpath(*package.split("."))
    # the two extensions compile in parallel, with the official load() arguments (so the official import below
    # finds them built); then a child imports the official op package and runs both ops
    builds = [subprocess.Popen([sys.executable, "-c", "import sys; from torch.utils.cpp_extension import load; "
                                f"load({name!r}, sources=[{str(op_dir / cpp)!r}, {str(op_dir / cu)!r}])"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
              for name, cpp, cu in (("fused", "fused_bias_act.cpp", "fused_bias_act_kernel.cu"),
                                    ("upfirdn2d", "upfirdn2d.cpp", "upfirdn2d_kernel.cu"))]
    code = (f"import sys; sys.path.insert(0, {str(root)!r}); import torch; "
            f"import {package} as op; x = torch.randn(2, 4, 8, 8, device='cuda'); "
            f"op.fused_leaky_relu(x, torch.zeros(4, device='cuda')); "
            f"op.upfirdn2d(x, torch.ones(4, 4, device='cuda'), up=2, pad=(2, 1)); torch.cuda.synchronize()")
    start = time.perf_counter()
    try:
        for build in builds:
            build.communicate(timeout=max(1.0, timeout - (time.perf_counter() - start)))
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              timeout=max(1.0, timeout - (time.perf_counter() - start)))
    except subprocess.TimeoutExpired:
        for build in builds:  # the compilers too: they would steal the CPU from the timing
            if build.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(build.pid, 9)
        return f"reference (the CUDA extensions did not build within {timeout:.0f} s)"
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"reference (the CUDA extensions failed to build or run: {tail[0][:200]})"
    os.environ["TORCH_CUDA_ARCH_LIST"] = env["TORCH_CUDA_ARCH_LIST"]  # the same build hash: the cached build loads
    print(f"# built the official CUDA extensions in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return "cuda-ext"




@contextlib.contextmanager
def patched(obj, name, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)
