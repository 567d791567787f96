"""Face detection with facexlib's RetinaFace, loaded from a local weights file.

Only the network definition is taken from facexlib; weights are loaded here from a path the caller gives
(facexlib's own `init_detection_model` would download into site-packages, which we never allow). Pre-processing
(colour/format normalisation, resizing for speed, padding) and decoding of the raw network outputs are done here,
so every input shape and size is handled predictably.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from .. import image_checks

# Network name accepted by us -> (facexlib network_name, file name of the released facexlib weights).
_NETWORKS = {
    "mobilenet0.25": ("mobile0.25", "detection_mobilenet0.25_Final.pth"),
    "resnet50": ("resnet50", "detection_Resnet50_Final.pth"),
}
_NETWORK_ALIASES = {"mobile0.25": "mobilenet0.25", "mobilenet": "mobilenet0.25", "r50": "resnet50"}

# RetinaFace anchor layout and box encoding (identical for both backbones).
_ANCHOR_STEPS = (8, 16, 32)
_ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
_VARIANCE_CENTER, _VARIANCE_SIZE = 0.1, 0.2
_BGR_MEAN = (104.0, 117.0, 123.0)  # the network was trained on BGR 0..255 minus this mean
_NMS_IOU = 0.4
_INPUT_MULTIPLE = 32  # coarsest stride: padding to it keeps the anchor grid and the feature maps the same size
_MIN_INPUT_SIDE = 64

ImageLike = Union[np.ndarray, torch.Tensor]


@dataclass
class Face:
    """One detected face, in pixel coordinates of the image given to `detect`."""

    score: float
    box: Tuple[float, float, float, float]  # x0, y0, x1, y1
    landmarks: np.ndarray  # (5, 2) x,y: left eye, right eye, nose, left mouth corner, right mouth corner

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(x1 - x0, 0.0) * max(y1 - y0, 0.0)


def numpy_to_tensor(array: np.ndarray) -> torch.Tensor:
    """torch.from_numpy that also accepts read-only and non-contiguous arrays (copying only then)."""
    array = np.ascontiguousarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def to_rgb_float(image: ImageLike, what: str = "image") -> torch.Tensor:
    """Any HxW or HxWxC image (C = 1-4; numpy or torch, uint8 or float) -> float32 tensor [H,W,3] in 0..1 on the CPU.

    The values follow image_checks' policy (uint8 /255; floats finite and in [0, 1], a 0..255 float image is
    refused); grey images are repeated to three channels, alpha is dropped.
    """
    if isinstance(image, np.ndarray):
        tensor = numpy_to_tensor(image)
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
    else:
        raise TypeError(f"{what} must be a numpy array or torch tensor of shape HxWxC, got {type(image).__name__}")
    return image_checks.rgb_hwc(tensor, what).contiguous()


class FaceDetector:
    """RetinaFace wrapper: `detect(image)` -> faces sorted largest first."""

    def __init__(self, network: torch.nn.Module, network_name: str, device: torch.device,
                 max_detect_side: int = 1024):
        self.network = network.to(device)
        self.network_name = network_name
        self.max_detect_side = int(max_detect_side)

    @property
    def device(self) -> torch.device:
        """Where the network's weights are now (a model manager may move them between uses)."""
        return next(self.network.parameters()).device

    @torch.no_grad()
    def detect(self, image: ImageLike, threshold: float = 0.9) -> List[Face]:
        """Detect faces in an HxW / HxWxC image (uint8 or float 0..1). Returns [] when there is none.

        Images whose longer side exceeds `max_detect_side` are downscaled for detection (faces stay findable and
        CPU time stays bounded); boxes and landmarks are mapped back to the original pixel coordinates.
        """
        if not 0.0 < float(threshold) < 1.0:
            raise ValueError(f"detection threshold must be between 0 and 1 (exclusive), got {threshold}")
        rgb = to_rgb_float(image)
        height, width = rgb.shape[:2]

        # Downscale huge images (antialiased) to keep detection time bounded.
        scale = min(1.0, self.max_detect_side / max(height, width))
        det_h, det_w = max(1, round(height * scale)), max(1, round(width * scale))
        chw = rgb.permute(2, 0, 1)[None]
        if (det_h, det_w) != (height, width):
            chw = F.interpolate(chw, size=(det_h, det_w), mode="bilinear", antialias=True, align_corners=False)

        # Network input: BGR 0..255 minus mean, padded (bottom/right, so coordinates do not move) to a multiple of
        # the coarsest stride and to a minimum size, so tiny images give "no face" rather than a shape error.
        bgr = chw[:, [2, 1, 0]] * 255.0 - torch.tensor(_BGR_MEAN).view(1, 3, 1, 1)
        pad_h = _round_up(max(det_h, _MIN_INPUT_SIDE), _INPUT_MULTIPLE)
        pad_w = _round_up(max(det_w, _MIN_INPUT_SIDE), _INPUT_MULTIPLE)
        bgr = F.pad(bgr, (0, pad_w - det_w, 0, pad_h - det_h))  # zero == the mean colour
        loc, conf, landmark_offsets = self.network(bgr.to(self.device))

        anchors = _anchor_boxes(pad_h, pad_w)
        if anchors.shape[0] != loc.shape[1]:
            raise RuntimeError(f"RetinaFace produced {loc.shape[1]} predictions for {anchors.shape[0]} anchors "
                               f"(input {pad_h}x{pad_w}); this network does not match the expected layout")
        scores = conf[0, :, 1].float().cpu()
        keep = scores > threshold
        if not keep.any():
            return []
        anchors, scores = anchors[keep], scores[keep]
        boxes, points = _decode(loc[0].float().cpu()[keep], landmark_offsets[0].float().cpu()[keep], anchors)
        size = torch.tensor([pad_w, pad_h], dtype=torch.float32)
        boxes = boxes * size.repeat(2)
        points = points * size

        kept = torchvision.ops.nms(boxes, scores, _NMS_IOU)
        # Back to original-image coordinates: box edges scale as they are; landmarks are pixel indices, whose
        # centres (index + 0.5) are what line up under a resize.
        back = torch.tensor([width / det_w, height / det_h], dtype=torch.float64)
        faces = []
        for i in kept.tolist():
            corners = boxes[i].double().view(2, 2) * back
            marks = (points[i].double() + 0.5) * back - 0.5
            faces.append(Face(score=float(scores[i]), box=tuple(float(v) for v in corners.flatten()),
                              landmarks=marks.numpy()))
        faces.sort(key=lambda face: face.area, reverse=True)
        return faces

    def __repr__(self) -> str:
        return f"FaceDetector(RetinaFace {self.network_name}, device={self.device})"


def load_face_detector(weights_path: Union[str, os.PathLike], network: str = "auto",
                       device: Union[str, torch.device] = "cpu", max_detect_side: int = 1024) -> FaceDetector:
    """Build facexlib's RetinaFace and load weights from a local file.

    `network`: 'auto' (read from the file's keys, whatever its name), 'resnet50' or 'mobilenet0.25'.
    Nothing is downloaded. The file must be a RetinaFace state dict for that backbone, like facexlib's released
    detection_Resnet50_Final.pth / detection_mobilenet0.25_Final.pth (a leading 'module.' on keys is fine).
    """
    name = _NETWORK_ALIASES.get(str(network).lower(), str(network).lower())
    if name != "auto" and name not in _NETWORKS:
        raise ValueError(f"unknown face detector network {network!r}; choose 'auto' or one of {sorted(_NETWORKS)}")
    expected = ("a RetinaFace state dict (ResNet-50 or MobileNet-0.25) such as facexlib's "
                + " or ".join(released for _, released in _NETWORKS.values()))

    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"face detector weights not found at {path}; expected {expected}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt, truncated, or not a torch file at all
        raise ValueError(f"could not read face detector weights {path}: {type(error).__name__}: {error}. "
                         f"Expected {expected}; the file may be corrupt or incompletely downloaded") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"face detector weights {path} hold a {type(state).__name__}, not a state dict of tensors; "
                         f"expected {expected}")
    state = {(key[len("module."):] if key.startswith("module.") else key): value for key, value in state.items()}
    if name == "auto":
        name = _network_of(state)
        if name is None:
            raise ValueError(f"face detector weights {path} are not a RetinaFace network (none of its "
                             f"{len(state)} keys is a ResNet-50 or MobileNet-0.25 backbone layer); expected {expected}")
    facexlib_name, released_file = _NETWORKS[name]
    expected = f"a RetinaFace {name} state dict such as facexlib's {released_file}"

    from facexlib.detection.retinaface import RetinaFace  # imported late: facexlib's package import is heavy

    with warnings.catch_warnings():  # facexlib passes the deprecated torchvision `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        model = RetinaFace(network_name=facexlib_name, half=False, phase="test", device=torch.device("cpu"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        ours, theirs = set(model.state_dict()), set(state)
        raise ValueError(
            f"face detector weights {path} do not fit RetinaFace {name}: {len(ours - theirs)} missing and "
            f"{len(theirs - ours)} unexpected keys, {_count_shape_mismatches(model, state)} shape mismatches. "
            f"Expected {expected}; the file may be another model, or pass network='auto' to read the backbone "
            f"from the file") from error
    device = torch.device(device)
    model = model.to(device).eval()
    return FaceDetector(model, name, device, max_detect_side=max_detect_side)


def _network_of(state: dict):
    """Which RetinaFace backbone a state dict is for, from its key names (facexlib's layout), or None."""
    if any(key.startswith("body.stage1.") for key in state):
        return "mobilenet0.25"
    if any(key.startswith("body.layer2.") for key in state):
        return "resnet50"
    return None


def _count_shape_mismatches(model: torch.nn.Module, state: dict) -> int:
    own = model.state_dict()
    return sum(1 for key, value in state.items() if key in own and own[key].shape != value.shape)


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def _anchor_boxes(height: int, width: int) -> torch.Tensor:
    """RetinaFace anchors as (cx, cy, w, h), normalised by the input size, in the network's output order
    (per level: row, column, anchor size)."""
    levels = []
    for step, sizes in zip(_ANCHOR_STEPS, _ANCHOR_SIZES):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cy, cx = torch.meshgrid((torch.arange(rows) + 0.5) * step / height,
                                (torch.arange(cols) + 0.5) * step / width, indexing="ij")
        per_size = [torch.stack([cx, cy, torch.full_like(cx, s / width), torch.full_like(cy, s / height)], -1)
                    for s in sizes]
        levels.append(torch.stack(per_size, dim=2).reshape(-1, 4))
    return torch.cat(levels).float()


def _decode(loc: torch.Tensor, landmark_offsets: torch.Tensor, anchors: torch.Tensor):
    """Undo the SSD-style regression encoding -> boxes (x0,y0,x1,y1) and 5 landmarks, both normalised."""
    centre, size = anchors[:, :2], anchors[:, 2:]
    box_centre = centre + loc[:, :2] * _VARIANCE_CENTER * size
    box_size = size * torch.exp(loc[:, 2:] * _VARIANCE_SIZE)
    boxes = torch.cat([box_centre - box_size / 2, box_centre + box_size / 2], dim=1)
    points = centre[:, None] + landmark_offsets.view(-1, 5, 2) * _VARIANCE_CENTER * size[:, None]
    return boxes, points
