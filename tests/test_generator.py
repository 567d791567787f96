"""StyleGAN2 generator: rosinality layout, plain-PyTorch ops, weight offsets."""
import warnings

import numpy as np
import pytest
import torch

import torch.nn.functional as F

from hyperstyle_nodes.stylegan2 import generator as stylegan2
from hyperstyle_nodes.stylegan2.generator import Generator, GeneratorConfig, ModulatedConv2d, Upsample, pack
from hyperstyle_nodes.tiny import make_generator, tiny_generator_config


def naive_upfirdn2d(x, k, up, down, pad):
    """Loop-based reference: zero-insert, pad, true convolution, subsample."""
    x, k = x.numpy(), k.numpy()
    b, c, h, w = x.shape
    up_x = np.zeros((b, c, h * up, w * up), x.dtype)
    up_x[:, :, ::up, ::up] = x
    p0, p1 = pad
    padded = np.pad(up_x, ((0, 0), (0, 0), (p0, p1), (p0, p1)))
    kh, kw = k.shape
    oh, ow = padded.shape[2] - kh + 1, padded.shape[3] - kw + 1
    out = np.zeros((b, c, oh, ow), x.dtype)
    for i in range(oh):
        for j in range(ow):
            window = padded[:, :, i:i + kh, j:j + kw]
            out[:, :, i, j] = (window * k[::-1, ::-1]).sum(axis=(2, 3))
    return torch.from_numpy(out[:, :, ::down, ::down])


def upfirdn2d(x, kernel, up=1, down=1, pad=(0, 0)):
    """The official upfirdn2d in plain PyTorch (zero-insert, pad, true convolution, subsample): the reference the
    generator's phase convolutions are checked against."""
    b, c, h, w = x.shape
    if up > 1:
        x = F.pad(x.reshape(b, c, h, 1, w, 1), (0, up - 1, 0, 0, 0, up - 1)).reshape(b, c, h * up, w * up)
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    weight = kernel.flip([0, 1]).to(x.dtype)[None, None].expand(c, 1, *kernel.shape)
    return F.conv2d(x, weight, stride=down, groups=c)


@pytest.mark.parametrize("up,down,pad", [(1, 1, (1, 2)), (2, 1, (2, 1)), (1, 2, (1, 1))])
def test_upfirdn2d_matches_loop_reference(up, down, pad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 7, generator=g)
    k = torch.rand(4, 4, generator=g)  # asymmetric, so a missing flip would show
    assert torch.allclose(upfirdn2d(x, k, up, down, pad), naive_upfirdn2d(x, k, up, down, pad), atol=1e-5)


def reference_modulated_conv(conv: ModulatedConv2d, x, w, delta=None):
    """The paper's formula with explicit per-sample weights (official code's structure), for comparison."""
    batch = x.shape[0]
    style = conv.modulation(w).view(batch, 1, -1, 1, 1)
    base = conv.weight if delta is None else conv.weight * (1 + delta)
    weight = conv.scale * base * style
    if conv.demodulate:
        weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8).view(batch, -1, 1, 1, 1)
    outs = []
    for b in range(batch):
        if conv.upsample:
            o = torch.nn.functional.conv_transpose2d(x[b:b + 1], weight[b].transpose(0, 1), stride=2)
            outs.append(upfirdn2d(o, conv.blur.kernel, pad=conv.blur.pad))
        else:
            outs.append(torch.nn.functional.conv2d(x[b:b + 1], weight[b], padding=conv.padding))
    return torch.cat(outs)


@pytest.mark.parametrize("upsample,form", [(False, None), (True, "transposed"), (True, "phases"),
                                           (True, "split phases")])
@pytest.mark.parametrize("kind", ["none", "full", "compact"])
def test_modulated_conv_matches_per_sample_reference(upsample, form, kind, monkeypatch):
    """Upsampling forms: a transposed convolution in phase form + blur (small layers), blur-folded phases in one
    convolution, or as two convolutions, one per output row parity (large layers at batch > 1)."""
    # (on the CPU the transposed form is never chosen by itself)
    monkeypatch.setattr(stylegan2, "transposed_up_to", lambda x: 10 ** 6 if form == "transposed" else 0)
    monkeypatch.setattr(stylegan2, "SPLIT_ROW_PARITIES_FROM", 1 if form == "split phases" else 10 ** 6)
    torch.manual_seed(0)
    conv = ModulatedConv2d(8, 6, 3, 16, upsample=upsample)
    x, w = torch.randn(3, 8, 5, 5), torch.randn(3, 16)
    delta = {"none": None, "full": 0.3 * torch.randn(3, 6, 8, 3, 3), "compact": 0.3 * torch.randn(3, 6, 8)}[kind]
    expanded = delta[..., None, None].expand(-1, -1, -1, 3, 3) if kind == "compact" else delta
    with torch.no_grad():
        ours = conv(x, w, delta)
        ref = reference_modulated_conv(conv, x, w, expanded)
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_to_rgb_conv_matches_per_sample_reference():
    """1x1 layers run as one product with a block-diagonal weight: each sample must still see only its own weights."""
    torch.manual_seed(2)
    conv = ModulatedConv2d(8, 3, 1, 16, demodulate=False)
    x, w = torch.randn(4, 8, 6, 6), torch.randn(4, 16)
    delta = 0.3 * torch.randn(4, 3, 8, 1, 1)
    with torch.no_grad():
        for d in (None, delta):
            ours, ref = conv(x, w, d), reference_modulated_conv(conv, x, w, d)
            assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
            alone = conv(x[2:3], w[2:3], None if d is None else d[2:3])
            assert torch.allclose(ours[2:3], alone, atol=1e-6)


def test_to_rgb_product_in_tf32_mode_puts_the_matmul_switch_back(monkeypatch):
    """On CUDA in fp32 under PyTorch's default flags, toRGB's product turns TF32 matrix products on for itself (the
    official layer is a convolution, which those flags let use TF32). Never on the CPU; forced on here, the layer
    asks for its product with the batch size, gives the same results (the switch does nothing on the CPU) and the
    switch is put back."""
    x = torch.randn(8, 4)
    assert not stylegan2.conv_product_uses_tf32(x, 2)  # CPU
    torch.manual_seed(3)
    conv = ModulatedConv2d(8, 3, 1, 16, demodulate=False)
    x, w = torch.randn(4, 8, 6, 6), torch.randn(4, 16)
    with torch.no_grad():
        plain = conv(x, w)
        calls = []

        def forced(t, batch):
            calls.append((tuple(t.shape), batch))
            return True

        monkeypatch.setattr(stylegan2, "conv_product_uses_tf32", forced)
        switched = conv(x, w)
    assert calls == [((36, 32), 4)]
    assert torch.equal(plain, switched)
    assert torch.backends.cuda.matmul.allow_tf32 is False


def test_skip_upsampling_matches_official_upfirdn2d():
    up = Upsample()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert torch.allclose(up(x), upfirdn2d(x, up.kernel, up=2, pad=(2, 1)), atol=1e-6)


@pytest.mark.parametrize("upsample", [False, True])
def test_modulated_conv_output_is_packed_and_layout_does_not_matter(upsample):
    """Activations may arrive in any layout; the result is the same and comes back packed."""
    torch.manual_seed(1)
    conv = ModulatedConv2d(5, 4, 3, 8, upsample=upsample)
    x, w = torch.randn(3, 5, 6, 6), torch.randn(3, 8)
    with torch.no_grad():
        a = conv(x, w)
        b = conv(x.contiguous(memory_format=torch.channels_last), w)
        c = conv(pack(x), w)
    assert a.shape == (3, 4, 12 if upsample else 6, 12 if upsample else 6)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert pack(a) is a


def test_compact_offsets_equal_official_expanded_form():
    """Compact per-channel offsets give the official expanded form's images. Not bit for bit: at inference the
    compact form's demodulation sums over [B, O, C] (`_factors`), the expanded one over every tap."""
    gen = make_generator(tiny_generator_config(64))
    codes = torch.randn(2, gen.n_styles, gen.style_dim)
    g = torch.Generator().manual_seed(3)
    compact = [None] * gen.n_layers
    for layer in (2, 3, 5, 11):
        _, c_in, c_out = gen.config.layer_shapes[layer]
        compact[layer] = 0.2 * torch.randn(2, c_out, c_in, generator=g)
    # the official RefinementBlock repeats per-channel values over the 3x3 kernel
    expanded = [None if d is None else d.unsqueeze(3).repeat(1, 1, 1, 3).unsqueeze(4).repeat(1, 1, 1, 1, 3)
                for d in compact]
    with torch.no_grad():
        a, b = gen(codes, compact), gen(codes, expanded)
        plain = gen(codes)
    assert torch.allclose(a, b, rtol=0, atol=2e-6), (a - b).abs().max()
    assert not torch.allclose(a, plain, atol=1e-3)  # the offsets do change the image


def test_rosinality_key_names_and_strict_load():
    config = GeneratorConfig.stylegan2(size=64, narrow=1 / 16, style_dim=32)
    keys = set(Generator(config).state_dict())
    for key in ["style.1.weight", "style.8.bias", "input.input", "conv1.conv.weight", "conv1.conv.modulation.weight",
                "conv1.noise.weight", "conv1.activate.bias", "to_rgb1.conv.weight", "to_rgb1.bias",
                "convs.0.conv.blur.kernel", "convs.7.activate.bias", "to_rgbs.0.upsample.kernel",
                "to_rgbs.3.conv.modulation.bias", "noises.noise_0", "noises.noise_8"]:
        assert key in keys, key
    assert "convs.8.conv.weight" not in keys and "noises.noise_9" not in keys
    other = Generator(config)
    other.load_state_dict(Generator(config).state_dict(), strict=True)


def test_full_size_layer_table_matches_hyperstyle_numbering():
    config = GeneratorConfig.stylegan2(1024)
    shapes = config.layer_shapes
    assert len(shapes) == 26 and config.n_styles == 18
    assert config.to_rgb_layers == [1, 4, 7, 10, 13, 16, 19, 22, 25]
    assert shapes[14] == (3, 512, 256) and shapes[24] == (3, 32, 32) and shapes[25] == (1, 32, 3)
    assert len(GeneratorConfig.stylegan2(512).layer_shapes) == 23
    assert len(GeneratorConfig.stylegan2(256).layer_shapes) == 20


@pytest.mark.parametrize("size", [6, 12, 2048])
def test_invalid_sizes_are_refused(size):
    with pytest.raises(ValueError, match="power of two"):
        GeneratorConfig.stylegan2(size)


def test_noise_modes_and_output_shape():
    gen = make_generator(tiny_generator_config(64))
    codes = torch.randn(2, gen.n_styles, gen.style_dim)
    with torch.no_grad():
        a, b = gen(codes), gen(codes)
        r1, r2 = gen(codes, noise_mode="random"), gen(codes, noise_mode="random")
        w_only = gen(codes[:, 0])
        w_plus = gen(codes[:, :1].expand(-1, gen.n_styles, -1))
    assert a.shape == (2, 3, 64, 64)
    assert a.is_contiguous()  # NCHW, as the official generator returns it
    assert torch.equal(a, b)
    assert not torch.equal(r1, r2)
    assert torch.allclose(w_only, w_plus)
    with pytest.raises(ValueError, match="codes of shape"):
        gen(torch.randn(2, gen.n_styles + 1, gen.style_dim))


def test_offsets_of_another_batch_size_are_refused_with_the_layer_named():
    gen = make_generator(tiny_generator_config(64))
    deltas = [None] * gen.n_layers
    _, c_in, c_out = gen.config.layer_shapes[5]
    deltas[5] = torch.zeros(3, c_out, c_in)
    with pytest.raises(ValueError, match=r"layer 5 have batch 3 but the codes have batch 2; pass offsets with batch 2"):
        gen(torch.randn(2, gen.n_styles, gen.style_dim), deltas)


def test_a_function_that_fails_to_compile_runs_eagerly_and_the_others_stay_compiled(monkeypatch):
    """A compiler failure (no Triton, an untraceable module) falls back to eager for that function only."""
    compiled_calls = []

    def fake_compile(fn, **_kwargs):
        def run(*args):
            if fn.__name__ == "cannot_compile":
                raise RuntimeError("cannot trace this")
            compiled_calls.append(fn.__name__)
            return fn(*args)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(stylegan2, "on_gpu", lambda t: True)  # the CPU stands in for CUDA
    monkeypatch.setitem(stylegan2._COMPILE, "enabled", True)
    monkeypatch.setitem(stylegan2._COMPILE, "announced", True)

    @stylegan2.fused
    def cannot_compile(x):
        return x + 1

    @stylegan2.fused
    def can_compile(x):
        return x * 2

    x = torch.ones(3)
    with torch.no_grad():
        with pytest.warns(UserWarning, match="could not compile cannot_compile"):
            assert torch.equal(cannot_compile(x), x + 1)
        assert torch.equal(can_compile(x), x * 2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second attempt, no second warning
            assert torch.equal(cannot_compile(x), x + 1)
    assert compiled_calls == ["can_compile"]
    assert not cannot_compile.compiles() and can_compile.compiles()


def test_upsampling_form_follows_the_input_size():
    """Small layers run as a transposed convolution + blur, large ones as blur-folded phases (split at batch > 1)."""
    conv = ModulatedConv2d(4, 4, 3, 8, upsample=True)
    assert conv.upsample_plan(8, stylegan2.TRANSPOSED_UP_TO) == "transposed"
    larger = 2 * stylegan2.TRANSPOSED_UP_TO
    assert conv.upsample_plan(1, larger) == ((0, 1),)
    assert conv.upsample_plan(8, max(larger, stylegan2.SPLIT_ROW_PARITIES_FROM)) == ((0,), (1,))
    assert conv.upsample_plan(1, stylegan2.TRANSPOSED_UP_TO, transposed_up_to=0) == ((0, 1),)
    assert conv.upsample_plan(1, larger, transposed_up_to=larger) == "transposed"


def test_transposed_form_only_with_a_fused_epilogue_and_not_in_strict_fp32(monkeypatch):
    """Without a fused epilogue (torch.compile's or the Triton kernel) the transposed form's blur is ~100 kernels a
    layer (slower than the blur-folded phases), and in strict fp32 cuDNN asked for a 65 GiB workspace for its
    convolution. On the Triton kernels one image takes it at every size, a batch up to TRANSPOSED_UP_TO."""
    x16, x32 = torch.zeros(1, 4, 8, 8, dtype=torch.bfloat16), torch.zeros(1, 4, 8, 8)
    batch16 = torch.zeros(2, 4, 8, 8, dtype=torch.bfloat16)
    assert stylegan2.transposed_up_to(x16) == 0  # CPU: eager
    monkeypatch.setattr(stylegan2, "on_gpu", lambda t: True)
    monkeypatch.setattr(stylegan2, "_COMPILE", {"enabled": True})
    assert stylegan2.transposed_up_to(x16) == stylegan2.TRANSPOSED_UP_TO
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert stylegan2.transposed_up_to(x32) == stylegan2.TRANSPOSED_UP_TO  # PyTorch's default TF32 convolutions
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert stylegan2.transposed_up_to(x32) == 0 and stylegan2.transposed_up_to(x16) > 0
    monkeypatch.setattr(stylegan2, "_COMPILE", {"enabled": False})  # HYPERSTYLE_COMPILE=0
    assert stylegan2.transposed_up_to(x16) == 0
    monkeypatch.setattr(stylegan2, "_COMPILE", {"enabled": False, "triton": True})  # the default: Triton kernels
    monkeypatch.setattr(stylegan2, "triton_runs", lambda t: True)
    assert stylegan2.transposed_up_to(x16) == stylegan2.TRANSPOSED_UP_TO_ONE_IMAGE
    assert stylegan2.transposed_up_to(batch16) == stylegan2.TRANSPOSED_UP_TO
    assert stylegan2.transposed_up_to(x32) == 0  # strict fp32 still not


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_multiply_weights_equal_the_plain_formula(dtype):
    """At eager inference the weight builders scale the shared weight by per-sample factors in one multiply
    (`_factors`); with autograd on they run the plain formula. Same weights, every offset kind and builder."""
    torch.manual_seed(4)
    weight = torch.randn(1, 6, 5, 3, 3).to(dtype)
    style = torch.randn(2, 5)
    deltas = [None, 0.3 * torch.randn(2, 6, 5), 0.3 * torch.randn(1, 6, 5)]
    for delta in deltas:
        for builder in (stylegan2.modulated_weight, stylegan2.padded_taps, stylegan2.transposed_taps):
            for demodulate in (True, False):
                args = (weight, 0.3, style, delta, demodulate, dtype)
                with torch.no_grad():
                    fast = builder(*args)
                with torch.enable_grad():
                    plain = builder(*args)
                assert fast.shape == plain.shape and fast.stride() == plain.stride() and fast.dtype == dtype
                tol = 1e-6 if dtype == torch.float32 else 1e-2
                assert torch.allclose(fast.float(), plain.float(), rtol=tol, atol=tol), builder.__name__
    full = 0.3 * torch.randn(2, 6, 5, 3, 3)  # offsets that differ between taps: the plain formula
    assert stylegan2._factors(weight, 0.3, style, full, True) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the second stream exists only there)")
@pytest.mark.parametrize("batch", [1, 2])
def test_weights_built_ahead_on_a_second_stream_change_nothing(batch, monkeypatch):
    """`WeightsAhead` (the per-sample weights built on a second stream while the layers run) gives the images of
    building them inline, eagerly and replayed from a CUDA graph with new codes (a missing wait would read weights
    not yet written: the previous codes' or none). Strict fp32; not bit for bit, since cuDNN may pick another plan
    for differently aligned weight memory."""
    from hyperstyle_nodes.tiny import randomize_

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    gen = randomize_(Generator(tiny_generator_config(256)), torch.Generator().manual_seed(1)).eval().cuda()
    codes = torch.randn(batch, gen.n_styles, gen.style_dim, device="cuda")
    new_codes = codes + 0.5 * torch.randn_like(codes)
    deltas = [0.1 * torch.randn(batch, o, i, 3, 3, device="cuda") if k == 3 and layer % 2 else None
              for layer, (k, i, o) in enumerate(gen.config.layer_shapes)]
    with torch.no_grad():
        monkeypatch.setattr(stylegan2, "WEIGHTS_AHEAD_MAX_BATCH", 0)
        expected = gen(codes, deltas), gen(new_codes, deltas)
        monkeypatch.setattr(stylegan2, "WEIGHTS_AHEAD_MAX_BATCH", batch)
        eager = gen(codes, deltas)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            gen(codes, deltas)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        static_codes = codes.clone()
        with torch.cuda.graph(graph):
            replayed = gen(static_codes, deltas)
        static_codes.copy_(new_codes)
        graph.replay()
        torch.cuda.synchronize()
    assert (expected[1] - expected[0]).abs().max() > 0.1  # the new codes change the image a lot
    torch.testing.assert_close(eager, expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(replayed, expected[1], rtol=1e-5, atol=1e-5)


def test_layer_sizes_are_what_each_layer_sees(monkeypatch):
    """`Generator.layer_input_size` (where `WeightsAhead` plans each layer's weights) and `GeneratorConfig.layer_sizes`
    (which layers training tunes) against the input and output sizes each layer's convolution meets in a pass."""
    gen = Generator(tiny_generator_config(64)).eval()
    index = {id(conv): layer for layer, conv in enumerate(gen.layer_convs())}
    seen = {}
    convolve = ModulatedConv2d.convolve

    def recording(self, x, *args, **kwargs):
        seen[index[id(self)]] = x.shape[2]
        return convolve(self, x, *args, **kwargs)

    monkeypatch.setattr(ModulatedConv2d, "convolve", recording)
    with torch.no_grad():
        gen(torch.randn(1, gen.n_styles, gen.style_dim))
    assert sorted(seen) == list(range(gen.n_layers))
    assert [gen.layer_input_size(layer) for layer in range(gen.n_layers)] == [seen[layer] for layer in sorted(seen)]
    outputs = [2 * seen[layer] if gen.layer_convs()[layer].upsample else seen[layer] for layer in sorted(seen)]
    assert gen.config.layer_sizes == outputs
