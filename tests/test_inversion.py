"""invert/decode semantics (the official run_inversion), batching, continuation and half precision."""
import pytest
import torch
import torch.nn.functional as F

from hyperstyle_nodes import load_hyperstyle
from hyperstyle_nodes.engines.hyperstyle.model import pool_to


def psnr(a, b):
    return (10 * torch.log10(1 / ((a.float() - b.float()) ** 2).mean())).item()


def test_invert_follows_run_inversion(tiny_model, face_batch):
    m = tiny_model
    inv = m.invert(face_batch, n_iters=3)
    # the loop written out, with the modules directly
    with torch.no_grad():
        x = face_batch * 2 - 1
        codes = m.encoder(x) + m.latent_avg
        y_hat = pool_to(m.generator(codes))
        deltas = None
        for _ in range(3):
            new = m.hypernet(torch.cat([x, y_hat], 1))
            deltas = new if deltas is None else [None if d is None else d + n for d, n in zip(deltas, new)]
            y = m.generator(codes, deltas)
            y_hat = pool_to(y)
    assert torch.allclose(inv.codes, codes, atol=1e-6)
    assert torch.allclose(inv.images, ((y + 1) / 2).clamp(0, 1), atol=1e-6)
    assert inv.codes.shape == (2, m.n_styles, 64) and inv.images.shape == (2, 3, 128, 128)
    assert len(inv.steps) == 4 and all(s.shape == (2, 3, 256, 256) for s in inv.steps)
    tuned = [i for i, d in enumerate(inv.deltas) if d is not None]
    assert tuned == [0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15]
    assert inv.deltas[14].shape == (2, 16, 32)  # compact per-channel form, never 3x3-expanded
    assert inv.deltas[0].shape == (2, 32, 32, 3, 3)
    # refinement changes the reconstruction
    assert (inv.steps[-1] - inv.steps[0]).abs().mean() > 1e-3


def test_continuing_equals_running_longer(tiny_model, face_batch):
    a = tiny_model.invert(face_batch, n_iters=3)
    first = tiny_model.invert(face_batch, n_iters=1)
    b = tiny_model.invert(face_batch, n_iters=2, codes=first.codes, deltas=first.deltas)
    assert torch.allclose(a.images, b.images, atol=1e-5)
    for da, db in zip(a.deltas, b.deltas):
        assert (da is None) == (db is None)
        if da is not None:
            assert torch.allclose(da, db, atol=1e-5)


def test_batch_equals_one_by_one(tiny_model, face_batch):
    batch = tiny_model.invert(face_batch, n_iters=2)
    for i in range(face_batch.shape[0]):
        single = tiny_model.invert(face_batch[i:i + 1], n_iters=2)
        assert torch.allclose(batch.images[i:i + 1], single.images, atol=1e-5)


def test_decode(tiny_model, face_batch):
    inv = tiny_model.invert(face_batch, n_iters=2)
    assert torch.allclose(tiny_model.decode(inv.codes, inv.deltas), inv.images, atol=1e-6)
    plain = tiny_model.decode(inv.codes)
    assert torch.allclose(plain, tiny_model.invert(face_batch, n_iters=0).images, atol=1e-6)
    assert plain.min() >= 0 and plain.max() <= 1


def test_input_resizing_and_broadcasting(tiny_model, face_batch):
    big = torch.nn.functional.interpolate(face_batch, size=(300, 300), mode="bilinear")
    assert tiny_model.invert(big, n_iters=1).images.shape == (2, 3, 128, 128)
    one = tiny_model.invert(face_batch[:1], n_iters=1)
    both = tiny_model.invert(face_batch, n_iters=1, codes=one.codes, deltas=one.deltas)
    assert both.codes.shape[0] == 2
    with pytest.raises(ValueError, match="batch size 2 but there are 3 images"):
        tiny_model.invert(torch.rand(3, 3, 64, 64), codes=both.codes)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tiny_model.invert(torch.rand(2, 4, 64, 64))


def test_no_encoder_needs_codes(tiny_ckpts, face_batch):
    model = load_hyperstyle(tiny_ckpts["hyperstyle"])
    with pytest.raises(RuntimeError, match="no initial encoder"):
        model.invert(face_batch)


def test_e4e_inversion(tiny_ckpts, face_batch):
    model = load_hyperstyle(tiny_ckpts["hyperstyle"], e4e=tiny_ckpts["e4e"])
    inv = model.invert(face_batch, n_iters=1)
    assert inv.codes.shape == (2, model.n_styles, 64)
    assert (inv.codes[:, 0] - inv.codes[:, -1]).abs().max() > 0  # W+: styles differ


def test_bf16_matches_fp32(tiny_ckpts, face_batch):
    """Half precision on CPU: bf16 (fp16 convolutions are impractically slow on CPU; fp16 is checked on GPU)."""
    ref = load_hyperstyle(tiny_ckpts["hyperstyle"], w_encoder=tiny_ckpts["w_encoder"]).invert(face_batch, n_iters=3)
    half = load_hyperstyle(tiny_ckpts["hyperstyle"], w_encoder=tiny_ckpts["w_encoder"], dtype=torch.bfloat16)
    out = half.invert(face_batch, n_iters=3)
    value = psnr(out.images, ref.images)
    print(f"bf16 vs fp32 PSNR (tiny 128-px model, 3 iterations): {value:.1f} dB")
    assert out.images.dtype == torch.float32  # images come back as float [0, 1] whatever the model's precision
    assert value >= 40


@pytest.mark.parametrize("separable", [False, True])
def test_batched_hypernet_heads_equal_each_head_alone(separable):
    """The heads' convolution stacks run together as grouped convolutions; each head's offsets must be what the head
    gives on its own (shared, per-channel and separable heads, toRGB heads included)."""
    from hyperstyle_nodes.engines.hyperstyle.hypernetwork import HyperNetwork, SharedHead
    from hyperstyle_nodes.tiny import randomize_, tiny_generator_config, tiny_hypernet_config

    gen = tiny_generator_config(64)
    hypernet = randomize_(HyperNetwork(tiny_hypernet_config(gen, "0,2,3,4,5,6,7,8,9", separable=separable)),
                          torch.Generator().manual_seed(0)).eval()
    assert len(hypernet.head_groups()) < len(hypernet.tuned_layers())  # some heads do run together
    x = torch.randn(2, 6, 256, 256)
    with torch.no_grad():
        deltas = hypernet(x)
        features = hypernet.features(x)
        for i in hypernet.tuned_layers():
            head = hypernet.refinement_blocks[i]
            alone = head(features)
            assert deltas[i].shape == alone.shape, i
            assert torch.allclose(deltas[i], alone, atol=1e-6), (i, (deltas[i] - alone).abs().max())
        assert any(isinstance(hypernet.refinement_blocks[i], SharedHead) for i in hypernet.tuned_layers())

        # the stacked head weights are kept between passes: a weight changed in place must still be seen
        layer = hypernet.tuned_layers()[-1]
        hypernet.refinement_blocks[layer].convs[0].weight.mul_(2)
        again = hypernet(x)
        alone = hypernet.refinement_blocks[layer](features)
        assert torch.allclose(again[layer], alone, atol=1e-6)
        assert (again[layer] - deltas[layer]).abs().max() > 10 * (again[layer] - alone).abs().max() + 1e-7


def test_hypernet_with_weights_moved_under_inference_mode():
    """ComfyUI runs nodes under torch.inference_mode, and weights moved there have no version counter: the kept
    head weights must still work (and follow a weight that is replaced)."""
    from hyperstyle_nodes.engines.hyperstyle.hypernetwork import HyperNetwork
    from hyperstyle_nodes.tiny import randomize_, tiny_generator_config, tiny_hypernet_config

    hypernet = randomize_(HyperNetwork(tiny_hypernet_config(tiny_generator_config(64), "5,6,7,8,9")),
                          torch.Generator().manual_seed(0)).eval()
    x = torch.randn(1, 6, 256, 256)
    with torch.no_grad():
        hypernet(x)
    assert hypernet._levels_cache  # kept after a pass at inference...
    with torch.inference_mode():
        hypernet.to(torch.float64)
        assert not hypernet._levels_cache  # ...and dropped when the weights move, freeing their old copies
        first = hypernet(x.double())
        assert hypernet(x.double())[9].equal(first[9])
        layer = hypernet.refinement_blocks[9]
        layer.convs[0].weight = torch.nn.Parameter(layer.convs[0].weight * 2)
        replaced = hypernet(x.double())
        assert torch.allclose(replaced[9], layer(hypernet.features(x.double())))
        assert not replaced[9].equal(first[9])


@pytest.mark.parametrize("size", [1024, 512, 256, 96])
def test_pool_to_is_the_official_adaptive_pooling(size):
    """Block averaging where 256 divides the image (the fast path), adaptive pooling otherwise: same numbers."""
    y = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    torch.testing.assert_close(pool_to(y), F.adaptive_avg_pool2d(y, 256), rtol=0, atol=1e-6)


def test_3xtf32_product_keeps_fp32_accuracy(monkeypatch):
    """The shared hypernet's large product runs as 3xTF32 on GPUs (`addmm_3xtf32`). The split must be exact with a
    TF32-representable high part, and the three products must give fp32 accuracy: dropping the correction term
    would be ~1e-4 off here. The CPU runs the same algebra in fp32, so this checks the math and the wiring; the GPU
    A/B is in the README."""
    from hyperstyle_nodes.engines.hyperstyle import hypernetwork as hn

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 512, generator=g) * 0.05, torch.randn(512, 700, generator=g) / 40
    bias = torch.randn(700, generator=g) / 40
    hi, lo = hn.split_tf32(a)
    assert torch.equal(hi + lo, a) and not (hi.view(torch.int32) & ((1 << 13) - 1)).any()
    assert lo.abs().max() <= a.abs().max() * 2 ** -10
    reference = bias.double() + a.double() @ b.double()
    assert (hn.addmm_3xtf32(bias, a, b).double() - reference).abs().max() < 2e-7  # fp32 addmm: 6e-8
    assert (torch.addmm(bias, hi, hn.split_tf32(b)[0]).double() - reference).abs().max() > 1e-5  # hi parts alone
    assert torch.backends.cuda.matmul.allow_tf32 is False  # the switch is put back

    assert not hn.tf32_emulates_fp32(a, b)  # CPU: the plain product
    hypernet = hn.SharedWeightsHypernet(channels=16, z_dim=32).eval()
    z = torch.randn(3, 32, generator=g)
    with torch.no_grad():
        plain = hypernet(z)
        monkeypatch.setattr(hn, "tf32_emulates_fp32", lambda *_: True)
        emulated = hypernet(z)
    assert emulated.shape == plain.shape == (3, 16, 16, 3, 3)
    assert torch.allclose(emulated, plain, atol=1e-6, rtol=0)


def test_invert_and_encode_check_their_images(tiny_model, face_batch):
    """uint8 images are 0..255 (before: taken as 0..1, a white image); NaN/inf pixels and 0..255 floats are refused
    (before: NaN images / a silently wrong inversion)."""
    as_uint8 = (face_batch * 255).round().to(torch.uint8)
    from_uint8 = tiny_model.invert(as_uint8, n_iters=1, keep_steps=False)
    from_float = tiny_model.invert(as_uint8.float() / 255, n_iters=1, keep_steps=False)
    assert torch.equal(from_uint8.images, from_float.images)
    assert torch.equal(tiny_model.encode(as_uint8), tiny_model.encode(as_uint8.float() / 255))
    broken = face_batch.clone()
    broken[1, 0, 7, 7] = float("nan")
    for call in (tiny_model.invert, tiny_model.encode):
        with pytest.raises(ValueError, match="NaN or infinite"):
            call(broken)
        with pytest.raises(ValueError, match="divide it by 255"):
            call(face_batch * 255)
