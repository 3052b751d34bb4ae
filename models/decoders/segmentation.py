"""segmentation-argmax: per-pixel class scores -> per-class area summary."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from models.decoders.common import DecodeResult, MaskMap, label_for, pick_output, valid_region
from models.preprocess import Transform
from models.results import MaskClass, MaskSummary


def class_map(arr: np.ndarray, threshold: float) -> np.ndarray:
    """[1,C,H,W], [1,H,W,C] or [1,H,W] -> (H, W) int class ids; one channel means foreground/background."""
    a = np.asarray(arr)
    if a.ndim == 4:
        a = a[0]
        # Channels are the short axis: NCHW when the first axis is shorter than the spatial ones.
        chw = a.shape[0] <= a.shape[2] and a.shape[0] < a.shape[1]
        if not chw:
            a = a.transpose(2, 0, 1)
        if a.shape[0] == 1:
            return (a[0] >= threshold).astype(np.int64)
        return a.argmax(axis=0)
    if a.ndim == 3:
        return a[0].astype(np.int64)
    if a.ndim == 2:
        return a.astype(np.int64)
    raise ValueError(f"segmentation output must be 2-4 dimensional, got {arr.shape}")


def summarise(cmap: np.ndarray, labels: list[str]) -> MaskSummary:
    ids, counts = np.unique(cmap, return_counts=True)
    total = int(cmap.size)
    return MaskSummary(
        width=int(cmap.shape[1]),
        height=int(cmap.shape[0]),
        classes=[
            MaskClass(class_id=int(i), label=label_for(labels, int(i)), pixels=int(c), fraction=float(c) / total)
            for i, c in zip(ids, counts)
        ],
    )


def decode(spec: Any, outputs: Mapping[str, np.ndarray], transform: Transform, labels: list[str]) -> DecodeResult:
    cmap = class_map(pick_output(outputs, spec.output), spec.score_threshold)
    rows, cols = valid_region(transform, cmap.shape[1], cmap.shape[0])
    shown = cmap[rows, cols]
    # Class ids above 255 do not fit an 8-bit PNG; such models get the summary only.
    png = MaskMap(shown.astype(np.uint8), "class_ids") if shown.size and int(shown.max()) <= 255 else None
    return DecodeResult(mask=summarise(shown, labels), mask_map=png)
