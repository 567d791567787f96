"""FFHQ face alignment and paste-back.

HyperStyle only works on faces aligned the way the FFHQ dataset was made (`recreate_aligned_images` in the
FFHQ repository): an oriented square derived from eye and mouth positions, resampled to the output size, with
reflect padding + blur where the square leaves the photo. Here that square ("quad") comes from RetinaFace's five
landmarks, and the crop is done as ONE resampling through a 3x3 matrix (output pixel -> source pixel), so that
paste-back can use the exact inverse.

Coordinates are pixel indices (pixel (i, j) has its centre at x=j, y=i), as in the FFHQ script, which adds 0.5 to
the quad when it hands it to PIL.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import landmarks as landmark_models
from .face_detect import Face, FaceDetector, ImageLike, numpy_to_tensor, to_rgb_float

SELECTIONS = ("largest", "index", "all")
LANDMARK_CHOICES = landmark_models.LANDMARK_CHOICES
MAX_THRESHOLD = 0.99  # detection confidence must stay below 1
NO_FACE_ACTIONS = ("error", "center_crop")
METHOD_FFHQ = "ffhq"
METHOD_CENTER_CROP = "center_crop"
DEFAULT_FEATHER = 32.0  # pixels of the aligned face (at the record's output size)

# Face region for paste-back, as fractions of the aligned square: an ellipse around the FFHQ face (eyes sit near
# y=0.47, chin near y=0.85) that keeps clear of the square's edges, where reflect-padded content may lie.
_FACE_ELLIPSE_CENTER = (0.5, 0.5)
_FACE_ELLIPSE_RADII = (0.40, 0.46)


class NoFaceError(ValueError):
    """No face was found in an image (and on_no_face='error')."""


@dataclass
class AlignmentRecord:
    """How one aligned face was cut out of its source photo; everything paste-back needs.

    transform: 3x3 matrix mapping an output pixel (x, y, 1) to a source pixel (homogeneous coordinates).
    method: 'ffhq' (detected face) or 'center_crop' (pass-through: the largest centred square of the photo,
    used when no face was found and on_no_face='center_crop'; paste-back then covers the whole square).
    """

    source_index: int
    quad: np.ndarray  # (4, 2) source pixels: top-left, bottom-left, bottom-right, top-right of the aligned square
    transform: np.ndarray  # (3, 3) output pixel -> source pixel
    landmarks: Optional[np.ndarray]  # (5, 2) source pixels, None for center_crop
    source_size: Tuple[int, int]  # (H, W)
    output_size: int
    score: float  # detection score, 0.0 for center_crop
    method: str = METHOD_FFHQ

    @property
    def inverse_transform(self) -> np.ndarray:
        """3x3 matrix mapping a source pixel to an output pixel."""
        return np.linalg.inv(self.transform)

    def to_dict(self) -> dict:
        """Plain Python types only (loadable with torch.load(weights_only=True), JSON-serialisable)."""
        return {
            "source_index": int(self.source_index),
            "quad": np.asarray(self.quad, dtype=np.float64).tolist(),
            "transform": np.asarray(self.transform, dtype=np.float64).tolist(),
            "landmarks": None if self.landmarks is None else np.asarray(self.landmarks, np.float64).tolist(),
            "source_size": [int(v) for v in self.source_size],
            "output_size": int(self.output_size),
            "score": float(self.score),
            "method": str(self.method),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "AlignmentRecord":
        return cls(
            source_index=int(data["source_index"]),
            quad=np.asarray(data["quad"], dtype=np.float64),
            transform=np.asarray(data["transform"], dtype=np.float64),
            landmarks=None if data.get("landmarks") is None else np.asarray(data["landmarks"], dtype=np.float64),
            source_size=tuple(int(v) for v in data["source_size"]),
            output_size=int(data["output_size"]),
            score=float(data["score"]),
            method=str(data.get("method", METHOD_FFHQ)),
        )


# ---------------------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------------------

def ffhq_quad(landmarks5) -> np.ndarray:
    """The FFHQ crop square (4x2: top-left, bottom-left, bottom-right, top-right) from five landmarks
    (left eye, right eye, nose, left mouth corner, right mouth corner)."""
    points = np.asarray(landmarks5, dtype=np.float64)
    if points.shape != (5, 2) or not np.isfinite(points).all():
        raise ValueError(f"landmarks must be a finite 5x2 array (eyes, nose, mouth corners), got shape {points.shape}")
    eye_left, eye_right, _, mouth_left, mouth_right = points
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (mouth_left + mouth_right) * 0.5
    eye_to_mouth = mouth_avg - eye_avg

    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    length = np.hypot(*x)
    if length < 1e-6:
        raise ValueError(f"landmarks are degenerate (eyes and mouth coincide): {points.tolist()}")
    x /= length
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    center = eye_avg + eye_to_mouth * 0.1
    return np.stack([center - x - y, center - x + y, center + x + y, center + x - y])


def center_crop_quad(height: int, width: int) -> np.ndarray:
    """Quad of the largest centred square of an HxW image (same corner order as `ffhq_quad`)."""
    side = min(height, width)
    x0, y0 = (width - side) / 2.0, (height - side) / 2.0
    # Square edges in continuous coordinates -> pixel-index coordinates (the -0.5 undone in quad_transform).
    left, top, right, bottom = x0 - 0.5, y0 - 0.5, x0 + side - 0.5, y0 + side - 0.5
    return np.array([[left, top], [left, bottom], [right, bottom], [right, top]], dtype=np.float64)


def quad_transform(quad, output_size: int) -> np.ndarray:
    """3x3 matrix taking output pixels of an output_size square to source pixels, with the quad's corners on the
    square's outer corners (like PIL's QUAD transform fed with quad + 0.5). Affine for the FFHQ square."""
    quad = np.asarray(quad, dtype=np.float64)
    if quad.shape != (4, 2) or not np.isfinite(quad).all():
        raise ValueError(f"quad must be a finite 4x2 array, got shape {quad.shape}")
    (ax, ay), (bx, by) = quad[3] - quad[0], quad[1] - quad[0]
    if abs(ax * by - ay * bx) < 1e-6:
        raise ValueError(f"quad is degenerate (it has no area): {quad.tolist()}")
    size = float(output_size)
    square = np.array([[0, 0], [0, size], [size, size], [size, 0]], dtype=np.float64)
    continuous = _homography(square, quad + 0.5)
    transform = _translation(-0.5, -0.5) @ continuous @ _translation(0.5, 0.5)
    # A parallelogram (every FFHQ quad) gives an affine map; drop round-off so it is recognised as one.
    if np.abs(transform[2, :2]).max() * size < 1e-9:
        transform[2] = [0.0, 0.0, 1.0]
    return transform


def _homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 projective map with map(src[i]) = dst[i] for four point pairs."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    try:
        solution = np.linalg.solve(np.array(rows), np.array(rhs))
    except np.linalg.LinAlgError:
        raise ValueError(f"quad is degenerate (three corners on a line): {dst.tolist()}") from None
    return np.append(solution, 1.0).reshape(3, 3)


def _translation(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ matrix.T
    return homogeneous[:, :2] / homogeneous[:, 2:]


def _local_scale(dst_to_src: np.ndarray, at: Tuple[float, float]) -> float:
    """How many source pixels one destination pixel spans (square root of the Jacobian's area) near `at`."""
    x, y = at
    a, right, down = _apply(dst_to_src, np.array([[x, y], [x + 1, y], [x, y + 1]], dtype=np.float64))
    (ax, ay), (bx, by) = right - a, down - a
    return math.sqrt(abs(ax * by - ay * bx))


# ---------------------------------------------------------------------------------------------------------------
# Resampling
# ---------------------------------------------------------------------------------------------------------------

_SUPERSAMPLE_BAND = 1 << 22  # sample positions per grid_sample call when supersampling (bounds memory)


def _warp(source: torch.Tensor, dst_to_src: np.ndarray, out_h: int, out_w: int, *, mode: str = "bicubic",
          padding_mode: str = "border") -> torch.Tensor:
    """Resample source [C,H,W] at dst_to_src(x, y) for every destination pixel -> [C,out_h,out_w].

    Shrinking is antialiased the way the FFHQ script does it: a destination pixel covering s > 1 source pixels is
    the average of n x n interpolated samples spread over its footprint (n = ceil(s), like FFHQ's transform at
    4096 then downscale); when s >= 4 the source is first box-averaged by floor(s / 2) (FFHQ's "shrink" step),
    which keeps n at 4 or less.
    """
    matrix = np.asarray(dst_to_src, dtype=np.float64)
    scale = _local_scale(matrix, ((out_w - 1) / 2, (out_h - 1) / 2))
    shrink = int(scale // 2)
    if shrink >= 2:
        source = _area_downscale(source, shrink)
        # Source pixel i -> pooled pixel (i - (shrink - 1) / 2) / shrink.
        to_pooled = np.diag([1.0 / shrink, 1.0 / shrink, 1.0])
        to_pooled[:2, 2] = -(shrink - 1) / (2.0 * shrink)
        matrix = to_pooled @ matrix
        scale /= shrink
    samples = max(1, int(math.ceil(scale - 1e-3)))  # per axis, per destination pixel

    src_h, src_w = source.shape[-2:]
    # grid_sample's normalised coordinates with align_corners=False: pixel centre i sits at (2i + 1) / size - 1.
    to_normalised = np.array([[2.0 / src_w, 0.0, 1.0 / src_w - 1.0], [0.0, 2.0 / src_h, 1.0 / src_h - 1.0],
                              [0.0, 0.0, 1.0]])
    # Sub-sample p of a destination axis sits at destination coordinate (p + 0.5) / n - 0.5.
    from_subsamples = np.diag([1.0 / samples, 1.0 / samples, 1.0])
    from_subsamples[:2, 2] = (1.0 / samples - 1.0) / 2.0
    grid_matrix = to_normalised @ matrix @ from_subsamples

    source = source[None].float()
    rows_per_band = max(1, _SUPERSAMPLE_BAND // (out_w * samples * samples))
    bands = []
    for row in range(0, out_h, rows_per_band):
        rows = min(rows_per_band, out_h - row)
        band_matrix = grid_matrix @ _translation(0.0, row * samples)
        grid_x, grid_y = _mapped_coordinates(band_matrix, rows * samples, out_w * samples)
        grid = torch.stack([grid_x, grid_y], dim=-1)[None]
        band = F.grid_sample(source, grid, mode=mode, padding_mode=padding_mode, align_corners=False)
        bands.append(F.avg_pool2d(band, samples) if samples > 1 else band)
    return torch.cat(bands, dim=2)[0]


def _mapped_coordinates(matrix: np.ndarray, height: int, width: int):
    """(x, y) float32 tensors [height, width]: where `matrix` sends each pixel of a height x width grid.
    Per-row and per-column terms are formed in float64 and only added at full size, which keeps this cheap."""
    xs = np.arange(width, dtype=np.float64)[None, :]
    ys = np.arange(height, dtype=np.float64)[:, None]

    def row_plus_column(row):
        return (torch.from_numpy(row[0] * xs + row[2]).float() + torch.from_numpy(row[1] * ys).float())

    mapped_x, mapped_y = row_plus_column(matrix[0]), row_plus_column(matrix[1])
    if matrix[2, 0] != 0 or matrix[2, 1] != 0 or matrix[2, 2] != 1:  # projective: divide by w
        w = row_plus_column(matrix[2])
        mapped_x, mapped_y = mapped_x / w, mapped_y / w
    return mapped_x, mapped_y


def _area_downscale(image: torch.Tensor, factor: int) -> torch.Tensor:
    """Average factor x factor blocks of [C,H,W]; edges are replicated up to a whole block."""
    height, width = image.shape[-2:]
    pad_h, pad_w = (-height) % factor, (-width) % factor
    if pad_h or pad_w:
        image = F.pad(image[None], (0, pad_w, 0, pad_h), mode="replicate")[0]
    return F.avg_pool2d(image[None], factor)[0]


def _gaussian_blur(image: torch.Tensor, sigma: float, radius: Optional[int] = None) -> torch.Tensor:
    """Separable Gaussian blur of [C,H,W] with replicated edges; the kernel is cut at `radius` (default 3 sigma)."""
    if sigma <= 0:
        return image
    radius = int(math.ceil(3 * sigma)) if radius is None else int(radius)
    if radius < 1:
        return image
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    channels = image.shape[0]
    out = image[None].float()
    horizontal = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    vertical = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="replicate"), horizontal, groups=channels)
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), vertical, groups=channels)
    return out[0]


def _wide_gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of [C,H,W] for large sigma, computed on a box-downscaled copy and interpolated back up
    (indistinguishable for such blurs, and it keeps big photos fast)."""
    factor = int(sigma // 3)
    if factor < 2:
        return _gaussian_blur(image, sigma)
    height, width = image.shape[-2:]
    small = _area_downscale(image, factor)
    # Box pooling and bilinear upsampling already blur (variances (f^2 - 1) / 12 and about f^2 / 6 source px^2).
    remaining = math.sqrt(max(sigma ** 2 - (factor ** 2 - 1) / 12.0 - factor ** 2 / 6.0, 0.0)) / factor
    small = _gaussian_blur(small, remaining)
    upsampled = F.interpolate(small[None], scale_factor=factor, mode="bilinear", align_corners=False)[0]
    return upsampled[:, :height, :width]


def _channel_median(image: torch.Tensor, max_samples: int = 1 << 20) -> torch.Tensor:
    """Per-channel median of [C,H,W]; big images use an even subsample (same value to within noise)."""
    flat = image.reshape(image.shape[0], -1)
    step = max(1, flat.shape[1] // max_samples)
    return flat[:, ::step].median(dim=1).values


def _reflect_indices(size: int, before: int, after: int) -> torch.Tensor:
    """Indices of a mirror-padded axis (edge pixel not repeated, like numpy 'reflect'), for any pad width."""
    index = torch.arange(-before, size + after)
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = index.remainder(period)
    return torch.where(index >= size, period - index, index)


def _ffhq_source_region(image: torch.Tensor, quad: np.ndarray, enable_padding: bool):
    """FFHQ's crop + pad step on [3,H,W]: the part of the photo around the quad, mirror-padded, blurred and faded
    to the median colour where the quad leaves the photo. Returns (region, (x, y) of source pixel 0 in region)."""
    height, width = image.shape[-2:]
    qsize = float(np.hypot(*(quad[3] - quad[0])))  # side length of the square (FFHQ: 2 * |x|)
    border = max(int(np.rint(qsize * 0.1)), 3)

    # At least one photo pixel, even for a quad that lies entirely outside (then padding supplies the rest).
    x0 = min(max(int(np.floor(quad[:, 0].min())) - border, 0), width - 1)
    y0 = min(max(int(np.floor(quad[:, 1].min())) - border, 0), height - 1)
    x1 = max(min(int(np.ceil(quad[:, 0].max())) + border, width), x0 + 1)
    y1 = max(min(int(np.ceil(quad[:, 1].max())) + border, height), y0 + 1)
    region = image[:, y0:y1, x0:x1]
    local = quad - [x0, y0]
    crop_h, crop_w = region.shape[-2:]

    pad = [max(-int(np.floor(local[:, 0].min())) + border, 0), max(-int(np.floor(local[:, 1].min())) + border, 0),
           max(int(np.ceil(local[:, 0].max())) - crop_w + border, 0),
           max(int(np.ceil(local[:, 1].max())) - crop_h + border, 0)]
    if not enable_padding or max(pad) <= border - 4:
        return region, (-x0, -y0)

    pad = [max(p, int(np.rint(qsize * 0.3)), 1) for p in pad]
    left, top, right, bottom = pad
    rows = _reflect_indices(crop_h, top, bottom)
    cols = _reflect_indices(crop_w, left, right)
    padded = region[:, rows][:, :, cols]

    # Weight that grows from <0 inside the photo to 1 at the outer edge of the padding (FFHQ's formula).
    h, w = padded.shape[-2:]
    xs = torch.arange(w, dtype=torch.float32)[None, :]
    ys = torch.arange(h, dtype=torch.float32)[:, None]
    weight = torch.maximum(1.0 - torch.minimum(xs / left, (w - 1 - xs) / right),
                           1.0 - torch.minimum(ys / top, (h - 1 - ys) / bottom))
    blurred = _wide_gaussian_blur(padded, qsize * 0.02)
    padded = torch.lerp(padded, blurred, (weight * 3.0 + 1.0).clamp_(0.0, 1.0))
    median = _channel_median(padded).view(3, 1, 1)
    padded = torch.lerp(padded, median.expand_as(padded), weight.clamp_(0.0, 1.0))
    return padded, (left - x0, top - y0)


# ---------------------------------------------------------------------------------------------------------------
# Single image: align and paste back
# ---------------------------------------------------------------------------------------------------------------

def align_face(image: ImageLike, quad, output_size: int = 1024, *, landmarks=None, score: float = 0.0,
               source_index: int = 0, method: str = METHOD_FFHQ, enable_padding: bool = True):
    """Cut the oriented square `quad` out of `image` and resample it to output_size x output_size.

    image: HxW or HxWxC (C = 1, 3, 4), numpy or torch, uint8 or float 0..1.
    Returns (aligned float32 tensor [S,S,3] in 0..1, AlignmentRecord).
    """
    output_size = _check_output_size(output_size)
    rgb = to_rgb_float(image).permute(2, 0, 1)
    height, width = rgb.shape[-2:]
    quad = np.asarray(quad, dtype=np.float64)
    out_to_src = quad_transform(quad, output_size)

    if enable_padding:
        region, (offset_x, offset_y) = _ffhq_source_region(rgb, quad, enable_padding=True)
    else:
        region, (offset_x, offset_y) = rgb, (0, 0)
    out_to_region = _translation(offset_x, offset_y) @ out_to_src
    aligned = _warp(region, out_to_region, output_size, output_size, mode="bicubic", padding_mode="border")

    record = AlignmentRecord(
        source_index=int(source_index), quad=quad.copy(), transform=out_to_src,
        landmarks=None if landmarks is None else np.asarray(landmarks, dtype=np.float64).copy(),
        source_size=(int(height), int(width)), output_size=output_size, score=float(score), method=method)
    return aligned.clamp(0.0, 1.0).permute(1, 2, 0).contiguous(), record


def center_crop_align(image: ImageLike, output_size: int = 1024, *, source_index: int = 0):
    """Pass-through alignment: the largest centred square, resized. Same outputs as `align_face`."""
    rgb = to_rgb_float(image)
    quad = center_crop_quad(*rgb.shape[:2])
    return align_face(rgb, quad, output_size, source_index=source_index, method=METHOD_CENTER_CROP,
                      enable_padding=False)


def face_region_mask(output_size: int, feather: float = DEFAULT_FEATHER, method: str = METHOD_FFHQ) -> torch.Tensor:
    """Soft paste-back region in the aligned square, [S,S] in 0..1.

    The region (an ellipse around the face, or the whole square for center_crop records) is eroded by `feather`
    pixels and then blurred with a kernel cut at `feather` pixels, so it is exactly 0 on and outside the region's
    edge and reaches 1 about 2 * feather pixels inside it.
    """
    size = _check_output_size(output_size)
    feather = float(feather)
    if not math.isfinite(feather) or feather < 0:
        raise ValueError(f"feather must be a radius in pixels >= 0, got {feather}")
    if method not in (METHOD_FFHQ, METHOD_CENTER_CROP):
        raise ValueError(f"unknown alignment method {method!r}; expected {METHOD_FFHQ!r} or {METHOD_CENTER_CROP!r}")
    return _region_mask(size, feather, method).clone()


@functools.lru_cache(maxsize=8)  # a batch pastes many faces with the same size and feather
def _region_mask(size: int, feather: float, method: str) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) + 0.5  # pixel centres, continuous coordinates
    if method == METHOD_CENTER_CROP:
        inset = min(feather, size / 4.0)
        inside_x = (coords >= inset) & (coords <= size - inset)
        region = (inside_x[None, :] & inside_x[:, None]).float()
        reach = inset
    else:
        cx, cy = (c * size for c in _FACE_ELLIPSE_CENTER)
        rx, ry = (r * size for r in _FACE_ELLIPSE_RADII)
        reach = min(feather, 0.4 * min(rx, ry))
        rx, ry = rx - reach, ry - reach
        region = ((((coords[None, :] - cx) / rx) ** 2 + ((coords[:, None] - cy) / ry) ** 2) <= 1.0).float()
    radius = int(math.floor(reach))
    if radius >= 1:
        region = _gaussian_blur(region[None], sigma=radius / 3.0, radius=radius)[0]
    return region.clamp(0.0, 1.0)


def paste_back(original: ImageLike, face: ImageLike, record: AlignmentRecord, feather: float = DEFAULT_FEATHER):
    """Warp `face` (an aligned face of any size, e.g. an edited one) back into `original` through the inverse of
    record.transform, blended through a feathered face-region mask.

    Returns (image float32 tensor [H,W,3], mask float32 tensor [H,W] in 0..1). Where mask == 0 the image is
    bit-identical to the original's RGB values (in 0..1 floats; uint8 originals are divided by 255).
    """
    return paste_faces(original, [face], [record], feather)


def paste_faces(original: ImageLike, faces: Sequence[ImageLike], records: Sequence[AlignmentRecord],
                feather: float = DEFAULT_FEATHER):
    """Paste several aligned faces of one photo back in a single pass.

    Where feathered masks overlap (faces close together) the faces are averaged in proportion to their masks, so
    neither overwrites the other's edge and the result does not depend on their order; the photo shows through by
    the product of (1 - mask). Returns (image [H,W,3], mask [H,W]: the combined coverage), as `paste_back`.
    """
    original_rgb = to_rgb_float(original, what="original image")
    height, width = original_rgb.shape[:2]
    weighted_faces = torch.zeros(height, width, 3)
    weights = torch.zeros(height, width)
    uncovered = torch.ones(height, width)
    for face, record in zip(faces, records):
        if (height, width) != tuple(record.source_size):
            raise ValueError(f"paste_back: the original image is {height}x{width} but the alignment record was "
                             f"made from a {record.source_size[0]}x{record.source_size[1]} image; connect the same "
                             f"image that went into the align step")
        warped = _warp_face_into_photo(face, record, height, width, feather)
        if warped is None:  # the aligned square does not overlap the photo
            continue
        (x0, y0, x1, y1), warped_face, warped_mask = warped
        weighted_faces[y0:y1, x0:x1] += warped_face * warped_mask[..., None]
        weights[y0:y1, x0:x1] += warped_mask
        uncovered[y0:y1, x0:x1] *= 1.0 - warped_mask
    mask = 1.0 - uncovered
    covered = mask > 0
    blend = weighted_faces / weights.clamp_min(1e-12)[..., None]
    composite = original_rgb + (blend - original_rgb) * mask[..., None]
    return torch.where(covered[..., None], composite, original_rgb), mask


def _warp_face_into_photo(face: ImageLike, record: AlignmentRecord, height: int, width: int, feather: float):
    """(box, face [h,w,3], mask [h,w]) of an aligned face warped back into its photo's pixel box, or None."""
    size = int(record.output_size)
    face_chw = to_rgb_float(face, what="face").permute(2, 0, 1)
    if face_chw.shape[-2:] != (size, size):
        face_chw = F.interpolate(face_chw[None], size=(size, size), mode="bicubic", antialias=True,
                                 align_corners=False)[0].clamp(0.0, 1.0)
    box = _quad_bbox_in_image(np.asarray(record.quad), height, width)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    region_to_out = np.linalg.inv(record.transform) @ _translation(x0, y0)
    warped_face = _warp(face_chw, region_to_out, y1 - y0, x1 - x0, mode="bicubic", padding_mode="border")
    region_mask = face_region_mask(size, feather, record.method)
    warped_mask = _warp(region_mask[None], region_to_out, y1 - y0, x1 - x0, mode="bilinear",
                        padding_mode="zeros")[0].clamp(0.0, 1.0)
    warped_mask = warped_mask * _inside_square(region_to_out, y1 - y0, x1 - x0, size)
    return box, warped_face.permute(1, 2, 0).clamp(0.0, 1.0), warped_mask


def _quad_bbox_in_image(quad: np.ndarray, height: int, width: int):
    """Integer pixel box (x0, y0, x1, y1), end exclusive, covering the quad (plus a pixel), clipped to the image."""
    x0 = max(int(np.floor(quad[:, 0].min())) - 1, 0)
    y0 = max(int(np.floor(quad[:, 1].min())) - 1, 0)
    x1 = min(int(np.ceil(quad[:, 0].max())) + 2, width)
    y1 = min(int(np.ceil(quad[:, 1].max())) + 2, height)
    return None if x1 <= x0 or y1 <= y0 else (x0, y0, x1, y1)


def _inside_square(region_to_out: np.ndarray, height: int, width: int, size: int) -> torch.Tensor:
    """1 where a region pixel maps inside the aligned square (where the warped face is defined), else 0."""
    out_x, out_y = _mapped_coordinates(region_to_out, height, width)
    inside = (out_x >= -0.5) & (out_x <= size - 0.5) & (out_y >= -0.5) & (out_y <= size - 0.5)
    return inside.float()


def _check_output_size(output_size) -> int:
    size = int(output_size)
    if size != output_size or size < 8:
        raise ValueError(f"output_size must be a whole number of pixels >= 8, got {output_size}")
    return size


# ---------------------------------------------------------------------------------------------------------------
# Batches (ComfyUI IMAGE [B,H,W,C] float 0..1, MASK [B,H,W])
# ---------------------------------------------------------------------------------------------------------------

def align_batch(images_bhwc, detector: FaceDetector, output_size: int = 1024, selection: str = "largest",
                face_index: int = 0, threshold: float = 0.9, on_no_face: str = "error",
                landmarks: str = landmark_models.AUTO):
    """Detect and FFHQ-align faces in every image of a batch.

    selection: 'largest' (one face per image), 'index' (face number `face_index`, largest first) or 'all' (one
    output per face: a group photo becomes several aligned faces, each person once).
    on_no_face: 'error' raises NoFaceError; 'center_crop' passes the largest centred square through instead (its
    record has method='center_crop', so paste-back still works).
    landmarks: 'auto' (dlib's 68 points when the extra is installed, else RetinaFace's five), 'dlib68' or
    'retinaface5' (see landmarks.py). Faces in any orientation (photos turned 90/180/270 degrees) are found upright.
    Returns (aligned float32 [N,S,S,3] on the input's device, list of N AlignmentRecords).
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if on_no_face not in NO_FACE_ACTIONS:
        raise ValueError(f"on_no_face must be one of {NO_FACE_ACTIONS}, got {on_no_face!r}")
    if selection == "index" and (int(face_index) != face_index or face_index < 0):
        raise ValueError(f"face_index must be a whole number >= 0, got {face_index}")
    images, device = _as_batch(images_bhwc, "images")
    output_size = _check_output_size(output_size)
    landmark_model = landmark_models.get_landmarks_model(landmarks)

    aligned, records = [], []
    for index in range(images.shape[0]):
        rgb = to_rgb_float(images[index], what=f"batch image {index}")
        faces = find_faces(rgb, detector, threshold, landmark_model)
        chosen = _select_faces(faces, selection, int(face_index), index, images.shape[0], threshold, on_no_face)
        if not chosen:
            face, record = center_crop_align(rgb, output_size, source_index=index)
            aligned.append(face)
            records.append(record)
            continue
        for face in chosen:
            crop, record = align_face(rgb, face.quad, output_size, landmarks=face.points5, score=face.score,
                                      source_index=index)
            aligned.append(crop)
            records.append(record)
    return torch.stack(aligned).to(device), records


@dataclass
class FoundFace:
    """A face ready to align: its five alignment points and FFHQ square, in the photo's pixels."""

    score: float  # RetinaFace's confidence
    points5: np.ndarray  # (5, 2): eye centres, nose tip, outer mouth corners
    confirmed: bool  # the landmarks were checked to sit on an upright face (see find_faces)
    quad: np.ndarray = None

    def __post_init__(self):
        self.quad = ffhq_quad(self.points5)

    @property
    def side(self) -> float:
        return float(np.hypot(*(self.quad[3] - self.quad[0])))


def find_faces(rgb: torch.Tensor, detector: FaceDetector, threshold: float = 0.9,
               landmark_model=None) -> List[FoundFace]:
    """Every face in an [H,W,3] photo, in any orientation, each once, largest first.

    RetinaFace finds the faces; `landmark_model` (a landmarks.Dlib68Landmarks, or None for RetinaFace's own five
    points) places the alignment points. A face is "confirmed" when a second look sees an upright face where its
    points say: dlib's detector in the face's upright frame, or (five points) RetinaFace again on the aligned crop.
    Detectors trained on upright faces still fire on faces turned sideways or upside down, with points in the
    wrong places, so when a face is not confirmed (or none is found) the photo is searched again turned by 90, 180
    and 270 degrees, and a face confirmed there replaces an unconfirmed one at the same place.
    """
    height, width = rgb.shape[:2]
    image_u8 = (rgb * 255.0).round().to(torch.uint8).numpy() if landmark_model is not None else None
    photo_rects = landmark_model.detect_in_photo(image_u8) if landmark_model is not None else ()
    found = [_locate(face, rgb, image_u8, detector, landmark_model, photo_rects)
             for face in detector.detect(rgb, threshold=threshold)]
    if not found or not all(face.confirmed for face in found):
        for turns in (1, 2, 3):
            turned = torch.rot90(rgb, turns, dims=(0, 1))
            for face in detector.detect(turned, threshold=threshold):
                candidate = _locate(_unturn_face(face, turns, height, width), rgb, image_u8, detector,
                                    landmark_model, ())
                if candidate.confirmed:
                    found.append(candidate)
    return _distinct_faces(found)


def _locate(face: Face, rgb, image_u8, detector: FaceDetector, landmark_model, photo_rects) -> FoundFace:
    if landmark_model is not None:
        located = landmark_model.locate(image_u8, ffhq_quad(face.landmarks), photo_rects)
        return FoundFace(face.score, located.points5, located.confirmed)
    return FoundFace(face.score, np.asarray(face.landmarks, dtype=np.float64),
                     _retinaface_confirms(rgb, face.landmarks, detector))


# Where RetinaFace puts the five points on an FFHQ-aligned face (fractions of the square; measured on the shared
# photos aligned by the recipe), and how far (mean, fraction of the side) a second detection may land from them.
_ALIGNED_POINTS5 = np.array([[0.38, 0.465], [0.625, 0.47], [0.5, 0.61], [0.39, 0.72], [0.61, 0.72]])
_ALIGNED_POINTS5_TOLERANCE = 0.06
_CHECK_SIZE = 160


def _retinaface_confirms(rgb: torch.Tensor, points5, detector: FaceDetector) -> bool:
    """Does RetinaFace, run again on the aligned crop, find the face upright where the FFHQ recipe puts it?"""
    quad = ffhq_quad(points5)
    crop = _warp(rgb.permute(2, 0, 1), quad_transform(quad, _CHECK_SIZE), _CHECK_SIZE, _CHECK_SIZE,
                 mode="bilinear", padding_mode="zeros").clamp(0.0, 1.0)
    again = detector.detect(crop.permute(1, 2, 0), threshold=0.5)
    if not again:
        return False
    error = np.linalg.norm(again[0].landmarks / _CHECK_SIZE - _ALIGNED_POINTS5, axis=1).mean()
    return bool(error < _ALIGNED_POINTS5_TOLERANCE)


def _unturn_face(face: Face, turns: int, height: int, width: int) -> Face:
    """A face found in torch.rot90(photo, turns) (counter-clockwise quarter turns), in the photo's pixels."""
    def unturn(points):
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2).copy()
        h, w = (width, height) if turns % 2 else (height, width)  # the turned photo's size
        for _ in range(turns % 4):  # undo one quarter turn at a time
            x, y = points[:, 0].copy(), points[:, 1].copy()
            points[:, 0], points[:, 1] = h - 1 - y, x  # one turn back: (x, y) came from (height - 1 - y, x)
            h, w = w, h
        return points

    corners = unturn([[face.box[0], face.box[1]], [face.box[2], face.box[3]]])
    box = (*corners.min(axis=0), *corners.max(axis=0))
    return Face(score=face.score, box=tuple(float(v) for v in box), landmarks=unturn(face.landmarks))


def _distinct_faces(faces: List[FoundFace]) -> List[FoundFace]:
    """Each person once: of faces whose squares share a centre (within a third of the smaller side), the
    confirmed one, else the most confident, is kept. Largest first."""
    kept: List[FoundFace] = []
    for face in sorted(faces, key=lambda f: (f.confirmed, f.score), reverse=True):
        centre = face.quad.mean(axis=0)
        if all(np.hypot(*(centre - other.quad.mean(axis=0))) > min(face.side, other.side) / 3.0 for other in kept):
            kept.append(face)
    return sorted(kept, key=lambda f: f.side, reverse=True)


def _select_faces(faces: List[FoundFace], selection: str, face_index: int, image_index: int, batch_size: int,
                  threshold: float, on_no_face: str) -> List[FoundFace]:
    """The faces to align for one image; [] means 'use the center-crop pass-through'."""
    if selection == "index" and faces and face_index >= len(faces):
        raise ValueError(f"batch image {image_index} has {len(faces)} face(s) at threshold {threshold}, so "
                         f"face_index {face_index} does not exist; use a face_index below {len(faces)} "
                         f"(0 is the largest face) or selection='all'")
    if faces:
        return faces if selection == "all" else [faces[face_index if selection == "index" else 0]]
    if on_no_face == "center_crop":
        return []
    raise NoFaceError(f"no face found in batch image {image_index} (of {batch_size}) at detection threshold "
                      f"{threshold}. Lower the threshold (e.g. 0.5), use a larger or closer photo of the face, or "
                      f"set on_no_face='center_crop' to pass the image through as a centred square crop")


def paste_back_batch(originals_bhwc, faces_bhwc, records: Sequence[AlignmentRecord],
                     feather: float = DEFAULT_FEATHER):
    """Paste faces[i] into originals[records[i].source_index]; the faces of one photo go in together, in one pass
    (see `paste_faces`).

    Returns (images float32 [B,H,W,3], masks float32 [B,H,W]: the union of the pasted regions), on the originals'
    device. Photos without a record come back unchanged (RGB) with an empty mask.
    """
    originals, device = _as_batch(originals_bhwc, "original images")
    faces, _ = _as_batch(faces_bhwc, "faces")
    records = list(records)
    if faces.shape[0] != len(records):
        raise ValueError(f"paste back got {faces.shape[0]} face image(s) but {len(records)} alignment record(s); "
                         f"connect the alignment records from the same align node that produced these faces "
                         f"(an edited batch must keep its size and order)")
    batch = originals.shape[0]
    for number, record in enumerate(records):
        if not isinstance(record, AlignmentRecord):
            raise TypeError(f"alignment record {number} is a {type(record).__name__}, not an AlignmentRecord")
        if not 0 <= record.source_index < batch:
            raise ValueError(f"alignment record {number} refers to image {record.source_index} but only {batch} "
                             f"original image(s) were given; connect the same images that went into the align node")

    images, masks = [], []
    for index in range(batch):
        numbers = [number for number, record in enumerate(records) if record.source_index == index]
        image, mask = paste_faces(originals[index], [faces[number] for number in numbers],
                                  [records[number] for number in numbers], feather=feather)
        images.append(image)
        masks.append(mask)
    return torch.stack(images).to(device), torch.stack(masks).to(device)


def _as_batch(images, what: str):
    """[B,H,W,C] (or one [H,W,C] image) as a CPU tensor, plus the device it came from."""
    if isinstance(images, np.ndarray):
        images = numpy_to_tensor(images)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{what} must be a tensor [B,H,W,C], got {type(images).__name__}")
    device = images.device
    if images.ndim == 3 and images.shape[-1] in (1, 3, 4):
        images = images[None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{what} must have shape [B,H,W,C] with C in (1, 3, 4), got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{what} is an empty batch")
    return images.detach().cpu(), device
