"""softmax: class scores [1, C] (logits or probabilities) -> top-k classes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from models.decoders.common import DecodeResult, label_for, pick_output
from models.preprocess import Transform
from models.results import ClassScore


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def decode(spec: Any, outputs: Mapping[str, np.ndarray], transform: Transform, labels: list[str]) -> DecodeResult:
    scores = pick_output(outputs, spec.output).reshape(-1).astype(np.float64)
    if spec.apply_softmax:
        scores = softmax(scores)
    order = np.argsort(-scores, kind="stable")[: spec.top_k]
    threshold = spec.score_threshold
    return DecodeResult(
        classes=[
            ClassScore(label=label_for(labels, i), class_id=i, score=s)
            for i, s in zip(order.tolist(), scores[order].tolist())
            if s >= threshold
        ]
    )
