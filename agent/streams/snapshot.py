"""Snapshots: a frame with its detection boxes drawn, as JPEG."""

from __future__ import annotations

from typing import Any

import numpy as np

_COLORS = [(0, 200, 255), (60, 220, 60), (255, 120, 0), (200, 0, 200), (0, 0, 255)]


def render_jpeg(frame_bgr: np.ndarray, detections: list[dict[str, Any]], quality: int = 80,
                max_width: int = 1280) -> bytes:
    """Draw each detection's box and ``label score`` on a copy of the frame and encode it as JPEG."""
    import cv2

    img = frame_bgr.copy()
    scale = 1.0
    if img.shape[1] > max_width:
        scale = max_width / img.shape[1]
        img = cv2.resize(img, (max_width, int(round(img.shape[0] * scale))), interpolation=cv2.INTER_AREA)
    thick = max(1, int(round(img.shape[1] / 400)))
    for i, d in enumerate(detections):
        x1, y1, x2, y2 = (int(round(v * scale)) for v in d["box"])
        color = _COLORS[i % len(_COLORS)]
        cv2.rectangle(img, (x1, y1), (x2, y2), color, thick)
        text = f"{d.get('label', '?')} {d.get('score', 0):.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        ty = max(th + base, y1)
        cv2.rectangle(img, (x1, ty - th - base), (x1 + tw, ty), color, -1)
        cv2.putText(img, text, (x1, ty - base), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()
