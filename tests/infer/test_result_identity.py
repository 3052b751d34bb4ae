"""The job thread's fast per-image path (``Predictor.finish`` + ``dump()``, the vectorised decoders) gives, byte for
byte, the item dicts of the plain path it replaced (tests/infer/reference.py): same keys in the same order, same
types, same rounded values. Checked on real models' outputs for real pictures, then on generated outputs that
push each decoder family into its corners (crowded clusters, ties, degenerate boxes, letterboxing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from accelerators.base import InferenceResult
from agent.inference.params import ImageItem, InferParams
from agent.inference.predict import Predictor, Prepared
from models.decoders import decode
from models.manifest import (
    BlazeFaceDecoder,
    InputSpec,
    ModelManifest,
    SegmentationDecoder,
    SoftmaxDecoder,
    SSDDecoder,
    YoloDecoder,
)
from models.preprocess import Transform, prepare
from models.runtime import Pipeline
from tests.infer import reference
from tests.infer.recorded import Recorded, load, pictures, record

# Request variants: the model's own settings, a low threshold (many more detections, wide clusters), a cap on
# detections, a class filter, a top_k.
VARIANTS: list[dict[str, Any]] = [
    {},
    {"threshold": 0.05},
    {"threshold": 0.3, "max_detections": 1},
    {"classes": ["face", "text", "180"], "threshold": 0.2},
    {"classes": ["no-such-label"]},
    {"top_k": 1},
]


def params_for(model: str, variant: dict[str, Any]) -> InferParams:
    return InferParams(model=model, images=[ImageItem(id="x", path="x")], **variant)


def check_identical(pipeline: Any, params: InferParams, recs: list[Recorded]) -> tuple[int, int]:
    """Asserts that each recorded image gives the same item dict and the same decoded detections (the ones
    drawn) both ways; returns (items with results, results in all)."""
    predictor = Predictor(pipeline, params)
    spec = reference.decoder_spec(pipeline.manifest.decoder, params)
    m = pipeline.manifest
    with_results = total = 0
    for r in recs:
        p = r.prep
        res, dec = predictor.finish(p, r.res)
        got = res.dump()
        want = reference.item(spec, params, m.task, pipeline.labels, p.item.id, p.width, p.height, r.res.outputs,
                              p.transform, r.res.infer_ms)
        # repr, not ==: it tells 1 from 1.0, a tuple from a list, -0.0 from 0.0, and sees the keys' order.
        assert repr(got) == repr(want), f"{m.name} {p.item.id}"
        drawn = [d.model_dump() for d in dec.detections]
        assert len(drawn) == len(want.get("detections") or [])
        n = len(want.get("detections") or want.get("classes") or [])
        with_results += n > 0
        total += n
    return with_results, total


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return pictures(36, seed=7)


@pytest.mark.parametrize("model", ["blazeface", "blazeface-full", "ppocr-det", "ppocr-cls"])
def test_items_identical_on_real_models(model: str, jpegs: list[bytes]) -> None:
    pipeline = load(model)
    try:
        recs = record(pipeline, jpegs)
        counts = {}
        for variant in VARIANTS:
            counts[str(variant)] = check_identical(pipeline, params_for(model, variant), recs)
    finally:
        pipeline.model.close()
    # Not a comparison of empty lists: the model's own settings find things on several pictures, and so does the
    # low threshold (more faces; for ppocr-det it is the pixel threshold: fewer, larger text boxes).
    assert counts[str({})][0] >= 3, counts
    assert counts[str(VARIANTS[1])][0] >= 3, counts


def identical_decodes(spec: Any, outputs: dict[str, np.ndarray], tf: Transform, labels: list[str]) -> int:
    """The decoders and the finished items agree on ``outputs``; returns how many results there were."""
    got, want = decode(spec, outputs, tf, labels), reference.decode(spec, outputs, tf, labels)
    assert repr([d.model_dump() for d in got.detections]) == repr([d.model_dump() for d in want.detections])
    assert repr([c.model_dump() for c in got.classes]) == repr([c.model_dump() for c in want.classes])
    assert repr(got.mask) == repr(want.mask)
    assert (got.mask_map is None) == (want.mask_map is None)
    task = {"softmax": "classification", "segmentation-argmax": "segmentation"}.get(spec.type, "detection")
    pipeline = generated_pipeline(spec, labels, task)
    params = params_for("generated", {})
    p = Prepared(ImageItem(id="i", path="x"), tf.orig_w, tf.orig_h, None, tf, None, 0.0, 0.0)
    item = Predictor(pipeline, params).finish(p, InferenceResult(outputs, 1.25, "generated", "CPU"))[0].dump()
    ref = reference.item(spec, params, task, labels, "i", tf.orig_w, tf.orig_h, outputs, tf, 1.25)
    assert repr(item) == repr(ref)
    return len(want.detections) + len(want.classes)


def generated_pipeline(spec: Any, labels: list[str], task: str) -> Pipeline:
    """A pipeline around ``spec`` with no runtime loaded: ``finish`` only decodes outputs, here generated ones."""
    manifest = ModelManifest(name="generated", version="1", task=task, input=InputSpec(width=8, height=8),
                             files={"onnx": {"path": "none.onnx", "sha256": "0" * 64}}, decoder=spec, labels=labels)
    return Pipeline(manifest, Path("."), None, None)  # type: ignore[arg-type]


def letterbox(w: int, h: int, size: int) -> Transform:
    return prepare(np.zeros((h, w, 3), np.uint8), InputSpec(width=size, height=size, resize="letterbox"))[1]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.filterwarnings("error::RuntimeWarning")  # a 0/0 (the NaN mean of an empty cluster) fails the test
def test_blazeface_crowded_and_degenerate(seed: int) -> None:
    """Many anchors above the threshold in a few tight clusters (more than 8 members: NumPy's pairwise sums),
    boxes of zero or negative size, copies of a box without area, NaN and inf, and scores at the threshold.
    The degenerate boxes are where the reference deviates from the old code (see tests/infer/reference.py):
    both paths must agree on the fixed behaviour, and give only finite values."""
    rng = np.random.default_rng(seed)
    variant = "short" if seed % 2 else "full"
    n = 896 if variant == "short" else 2304
    size = 128 if variant == "short" else 192
    logits = rng.normal(-6, 2, (1, n, 1)).astype(np.float32)
    reg = rng.normal(0, 3, (1, n, 16)).astype(np.float32)
    reg[0, :, 2:4] = np.abs(reg[0, :, 2:4]) * 10 + 5
    for c in rng.choice(n, 4, replace=False):  # four faces, each seen by the anchors around it
        near = np.clip(np.arange(c - 20, c + 20), 0, n - 1)
        logits[0, near, 0] = rng.normal(2, 1.5, len(near))
        reg[0, near, 2:4] = rng.normal(30, 2, (len(near), 2))
    reg[0, :5, 2:4] = 0.0  # zero-size boxes
    reg[0, 5:8, 2] = -4.0  # negative width
    logits[0, :8, 0] = 3.0
    logits[0, 8, 0] = np.float32(np.log(0.5 / 0.5))  # exactly at a 0.5 threshold
    # Anchors that share a centre (short range: 2 per cell at stride 8), each pair given the same box without
    # area: copies, which must merge. Then NaN and inf in the box, in the keypoints, and in a logit.
    reg[0, 10:16] = np.repeat(reg[0, 10:16:2], 2, axis=0)
    reg[0, 10:16, 3] = 0.0
    logits[0, 10:16, 0] = rng.normal(2, 1, 6)
    reg[0, 16, 0], reg[0, 17, 2], reg[0, 18, 9], reg[0, 19, 3] = np.nan, np.inf, np.nan, -np.inf
    logits[0, 16:20, 0] = 4.0
    logits[0, 20, 0] = np.inf
    outputs = {"regressors": reg, "classificators": logits}
    tf = letterbox(int(rng.integers(200, 900)), int(rng.integers(200, 900)), size)
    found = 0
    for thr, iou in ((0.5, 0.3), (0.1, 0.3), (0.5, 0.0), (0.9, 0.7), (0.0, 0.3), (0.5, 1.0)):
        spec = BlazeFaceDecoder(type="blazeface", variant=variant, score_threshold=thr, iou_threshold=iou,
                                max_detections=100 if thr else 5)
        found += identical_decodes(spec, outputs, tf, [])
        dets = decode(spec, outputs, tf, []).detections
        assert all(np.isfinite([d.score, *d.box, *np.ravel(d.keypoints)]).all() for d in dets)
        assert len(dets) <= spec.max_detections
    assert found > 0


@pytest.mark.parametrize("version", ["v5", "v8"])
@pytest.mark.parametrize("normalized", [False, True])
def test_yolo_many_overlapping_boxes(version: str, normalized: bool) -> None:
    rng = np.random.default_rng(3)
    n, c, size = 3000, 6, 320
    scale = 1.0 if normalized else size
    centres = rng.uniform(0.1, 0.9, (12, 2)) * scale
    pick = rng.integers(0, 12, n)
    xy = centres[pick] + rng.normal(0, 0.02 * scale, (n, 2))
    wh = np.abs(rng.normal(0.2, 0.05, (n, 2))) * scale
    cls = rng.uniform(0, 1, (n, c)) ** 6
    cls[rng.random(n) < 0.02, 0] = 0.5  # ties between rows
    head = [xy, wh] + ([rng.uniform(0.3, 1.0, (n, 1))] if version == "v5" else []) + [cls]
    arr = np.concatenate(head, axis=1).astype(np.float32)
    out = arr[None] if version == "v5" else arr.T[None]
    tf = letterbox(640, 427, size)
    found = 0
    for thr in (0.25, 0.5):
        spec = YoloDecoder(type="yolo", version=version, normalized=normalized, score_threshold=thr)
        found += identical_decodes(spec, {"output0": out}, tf, [f"c{i}" for i in range(c - 1)])  # one unlabelled
    assert found > 0


def test_ssd_boxes_out_of_the_image() -> None:
    rng = np.random.default_rng(5)
    n = 25
    boxes = rng.uniform(-0.2, 1.2, (1, n, 4)).astype(np.float32)
    boxes[0, 0] = [-0.0, -0.0, 0.5, 0.5]  # a negative zero must stay whatever it was
    classes = rng.integers(0, 90, (1, n)).astype(np.float32)
    scores = np.sort(rng.uniform(0, 1, (1, n)).astype(np.float32))[:, ::-1].copy()
    scores[0, 3:6] = scores[0, 3]
    outputs = {"TFLite_Detection_PostProcess": boxes, "TFLite_Detection_PostProcess:1": classes,
               "TFLite_Detection_PostProcess:2": scores, "TFLite_Detection_PostProcess:3": np.array([20], np.float32)}
    found = 0
    for tf in (Transform(0.25, 0.5, 0, 0, 400, 200, 100, 100), letterbox(300, 500, 300)):
        found += identical_decodes(SSDDecoder(type="ssd", score_threshold=0.2, label_offset=1), outputs, tf,
                                   [f"l{i}" for i in range(80)])
    assert found > 0


def test_softmax_and_segmentation() -> None:
    rng = np.random.default_rng(9)
    logits = rng.normal(0, 3, (1, 1000)).astype(np.float32)
    logits[0, 10:14] = logits.max()  # ties at the top: the lowest index first
    labels = [f"k{i}" for i in range(990)]
    tf = Transform(1.0, 1.0, 0.0, 0.0, 224, 224, 224, 224)
    found = identical_decodes(SoftmaxDecoder(type="softmax", top_k=7), {"o": logits}, tf, labels)
    found += identical_decodes(SoftmaxDecoder(type="softmax", top_k=3, apply_softmax=False, score_threshold=0.5),
                               {"o": logits}, tf, labels)
    seg = rng.normal(0, 1, (1, 5, 64, 64)).astype(np.float32)
    tf = letterbox(200, 120, 64)
    identical_decodes(SegmentationDecoder(type="segmentation-argmax"), {"o": seg}, tf, ["a", "b", "c", "d", "e"])
    assert found > 0


def test_rounding_is_pythons_round() -> None:
    """Values where NumPy's rounding (scale, round half to even, scale back) and Python's (the exact decimal
    value) disagree: the item keeps Python's, as before."""
    from agent.inference.predict import _detection
    from models.results import Detection

    score, coords = 0.100215, [335.85, 0.45, 101.35, 7294.95]
    assert float(np.round(score, 5)) != round(score, 5)
    assert all(float(np.round(v, 1)) != round(v, 1) for v in coords)
    d = Detection(label="face", class_id=0, score=score, box=tuple(coords), keypoints=[(0.45, 335.85), (101.35, 2.0)])
    assert repr(_detection(d)) == repr(reference._detection(d))
    assert _detection(d)["box"] == [335.9, 0.5, 101.3, 7294.9]
