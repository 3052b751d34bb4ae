"""db-text-map: a DBNet probability map (PP-OCR text detection) -> text boxes and the text-area summary."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from models.decoders.common import DecodeResult, MaskMap, make_detections, pick_output, valid_region
from models.decoders.segmentation import summarise
from models.preprocess import Transform


def decode(spec: Any, outputs: Mapping[str, np.ndarray], transform: Transform, labels: list[str]) -> DecodeResult:
    import cv2

    raw = np.asarray(pick_output(outputs, spec.output))
    prob = raw.reshape(raw.shape[-2:]).astype(np.float32)
    mh, mw = prob.shape
    binary = (prob > spec.score_threshold).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    # The map may be smaller than the input (stride); scale its pixels to model-input pixels.
    sx, sy = transform.in_w / mw, transform.in_h / mh
    boxes, scores = [], []
    for c in contours[: spec.max_boxes]:
        x, y, w, h = cv2.boundingRect(c)
        if min(w, h) < spec.min_size:
            continue
        mask = np.zeros((h, w), dtype=np.uint8)
        cv2.fillPoly(mask, [c - [x, y]], 1)
        score = float(cv2.mean(prob[y : y + h, x : x + w], mask)[0])
        if score < spec.box_threshold:
            continue
        # DB shrinks text regions when training; grow the box back by area * ratio / perimeter (the "unclip").
        d = (w * h) * spec.unclip_ratio / max(2 * (w + h), 1)
        boxes.append([(x - d) * sx, (y - d) * sy, (x + w + d) * sx, (y + h + d) * sy])
        scores.append(score)
    order = np.argsort(-np.asarray(scores), kind="stable") if scores else np.zeros(0, dtype=int)
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[order]
    s = np.asarray(scores, dtype=np.float64)[order]
    names = labels or ["background", "text"]
    region = valid_region(transform, mw, mh)
    return DecodeResult(
        detections=make_detections(b, s, np.ones(len(s), dtype=int), names, transform),
        mask=summarise(binary[region].astype(np.int64), names),
        mask_map=MaskMap(np.clip(prob[region] * 255.0 + 0.5, 0, 255).astype(np.uint8), "probability"),
    )
