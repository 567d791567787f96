"""One image policy on every path: the library, the nodes, the CLI and face alignment agree on dtype, range,
finiteness and layout (uint8 /255; floats finite and in [0, 1], resampling overshoot clamped, anything else refused)."""
import numpy as np
import pytest
import torch

from hyperstyle_nodes import image_checks, ops
from hyperstyle_nodes.faces import alignment
from hyperstyle_nodes.faces.face_detect import to_rgb_float


def smooth_rgb(size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear")[0].permute(1, 2, 0)  # HWC


def nan_image():
    image = smooth_rgb()
    image[3, 5, 1] = float("nan")
    return image


def inf_image():
    image = smooth_rgb()
    image[0, 0, 0] = float("inf")
    return image


# every path, on one HWC image
PATHS = {
    "library": lambda hwc: image_checks.rgb_bchw(hwc.permute(2, 0, 1)[None])[0].permute(1, 2, 0),
    "nodes": lambda hwc: ops.image_to_bchw(hwc[None])[0].permute(1, 2, 0),
    "alignment": lambda hwc: to_rgb_float(hwc),
}


@pytest.mark.parametrize("path", PATHS)
def test_every_path_reads_uint8_as_0_255(path):
    image = smooth_rgb()
    as_uint8 = (image * 255).round().to(torch.uint8)
    out = PATHS[path](as_uint8)
    assert out.dtype == torch.float32
    assert torch.equal(out, as_uint8.float() / 255)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("make", [nan_image, inf_image], ids=["nan", "inf"])
def test_every_path_refuses_non_finite_pixels(path, make):
    with pytest.raises(ValueError, match="NaN or infinite values \\(1 of 12288\\)"):
        PATHS[path](make())


@pytest.mark.parametrize("path", PATHS)
def test_every_path_refuses_a_0_255_float_image(path):
    """Before: the library took it as 0..1, the nodes clamped it to white, Align Face divided it by 255."""
    with pytest.raises(ValueError, match=r"values from .* to 2\d\d.*divide it by 255"):
        PATHS[path](smooth_rgb() * 255)


@pytest.mark.parametrize("path", PATHS)
def test_every_path_refuses_a_minus_one_to_one_image(path):
    with pytest.raises(ValueError, match=r"values from -0\.\d+ to .*\(x \+ 1\) / 2"):
        PATHS[path](smooth_rgb() * 2 - 1)


@pytest.mark.parametrize("path", PATHS)
def test_every_path_clamps_resampling_overshoot_alike(path):
    """ComfyUI's bicubic Upscale Image does not clamp: its overshoot at hard edges is clamped, the same everywhere."""
    edges = (torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    upscaled = torch.nn.functional.interpolate(edges, size=(64, 64), mode="bicubic")[0].permute(1, 2, 0)
    assert upscaled.min() < -0.2 and upscaled.max() > 1.2
    assert torch.equal(PATHS[path](upscaled), upscaled.clamp(0, 1))


@pytest.mark.parametrize("path", PATHS)
def test_every_path_refuses_other_dtypes(path):
    with pytest.raises(ValueError, match="dtype torch.int32.*uint8"):
        PATHS[path]((smooth_rgb() * 255).int())


def test_paths_agree_on_grayscale_and_alpha():
    gray = smooth_rgb()[..., :1]
    rgba = torch.cat([smooth_rgb(), torch.rand(64, 64, 1)], -1)
    gray_alpha = torch.cat([gray, torch.zeros_like(gray)], -1)
    assert torch.equal(PATHS["nodes"](gray), gray.expand(-1, -1, 3))
    assert torch.equal(PATHS["alignment"](gray), gray.expand(-1, -1, 3))
    assert torch.equal(PATHS["nodes"](gray_alpha), PATHS["alignment"](gray_alpha))
    assert torch.equal(PATHS["nodes"](rgba), rgba[..., :3])
    assert torch.equal(PATHS["alignment"](rgba), rgba[..., :3])


def test_layout_mistakes_are_named():
    with pytest.raises(ValueError, match="channels-last.*permute\\(0, 3, 1, 2\\)"):
        image_checks.rgb_bchw(torch.rand(2, 64, 64, 3))
    with pytest.raises(ValueError, match="images\\[None\\]"):
        image_checks.rgb_bchw(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="channels-first.*permute\\(0, 2, 3, 1\\)"):
        ops.image_to_bchw(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match="empty"):
        image_checks.rgb_bchw(torch.rand(0, 3, 64, 64))


def test_alignment_numpy_input_follows_the_policy():
    image = smooth_rgb().numpy()
    assert torch.equal(to_rgb_float((image * 255).round().astype(np.uint8)),
                       torch.from_numpy((image * 255).round().astype(np.uint8)).float() / 255)
    with pytest.raises(ValueError, match="divide it by 255"):
        alignment.center_crop_align(image * 255, 64)


def test_cli_reads_photos_through_the_shared_check(tiny_ckpts, tmp_path, monkeypatch):
    """The CLI hands alignment the photo as the shared check gives it (uint8 pixels / 255, [1, H, W, 3])."""
    from PIL import Image

    from hyperstyle_nodes import cli

    pixels = (smooth_rgb(48).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "face.png")
    seen = {}

    def record(image, *args, **kwargs):
        seen["image"] = image
        raise alignment.NoFaceError("stop here")

    monkeypatch.setattr(ops, "load_detector", lambda *a, **k: None)
    monkeypatch.setattr(alignment, "align_batch", record)
    monkeypatch.setenv("HYPERSTYLE_MODELS_DIR", str(tmp_path / "models"))
    (tmp_path / "detector.pth").write_bytes(b"")  # the CLI checks every weights file up front; load_detector is faked
    code = cli.main(["edit", str(tmp_path / "face.png"), "--out", str(tmp_path / "out"), "--checkpoint",
                     str(tiny_ckpts["hyperstyle"]), "--encoder", str(tiny_ckpts["w_encoder"]), "--device", "cpu",
                     "--detector", str(tmp_path / "detector.pth"), "--offline"])
    assert code == cli.EXIT_NO_FACE
    assert torch.equal(seen["image"], image_checks.rgb_bhwc(torch.from_numpy(pixels)))
    assert seen["image"].shape == (1, 48, 48, 3)
