"""Decoders on tensors with known answers (and one tiny OpenVINO model built with the opset API)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.decoders import decode
from models.manifest import InputSpec, SegmentationDecoder, SoftmaxDecoder, SSDDecoder, YoloDecoder
from models.preprocess import Transform, prepare

LABELS = ["person", "bicycle", "car", "dog"]


def tf_identity(w: int = 100, h: int = 100) -> Transform:
    return Transform(1.0, 1.0, 0.0, 0.0, w, h, w, h)


def ssd_outputs(named: bool = True) -> dict[str, np.ndarray]:
    boxes = np.array([[[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.9, 0.7], [0, 0, 0, 0]]], np.float32)
    classes = np.array([[2, 0, 3, 1]], np.float32)
    scores = np.array([[0.9, 0.3, 0.75, 0.99]], np.float32)  # the 4th is beyond count: must be ignored
    count = np.array([3], np.float32)
    if named:
        return {"TFLite_Detection_PostProcess": boxes, "TFLite_Detection_PostProcess:1": classes,
                "TFLite_Detection_PostProcess:2": scores, "TFLite_Detection_PostProcess:3": count}
    return {"a": boxes, "b": classes, "c": scores, "d": count}


@pytest.mark.parametrize("named", [True, False])
def test_ssd_known_answer(named: bool) -> None:
    # Original image 400x200 stretched to a 100x100 input: x scale 0.25, y scale 0.5.
    tf = Transform(0.25, 0.5, 0, 0, 400, 200, 100, 100)
    r = decode(SSDDecoder(type="ssd", score_threshold=0.5), ssd_outputs(named), tf, LABELS)
    got = [(d.label, round(d.score, 2), tuple(round(v, 3) for v in d.box)) for d in r.detections]
    assert got == [
        ("car", 0.9, (80.0, 20.0, 240.0, 100.0)),
        ("dog", 0.75, (200.0, 100.0, 280.0, 180.0)),
    ]


def test_ssd_label_offset_and_explicit_roles() -> None:
    outs = ssd_outputs(named=False)
    spec = SSDDecoder(type="ssd", score_threshold=0.8, label_offset=1,
                      outputs={"boxes": "a", "classes": "b", "scores": "c", "count": "d"})
    r = decode(spec, outs, tf_identity(), LABELS)
    assert [d.label for d in r.detections] == ["dog"]  # class 2 + offset 1


def test_ssd_scores_first_order_is_recognised() -> None:
    """Some converters emit scores before classes; class ids > 1 give them away."""
    o = ssd_outputs(named=False)
    swapped = {"a": o["a"], "c": o["c"], "b": o["b"], "d": o["d"]}
    r = decode(SSDDecoder(type="ssd"), swapped, tf_identity(), LABELS)
    assert [d.label for d in r.detections] == ["car", "dog"]


def yolo_v8(rows: list[list[float]]) -> np.ndarray:
    """[1, 4+C, N] as Ultralytics exports it."""
    return np.array(rows, np.float32).T[None]


V8_ROWS = [
    # cx, cy, w, h, class scores (C=4)
    [50, 50, 20, 40, 0.9, 0.0, 0.0, 0.0],   # person
    [52, 51, 20, 40, 0.8, 0.0, 0.0, 0.0],   # overlaps the first: suppressed
    [51, 50, 20, 40, 0.0, 0.0, 0.0, 0.7],   # same place, other class: kept (class-aware NMS)
    [10, 10, 4, 4, 0.0, 0.3, 0.0, 0.0],     # below threshold
    [80, 20, 10, 10, 0.0, 0.0, 0.6, 0.0],   # car
]


def test_yolo_v8_known_answer() -> None:
    r = decode(YoloDecoder(type="yolo", version="v8", score_threshold=0.5), {"output0": yolo_v8(V8_ROWS)},
               tf_identity(), LABELS)
    got = [(d.label, round(d.score, 2), d.box) for d in r.detections]
    assert got == [("person", 0.9, (40.0, 30.0, 60.0, 70.0)), ("dog", 0.7, (41.0, 30.0, 61.0, 70.0)),
                   ("car", 0.6, (75.0, 15.0, 85.0, 25.0))]


def test_yolo_v5_objectness_and_letterbox() -> None:
    # v5 rows: cx, cy, w, h, obj, class scores; [1, N, 5+C]
    out = np.array([[[32, 32, 16, 16, 0.9, 0.1, 0.9], [10, 10, 4, 4, 0.4, 0.0, 1.0]]], np.float32)
    # 128x64 original letterboxed into 64x64: scale 0.5, pad 16 rows top.
    spec = InputSpec(width=64, height=64, resize="letterbox")
    _, tf = prepare(np.zeros((64, 128, 3), np.uint8), spec)
    assert (tf.scale_x, tf.pad_y) == (0.5, 16.0)
    r = decode(YoloDecoder(type="yolo", version="v5", score_threshold=0.5), {"o": out}, tf, ["a", "b"])
    assert len(r.detections) == 1  # 0.4 * 1.0 < 0.5
    d = r.detections[0]
    assert d.label == "b" and abs(d.score - 0.81) < 1e-6
    assert d.box == (48.0, 16.0, 80.0, 48.0)  # (32-8)/0.5, (32-8-16)/0.5, ...


def test_yolo_normalized_boxes() -> None:
    out = yolo_v8([[0.5, 0.5, 0.2, 0.4, 0.9]])
    r = decode(YoloDecoder(type="yolo", normalized=True), {"o": out}, tf_identity(200, 100), ["x"])
    assert r.detections[0].box == pytest.approx((80.0, 30.0, 120.0, 70.0), abs=1e-4)


def test_yolo_through_openvino_tiny_model(tmp_path: Path) -> None:
    """A real compiled model (opset-built IR) feeding the decoder through the backend contract."""
    from accelerators.openvino_backend import OpenVINOBackend
    from tests.accelerators.helpers import tiny_ir

    xml = tiny_ir(tmp_path, yolo_v8(V8_ROWS))
    m = OpenVINOBackend().load(xml)
    x, tf = prepare(np.full((100, 100, 3), 7, np.uint8), InputSpec(width=16, height=16, layout="NCHW"))
    res = m.infer(x)
    assert list(res.outputs) == ["output0"]
    tf = Transform(1, 1, 0, 0, 100, 100, 100, 100)
    r = decode(YoloDecoder(type="yolo"), res.outputs, tf, LABELS)
    assert [d.label for d in r.detections] == ["person", "dog", "car"]


def test_softmax_top_k() -> None:
    logits = np.array([[1.0, 3.0, 0.5, 2.0]], np.float32)
    r = decode(SoftmaxDecoder(type="softmax", top_k=2), {"o": logits}, tf_identity(), LABELS)
    e = np.exp(logits[0] - 3)
    p = e / e.sum()
    assert [(c.label, round(c.score, 6)) for c in r.classes] == [("bicycle", round(p[1], 6)), ("dog", round(p[3], 6))]
    r = decode(SoftmaxDecoder(type="softmax", apply_softmax=False, top_k=1), {"o": logits}, tf_identity(), [])
    assert r.classes[0].label == "1" and r.classes[0].score == 3.0


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_segmentation_argmax(layout: str) -> None:
    scores = np.zeros((1, 3, 4, 8), np.float32)
    scores[0, 0] = 1.0           # background everywhere ...
    scores[0, 1, :2, :4] = 2.0   # ... class 1 in an 2x4 corner (8 px)
    scores[0, 2, 3, :] = 3.0     # class 2 on the last row (8 px)
    arr = scores if layout == "NCHW" else scores.transpose(0, 2, 3, 1)
    r = decode(SegmentationDecoder(type="segmentation-argmax"), {"o": arr}, tf_identity(8, 4), ["bg", "road", "car"])
    m = r.mask
    assert (m.width, m.height) == (8, 4)
    assert [(c.label, c.pixels, c.fraction) for c in m.classes] == [("bg", 16, 0.5), ("road", 8, 0.25),
                                                                    ("car", 8, 0.25)]


def test_segmentation_excludes_letterbox_padding() -> None:
    spec = InputSpec(width=8, height=8, resize="letterbox")
    _, tf = prepare(np.zeros((4, 8, 3), np.uint8), spec)  # rows 2..5 are the image
    mask = np.zeros((1, 1, 8, 8), np.float32)
    mask[0, 0, 2:4] = 1.0  # half of the image rows
    r = decode(SegmentationDecoder(type="segmentation-argmax"), {"o": mask}, tf, ["bg", "fg"])
    assert (r.mask.width, r.mask.height) == (8, 4)
    assert [c.fraction for c in r.mask.classes] == [0.5, 0.5]


def test_preprocess_layouts_and_colour() -> None:
    img = np.zeros((2, 2, 3), np.uint8)
    img[..., 0] = 255  # pure red in RGB
    x, _ = prepare(img, InputSpec(width=2, height=2, layout="NCHW", color="BGR", mean=[0], std=[255]))
    assert x.shape == (1, 3, 2, 2) and x.dtype == np.float32
    assert x[0, 2].min() == 1.0 and x[0, 0].max() == 0.0  # red is the last channel in BGR
    q, _ = prepare(img, InputSpec(width=2, height=2, dtype="uint8"))
    assert q.dtype == np.uint8 and q.shape == (1, 2, 2, 3)
    i8, _ = prepare(img, InputSpec(width=2, height=2, dtype="int8"))
    assert i8.dtype == np.int8 and int(i8[0, 0, 0, 0]) == 127


def finite_json(dets: list[Any]) -> list[dict[str, Any]]:
    """The detections as JSON would carry them: raises on NaN or inf."""
    out = [d.model_dump() for d in dets]
    json.dumps(out, allow_nan=False)
    return out


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_yolo_degenerate_rows() -> None:
    """NaN and inf rows are no detection; copies of a box without area are one; an inverted box is none. Greedy
    NMS took the kept box out by index already, but NaN/inf went to the results and copies without area (IoU 0/0
    with each other) all stayed."""
    nan, inf = float("nan"), float("inf")
    rows = [
        [nan, 50, 20, 20, 0.99, 0.0],   # NaN centre
        [50, 50, inf, 20, 0.98, 0.0],   # infinite width
        [50, 50, 20, 20, inf, 0.0],     # infinite score
        [60, 20, -10, 10, 0.97, 0.0],   # inverted (negative width)
        [30, 80, 0, 10, 0.0, 0.8],      # three copies of a box of zero width (class 1) ...
        [30, 80, 0, 10, 0.0, 0.7],
        [30, 80, 0, 10, 0.0, 0.6],
        [30, 80, 0, 0, 0.0, 0.65],      # ... and a point inside it: no area, not a copy, so its own detection
        [50, 50, 20, 40, 0.9, 0.0],     # a person ...
        [51, 50, 20, 40, 0.85, 0.0],    # ... seen twice: suppressed
    ]
    for spec in (YoloDecoder(type="yolo", version="v8", score_threshold=0.5),
                 YoloDecoder(type="yolo", version="v8", score_threshold=0.5, iou_threshold=1.0, max_detections=3)):
        r = decode(spec, {"output0": yolo_v8(rows)}, tf_identity(), LABELS[:2])
        got = [(d["label"], round(d["score"], 2), d["box"]) for d in finite_json(r.detections)]
        if spec.iou_threshold < 1:
            assert got == [("person", 0.9, (40.0, 30.0, 60.0, 70.0)), ("bicycle", 0.8, (30.0, 75.0, 30.0, 85.0)),
                           ("bicycle", 0.65, (30.0, 80.0, 30.0, 80.0))]
        else:  # nothing is suppressed by IoU: copies of a box with area too, up to max_detections
            assert got == [("person", 0.9, (40.0, 30.0, 60.0, 70.0)), ("person", 0.85, (41.0, 30.0, 61.0, 70.0)),
                           ("bicycle", 0.8, (30.0, 75.0, 30.0, 85.0))]


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_ssd_non_finite_rows() -> None:
    """The model's own NMS ran before the decoder; NaN or inf rows it let through are no detection."""
    o = ssd_outputs()
    o["TFLite_Detection_PostProcess"] = o["TFLite_Detection_PostProcess"].copy()
    o["TFLite_Detection_PostProcess"][0, 3] = [0.2, float("nan"), 0.4, 0.4]
    o["TFLite_Detection_PostProcess:2"] = np.array([[0.9, float("inf"), 0.75, 0.99]], np.float32)
    o["TFLite_Detection_PostProcess:3"] = np.array([4], np.float32)
    r = decode(SSDDecoder(type="ssd", score_threshold=0.5), o, tf_identity(), LABELS)
    assert [(d["label"], round(d["score"], 2)) for d in finite_json(r.detections)] == [("car", 0.9), ("dog", 0.75)]
