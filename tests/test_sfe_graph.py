"""StyleFeatureEditor in the node graph: Load HyperStyle picks the engine from the file, and Encode / Apply Edit /
Edit Sweep / Decode / Text Edit / Save and Load Inversion carry an SFE inversion (tiny official-format files, CPU)."""
import dataclasses
import shutil

import pytest
import torch

import nodes as pack_nodes
from hyperstyle_nodes import ops
from hyperstyle_nodes.editing import directions as editing
from hyperstyle_nodes.editing import menu
from hyperstyle_nodes.engines.sfe.model import SFEEditError, SFEInversion
from hyperstyle_nodes.loaders import inversion_io
from hyperstyle_nodes.tiny import make_tiny_sfe


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_ckpts):
    folder = tmp_path_factory.mktemp("models_sfe")
    for name, path in make_tiny_sfe(tmp_path_factory.mktemp("sfe_files")).items():
        shutil.copy(path, folder / f"tiny_{name}.pt")
    for name in ("hyperstyle", "w_encoder"):
        shutil.copy(tiny_ckpts[name], folder / f"tiny_{name}.pt")
    (folder / "directions").mkdir()
    g = torch.Generator().manual_seed(5)
    torch.save(torch.randn(1, 64, generator=g), folder / "directions" / "tiny_w.pt")
    comp = torch.nn.functional.normalize(torch.randn(60, 1, 64, generator=g), dim=-1)
    torch.save({"comp": comp, "std": torch.rand(60, generator=g) + 0.5, "mean": torch.randn(1, 64, generator=g)},
               folder / "directions" / "tiny_pca.pt")
    with pytest.MonkeyPatch.context() as patch:  # for the whole module: the model and its inversion are shared
        patch.setenv("HYPERSTYLE_MODELS_DIR", str(folder))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield folder


@pytest.fixture(scope="module")
def in_models_dir(models_dir):
    return models_dir


def load(checkpoint="tiny_sfe_editor.pt", encoder="tiny_e4e.pt", generator="tiny_generator.pt"):
    (model,) = pack_nodes.HyperStyleLoader().load(checkpoint, encoder, "fp32", "cpu", generator)
    return model


@pytest.fixture(scope="module")
def model(in_models_dir):
    return load()


def faces(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, 16, 16, generator=g)
    return torch.nn.functional.interpolate(low, size=(128, 128), mode="bilinear").permute(0, 2, 3, 1)


@pytest.fixture(scope="module")
def encoded(model):
    return pack_nodes.HyperStyleEncode().encode(model, faces())


def test_the_file_decides_the_engine(in_models_dir):
    choices = pack_nodes.HyperStyleLoader.INPUT_TYPES()["required"]["checkpoint"][0]
    assert {"sfe_editor_light", "sfe_inverter_light", "hyperstyle_ffhq", "tiny_sfe_editor.pt"} <= set(choices)
    editor, inverter = load(), load("tiny_sfe_inverter.pt")
    assert (editor.engine, editor.kind, inverter.kind) == (ops.SFE, "sfe_editor", "sfe_inverter")
    assert editor.use().can_edit and not inverter.use().can_edit
    hyperstyle = load("tiny_hyperstyle.pt", "tiny_w_encoder.pt")
    assert (hyperstyle.engine, hyperstyle.kind) == (ops.HYPERSTYLE, "hyperstyle")
    with pytest.raises(ValueError, match="initial encoder must be the e4e encoder .*Choose e4e_ffhq_encode"):
        load(encoder="tiny_w_encoder.pt")
    with pytest.raises(ValueError, match="initial encoder must be the e4e encoder .*no initial encoder"):
        load(encoder="none")


def test_encode_decode_is_the_sfe_inversion(model, encoded):
    latent, recon = encoded
    sfe = model.use()
    inv = sfe.invert(faces().permute(0, 3, 1, 2))
    assert latent.engine == ops.SFE and latent.batch == 2 and recon.shape == (2, 128, 128, 3)
    torch.testing.assert_close(latent.codes, inv.codes, rtol=0, atol=0)
    torch.testing.assert_close(latent.sfe.features, inv.features, rtol=0, atol=0)
    torch.testing.assert_close(latent.sfe.e4e_codes, inv.e4e_codes, rtol=0, atol=0)
    torch.testing.assert_close(recon, inv.images.permute(0, 2, 3, 1), rtol=0, atol=0)
    (decoded,) = pack_nodes.HyperStyleDecode().decode(model, latent, "native")
    torch.testing.assert_close(decoded, recon, rtol=0, atol=1e-6)
    (small,) = pack_nodes.HyperStyleDecode().decode(model, latent, "256")
    assert small.shape == (2, 256, 256, 3)


def test_apply_edit_moves_both_codes_and_decodes_through_the_feature_editor(model, encoded):
    latent, recon = encoded
    direction = torch.load(ops.resolve("directions/tiny_w.pt"))
    (edited,) = pack_nodes.HyperStyleApplyEdit().edit(latent, "directions/tiny_w.pt", 0, -1, 2.5, 0)
    torch.testing.assert_close(edited.codes, latent.codes + 2.5 * direction, rtol=0, atol=1e-6)
    torch.testing.assert_close(edited.sfe.e4e_codes, latent.sfe.e4e_codes + 2.5 * direction, rtol=0, atol=1e-6)
    assert torch.equal(edited.sfe.inverted_codes, latent.codes)  # the unedited inversion travels along
    (image,) = pack_nodes.HyperStyleDecode().decode(model, edited, "native")
    sfe = model.use()
    inv = SFEInversion(latent.codes, latent.sfe.e4e_codes, latent.sfe.features)
    want = sfe.decode(inv, codes=edited.codes, e4e_codes=edited.sfe.e4e_codes).permute(0, 2, 3, 1)
    torch.testing.assert_close(image, want, rtol=0, atol=1e-6)
    assert (image - recon).abs().mean() > 1e-3
    # the feature editor runs: without it (delta 0) the edited codes give another image
    plain = sfe.decode(inv, codes=edited.codes, e4e_codes=latent.sfe.e4e_codes).permute(0, 2, 3, 1)
    assert (image - plain).abs().max() > 1e-4


def test_edit_sweep_is_strength_major_and_each_slice_is_that_edit(model, encoded):
    latent, _ = encoded
    swept, deltas = pack_nodes.HyperStyleEditSweep().sweep(latent, "directions/tiny_w.pt", 0, -1, -2.0, 2.0, 3)
    assert deltas is None and swept.batch == 6 and swept.sfe.features.shape[0] == 6
    (images,) = pack_nodes.HyperStyleDecode().decode(model, swept, "native")
    for i, strength in enumerate((-2.0, 0.0, 2.0)):
        one = ops.decode(model, ops.apply_edit(latent, "directions/tiny_w.pt", strength))
        torch.testing.assert_close(images[2 * i:2 * i + 2], one, rtol=0, atol=1e-5)


def test_named_ganspace_edit_brings_its_component_and_layers(model, encoded, monkeypatch):
    latent, _ = encoded
    named = menu.NAMED_EDITS["ganspace_eye_openness"]
    assert (named.component, named.layers, named.file) == (54, (7, 8), "ganspace_ffhq_pca")
    assert "ganspace_eye_openness" in ops.direction_choices()  # offered with the registry's PCA file
    # the test's PCA file in place of the registry's 167 kB download
    monkeypatch.setitem(menu.NAMED_EDITS, "ganspace_eye_openness", dataclasses.replace(named,
                                                                                       file="directions/tiny_pca.pt"))
    # the layer and component inputs are ignored for a named GANSpace edit (SFE's menu fixes them)
    (edited,) = pack_nodes.HyperStyleApplyEdit().edit(latent, "ganspace_eye_openness", 0, -1, 20.0, 3)
    pca = editing.load_ganspace(ops.resolve("directions/tiny_pca.pt"))
    for have, codes in ((edited.codes, latent.codes), (edited.sfe.e4e_codes, latent.sfe.e4e_codes)):
        torch.testing.assert_close(have, editing.apply_ganspace(codes, pca, 54, 7, 8, 20.0), rtol=0, atol=1e-6)
    assert torch.equal(edited.codes[:, :7], latent.codes[:, :7]) and torch.equal(edited.codes[:, 8:],
                                                                                   latent.codes[:, 8:])


def test_menu_follows_sfe_available_directions():
    # InterFaceGAN: SFE applies w + power / 2 * direction, the pack w + strength * direction: half SFE's range
    assert menu.NAMED_EDITS["interfacegan_age"].strength_range == (-5, 5)
    assert menu.NAMED_EDITS["interfacegan_rotation"].strength_range == (-3.5, 3.5)
    assert menu.NAMED_EDITS["sfe_fs_glasses"].strength_range == (-20, 30)
    assert menu.SHORT_NAMES["fs_glasses"] == "sfe_fs_glasses" and menu.SHORT_NAMES["lipstick"] == "ganspace_lipstick"
    assert menu.file_of("ganspace_lipstick") == "ganspace_ffhq_pca" and menu.file_of("my.pt") == "my.pt"
    assert menu.describe("sfe_fs_makeup") == "sfe_fs_makeup: -10..15, + add make-up (works poorly on men)"
    registry = ops.downloads.load_registry()
    for edit in menu.NAMED_EDITS.values():
        assert edit.is_stylespace or registry[edit.file].kind in ("direction", "ganspace"), edit
    stylespace = [name for name, edit in menu.NAMED_EDITS.items() if edit.is_stylespace]
    assert len(stylespace) == 11 and menu.NAMED_EDITS["stylespace_earrings"].strength_range == (0, 15)


def test_flattened_w_plus_boundary_loads_as_sfe_fs_directions(tmp_path):
    import numpy as np

    boundary = np.random.default_rng(0).standard_normal((1, 12 * 64)).astype(np.float32)
    np.save(tmp_path / "b.npy", boundary)
    direction = editing.load_direction(tmp_path / "b.npy", n_styles=12, style_dim=64)
    assert direction.shape == (12, 64)
    assert torch.equal(direction.reshape(1, -1), torch.from_numpy(boundary))
    with pytest.raises(ValueError, match=r"\(1, 12\*64\)"):
        editing.load_direction(torch.zeros(1, 14 * 64), n_styles=12, style_dim=64)


def test_save_and_load_an_sfe_inversion(model, encoded, tmp_path):
    latent, _ = encoded
    edited = ops.apply_edit(latent, "directions/tiny_w.pt", 1.5)
    path = ops.save_inversion(tmp_path, "sfe/person", edited)
    codes, deltas, meta = inversion_io.load_inversion(path)
    assert meta["format_version"] == 2 and set(meta["sfe"]) == set(inversion_io.SFE_TENSORS)
    assert all(d is None for d in deltas)
    loaded, offsets = ops.load_inversion(path)
    assert offsets is None and loaded.engine == ops.SFE and loaded.signature == latent.signature
    for name, tensor in vars(edited.sfe).items():
        assert torch.equal(getattr(loaded.sfe, name), tensor), name
    torch.testing.assert_close(ops.decode(model, loaded), ops.decode(model, edited), rtol=0, atol=0)
    with pytest.raises(ValueError, match="no HyperStyle offsets: disconnect the deltas input of Save Inversion"):
        ops.save_inversion(tmp_path, "x", latent, ops.Offsets([None] * 3, "m"))


def test_inversion_file_rules(tmp_path):
    codes, features = torch.randn(2, 12, 64), torch.randn(2, 32, 64, 64)
    sfe = {"inverted_codes": codes, "features": features, "e4e_codes": None}
    path = inversion_io.save_inversion(tmp_path / "a", codes, [], "tiny_sfe_editor.pt:1", sfe=sfe)
    _, _, meta = inversion_io.load_inversion(path)
    assert sorted(meta["sfe"]) == ["features", "inverted_codes"]  # None tensors are left out
    plain = inversion_io.save_inversion(tmp_path / "b", codes, [None, torch.randn(2, 4, 4)], "hs:1")
    _, _, meta = inversion_io.load_inversion(plain)
    assert meta["format_version"] == 1 and "sfe" not in meta  # HyperStyle files stay readable by older versions
    with pytest.raises(ValueError, match="missing \\['features'\\]"):
        inversion_io.save_inversion(tmp_path / "c", codes, [], "m", sfe={"inverted_codes": codes})
    with pytest.raises(ValueError, match="unknown \\['offsets'\\]"):
        inversion_io.save_inversion(tmp_path / "c", codes, [], "m", sfe={**sfe, "offsets": codes})
    with pytest.raises(ValueError, match="'features' must be a float tensor of batch 2; got \\(1, 32, 64, 64\\)"):
        inversion_io.save_inversion(tmp_path / "c", codes, [], "m", sfe={**sfe, "features": features[:1]})


def test_hyperstyle_only_nodes_say_what_to_use_instead(model, encoded, in_models_dir):
    latent, _ = encoded
    image = faces()
    with pytest.raises(ValueError, match="HyperStyle Refine works with HyperStyle models.*straight to Apply Edit"):
        pack_nodes.HyperStyleRefine().refine(model, image, latent, 1)
    with pytest.raises(ValueError, match="HyperStyle Optimize works with HyperStyle models"):
        ops.optimize(model, image, latent, 1)
    with pytest.raises(ValueError, match="no HyperStyle offsets .*deltas input of Decode"):
        ops.decode(model, latent, ops.Offsets([None] * 3, latent.model_id, latent.signature))
    hyperstyle = load("tiny_hyperstyle.pt", "tiny_w_encoder.pt")
    with pytest.raises(ValueError, match="is a StyleFeatureEditor inversion .* but the model is HyperStyle"):
        ops.decode(hyperstyle, latent)
    hs_latent, _ = ops.encode(hyperstyle, image)
    with pytest.raises(ValueError, match="no StyleFeatureEditor inversion .* is SFE"):
        ops.decode(model, hs_latent)


def test_inverter_only_file_reconstructs_but_refuses_edits(in_models_dir):
    inverter = load("tiny_sfe_inverter.pt")
    latent, recon = ops.encode(inverter, faces(1))
    torch.testing.assert_close(ops.decode(inverter, latent), recon, rtol=0, atol=1e-6)
    edited = ops.apply_edit(latent, "directions/tiny_w.pt", 1.0)
    with pytest.raises(SFEEditError, match="no feature editor.*sfe_editor_light"):
        ops.decode(inverter, edited)


def test_text_edit_moves_both_stylespaces_through_the_feature_editor(model, encoded, in_models_dir):
    pytest.importorskip("transformers", reason="the text extra is not installed (pip install 'hyperstyle-nodes[text]')")
    from hyperstyle_nodes.editing import styleclip
    from hyperstyle_nodes.tiny import write_tiny_clip, write_tiny_styleclip_files

    latent, recon = encoded
    sfe = model.use()
    clip_folder = in_models_dir / styleclip.CLIP_REPO.split("/")[-1]
    if not clip_folder.is_dir():
        write_tiny_clip(clip_folder)
        write_tiny_styleclip_files(in_models_dir / "styleclip", sfe.generator)
    neutral, target = "face with hair", "face with curly hair"
    (images,) = pack_nodes.HyperStyleTextEditSweep().sweep(model, latent, neutral, target, 0.0, 3.0, 2, 0.05)
    assert images.shape == (4, 128, 128, 3)
    torch.testing.assert_close(images[:2], recon, rtol=0, atol=1e-5)  # α = 0: the reconstruction
    delta_s = ops.text_direction(model, neutral, target, 0.05)
    moved = [[s + 3.0 * d for s, d in zip(sfe.generator.styles(codes), delta_s)]
             for codes in (latent.codes, latent.sfe.e4e_codes)]
    inv = SFEInversion(latent.codes, latent.sfe.e4e_codes, latent.sfe.features)
    want = sfe.decode_styles(inv, *moved).permute(0, 2, 3, 1)
    torch.testing.assert_close(images[2:], want, rtol=0, atol=1e-5)
    assert (images[2:] - recon).abs().mean() > 1e-4


def stylespace_edit(monkeypatch, name="stylespace_glasses"):
    """SFE's channels are the 1024-px generator's: a stand-in edit on channels the tiny generator has."""
    named = dataclasses.replace(menu.NAMED_EDITS[name], channels=((3, 5), (2, 7)))
    monkeypatch.setitem(menu.NAMED_EDITS, name, named)
    return named


def test_stylespace_edit_moves_channels_of_both_styles_at_decode(model, encoded, monkeypatch, tmp_path):
    latent, recon = encoded
    assert menu.NAMED_EDITS["stylespace_black_hair"].channels == ((12, 479),) and menu.file_of(
        "stylespace_black_hair") is None
    assert "stylespace_gender" in ops.direction_choices()
    stylespace_edit(monkeypatch)
    (edited,) = pack_nodes.HyperStyleApplyEdit().edit(latent, "stylespace_glasses", 0, -1, 4.0, 0)
    assert torch.equal(edited.codes, latent.codes) and torch.equal(edited.sfe.e4e_codes, latent.sfe.e4e_codes)
    assert edited.stylespace.channels == ((3, 5), (2, 7)) and torch.all(edited.stylespace.amounts == 12.0)
    (image,) = pack_nodes.HyperStyleDecode().decode(model, edited, "native")
    sfe = model.use()

    def moved(codes):
        styles = [t.clone() for t in sfe.generator.styles(codes)]
        styles[3][:, 5] += 12.0  # SFE: 3 * power
        styles[2][:, 7] += 12.0
        return styles

    inv = SFEInversion(latent.codes, latent.sfe.e4e_codes, latent.sfe.features)
    want = sfe.decode_styles(inv, moved(latent.codes), moved(latent.sfe.e4e_codes)).permute(0, 2, 3, 1)
    torch.testing.assert_close(image, want, rtol=0, atol=1e-6)
    assert (image - recon).abs().mean() > 1e-4
    # a W edit after it keeps the StyleSpace moves; a sweep is strength-major; the file keeps them
    both = ops.apply_edit(ops.apply_edit(edited, "directions/tiny_w.pt", 1.0), "stylespace_glasses", -1.0)
    assert torch.all(both.stylespace.amounts == 9.0) and not torch.equal(both.codes, latent.codes)
    swept, _ = ops.edit_sweep(edited, "stylespace_glasses", 0.0, 1.0, 2)
    assert swept.batch == 4 and swept.stylespace.amounts[:, 0].tolist() == [12.0, 12.0, 15.0, 15.0]
    torch.testing.assert_close(ops.decode(model, swept)[:2], image, rtol=0, atol=1e-6)
    path = ops.save_inversion(tmp_path, "styled", both)
    loaded, _ = ops.load_inversion(path)
    assert loaded.stylespace.channels == both.stylespace.channels
    torch.testing.assert_close(ops.decode(model, loaded), ops.decode(model, both), rtol=0, atol=0)


def test_stylespace_edit_on_hyperstyle_and_on_too_small_a_generator(in_models_dir, monkeypatch):
    hyperstyle = load("tiny_hyperstyle.pt", "tiny_w_encoder.pt")
    latent, recon = ops.encode(hyperstyle, faces(1))
    with pytest.raises(ValueError, match=r"moves \(layer, channel\) \[\(12, 479\)\], which this 128-px generator "
                                         r"does not have.*1024-px FFHQ"):
        ops.decode(hyperstyle, ops.apply_edit(latent, "stylespace_black_hair", 3.0))
    stylespace_edit(monkeypatch)
    edited = ops.apply_edit(latent, "stylespace_glasses", -2.0)
    hs = hyperstyle.use()
    styles = [t.clone() for t in hs.stylespace(latent.codes)]
    styles[3][:, 5] -= 6.0
    styles[2][:, 7] -= 6.0
    torch.testing.assert_close(ops.decode(hyperstyle, edited), ops.bchw_to_image(hs.decode_styles(styles)),
                               rtol=0, atol=1e-6)
