"""The model package manifest (``model.json`` or ``model.toml``), validated by pydantic.

A package is a directory holding the manifest and the files it lists; every file carries its sha256, which the
store verifies before a package is activated. All paths are relative, inside the package, without ``..``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MANIFEST_NAMES = ("model.json", "model.toml")

# Format keys: which runtime file a backend reads. "edgetpu" is a .tflite compiled by edgetpu_compiler.
FORMATS = ("tflite", "edgetpu", "onnx", "openvino")


class ManifestError(Exception):
    """The manifest is missing or invalid; ``errors`` lists (field, message)."""

    def __init__(self, source: str, errors: list[tuple[str, str]]):
        self.source = source
        self.errors = errors
        super().__init__(f"invalid model manifest {source}: " + "; ".join(f"{f}: {m}" for f, m in errors))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_relative_path(v: str) -> str:
    """A path that stays inside the package: relative, no '..', no backslashes or NULs."""
    if not v or "\\" in v or "\0" in v:
        raise ValueError(f"bad path {v!r}")
    p = PurePosixPath(v)
    if p.is_absolute() or ".." in p.parts or v.startswith("~"):
        raise ValueError(f"path {v!r} must be relative to the package and must not contain '..'")
    return str(p)


class FileRef(_Strict):
    path: str
    sha256: str
    size: Optional[int] = Field(None, ge=0)

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return check_relative_path(v)

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        v = v.lower()
        if not SHA256_RE.match(v):
            raise ValueError("must be 64 hex digits")
        return v


class ModelFile(FileRef):
    """One runtime file; OpenVINO IR names its .xml here and the .bin as ``weights``."""

    weights: Optional[FileRef] = None


class InputSpec(_Strict):
    width: int = Field(gt=0, le=8192)
    height: int = Field(gt=0, le=8192)
    layout: Literal["NHWC", "NCHW"] = "NHWC"
    dtype: Literal["float32", "uint8", "int8"] = "float32"
    color: Literal["RGB", "BGR"] = "RGB"
    # value = (pixel - mean) / std, per channel, pixels in 0..255; ignored for uint8/int8 inputs (quantized models
    # take raw pixels; int8 ones get 128 subtracted).
    mean: list[float] = Field(default_factory=lambda: [0.0, 0.0, 0.0])
    std: list[float] = Field(default_factory=lambda: [1.0, 1.0, 1.0])
    resize: Literal["stretch", "letterbox"] = "stretch"
    pad_value: int = Field(114, ge=0, le=255, description="Pixel value of letterbox padding.")
    name: Optional[str] = Field(None, description="Input tensor name; empty: the first input.")

    @field_validator("mean", "std")
    @classmethod
    def _three(cls, v: list[float]) -> list[float]:
        if len(v) == 1:
            v = v * 3
        if len(v) != 3:
            raise ValueError("give 1 or 3 values")
        return v

    @field_validator("std")
    @classmethod
    def _nonzero(cls, v: list[float]) -> list[float]:
        if any(s == 0 for s in v):
            raise ValueError("std must not be 0")
        return v


class _Decoder(_Strict):
    score_threshold: float = Field(0.5, ge=0, le=1)


class SoftmaxDecoder(_Decoder):
    type: Literal["softmax"]
    score_threshold: float = Field(0.0, ge=0, le=1)
    top_k: int = Field(5, ge=1)
    apply_softmax: bool = Field(True, description="False when the model already outputs probabilities.")
    output: Optional[str] = None


class SSDDecoder(_Decoder):
    """TFLite_Detection_PostProcess: boxes [1,N,4] (ymin,xmin,ymax,xmax, 0..1), classes [1,N], scores [1,N], count."""

    type: Literal["ssd"]
    label_offset: int = Field(0, description="Added to the class index before the label lookup.")
    outputs: Optional[dict[Literal["boxes", "classes", "scores", "count"], str]] = Field(
        None, description="Output tensor names per role; empty: by the standard names or order."
    )


class YoloDecoder(_Decoder):
    type: Literal["yolo"]
    version: Literal["v5", "v8"] = "v8"
    iou_threshold: float = Field(0.45, ge=0, le=1)
    max_detections: int = Field(300, ge=1)
    normalized: bool = Field(False, description="Boxes are 0..1 rather than model-input pixels.")
    output: Optional[str] = None


class BlazeFaceDecoder(_Decoder):
    type: Literal["blazeface"]
    variant: Literal["short", "full"] = "short"
    iou_threshold: float = Field(0.3, ge=0, le=1)
    max_detections: int = Field(100, ge=1)


class SegmentationDecoder(_Decoder):
    type: Literal["segmentation-argmax"]
    output: Optional[str] = None


class DBTextDecoder(_Decoder):
    """DBNet probability map -> text boxes (PP-OCR det)."""

    type: Literal["db-text-map"]
    score_threshold: float = Field(0.3, ge=0, le=1, description="Pixel threshold on the probability map.")
    box_threshold: float = Field(0.5, ge=0, le=1, description="Least mean probability inside a kept box.")
    unclip_ratio: float = Field(1.6, gt=0)
    min_size: int = Field(3, ge=1)
    max_boxes: int = Field(1000, ge=1)
    output: Optional[str] = None


DecoderSpec = Annotated[
    Union[SoftmaxDecoder, SSDDecoder, YoloDecoder, BlazeFaceDecoder, SegmentationDecoder, DBTextDecoder],
    Field(discriminator="type"),
]

TASK_DECODERS = {
    "classification": {"softmax"},
    "detection": {"ssd", "yolo", "blazeface", "db-text-map"},
    "segmentation": {"segmentation-argmax", "db-text-map"},
}


class ModelManifest(_Strict):
    schema_version: Literal[1] = 1
    name: str
    version: str
    task: Literal["classification", "detection", "segmentation"]
    description: str = ""
    license: Optional[str] = None
    files: dict[Literal["tflite", "edgetpu", "onnx", "openvino"], ModelFile]
    input: InputSpec
    decoder: DecoderSpec
    labels: Optional[list[str]] = None
    labels_file: Optional[FileRef] = None
    preferred_backends: list[str] = Field(
        default_factory=list, description="backend:DEVICE in order, e.g. ['litert:EDGETPU', 'openvino:CPU']."
    )
    source: Optional[dict[str, Any]] = Field(None, description="Where the package came from (informational).")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("must be 1-64 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit")
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not VERSION_RE.match(v) or v in (".", ".."):
            raise ValueError("must be letters, digits, '.', '+', '_' or '-' (e.g. 1.2.0)")
        return v

    @field_validator("files")
    @classmethod
    def _some_files(cls, v: dict[str, ModelFile]) -> dict[str, ModelFile]:
        if not v:
            raise ValueError("list at least one model file")
        return v

    @field_validator("preferred_backends")
    @classmethod
    def _pairs(cls, v: list[str]) -> list[str]:
        for item in v:
            if not re.fullmatch(r"[a-z0-9_]+(:[A-Za-z0-9.:_]+)?", item):
                raise ValueError(f"{item!r} must be backend or backend:DEVICE")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ModelManifest:
        if self.decoder.type not in TASK_DECODERS[self.task]:
            raise ValueError(f"decoder {self.decoder.type!r} does not fit task {self.task!r}")
        if self.labels is not None and self.labels_file is not None:
            raise ValueError("give labels or labels_file, not both")
        return self

    def all_files(self) -> list[FileRef]:
        """Every file the package must contain, for verification."""
        refs: list[FileRef] = []
        for f in self.files.values():
            refs.append(f)
            if f.weights is not None:
                refs.append(f.weights)
        if self.labels_file is not None:
            refs.append(self.labels_file)
        return refs


def manifest_path(package_dir: Path) -> Path:
    for n in MANIFEST_NAMES:
        if (package_dir / n).is_file():
            return package_dir / n
    raise ManifestError(str(package_dir), [("(file)", f"no {' or '.join(MANIFEST_NAMES)} in the package")])


def parse_manifest(data: dict[str, Any], source: str) -> ModelManifest:
    try:
        return ModelManifest.model_validate(data)
    except ValidationError as e:
        errors = [(".".join(str(p) for p in err["loc"]) or "(top)", err["msg"]) for err in e.errors()]
        raise ManifestError(source, errors) from None


def load_manifest(package_dir: Path) -> ModelManifest:
    path = manifest_path(package_dir)
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, ValueError) as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ManifestError(str(path), [("(file)", f"cannot parse: {e}")]) from None
    if not isinstance(data, dict):
        raise ManifestError(str(path), [("(file)", "must be an object")])
    return parse_manifest(data, str(path))


def read_labels(manifest: ModelManifest, package_dir: Path) -> list[str]:
    if manifest.labels is not None:
        return list(manifest.labels)
    if manifest.labels_file is not None:
        return [ln.strip() for ln in (package_dir / manifest.labels_file.path).read_text().splitlines() if ln.strip()]
    return []
