"""Align Face / Paste Face Back / edits / saved inversions as nodes, on real photos with tiny models."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import nodes as pack_nodes
from hyperstyle_nodes import ops


@pytest.fixture()
def models_dir(tiny_ckpts, assets_dir, tmp_path, monkeypatch):
    folder = tmp_path / "models"
    (folder / "directions").mkdir(parents=True)
    for name, path in tiny_ckpts.items():
        shutil.copy(path, folder / f"tiny_{name}.pt")
    shutil.copy(assets_dir / "models/retinaface/retinaface_mobilenet0.25.pth", folder / "retinaface_mobilenet0.25.pth")
    torch.save(torch.randn(1, 64), folder / "directions" / "tiny_dir.pt")
    monkeypatch.setenv("HYPERSTYLE_MODELS_DIR", str(folder))
    monkeypatch.chdir(tmp_path)  # Save Inversion writes under ./output outside ComfyUI
    return folder


def photo(path):
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).float()[None] / 255


def test_align_invert_edit_decode_paste_back(models_dir, face_photos):
    image = photo(face_photos[0])
    faces, records = pack_nodes.HyperStyleAlignFace().align(image, "retinaface_mobilenet0.25.pth", "256", "largest",
                                                            0, 0.9, "error")
    assert faces.shape == (1, 256, 256, 3) and len(records) == 1
    (model,) = pack_nodes.HyperStyleLoader().load("tiny_hyperstyle.pt", "tiny_w_encoder.pt", "fp32", "cpu")
    latent, _ = pack_nodes.HyperStyleEncode().encode(model, faces)
    deltas, _ = pack_nodes.HyperStyleRefine().refine(model, faces, latent, 1)
    (edited,) = pack_nodes.HyperStyleApplyEdit().edit(latent, "directions/tiny_dir.pt", 0, -1, 3.0, 0)
    assert not torch.equal(edited.codes, latent.codes)
    (same,) = pack_nodes.HyperStyleApplyEdit().edit(latent, "directions/tiny_dir.pt", 0, -1, 0.0, 0)
    assert torch.equal(same.codes, latent.codes)
    (out,) = pack_nodes.HyperStyleDecode().decode(model, edited, "native", deltas)
    pasted, mask = pack_nodes.HyperStylePasteBack().paste(image, out, records, 32.0)
    assert pasted.shape == image.shape and mask.shape == image.shape[:3]
    outside = mask[0] == 0
    assert torch.equal(pasted[0][outside], image[0][outside])  # untouched outside the face
    assert (pasted[0][mask[0] > 0.5] - image[0][mask[0] > 0.5]).abs().mean() > 0.01


def test_no_face_error_and_pass_through(models_dir):
    flat = torch.full((1, 300, 400, 3), 0.5)
    with pytest.raises(ValueError, match="no face found in batch image 0"):
        pack_nodes.HyperStyleAlignFace().align(flat, "retinaface_mobilenet0.25.pth", "256", "largest", 0, 0.9, "error")
    faces, records = pack_nodes.HyperStyleAlignFace().align(flat, "retinaface_mobilenet0.25.pth", "256", "largest",
                                                            0, 0.9, "center_crop")
    assert faces.shape == (1, 256, 256, 3) and records[0].method == "center_crop"


def test_sweep_save_load(models_dir):
    (model,) = pack_nodes.HyperStyleLoader().load("tiny_hyperstyle.pt", "tiny_w_encoder.pt", "fp32", "cpu")
    images = torch.rand(2, 64, 64, 3)
    latent, _ = pack_nodes.HyperStyleEncode().encode(model, images)
    deltas, _ = pack_nodes.HyperStyleRefine().refine(model, images, latent, 1)
    swept, swept_deltas = pack_nodes.HyperStyleEditSweep().sweep(latent, "directions/tiny_dir.pt", 0, -1, -2.0, 2.0,
                                                                 3, deltas)
    assert swept.codes.shape[0] == 6 and swept_deltas.batch == 6
    assert torch.allclose(swept.codes[2:4], latent.codes)  # strength-major: the middle strength is 0
    (images_out,) = pack_nodes.HyperStyleDecode().decode(model, swept, "256", swept_deltas)
    assert images_out.shape == (6, 256, 256, 3)
    result = pack_nodes.HyperStyleSaveInversion().save(latent, "hyperstyle/test", deltas)
    path = result["result"][0]
    assert pack_nodes.HyperStyleSaveInversion().save(latent, "hyperstyle/test", deltas)["result"][0] != path
    choices = pack_nodes.HyperStyleLoadInversion.INPUT_TYPES()["required"]["inversion"][0]
    assert len(choices) == 2 and all(c.startswith("hyperstyle/test") for c in choices)
    loaded_latent, loaded_deltas = pack_nodes.HyperStyleLoadInversion().load(choices[-1])
    assert torch.equal(loaded_latent.codes, latent.codes)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(loaded_deltas.deltas, deltas.deltas))
    assert loaded_latent.model_id == latent.model_id


def test_ganspace_file_through_apply_edit(models_dir):
    """A PCA file in the GANSpace layout (comp [K,1,D], std [K], mean [1,D]) is applied the way e4e does."""
    g = torch.Generator().manual_seed(7)
    comp = torch.nn.functional.normalize(torch.randn(4, 1, 64, generator=g), dim=-1)
    pca = {"comp": comp, "std": torch.rand(4, generator=g) + 0.5, "mean": torch.randn(1, 64, generator=g)}
    torch.save(pca, models_dir / "directions" / "tiny_pca.pt")
    codes = torch.randn(2, 12, 64, generator=g)
    latent = ops.Latent(codes, "tiny")
    (edited,) = pack_nodes.HyperStyleApplyEdit().edit(latent, "directions/tiny_pca.pt", 2, 5, 1.5, 1)
    c, s = pca["comp"][1, 0], pca["std"][1]
    coord = ((codes[:, 0] - pca["mean"][0]) @ c) / s  # e4e: projection of the first style vector
    expected = codes.clone()
    expected[:, 2:5] += ((1.5 - coord)[:, None] * c * s)[:, None, :]
    assert torch.allclose(edited.codes, expected, atol=1e-5)
    assert torch.equal(edited.codes[:, :2], codes[:, :2]) and torch.equal(edited.codes[:, 5:], codes[:, 5:])


def test_align_face_node_threshold_slider_and_landmarks_choice(models_dir, face_photos):
    """Issue 20: the threshold slider went up to 1.0, which detection then rejected. Issue 23: a landmarks choice."""
    spec = pack_nodes.HyperStyleAlignFace.INPUT_TYPES()
    top = spec["required"]["threshold"][1]["max"]
    assert top < 1.0
    choices = spec["optional"]["landmarks"][0]
    assert choices == ["auto", "dlib68", "retinaface5"] and spec["optional"]["landmarks"][1]["default"] == "auto"
    image = photo(face_photos[0])
    node = pack_nodes.HyperStyleAlignFace()
    faces, records = node.align(image, "retinaface_mobilenet0.25.pth", "256", "largest", 0, top, "center_crop")
    assert faces.shape == (1, 256, 256, 3)
    five, five_records = node.align(image, "retinaface_mobilenet0.25.pth", "256", "largest", 0, 0.9, "error",
                                    "retinaface5")
    assert five_records[0].method == "ffhq"


def test_paste_face_back_node_puts_every_face_into_its_photo(models_dir, face_photos):
    """selection=all on a photo with two people -> two crops -> one photo back with both faces replaced."""
    a, b = photo(face_photos[0])[0], photo(face_photos[-1])[0]
    height = min(a.shape[0], b.shape[0])
    group = torch.cat([a[:height], b[:height]], dim=1)[None]
    node = pack_nodes.HyperStyleAlignFace()
    faces, records = node.align(group, "retinaface_mobilenet0.25.pth", "256", "all", 0, 0.9, "error")
    assert faces.shape[0] == 2 and [r.source_index for r in records] == [0, 0]
    pasted, mask = pack_nodes.HyperStylePasteBack().paste(group, 1.0 - faces, records, 16.0)
    assert pasted.shape == group.shape
    split = a.shape[1]
    assert mask[0, :, :split].max() > 0.99 and mask[0, :, split:].max() > 0.99


def test_cli_all_faces_flag():
    from hyperstyle_nodes.cli import build_parser

    assert build_parser().parse_args(["edit", "in.jpg", "--out", "o", "--all-faces"]).faces == "all"
    assert build_parser().parse_args(["edit", "in.jpg", "--out", "o"]).faces == "largest"
