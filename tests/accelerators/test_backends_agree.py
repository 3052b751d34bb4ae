"""The same model gives the same answer on every backend (real runtimes, real models from the wheels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from accelerators.base import InferenceResult
from accelerators.litert_backend import LiteRTBackend, LiteRTConfig
from accelerators.opencv_backend import OpenCVBackend
from accelerators.openvino_backend import OpenVINOBackend, OpenVINOConfig
from models.decoders import decode
from models.manifest import BlazeFaceDecoder, DBTextDecoder, InputSpec
from models.preprocess import prepare
from tests.accelerators.conftest import ASTRONAUT_FACE, ASTRONAUT_SCORE, box_close

BLAZE_IN = InputSpec(width=128, height=128, mean=[127.5], std=[127.5])


@pytest.fixture(scope="module")
def face_tensor(astronaut: np.ndarray):
    return prepare(astronaut, BLAZE_IN)


@pytest.fixture(scope="module")
def loaded(blazeface_path: Path):
    return {
        "litert": LiteRTBackend(LiteRTConfig(num_threads=2)).load(blazeface_path),
        "openvino": OpenVINOBackend(OpenVINOConfig()).load(blazeface_path, "CPU"),
        "opencv": OpenCVBackend().load(blazeface_path),
    }


@pytest.mark.parametrize("backend", ["litert", "openvino", "opencv"])
def test_blazeface_astronaut_one_face(backend: str, loaded: dict, face_tensor) -> None:
    x, tf = face_tensor
    res = loaded[backend].infer(x)
    assert isinstance(res, InferenceResult) and res.backend == backend and res.infer_ms > 0
    assert set(res.outputs) == {"regressors", "classificators"}
    dets = decode(BlazeFaceDecoder(type="blazeface"), res.outputs, tf, ["face"]).detections
    assert len(dets) == 1, dets
    d = dets[0]
    assert d.label == "face"
    assert box_close(d.box, ASTRONAUT_FACE, 2.0), d.box
    assert abs(d.score - ASTRONAUT_SCORE) <= 0.01, d.score
    assert d.keypoints is not None and len(d.keypoints) == 6
    # Landmarks (eyes, nose, mouth, ears) lie in or next to the face box.
    for kx, ky in d.keypoints:
        assert d.box[0] - 5 <= kx <= d.box[2] + 5 and d.box[1] - 5 <= ky <= d.box[3] + 5


def test_blazeface_raw_outputs_agree(loaded: dict, face_tensor) -> None:
    x, _ = face_tensor
    ref = loaded["litert"].infer(x).outputs
    for name in ("openvino", "opencv"):
        out = loaded[name].infer(x).outputs
        for k in ref:
            diff = float(np.abs(out[k] - ref[k]).max())
            assert diff < 1e-3, f"{name} {k} differs from LiteRT by {diff}"


def test_openvino_default_precision_is_f32_on_cpu() -> None:
    props = OpenVINOBackend().compile_properties("CPU")
    assert props["INFERENCE_PRECISION_HINT"] == "f32"
    assert "INFERENCE_PRECISION_HINT" not in OpenVINOBackend().compile_properties("GPU")
    assert OpenVINOBackend(OpenVINOConfig(precision_hint="bf16")).compile_properties("CPU")[
        "INFERENCE_PRECISION_HINT"] == "bf16"


def test_openvino_async_batch_matches_single(blazeface_path: Path, astronaut: np.ndarray) -> None:
    m = OpenVINOBackend(OpenVINOConfig(performance_hint="THROUGHPUT", num_requests=2)).load(blazeface_path)
    frames = [prepare(np.roll(astronaut, 40 * i, axis=1), BLAZE_IN)[0] for i in range(5)]
    batch = m.infer_batch(frames)
    assert len(batch) == 5
    for x, r in zip(frames, batch):
        single = m.infer(x)
        for k in single.outputs:
            np.testing.assert_allclose(r.outputs[k], single.outputs[k], atol=1e-5)
    # Results come back in input order, not completion order: distinct frames give distinct outputs.
    assert not np.allclose(batch[0].outputs["classificators"], batch[2].outputs["classificators"])


def test_results_survive_the_next_inference(loaded: dict, face_tensor) -> None:
    x, _ = face_tensor
    for m in loaded.values():
        a = m.infer(x).outputs["classificators"].copy()
        kept = m.infer(x).outputs["classificators"]
        m.infer(np.zeros_like(x))
        np.testing.assert_array_equal(kept, a)


def test_blazeface_full_range_finds_the_face(blazeface_full_path: Path, astronaut: np.ndarray) -> None:
    spec = InputSpec(width=192, height=192, mean=[127.5], std=[127.5])
    x, tf = prepare(astronaut, spec)
    dec = BlazeFaceDecoder(type="blazeface", variant="full")
    boxes = []
    for b in (LiteRTBackend(), OpenVINOBackend()):
        dets = decode(dec, b.load(blazeface_full_path).infer(x).outputs, tf, ["face"]).detections
        assert len(dets) == 1
        boxes.append(dets[0])
    # The full-range model frames the face a little differently; it must be the same face and agree across runtimes.
    d = boxes[0]
    cx, cy = (d.box[0] + d.box[2]) / 2, (d.box[1] + d.box[3]) / 2
    assert 190 < cx < 260 and 95 < cy < 165
    assert box_close(boxes[0].box, boxes[1].box, 1.0) and abs(boxes[0].score - boxes[1].score) < 0.01


@pytest.fixture(scope="module")
def ppocr_outputs(ppocr_path: Path, page: np.ndarray):
    spec = InputSpec(width=384, height=192, layout="NCHW", color="BGR", mean=[127.5], std=[127.5])
    x, tf = prepare(page, spec)
    ov = OpenVINOBackend().load(ppocr_path).infer(x)
    cv = OpenCVBackend().load(ppocr_path).infer(x)
    return ov, cv, tf


def test_ppocr_map_equal_on_openvino_and_opencv(ppocr_outputs) -> None:
    ov, cv, _ = ppocr_outputs
    a, b = ov.first(), cv.first()
    assert a.shape == b.shape == (1, 1, 192, 384)
    assert float(np.abs(a - b).max()) < 1e-3
    # And it is a real text map, not all zeros: page() is a scanned page of text.
    assert 0.05 < float((a > 0.3).mean()) < 0.5


def test_ppocr_text_boxes(ppocr_outputs, page: np.ndarray) -> None:
    ov, cv, tf = ppocr_outputs
    dec = DBTextDecoder(type="db-text-map")
    r1 = decode(dec, ov.outputs, tf, [])
    r2 = decode(dec, cv.outputs, tf, [])
    assert len(r1.detections) >= 5 and len(r1.detections) == len(r2.detections)
    h, w = page.shape[:2]
    for d in r1.detections:
        assert d.label == "text" and 0 <= d.box[0] < d.box[2] <= w and 0 <= d.box[1] < d.box[3] <= h
    assert r1.mask is not None and r1.mask.classes[-1].label == "text"
