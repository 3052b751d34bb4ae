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

from models.decoders.common import DecodeResult, iou_one_to_many, make_detections
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


def weighted_nms(boxes: np.ndarray, kps: np.ndarray, scores: np.ndarray, iou: float, max_out: int) -> list[tuple]:
    """MediaPipe's WEIGHTED overlap: each cluster becomes its score-weighted mean; its score is the best one's."""
    order = np.argsort(-scores, kind="stable")
    out = []
    while order.size and len(out) < max_out:
        top = order[0]
        overlap = iou_one_to_many(boxes[top], boxes[order])
        members = order[overlap > iou]
        w = scores[members][:, None]
        box = (boxes[members] * w).sum(axis=0) / w.sum()
        kp = (kps[members] * w[:, :, None]).sum(axis=0) / w.sum()
        out.append((box, kp, scores[top]))
        order = order[overlap <= iou]
    return out


def decode(spec: Any, outputs: Mapping[str, np.ndarray], transform: Transform, labels: list[str]) -> DecodeResult:
    size, _ = VARIANTS[spec.variant]
    reg, logits = _split(outputs)
    anc = anchors(spec.variant)
    if len(anc) != len(reg):
        raise ValueError(f"blazeface {spec.variant} expects {len(anc)} anchors, the model gives {len(reg)}")
    # Threshold in logit space (sigmoid is monotonic), so only the few anchors kept are converted and scored:
    # this runs once per image on the job's thread, beside the runtime.
    keep = np.nonzero(logits >= _logit(spec.score_threshold))[0]
    reg, anc = reg[keep].astype(np.float64), anc[keep]
    scores = 1.0 / (1.0 + np.exp(-np.clip(logits[keep].astype(np.float64), -100.0, 100.0)))
    keep = scores >= spec.score_threshold  # float rounding at the boundary: the same set as before
    reg, anc, scores = reg[keep], anc[keep], scores[keep]
    cx = reg[:, 0] / size + anc[:, 0]
    cy = reg[:, 1] / size + anc[:, 1]
    w = reg[:, 2] / size
    h = reg[:, 3] / size
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    kps = reg[:, 4:16].reshape(-1, 6, 2) / size + anc[:, None, :]
    merged = weighted_nms(boxes, kps, scores, spec.iou_threshold, spec.max_detections)
    if not merged:
        return DecodeResult()
    scale = np.array([transform.in_w, transform.in_h, transform.in_w, transform.in_h], dtype=np.float64)
    b = np.stack([m[0] for m in merged]) * scale
    k = np.stack([m[1] for m in merged]) * np.array([transform.in_w, transform.in_h], dtype=np.float64)
    s = np.array([m[2] for m in merged])
    labels = labels or ["face"]
    return DecodeResult(detections=make_detections(b, s, np.zeros(len(s), dtype=int), labels, transform, k))
