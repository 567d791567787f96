"""Each Triton kernel (`stylegan2/kernels.py`) against its PyTorch twin in generator.py, on one device.

Used by tests/test_kernels.py on a GPU, and in a subprocess under Triton's interpreter (TRITON_INTERPRET=1, CPU
tensors), where it runs as `python tests/kernel_checks.py`. Every layout the generator hands the kernels is covered:
packed activations, the upsampling phases (one or both row parities), noise shared or per sample, every offset kind,
the three weight forms, toRGB with and without the skip, NCHW or packed output.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hyperstyle_nodes.stylegan2 import generator as stylegan2  # noqa: E402
from hyperstyle_nodes.engines.hyperstyle import fused_backbones  # noqa: E402
from hyperstyle_nodes.stylegan2 import kernels  # noqa: E402


def close(got, want, dtype, what):
    """fp32: rounding only (FMA, summation order); half precision: within two of its roundings."""
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    assert got is not None, f"{what}: the kernel did not run"
    torch.testing.assert_close(got.float(), want.float(), **tol, msg=lambda m: f"{what}: {m}")


def check_activation(device, dtype):
    for channels in (5, 32):  # a partial channel tile, and whole ones (the kernel's unmasked, vectorised loads)
        check_activation_layouts(device, dtype, channels)


def activation_in_fp32(y, noise, noise_weight, bias):
    """The PyTorch twin on the inputs in fp32: the kernel computes in fp32 and rounds once (the twin in half
    precision rounds each step, which can differ by more than the tolerance where the terms cancel)."""
    return stylegan2._noise_and_activation(y.float(), noise.float(), noise_weight.float(), bias.float())


def check_activation_layouts(device, dtype, o):
    b, h, w = 2, 4, 6
    like = torch.empty(0, device=device, dtype=dtype)
    y = stylegan2.packed_empty(b, o, h, w, like=like)
    y.copy_(torch.randn(b, o, h, w))
    noise_weight = torch.tensor([0.7], device=device, dtype=dtype)
    bias = torch.randn(o, device=device, dtype=dtype)
    for noise_batch in (1, b):
        noise = torch.randn(noise_batch, 1, h, w, device=device, dtype=dtype)
        want = activation_in_fp32(y, noise, noise_weight, bias)
        got = kernels.styled_activation(y, noise, noise_weight, bias, stylegan2.packed_empty(b, o, h, w, like=y))
        close(got, want, dtype, f"activation, {o} channels, noise batch {noise_batch}")
    for n in (1, 2):  # an upsampling layer's phase convolution: one or both output row parities
        m = 2 * n
        conv = torch.randn(1, b * o * m, h, w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        part = conv.as_strided((b, o, h, n, w, 2), (m * o, m, w * b * m * o, 2, b * m * o, 1))
        noise = stylegan2.phase_view(torch.randn(1, 1, 2 * h, 2 * w, device=device, dtype=dtype))[:, :, :, :n]
        out = stylegan2.packed_empty(b, o, 2 * h, 2 * w, like=y).zero_()
        got = kernels.styled_activation(part, noise, noise_weight, bias, stylegan2.phase_view(out)[:, :, :, :n])
        close(got, activation_in_fp32(part, noise, noise_weight, bias), dtype, f"phases, {o} channels, n={n}")


def check_blurred_activation(device, dtype):
    """The transposed form's epilogue (blur, then noise + bias + activation, or the blur alone), on the layout the
    generator hands it: a [1, B*4*O, H+1, W+1] channels-last convolution output viewed as its phases."""
    b, h, w = 2, 4, 6
    taps = stylegan2.Blur(pad=(1, 1), gain=4).taps
    terms = stylegan2.blur_phase_terms(taps)
    like = torch.empty(0, device=device, dtype=dtype)
    noise_weight = torch.tensor([0.7], device=device, dtype=dtype)
    for o in (5, 32):  # a partial channel tile, and whole ones
        m = 4 * o
        conv = torch.randn(1, b * m, h + 1, w + 1, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
        t = conv.as_strided((b, 2, 2, o, h + 1, w + 1), (m, 2 * o, o, 1, (w + 1) * b * m, b * m))
        bias = torch.randn(o, device=device, dtype=dtype)
        blurred = stylegan2.blurred_phases(t.float(), terms)
        for noise_batch in (1, b):
            noise = stylegan2.phase_view(torch.randn(noise_batch, 1, 2 * h, 2 * w, device=device, dtype=dtype))
            out = stylegan2.packed_empty(b, o, 2 * h, 2 * w, like=like)
            got = kernels.blurred_activation(t, taps, noise, noise_weight, bias, stylegan2.phase_view(out))
            close(got, activation_in_fp32(blurred, noise, noise_weight, bias), dtype,
                  f"blurred activation, {o} channels, noise batch {noise_batch}")
        out = stylegan2.packed_empty(b, o, 2 * h, 2 * w, like=like)
        got = kernels.blurred_activation(t, taps, None, None, None, stylegan2.phase_view(out))
        close(got, blurred, dtype, f"blur alone, {o} channels")


def check_weights(device, dtype):
    for n_in in (5, kernels.WEIGHT_BLOCK_C):  # a partial input block, and whole ones
        check_weight_forms(device, dtype, n_in)


def check_weight_forms(device, dtype, n_in):
    weight = torch.randn(1, 6, n_in, 3, 3, device=device).to(dtype)
    style = torch.randn(2, n_in, device=device).to(dtype)
    deltas = [None, 0.3 * torch.randn(2, 6, n_in), 0.3 * torch.randn(1, 6, n_in),
              0.3 * torch.randn(2, 6, n_in, 3, 3), 0.3 * torch.randn(2, 6, n_in, 1, 1)]
    for delta in deltas:
        delta = None if delta is None else delta.to(device=device, dtype=dtype)
        for demodulate in (True, False):
            with torch.enable_grad():  # the plain formula (what training runs), not the kernels
                want = [stylegan2.modulated_weight(weight, 0.3, style, delta, demodulate, dtype),
                        stylegan2.padded_taps(weight, 0.3, style, delta, demodulate, dtype),
                        stylegan2.transposed_taps(weight, 0.3, style, delta, demodulate, dtype)]
            plain = torch.empty_like(want[0])
            padded = torch.empty_like(want[1])
            transposed = torch.empty_like(want[2])
            kinds = ("plain", "padded", "transposed")
            outs = (plain.permute(0, 1, 3, 4, 2), padded, transposed.permute(0, 1, 3, 4, 2))
            for kind, out, full, expected in zip(kinds, outs, (plain, padded, transposed), want):
                got = kernels.modulated_weights(weight, 0.3, style, delta, demodulate, out, kind)
                what = f"{kind} weights, offsets {None if delta is None else tuple(delta.shape)}, demod {demodulate}"
                close(None if got is None else full, expected, dtype, what)
    rgb = torch.randn(1, 3, n_in, 1, 1, device=device).to(dtype)
    for delta in (None, 0.3 * torch.randn(2, 3, n_in), 0.3 * torch.randn(1, 3, n_in, 1, 1)):
        delta = None if delta is None else delta.to(device=device, dtype=dtype)
        with torch.enable_grad():
            want = stylegan2.block_diagonal_weight(rgb, 0.3, style, delta, dtype)
        got = kernels.block_diagonal_weight(rgb, 0.3, style, delta, dtype)
        assert got is None or got.shape == want.shape
        close(got, want, dtype, "block-diagonal toRGB weight")


def check_rgb(device, dtype):
    b, h, w, n = 2, 8, 6, 8
    product = torch.randn(h * w, n, device=device, dtype=dtype)  # toRGB's [H*W, B*3 padded] product
    out = product.as_strided((b, 3, h, w), (3, 1, w * n, n))
    bias = torch.randn(1, 3, 1, 1, device=device, dtype=dtype)
    taps = stylegan2.Upsample().taps
    skips = (None, torch.randn(b, 3, h // 2, w // 2, device=device, dtype=dtype),
             torch.randn(h // 2, w // 2, b, 3, device=device, dtype=dtype).permute(2, 3, 0, 1))
    for skip in skips:
        want = stylegan2._rgb_output(out, bias, skip, taps)
        for contiguous in (False, True):
            got = kernels.rgb_output(out, bias, skip, taps, contiguous)
            close(got, want, dtype, f"toRGB output, skip {skip is not None}, contiguous {contiguous}")
            assert got.is_contiguous() == contiguous


def check_epilogue(device, dtype):
    """The encoders' one pass after a convolution: every activation, gate and residual form, including a residual
    read as a stride-2 view (IR-SE's subsampling shortcut)."""
    n, c, h, w = 2, 70, 5, 6  # channels beyond one 64-wide tile
    x = torch.randn(n, c, h, w, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    scale, shift = torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)
    slope = (0.25 * torch.randn(c, device=device)).to(dtype)
    gate = torch.rand(n, c, device=device).to(dtype)
    big = torch.randn(n, c, 2 * h, 2 * w, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    residuals = [(None, None, None), (x.flip(0).contiguous(memory_format=torch.channels_last), None, None),
                 (big[:, :, ::2, ::2], None, None), (x.flip(0), torch.rand(c, device=device), torch.randn(c, device=device))]
    for act in (0, 1, 2):
        for g in (None, gate):
            for residual, r_scale, r_shift in residuals:
                args = (x, scale, shift, act, slope if act == 2 else None, g, residual, r_scale, r_shift)
                got = kernels.channel_epilogue(*args)
                what = f"epilogue act {act}, gate {g is not None}, residual {residual is not None}, bn {r_scale is not None}"
                close(got, fused_backbones.epilogue_reference(*args), dtype, what)
                assert got.is_contiguous(memory_format=torch.channels_last), what


def check_all(device, dtypes=(torch.float32, torch.bfloat16, torch.float16)) -> None:
    assert kernels.available(), "Triton did not import"
    torch.manual_seed(0)
    with torch.no_grad():
        for dtype in dtypes:
            check_activation(device, dtype)
            check_blurred_activation(device, dtype)
            check_weights(device, dtype)
            check_rgb(device, dtype)
        for dtype in dtypes:
            check_epilogue(device, dtype)


if __name__ == "__main__":  # python tests/kernel_checks.py DEVICE [DTYPE ...]
    names = sys.argv[2:] or ["float32", "bfloat16", "float16"]
    check_all(torch.device(sys.argv[1] if len(sys.argv) > 1 else "cpu"), [getattr(torch, n) for n in names])
    print("kernel checks passed")
