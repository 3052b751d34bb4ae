"""Real test media: frames composed from scikit-image pictures, written as MJPG .avi with cv2.VideoWriter."""

from __future__ import annotations

from pathlib import Path

import numpy as np

W, H = 320, 240
# Where the astronaut's face lands in a composed frame (BlazeFace finds it at about these pixels).
FACE_AT = (60, 20)


def background() -> np.ndarray:
    """A real picture without a face (coffee cup), BGR, W x H."""
    import cv2
    from skimage import data

    return cv2.resize(data.coffee()[:, :, ::-1], (W, H), interpolation=cv2.INTER_AREA)


def face_crop() -> np.ndarray:
    """The astronaut's head and shoulders (the face is at about 178,81-272,175 of the 512x512 picture), BGR."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[20:240, 120:330, ::-1])


def with_face(bg: np.ndarray, at: tuple[int, int] = FACE_AT) -> np.ndarray:
    f = face_crop()
    out = bg.copy()
    x, y = at
    h, w = min(f.shape[0], H - y), min(f.shape[1], W - x)
    out[y:y + h, x:x + w] = f[:h, :w]
    return out


def write_video(path: Path, frames: list[np.ndarray], fps: float = 30.0) -> Path:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (W, H))
    assert vw.isOpened(), "cv2.VideoWriter cannot write MJPG"
    for f in frames:
        vw.write(f)
    vw.release()
    return path


def face_video(path: Path, before_s: float, face_s: float, after_s: float, fps: float = 30.0) -> Path:
    """Background only, then the face, then background again: one object event that starts and ends."""
    bg = background()
    fg = with_face(bg)
    n = [round(before_s * fps), round(face_s * fps), round(after_s * fps)]
    return write_video(path, [bg] * n[0] + [fg] * n[1] + [bg] * n[2], fps)
