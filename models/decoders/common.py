"""Helpers shared by the decoders: NMS, output lookup, label lookup, building Detections."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

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


def box_areas(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def iou_rest(boxes: np.ndarray, areas: np.ndarray, i: int, rest: np.ndarray) -> np.ndarray:
    """IoU of ``boxes[i]`` with each of ``boxes[rest]``; ``areas`` from ``box_areas``, worked out once per NMS.

    NMS calls this once per kept box on the job's thread, so it is written for few numpy calls, and it gives the
    IoU values of the plain formula kept in tests/infer/reference.py: ``np.maximum(d, 0)`` is what
    ``np.clip(d, 0, None)`` computes in NumPy 2 (NumPy 1 may give a zero of the other sign, which compares the
    same against a threshold), and dividing only where the union is positive, 0 elsewhere, is what the two
    ``np.where`` there give. One exception, the same there: a box without area and its exact copies (below)."""
    b = boxes[rest]
    top = boxes[i]
    d = np.minimum(top[2:4], b[:, 2:4])  # x2, y2 of each intersection ...
    d -= np.maximum(top[0:2], b[:, 0:2])  # ... minus x1, y1: its width and height
    np.maximum(d, 0, out=d)
    inter = d[:, 0] * d[:, 1]
    union = areas[i] + areas[rest]
    union -= inter
    out = np.zeros(len(rest), dtype=np.float64)
    np.divide(inter, union, out=out, where=union > 0)
    if areas[i] == 0:
        # Two copies of a box without area have IoU 0/0, so the formula never lets NMS merge them: a cluster of
        # them came out as duplicates. Identical boxes have IoU 1 at every size, so that is their IoU here too.
        # Only the rare zero-area box pays for the comparison; boxes with area keep the formula's values.
        out[(b == top).all(axis=1)] = 1.0
    return out


def nms_candidates(boxes: np.ndarray, scores: np.ndarray,
                   finite: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What NMS works on: the boxes, their areas (``box_areas``), and the indices of the boxes it may pick, best
    score first (ties: lower index first).

    Left out: a non-finite score, a box with a non-finite coordinate (``finite``, when given, is checked instead
    of the boxes: rows that hold them and more, BlazeFace's boxes with their keypoints), and an inverted box
    (x2 < x1 or y2 < y1: it has no place in the image, and its IoU with itself is 0). NaN or inf would reach the
    results, which JSON cannot carry. The rows left out are zeros in the boxes returned, so that no arithmetic
    warns about them.

    A box with zero width or height but finite coordinates stays, once (iou_rest merges its exact copies): it is
    a place the model scored above the threshold, and results already hold such boxes, those clipped to nothing
    at the image's edge. Dropping it would lose a detection that the score alone would keep."""
    values = boxes if finite is None else finite
    order = np.argsort(-scores, kind="stable")
    # Whole-array checks first: the usual case, every box sane, costs a few numpy calls per image.
    if np.isfinite(values).all() and np.isfinite(scores).all() and (boxes[:, 2:4] >= boxes[:, 0:2]).all():
        return boxes, box_areas(boxes), order
    ok = np.isfinite(values).all(axis=1)
    ok &= np.isfinite(scores)
    boxes = np.where(ok[:, None], boxes, 0.0)
    ok &= (boxes[:, 2:4] >= boxes[:, 0:2]).all(axis=1)
    return boxes, box_areas(boxes), order[ok[order]]


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_out: int) -> list[int]:
    """Greedy hard NMS; returns kept indices, best first. The kept box leaves the candidates by its index, not
    by its IoU with itself, which is not above every threshold (at 1, or for a box without area)."""
    boxes, areas, order = nms_candidates(boxes, scores)
    keep: list[int] = []
    while order.size and len(keep) < max_out:
        i = int(order[0])
        keep.append(i)
        if order.size == 1:
            break
        rest = order[1:]
        order = rest[iou_rest(boxes, areas, i, rest) <= iou_threshold]
    return keep


def make_detections(
    boxes_in: np.ndarray,
    scores: np.ndarray,
    class_ids: np.ndarray,
    labels: list[str],
    transform: Transform,
    keypoints_in: Optional[np.ndarray] = None,
) -> list[Detection]:
    """Boxes/keypoints in model-input pixels -> Detections in original-image pixels.

    The arithmetic of ``Transform.boxes_to_original``/``points_to_original`` (subtract the padding, divide by
    the scale, clip boxes to the image) in fewer numpy calls, and the numbers leave numpy in one ``tolist`` each:
    this runs for every image on the job's thread."""
    if len(boxes_in) == 0:
        return []
    t = transform
    b = np.asarray(boxes_in, dtype=np.float64)
    # x and y columns apart, each clipped as one contiguous (N, 2) array: Transform.boxes_to_original's numbers
    # (np.clip may treat a zero's sign differently on other memory layouts, and "-0.0" would show in the results).
    # Boxes well inside the image, the usual case, skip the clip: it returns such values unchanged.
    bx = (b[:, 0::2] - t.pad_x) / t.scale_x
    xs = bx.tolist()
    if not _inside(xs, t.orig_w):
        xs = bx.clip(0, t.orig_w).tolist()
    by = (b[:, 1::2] - t.pad_y) / t.scale_y
    ys = by.tolist()
    if not _inside(ys, t.orig_h):
        ys = by.clip(0, t.orig_h).tolist()
    kps: Optional[list[Any]] = None
    if keypoints_in is not None:
        k = np.asarray(keypoints_in, dtype=np.float64)
        kps = ((k - (t.pad_x, t.pad_y)) / (t.scale_x, t.scale_y)).tolist()
    cids = [int(c) for c in np.asarray(class_ids).tolist()]
    s = np.asarray(scores).astype(np.float64, copy=False).tolist()
    # Detection's validation makes the box and the [x, y] pairs tuples, as the tuples once built here by hand.
    return [
        Detection(label=label_for(labels, cid), class_id=cid, score=s[i], box=(x[0], y[0], x[1], y[1]),
                  keypoints=kps[i] if kps is not None else None)
        for i, (cid, x, y) in enumerate(zip(cids, xs, ys))
    ]


def _inside(pairs: list[list[float]], hi: float) -> bool:
    """All values strictly between 0 and ``hi`` (false for NaN)."""
    return all(0 < a < hi and 0 < b < hi for a, b in pairs)
