"""Decoders: raw output tensors -> the result contract in ``models.results``.

Each decoder module exposes ``decode(spec, outputs, transform, labels) -> DecodeResult``; ``decode`` here picks
the right one from the manifest's ``decoder.type``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
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


Decoder = Callable[[Any, Mapping[str, np.ndarray], Transform, list[str]], DecodeResult]


def decoder_for(decoder_type: str) -> Decoder:
    """The ``decode`` function of one decoder type, for callers that decode many images with one spec."""
    fn: Decoder = importlib.import_module(_MODULES[decoder_type]).decode
    return fn


def decode(spec: Any, outputs: Mapping[str, np.ndarray], transform: Transform, labels: list[str]) -> DecodeResult:
    return decoder_for(spec.type)(spec, outputs, transform, labels)


__all__ = ["DecodeResult", "Decoder", "decode", "decoder_for"]
