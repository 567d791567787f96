"""Tests for hyperstyle_nodes.editing.directions: directions, layer ranges, sweeps, GANSpace and direction files."""
import inspect

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hyperstyle_nodes.editing.directions import (
    apply_direction, apply_ganspace, deltas_for_sweep, linspace_strengths, list_direction_files, load_direction,
    load_ganspace, sweep, sweep_source_indices,
)

D = 8  # small style_dim keeps per-style checks readable


def make_codes(batch=2, n_styles=6, style_dim=D, seed=0):
    return torch.randn(batch, n_styles, style_dim, generator=torch.Generator().manual_seed(seed))


# --- apply_direction -------------------------------------------------------------------------------------------

def test_edit_takes_only_codes_and_leaves_input_untouched():
    # HyperStyle edits keep identity because offsets are not edited: the API cannot even receive them.
    assert list(inspect.signature(apply_direction).parameters) == ["codes", "direction", "strength", "layers"]
    codes = make_codes()
    before = codes.clone()
    edited = apply_direction(codes, torch.ones(1, D), 3.0)
    assert torch.equal(codes, before)
    assert edited.data_ptr() != codes.data_ptr()
    assert not torch.equal(edited, codes)


def test_strength_zero_is_identity():
    codes = make_codes()
    for direction in (torch.randn(1, D), torch.randn(6, D)):
        assert torch.equal(apply_direction(codes, direction, 0.0), codes)


def test_w_direction_moves_every_style_by_the_same_vector():
    codes = make_codes()
    direction = torch.arange(D, dtype=torch.float32).reshape(1, D)
    edited = apply_direction(codes, direction, 2.0)
    for style in range(codes.shape[1]):
        torch.testing.assert_close(edited[:, style] - codes[:, style], (2.0 * direction).expand(2, D))


def test_w_plus_direction_moves_each_style_by_its_own_row():
    codes = make_codes()
    direction = torch.arange(6, dtype=torch.float32)[:, None] * torch.ones(6, D)  # row i is all i
    edited = apply_direction(codes, direction, -0.5)
    for style in range(6):
        torch.testing.assert_close(edited[:, style] - codes[:, style], torch.full((2, D), -0.5 * style))


def test_layer_range_limits_the_edit_and_end_is_clamped():
    codes = make_codes()
    edited = apply_direction(codes, torch.ones(1, D), 1.0, layers=(2, 4))
    moved = (edited - codes).abs().amax(dim=(0, 2)) > 0
    assert moved.tolist() == [False, False, True, True, False, False]

    clamped = apply_direction(codes, torch.ones(1, D), 1.0, layers=(3, 18))  # a UI default on a 6-style model
    assert ((clamped - codes).abs().amax(dim=(0, 2)) > 0).tolist() == [False, False, False, True, True, True]


@pytest.mark.parametrize("layers", [(4, 4), (5, 2), (-1, 3), (6, 9)])
def test_empty_or_invalid_layer_range_is_refused(layers):
    with pytest.raises(ValueError, match="selects no styles"):
        apply_direction(make_codes(), torch.ones(1, D), 1.0, layers=layers)


def test_half_precision_codes_keep_their_dtype():
    codes = make_codes().half()
    edited = apply_direction(codes, torch.ones(1, D), 1.0)
    assert edited.dtype == torch.float16
    torch.testing.assert_close(edited.float(), codes.float() + 1.0, atol=1e-2, rtol=0)


# --- load_direction -----------------------------------------------------------------------------------------------

ACCEPTED_SHAPES = [((D,), 1), ((1, D), 1), ((6, D), 6), ((1, 6, D), 6)]


@pytest.mark.parametrize("shape,rows", ACCEPTED_SHAPES)
@pytest.mark.parametrize("suffix", [".npy", ".safetensors", ".pt"])
def test_user_direction_files_in_each_accepted_shape(tmp_path, shape, rows, suffix):
    values = torch.randn(*shape, dtype=torch.float64)  # float64 on disk must come back as float32
    path = tmp_path / f"dir{suffix}"
    if suffix == ".npy":
        np.save(path, values.numpy())
    elif suffix == ".safetensors":
        save_file({"direction": values}, str(path))
    else:
        torch.save(values, path)
    loaded = load_direction(path, n_styles=6, style_dim=D)
    assert loaded.dtype == torch.float32
    assert loaded.shape == (rows, D)
    torch.testing.assert_close(loaded, values.float().reshape(rows, D))


def test_safetensors_direction_picks_the_tensor_named_direction(tmp_path):
    path = tmp_path / "two.safetensors"
    save_file({"other": torch.zeros(D), "direction": torch.ones(D)}, str(path))
    assert torch.equal(load_direction(path, style_dim=D), torch.ones(1, D))
    save_file({"a": torch.zeros(D), "b": torch.ones(D)}, str(path))
    with pytest.raises(ValueError, match="holds 2 tensors"):
        load_direction(path, style_dim=D)


@pytest.mark.parametrize("shape,message", [
    ((300,), "shape (300,); its last dimension is 300"),
    ((1, 18, 256), "shape (1, 18, 256); its last dimension is 256"),
    ((2, 3, 512), "shape (2, 3, 512); 3 dimensions"),
])
def test_wrong_direction_size_names_file_shape_and_accepted_shapes(tmp_path, shape, message):
    path = tmp_path / "bad.npy"
    np.save(path, np.zeros(shape, dtype=np.float32))
    with pytest.raises(ValueError) as err:
        load_direction(path, n_styles=18)
    text = str(err.value)
    assert str(path) in text and message in text
    assert "Accepted shapes: (512,), (1, 512), (18, 512) or (1, 18, 512)" in text
    assert "n_styles=18" in text


def test_w_plus_direction_for_another_resolution_is_refused():
    with pytest.raises(ValueError, match=r"W\+ direction with 18 styles does not fit a latent with 14 styles"):
        load_direction(torch.zeros(1, 18, 512), n_styles=14)
    with pytest.raises(ValueError, match="does not fit a latent with 14 styles"):
        apply_direction(torch.zeros(1, 14, 512), torch.zeros(18, 512), 1.0)


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"import pathlib; pathlib.Path({self.marker!r}).touch()",)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"direction": torch.zeros(D), "payload": _RunsCodeWhenUnpickled(str(marker))}, path)
    with pytest.raises(ValueError, match="refused to load.*could run code"):
        load_direction(path, style_dim=D)
    assert not marker.exists()


def test_object_npy_is_refused(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="refused to load a pickled"):
        load_direction(path, style_dim=D)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_direction(tmp_path / "nope.pt")
    (tmp_path / "x.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_direction(tmp_path / "x.txt")


@pytest.mark.parametrize("name,rows", [("age", 1), ("smile", 1), ("pose", 18)])
def test_released_interfacegan_directions_apply_to_an_18_style_latent(assets_dir, name, rows):
    path = assets_dir / "models" / "interfacegan" / f"{name}.pt"  # pose.pt was saved on CUDA
    direction = load_direction(path, n_styles=18)
    assert direction.shape == (rows, 512) and direction.dtype == torch.float32
    torch.testing.assert_close(direction.norm(dim=-1), torch.ones(rows))  # released directions are unit rows

    codes = make_codes(batch=1, n_styles=18, style_dim=512)
    edited = apply_direction(codes, direction, 3.0)
    for style in range(18):
        torch.testing.assert_close(edited[0, style] - codes[0, style], 3.0 * direction[min(style, rows - 1)])


# --- sweeps ---------------------------------------------------------------------------------------------------------

def test_linspace_strengths():
    assert linspace_strengths(-3, 3, 4) == [-3.0, -1.0, 1.0, 3.0]
    assert linspace_strengths(0.1, 0.7, 7)[-1] == 0.7
    assert linspace_strengths(2, 5, 1) == [2.0]
    with pytest.raises(ValueError):
        linspace_strengths(0, 1, 0)


def test_sweep_is_strengths_major():
    codes = make_codes(batch=2)
    direction = torch.randn(1, D)
    strengths = [-2.0, 0.0, 1.5]
    out = sweep(codes, direction, strengths, layers=(1, 3))
    assert out.shape == (6, 6, D)
    for s, strength in enumerate(strengths):
        for b in range(2):
            assert torch.equal(out[s * 2 + b], apply_direction(codes[b:b + 1], direction, strength, (1, 3))[0])
    assert sweep_source_indices(2, 3).tolist() == [0, 1, 0, 1, 0, 1]


def test_deltas_for_sweep_lines_offsets_up_with_the_sweep_rows():
    deltas = [None, torch.randn(2, 3, 4, 3, 3), torch.randn(2, 3, 4)]
    repeated = deltas_for_sweep(deltas, 3)
    assert repeated[0] is None
    index = sweep_source_indices(2, 3)
    for original, lined_up in zip(deltas[1:], repeated[1:]):
        assert torch.equal(lined_up, original[index])


# --- GANSpace -------------------------------------------------------------------------------------------------------

def synthetic_pca(n_components=5, style_dim=D, seed=1):
    """A small PCA dict in the real file layout of e4e's ffhq_pca.pt: comp (K,1,D), std (K,), mean (1,D)."""
    g = torch.Generator().manual_seed(seed)
    comp = torch.linalg.qr(torch.randn(style_dim, style_dim, generator=g))[0].T[:n_components]
    return {"mean": torch.randn(1, style_dim, generator=g), "comp": comp.reshape(n_components, 1, style_dim),
            "std": torch.rand(n_components, generator=g) + 0.5}


def test_ganspace_matches_e4e_formula_on_hand_computed_numbers():
    # style_dim 2, so the numbers can be checked by hand.
    pca = load_ganspace({"mean": torch.tensor([[1.0, 0.0]]), "std": torch.tensor([2.0, 4.0]),
                         "comp": torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])})
    codes = torch.tensor([[[5.0, 7.0], [0.0, 0.0], [9.0, 9.0]]])  # 1 sample, 3 styles
    # component 1: coord = dot(w0 - mean, c) / std = dot([4, 7], [0, 1]) / 4 = 1.75
    #              delta = (strength - coord) * c * std = (3 - 1.75) * [0, 1] * 4 = [0, 5]
    edited = apply_ganspace(codes, pca, component=1, start=1, end=3, strength=3.0)
    assert edited.tolist() == [[[5.0, 7.0], [0.0, 5.0], [9.0, 14.0]]]
    assert codes.tolist() == [[[5.0, 7.0], [0.0, 0.0], [9.0, 9.0]]]  # input untouched


def test_ganspace_on_a_synthetic_pca_file(tmp_path):
    raw = synthetic_pca()
    path = tmp_path / "pca.pt"
    torch.save(raw, path)
    pca = load_ganspace(path)
    assert pca.n_components == 5 and pca.style_dim == D

    codes = make_codes(batch=3, n_styles=6)
    k, start, end, strength = 2, 1, 4, 1.7
    edited = apply_ganspace(codes, pca, k, start, end, strength)

    comp, std, mean = raw["comp"][k, 0].double(), raw["std"][k].double(), raw["mean"][0].double()
    for b in range(3):
        w0 = codes[b, 0].double()
        coord = float(((w0 - mean) * comp).sum() / std)
        expected = codes[b].double().clone()
        expected[start:end] += (strength - coord) * comp * std
        torch.testing.assert_close(edited[b].double(), expected, rtol=0, atol=1e-5)
    # strength is a target coordinate: when style 0 is in the range it lands exactly `strength` stds along
    moved_first = apply_ganspace(codes, pca, k, 0, 6, strength)
    coords = ((moved_first[:, 0].double() - mean) @ comp) / std
    torch.testing.assert_close(coords, torch.full((3,), strength, dtype=torch.float64), rtol=0, atol=1e-5)


def test_ganspace_errors():
    pca = load_ganspace(synthetic_pca())
    codes = make_codes()
    for bad in (5, -1, 99):
        with pytest.raises(ValueError, match=r"component .* out of range: .* 5 components \(0 \.\. 4\)"):
            apply_ganspace(codes, pca, bad, 0, 3, 1.0)
    with pytest.raises(ValueError, match="selects no styles"):
        apply_ganspace(codes, pca, 0, 3, 3, 1.0)
    with pytest.raises(ValueError, match="style_dim 512 but the GANSpace PCA has 8"):
        apply_ganspace(torch.zeros(1, 6, 512), pca, 0, 0, 3, 1.0)
    with pytest.raises(ValueError, match="not a GANSpace PCA file"):
        load_ganspace({"comp": torch.zeros(2, 1, D)})


# --- direction files ----------------------------------------------------------------------------------------------

def test_list_direction_files(tmp_path):
    for name in ["smile.pt", "Age.pth", "b.npy", "c.safetensors", "notes.txt", ".hidden.pt", "sub/pose.pt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert list_direction_files(tmp_path) == ["Age.pth", "b.npy", "c.safetensors", "smile.pt", "sub/pose.pt"]
    assert list_direction_files(tmp_path / "missing") == []


def test_a_checkpoint_is_refused_as_a_direction(tiny_ckpts, tmp_path):
    """Before: a checkpoint's only top-level tensor, latent_avg, was taken as the direction."""
    from hyperstyle_nodes import ops
    from hyperstyle_nodes.loaders import convert

    for name in ("hyperstyle", "generator"):
        with pytest.raises(ValueError, match=rf"{name}.pt: this is a model checkpoint \(it holds .*'latent_avg'\), "
                                             r"not an edit direction"):
            load_direction(tiny_ckpts[name], n_styles=12, style_dim=64)
        # the node path tries GANSpace next and still reports the direction's message
        with pytest.raises(ValueError, match="not an edit direction"):
            ops.load_edit(str(tiny_ckpts[name]), 12, 64)
    torch.save({"latent_avg": torch.zeros(64)}, tmp_path / "avg.pt")
    with pytest.raises(ValueError, match="avg.pt: this is a model checkpoint"):
        load_direction(tmp_path / "avg.pt", n_styles=12, style_dim=64)
    assert convert.main([str(tiny_ckpts["generator"]), str(tmp_path / "gen.safetensors")]) == 0
    with pytest.raises(ValueError, match="gen.safetensors: this is a model checkpoint .*, not an edit direction"):
        load_direction(tmp_path / "gen.safetensors", n_styles=12, style_dim=64)


def test_a_saved_inversion_is_refused_as_a_direction(tmp_path):
    """Before: an inversion without offsets holds one tensor, its codes, which was taken as a W+ direction."""
    from hyperstyle_nodes.loaders.inversion_io import save_inversion

    path = save_inversion(tmp_path / "inv", torch.randn(1, 12, 64), [None] * 20, "model")
    with pytest.raises(ValueError, match="inv.safetensors: this is a saved inversion .*not an edit direction"):
        load_direction(path, n_styles=12, style_dim=64)
