"""How close the pack's face crops are to the FFHQ recipe's, per photo and turned/tilted copies of it.

The recipe (the one the encoders were trained on; FFHQ's `recreate_aligned_images`, as in HyperStyle's
`scripts/align_faces_parallel.py`): dlib's frontal face detector with one upsampling, dlib's 68-point shape
predictor on that box, eye centres = mean of each eye's six points, mouth corners = points 48 and 54, then the
oriented square. It is computed here on the upright photo (the script keeps the last detection; this takes the
largest, which is the same for one-face photos and skips false detections elsewhere in the photo), and carried
into each turned or tilted copy by the same rotation. The error of a crop is the mean distance of its four corners
from the recipe's, in % of the recipe's side (the max corner is shown too).

    python benchmarks/bench_alignment.py                       # shared photos, all angles, default vs RetinaFace-only
    python benchmarks/bench_alignment.py --angles 0 --photos my_faces/
    python benchmarks/bench_alignment.py --fit-box             # refit dlib's box convention (landmarks._DLIB_BOX_*)

Needs the `dlib` extra (the recipe is dlib's) and RetinaFace weights (default: the shared MobileNet-0.25 file).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hyperstyle_nodes.faces import landmarks as landmark_models  # noqa: E402
from hyperstyle_nodes.faces.alignment import ffhq_quad, find_faces  # noqa: E402
from hyperstyle_nodes.faces.face_detect import load_face_detector  # noqa: E402

ASSETS = Path(os.environ.get("HYPERSTYLE_TEST_ASSETS", Path(__file__).resolve().parents[2] / "shared"))
DEFAULT_ANGLES = "0,90,180,270,-30,-15,15,30"


def recipe_quad(image_u8: np.ndarray, model: landmark_models.Dlib68Landmarks):
    """The official recipe's square on an upright photo, or None where dlib's detector finds no face."""
    rects = model.detector(image_u8, 1)
    if not rects:
        return None
    rect = max(rects, key=lambda r: r.area())
    points = np.array([[p.x, p.y] for p in model.predictor(image_u8, rect).parts()], dtype=np.float64)
    return ffhq_quad(landmark_models.five_from_68(points))


def turn_photo(image_u8: np.ndarray, degrees: float):
    """The photo turned counter-clockwise by `degrees` (quarter turns exactly, other angles bicubic on a canvas
    that holds the whole photo) and a function mapping photo pixels to turned-photo pixels."""
    height, width = image_u8.shape[:2]
    if degrees % 90 == 0:
        turns = int(degrees // 90) % 4
        turned = np.ascontiguousarray(np.rot90(image_u8, turns))

        def forward(points):
            points = np.asarray(points, dtype=np.float64).copy()
            w = width
            for _ in range(turns):  # one counter-clockwise turn: (x, y) -> (y, width - 1 - x)
                x, y = points[:, 0].copy(), points[:, 1].copy()
                points[:, 0], points[:, 1] = y, w - 1 - x
                w = height if w == width else width
            return points
        return turned, forward

    from PIL import Image

    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    # Counter-clockwise on screen (y down): x' = cos x + sin y, y' = -sin x + cos y, around the centre.
    rotation = np.array([[cos, sin], [-sin, cos]])
    centre = np.array([(width - 1) / 2.0, (height - 1) / 2.0])
    corners = np.array([[0, 0], [width - 1, 0], [0, height - 1], [width - 1, height - 1]], dtype=np.float64)
    turned_corners = (corners - centre) @ rotation.T
    out_w, out_h = (np.ceil(turned_corners.max(0) - turned_corners.min(0)) + 1).astype(int)
    out_centre = np.array([(out_w - 1) / 2.0, (out_h - 1) / 2.0])

    def forward(points):
        return (np.asarray(points, dtype=np.float64) - centre) @ rotation.T + out_centre

    inverse = rotation.T  # turned pixel -> photo pixel: centre + R^T (p - out_centre)
    offset = centre - inverse @ out_centre
    continuous = offset + 0.5 - inverse @ np.array([0.5, 0.5])  # PIL samples at pixel centres + 0.5
    data = (inverse[0, 0], inverse[0, 1], continuous[0], inverse[1, 0], inverse[1, 1], continuous[1])
    turned = Image.fromarray(image_u8).transform((int(out_w), int(out_h)), Image.AFFINE, data,
                                                 resample=Image.BICUBIC)
    return np.ascontiguousarray(np.asarray(turned)), forward


def corner_error(quad, reference):
    """(mean, max) corner distance in % of the reference square's side."""
    side = float(np.hypot(*(reference[3] - reference[0])))
    distances = np.linalg.norm(np.asarray(quad) - reference, axis=1) / side * 100.0
    return float(distances.mean()), float(distances.max())


def pack_quad(image_u8, detector, model, threshold):
    """The pack's square for the largest face, as align_batch would cut it."""
    rgb = torch.from_numpy(np.array(image_u8)).float() / 255.0  # a writable copy
    faces = find_faces(rgb, detector, threshold, model)
    return faces[0].quad if faces else None


def fit_box(photos, model):
    """dlib's detector box relative to the recipe's square, over the photos and scaled/mirrored/tilted copies."""
    from PIL import Image

    sides, shifts, across = [], [], []
    for path in photos:
        base = np.asarray(Image.open(path).convert("RGB"))
        for scale in (0.6, 0.8, 1.0, 1.25, 1.5):
            for mirror in (False, True):
                for degrees in (-8.0, 0.0, 8.0):
                    image = Image.fromarray(base[:, ::-1] if mirror else base)
                    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
                    image = np.asarray(image)
                    if degrees:
                        image, _ = turn_photo(image, degrees)
                    rects = model.detector(image, 1)
                    if not rects:
                        continue
                    rect = max(rects, key=lambda r: r.area())
                    points = np.array([[p.x, p.y] for p in model.predictor(image, rect).parts()], np.float64)
                    quad = ffhq_quad(landmark_models.five_from_68(points))
                    side = float(np.hypot(*(quad[3] - quad[0])))
                    right, down = (quad[3] - quad[0]) / side, (quad[1] - quad[0]) / side
                    offset = np.array([(rect.left() + rect.right()) / 2.0, (rect.top() + rect.bottom()) / 2.0])
                    offset -= quad.mean(axis=0)
                    sides.append(math.sqrt(rect.width() * rect.height()) / side)
                    shifts.append(float(offset @ down) / side)
                    across.append(float(offset @ right) / side)
    print(f"{len(sides)} detections: box side / square side = {statistics.mean(sides):.4f} "
          f"(sd {statistics.pstdev(sides):.4f}); centre shift down = {statistics.mean(shifts):.4f} "
          f"(sd {statistics.pstdev(shifts):.4f}); across = {statistics.mean(across):.4f} "
          f"(sd {statistics.pstdev(across):.4f})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=ASSETS / "testdata" / "faces")
    parser.add_argument("--detector", type=Path,
                        default=ASSETS / "models" / "retinaface" / "retinaface_mobilenet0.25.pth",
                        help="RetinaFace weights file (ResNet-50 or MobileNet-0.25)")
    parser.add_argument("--angles", default=DEFAULT_ANGLES, help="degrees, counter-clockwise, comma-separated")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--fit-box", action="store_true", help="print dlib's box convention fit and stop")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    if not landmark_models.dlib_installed():
        print(f"the recipe is dlib's: {landmark_models.INSTALL_HINT}", file=sys.stderr)
        return 2
    model = landmark_models.get_landmarks_model(landmark_models.DLIB68)
    photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"})
    if args.fit_box:
        fit_box(photos, model)
        return 0
    detector = load_face_detector(args.detector, network="auto")
    angles = [float(a) for a in args.angles.split(",")]
    methods = {"default": landmark_models.get_landmarks_model(landmark_models.AUTO), "retinaface5": None}

    from PIL import Image

    rows = []
    for path in photos:
        upright = np.asarray(Image.open(path).convert("RGB"))
        reference = recipe_quad(upright, model)
        if reference is None:
            print(f"{path.name}: dlib's detector finds no face; skipped", file=sys.stderr)
            continue
        for degrees in angles:
            image, forward = turn_photo(upright, degrees)
            turned_reference = forward(reference)
            row = {"photo": path.name, "angle": degrees}
            for name, method in methods.items():
                start = time.perf_counter()
                quad = pack_quad(image, detector, method, args.threshold)
                row[f"{name}_s"] = time.perf_counter() - start
                row[name] = (float("nan"), float("nan")) if quad is None else corner_error(quad, turned_reference)
            rows.append(row)

    header = f"{'photo':<16}{'angle':>7} | {'default mean/max %':>20} {'s':>6} | {'retinaface5 mean/max %':>24} {'s':>6}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['photo']:<16}{row['angle']:>7.0f} | {row['default'][0]:>10.2f} /{row['default'][1]:>7.2f} "
              f"{row['default_s']:>6.2f} | {row['retinaface5'][0]:>14.2f} /{row['retinaface5'][1]:>7.2f} "
              f"{row['retinaface5_s']:>6.2f}")
    print("-" * len(header))
    for label, subset in (("upright", [r for r in rows if r["angle"] == 0]), ("all angles", rows)):
        if not subset:
            continue
        summary = []
        for name in methods:
            means = [r[name][0] for r in subset]
            summary.append(f"{name}: mean {statistics.mean(means):.2f}% worst {max(means):.2f}%")
        print(f"{label} ({len(subset)} crops): " + "; ".join(summary))
    print(f"default landmarks = {methods['default'].name if methods['default'] else 'retinaface5'}; "
          f"detector = {args.detector.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
