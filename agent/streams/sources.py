"""Frame sources: Pi camera (picamera2), V4L2/USB cameras, RTSP/HTTP streams and video files (OpenCV).

Every source yields BGR ``uint8`` frames (OpenCV's order, and what picamera2's ``RGB888`` format really holds in
memory), so no colour conversion is paid per frame. ``read()`` returns None at the end of a file and raises
``SourceError`` when the source dropped; the capture loop (agent.streams.capture) retries with backoff.
cv2 and picamera2 are imported only when a source opens: the agent starts without them.
"""

from __future__ import annotations

import os
import re
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Optional

import numpy as np


class SourceError(Exception):
    """The source cannot be opened or stopped delivering frames; the message says what to check."""


class FrameSource(ABC):
    kind: str = "?"

    def __init__(self, size: Optional[tuple[int, int]] = None, fps: Optional[float] = None):
        self.size = size
        self.fps = fps

    @abstractmethod
    def open(self) -> None: ...

    @abstractmethod
    def read(self) -> Optional[np.ndarray]:
        """The next frame (BGR), None at the end of a file; raises SourceError when the source dropped."""

    @abstractmethod
    def close(self) -> None: ...

    def describe(self) -> str:
        return self.kind

    def _fit(self, frame: np.ndarray) -> np.ndarray:
        """Scale to the requested size when the source ignored it (files always do)."""
        if self.size is None or (frame.shape[1], frame.shape[0]) == tuple(self.size):
            return frame
        import cv2

        return cv2.resize(frame, tuple(self.size), interpolation=cv2.INTER_AREA)


class OpenCVSource(FrameSource):
    """cv2.VideoCapture over a V4L2 device, a network URL or a file."""

    def __init__(self, target: Any, kind: str, size: Optional[tuple[int, int]] = None, fps: Optional[float] = None,
                 loop: bool = False):
        super().__init__(size, fps)
        self.target = target
        self.kind = kind
        self.loop = loop
        self._cap: Any = None
        self._file_fps = 0.0
        self._t0 = 0.0
        self._n = 0

    def describe(self) -> str:
        return f"{self.kind}:{self.target}"

    def open(self) -> None:
        import cv2

        if self.kind == "file" and not Path(self.target).is_file():
            raise SourceError(f"no such video file: {self.target}")
        if self.kind == "v4l2" and isinstance(self.target, str) and not os.path.exists(self.target):
            raise SourceError(f"no such camera device: {self.target} (unplugged?)")
        if self.kind == "v4l2":
            cap = cv2.VideoCapture(self.target, cv2.CAP_V4L2)
        else:
            cap = cv2.VideoCapture(self.target)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open {self.describe()} (OpenCV could not read it)")
        if self.kind != "file":
            # Live sources: keep the driver's own queue minimal so the frame we read is the newest one.
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
            if self.size is not None:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.size[0])
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.size[1])
            if self.fps is not None and self.kind == "v4l2":
                cap.set(cv2.CAP_PROP_FPS, self.fps)
        else:
            fps = cap.get(cv2.CAP_PROP_FPS)
            self._file_fps = fps if fps and 0 < fps <= 1000 else 30.0
        self._cap = cap
        self._t0 = time.monotonic()
        self._n = 0

    def read(self) -> Optional[np.ndarray]:
        if self._cap is None:
            raise SourceError("not open")
        if self.kind == "file":
            return self._read_file()
        ok, frame = self._cap.read()
        if not ok or frame is None:
            raise SourceError(f"{self.describe()} stopped delivering frames")
        return self._fit(frame)

    def _read_file(self) -> Optional[np.ndarray]:
        # A file plays at its own frame rate, like a camera would deliver it; reading it flat out would make a
        # file source useless as a stand-in for a camera (and for measuring latency).
        due = self._t0 + self._n / self._file_fps
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        elif delay < -1.0:
            self._t0 = time.monotonic() - self._n / self._file_fps  # we were stalled: don't burst to catch up
        ok, frame = self._cap.read()
        if not ok or frame is None:
            if not self.loop:
                return None
            # Reopen rather than seek: a file that was removed or replaced is noticed at the loop point.
            self.close()
            self.open()
            ok, frame = self._cap.read()
            if not ok or frame is None:
                raise SourceError(f"{self.target} has no readable frames")
        self._n += 1
        return self._fit(frame)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class Picamera2Source(FrameSource):
    """A Raspberry Pi camera through picamera2 (libcamera), the way its manual does it.

    ``create_video_configuration`` with a ``main`` stream in ``RGB888`` (picamera2 documents that this format is
    laid out B, G, R in memory, i.e. what OpenCV expects), ``FrameRate`` as a control, ``configure``, ``start``,
    then ``capture_array("main")`` per frame, which blocks until the next frame is ready.
    """

    kind = "picamera2"

    def __init__(self, camera_num: int = 0, size: Optional[tuple[int, int]] = None, fps: Optional[float] = None):
        super().__init__(size, fps)
        self.camera_num = camera_num
        self._cam: Any = None

    def describe(self) -> str:
        return f"picamera2:{self.camera_num}"

    def open(self) -> None:
        try:
            from picamera2 import Picamera2
        except ImportError as e:
            raise SourceError(f"picamera2 is not usable here ({e}); on Raspberry Pi OS: apt install python3-picamera2"
                              ) from None
        cams = Picamera2.global_camera_info()
        if self.camera_num >= len(cams):
            raise SourceError(f"no Pi camera {self.camera_num} (libcamera sees {len(cams)}; check the ribbon cable)")
        cam = None
        try:
            cam = Picamera2(self.camera_num)
            controls: dict[str, Any] = {}
            if self.fps is not None:
                controls["FrameRate"] = float(self.fps)
            config = cam.create_video_configuration(
                main={"size": tuple(self.size or (640, 480)), "format": "RGB888"}, controls=controls,
                buffer_count=2,  # fewer buffers: less queued-up latency, the newest frame arrives sooner
            )
            cam.configure(config)
            cam.start()
        except Exception as e:  # picamera2 raises RuntimeError/IndexError and libcamera's own errors
            if cam is not None:
                try:
                    cam.close()
                except Exception:
                    pass
            raise SourceError(f"cannot start Pi camera {self.camera_num}: {e}") from None
        self._cam = cam

    def read(self) -> Optional[np.ndarray]:
        if self._cam is None:
            raise SourceError("not open")
        try:
            arr = self._cam.capture_array("main")
        except Exception as e:
            raise SourceError(f"Pi camera {self.camera_num} stopped: {e}") from None
        if arr.ndim == 3 and arr.shape[2] == 4:  # XRGB8888 and friends: drop the padding byte
            arr = arr[:, :, :3]
        return np.ascontiguousarray(arr)

    def close(self) -> None:
        cam, self._cam = self._cam, None
        if cam is None:
            return
        for step in (cam.stop, cam.close):
            try:
                step()
            except Exception:
                pass


_V4L2_RE = re.compile(r"^(?:v4l2|usb):(.+)$")
_PICAM_RE = re.compile(r"^picamera2(?::(\d+))?$")


def make_source(source: str, size: Optional[tuple[int, int]] = None, fps: Optional[float] = None,
                loop: bool = False) -> FrameSource:
    """Parse a ``source`` string (see StreamConfig.source) into a FrameSource; nothing is opened yet."""
    s = source.strip()
    m = _PICAM_RE.match(s)
    if m:
        return Picamera2Source(int(m.group(1) or 0), size, fps)
    m = _V4L2_RE.match(s)
    if m:
        dev = m.group(1)
        return OpenCVSource(int(dev) if dev.isdigit() else dev, "v4l2", size, fps)
    if s.isdigit():
        return OpenCVSource(int(s), "v4l2", size, fps)
    if s.startswith("/dev/video"):
        return OpenCVSource(s, "v4l2", size, fps)
    low = s.lower()
    if low.startswith(("rtsp://", "rtsps://", "rtmp://")):
        return OpenCVSource(s, "rtsp", size, fps)
    if low.startswith(("http://", "https://")):
        return OpenCVSource(s, "http", size, fps)
    if low.startswith("file:"):
        s = s[5:]
        if s.startswith("//"):
            s = s[2:]
    return OpenCVSource(s, "file", size, fps, loop=loop)


class Backoff:
    """Doubling retry delay, reset once the source delivers again."""

    def __init__(self, min_s: float, max_s: float):
        self.min_s, self.max_s = min_s, max_s
        self._next = min_s

    def next_delay(self) -> float:
        d = self._next
        self._next = min(self.max_s, self._next * 2)
        return d

    def reset(self) -> None:
        self._next = self.min_s


class LatestFrame:
    """A one-slot mailbox: the capture thread overwrites, the inference thread takes the newest.

    This is what keeps the pipeline from building a backlog: a frame not taken before the next one arrives is
    dropped (and counted), never queued.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Optional[tuple[np.ndarray, int, float, float]] = None
        self.seq = 0
        self.dropped = 0

    def put(self, frame: np.ndarray, t_mono: float, t_wall: float) -> bool:
        """Store a frame; returns True when it replaced one that was never taken."""
        with self._cond:
            replaced = self._item is not None
            if replaced:
                self.dropped += 1
            self.seq += 1
            self._item = (frame, self.seq, t_mono, t_wall)
            self._cond.notify_all()
            return replaced

    def take(self, timeout: float) -> Optional[tuple[np.ndarray, int, float, float]]:
        """The newest frame not yet taken (frame, seq, monotonic time, wall time), or None after ``timeout``."""
        with self._cond:
            if self._item is None:
                self._cond.wait(timeout)
            item, self._item = self._item, None
            return item

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()
