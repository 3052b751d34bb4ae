"""The contract every inference backend implements.

This module must stay light: it is imported by the agent at start-up, on nodes where some (or all) runtimes are
missing. Heavy runtimes (openvino, cv2, ai_edge_litert) are imported only inside ``Backend.probe``/``load``.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

Inputs = Union[np.ndarray, Mapping[str, np.ndarray]]


class Staged(dict):  # type: ignore[type-arg]
    """A feed already in the runtime's own layout and dtype (made by ``LoadedModel.stage``); ``infer`` takes it as
    is. A marker type rather than a flag, so an ordinary feed can never be mistaken for a converted one."""


class BackendError(Exception):
    """Loading or running a model failed; the message says what to do about it."""


class BackendUnavailable(BackendError):
    """The backend's runtime library is not installed (or too old for what was asked)."""


class DeviceUnavailable(BackendError):
    """The runtime is installed but the requested device (EdgeTPU, MYRIAD, GPU...) is absent or unusable."""


class BackendConfig(BaseModel):
    """Base of the per-backend config sections; unknown keys are refused so that typos are caught."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Set false to never use this backend, even when its runtime is installed.")


class BackendStatus(BaseModel):
    """Health of one backend on this node, as the `accelerators` command and the birth message show it."""

    name: str
    available: bool
    reason: Optional[str] = Field(None, description="Why the backend is unavailable, naming what to install.")
    runtime: Optional[str] = Field(None, description="Runtime package and version that would serve requests.")
    devices: list[str] = Field(default_factory=list, description="Devices the runtime reports right now.")
    formats: list[str] = Field(default_factory=list, description="Model formats this backend reads.")


@dataclass
class InferenceResult:
    """The one output contract of every backend: named output tensors and how long the runtime took.

    A dataclass rather than a pydantic model because it sits on the per-frame hot path (no validation per frame).
    """

    outputs: dict[str, np.ndarray]
    infer_ms: float
    backend: str
    device: str

    def first(self) -> np.ndarray:
        return next(iter(self.outputs.values()))


@dataclass
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # -1 for dynamic dimensions
    dtype: str


class LoadedModel(ABC):
    """A model compiled for one device of one backend. ``infer`` is safe to call from several threads."""

    def __init__(self, backend: str, device: str, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec]):
        self.backend = backend
        self.device = device
        self.path = path
        self.inputs = inputs
        self.outputs = outputs
        self.load_ms = 0.0
        # True when ``stage`` turns the model's NHWC input into NCHW for the runtime and nothing else: a pipeline
        # may then write the tensor in NCHW itself and hand it over as ``Staged``.
        self.wants_nchw = False
        # Runtimes' single-request objects (InferRequest, Interpreter, cv2.dnn.Net) are not thread-safe.
        self._lock = threading.Lock()

    @abstractmethod
    def infer(self, inputs: Inputs) -> InferenceResult:
        """Run one inference; ``inputs`` is one array (for the first input) or a name->array mapping."""

    def stage(self, inputs: Inputs) -> Inputs:
        """``inputs`` (in the model's contract: the layout and dtype its manifest declares) converted to what the
        runtime consumes. Thread-safe and outside the runtime lock, so that a pipeline runs it in its decode
        workers and the inference thread does nothing but infer. ``infer`` accepts both forms."""
        return inputs

    def begin(self, inputs: Inputs) -> Any:
        """``infer`` in two halves for pipelines: ``end(begin(x))`` is ``infer(x)``. Between the two, the caller
        hands the previous result on, so that the thread it wakes runs while this one is inside the runtime and
        the GIL is free. A backend whose input hand-over releases the GIL (OpenCV's setInput) does it in ``begin``
        and holds the model until ``end``; the default does everything in ``end``."""
        return inputs

    def end(self, pending: Any) -> InferenceResult:
        return self.infer(pending)

    def infer_batch(self, batch: Sequence[Inputs]) -> list[InferenceResult]:
        """Run many independent inferences; backends with async queues override this for throughput."""
        return [self.infer(x) for x in batch]

    def close(self) -> None:  # noqa: B027 - optional hook, most runtimes free memory on garbage collection
        """Release runtime resources; the object must not be used afterwards."""

    def _as_feed(self, inputs: Inputs) -> dict[str, np.ndarray]:
        if isinstance(inputs, np.ndarray):
            return {self.inputs[0].name: inputs}
        return dict(inputs)


class Backend(ABC):
    """An inference runtime. Subclasses set the class attributes and are registered in ``accelerators.registry``."""

    name: ClassVar[str]
    config_model: ClassVar[type[BackendConfig]] = BackendConfig
    # Manifest format keys (see models.manifest) this backend can read, in its order of preference.
    formats: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""

    def __init__(self, config: Optional[BackendConfig] = None):
        self.config = config if config is not None else self.config_model()
        self._status: Optional[BackendStatus] = None

    def status(self, refresh: bool = False) -> BackendStatus:
        """Cached health probe; never raises (an exception while probing is reported as unavailable)."""
        if self._status is None or refresh:
            if not self.config.enabled:
                self._status = BackendStatus(name=self.name, available=False, reason="disabled in the configuration")
            else:
                try:
                    self._status = self.probe()
                except Exception as e:  # a broken runtime must not take the agent down
                    self._status = BackendStatus(
                        name=self.name, available=False, reason=f"runtime failed to start: {type(e).__name__}: {e}"
                    )
            self._status.formats = list(self.formats)
        return self._status

    @abstractmethod
    def probe(self) -> BackendStatus:
        """Import the runtime and list its devices; report what is missing instead of raising."""

    def formats_for(self, device: str) -> tuple[str, ...]:
        """Formats readable on ``device`` (EdgeTPU needs compiled models, old OpenVINO lacks TFLite...)."""
        return self.formats

    @abstractmethod
    def load(self, path: Path, device: Optional[str] = None) -> LoadedModel:
        """Compile ``path`` for ``device`` (None: the backend's default). Raises a BackendError subclass."""


def now_ms() -> float:
    return time.perf_counter() * 1000.0


def describe_runtime(module: Any, package: str) -> str:
    return f"{package} {getattr(module, '__version__', '?')}"
