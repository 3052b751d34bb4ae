"""Draw a result onto a copy of its image: boxes, labels with scores, keypoints; JPEG-encoded."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

# BGR colours, cycled by class id so that classes stay distinguishable.
_COLOURS = [(0, 200, 0), (0, 128, 255), (255, 80, 0), (200, 0, 200), (0, 220, 220), (255, 255, 0)]


def draw(image: "np.ndarray", dec: Any) -> "np.ndarray":
    """A copy of the BGR ``image`` with ``dec`` (a DecodeResult) drawn on it."""
    import cv2

    out = image.copy()
    h, w = out.shape[:2]
    thick = max(1, round(min(w, h) / 300))
    for d in dec.detections:
        colour = _COLOURS[d.class_id % len(_COLOURS)]
        x1, y1, x2, y2 = (int(round(v)) for v in d.box)
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thick)
        text = f"{d.label} {d.score:.2f}"
        scale = 0.4 * thick
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        ty = y1 - 4 if y1 - th - 6 >= 0 else y2 + th + 4
        cv2.rectangle(out, (x1, ty - th - 2), (x1 + tw + 2, ty + base - 2), colour, -1)
        cv2.putText(out, text, (x1 + 1, ty - 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
        for kx, ky in d.keypoints or []:
            cv2.circle(out, (int(round(kx)), int(round(ky))), thick + 1, (0, 0, 255), -1)
    if not dec.detections and dec.classes:
        top = max(dec.classes, key=lambda c: c.score)
        cv2.putText(out, f"{top.label} {top.score:.2f}", (5, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 255, 0), 2)
    return out


def encode_jpeg(image: "np.ndarray", quality: int = 90) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()
