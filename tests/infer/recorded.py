"""Real models, real pictures and the runtime's raw outputs for them, recorded once: the input of the job
thread's per-image work (``Predictor.finish`` and the item's ``dump``), for the result identity test and
bench/bench_results.py.

Models: BlazeFace short and full range (LiteRT), PP-OCRv4 text detection (DBNet, OpenVINO: text boxes and a mask
summary) from the offline catalog, and the PP-OCR text-angle classifier (2 classes, OpenVINO) shipped in the same
pinned rapidocr wheel as PP-OCR det. Pictures: the scikit-image photos at varied sizes, as JPEGs (some decoded at
reduced scale, as the agent does with large ones), and a group of faces, through the agent's own ``prepare``."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from agent.inference.config import InferenceConfig
from agent.inference.params import ImageItem, InferParams
from agent.inference.predict import Predictor, Prepared, prepare
from models.catalog import locate, manifest_for
from models.fsutil import sha256_file
from models.manifest import ModelManifest
from models.runtime import Pipeline

PICTURES = ["astronaut", "chelsea", "coffee", "rocket", "camera", "page", "text", "immunohistochemistry", "cat",
            "hubble_deep_field"]

CLS_FILE = "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
CLS_SHA256 = "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c"


@dataclass
class Recorded:
    """One picture's prepared item and what the runtime gave for it."""

    prep: Prepared
    res: Any  # accelerators.base.InferenceResult


def text_angle_classifier() -> tuple[Path, dict[str, Any]]:
    """The PP-OCR text-angle classifier (0 or 180 degrees) and a manifest for it: input 192x48 BGR, NCHW,
    (x - 127.5) / 127.5; its output is already a softmax."""
    dist = metadata.distribution("rapidocr-onnxruntime")
    path = Path(str(dist.locate_file(CLS_FILE)))
    digest = sha256_file(path)
    if digest != CLS_SHA256:
        raise RuntimeError(f"{path}: sha256 {digest}, expected {CLS_SHA256} (rapidocr-onnxruntime==1.4.4)")
    manifest = {
        "schema_version": 1, "name": "ppocr-cls", "version": "1.4.4", "task": "classification",
        "files": {"onnx": {"path": path.name, "sha256": digest, "size": path.stat().st_size}},
        "input": {"width": 192, "height": 48, "layout": "NCHW", "dtype": "float32", "color": "BGR",
                  "mean": [127.5], "std": [127.5], "resize": "stretch"},
        "decoder": {"type": "softmax", "apply_softmax": False, "top_k": 2},
        "labels": ["0", "180"],
    }
    return path, manifest


def load(name: str) -> Pipeline:
    """A loaded pipeline for ``name``: a catalog model, or "ppocr-cls"."""
    if name == "ppocr-cls":
        path, manifest = text_angle_classifier()
    else:
        path, manifest = locate(name), manifest_for(name)
    m = ModelManifest.model_validate(manifest)
    if path.suffix == ".tflite":
        from accelerators.litert_backend import LiteRTBackend

        model = LiteRTBackend().load(path)
    else:
        from accelerators.openvino_backend import OpenVINOBackend

        model = OpenVINOBackend().load(path)
    return Pipeline(m, path.parent, model, None)


def pictures(n: int, seed: int = 42) -> list[bytes]:
    """``n`` JPEGs of the scikit-image photos, each scaled by 0.3 to 2.0 (thumbnails to camera-sized frames)."""
    import cv2
    from skimage import data

    rng = np.random.default_rng(seed)
    pics = [getattr(data, p)() for p in PICTURES]
    # Several faces in one picture: the astronaut at three sizes on a grey wall.
    group = np.full((512, 1024, 3), 128, np.uint8)
    a = data.astronaut()
    group[:512, :512] = a
    group[:256, 512:768] = cv2.resize(a, (256, 256), interpolation=cv2.INTER_AREA)
    group[256:, 640:896] = cv2.resize(a, (256, 256), interpolation=cv2.INTER_AREA)[:, ::-1]
    pics.append(group)
    out = []
    for i in range(n):
        img = pics[i % len(pics)]
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        img = np.ascontiguousarray(img[:, :, :3][:, :, ::-1])
        scale = float(rng.uniform(0.3, 2.0))
        img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(75, 96))])
        assert ok
        out.append(buf.tobytes())
    return out


def record(pipeline: Pipeline, jpegs: list[bytes]) -> list[Recorded]:
    """Each JPEG through the agent's ``prepare`` and the runtime, once."""
    cfg = InferenceConfig()
    items = [ImageItem(id=f"img-{i:04d}", data=base64.b64encode(b).decode()) for i, b in enumerate(jpegs)]
    runner = Predictor(pipeline, InferParams(model=pipeline.manifest.name, images=items))
    out = []
    for item in items:
        prep = prepare(item, pipeline, cfg, keep_image=False)
        res = runner.run(prep)
        out.append(Recorded(prep, res))
    return out
