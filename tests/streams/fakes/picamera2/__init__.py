"""A stand-in for the ``picamera2`` package, which needs libcamera and so imports only on a Raspberry Pi.

It mimics the parts of the real API (picamera2 0.3.x, "The Picamera2 Library" manual) that a capture loop
uses, including their behaviour and failure modes:

* ``Picamera2.global_camera_info()`` lists cameras; ``Picamera2(camera_num)`` raises ``IndexError`` for a
  missing camera (as the real one does) and ``RuntimeError`` when the camera is already acquired;
* ``create_video_configuration(main=..., controls=..., buffer_count=...)`` returns a configuration dict with the
  real defaults (video: main 1280x720 ``XBGR8888``, 6 buffers); ``configure()`` refuses while running;
* ``start()`` / ``capture_array(name="main")`` blocks until the next frame at the ``FrameRate`` control (default
  30), returning HxWx3 for ``RGB888`` (stored B, G, R, like the real one) and HxWx4 for the 32-bit formats;
* ``stop()``, ``close()`` and the context manager.

Test controls, through the environment (the agent is a separate process):
``FAKE_PICAMERA2_IMAGE`` an image file shown as the scene (scaled to the configured size);
``FAKE_PICAMERA2_LOG`` a file to which each API call is appended, one line each;
``FAKE_PICAMERA2_UNPLUGGED`` a path: while that file exists the camera is gone (no cameras listed, capture
raises ``RuntimeError`` as libcamera's dequeue failure surfaces in picamera2).
"""

from __future__ import annotations

import copy
import os
import threading
import time
from typing import Any, Optional

import numpy as np

__all__ = ["Picamera2"]

_CAMERAS = [{"Model": "imx708", "Location": 2, "Rotation": 180, "Id": "/base/soc/i2c0mux/i2c@1/imx708@1a", "Num": 0}]
_ACQUIRED: set[int] = set()
_LOCK = threading.Lock()


def _log(msg: str) -> None:
    path = os.environ.get("FAKE_PICAMERA2_LOG")
    if path:
        with open(path, "a") as f:
            f.write(msg + "\n")


def _unplugged() -> bool:
    flag = os.environ.get("FAKE_PICAMERA2_UNPLUGGED")
    return bool(flag) and os.path.exists(flag)


class Picamera2:
    def __init__(self, camera_num: int = 0, verbose_console: Optional[int] = None, tuning: Any = None,
                 allocator: Any = None):
        cams = self.global_camera_info()
        info = cams[camera_num]  # IndexError for a missing camera, like the real library
        with _LOCK:
            if camera_num in _ACQUIRED:
                raise RuntimeError("Failed to acquire camera: Device or resource busy")
            _ACQUIRED.add(camera_num)
        self.camera_idx = camera_num
        self.camera_properties = {"Model": info["Model"], "PixelArraySize": (4608, 2592), "Location": 2,
                                  "Rotation": 180}
        self.sensor_modes = [{"format": "SRGGB10_CSI2P", "size": (1536, 864), "fps": 120.13},
                             {"format": "SRGGB10_CSI2P", "size": (2304, 1296), "fps": 56.03},
                             {"format": "SRGGB10_CSI2P", "size": (4608, 2592), "fps": 14.35}]
        self.camera_config: Optional[dict[str, Any]] = None
        self.started = False
        self.is_open = True
        self._next_frame = 0.0
        self._scene: Optional[np.ndarray] = None
        _log(f"init {camera_num}")

    @staticmethod
    def global_camera_info() -> list[dict[str, Any]]:
        return [] if _unplugged() else copy.deepcopy(_CAMERAS)

    # -- configurations ------------------------------------------------------------------------------------

    def _make_config(self, use_case: str, main: Optional[dict[str, Any]], lores: Optional[dict[str, Any]],
                     raw: Optional[dict[str, Any]], buffer_count: int, controls: Optional[dict[str, Any]],
                     default_size: tuple[int, int], default_format: str, **rest: Any) -> dict[str, Any]:
        m = {"format": default_format, "size": default_size}
        m.update(main or {})
        if "format" in (main or {}) and m["format"] not in ("RGB888", "BGR888", "XBGR8888", "XRGB8888", "YUV420"):
            raise RuntimeError(f"Format {m['format']} not supported")
        return {"use_case": use_case, "transform": rest.get("transform"), "colour_space": rest.get("colour_space"),
                "buffer_count": buffer_count, "queue": rest.get("queue", True), "main": m,
                "lores": lores, "raw": raw, "controls": dict(controls or {}), "sensor": rest.get("sensor", {}),
                "display": rest.get("display", "main"), "encode": rest.get("encode", "main")}

    def create_preview_configuration(self, main: Optional[dict[str, Any]] = None, lores: Any = None, raw: Any = None,
                                     transform: Any = None, colour_space: Any = None, buffer_count: int = 4,
                                     controls: Optional[dict[str, Any]] = None, **kw: Any) -> dict[str, Any]:
        return self._make_config("preview", main, lores, raw, buffer_count, controls, (640, 480), "XBGR8888",
                                 transform=transform, colour_space=colour_space, **kw)

    def create_video_configuration(self, main: Optional[dict[str, Any]] = None, lores: Any = None, raw: Any = None,
                                   transform: Any = None, colour_space: Any = None, buffer_count: int = 6,
                                   controls: Optional[dict[str, Any]] = None, **kw: Any) -> dict[str, Any]:
        _log(f"create_video_configuration main={main} controls={controls} buffer_count={buffer_count}")
        return self._make_config("video", main, lores, raw, buffer_count, controls, (1280, 720), "XBGR8888",
                                 transform=transform, colour_space=colour_space, **kw)

    def create_still_configuration(self, main: Optional[dict[str, Any]] = None, **kw: Any) -> dict[str, Any]:
        return self._make_config("still", main, None, None, kw.pop("buffer_count", 1), kw.pop("controls", None),
                                 (4608, 2592), "BGR888", **kw)

    def configure(self, camera_config: Any = None) -> None:
        if self.started:
            raise RuntimeError("Camera must be stopped before configuring")
        if camera_config is None:
            camera_config = self.create_preview_configuration()
        self.camera_config = camera_config
        self._scene = None
        _log(f"configure {camera_config['main']}")

    # -- running -------------------------------------------------------------------------------------------

    def start(self, config: Any = None, show_preview: Any = False) -> None:
        if not self.is_open:
            raise RuntimeError("Camera is closed")
        if config is not None:
            self.configure(config)
        if self.camera_config is None:
            self.configure(self.create_preview_configuration())
        if _unplugged():
            raise RuntimeError("Failed to start camera: No such device")
        self.started = True
        self._next_frame = time.monotonic()
        _log("start")

    def _frame_rate(self) -> float:
        assert self.camera_config is not None
        return float(self.camera_config["controls"].get("FrameRate", 30.0))

    def _render(self) -> np.ndarray:
        assert self.camera_config is not None
        main = self.camera_config["main"]
        w, h = main["size"]
        if self._scene is None:
            path = os.environ.get("FAKE_PICAMERA2_IMAGE")
            if path:
                import cv2

                img = cv2.imread(path)  # B, G, R
                if img is None:
                    raise RuntimeError(f"fake: cannot read {path}")
                img = cv2.resize(img, (w, h))
            else:
                img = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
            self._scene = img
        bgr = self._scene
        fmt = main["format"]
        if fmt == "RGB888":  # libcamera's RGB888 is B, G, R in memory (what OpenCV wants)
            return bgr.copy()
        if fmt == "BGR888":
            return bgr[:, :, ::-1].copy()
        alpha = np.full((h, w, 1), 255, dtype=np.uint8)
        if fmt == "XRGB8888":
            return np.concatenate([bgr, alpha], axis=2)
        return np.concatenate([bgr[:, :, ::-1], alpha], axis=2)  # XBGR8888: R, G, B, X

    def capture_array(self, name: str = "main", wait: Any = None, signal_function: Any = None) -> np.ndarray:
        if not self.started:
            raise RuntimeError("Camera is not running")
        if name != "main":
            raise KeyError(name)
        # Frames arrive at the sensor's pace; capture_array waits for the next one.
        now = time.monotonic()
        if self._next_frame > now:
            time.sleep(self._next_frame - now)
        self._next_frame = max(self._next_frame + 1.0 / self._frame_rate(), time.monotonic() - 0.1)
        if _unplugged():
            raise RuntimeError("Camera frontend has timed out!")
        return self._render()

    def stop(self) -> None:
        self.started = False
        _log("stop")

    def close(self) -> None:
        if self.started:
            self.stop()
        if self.is_open:
            self.is_open = False
            with _LOCK:
                _ACQUIRED.discard(self.camera_idx)
            _log("close")

    def __enter__(self) -> "Picamera2":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
