"""Checkpoint kinds, safe loading, wrong-kind messages and the safetensors conversion."""
import argparse
import subprocess
import sys

import pytest
import torch

from hyperstyle_nodes import CheckpointError, convert, load_generator, load_hyperstyle, read_checkpoint
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
    result = subprocess.run([sys.executable, "-m", "hyperstyle_nodes.convert", str(tiny_ckpts["generator"]), str(dst)],
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
