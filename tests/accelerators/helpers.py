"""Package builders for the tests: real model files with manifests, and tiny OpenVINO models built with opsets."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np

from models.catalog import manifest_for


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def catalog_package(dest: Path, catalog_name: str, model_file: Path, name: Optional[str] = None,
                    version: Optional[str] = None, **overrides: Any) -> Path:
    """A package directory with a catalog model's manifest, optionally renamed/re-versioned."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_file, dest / model_file.name)
    m = manifest_for(catalog_name)
    m.pop("source", None)
    if name:
        m["name"] = name
    if version:
        m["version"] = version
    m.update(overrides)
    (dest / "model.json").write_text(json.dumps(m, indent=2))
    return dest


def write_manifest(dest: Path, manifest: dict[str, Any]) -> Path:
    (dest / "model.json").write_text(json.dumps(manifest, indent=2))
    return dest


def tiny_ir(dest: Path, output: np.ndarray, in_shape: tuple[int, ...] = (1, 3, 16, 16), stem: str = "tiny") -> Path:
    """An OpenVINO IR whose output is ``output`` whatever the input (built with the opset API, saved as f32)."""
    import openvino as ov
    import openvino.opset13 as ops

    dest.mkdir(parents=True, exist_ok=True)
    x = ops.parameter(list(in_shape), np.float32, name="images")
    m = ops.reduce_mean(x, list(range(1, len(in_shape))), keep_dims=False)
    out = ops.add(ops.multiply(m, ops.constant(np.float32(0))), ops.constant(output.astype(np.float32)))
    out.output(0).get_tensor().set_names({"output0"})
    ov.save_model(ov.Model([out], [x], stem), str(dest / f"{stem}.xml"), compress_to_fp16=False)
    return dest / f"{stem}.xml"


def ir_package(dest: Path, name: str, version: str, output: np.ndarray, decoder: dict[str, Any],
               task: str = "detection", labels: Optional[list[str]] = None) -> Path:
    xml = tiny_ir(dest, output)
    binf = xml.with_suffix(".bin")
    manifest = {
        "name": name,
        "version": version,
        "task": task,
        "files": {"openvino": {"path": xml.name, "sha256": sha(xml),
                               "weights": {"path": binf.name, "sha256": sha(binf)}}},
        "input": {"width": 16, "height": 16, "layout": "NCHW", "mean": [0], "std": [255]},
        "decoder": decoder,
        "labels": labels or ["a", "b"],
        "preferred_backends": ["openvino:CPU"],
    }
    return write_manifest(dest, manifest)
