"""blazeface: MediaPipe BlazeFace anchors decoding with weighted NMS.

Outputs: regressors [1, A, 16] (box centre offset and size, then 6 keypoints, in model-input pixels relative to
the anchor centre) and classificators [1, A, 1] (logits). Short range: 128x128 input, 896 anchors (16x16x2 at
stride 8, 8x8x6 at stride 16). Full range: 192x192, 2304 anchors (48x48x1 at stride 4). Anchor offset 0.5 and
fixed anchor size 1, as in MediaPipe's face_detection_*_range graphs.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np

from models.decoders.common import DecodeResult, iou_rest, make_detections, nms_candidates
from models.preprocess import Transform

# variant -> (input size, [(stride, anchors per cell)])
VARIANTS = {
    "short": (128, [(8, 2), (16, 6)]),
    "full": (192, [(4, 1)]),
}


@lru_cache(maxsize=4)
def anchors(variant: str) -> np.ndarray:
    """(A, 2) anchor centres in 0..1."""
    size, layers = VARIANTS[variant]
    out = []
    for stride, per_cell in layers:
        n = size // stride
        ys, xs = np.meshgrid((np.arange(n) + 0.5) / n, (np.arange(n) + 0.5) / n, indexing="ij")
        centres = np.stack([xs.ravel(), ys.ravel()], axis=1)
        out.append(np.repeat(centres, per_cell, axis=0))
    return np.concatenate(out).astype(np.float64)


def _split(outputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The regressors ``[A,16]`` and logits ``[A]`` as views in the runtime's dtype (converted after thresholding)."""
    reg = cls = None
    for a in outputs.values():
        if a.shape[-1] == 16:
            reg = a
        elif a.shape[-1] == 1:
            cls = a
    if reg is None or cls is None:
        raise ValueError(f"blazeface needs [1,A,16] and [1,A,1] outputs, got {[a.shape for a in outputs.values()]}")
    return reg.reshape(-1, 16), cls.reshape(-1)


def _logit(p: float) -> float:
    if p <= 0.0:
        return -np.inf
    if p >= 1.0:
        return np.inf
    # A hair below the exact logit: rounding must never drop an anchor whose score is at the threshold.
    return float(np.log(p / (1.0 - p))) - 1e-6


@lru_cache(maxsize=16)
def _plan(variant: str, score_threshold: float) -> tuple[int, np.ndarray, float]:
    """What one decoder spec needs for every image, worked out once: input size, anchors, threshold as a logit."""
    return VARIANTS[variant][0], anchors(variant), _logit(score_threshold)


def weighted_nms(geo: np.ndarray, scores: np.ndarray, iou: float, max_out: int) -> tuple[np.ndarray, list[float]]:
    """MediaPipe's WEIGHTED overlap on rows of x1, y1, x2, y2 then the keypoints: each cluster becomes its
    score-weighted mean, with the score of its best member. Returns the merged rows and their scores.

    The weighted sums run down the rows (axis 0) of one array, box and keypoints together: NumPy adds each column
    in row order, exactly as when boxes and keypoints were summed apart. Rows that NMS cannot handle (not finite,
    inverted) are left out by ``nms_candidates``."""
    boxes, areas, order = nms_candidates(geo[:, :4], scores, geo)
    # Each cluster takes at least its top row out of ``order``: never more clusters than rows.
    out = np.empty((min(len(order), max_out), geo.shape[1]), dtype=np.float64)
    best: list[float] = []
    while order.size and len(best) < max_out:
        top = order[0]
        member = iou_rest(boxes, areas, top, order) > iou
        # The top row is in its own cluster by its place, not by its IoU with itself, which is not above every
        # threshold (at 1, or for a box without area): else it stayed on top, a NaN mean of no rows, until max_out.
        member[0] = True
        members = order[member]
        w = scores[members][:, None]
        np.divide(np.add.reduce(geo[members] * w, axis=0), np.add.reduce(w, axis=None), out=out[len(best)])
        best.append(float(scores[top]))
        order = order[~member]
    return out[: len(best)], best


def decode(spec: Any, outputs: Mapping[str, np.ndarray], transform: Transform, labels: list[str]) -> DecodeResult:
    size, anc, cut = _plan(spec.variant, spec.score_threshold)
    reg, logits = _split(outputs)
    if len(anc) != len(reg):
        raise ValueError(f"blazeface {spec.variant} expects {len(anc)} anchors, the model gives {len(reg)}")
    # Threshold in logit space (sigmoid is monotonic), so only the few anchors kept are converted and scored:
    # this runs once per image on the job's thread, beside the runtime. Most images have no face: nothing kept.
    keep = (logits >= cut).nonzero()[0]
    if not keep.size:
        return DecodeResult()
    # Kept logits are never NaN (NaN >= cut is false), so the clip to +-100 can be maximum/minimum, whose only
    # difference from np.clip (the sign of a zero) vanishes in exp.
    z = np.minimum(np.maximum(logits[keep].astype(np.float64), -100.0), 100.0)
    scores = 1.0 / (1.0 + np.exp(-z))
    ok = scores >= spec.score_threshold  # float rounding at the boundary: the same set as before
    keep, scores = keep[ok], scores[ok]
    if not keep.size:
        return DecodeResult()
    a = anc[keep]
    geo = reg[keep].astype(np.float64)
    geo /= size  # box centre, box size, 6 keypoints: in 0..1 of the input
    xy = geo.reshape(-1, 8, 2)  # a view: the (x, y) pairs of each row, turned into x1 y1, x2 y2, keypoints
    np.add(xy[:, 2:], a[:, None, :], out=xy[:, 2:])
    centre = xy[:, 0] + a
    half = xy[:, 1] / 2
    np.subtract(centre, half, out=xy[:, 0])
    np.add(centre, half, out=xy[:, 1])
    merged, best = weighted_nms(geo, scores, spec.iou_threshold, spec.max_detections)
    if not best:
        return DecodeResult()
    merged *= _input_scale(transform.in_w, transform.in_h)
    labels = labels or ["face"]
    return DecodeResult(detections=make_detections(merged[:, :4], best, [0] * len(best), labels, transform,
                                                   merged[:, 4:].reshape(-1, 6, 2)))


@lru_cache(maxsize=8)
def _input_scale(in_w: int, in_h: int) -> np.ndarray:
    """0..1 of the input -> input pixels, for a merged row (box, then keypoints): x by the width, y by the height."""
    out = np.array([in_w, in_h] * 8, dtype=np.float64)
    out.flags.writeable = False
    return out
