"""Checkpoint kinds, safe loading, wrong-kind messages and the safetensors conversion."""
import argparse
import subprocess
import sys

import pytest
import torch

from hyperstyle_nodes import CheckpointError, load_generator, load_hyperstyle, read_checkpoint
from hyperstyle_nodes.loaders import convert
from hyperstyle_nodes.tiny import write_tiny_checkpoints


@pytest.fixture(scope="module")
def tiny_64(tmp_path_factory):
    """A second, 64-px set, for size-mismatch cases."""
    return write_tiny_checkpoints(tmp_path_factory.mktemp("tiny64"), size=64, seed=5, layers_to_tune="0,2,3,5")


def test_kinds_are_recognised(tiny_ckpts):
    kinds = {name: read_checkpoint(path).kind for name, path in tiny_ckpts.items()}
    assert kinds == {"hyperstyle": "hyperstyle", "w_encoder": "w_encoder", "e4e": "e4e", "generator": "generator"}
    assert read_checkpoint(tiny_ckpts["e4e"]).output_size == 128


def test_released_structure_loads_strictly(tiny_ckpts):
    raw = torch.load(tiny_ckpts["hyperstyle"], weights_only=True)
    assert set(raw) == {"state_dict", "opts", "latent_avg"}
    assert any(k.startswith("hypernet.refinement_blocks.") for k in raw["state_dict"])
    assert "hypernet.refinement_blocks.0.hypernet.w1" in raw["state_dict"]  # the shared alias, as released
    model = load_hyperstyle(tiny_ckpts["hyperstyle"], w_encoder=tiny_ckpts["w_encoder"])
    # strict loading: our modules have exactly the file's keys
    hyper = {k[len("hypernet."):] for k in raw["state_dict"] if k.startswith("hypernet.")}
    assert set(model.hypernet.state_dict()) == hyper
    decoder = {k[len("decoder."):] for k in raw["state_dict"] if k.startswith("decoder.")}
    assert set(model.generator.state_dict()) == decoder
    enc = torch.load(tiny_ckpts["w_encoder"], weights_only=True)["state_dict"]
    assert set(model.encoder.state_dict()) == {k[len("encoder."):] for k in enc if k.startswith("encoder.")}
    e4e = load_hyperstyle(tiny_ckpts["hyperstyle"], e4e=tiny_ckpts["e4e"])
    assert e4e.encoder.config.kind == "e4e"


def test_layers_to_tune_come_from_opts(tiny_ckpts):
    model = load_hyperstyle(tiny_ckpts["hyperstyle"])
    tuned = [i for i, h in enumerate(model.hypernet.refinement_blocks) if h is not None]
    assert tuned == [0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15]


def test_inconsistent_layers_to_tune_is_a_clear_error(tiny_ckpts, tmp_path):
    raw = torch.load(tiny_ckpts["hyperstyle"], weights_only=True)
    raw["opts"]["layers_to_tune"] = "0,2,3"
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"tune layers \[0, 2, 3\] but its weights have heads"):
        load_hyperstyle(tmp_path / "bad.pt")


def test_generator_where_hyperstyle_expected(tiny_ckpts):
    with pytest.raises(CheckpointError) as err:
        load_hyperstyle(tiny_ckpts["generator"])
    msg = str(err.value)
    assert "generator.pt is a StyleGAN2 generator" in msg and "needs a HyperStyle checkpoint" in msg


def test_e4e_where_w_encoder_expected(tiny_ckpts):
    with pytest.raises(CheckpointError) as err:
        load_hyperstyle(tiny_ckpts["hyperstyle"], w_encoder=tiny_ckpts["e4e"])
    msg = str(err.value)
    assert "e4e.pt is an e4e/pSp W+ encoder" in msg and "needs a HyperStyle W-encoder" in msg and "e4e=" in msg


def test_w_encoder_where_e4e_expected(tiny_ckpts):
    with pytest.raises(CheckpointError, match="w_encoder.pt is a HyperStyle W-encoder.*needs an e4e"):
        load_hyperstyle(tiny_ckpts["hyperstyle"], e4e=tiny_ckpts["w_encoder"])


def test_hyperstyle_where_encoder_expected(tiny_ckpts):
    with pytest.raises(CheckpointError, match="hyperstyle.pt is a HyperStyle checkpoint.*needs a HyperStyle W-encoder"):
        load_hyperstyle(tiny_ckpts["hyperstyle"], w_encoder=tiny_ckpts["hyperstyle"])


@pytest.mark.parametrize("role", ["w_encoder", "e4e"])
def test_encoder_for_another_resolution(tiny_ckpts, tiny_64, role):
    with pytest.raises(CheckpointError) as err:
        load_hyperstyle(tiny_ckpts["hyperstyle"], **{role: tiny_64[role]})
    msg = str(err.value)
    assert "for a 64-px generator (10 style codes)" in msg and "is 128 px (12 style codes)" in msg


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "photo.pt"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(CheckpointError, match="Could not read photo.pt as a PyTorch checkpoint"):
        read_checkpoint(junk)
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a file this pack knows"):
        read_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "missing.pt")


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"hypernet.x": torch.zeros(1)}, "opts": _Payload(marker)}, evil)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(evil)
    assert "Refused to load evil.pt" in str(err.value) and "weights_only=True" in str(err.value)
    assert not marker.exists(), "the payload ran"


def test_namespace_opts_are_allowed(tiny_ckpts, tmp_path):
    raw = torch.load(tiny_ckpts["w_encoder"], weights_only=True)
    raw["opts"] = argparse.Namespace(**raw["opts"])
    torch.save(raw, tmp_path / "ns.pt")
    assert read_checkpoint(tmp_path / "ns.pt").kind == "w_encoder"


def test_convert_cli_entry_point(tiny_ckpts, tmp_path):
    dst = tmp_path / "generator.safetensors"
    result = subprocess.run([sys.executable, "-m", "hyperstyle_nodes.loaders.convert", str(tiny_ckpts["generator"]), str(dst)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "generator.pt is a StyleGAN2 generator" in result.stdout and dst.is_file()


def test_convert_to_safetensors_is_bit_identical(tiny_ckpts, tmp_path, face_batch, capsys):
    out = {name: tmp_path / f"{name}.safetensors" for name in ("hyperstyle", "w_encoder", "e4e", "generator")}
    for name, dst in out.items():
        assert convert.main([str(tiny_ckpts[name]), str(dst)]) == 0
        assert read_checkpoint(dst).kind == read_checkpoint(tiny_ckpts[name]).kind
    for enc in ("w_encoder", "e4e"):
        a = load_hyperstyle(tiny_ckpts["hyperstyle"], **{enc: tiny_ckpts[enc]}).invert(face_batch[:1], n_iters=1)
        b = load_hyperstyle(out["hyperstyle"], **{enc: out[enc]}).invert(face_batch[:1], n_iters=1)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.images, b.images)
    g1, g2 = load_generator(tiny_ckpts["generator"]), load_generator(out["generator"])
    codes = torch.randn(1, g1.n_styles, g1.style_dim)
    with torch.no_grad():
        assert torch.equal(g1(codes), g2(codes))


def test_convert_refuses_bad_input(tmp_path, tiny_ckpts, capsys):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"nope")
    assert convert.main([str(bad), str(tmp_path / "o.safetensors")]) == 2
    assert "Could not read x.pt" in capsys.readouterr().err
    (tmp_path / "exists.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit):
        convert.main([str(tiny_ckpts["generator"]), str(tmp_path / "exists.safetensors")])
    assert "--force" in capsys.readouterr().err


def test_foreign_safetensors_is_refused(tmp_path):
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="not one written by hyperstyle-nodes"):
        read_checkpoint(tmp_path / "model.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# Readable files with wrong contents: a CheckpointError naming the file and what is wrong (before: raw
# RuntimeError / KeyError / JSONDecodeError / ValueError, or NaN images for NaN weights)


def _edited(source, tmp_path, name, edit):
    raw = torch.load(source, weights_only=True)
    edit(raw)
    torch.save(raw, tmp_path / name)
    return tmp_path / name


def _load_pair(tiny_ckpts, hyperstyle=None, w_encoder=None):
    return load_hyperstyle(hyperstyle or tiny_ckpts["hyperstyle"], w_encoder=w_encoder or tiny_ckpts["w_encoder"])


def test_transposed_tensor_is_named(tiny_ckpts, tmp_path):
    key = "encoder.linear.weight"  # [64, 128]: the transposed [128, 64] makes a 128-wide encoder that cannot fit

    def transpose(raw):
        raw["state_dict"][key] = raw["state_dict"][key].t().contiguous()
    bad = _edited(tiny_ckpts["w_encoder"], tmp_path, "transposed.pt", transpose)
    with pytest.raises(CheckpointError, match=r"transposed.pt: its encoder weights do not fit .*'linear.weight' is "
                                              r"\[128, 64\], expected \[128, 128\]"):
        _load_pair(tiny_ckpts, w_encoder=bad)


def test_wrong_shaped_tensor_is_named(tiny_ckpts, tmp_path):
    def shrink(raw):
        raw["state_dict"]["hypernet.refinement_blocks.15.convs.0.weight"] = torch.zeros(3, 3)
    bad = _edited(tiny_ckpts["hyperstyle"], tmp_path, "shrunk.pt", shrink)
    with pytest.raises(CheckpointError, match=r"shrunk.pt: its hypernet weights do not fit .*1 of wrong shape "
                                              r"\('refinement_blocks.15.convs.0.weight' is \[3, 3\], expected"):
        _load_pair(tiny_ckpts, hyperstyle=bad)


@pytest.mark.parametrize("key", ["decoder.convs.3.conv.weight", "decoder.conv1.conv.weight",
                                 "hypernet.shared_weight_hypernet.w1", "hypernet.conv1.weight"])
def test_missing_tensor_is_named(tiny_ckpts, tmp_path, key):
    bad = _edited(tiny_ckpts["hyperstyle"], tmp_path, "missing.pt", lambda raw: raw["state_dict"].pop(key))
    with pytest.raises(CheckpointError, match=r"missing.pt: .*" + key.split(".", 1)[1].replace(".", r"\.")):
        _load_pair(tiny_ckpts, hyperstyle=bad)


def test_missing_encoder_tensor_is_named(tiny_ckpts, tmp_path):
    bad = _edited(tiny_ckpts["w_encoder"], tmp_path, "enc.pt", lambda raw: raw["state_dict"].pop(
        "encoder.input_layer.0.weight"))
    with pytest.raises(CheckpointError, match=r"enc.pt: the tensor or option 'input_layer.0.weight' is missing"):
        _load_pair(tiny_ckpts, w_encoder=bad)


@pytest.mark.parametrize("value", ["big", [128], "12.5"])
def test_non_numeric_size_option_is_named(tiny_ckpts, tmp_path, value):
    bad = _edited(tiny_ckpts["hyperstyle"], tmp_path, "opts.pt", lambda raw: raw["opts"].update(output_size=value))
    with pytest.raises(CheckpointError, match=r"opts.pt: its option output_size/stylegan_size is .* not a whole"):
        read_checkpoint(bad)


def test_opts_of_the_wrong_type_are_named(tiny_ckpts, tmp_path):
    bad = _edited(tiny_ckpts["hyperstyle"], tmp_path, "opts.pt", lambda raw: raw.update(opts=[1, 2]))
    with pytest.raises(CheckpointError, match=r"opts.pt: its 'opts' are a list"):
        read_checkpoint(bad)
    bad = _edited(tiny_ckpts["hyperstyle"], tmp_path, "layers.pt",
                  lambda raw: raw["opts"].update(layers_to_tune="0,two,3"))
    with pytest.raises(CheckpointError, match=r"layers.pt: its tensors or options do not describe a model"):
        _load_pair(tiny_ckpts, hyperstyle=bad)


def test_safetensors_opts_that_are_not_json(tiny_ckpts, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    good = tmp_path / "good.safetensors"
    assert convert.main([str(tiny_ckpts["w_encoder"]), str(good)]) == 0
    with safe_open(str(good), framework="pt") as f:
        metadata = f.metadata()
    save_file(load_file(str(good)), str(tmp_path / "bad.safetensors"), metadata={**metadata, "opts": "{not json"})
    with pytest.raises(CheckpointError, match=r"bad.safetensors: its 'opts' metadata is not valid JSON"):
        read_checkpoint(tmp_path / "bad.safetensors")
    save_file(load_file(str(good)), str(tmp_path / "list.safetensors"), metadata={**metadata, "opts": "[1]"})
    with pytest.raises(CheckpointError, match=r"list.safetensors: its 'opts' are a list"):
        read_checkpoint(tmp_path / "list.safetensors")


@pytest.mark.parametrize("source,key,what", [
    ("hyperstyle", "hypernet.refinement_blocks.5.convs.0.weight", "hypernet"),
    ("hyperstyle", "decoder.convs.2.conv.weight", "generator"),
    ("w_encoder", "encoder.body.0.res_layer.1.weight", "encoder"),
])
def test_nan_weights_are_refused_at_load(tiny_ckpts, tmp_path, source, key, what):
    def poison(raw):
        raw["state_dict"][key] = raw["state_dict"][key].clone()
        raw["state_dict"][key].view(-1)[7] = float("nan")
    bad = _edited(tiny_ckpts[source], tmp_path, "nan.pt", poison)
    with pytest.raises(CheckpointError, match=rf"nan.pt: 1 of its {what} tensors contain NaN or infinite values "
                                              rf"\('{key.split('.', 1)[1]}'\)"):
        _load_pair(tiny_ckpts, **{source: bad})


def test_nan_generator_and_latent_avg_are_refused(tiny_ckpts, tmp_path):
    def poison(raw):
        raw["g_ema"]["to_rgbs.0.bias"] = torch.full_like(raw["g_ema"]["to_rgbs.0.bias"], float("inf"))
    with pytest.raises(CheckpointError, match=r"gen.pt: 1 of its generator tensors contain NaN"):
        load_generator(_edited(tiny_ckpts["generator"], tmp_path, "gen.pt", poison))
    bad = _edited(tiny_ckpts["hyperstyle"], tmp_path, "avg.pt", lambda raw: raw["latent_avg"].view(-1).__setitem__(
        0, float("nan")))
    with pytest.raises(CheckpointError, match=r"avg.pt: 'latent_avg' contains NaN"):
        read_checkpoint(bad)
    bad = _edited(tiny_ckpts["hyperstyle"], tmp_path, "avg.pt", lambda raw: raw.update(latent_avg=torch.zeros(5, 64)))
    with pytest.raises(CheckpointError, match=r"avg.pt: 'latent_avg' has shape \[5, 64\], expected \[D\], \[1, D\] "
                                              r"or \[12, D\]"):
        read_checkpoint(bad)
