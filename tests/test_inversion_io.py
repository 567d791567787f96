"""Tests for hyperstyle_nodes.loaders.inversion_io: bit-exact save/load of codes + weight offsets."""
import pytest
import torch
from safetensors.torch import save_file

from hyperstyle_nodes.loaders.inversion_io import load_inversion, save_inversion

BIT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits_equal(a, b):
    """Same dtype, shape and bytes (unlike torch.equal this also tells -0.0 from 0.0 and compares NaNs)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(BIT_VIEW[a.dtype]),
                                                                      b.view(BIT_VIEW[b.dtype]))


def make_inversion(dtype, batch=2):
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(batch, 18, 512, generator=g).to(dtype)
    codes[0, 0, 0] = -0.0  # a sign bit that value comparison would miss
    deltas = [None] * 26
    deltas[5] = torch.randn(batch, 4, 3, 3, 3, generator=g).to(dtype)  # full per-weight offsets
    deltas[6] = torch.randn(batch, 4, 3, generator=g).to(dtype)        # compact per-channel offsets
    deltas[25] = torch.randn(batch, 2, 5, 1, 1, generator=g).to(dtype)  # last layer (1x1 kernel)
    return codes, deltas


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    codes, deltas = make_inversion(dtype)
    extra = {"source": "astronaut.png", "crop": [1, 2, 3, 4]}
    written = save_inversion(tmp_path / "face", codes, deltas, "hyperstyle_ffhq", extra=extra)
    assert written == tmp_path / "face.safetensors"

    loaded_codes, loaded_deltas, meta = load_inversion(written)
    assert bits_equal(loaded_codes, codes)
    assert len(loaded_deltas) == 26
    for layer, (original, loaded) in enumerate(zip(deltas, loaded_deltas)):
        if original is None:
            assert loaded is None, f"layer {layer} should stay untuned"
        else:
            assert bits_equal(loaded, original), f"layer {layer} changed"
    assert loaded_deltas[6].shape == (2, 4, 3)  # compact form stays compact
    assert meta == {"format_version": 1, "model_id": "hyperstyle_ffhq", "num_layers": 26,
                    "delta_layers": [5, 6, 25], "dtype": str(dtype).removeprefix("torch."), "extra": extra}


def test_views_of_one_buffer_and_all_none_deltas_save(tmp_path):
    codes = torch.randn(3, 14, 16)
    buffer = torch.randn(3, 2, 4, 4)
    deltas = [buffer[:, 0], None, buffer[:, 1]]  # views sharing memory, which safetensors refuses as is
    loaded_codes, loaded_deltas, _ = load_inversion(save_inversion(tmp_path / "v.safetensors", codes, deltas, "m"))
    assert torch.equal(loaded_deltas[0], buffer[:, 0]) and torch.equal(loaded_deltas[2], buffer[:, 1])

    _, none_deltas, meta = load_inversion(save_inversion(tmp_path / "e4e_only", codes, [None] * 4, "m"))
    assert none_deltas == [None] * 4 and meta["delta_layers"] == []


def test_model_safetensors_is_not_an_inversion(tmp_path):
    path = tmp_path / "generator.safetensors"
    save_file({"conv1.weight": torch.zeros(2, 2), "conv1.bias": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError) as err:
        load_inversion(path)
    text = str(err.value)
    assert "is not a HyperStyle inversion" in text and "no 'format' metadata" in text and "'conv1.weight'" in text


def test_non_safetensors_file_is_not_an_inversion(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(3)}, path)  # a pickle zip wearing the wrong suffix
    with pytest.raises(ValueError, match="is not a HyperStyle inversion.*not a readable .safetensors"):
        load_inversion(path)
    with pytest.raises(FileNotFoundError):
        load_inversion(tmp_path / "missing.safetensors")


def test_existing_files_are_never_overwritten_unless_asked(tmp_path):
    codes, deltas = make_inversion(torch.float32, batch=1)
    first = save_inversion(tmp_path / "face.safetensors", codes, deltas, "a")
    first_bytes = first.read_bytes()
    second = save_inversion(tmp_path / "face.safetensors", codes * 2, deltas, "b")
    third = save_inversion(tmp_path / "face.safetensors", codes * 3, deltas, "c")
    assert [first.name, second.name, third.name] == ["face.safetensors", "face_00001.safetensors",
                                                      "face_00002.safetensors"]
    assert first.read_bytes() == first_bytes
    assert load_inversion(third)[2]["model_id"] == "c"

    replaced = save_inversion(tmp_path / "face.safetensors", codes * 4, deltas, "d", overwrite=True)
    assert replaced == first and load_inversion(first)[2]["model_id"] == "d"
    # counting continues after the highest number, like ComfyUI, and no temporary files are left behind
    (tmp_path / "face_00001.safetensors").unlink()
    assert save_inversion(tmp_path / "face", codes, deltas, "e").name == "face_00003.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("codes,deltas,message", [
    (torch.zeros(18, 512), [], "codes must be a float tensor"),
    (torch.zeros(2, 18, 512), [torch.zeros(3, 4, 4)], r"deltas\[0\] has batch 3 but codes have batch 2"),
    (torch.zeros(2, 18, 512), [None, torch.zeros(2, 4)], r"deltas\[1\] must be None or a float tensor"),
    (torch.zeros(2, 18, 512), torch.zeros(2, 4, 4), "deltas must be a list"),
])
def test_invalid_inputs_are_refused_before_writing(tmp_path, codes, deltas, message):
    with pytest.raises(ValueError, match=message):
        save_inversion(tmp_path / "x", codes, deltas, "m")
    assert list(tmp_path.iterdir()) == []


def test_extra_must_be_json(tmp_path):
    with pytest.raises(ValueError, match="JSON"):
        save_inversion(tmp_path / "x", torch.zeros(1, 2, 4), [], "m", extra={"image": torch.zeros(1)})
