"""Decoders: raw output tensors -> the result contract in ``models.results``.

Each decoder module exposes ``decode(spec, outputs, transform, labels) -> DecodeResult``; ``decode`` here picks
the right one from the manifest's ``decoder.type``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from models.decoders.common import DecodeResult
from models.preprocess import Transform

_MODULES = {
    "softmax": "models.decoders.classify",
    "ssd": "models.decoders.ssd",
    "yolo": "models.decoders.yolo",
    "blazeface": "models.decoders.blazeface",
    "segmentation-argmax": "models.decoders.segmentation",
    "db-text-map": "models.decoders.dbtext",
}


def decode(spec: Any, outputs: Mapping[str, np.ndarray], transform: Transform, labels: list[str]) -> DecodeResult:
    mod = importlib.import_module(_MODULES[spec.type])
    return mod.decode(spec, outputs, transform, labels)


__all__ = ["DecodeResult", "decode"]
