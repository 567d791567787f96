"""StyleFeatureEditor: the generator's feature access (official `return_features` / `new_features` / `early_stop`),
the SFE networks, their checkpoints and the invert/edit/decode path, on tiny official-format files."""
import pytest
import torch

from hyperstyle_nodes.stylegan2.generator import feature_layer
from hyperstyle_nodes.tiny import make_generator, tiny_generator_config


def official_order_reference(g, codes, new_features=None):
    """The official StyleGAN2 loop written out with our layer modules: every activation in `return_features` order
    ([constant input, conv1, then per resolution upsampling conv, conv]), with `new_features[k]` replacing entry k
    where the next convolution reads it (`insert_feature`, feature_scale 1)."""
    new_features = new_features or {}
    styles = g.styles(codes)
    noises = [getattr(g.noises, f"noise_{i}") for i in range(g.config.n_noises)]
    outs = [g.input(codes.shape[0])]
    out = g.conv1(outs[0], styles[0], noises[0])
    outs.append(out)
    skip = g.to_rgb1(out, styles[1])
    k = 1
    for j, to_rgb in enumerate(g.to_rgbs):
        out = new_features.get(k, out)
        out = g.convs[2 * j](out, styles[2 + 3 * j], noises[1 + 2 * j])
        outs.append(out)
        out = new_features.get(k + 1, out)
        out = g.convs[2 * j + 1](out, styles[3 + 3 * j], noises[2 + 2 * j])
        outs.append(out)
        skip = to_rgb(out, styles[4 + 3 * j], skip)
        k += 2
    return skip, outs


@pytest.fixture(scope="module")
def generator():
    return make_generator(tiny_generator_config(128), seed=3)


def test_feature_index_maps_to_the_layer_numbering_at_any_size():
    assert [feature_layer(k) for k in range(1, 8)] == [0, 2, 3, 5, 6, 8, 9]
    assert make_generator(tiny_generator_config(64), seed=0).n_features == 10  # 4 px: input, conv1; 8..64 px: two each
    full = tiny_generator_config(1024, narrow=1)
    # the released SFE reads entry 9: the 64-px conv's output, 512 channels at 1024 px
    layer = feature_layer(9)
    assert full.layer_shapes[layer][2] == 512 and 4 << ((layer + 1) // 3) == 64


@torch.no_grad()
def test_features_and_replacement_follow_the_official_order(generator):
    codes = torch.randn(2, generator.n_styles, generator.style_dim)
    image, outs = official_order_reference(generator, codes)
    torch.testing.assert_close(generator(codes), image, rtol=0, atol=1e-5)
    for k in range(1, generator.n_features):
        feature = generator.feature(codes, k)
        assert tuple(feature.shape[1:]) == (generator.feature_shape(k)[0],) + (generator.feature_shape(k)[1],) * 2
        torch.testing.assert_close(feature, outs[k], rtol=0, atol=1e-5)
    for k in (1, 4, 9):  # an upsampling conv's output and a conv's output (9: the one SFE replaces)
        new = torch.randn_like(outs[k])
        expected, _ = official_order_reference(generator, codes, {k: new})
        replaced = generator(codes, new_features={k: new})
        torch.testing.assert_close(replaced, expected, rtol=0, atol=1e-5)
        assert (replaced - image).abs().max() > 1e-3
        # its own activation back in changes nothing
        torch.testing.assert_close(generator(codes, new_features={k: generator.feature(codes, k)}), image,
                                   rtol=0, atol=1e-6)
    styles = generator.styles(codes)
    torch.testing.assert_close(generator.synthesis_feature(styles, 9), generator.feature(codes, 9), rtol=0, atol=0)


def test_feature_requests_out_of_range_or_of_the_wrong_shape_are_refused(generator):
    codes = torch.randn(1, generator.n_styles, generator.style_dim)
    with pytest.raises(ValueError, match="outside"):
        generator.feature(codes, generator.n_features)
    with pytest.raises(ValueError, match="last activation"):
        generator(codes, new_features={generator.n_features - 1: generator.feature(codes, generator.n_features - 1)})
    with pytest.raises(ValueError, match=r"should have shape \[1, "):
        generator(codes, new_features={9: torch.zeros(1, 3, 64, 64)})


# ---- the SFE engine on tiny official-format files ----------------------------------------------------------------

from hyperstyle_nodes.engines.sfe.model import FEATURE_INDEX, SFEEditError, load_sfe  # noqa: E402
from hyperstyle_nodes.loaders import checkpoints as ckpts  # noqa: E402


class PickledCode:
    """Stands for arbitrary code a malicious file would make the unpickler run."""

    def __reduce__(self):
        return (print, ("this would have run",))


@pytest.fixture(scope="module")
def sfe_files(tmp_path_factory):
    from hyperstyle_nodes.tiny import make_tiny_sfe
    return make_tiny_sfe(tmp_path_factory.mktemp("sfe"))


@pytest.fixture(scope="module")
def sfe(sfe_files):
    return load_sfe(sfe_files["sfe_editor"], e4e=sfe_files["e4e"], generator=sfe_files["generator"])


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def inversion(sfe, images):
    return sfe.invert(images)


def test_the_files_say_what_they_are(sfe_files):
    assert {kind: ckpts.checkpoint_kind(path) for kind, path in sfe_files.items()} == {k: k for k in sfe_files}
    editor = ckpts.read_checkpoint(sfe_files["sfe_editor"])
    assert set(editor.parts) == {"inverter", "feature_editor"}  # the discriminator is dropped
    assert editor.output_size == 128 and "StyleFeatureEditor" in editor.describe()
    assert set(ckpts.read_checkpoint(sfe_files["sfe_inverter"]).parts) == {"inverter"}


def test_invert_and_decode_shapes(sfe, inversion):
    assert sfe.resolution == 128 and sfe.feature_layer == FEATURE_INDEX and sfe.can_edit
    assert inversion.codes.shape == inversion.e4e_codes.shape == (2, sfe.n_styles, 64)
    channels, res = sfe.generator.feature_shape(FEATURE_INDEX)
    assert inversion.features.shape == (2, channels, res, res) == (2, 32, 64, 64)
    assert inversion.images.shape == (2, 3, 128, 128)
    assert 0 <= inversion.images.min() and inversion.images.max() <= 1 and inversion.images.std() > 0.01
    assert sfe.decode(inversion, inversion.codes + 0.3).shape == (2, 3, 128, 128)


def test_a_batch_of_two_equals_each_image_alone(sfe, images, inversion):
    for i in range(2):
        alone = sfe.invert(images[i:i + 1])
        for field in ("codes", "e4e_codes", "features", "images"):
            torch.testing.assert_close(getattr(alone, field)[0], getattr(inversion, field)[i], rtol=0, atol=1e-5)


@torch.no_grad()
def test_decode_is_the_official_formula(sfe, inversion):
    """Unedited: the inversion's image, delta 0; edited: G(c', feature 9 := editor([fused, F(e) - F(e')]))."""
    torch.testing.assert_close(sfe.decode(inversion), inversion.images, rtol=0, atol=0)
    # the inversion's own codes are no edit: the delta is exactly zero
    torch.testing.assert_close(sfe.decode(inversion, inversion.codes), inversion.images, rtol=0, atol=0)
    g = sfe.generator
    direction = torch.randn(1, sfe.n_styles, 64, generator=torch.Generator().manual_seed(1))
    codes, e4e_codes = inversion.codes + direction, inversion.e4e_codes + direction
    delta = g.feature(inversion.e4e_codes, FEATURE_INDEX) - g.feature(e4e_codes, FEATURE_INDEX)
    edited = sfe.feature_editor(torch.cat([inversion.features, delta], dim=1))
    expected = ((g(codes, new_features={FEATURE_INDEX: edited}) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(sfe.decode(inversion, codes, e4e_codes), expected, rtol=0, atol=1e-6)
    # e4e codes moved by the same offset when not given; the StyleSpace path is the same decode
    torch.testing.assert_close(sfe.decode(inversion, codes), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(sfe.decode_styles(inversion, g.styles(codes), g.styles(e4e_codes)), expected,
                               rtol=0, atol=1e-6)
    # the edit acts through the codes and, through the feature editor, through e4e's move
    assert (expected - inversion.images).abs().max() > 1e-2
    no_move = sfe.decode(inversion, codes, inversion.e4e_codes)
    assert (no_move - expected).abs().max() > 1e-4
    # one inversion shared by a batch of edits (several strengths)
    single = type(inversion)(inversion.codes[:1], inversion.e4e_codes[:1], inversion.features[:1])
    strengths = inversion.codes[:1] + torch.tensor([0.0, 1.0])[:, None, None] * direction
    sweep = sfe.decode(single, strengths)
    torch.testing.assert_close(sweep[0], inversion.images[0], rtol=0, atol=0)
    torch.testing.assert_close(sweep[1], expected[0], rtol=0, atol=1e-6)


def test_graph_path_gives_the_eager_results(sfe, images, inversion, monkeypatch):
    """On a GPU, inversion and decodes replay CUDA graphs whose outputs the next replay overwrites; checked on the
    CPU with a stand-in for the graph cache: same results as the eager path, and results already returned keep
    their values when the same graph runs again."""
    from graph_replay import GraphReplay

    direction = torch.randn(1, sfe.n_styles, 64, generator=torch.Generator().manual_seed(2))
    eager_edit = sfe.decode(inversion, inversion.codes + direction)
    replay = GraphReplay()
    monkeypatch.setattr(type(sfe), "_graphs", lambda self: replay)
    graphed = sfe.invert(images)
    edited = sfe.decode(graphed, graphed.codes + direction)
    reconstruction = sfe.decode(graphed)
    assert replay.calls == ["invert", "edit", "reconstruct"]
    for field in ("codes", "e4e_codes", "features", "images"):
        torch.testing.assert_close(getattr(graphed, field), getattr(inversion, field), rtol=0, atol=1e-6)
    torch.testing.assert_close(edited, eager_edit, rtol=0, atol=1e-6)
    torch.testing.assert_close(reconstruction, inversion.images, rtol=0, atol=1e-6)
    kept = edited.clone(), graphed.images.clone(), graphed.codes.clone()
    other = sfe.invert(images.flip(0))  # the same graphs again, other inputs
    sfe.decode(other, other.codes - direction)
    assert replay.calls[-2:] == ["invert", "edit"]
    assert not torch.equal(other.images, graphed.images)
    for before, now in zip(kept, (edited, graphed.images, graphed.codes)):
        assert torch.equal(before, now)



@torch.no_grad()
def test_graph_path_of_an_inverter_only_model(sfe_files, images, monkeypatch):
    """No e4e: the invert graph's outputs carry a None, which must come back as None."""
    from graph_replay import GraphReplay

    model = load_sfe(sfe_files["sfe_inverter"], e4e=None, generator=sfe_files["generator"])
    eager = model.invert(images)
    monkeypatch.setattr(type(model), "_graphs", lambda self: GraphReplay())
    graphed = model.invert(images)
    assert graphed.e4e_codes is None
    torch.testing.assert_close(graphed.images, eager.images, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.decode(graphed), eager.images, rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: graphs are recorded only there")
@torch.no_grad()
def test_cuda_graphs_give_the_eager_results_on_the_gpu(sfe_files, images):
    model = load_sfe(sfe_files["sfe_editor"], e4e=sfe_files["e4e"], generator=sfe_files["generator"], device="cuda")
    direction = torch.randn(1, model.n_styles, 64, generator=torch.Generator().manual_seed(2)).cuda()
    model.cuda_graphs = False
    eager = model.invert(images)
    eager_edit = model.decode(eager, eager.codes + direction)
    model.cuda_graphs = True
    for _ in range(2):  # recorded, then replayed
        graphed = model.invert(images)
        edited = model.decode(graphed, graphed.codes + direction)
    assert model._graph_cache is not None and len(model._graph_cache.graphs) == 2
    for field in ("codes", "e4e_codes", "features", "images"):
        torch.testing.assert_close(getattr(graphed, field), getattr(eager, field), rtol=0, atol=1e-4)
    torch.testing.assert_close(edited, eager_edit, rtol=0, atol=1e-4)


@torch.no_grad()
def test_inverter_only_file_inverts_and_refuses_edits(sfe_files, images):
    model = load_sfe(sfe_files["sfe_inverter"], e4e=None, generator=sfe_files["generator"])
    assert not model.can_edit
    inversion = model.invert(images[:1])
    assert inversion.e4e_codes is None
    # the official FSEInverter: the fused feature itself goes into the generator
    expected = ((model.generator(inversion.codes, new_features={FEATURE_INDEX: inversion.features}) + 1) / 2)
    torch.testing.assert_close(inversion.images, expected.clamp(0, 1), rtol=0, atol=0)
    with pytest.raises(SFEEditError, match="inversion only.*sfe_editor_light.pt"):
        model.decode(inversion, inversion.codes + 1)
    with pytest.raises(ckpts.CheckpointError, match="pass e4e="):
        load_sfe(sfe_files["sfe_editor"], e4e=None, generator=sfe_files["generator"])


def test_files_of_the_wrong_kind_are_refused_with_what_they_are(sfe_files, tiny_ckpts):
    with pytest.raises(ckpts.CheckpointError, match="HyperStyle checkpoint.*StyleFeatureEditor"):
        load_sfe(tiny_ckpts["hyperstyle"], e4e=sfe_files["e4e"], generator=sfe_files["generator"])
    with pytest.raises(ckpts.CheckpointError, match="StyleGAN2 generator.*e4e"):
        load_sfe(sfe_files["sfe_editor"], e4e=sfe_files["generator"], generator=sfe_files["generator"])
    with pytest.raises(ckpts.CheckpointError, match="StyleFeatureEditor.*generator"):
        load_sfe(sfe_files["sfe_editor"], e4e=sfe_files["e4e"], generator=sfe_files["sfe_inverter"])


def test_pickled_code_is_refused(sfe_files, tmp_path):
    bad = tmp_path / "sfe_editor_light.pt"
    state = torch.load(sfe_files["sfe_editor"], weights_only=True)
    torch.save({**state, "opts": PickledCode()}, bad)
    with pytest.raises(ckpts.CheckpointError, match="Refused to load sfe_editor_light.pt.*pickled Python objects"):
        load_sfe(bad, e4e=sfe_files["e4e"], generator=sfe_files["generator"])


def test_safetensors_conversion_gives_the_same_model(sfe_files, sfe, tmp_path, images):
    converted = ckpts.save_safetensors(ckpts.read_checkpoint(sfe_files["sfe_editor"]), tmp_path / "sfe.safetensors")
    assert ckpts.checkpoint_kind(converted) == ckpts.SFE_EDITOR
    model = load_sfe(converted, e4e=sfe_files["e4e"], generator=sfe_files["generator"])
    for name, tensor in sfe.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


# ---- parity with the official code (opt-in: it needs a checkout of AIRI-Institute/StyleFeatureEditor) ------------

@pytest.mark.skipif(not __import__("os").environ.get("SFE_OFFICIAL_DIR"),
                    reason="set SFE_OFFICIAL_DIR to a StyleFeatureEditor checkout to compare with the official code "
                           "(CPU, fp32, a few minutes)")
def test_parity_with_the_official_code(tmp_path):
    """benchmarks/bench_sfe.py --parity in a fresh process (the official code's top-level modules would collide with
    other imports): official classes with random seeded weights, official-format files read back by the official
    loader and by load_sfe; codes within 1e-4, inversion and edited images within 1e-3, batch 2 = each alone."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "parity.jsonl"
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sfe.py"
    size = os.environ.get("SFE_PARITY_SIZE", "128")
    done = subprocess.run([sys.executable, str(bench), "--device", "cpu", "--official", os.environ["SFE_OFFICIAL_DIR"],
                           "--parity", "--skip-bench", "--size", size, "--input-size", "256", "--out", str(out)],
                          capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    parity = [r for r in rows if r["kind"] == "parity"]
    assert len(parity) == 1 and parity[0]["ok"], parity
    diffs = parity[0]["max_abs_diff"]
    assert diffs["codes"] <= 1e-4 and diffs["e4e_codes"] <= 1e-4
    assert diffs["inversion"] <= 1e-3 and diffs["edited"] <= 1e-3
    assert parity[0]["scale"]["edit_changes_image_mean"] > 1e-2  # the edit moved the image: not a vacuous match
