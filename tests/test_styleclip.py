"""Text edits: StyleSpace decoding, StyleCLIP global directions, their files, the node and the CLI flag (tiny random
CLIP and synthetic fs3/S_mean_std, offline)."""
import pickle
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from hyperstyle_nodes import cli, ops  # noqa: E402
from hyperstyle_nodes.loaders import convert
from hyperstyle_nodes.editing import styleclip
from hyperstyle_nodes.loaders.downloads import WeightsUnavailableError  # noqa: E402
from hyperstyle_nodes.loaders.manager import get_manager  # noqa: E402
from hyperstyle_nodes.stylegan2.generator import style_index  # noqa: E402
from hyperstyle_nodes.tiny import write_tiny_clip, write_tiny_styleclip_files  # noqa: E402

NEUTRAL, TARGET = "face with hair", "face with curly hair"


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "clip-vit-base-patch32")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, clip_dir, tiny_model, tiny_ckpts):
    """A models folder with the tiny checkpoints, the tiny CLIP (under the name the default loads) and
    synthetic StyleCLIP files for the tiny generator."""
    folder = tmp_path_factory.mktemp("models")
    shutil.copytree(clip_dir, folder / clip_dir.name)
    write_tiny_styleclip_files(folder / "styleclip", tiny_model.generator)
    for name, path in tiny_ckpts.items():
        shutil.copy(path, folder / f"tiny_{name}.pt")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HYPERSTYLE_MODELS_DIR", str(folder))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield folder
    get_manager().clear()


@pytest.fixture(scope="module")
def loaded(models_dir):
    model = ops.load_model(str(models_dir / "tiny_hyperstyle.pt"), str(models_dir / "tiny_w_encoder.pt"), "fp32",
                           "cpu")
    g = torch.Generator().manual_seed(3)
    image = torch.nn.functional.interpolate(torch.rand(2, 3, 16, 16, generator=g), size=256).permute(0, 2, 3, 1)
    latent, _ = ops.encode(model, image)
    offsets, _ = ops.refine(model, image, latent, iterations=2)
    return model, latent, offsets


# ---- StyleSpace ----------------------------------------------------------------------------------------------


def test_unedited_stylespace_decodes_bit_identically(tiny_model, face_batch):
    inv = tiny_model.invert(face_batch, n_iters=2, keep_steps=False)
    styles = tiny_model.stylespace(inv.codes)
    assert torch.equal(tiny_model.decode_styles(styles, inv.deltas), tiny_model.decode(inv.codes, inv.deltas))
    assert torch.equal(tiny_model.decode_styles(styles), tiny_model.decode(inv.codes))


def test_stylespace_is_every_layers_modulation_in_official_order(tiny_model):
    codes = torch.randn(2, tiny_model.n_styles, tiny_model.generator.style_dim)
    styles = tiny_model.stylespace(codes)
    convs = tiny_model.generator.layer_convs()
    assert len(styles) == len(convs) == 17  # 128 px: conv, toRGB, then 5 x (up conv, conv, toRGB)
    for layer, (s, conv) in enumerate(zip(styles, convs)):
        torch.testing.assert_close(s, conv.modulation(codes[:, style_index(layer)]), rtol=1e-5, atol=1e-6)
    assert [s.shape[1] for s in styles] == tiny_model.generator.style_widths()


def test_decode_styles_rejects_wrong_styles(tiny_model):
    styles = tiny_model.stylespace(torch.randn(1, tiny_model.n_styles, tiny_model.generator.style_dim))
    with pytest.raises(ValueError, match="takes 17 style vectors"):
        tiny_model.decode_styles(styles[:-1])
    with pytest.raises(ValueError, match="style vector 3 should have shape"):
        tiny_model.decode_styles(styles[:3] + [styles[3][:, :-1]] + styles[4:])


# ---- global directions ----------------------------------------------------------------------------------------


def reference_delta_s(fs3, s_std, widths, to_rgb, delta_i, beta):
    """The official recipe written out with numpy: threshold, scale by the max over all channels, then per layer
    the first 11 non-toRGB layers get their slice times std, the others zeros."""
    r = fs3.numpy() @ delta_i.numpy()
    kept = np.where(np.abs(r) < beta, 0, r)
    kept = kept / np.abs(kept).max()
    non_rgb = [layer for layer in range(len(widths)) if layer not in to_rgb][:11]
    out, start = [], 0
    for layer, width in enumerate(widths):
        if layer in non_rgb:
            out.append(kept[start:start + width] * s_std[layer].numpy().reshape(-1))
            start += width
        else:
            out.append(np.zeros(width))
    return out


def test_delta_s_follows_the_official_recipe(tmp_path, tiny_model):
    gen = tiny_model.generator
    folder = write_tiny_styleclip_files(tmp_path, gen)
    directions = styleclip.load_global_directions(gen, folder)
    _, s_std = styleclip.read_s_statistics(folder / "S_mean_std")
    delta_i = torch.nn.functional.normalize(torch.randn(16), dim=0)
    got = directions.delta_s(delta_i, 0.1)
    want = reference_delta_s(directions.fs3, s_std, gen.style_widths(), gen.config.to_rgb_layers, delta_i, 0.1)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-5, atol=1e-7)
    assert all(not got[layer].any() for layer in gen.config.to_rgb_layers)
    assert any(got[layer].any() for layer in directions.layers)


def test_beta_that_zeroes_every_channel_says_so(tmp_path, tiny_model):
    directions = styleclip.load_global_directions(tiny_model.generator,
                                                  write_tiny_styleclip_files(tmp_path, tiny_model.generator))
    with pytest.raises(styleclip.StyleClipError, match=r"no channel passes β=1\.5 .*lower β"):
        directions.delta_s(torch.nn.functional.normalize(torch.randn(16), dim=0), 1.5)


def test_files_of_another_generator_are_refused(tmp_path, tiny_model):
    from hyperstyle_nodes.stylegan2.generator import Generator, GeneratorConfig

    other = Generator(GeneratorConfig.stylegan2(size=64, narrow=1 / 16, style_dim=64))
    folder = write_tiny_styleclip_files(tmp_path, other)
    with pytest.raises(styleclip.StyleClipError, match="fs3 has .* channels but this generator has"):
        styleclip.load_global_directions(tiny_model.generator, folder)


# ---- files ---------------------------------------------------------------------------------------------------


def test_s_mean_std_is_read_without_running_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    (tmp_path / "evil").write_bytes(pickle.dumps([[Payload()], [Payload()]]))
    with pytest.raises(styleclip.StyleClipError, match="refused to load 'shutil.rmtree'"):
        styleclip.read_s_statistics(tmp_path / "evil")
    assert (tmp_path / "victim").is_dir()


def test_s_mean_std_pickle_and_safetensors_conversion(tmp_path, tiny_model):
    folder = write_tiny_styleclip_files(tmp_path, tiny_model.generator)
    means, stds = styleclip.read_s_statistics(folder / "S_mean_std")
    with open(folder / "S_mean_std", "rb") as f:
        official_means, official_stds = pickle.load(f)  # our own test file: safe to unpickle here
    assert all(np.array_equal(a.numpy(), b.reshape(-1)) for a, b in zip(stds, official_stds))
    assert all(np.array_equal(a.numpy(), b.reshape(-1)) for a, b in zip(means, official_means))
    target = tmp_path / "S_mean_std.safetensors"
    assert convert.main([str(folder / "S_mean_std"), str(target)]) == 0
    means2, stds2 = styleclip.read_s_statistics(target)
    assert all(torch.equal(a, b) for a, b in zip(stds + means, stds2 + means2))
    with pytest.raises(SystemExit):  # never overwrites without --force
        convert.main([str(folder / "S_mean_std"), str(target)])


def test_missing_files_name_what_to_get(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="fs3.npy, S_mean_std and templates.txt from .*yuval-alaluf"):
        styleclip.find_file(styleclip.FS3_FILE, tmp_path)


def test_missing_clip_offline_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERSTYLE_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="CLIP .* is not in .* HF_HUB_OFFLINE is set: download .* by hand into"):
        styleclip.clip_folder()


# ---- text features ---------------------------------------------------------------------------------------------


def test_text_features_average_the_templates_and_are_cached(clip_dir, monkeypatch):
    encoder = styleclip.load_text_encoder(str(clip_dir))
    templates = ["a photo of a {}.", "art of the {}."]
    delta = encoder.delta_i(NEUTRAL, TARGET, templates)

    def averaged(text):
        e = encoder.embed([t.format(text) for t in templates])
        m = torch.nn.functional.normalize(e, dim=-1).mean(0)
        return m / m.norm()

    want = averaged(TARGET) - averaged(NEUTRAL)
    torch.testing.assert_close(delta, want / want.norm())
    calls = []
    monkeypatch.setattr(encoder, "embed", lambda texts: calls.append(texts))
    assert encoder.delta_i(NEUTRAL, TARGET, templates) is delta and not calls


def test_bad_prompts_are_clear(clip_dir):
    encoder = styleclip.load_text_encoder(str(clip_dir))
    with pytest.raises(styleclip.StyleClipError, match="the neutral text is empty"):
        encoder.delta_i("  ", TARGET, ["a {}"])
    with pytest.raises(styleclip.StyleClipError, match="target text is too long for CLIP.* at most 77"):
        encoder.delta_i(NEUTRAL, "x" * 80, ["a {}"])  # the tiny tokenizer has one token per letter
    with pytest.raises(styleclip.StyleClipError, match="same CLIP features"):
        encoder.delta_i(NEUTRAL, NEUTRAL, ["a {}"])


# ---- ops, node, CLI --------------------------------------------------------------------------------------------


def test_text_edit_keeps_offsets_and_sweeps_strength_major(loaded):
    model, latent, offsets = loaded
    plain = ops.decode(model, latent, offsets)
    images = ops.text_edit(model, latent, NEUTRAL, TARGET, [0.0, 3.0], 0.1, offsets)
    assert images.shape[0] == 4
    torch.testing.assert_close(images[:2], plain, rtol=0, atol=1e-5)  # α = 0 is the reconstruction
    assert (images[2:] - plain).abs().mean() > 1e-3
    # the same edit by hand: S + α ΔS decoded with the offsets
    hs = model.use()
    delta_s = ops.text_direction(model, NEUTRAL, TARGET, 0.1)
    styles = [s + 3.0 * d for s, d in zip(hs.stylespace(latent.codes), delta_s)]
    torch.testing.assert_close(images[2:], ops.bchw_to_image(hs.decode_styles(styles, offsets.deltas)))


def test_text_edit_node(loaded):
    import nodes

    model, latent, offsets = loaded
    node = nodes.NODE_CLASS_MAPPINGS["HyperStyleTextEdit"]()
    (image,) = node.edit(model, latent, NEUTRAL, TARGET, 4.0, 0.13, offsets)
    assert image.shape == (2, 128, 128, 3)
    sweep = nodes.NODE_CLASS_MAPPINGS["HyperStyleTextEditSweep"]()
    (images,) = sweep.sweep(model, latent, NEUTRAL, TARGET, -2.0, 2.0, 3, 0.13, offsets, "256")
    assert images.shape == (6, 256, 256, 3)
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["HyperStyleTextEdit"] == "Text Edit (StyleCLIP)"


def test_cli_text_flag(models_dir, assets_dir, tmp_path, capsys):
    shutil.copy(assets_dir / "models/retinaface/retinaface_mobilenet0.25.pth", models_dir)
    photo = sorted((assets_dir / "testdata" / "faces").iterdir())[0]
    args = ["--models-dir", str(models_dir), "--checkpoint", "tiny_hyperstyle.pt", "--encoder", "tiny_w_encoder.pt",
            "--detector", "retinaface_mobilenet0.25.pth", "--align-size", "256", "--iterations", "1", "--device",
            "cpu", "--offline"]
    out = tmp_path / "out"
    code = cli.main(["edit", str(photo), "--out", str(out), "--text", f"{NEUTRAL} -> {TARGET}", "--alpha", "4",
                     "--beta", "0.1", *args])
    assert code == cli.EXIT_OK
    assert (out / f"{photo.stem}_edited.png").is_file()
    assert cli.main(["edit", str(photo), "--out", str(out), "--text", "no arrow", *args]) == cli.EXIT_USAGE
    assert "expected 'NEUTRAL -> TARGET'" in capsys.readouterr().err
    assert cli.main(["edit", str(photo), "--out", str(out), "--text", "a -> b", "--beta", "9", *args]) == \
        cli.EXIT_USAGE
    assert "no channel passes β=9" in capsys.readouterr().err
