"""yolo: v5 [1, N, 5+C] (cx,cy,w,h,objectness,classes...) or v8 [1, 4+C, N] (cx,cy,w,h,classes...)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from models.decoders.common import DecodeResult, make_detections, nms, pick_output
from models.preprocess import Transform


def rows(arr: np.ndarray, version: str, num_classes: int = 0) -> np.ndarray:
    """Predictions as rows (N, 4+[1]+C), whichever way round the exporter wrote them.

    Ultralytics writes v8 as [1, 4+C, N] and v5 as [1, N, 5+C], but re-exports flip them; when the number of
    classes is known (the labels), the axis of length 4+C (v8) or 5+C (v5) is the attribute axis.
    """
    a = np.asarray(arr)
    if a.ndim == 3:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"yolo output must be [1,N,K] or [1,K,N], got {arr.shape}")
    k = num_classes + (5 if version == "v5" else 4) if num_classes else 0
    if k and a.shape[1] == k:
        pass
    elif k and a.shape[0] == k:
        a = a.T
    elif a.shape[0] < a.shape[1]:  # unknown classes: there are far more candidates than attributes
        a = a.T
    min_k = 6 if version == "v5" else 5
    if a.shape[1] < min_k:
        raise ValueError(f"yolo {version} rows need at least {min_k} values, got {a.shape[1]}")
    return a


def decode(spec: Any, outputs: Mapping[str, np.ndarray], transform: Transform, labels: list[str]) -> DecodeResult:
    a = rows(pick_output(outputs, spec.output), spec.version, len(labels)).astype(np.float64)
    if spec.version == "v5":
        cls = a[:, 5:]
        ids = cls.argmax(axis=1)
        scores = a[:, 4] * cls[np.arange(len(a)), ids]
    else:
        cls = a[:, 4:]
        ids = cls.argmax(axis=1)
        scores = cls[np.arange(len(a)), ids]
    keep = scores >= spec.score_threshold
    a, ids, scores = a[keep], ids[keep], scores[keep]
    cx, cy, w, h = a[:, 0], a[:, 1], a[:, 2], a[:, 3]
    if spec.normalized:
        cx, w = cx * transform.in_w, w * transform.in_w
        cy, h = cy * transform.in_h, h * transform.in_h
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1) if len(a) else np.zeros((0, 4))
    # Class-aware NMS in one pass: shift each class to its own region so boxes of different classes never overlap.
    offset = ids[:, None] * (max(transform.in_w, transform.in_h) * 4.0)
    kept = nms(boxes + offset, scores, spec.iou_threshold, spec.max_detections)
    return DecodeResult(detections=make_detections(boxes[kept], scores[kept], ids[kept], labels, transform))
