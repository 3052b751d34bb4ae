"""The one result contract of every decoder: what a controller receives for an image."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, Field


class Detection(BaseModel):
    label: str
    class_id: int
    score: float
    # x1, y1, x2, y2 in pixels of the original image (not the model input).
    box: tuple[float, float, float, float]
    keypoints: Optional[list[tuple[float, float]]] = None


class ClassScore(BaseModel):
    label: str
    class_id: int
    score: float


class MaskClass(BaseModel):
    class_id: int
    label: str
    pixels: int
    fraction: float


class MaskSummary(BaseModel):
    """Per-class area of a segmentation (at the model's output resolution; fractions are resolution-free)."""

    width: int
    height: int
    classes: list[MaskClass]


class Prediction(BaseModel):
    model: str
    version: str
    task: str
    backend: str
    device: str
    image_size: tuple[int, int] = Field(description="width, height of the original image")
    detections: list[Detection] = Field(default_factory=list)
    classes: list[ClassScore] = Field(default_factory=list)
    mask: Optional[MaskSummary] = None
    timing_ms: dict[str, float] = Field(default_factory=dict)
