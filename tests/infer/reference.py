"""The job thread's per-image path as it was before it was made cheaper (commit 26c6f89): output decoders with
per-detection Python loops and NMS row by row, then a validated ``ItemResult`` and its ``dump()``.

Kept here, apart from the code it checks, as the reference that the fast path must match byte for byte
(tests/infer/test_result_identity.py) and as the "before" figure of bench/bench_results.py. Only what the fast
path rewrote is copied; helpers that did not change (output lookup, anchors, role and layout detection, mask
summary) are imported from the decoders themselves.

One deliberate deviation from the old code: degenerate boxes (the lines marked "degenerate boxes", below). The
old weighted NMS relied on a box's IoU with itself being above the threshold to take it out of the candidates.
A box without area, an inverted one or one with NaN or inf coordinates has IoU 0 with itself, and at the
threshold 1 no IoU is above it: the box then stayed on top and came out again and again, as the NaN mean of no
rows, until ``max_detections``. NaN or inf boxes and scores also went into the results of the other decoders,
where JSON cannot carry them, and copies of a box without area (IoU 0/0) all stayed. Both paths now leave out
non-finite and inverted boxes and non-finite scores before NMS, put the top box in its own cluster by its place,
and count exact copies of a box without area as IoU 1, so that they merge into one detection. On inputs without
such boxes, and with an IoU threshold below 1, each of these lines gives what the old code gave: the real
models' results and the other generated cases are still the old code's, byte for byte."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

from agent.inference.params import InferParams, ItemResult
from models.decoders.blazeface import VARIANTS, _split, anchors
from models.decoders.classify import softmax
from models.decoders.common import DecodeResult, MaskMap, label_for, pick_output, valid_region
from models.decoders.segmentation import class_map, summarise
from models.decoders.ssd import resolve_roles
from models.decoders.yolo import rows
from models.preprocess import Transform
from models.results import ClassScore, Detection

# -- models/decoders/common.py --------------------------------------------------------------------------------


def iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    out = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    if area == 0:  # degenerate boxes: identical boxes have IoU 1, also without area
        out[np.all(boxes == box, axis=1)] = 1.0
    return out


def candidates(boxes: np.ndarray, scores: np.ndarray, rows: Optional[np.ndarray] = None) -> np.ndarray:
    """Degenerate boxes: the indices by score, best first, of the rows NMS can handle (finite score, finite box
    that is not inverted; finite ``rows`` values too, when given). A few whole-array numpy calls, so that the
    "before" figure of bench/bench_results.py stays close to the old code's."""
    sane = np.isfinite(scores) & np.isfinite(boxes).all(axis=1)
    sane &= (boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])
    if rows is not None:
        sane &= np.isfinite(rows).all(axis=1)
    order = np.argsort(-scores, kind="stable")
    return order[sane[order]]


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_out: int) -> list[int]:
    order = candidates(boxes, scores)  # degenerate boxes: was np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size and len(keep) < max_out:
        i = int(order[0])
        keep.append(i)
        if order.size == 1:
            break
        ious = iou_one_to_many(boxes[i], boxes[order[1:]])
        order = order[1:][ious <= iou_threshold]
    return keep


def make_detections(boxes_in: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, labels: list[str],
                    transform: Transform, keypoints_in: Optional[np.ndarray] = None) -> list[Detection]:
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


# -- models/decoders/blazeface.py -----------------------------------------------------------------------------


def _logit(p: float) -> float:
    if p <= 0.0:
        return -np.inf
    if p >= 1.0:
        return np.inf
    return float(np.log(p / (1.0 - p))) - 1e-6


def weighted_nms(boxes: np.ndarray, kps: np.ndarray, scores: np.ndarray, iou: float, max_out: int) -> list[tuple]:
    order = candidates(boxes, scores, kps.reshape(len(kps), 12))  # degenerate boxes: was np.argsort
    out = []
    while order.size and len(out) < max_out:
        top = order[0]
        overlap = iou_one_to_many(boxes[top], boxes[order])
        member = overlap > iou
        member[0] = True  # degenerate boxes: the top is in its own cluster whatever its IoU with itself
        members = order[member]
        w = scores[members][:, None]
        box = (boxes[members] * w).sum(axis=0) / w.sum()
        kp = (kps[members] * w[:, :, None]).sum(axis=0) / w.sum()
        out.append((box, kp, scores[top]))
        order = order[~member]  # degenerate boxes: was order[overlap <= iou]
    return out


def decode_blazeface(spec: Any, outputs: Mapping[str, np.ndarray], transform: Transform,
                     labels: list[str]) -> DecodeResult:
    size, _ = VARIANTS[spec.variant]
    reg, logits = _split(outputs)
    anc = anchors(spec.variant)
    if len(anc) != len(reg):
        raise ValueError(f"blazeface {spec.variant} expects {len(anc)} anchors, the model gives {len(reg)}")
    keep = np.nonzero(logits >= _logit(spec.score_threshold))[0]
    reg, anc = reg[keep].astype(np.float64), anc[keep]
    scores = 1.0 / (1.0 + np.exp(-np.clip(logits[keep].astype(np.float64), -100.0, 100.0)))
    keep = scores >= spec.score_threshold
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


# -- the other decoders ---------------------------------------------------------------------------------------


def decode_softmax(spec: Any, outputs: Mapping[str, np.ndarray], transform: Transform,
                   labels: list[str]) -> DecodeResult:
    scores = pick_output(outputs, spec.output).reshape(-1).astype(np.float64)
    if spec.apply_softmax:
        scores = softmax(scores)
    order = np.argsort(-scores, kind="stable")[: spec.top_k]
    return DecodeResult(
        classes=[
            ClassScore(label=label_for(labels, int(i)), class_id=int(i), score=float(scores[i]))
            for i in order
            if scores[i] >= spec.score_threshold
        ]
    )


def decode_ssd(spec: Any, outputs: Mapping[str, np.ndarray], transform: Transform, labels: list[str]) -> DecodeResult:
    r = resolve_roles(spec, outputs)
    n = int(np.asarray(r["count"]).reshape(-1)[0])
    boxes = np.asarray(r["boxes"]).reshape(-1, 4)[:n].astype(np.float64)
    classes = np.asarray(r["classes"]).reshape(-1)[:n]
    scores = np.asarray(r["scores"]).reshape(-1)[:n].astype(np.float64)
    keep = scores >= spec.score_threshold
    keep &= np.isfinite(scores) & np.isfinite(boxes).all(axis=1)  # degenerate boxes: not in the old code
    boxes, classes, scores = boxes[keep], classes[keep], scores[keep]
    scale = np.array([transform.in_w, transform.in_h, transform.in_w, transform.in_h], dtype=np.float64)
    xyxy = boxes[:, [1, 0, 3, 2]] * scale
    ids = np.rint(classes).astype(int) + spec.label_offset
    order = np.argsort(-scores, kind="stable")
    return DecodeResult(detections=make_detections(xyxy[order], scores[order], ids[order], labels, transform))


def decode_yolo(spec: Any, outputs: Mapping[str, np.ndarray], transform: Transform, labels: list[str]) -> DecodeResult:
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
    offset = ids[:, None] * (max(transform.in_w, transform.in_h) * 4.0)
    kept = nms(boxes + offset, scores, spec.iou_threshold, spec.max_detections)
    return DecodeResult(detections=make_detections(boxes[kept], scores[kept], ids[kept], labels, transform))


def decode_segmentation(spec: Any, outputs: Mapping[str, np.ndarray], transform: Transform,
                        labels: list[str]) -> DecodeResult:
    cmap = class_map(pick_output(outputs, spec.output), spec.score_threshold)
    rws, cols = valid_region(transform, cmap.shape[1], cmap.shape[0])
    shown = cmap[rws, cols]
    png = MaskMap(shown.astype(np.uint8), "class_ids") if shown.size and int(shown.max()) <= 255 else None
    return DecodeResult(mask=summarise(shown, labels), mask_map=png)


def decode_dbtext(spec: Any, outputs: Mapping[str, np.ndarray], transform: Transform,
                  labels: list[str]) -> DecodeResult:
    import cv2

    raw = np.asarray(pick_output(outputs, spec.output))
    prob = raw.reshape(raw.shape[-2:]).astype(np.float32)
    mh, mw = prob.shape
    binary = (prob > spec.score_threshold).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
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


DECODERS = {
    "softmax": decode_softmax,
    "ssd": decode_ssd,
    "yolo": decode_yolo,
    "blazeface": decode_blazeface,
    "segmentation-argmax": decode_segmentation,
    "db-text-map": decode_dbtext,
}


def decode(spec: Any, outputs: Mapping[str, np.ndarray], transform: Transform, labels: list[str]) -> DecodeResult:
    return DECODERS[spec.type](spec, outputs, transform, labels)


# -- agent/inference/predict.py: Predictor.__init__ and finish, then the batch loop's res.dump() -----------------


def decoder_spec(manifest_decoder: Any, params: InferParams) -> Any:
    spec = manifest_decoder
    if params.threshold is not None and hasattr(spec, "score_threshold"):
        spec = spec.model_copy(update={"score_threshold": params.threshold})
    if params.top_k is not None and hasattr(spec, "top_k"):
        spec = spec.model_copy(update={"top_k": params.top_k})
    return spec


def _detection(d: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"label": d.label, "score": round(float(d.score), 5),
                           "box": [round(float(v), 1) for v in d.box]}
    if d.keypoints:
        out["keypoints"] = [[round(float(x), 1), round(float(y), 1)] for x, y in d.keypoints]
    return out


def _mask(dec: Any) -> Optional[dict[str, Any]]:
    if dec.mask is None:
        return None
    out = dec.mask.model_dump()
    if dec.mask_map is not None:
        out["png_kind"] = dec.mask_map.kind
    return out


def item(spec: Any, params: InferParams, task: str, labels: list[str], item_id: str, width: int, height: int,
         outputs: Mapping[str, np.ndarray], transform: Transform, infer_ms: float) -> dict[str, Any]:
    """One image's item dict as the old ``Predictor.finish`` + ``res.dump()`` made it (``spec``: from
    ``decoder_spec``)."""
    classes_kept = set(params.classes) if params.classes else None

    def keep(label: str, score: float) -> bool:
        if classes_kept is not None and label not in classes_kept:
            return False
        return params.threshold is None or score >= params.threshold

    dec = decode(spec, outputs, transform, labels)
    dets = [d for d in dec.detections if keep(d.label, d.score)]
    dets.sort(key=lambda d: d.score, reverse=True)
    if params.max_detections is not None:
        dets = dets[: params.max_detections]
    classes = [c for c in dec.classes if keep(c.label, c.score)]
    classes.sort(key=lambda c: c.score, reverse=True)
    if params.top_k is not None:
        classes = classes[: params.top_k]
    out = ItemResult(
        id=item_id, ok=True, width=width, height=height,
        detections=[_detection(d) for d in dets] if (task == "detection" or dets) else None,
        classes=[{"label": c.label, "score": round(c.score, 5)} for c in classes] if task == "classification"
        else None,
        mask=_mask(dec),
        inference_ms=round(infer_ms, 3),
    )
    return out.dump()
