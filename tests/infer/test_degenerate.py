"""Degenerate boxes in a real BlazeFace's outputs: boxes without area (several copies of one), NaN and inf in the
regressors and logits, boxes at the image's edge. No duplicates, no NaN or inf anywhere in the results (JSON cannot
carry them), ``max_detections`` respected, and the real faces found as without the edits.

The old weighted NMS kept a box without area (or a NaN one) on top of the candidates, because its IoU with itself
is 0 and not above the threshold: it came out again and again, as NaN, until ``max_detections``."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np
import pytest

from accelerators.base import InferenceResult
from agent.inference.params import ImageItem, InferParams
from agent.inference.predict import Predictor
from models.decoders import decode
from models.decoders.blazeface import anchors
from models.runtime import Pipeline
from tests.infer.recorded import Recorded, load, pictures, record

SIZE = 128  # BlazeFace short range: input pixels, the unit of the regressors


@pytest.fixture(scope="module")
def blazeface() -> Iterator[tuple[Pipeline, list[Recorded]]]:
    """The real model's outputs for the astronaut and the group of three astronauts (pictures() 0 and 10)."""
    pipeline = load("blazeface")
    jpegs = pictures(11, seed=1)
    try:
        yield pipeline, record(pipeline, [jpegs[0], jpegs[10]])
    finally:
        pipeline.model.close()


def at(x: float, y: float) -> np.ndarray:
    """The anchors centred at (x, y) in 0..1 of the input: 2 at stride 8, 6 at stride 16."""
    found = np.flatnonzero((np.abs(anchors("short") - (x, y)) < 1e-9).all(axis=1))
    assert len(found) in (2, 6), (x, y)
    return found


def put(reg: np.ndarray, idx: np.ndarray, cx: float, cy: float, w: float, h: float) -> None:
    """Rows ``idx`` regress to one box: centre (cx, cy) in 0..1, size w x h in input pixels, the 6 keypoints at
    the centre. Anchors that share a centre get the same numbers: exact copies."""
    anc = anchors("short")[idx]
    centre = np.array([cx, cy])
    reg[idx, 0:2] = (centre - anc) * SIZE
    reg[idx, 2:4] = (w, h)
    reg[idx, 4:16] = np.tile((centre - anc) * SIZE, 6)


def degenerate(outputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A copy of ``outputs`` with a degenerate cluster, far from the faces; also the anchors it edits."""
    reg = outputs["regressors"].reshape(-1, 16).copy()
    logits = outputs["classificators"].reshape(-1).copy()
    zero_w = at(13 / 16, 13 / 16)  # 6 anchors, bottom right: copies of a box of zero width
    put(reg, zero_w, 13 / 16, 13 / 16, 0.0, 18.0)
    logits[zero_w] = np.linspace(3.0, 1.0, 6)
    point = at(25 / 32, 21 / 32)  # 2 anchors: copies of a box of zero width and height
    put(reg, point, 25 / 32, 21 / 32, 0.0, 0.0)
    logits[point] = 2.0
    edge = at(1 / 32, 17 / 32)  # 2 anchors, left edge: copies of a box of zero width on the edge
    put(reg, edge, 0.0, 17 / 32, 0.0, 16.0)
    logits[edge] = 1.5
    half_out = at(1 / 32, 5 / 32)[:1]  # left edge: half of it outside the picture
    put(reg, half_out, 0.0, 5 / 32, 24.0, 24.0)
    logits[half_out] = 1.2
    sure = at(31 / 32, 9 / 32)[:1]  # right edge, logit +inf: score 1
    put(reg, sure, 1.0, 9 / 32, 20.0, 20.0)
    logits[sure] = np.inf
    inverted = at(5 / 32, 27 / 32)  # 2 anchors: negative width, and negative width and height (positive area)
    put(reg, inverted, 5 / 32, 27 / 32, -12.0, 16.0)
    reg[inverted[1], 3] = -16.0
    logits[inverted] = 2.5
    broken = at(9 / 16, 15 / 16)  # 6 anchors, scoring above the faces: NaN and inf in boxes and keypoints
    put(reg, broken, 9 / 16, 15 / 16, 20.0, 20.0)
    reg[broken[0], 0] = np.nan
    reg[broken[1], 2] = np.inf
    reg[broken[2], 3] = -np.inf
    reg[broken[3], 9] = np.nan
    reg[broken[4], 1] = np.inf
    logits[broken[:5]] = 6.0
    logits[broken[5]] = np.nan
    edited = np.concatenate([zero_w, point, edge, half_out, sure, inverted, broken])
    out = {"regressors": reg.reshape(outputs["regressors"].shape),
           "classificators": logits.reshape(outputs["classificators"].shape)}
    return out, edited


EXTRA = 5  # detections the edits add: zero_w, point, edge, half_out and sure, once each; inverted and broken, none


def item(pipeline: Pipeline, rec: Recorded, outputs: dict[str, np.ndarray], **params: Any) -> dict[str, Any]:
    """The agent's item dict (Predictor.finish, then dump) for ``outputs``."""
    p = InferParams(model="blazeface", images=[ImageItem(id="x", path="x")], **params)
    res = InferenceResult(outputs, rec.res.infer_ms, rec.res.backend, rec.res.device)
    return Predictor(pipeline, p).finish(rec.prep, res)[0].dump()


def values(d: dict[str, Any]) -> list[float]:
    return [d["score"], *d["box"], *(v for kp in d.get("keypoints") or [] for v in kp)]


def assert_sane(it: dict[str, Any], limit: int) -> None:
    dets = it["detections"]
    json.dumps(it, allow_nan=False)  # raises ValueError on NaN or inf
    assert all(math.isfinite(v) for d in dets for v in values(d)), dets
    boxes = [tuple(d["box"]) for d in dets]
    assert len(set(boxes)) == len(boxes), f"duplicates: {boxes}"
    assert all(x1 <= x2 and y1 <= y2 for x1, y1, x2, y2 in boxes), boxes
    assert len(dets) <= limit


@pytest.mark.parametrize("threshold", [None, 0.3])
@pytest.mark.filterwarnings("error::RuntimeWarning")  # a 0/0 (NaN mean of a cluster without rows) fails
def test_degenerate_cluster_in_real_outputs(blazeface: tuple[Pipeline, list[Recorded]],
                                            threshold: Optional[float]) -> None:
    pipeline, recs = blazeface
    faces = 0
    for rec in recs:
        outputs, edited = degenerate(rec.res.outputs)
        # The edits take anchors that saw nothing (score < 0.1): the faces' clusters keep all their members.
        assert (rec.res.outputs["classificators"].reshape(-1)[edited] < -2.2).all()
        before = item(pipeline, rec, rec.res.outputs, threshold=threshold)["detections"]
        after = item(pipeline, rec, outputs, threshold=threshold)
        assert_sane(after, 100)
        got = after["detections"]
        assert [d for d in got if d in before] == before  # the faces, exactly as without the edits, in order
        assert len(got) == len(before) + EXTRA
        # One detection of zero width on the left edge (the 2 copies), one with half its box cut off there.
        assert sum(d["box"][0] == d["box"][2] == 0.0 for d in got) == 1
        assert sum(d["box"][0] == 0.0 < d["box"][2] for d in got) == 1
        assert got[0]["score"] == 1.0 and got[0]["box"][2] == rec.prep.width  # logit +inf, clipped to the width
        faces += len(before)
    assert faces >= 2  # the comparison is not of empty lists


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_max_detections_on_degenerate_outputs(blazeface: tuple[Pipeline, list[Recorded]]) -> None:
    """The decoder's cap and the request's both hold; the cap keeps the first clusters of the uncapped run."""
    pipeline, recs = blazeface
    rec = recs[1]
    outputs, _ = degenerate(rec.res.outputs)
    spec = pipeline.manifest.decoder.model_copy(update={"score_threshold": 0.3})
    full = [d.model_dump() for d in decode(spec, outputs, rec.prep.transform, pipeline.labels).detections]
    assert len(full) > EXTRA
    for cap in (1, 2, EXTRA, len(full) + 3):
        capped = spec.model_copy(update={"max_detections": cap})
        got = [d.model_dump() for d in decode(capped, outputs, rec.prep.transform, pipeline.labels).detections]
        assert got == full[:cap]
    for cap in (1, 3):
        it = item(pipeline, rec, outputs, threshold=0.3, max_detections=cap)
        assert_sane(it, cap)
        assert len(it["detections"]) == cap


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_iou_threshold_one_on_real_outputs(blazeface: tuple[Pipeline, list[Recorded]]) -> None:
    """At IoU threshold 1 no box merges with another, and none with itself by IoU: each anchor above the
    threshold is one detection (the old code repeated the best one, as NaN, up to max_detections)."""
    pipeline, recs = blazeface
    for rec in recs:
        spec = pipeline.manifest.decoder.model_copy(update={"score_threshold": 0.3, "iou_threshold": 1.0})
        logits = rec.res.outputs["classificators"].reshape(-1).astype(np.float64)
        above = int((1.0 / (1.0 + np.exp(-logits)) >= 0.3).sum())
        dets = decode(spec, rec.res.outputs, rec.prep.transform, pipeline.labels).detections
        assert above >= 2 and len(dets) == above
        assert all(math.isfinite(v) for d in dets for v in (d.score, *d.box)), dets
        assert len({d.box for d in dets}) == len(dets)
