"""OpenCV DNN backend: a CPU fallback that needs nothing beyond opencv-python-headless.

ONNX is the reliable path. TFLite is read with the classic engine only (the new engine exposes just one output
of multi-output models) and wants NCHW input; it was silently wrong on some TFLite exports, which is why it is
last in the default preference and why the test suite compares it against LiteRT on every model it serves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field

from accelerators.base import (
    Backend,
    BackendConfig,
    BackendError,
    BackendStatus,
    DeviceUnavailable,
    InferenceResult,
    Inputs,
    LoadedModel,
    Staged,
    TensorSpec,
    now_ms,
)
from accelerators.registry import register_backend


class OpenCVConfig(BackendConfig):
    engine: Literal["auto", "classic", "new"] = Field(
        "auto", description="OpenCV 5 DNN engine for ONNX; TFLite always uses the classic engine."
    )
    allow_tflite: bool = Field(True, description="Let this backend serve .tflite files (NHWC input is transposed).")
    num_threads: Optional[int] = Field(None, ge=1, description="cv2.setNumThreads; empty: OpenCV's default.")


class OpenCVModel(LoadedModel):
    def __init__(self, net: Any, path: Path, nhwc_input: bool):
        names = list(net.getUnconnectedOutLayersNames())
        super().__init__(
            "opencv", "CPU", path, [TensorSpec("input", (), "float32")], [TensorSpec(n, (), "float32") for n in names]
        )
        self._net = net
        self._names = names
        # TFLite models take NHWC (as under LiteRT); OpenCV's TFLite importer wants NCHW, so transpose here.
        self._nhwc = nhwc_input
        self.wants_nchw = nhwc_input

    def stage(self, inputs: Inputs) -> Staged:
        if isinstance(inputs, Staged):
            return inputs
        feed = self._as_feed(inputs)
        key = (lambda name: "") if len(feed) == 1 else (lambda name: name)
        out = Staged()
        for name, arr in feed.items():
            if self._nhwc and arr.ndim == 4:
                # The model's contract is NHWC (as in LiteRT); OpenCV's TFLite importer wants NCHW.
                arr = arr.transpose(0, 3, 1, 2)
            out[key(name)] = _contiguous(arr)
        return out

    def infer(self, inputs: Inputs) -> InferenceResult:
        return self.end(self.begin(inputs))

    def begin(self, inputs: Inputs) -> float:
        # Converting here, under the lock, would serialise it with forward(); pipelines stage in their workers.
        feed = self.stage(inputs)
        self._lock.acquire()
        try:
            t0 = now_ms()
            for name, arr in feed.items():
                self._net.setInput(arr, name)
        except BaseException:
            self._lock.release()
            raise
        return t0

    def end(self, pending: float) -> InferenceResult:
        try:
            outs = self._net.forward(self._names)
            dt = now_ms() - pending
        finally:
            self._lock.release()
        return InferenceResult(dict(zip(self._names, outs)), dt, self.backend, self.device)

    def close(self) -> None:
        self._net = None


def _contiguous(a: Any) -> Any:
    import numpy as np

    return np.ascontiguousarray(a, dtype=np.float32)


@register_backend
class OpenCVBackend(Backend):
    name = "opencv"
    config_model = OpenCVConfig
    formats = ("onnx", "tflite")
    description = "OpenCV DNN on CPU: fallback for ONNX models, no extra runtime"
    config: OpenCVConfig

    def probe(self) -> BackendStatus:
        try:
            import cv2
        except Exception as e:
            reason = f"OpenCV is not installed (pip install opencv-python-headless): {e}"
            return BackendStatus(name=self.name, available=False, reason=reason)
        if not hasattr(cv2, "dnn"):
            return BackendStatus(name=self.name, available=False, reason="this OpenCV build has no dnn module")
        return BackendStatus(name=self.name, available=True, runtime=f"opencv {cv2.__version__}", devices=["CPU"])

    def formats_for(self, device: str) -> tuple[str, ...]:
        return ("onnx", "tflite") if self.config.allow_tflite else ("onnx",)

    def load(self, path: Path, device: Optional[str] = None) -> LoadedModel:
        if (device or "CPU").upper() != "CPU":
            raise DeviceUnavailable(f"the OpenCV backend runs on CPU only, not {device!r}")
        import cv2

        if self.config.num_threads:
            cv2.setNumThreads(self.config.num_threads)
        t0 = now_ms()
        suffix = path.suffix.lower()
        try:
            if suffix == ".tflite":
                if not self.config.allow_tflite:
                    raise BackendError("TFLite is disabled for the OpenCV backend (opencv.allow_tflite = false)")
                engine = "classic"
                net = _read(cv2, path, engine)
                nhwc = True
            else:
                engine = self.config.engine
                net = _read(cv2, path, engine)
                nhwc = False
            if engine == "classic" or not hasattr(cv2.dnn, "ENGINE_NEW"):
                # The new engine warns on (and ignores) target selection; the classic one runs on CPU with these.
                net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
                net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        except cv2.error as e:
            raise BackendError(f"OpenCV DNN could not read {path.name}: {' '.join(str(e).split())}") from e
        loaded = OpenCVModel(net, path, nhwc)
        loaded.load_ms = now_ms() - t0
        return loaded


def _read(cv2: Any, path: Path, engine: str) -> Any:
    # OpenCV 4.x has no engine argument; OpenCV 5 defaults to the new engine.
    engines = {"classic": "ENGINE_CLASSIC", "new": "ENGINE_NEW", "auto": "ENGINE_AUTO"}
    const = getattr(cv2.dnn, engines[engine], None)
    if const is None:
        return cv2.dnn.readNet(str(path))
    return cv2.dnn.readNet(str(path), "", "", const)


