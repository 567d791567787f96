"""Where the alignment points come from: dlib's 68-point shape predictor (the FFHQ recipe's own model, an optional
extra) or RetinaFace's five points.

The encoders were trained on faces aligned by the FFHQ recipe: dlib's frontal face detector, its 68-point shape
predictor on that box, then eye centres and mouth corners -> an oriented square. The predictor is sensitive to the
box it starts from, so it gets the box it was trained with: dlib's own detector where that finds the face, else a
box derived from the face's approximate square in dlib's convention (`_DLIB_BOX_*`, fitted as described there).
Both run in an upright "working frame" cut around the face, so faces at any roll angle get the recipe's landmarks.

dlib comes from the `dlib-bin` wheel (`pip install "hyperstyle-nodes[dlib]"`); the predictor file comes from the
`face_recognition_models` package when that is installed, else from the weights registry (downloaded on first use).
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

log = logging.getLogger("hyperstyle_nodes")

AUTO, DLIB68, RETINAFACE5 = "auto", "dlib68", "retinaface5"
LANDMARK_CHOICES = (AUTO, DLIB68, RETINAFACE5)
PREDICTOR_REGISTRY_NAME = "dlib_shape_predictor_68"
PREDICTOR_FILE_NAME = "shape_predictor_68_face_landmarks.dat"
INSTALL_HINT = ('install the optional extra: pip install "hyperstyle-nodes[dlib]" (or pip install dlib-bin, plus '
                'face_recognition_models for the predictor file without a download)')

# dlib's frontal-detector box in the working frame, as a function of the face's FFHQ square (side L, centre at the
# frame's centre): a square box of side _DLIB_BOX_SIDE * L whose centre sits _DLIB_BOX_SHIFT * L below the square's
# centre. Both are the means of dlib's own detections measured against the recipe's squares on the shared test
# photos and scaled / mirrored / +-8 degree copies of them (benchmarks/bench_alignment.py --fit-box prints them).
# Used alone (detector switched off) this box lands 0.2-1.0% of the side from the recipe on those photos.
_DLIB_BOX_SIDE = 0.60  # fit: 0.599 (sd 0.085) over 90 detections
_DLIB_BOX_SHIFT = 0.083  # fit: 0.083 (sd 0.029); across: -0.007 (sd 0.020), taken as 0
_DETECTOR_UPSAMPLE = 1  # the recipe's detector(img, 1)
# The working frame: the face's square is brought to between these sides (px) and the frame is this many squares wide.
_FRAME_MIN_SIDE, _FRAME_MAX_SIDE = 120.0, 400.0
_FRAME_SQUARES = 2.0
_UPRIGHT_TOLERANCE = math.radians(5.0)  # below this roll the frame is a plain crop of the photo's own pixels
_PHOTO_MAX_ROLL = math.radians(15.0)  # a face rolled more than this gets an upright frame even when dlib saw it
_PHOTO_DETECT_MAX_PIXELS = 4_000_000  # dlib's detector on the whole photo only up to this size (it upsamples 2x)
_FRAME_PASSES = 3
_FRAME_SETTLED = 0.005  # the frame is re-cut until the square's corners move less than this fraction of its side


class LandmarksUnavailableError(RuntimeError):
    """The landmark model that was asked for cannot be used (extra not installed, file missing or unreadable)."""


def dlib_installed() -> bool:
    return importlib.util.find_spec("dlib") is not None


def packaged_predictor_path() -> Optional[Path]:
    """The predictor file inside the `face_recognition_models` package, if installed (found by path: the package's
    own __init__ needs pkg_resources, which new setuptools no longer ship)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "models" / PREDICTOR_FILE_NAME
        if candidate.is_file():
            return candidate
    return None


def five_from_68(points68) -> np.ndarray:
    """The recipe's five points from dlib's 68: eye centres (mean of each eye's six points), nose tip, and the
    outer mouth corners (points 48 and 54)."""
    points = np.asarray(points68, dtype=np.float64)
    if points.shape != (68, 2):
        raise ValueError(f"expected 68x2 landmarks, got shape {points.shape}")
    return np.stack([points[36:42].mean(axis=0), points[42:48].mean(axis=0), points[30], points[48], points[54]])


@dataclass
class Located:
    """The recipe's five points for one face, and whether dlib's detector saw an upright face there."""

    points5: np.ndarray  # (5, 2) source pixels: eye centres, nose tip, outer mouth corners
    confirmed: bool  # dlib's frontal detector found the face where the landmarks put it (upright, in its frame)
    box_source: str  # 'photo' (detector on the photo: the recipe itself), 'frame' (detector in the upright frame)
    #                  or 'mapped' (no detection: the box derived from the face's square)


class Dlib68Landmarks:
    """dlib's frontal face detector and 68-point shape predictor: the FFHQ recipe's own landmarks.

    A face that dlib's detector finds in the photo, near upright, gets exactly the recipe (detector box,
    predictor, on the photo's own pixels). Any other face is cut out upright around its approximate square
    ("working frame"), where the detector is tried again, else the box is derived from the square; the frame is
    re-cut around the new landmarks until they settle.
    """

    name = DLIB68

    def __init__(self, predictor_path):
        import dlib

        self._dlib = dlib
        self.predictor_path = Path(predictor_path)
        try:
            self.predictor = dlib.shape_predictor(os.fspath(self.predictor_path))
        except RuntimeError as error:
            raise LandmarksUnavailableError(
                f"could not read the dlib shape predictor {self.predictor_path}: {error}. Expected dlib's "
                f"{PREDICTOR_FILE_NAME} (about 99.7 MB); the file may be corrupt or incompletely downloaded") from None
        self.detector = dlib.get_frontal_face_detector()

    def __repr__(self) -> str:
        return f"Dlib68Landmarks({self.predictor_path})"

    def detect_in_photo(self, image_u8: np.ndarray) -> list:
        """dlib's detections on the whole photo (the recipe's first step), or [] for photos too big to scan
        quickly (their faces still get the detector inside each face's frame)."""
        if image_u8.shape[0] * image_u8.shape[1] > _PHOTO_DETECT_MAX_PIXELS:
            return []
        return list(self.detector(image_u8, _DETECTOR_UPSAMPLE))

    def locate(self, image_u8: np.ndarray, quad, photo_rects=()) -> Located:
        """The recipe's five points for the face whose approximate FFHQ square is `quad` (e.g. from RetinaFace)."""
        from .alignment import ffhq_quad

        quad = np.asarray(quad, dtype=np.float64)
        rect = _matching_rect(photo_rects, quad, None, None)
        if rect is not None:
            points = five_from_68(self._predict(image_u8, rect))
            quad = ffhq_quad(points)
            if abs(_roll(quad)) <= _PHOTO_MAX_ROLL:
                return Located(points, True, "photo")
        located = None
        for _ in range(_FRAME_PASSES):
            frame_to_src, size = working_frame(quad, image_u8.shape[:2])
            frame = _sample_frame(image_u8, frame_to_src, size)
            side = frame_side(quad, frame_to_src)
            centre = (size - 1) / 2.0
            rect = _matching_rect(self.detector(frame, _DETECTOR_UPSAMPLE), None, (centre, centre), side)
            box_source = "frame" if rect is not None else "mapped"
            if rect is None:
                rect = self._expected_rect(centre, side)
            points = five_from_68(_apply_affine(frame_to_src, self._predict(frame, rect)))
            new_quad = ffhq_quad(points)
            moved = np.abs(new_quad - quad).max() / max(np.hypot(*(quad[3] - quad[0])), 1e-6)
            located, quad = Located(points, box_source == "frame", box_source), new_quad
            if moved < _FRAME_SETTLED:
                break
        return located

    def _predict(self, image_u8: np.ndarray, rect) -> np.ndarray:
        shape = self.predictor(image_u8, rect)
        return np.array([[part.x, part.y] for part in shape.parts()], dtype=np.float64)

    def _expected_rect(self, centre: float, side: float):
        """The box dlib's detector most likely gives for a face whose square is `side` px, centred in the frame."""
        half = _DLIB_BOX_SIDE * side / 2.0
        cy = centre + _DLIB_BOX_SHIFT * side
        return self._dlib.rectangle(int(round(centre - half)), int(round(cy - half)),
                                    int(round(centre + half)), int(round(cy + half)))


def _roll(quad: np.ndarray) -> float:
    """The square's roll angle (radians): 0 for an upright face."""
    x_axis = quad[3] - quad[0]
    return math.atan2(x_axis[1], x_axis[0])


def _matching_rect(rects, quad, centre, side):
    """The detection that is this face: near where a dlib box for it would be and about its size.

    Either `quad` (source pixels, any roll) or `centre` + `side` (an upright frame) says where the face is.
    """
    if quad is not None:
        side = float(np.hypot(*(quad[3] - quad[0])))
        down = (quad[1] - quad[0]) / side
        centre = quad.mean(axis=0) + _DLIB_BOX_SHIFT * side * down
    expected_side = _DLIB_BOX_SIDE * float(side)
    best, best_distance = None, None
    for rect in rects:
        rect_side = math.sqrt(max(rect.width() * rect.height(), 1))
        distance = math.hypot((rect.left() + rect.right()) / 2.0 - centre[0],
                              (rect.top() + rect.bottom()) / 2.0 - centre[1])
        if distance < 0.35 * expected_side and 0.6 < rect_side / expected_side < 1.6:
            if best is None or distance < best_distance:
                best, best_distance = rect, distance
    return best


def working_frame(quad, image_shape) -> Tuple[np.ndarray, int]:
    """An upright square frame around the face whose FFHQ square is `quad`: (2x3 affine frame pixel -> source pixel,
    frame side in pixels). Near-upright faces at a usable scale get a plain integer crop (the photo's own pixels,
    as the recipe sees them); others are rotated upright and rescaled."""
    quad = np.asarray(quad, dtype=np.float64)
    x_axis, y_axis = quad[3] - quad[0], quad[1] - quad[0]
    side = float(np.hypot(*x_axis))
    angle = math.atan2(x_axis[1], x_axis[0])
    scale = min(max(1.0, _FRAME_MIN_SIDE / side), _FRAME_MAX_SIDE / side)
    size = int(math.ceil(side * scale * _FRAME_SQUARES))
    centre = quad.mean(axis=0)
    if abs(angle) <= _UPRIGHT_TOLERANCE and scale == 1.0:
        origin = np.round(centre - (size - 1) / 2.0)
        return np.array([[1.0, 0.0, origin[0]], [0.0, 1.0, origin[1]]]), size
    u = x_axis / side / scale  # source step per frame pixel along the frame's x
    v = y_axis / np.hypot(*y_axis) / scale
    offset = centre - (size - 1) / 2.0 * (u + v)
    return np.array([[u[0], v[0], offset[0]], [u[1], v[1], offset[1]]]), size


def frame_side(quad, frame_to_src: np.ndarray) -> float:
    """The side of the face's square in frame pixels."""
    quad = np.asarray(quad, dtype=np.float64)
    step = math.sqrt(abs(np.linalg.det(frame_to_src[:, :2])))
    return float(np.hypot(*(quad[3] - quad[0]))) / step


def _apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def _sample_frame(image_u8: np.ndarray, frame_to_src: np.ndarray, size: int) -> np.ndarray:
    """The frame's pixels (uint8 RGB, zeros outside the photo): a copy for integer crops, else a bicubic resample
    (after a box downscale when the frame shrinks the photo, so fine detail does not alias)."""
    height, width = image_u8.shape[:2]
    linear, offset = frame_to_src[:, :2], frame_to_src[:, 2]
    if np.array_equal(linear, np.eye(2)) and np.array_equal(offset, np.round(offset)):
        x0, y0 = int(offset[0]), int(offset[1])
        frame = np.zeros((size, size, 3), dtype=np.uint8)
        sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + size, width), min(y0 + size, height)
        if sx1 > sx0 and sy1 > sy0:
            frame[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image_u8[sy0:sy1, sx0:sx1]
        return frame
    from PIL import Image

    source = Image.fromarray(image_u8)
    step = math.sqrt(abs(np.linalg.det(linear)))
    factor = int(step)
    if factor >= 2:  # source pixel i of the reduced image covers pixels factor*i .. factor*i + factor-1
        source = source.reduce(factor)
        linear = linear / factor
        offset = (offset - (factor - 1) / 2.0) / factor
    # PIL samples at continuous coordinates (pixel centres at index + 0.5).
    continuous_offset = offset + 0.5 - linear @ np.array([0.5, 0.5])
    data = (linear[0, 0], linear[0, 1], continuous_offset[0], linear[1, 0], linear[1, 1], continuous_offset[1])
    frame = source.transform((size, size), Image.AFFINE, data, resample=Image.BICUBIC, fillcolor=(0, 0, 0))
    return np.ascontiguousarray(np.asarray(frame, dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------------------
# Choosing the landmark model


@functools.lru_cache(maxsize=1)
def _load_dlib68(path: str) -> Dlib68Landmarks:
    return Dlib68Landmarks(path)


_warned = set()


def _say_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def predictor_path() -> Path:
    """The 68-point predictor file: face_recognition_models' copy if installed, else the registry's (downloaded on
    first use, checked by size and sha256)."""
    packaged = packaged_predictor_path()
    if packaged is not None:
        return packaged
    from ..loaders.downloads import resolve

    return resolve(PREDICTOR_REGISTRY_NAME, kind="landmarks")


def get_landmarks_model(choice: str = AUTO) -> Optional[Dlib68Landmarks]:
    """The landmark model for a node/CLI choice; None means RetinaFace's five points.

    'auto' takes dlib's 68 points when the extra is installed and its file can be had, else falls back to
    RetinaFace's five points and says so once (in the log). 'dlib68' raises LandmarksUnavailableError instead.
    """
    if choice not in LANDMARK_CHOICES:
        raise ValueError(f"landmarks must be one of {LANDMARK_CHOICES}, got {choice!r}")
    if choice == RETINAFACE5:
        return None
    if not dlib_installed():
        message = (f"dlib is not installed, so faces are aligned with RetinaFace's five points, which land further "
                   f"from the FFHQ recipe (about 3.5% of the crop side). For the recipe's own landmarks, "
                   f"{INSTALL_HINT}")
        if choice == DLIB68:
            raise LandmarksUnavailableError(f"landmarks='{DLIB68}' needs dlib: {INSTALL_HINT}")
        _say_once("no-dlib", "HyperStyle: " + message)
        return None
    from ..loaders.downloads import WeightsError

    try:
        return _load_dlib68(os.fspath(predictor_path()))
    except (WeightsError, LandmarksUnavailableError) as error:
        if choice == DLIB68:
            raise LandmarksUnavailableError(
                f"dlib's 68-point shape predictor is not available: {error}") from None
        _say_once(f"no-predictor:{error}", f"HyperStyle: dlib's 68-point shape predictor is not available ({error}); "
                                           f"aligning with RetinaFace's five points instead")
        return None
