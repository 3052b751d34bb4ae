"""Helpers shared by the decoders: NMS, output lookup, label lookup, building Detections."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from models.preprocess import Transform
from models.results import ClassScore, Detection, MaskSummary


@dataclass
class MaskMap:
    """A segmentation as pixels, for the mask PNG: the output map's region that shows the image (no letterbox
    padding), 8-bit. ``kind`` "probability": value = probability x 255 (resized smoothly); "class_ids": value = the
    class id (resized by nearest neighbour, so that ids never blend)."""

    pixels: np.ndarray
    kind: str


@dataclass
class DecodeResult:
    detections: list[Detection] = field(default_factory=list)
    classes: list[ClassScore] = field(default_factory=list)
    mask: Optional[MaskSummary] = None
    mask_map: Optional[MaskMap] = None


def label_for(labels: list[str], class_id: int) -> str:
    return labels[class_id] if 0 <= class_id < len(labels) else str(class_id)


def pick_output(outputs: Mapping[str, np.ndarray], name: Optional[str]) -> np.ndarray:
    if name is not None:
        if name not in outputs:
            raise KeyError(f"model has no output {name!r} (has: {', '.join(outputs)})")
        return outputs[name]
    if len(outputs) != 1:
        # Several outputs and no name: take the largest, which is the prediction head in exported graphs.
        return max(outputs.values(), key=lambda a: a.size)
    return next(iter(outputs.values()))


def valid_region(transform: Transform, map_w: int, map_h: int) -> tuple[slice, slice]:
    """Rows/cols of a (map_h, map_w) output map that show the image, excluding letterbox padding."""
    fx, fy = map_w / transform.in_w, map_h / transform.in_h
    x0 = int(round(transform.pad_x * fx))
    y0 = int(round(transform.pad_y * fy))
    x1 = int(round((transform.pad_x + transform.orig_w * transform.scale_x) * fx))
    y1 = int(round((transform.pad_y + transform.orig_h * transform.scale_y) * fy))
    return slice(max(0, y0), min(map_h, max(y1, y0 + 1))), slice(max(0, x0), min(map_w, max(x1, x0 + 1)))


def iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_out: int) -> list[int]:
    """Greedy hard NMS; returns kept indices, best first."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size and len(keep) < max_out:
        i = int(order[0])
        keep.append(i)
        if order.size == 1:
            break
        ious = iou_one_to_many(boxes[i], boxes[order[1:]])
        order = order[1:][ious <= iou_threshold]
    return keep


def make_detections(
    boxes_in: np.ndarray,
    scores: np.ndarray,
    class_ids: np.ndarray,
    labels: list[str],
    transform: Transform,
    keypoints_in: Optional[np.ndarray] = None,
) -> list[Detection]:
    """Boxes/keypoints in model-input pixels -> Detections in original-image pixels."""
    if len(boxes_in) == 0:
        return []
    boxes = transform.boxes_to_original(np.asarray(boxes_in, dtype=np.float64))
    kps = transform.points_to_original(np.asarray(keypoints_in, dtype=np.float64)) if keypoints_in is not None else None
    out = []
    for i in range(len(boxes)):
        cid = int(class_ids[i])
        out.append(
            Detection(
                label=label_for(labels, cid),
                class_id=cid,
                score=float(scores[i]),
                box=(float(boxes[i, 0]), float(boxes[i, 1]), float(boxes[i, 2]), float(boxes[i, 3])),
                keypoints=[(float(x), float(y)) for x, y in kps[i]] if kps is not None else None,
            )
        )
    return out
