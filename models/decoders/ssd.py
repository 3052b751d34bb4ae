"""ssd: the 4 outputs of TFLite_Detection_PostProcess (Coral/TF Object Detection models).

boxes [1,N,4] as ymin,xmin,ymax,xmax in 0..1 of the model input; classes [1,N]; scores [1,N]; count [1].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from models.decoders.common import DecodeResult, make_detections
from models.preprocess import Transform

# Tensor names the TFLite converter gives the post-processing op's outputs.
STANDARD_NAMES = {
    "boxes": "TFLite_Detection_PostProcess",
    "classes": "TFLite_Detection_PostProcess:1",
    "scores": "TFLite_Detection_PostProcess:2",
    "count": "TFLite_Detection_PostProcess:3",
}


def resolve_roles(spec: Any, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if spec.outputs:
        return {role: outputs[name] for role, name in spec.outputs.items()}
    if all(n in outputs for n in STANDARD_NAMES.values()):
        return {role: outputs[n] for role, n in STANDARD_NAMES.items()}
    arrays = list(outputs.values())
    if len(arrays) != 4:
        raise ValueError(f"ssd decoder needs 4 outputs (boxes, classes, scores, count), got {len(arrays)}")
    boxes = next(a for a in arrays if a.ndim >= 2 and a.shape[-1] == 4)
    count = next(a for a in arrays if a.size == 1)
    rest = [a for a in arrays if a is not boxes and a is not count]
    # classes vs scores: scores lie in 0..1; class ids above 1 give classes away. Else keep the converter's order.
    if rest[0].max(initial=0) <= 1.0 < rest[1].max(initial=0):
        rest.reverse()
    return {"boxes": boxes, "classes": rest[0], "scores": rest[1], "count": count}


def decode(spec: Any, outputs: Mapping[str, np.ndarray], transform: Transform, labels: list[str]) -> DecodeResult:
    r = resolve_roles(spec, outputs)
    n = int(np.asarray(r["count"]).reshape(-1)[0])
    boxes = np.asarray(r["boxes"]).reshape(-1, 4)[:n].astype(np.float64)
    classes = np.asarray(r["classes"]).reshape(-1)[:n]
    scores = np.asarray(r["scores"]).reshape(-1)[:n].astype(np.float64)
    # NaN or inf in a box or score would reach the results, which JSON cannot carry: such rows are no detection.
    keep = (scores >= spec.score_threshold) & np.isfinite(scores) & np.isfinite(boxes).all(axis=1)
    boxes, classes, scores = boxes[keep], classes[keep], scores[keep]
    # ymin,xmin,ymax,xmax in 0..1 -> x1,y1,x2,y2 in model-input pixels.
    scale = np.array([transform.in_w, transform.in_h, transform.in_w, transform.in_h], dtype=np.float64)
    xyxy = boxes[:, [1, 0, 3, 2]] * scale
    ids = np.rint(classes).astype(int) + spec.label_offset
    order = np.argsort(-scores, kind="stable")
    return DecodeResult(detections=make_detections(xyxy[order], scores[order], ids[order], labels, transform))
