"""Face detection, FFHQ alignment and paste-back, on the real RetinaFace weights and photos in the shared assets.

Run with -s to see the measured numbers (quad error, eye centring, inter-eye ratio, PSNRs).
"""
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hyperstyle_nodes.faces.alignment import (AlignmentRecord, NoFaceError, align_batch, align_face, ffhq_quad,
                                        paste_back, paste_back_batch)
from hyperstyle_nodes.faces.face_detect import load_face_detector

ALIGNED_SIZE = 1024
ASSETS_FACES = Path(os.environ.get("HYPERSTYLE_TEST_ASSETS", Path(__file__).resolve().parents[2] / "shared")) / \
    "testdata" / "faces"
SMALL_SIZE = 512  # for tests about plumbing rather than quality, to keep the file fast


# ---------------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def single_cpu_thread():
    """On shared, busy CI cores torch's OpenMP threads spin against each other (a 512 px detection went from
    0.05 s to 2.3 s of CPU with 2 threads); these small workloads run best on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def weights_path(assets_dir):
    path = assets_dir / "models" / "retinaface" / "retinaface_mobilenet0.25.pth"
    if not path.is_file():
        pytest.skip(f"RetinaFace weights not found at {path}")
    return path


@pytest.fixture(scope="module")
def detector(weights_path):
    return load_face_detector(weights_path, network="mobilenet0.25", device="cpu")


def load_photo(path) -> torch.Tensor:
    """A photo as ComfyUI would hand it over: float32 [H,W,3] in 0..1."""
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)


@pytest.fixture(scope="module")
def photos(face_photos):
    return {path.name: load_photo(path) for path in face_photos}


@pytest.fixture(scope="module")
def aligned_photos(photos, detector):
    """Each photo aligned once at 1024 on RetinaFace's five points (shared by the geometry and round-trip tests;
    dlib's landmarks have their own tests below)."""
    results = {}
    for name, image in photos.items():
        aligned, records = align_batch(image[None], detector, output_size=ALIGNED_SIZE, landmarks="retinaface5")
        results[name] = (image, aligned, records)
    return results


def independent_ffhq_quad(landmarks):
    """The FFHQ recipe, written out again here so the library's version is checked against it."""
    lm = np.asarray(landmarks, dtype=np.float64)
    eye_avg = (lm[0] + lm[1]) / 2
    eye_to_eye = lm[1] - lm[0]
    eye_to_mouth = (lm[3] + lm[4]) / 2 - eye_avg
    x = eye_to_eye - np.array([-eye_to_mouth[1], eye_to_mouth[0]])
    x = x / np.linalg.norm(x) * max(np.linalg.norm(eye_to_eye) * 2.0, np.linalg.norm(eye_to_mouth) * 1.8)
    y = np.array([-x[1], x[0]])
    c = eye_avg + eye_to_mouth * 0.1
    return np.array([c - x - y, c - x + y, c + x + y, c + x - y])


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def check_round_trip(original: torch.Tensor, pasted: torch.Tensor, mask: torch.Tensor, label: str,
                     min_psnr: float = 35.0) -> float:
    """Pasting the unedited crop back must reproduce the photo: exact where mask == 0, close where mask > 0."""
    assert pasted.shape == original.shape[:2] + (3,)
    assert mask.shape == original.shape[:2]
    assert float(mask.min()) >= 0.0 and float(mask.max()) <= 1.0
    inside = mask > 0
    assert inside.sum() > 0.02 * mask.numel(), f"{label}: the paste-back mask is (almost) empty"
    assert torch.equal(pasted[~inside], original[~inside]), f"{label}: pixels outside the mask changed"
    value = psnr(pasted[inside], original[inside])
    print(f"{label}: round-trip PSNR inside mask {value:.2f} dB, mask covers {float(inside.float().mean()):.1%}")
    assert value >= min_psnr, f"{label}: round-trip PSNR {value:.2f} dB < {min_psnr} dB"
    return value


def side_by_side(*images: torch.Tensor, height: int) -> torch.Tensor:
    resized = []
    for image in images:
        width = round(image.shape[1] * height / image.shape[0])
        chw = torch.nn.functional.interpolate(image.permute(2, 0, 1)[None], size=(height, width), mode="bilinear",
                                              antialias=True, align_corners=False)[0]
        resized.append(chw.clamp(0, 1).permute(1, 2, 0))
    return torch.cat(resized, dim=1).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Geometry on the real photos
# ---------------------------------------------------------------------------------------------------------------

def test_ffhq_quad_matches_hand_computed_example():
    # Eyes 2 apart, mouth 1 below: the eye term dominates, so half-side = 2 * 2 = 4, centre 0.1 below the eyes.
    landmarks = [[-1, 0], [1, 0], [0, 0.5], [-0.5, 1], [0.5, 1]]
    expected = [[-4, -3.9], [-4, 4.1], [4, 4.1], [4, -3.9]]
    np.testing.assert_allclose(ffhq_quad(landmarks), expected, atol=1e-12)
    with pytest.raises(ValueError, match="5x2"):
        ffhq_quad([[0, 0], [1, 1]])


def test_real_photos_detect_one_face_and_align_like_ffhq(aligned_photos, detector):
    for name, (image, aligned, records) in aligned_photos.items():
        faces = detector.detect(image, threshold=0.9)
        assert len(faces) == 1, f"{name}: expected exactly one face, found {len(faces)}"
        assert aligned.shape == (1, ALIGNED_SIZE, ALIGNED_SIZE, 3) and len(records) == 1
        record = records[0]
        np.testing.assert_allclose(record.landmarks, faces[0].landmarks, atol=1e-6)

        quad_error = float(np.abs(record.quad - independent_ffhq_quad(faces[0].landmarks)).max())

        again = detector.detect(aligned[0], threshold=0.9)
        assert len(again) >= 1, f"{name}: no face found in the aligned crop"
        left_eye, right_eye = again[0].landmarks[0], again[0].landmarks[1]
        eye_centre_offset = abs((left_eye[0] + right_eye[0]) / 2 - (ALIGNED_SIZE - 1) / 2) / ALIGNED_SIZE
        inter_eye_ratio = float(np.hypot(*(right_eye - left_eye))) / ALIGNED_SIZE
        print(f"{name}: score {faces[0].score:.4f}, quad error {quad_error:.2e} px, eye-centre offset "
              f"{eye_centre_offset:.2%} of width, inter-eye distance {inter_eye_ratio:.3f} of width")
        assert quad_error <= 1.0
        assert eye_centre_offset <= 0.03
        assert 0.20 <= inter_eye_ratio <= 0.27


def test_round_trip_reproduces_the_photos(aligned_photos):
    for name, (image, aligned, records) in aligned_photos.items():
        pasted, masks = paste_back_batch(image[None], aligned, records)
        assert pasted.shape == (1,) + image.shape and masks.shape == (1,) + image.shape[:2]
        check_round_trip(image, pasted[0], masks[0], name)


def test_pasting_an_edited_face_changes_only_the_masked_region(aligned_photos):
    image, aligned, records = aligned_photos["astronaut.png"]
    pasted, mask = paste_back(image, 1.0 - aligned[0], records[0], feather=16)
    inside = mask > 0
    assert torch.equal(pasted[~inside], image[~inside])
    full = mask > 0.99
    assert float((pasted[full] - (1.0 - image[full])).abs().mean()) < 0.05, "the inverted face was not pasted"
    # A smaller face (any size is accepted) gives the same mask.
    small = torch.nn.functional.interpolate(aligned.permute(0, 3, 1, 2), size=(256, 256), mode="area")
    _, mask_small = paste_back(image, small[0].permute(1, 2, 0), records[0], feather=16)
    assert torch.equal(mask_small, mask)


# ---------------------------------------------------------------------------------------------------------------
# No face
# ---------------------------------------------------------------------------------------------------------------

def synthetic_landscape(height=320, width=480) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    ys = torch.linspace(0, 1, height)[:, None].expand(height, width)
    xs = torch.linspace(0, 1, width)[None, :].expand(height, width)
    sky = torch.stack([0.45 + 0.3 * ys, 0.65 + 0.2 * ys, 0.95 - 0.1 * ys], -1)
    hills = torch.tensor([0.25, 0.5, 0.2]).expand(height, width, 3)
    horizon = 0.6 + 0.08 * torch.sin(xs * 9.0) + 0.05 * torch.sin(xs * 23.0 + 1.0)
    image = torch.where((ys > horizon)[..., None], hills, sky)
    sun = ((xs - 0.8) ** 2 * (width / height) ** 2 + (ys - 0.2) ** 2) < 0.006
    image = torch.where(sun[..., None], torch.tensor([1.0, 0.95, 0.7]), image)
    return (image + 0.03 * torch.randn(image.shape, generator=generator)).clamp(0, 1)


def test_images_without_faces(detector, photos):
    flat = torch.full((1, 300, 400, 3), 0.5)
    with pytest.raises(NoFaceError) as raised:
        align_batch(flat, detector, output_size=SMALL_SIZE)
    message = str(raised.value)
    print("NoFaceError:", message)
    assert "batch image 0" in message and "threshold" in message and "center_crop" in message
    assert isinstance(raised.value, ValueError)

    landscape = synthetic_landscape()
    face = photos["astronaut.png"][:320, :480]
    with pytest.raises(NoFaceError, match="batch image 1"):
        align_batch(torch.stack([face, landscape]), detector, output_size=SMALL_SIZE)

    for label, image in (("flat", flat[0]), ("landscape", landscape)):
        aligned, records = align_batch(image[None], detector, output_size=SMALL_SIZE, on_no_face="center_crop")
        record = records[0]
        assert aligned.shape == (1, SMALL_SIZE, SMALL_SIZE, 3) and record.method == "center_crop"
        assert record.score == 0.0 and record.landmarks is None
        height, width = image.shape[:2]
        side = min(height, width)
        x0 = (width - side) // 2
        # The pass-through is the centred square, resized.
        expected = torch.nn.functional.interpolate(image[:, x0:x0 + side].permute(2, 0, 1)[None],
                                                   size=(SMALL_SIZE, SMALL_SIZE), mode="area")[0].permute(1, 2, 0)
        assert psnr(aligned[0], expected) > 30
        pasted, masks = paste_back_batch(image[None], aligned, records, feather=8)
        check_round_trip(image, pasted[0], masks[0], f"center_crop {label}")
        assert float(masks[0][:, :x0].max()) == 0.0 and float(masks[0][:, x0 + side:].max()) == 0.0


def test_tiny_images_give_no_face_rather_than_a_crash(detector):
    for shape in ((1, 1, 3), (7, 5, 3), (20, 30)):
        assert detector.detect(np.zeros(shape, dtype=np.uint8)) == []
    aligned, records = align_batch(torch.rand(1, 6, 9, 3), detector, output_size=SMALL_SIZE, on_no_face="center_crop")
    assert aligned.shape == (1, SMALL_SIZE, SMALL_SIZE, 3) and records[0].source_size == (6, 9)
    with pytest.raises(ValueError, match="channels last"):
        detector.detect(np.zeros((3, 64, 64), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------------------
# Several faces, several photos, unusual formats
# ---------------------------------------------------------------------------------------------------------------

def test_two_faces_in_one_photo(detector, photos):
    group = side_by_side(photos["astronaut.png"], photos["portrait_b.jpg"], height=400)
    split = round(photos["astronaut.png"].shape[1] * 400 / photos["astronaut.png"].shape[0])
    aligned, records = align_batch(group[None], detector, output_size=SMALL_SIZE, selection="all")
    assert aligned.shape == (2, SMALL_SIZE, SMALL_SIZE, 3)
    assert [r.source_index for r in records] == [0, 0]
    centres = sorted(float(r.quad[:, 0].mean()) for r in records)
    assert centres[0] < split < centres[1], f"the faces should be one per half, got quad centres {centres}"

    pasted, masks = paste_back_batch(group[None], 1.0 - aligned, records, feather=8)
    changed = (pasted[0] - group).abs().amax(-1) > 0.2
    print(f"two faces: changed pixels left {int(changed[:, :split].sum())}, right {int(changed[:, split:].sum())}")
    assert changed[:, :split].sum() > 1000 and changed[:, split:].sum() > 1000
    assert torch.equal(pasted[0][masks[0] == 0], group[masks[0] == 0])

    # 'index' picks one face (largest first); a missing index is a clear error.
    second, second_records = align_batch(group[None], detector, output_size=SMALL_SIZE, selection="index",
                                         face_index=1)
    assert torch.equal(second[0], aligned[1]) and np.allclose(second_records[0].quad, records[1].quad)
    with pytest.raises(ValueError, match="face_index 5 does not exist"):
        align_batch(group[None], detector, output_size=SMALL_SIZE, selection="index", face_index=5)


def test_grayscale_and_rgba_inputs(detector, photos):
    rgb = photos["astronaut.png"]
    aligned_rgb, records_rgb = align_batch(rgb[None], detector, output_size=SMALL_SIZE, landmarks="retinaface5")

    rgba = torch.cat([rgb, torch.rand(rgb.shape[:2] + (1,))], dim=-1)
    aligned_rgba, records_rgba = align_batch(rgba[None], detector, output_size=SMALL_SIZE, landmarks="retinaface5")
    assert torch.equal(aligned_rgba, aligned_rgb), "alpha must be ignored"
    pasted, masks = paste_back_batch(rgba[None], aligned_rgba, records_rgba)
    assert pasted.shape == (1,) + rgb.shape
    check_round_trip(rgb, pasted[0], masks[0], "RGBA (alpha dropped)")

    gray = photos["portrait_a.jpg"].mean(-1, keepdim=True)
    aligned_gray, records_gray = align_batch(gray[None], detector, output_size=SMALL_SIZE)
    assert aligned_gray.shape == (1, SMALL_SIZE, SMALL_SIZE, 3)
    assert torch.equal(aligned_gray[..., 0], aligned_gray[..., 2])
    pasted, masks = paste_back_batch(gray[None], aligned_gray, records_gray)
    check_round_trip(gray.expand(-1, -1, 3), pasted[0], masks[0], "grayscale 1-channel")

    # uint8 numpy input to the detector finds the same face as the float tensor.
    as_uint8 = (rgb.numpy() * 255).round().astype(np.uint8)
    np.testing.assert_allclose(detector.detect(as_uint8)[0].landmarks, records_rgb[0].landmarks, atol=0.5)


def test_batch_of_two_different_photos(detector, photos):
    portrait = photos["portrait_b.jpg"]  # 512 x 411
    astronaut = photos["astronaut.png"][:, :portrait.shape[1]]
    batch = torch.stack([astronaut, portrait])
    aligned, records = align_batch(batch, detector, output_size=SMALL_SIZE)
    assert [r.source_index for r in records] == [0, 1]

    pasted, masks = paste_back_batch(batch, aligned, records)
    for index in range(2):
        check_round_trip(batch[index], pasted[index], masks[index], f"batch image {index}")
    assert not torch.equal(masks[0], masks[1])

    with pytest.raises(ValueError, match="connect"):
        paste_back_batch(batch, aligned[:1], records)
    with pytest.raises(ValueError, match="connect the same images"):
        paste_back_batch(batch[:1], aligned, records)


def test_face_touching_the_border_uses_reflect_padding(detector, photos):
    image = photos["astronaut.png"][:, 190:].contiguous()  # cut through the left side of the face
    aligned, records = align_batch(image[None], detector, output_size=SMALL_SIZE)
    record = records[0]
    assert record.quad[:, 0].min() < -20, "the crop square should leave the photo on the left"

    unpadded, _ = align_face(image, record.quad, SMALL_SIZE, enable_padding=False)
    outside = torch.from_numpy(_pixels_mapping_outside(record, image.shape[1]))
    # FFHQ padding fills the outside with blurred mirrored content, not a smear of the edge column.
    assert float((aligned[0][outside] - unpadded[outside]).abs().mean()) > 0.01
    pasted, masks = paste_back_batch(image[None], aligned, records)
    # FFHQ also blurs the photo itself within a third of the padding width of its edge, so the round trip is
    # only exact up to that blur there; beyond it the usual 35 dB holds.
    side = float(np.hypot(*(record.quad[3] - record.quad[0])))
    blurred_band = int(math.ceil(round(side * 0.3) / 3)) + 4
    check_round_trip(image, pasted[0], masks[0], "face at the border (whole mask)", min_psnr=28.0)
    check_round_trip(image[:, blurred_band:], pasted[0][:, blurred_band:], masks[0][:, blurred_band:],
                     f"face at the border (beyond FFHQ's {blurred_band}px edge blur)")


def _pixels_mapping_outside(record: AlignmentRecord, width: int) -> np.ndarray:
    size = record.output_size
    ys, xs = np.mgrid[0:size, 0:size]
    source = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)]).T @ record.transform.T
    source_x = source[:, 0] / source[:, 2]
    return ((source_x < -2) | (source_x > width + 1)).reshape(size, size)


def test_huge_image_is_downscaled_for_detection_and_shrunk_when_aligning(detector, photos):
    image = photos["astronaut.png"]
    huge = torch.nn.functional.interpolate(image.permute(2, 0, 1)[None], scale_factor=6, mode="bilinear",
                                           align_corners=False)[0].permute(1, 2, 0).clamp(0, 1)  # 3072 x 3072
    doubled = torch.nn.functional.interpolate(image.permute(2, 0, 1)[None], scale_factor=2, mode="bilinear",
                                              align_corners=False, antialias=True)[0].permute(1, 2, 0).clamp(0, 1)
    faces = detector.detect(huge)
    reference = detector.detect(doubled)  # the detector works at 1024 on the huge image, i.e. at this size
    assert len(faces) == 1
    mapped = (reference[0].landmarks + 0.5) * 3 - 0.5
    error = float(np.abs(faces[0].landmarks - mapped).max())
    print(f"huge image: landmark difference to a detection at the working size {error:.2f} px (of 3072)")
    assert error < 6.0

    # Aligning from the huge photo (a ~12x shrink) matches aligning from the small one (an upscale).
    small_quad = (ffhq_quad(reference[0].landmarks) + 0.5) / 2 - 0.5
    from_huge, _ = align_face(huge, (small_quad + 0.5) * 6 - 0.5, 64)
    from_small, _ = align_face(image, small_quad, 64)
    value = psnr(from_huge, from_small)
    print(f"huge image: aligned-from-3072 vs aligned-from-512 PSNR {value:.2f} dB")
    assert value > 30


def test_record_serialises_without_pickle(aligned_photos, tmp_path):
    _, _, records = aligned_photos["portrait_a.jpg"]
    path = tmp_path / "record.pt"
    torch.save([r.to_dict() for r in records], path)
    restored = [AlignmentRecord.from_dict(d) for d in torch.load(path, weights_only=True)]
    assert restored[0].source_size == records[0].source_size and restored[0].method == "ffhq"
    np.testing.assert_array_equal(restored[0].transform, records[0].transform)
    np.testing.assert_array_equal(restored[0].quad, records[0].quad)


# ---------------------------------------------------------------------------------------------------------------
# Weights files
# ---------------------------------------------------------------------------------------------------------------

def test_bad_weights_files_give_clear_errors(tmp_path, weights_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a torch checkpoint" * 100)
    with pytest.raises(ValueError) as raised:
        load_face_detector(garbage, network="mobilenet0.25")
    print("corrupt file:", raised.value)
    assert str(garbage) in str(raised.value) and "detection_mobilenet0.25_Final.pth" in str(raised.value)

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(weights_path.read_bytes()[:200_000])
    with pytest.raises(ValueError, match="truncated.pth"):
        load_face_detector(truncated, network="mobilenet0.25")

    with pytest.raises(ValueError) as raised:
        load_face_detector(weights_path, network="resnet50")
    print("wrong network:", raised.value)
    assert "resnet50" in str(raised.value) and "network='auto'" in str(raised.value)

    not_a_state_dict = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_a_state_dict)
    with pytest.raises(ValueError, match="not a state dict"):
        load_face_detector(not_a_state_dict, network="mobilenet0.25")

    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_face_detector(tmp_path / "missing.pth", network="mobilenet0.25")
    with pytest.raises(ValueError, match="unknown face detector network"):
        load_face_detector(weights_path, network="vgg")


def test_module_prefixed_keys_load(tmp_path, weights_path):
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    prefixed = tmp_path / "prefixed.pth"
    torch.save({"module." + k.removeprefix("module."): v for k, v in state.items()}, prefixed)
    assert load_face_detector(prefixed, network="mobilenet0.25") is not None


@pytest.mark.filterwarnings("ignore:.*deprecated:UserWarning")
def test_resnet50_network_builds_and_loads_without_downloading(tmp_path, monkeypatch):
    import facexlib.utils.misc
    from facexlib.detection.retinaface import RetinaFace

    def no_download(*args, **kwargs):
        raise AssertionError("nothing may be downloaded")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(facexlib.utils.misc, "download_url_to_file", no_download)
    reference = RetinaFace(network_name="resnet50", half=False, phase="test", device="cpu")
    path = tmp_path / "detection_Resnet50_Final.pth"
    torch.save({"module." + k: v for k, v in reference.state_dict().items()}, path)  # as released: 'module.' keys
    detector = load_face_detector(path, network="resnet50")
    assert detector.network_name == "resnet50"
    # Random weights find nothing sensible; the point is that the whole pipeline runs on this backbone.
    assert isinstance(detector.detect(np.zeros((40, 60, 3), dtype=np.uint8), threshold=0.99), list)
    with pytest.raises(ValueError, match="mobilenet0.25"):
        load_face_detector(path, network="mobilenet0.25")


# ---------------------------------------------------------------------------------------------------------------
# A RetinaFace file under any name
# ---------------------------------------------------------------------------------------------------------------

def test_detector_file_under_any_name_loads_with_its_own_backbone(tmp_path, weights_path):
    """Issue 20: a RetinaFace MobileNet file saved without "mobilenet" in its name was built as a ResNet-50 and
    failed with a message about a 'network setting' that no node or flag has."""
    from hyperstyle_nodes import ops

    renamed = tmp_path / "my_face_detector.pth"
    renamed.write_bytes(weights_path.read_bytes())
    detector = ops.load_detector(str(renamed), device="cpu")
    assert detector.network_name == "mobilenet0.25"
    assert load_face_detector(renamed).network_name == "mobilenet0.25"  # network='auto' is the default

    not_retinaface = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, not_retinaface)
    with pytest.raises(ValueError) as raised:
        load_face_detector(not_retinaface)
    print("not RetinaFace:", raised.value)
    assert "not a RetinaFace network" in str(raised.value) and "setting" not in str(raised.value)


# ---------------------------------------------------------------------------------------------------------------
# Each face once
# ---------------------------------------------------------------------------------------------------------------

class DuplicatingDetector:
    """The real detector, plus a second detection of the largest face whose box overlaps the first at IoU 0.395
    (just under RetinaFace's 0.4 suppression, as seen in issue 20) and whose points are a little off."""

    def __init__(self, detector):
        self.detector = detector

    def detect(self, image, threshold=0.9):
        from hyperstyle_nodes.faces.face_detect import Face

        faces = self.detector.detect(image, threshold=threshold)
        if not faces:
            return faces
        x0, y0, x1, y1 = faces[0].box
        grow_x, grow_y = (x1 - x0) * 0.2925, (y1 - y0) * 0.2925  # 1.585x wider and taller: IoU 1 / 1.585^2
        duplicate_box = (x0 - grow_x, y0 - grow_y, x1 + grow_x, y1 + grow_y)
        twin = Face(score=faces[0].score - 0.01, box=duplicate_box, landmarks=faces[0].landmarks + [3.0, -2.0])
        return faces + [twin]


def box_iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.parametrize("landmarks", ["retinaface5", "auto"])
def test_selection_all_returns_each_person_once(detector, photos, landmarks):
    duplicating = DuplicatingDetector(detector)
    image = photos["astronaut.png"]
    both = duplicating.detect(image)
    assert len(both) == 2 and 0.38 < box_iou(both[0].box, both[1].box) < 0.4
    aligned, records = align_batch(image[None], duplicating, output_size=64, selection="all", landmarks=landmarks)
    assert len(records) == 1, f"one person gave {len(records)} crops"


# ---------------------------------------------------------------------------------------------------------------
# The FFHQ recipe's landmarks (dlib extra), any orientation
# ---------------------------------------------------------------------------------------------------------------

def load_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_alignment.py"
    spec = importlib.util.spec_from_file_location("bench_alignment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dlib68():
    from hyperstyle_nodes.faces import landmarks

    pytest.importorskip("dlib", reason="the dlib extra is not installed (pip install 'hyperstyle-nodes[dlib]')")
    if landmarks.packaged_predictor_path() is None:
        pytest.skip("face_recognition_models (dlib's predictor file for tests) is not installed")
    return landmarks.get_landmarks_model("dlib68")


def test_auto_landmarks_reproduce_the_ffhq_recipe_on_upright_photos(dlib68, detector, face_photos):
    from hyperstyle_nodes.faces import landmarks

    bench = load_bench()
    assert landmarks.get_landmarks_model("auto") is dlib68, "auto must pick dlib's 68 points when installed"
    for path in face_photos:
        image_u8 = np.asarray(Image.open(path).convert("RGB"))
        reference = bench.recipe_quad(image_u8, dlib68)
        _, records = align_batch(torch.from_numpy(image_u8.copy())[None], detector, output_size=64)
        five_point_quad = ffhq_quad(detector.detect(image_u8)[0].landmarks)
        error, five_point_error = (bench.corner_error(records[0].quad, reference)[0],
                                   bench.corner_error(five_point_quad, reference)[0])
        print(f"{path.name}: corner error vs the recipe {error:.3f}% (RetinaFace's five points {five_point_error:.2f}%)")
        assert error <= 1.0


def test_dlib_box_mapping_when_the_detector_misses(dlib68, detector, photos):
    """Without any dlib detection the predictor starts from the box derived from the face's square."""
    bench = load_bench()
    image_u8 = (photos["portrait_a.jpg"].numpy() * 255).round().astype(np.uint8)
    reference = bench.recipe_quad(image_u8, dlib68)
    real_detector = dlib68.detector
    try:
        dlib68.detector = lambda *args: []
        located = dlib68.locate(image_u8, ffhq_quad(detector.detect(image_u8)[0].landmarks))
    finally:
        dlib68.detector = real_detector
    error = bench.corner_error(ffhq_quad(located.points5), reference)[0]
    print(f"portrait_a, mapped box only: {error:.2f}%")
    assert located.box_source == "mapped" and not located.confirmed and error <= 2.0


@pytest.mark.parametrize("degrees", [90, 180, 270, -30, 30])
def test_turned_photos_give_the_upright_photos_face(dlib68, detector, degrees):
    """Issue 23: photos turned by quarter turns (no EXIF) or tilted by 30 degrees give the same aligned face as
    the upright photo, within 2% of the crop side."""
    bench = load_bench()
    for name in ("astronaut.png", "portrait_a.jpg"):
        from hyperstyle_nodes.faces.alignment import find_faces

        upright = np.asarray(Image.open(ASSETS_FACES / name).convert("RGB"))
        upright_quad = find_faces(torch.from_numpy(upright.copy()) / 255.0, detector, 0.9, dlib68)[0].quad
        turned, forward = bench.turn_photo(upright, degrees)
        _, records = align_batch(torch.from_numpy(turned.copy())[None], detector, output_size=64)
        error = bench.corner_error(records[0].quad, forward(upright_quad))
        print(f"{name} turned {degrees}: {error[0]:.2f}% mean, {error[1]:.2f}% max corner")
        assert error[0] <= 2.0 and error[1] <= 2.0


def test_missing_dlib_or_predictor_file_falls_back_or_explains(monkeypatch, tmp_path, caplog, detector, photos):
    from hyperstyle_nodes.faces import landmarks

    monkeypatch.setattr(landmarks, "_warned", set())
    monkeypatch.setattr(landmarks, "dlib_installed", lambda: False)
    with caplog.at_level("WARNING", logger="hyperstyle_nodes"):
        assert landmarks.get_landmarks_model("auto") is None
        assert landmarks.get_landmarks_model("auto") is None
    said = [r.getMessage() for r in caplog.records if "dlib" in r.getMessage()]
    assert len(said) == 1 and "hyperstyle-nodes[dlib]" in said[0], said  # said once
    with pytest.raises(landmarks.LandmarksUnavailableError, match=r"hyperstyle-nodes\[dlib\]"):
        landmarks.get_landmarks_model("dlib68")
    aligned, records = align_batch(photos["astronaut.png"][None], detector, output_size=64)  # still aligns
    assert len(records) == 1

    pytest.importorskip("dlib")
    monkeypatch.setattr(landmarks, "dlib_installed", lambda: True)
    monkeypatch.setattr(landmarks, "packaged_predictor_path", lambda: None)
    monkeypatch.setenv("HYPERSTYLE_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert landmarks.get_landmarks_model("auto") is None
    with pytest.raises(landmarks.LandmarksUnavailableError) as raised:
        landmarks.get_landmarks_model("dlib68")
    print("no predictor file:", raised.value)
    assert "dlib_shape_predictor_68" in str(raised.value) and "shape_predictor_68_face_landmarks.dat" in str(
        raised.value)

    (tmp_path / "broken.dat").write_bytes(b"not a predictor")
    with pytest.raises(landmarks.LandmarksUnavailableError, match="could not read the dlib shape predictor"):
        landmarks.Dlib68Landmarks(tmp_path / "broken.dat")


# ---------------------------------------------------------------------------------------------------------------
# Several faces pasted back in one pass
# ---------------------------------------------------------------------------------------------------------------

def test_paste_back_of_several_close_faces_is_one_seamless_pass(detector, photos):
    """Two faces whose feathered masks overlap: unedited faces come back at >= 40 dB inside the masks (as one
    face does), and the result does not depend on the order of the records (no face overwrites the other)."""
    left = photos["astronaut.png"][40:260, 150:300]
    right = photos["portrait_b.jpg"].flip(1)
    right = torch.nn.functional.interpolate(right.permute(2, 0, 1)[None], size=(220, 176), mode="bilinear",
                                            antialias=True, align_corners=False)[0].permute(1, 2, 0).clamp(0, 1)
    group = torch.cat([left, right], dim=1)
    # A margin keeps both crop squares inside the photo (FFHQ's edge padding would blur the photo's border).
    group = torch.nn.functional.pad(group.permute(2, 0, 1)[None], (100, 100, 100, 100), mode="replicate")
    group = group[0].permute(1, 2, 0).contiguous()
    aligned, records = align_batch(group[None], detector, output_size=SMALL_SIZE, selection="all")
    assert len(records) == 2

    one_mask = [paste_back(group, aligned[i], records[i])[1] for i in range(2)]
    overlap = int(((one_mask[0] > 0) & (one_mask[1] > 0)).sum())
    assert overlap > 200, f"the test needs overlapping masks, got {overlap} shared pixels"

    pasted, masks = paste_back_batch(group[None], aligned, records)
    check_round_trip(group, pasted[0], masks[0], "two close faces", min_psnr=40.0)
    for i in range(2):
        single, single_masks = paste_back_batch(group[None], aligned[i:i + 1], records[i:i + 1])
        check_round_trip(group, single[0], single_masks[0], f"face {i} alone", min_psnr=40.0)

    edited = 1.0 - aligned
    forward, _ = paste_back_batch(group[None], edited, records)
    backward, _ = paste_back_batch(group[None], edited.flip(0), records[::-1])
    assert float((forward - backward).abs().max()) < 1e-5, "the faces' order changed the result"


def test_registry_entry_for_the_predictor_is_the_packaged_file():
    """The registry's size and sha256 for dlib's predictor are those of face_recognition_models' copy (the file
    CI uses), so a download from the mirror is checked against the very file the tests ran with."""
    from hyperstyle_nodes.loaders import downloads
    from hyperstyle_nodes.faces import landmarks

    entry = downloads.load_registry()[landmarks.PREDICTOR_REGISTRY_NAME]
    assert entry.kind == "landmarks" and entry.local_name == landmarks.PREDICTOR_FILE_NAME
    packaged = landmarks.packaged_predictor_path()
    if packaged is None:
        pytest.skip("face_recognition_models is not installed")
    assert packaged.stat().st_size == entry.size
    assert downloads.digest_matches(downloads.sha256_of_file(packaged), entry.sha256)  # read only: no sidecar


def test_bench_alignment_prints_its_table(dlib68, weights_path, capsys):
    bench = load_bench()
    assert bench.main(["--angles", "0,180", "--detector", str(weights_path)]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "astronaut.png" in out and "all angles (6 crops)" in out and "retinaface5: mean" in out
