"""OpenVINO backend: CPU, GPU, NPU, AUTO and (with the 2022.3 LTS runtime) MYRIAD for Movidius NCS/NCS2.

Two import paths: current OpenVINO exposes ``openvino.Core``; 2022.3 (the last release with the MYRIAD plugin,
which NCS2 owners must stay on) only has ``openvino.runtime.Core``. Both have the same Core/CompiledModel/
InferRequest/AsyncInferQueue API for what is used here.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, Optional

import numpy as np
from pydantic import Field

from accelerators.base import (
    Backend,
    BackendConfig,
    BackendError,
    BackendStatus,
    BackendUnavailable,
    DeviceUnavailable,
    InferenceResult,
    Inputs,
    LoadedModel,
    TensorSpec,
    now_ms,
)
from accelerators.registry import register_backend

KNOWN_DEVICES = ("CPU", "GPU", "NPU", "AUTO", "MYRIAD")

MYRIAD_HELP = (
    "MYRIAD (Intel Movidius NCS/NCS2) was removed after OpenVINO 2022.3 LTS: install the 2022.3 archive runtime "
    "(its Python API is openvino.runtime; pip wheels exist only up to Python 3.10 and not for aarch64) and "
    "run its install_dependencies/install_NCS_udev_rules.sh"
)


class OpenVINOConfig(BackendConfig):
    device: str = Field(
        "CPU",
        description="Default device: CPU, GPU[.N], NPU, AUTO, MYRIAD, or a MULTI:/HETERO: string.",
    )
    precision_hint: Optional[Literal["f32", "f16", "bf16"]] = Field(
        None,
        description="INFERENCE_PRECISION_HINT. Empty: f32 on CPU (newer CPUs would pick bf16, which moves "
        "results away from the other backends), the device's default elsewhere.",
    )
    performance_hint: Literal["LATENCY", "THROUGHPUT"] = Field(
        "LATENCY", description="LATENCY for one frame at a time; THROUGHPUT for batches (more parallel requests)."
    )
    num_requests: Optional[int] = Field(
        None, ge=1, le=64, description="Parallel infer requests for batches; empty: the device's optimal number."
    )
    num_threads: Optional[int] = Field(None, ge=1, description="CPU inference threads; empty: all cores.")
    cache_dir: Optional[Path] = Field(
        None, description="Compiled-model cache; makes GPU/NPU/MYRIAD start-up fast after the first load."
    )
    cpu_pinning: bool = Field(
        False,
        description="ENABLE_CPU_PINNING on CPU. Off by default: the agent's decode threads share the cores, and "
        "a pinned inference thread then waits behind them (batch throughput dropped ~20% in bench/bench_infer.py).",
    )


Importer = Callable[[str], ModuleType]


def _supported_properties(core: Any, device: str) -> Optional[list[str]]:
    try:
        return [str(p) for p in core.get_property(device.split(".")[0], "SUPPORTED_PROPERTIES")]
    except Exception:  # a plugin that cannot list them (MYRIAD 2022.3, fakes): send only the basic hints
        return None


def block_openvino_telemetry() -> None:
    """Keep OpenVINO from phoning home. Its model converter (imported with ``openvino``) sends usage events to
    Google Analytics unless a consent file says no, and sends each from a *forked* copy of the calling process: in
    the agent that forks a many-threaded daemon at startup, which then could not exit while the child waited on a
    network an edge node often lacks. OpenVINO falls back to its own no-op stub when ``openvino_telemetry`` cannot
    be imported; make it so. Call before the first ``import openvino``."""
    sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]


def import_openvino(importer: Importer = importlib.import_module) -> tuple[Any, str]:
    """The module holding ``Core`` and ``AsyncInferQueue``, and a version string; raises BackendUnavailable.

    ``importer`` is injectable so that tests can present a 2022.3-style package without installing one.
    """
    block_openvino_telemetry()
    errors = []
    for name in ("openvino", "openvino.runtime"):
        try:
            mod = importer(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
            continue
        except Exception as e:  # e.g. a wheel built for another numpy ABI
            errors.append(f"{name}: {type(e).__name__}: {e}")
            continue
        if hasattr(mod, "Core") and hasattr(mod, "AsyncInferQueue"):
            version = getattr(mod, "__version__", None) or _get_version(mod) or "?"
            version = version.split("-")[0]  # "2026.4.1-22982-e213a14-releases/2026/4": the build tail is noise
            return mod, f"{name} {version}"
        errors.append(f"{name}: has no Core (too old or not the Intel package)")
    raise BackendUnavailable(
        "OpenVINO is not installed (pip install openvino; for MYRIAD the 2022.3 LTS runtime): " + "; ".join(errors)
    )


def _get_version(mod: Any) -> Optional[str]:
    fn = getattr(mod, "get_version", None)
    try:
        return str(fn()) if fn else None
    except Exception:
        return None


def _major(version: str) -> int:
    # "openvino 2026.4.1-22982-..." or "openvino.runtime 2022.3.0-9052-..."
    try:
        return int(version.split()[-1].split(".")[0])
    except (ValueError, IndexError):
        return 0


class OpenVINOModel(LoadedModel):
    def __init__(self, compiled: Any, runtime: Any, device: str, path: Path, config: OpenVINOConfig):
        inputs = [_spec(p) for p in compiled.inputs]
        outputs = [_spec(p) for p in compiled.outputs]
        super().__init__("openvino", device, path, inputs, outputs)
        self._compiled = compiled
        self._runtime = runtime
        self._config = config
        self._request = compiled.create_infer_request()
        self._out_names = [o.name for o in outputs]
        self._queue: Any = None
        self._queue_lock = threading.Lock()

    def _feed(self, inputs: Inputs) -> Any:
        # One array: feed by port index, the runtime's cheapest path (no name lookup).
        return {0: inputs} if isinstance(inputs, np.ndarray) else dict(inputs)

    def infer(self, inputs: Inputs) -> InferenceResult:
        feed = self._feed(inputs)
        with self._lock:
            t0 = now_ms()
            self._request.infer(feed)
            # Output tensors are views into the request's memory, overwritten by the next infer: copy them.
            outs = {n: self._request.get_output_tensor(i).data.copy() for i, n in enumerate(self._out_names)}
            dt = now_ms() - t0
        return InferenceResult(outs, dt, self.backend, self.device)

    def infer_batch(self, batch: Sequence[Inputs]) -> list[InferenceResult]:
        """Throughput path: an AsyncInferQueue keeps ``num_requests`` inferences in flight on the device."""
        if len(batch) <= 1:
            return [self.infer(x) for x in batch]
        results: list[Optional[InferenceResult]] = [None] * len(batch)
        starts: list[float] = [0.0] * len(batch)
        names = self._out_names

        def done(request: Any, idx: int) -> None:
            outs = {n: request.get_output_tensor(i).data.copy() for i, n in enumerate(names)}
            results[idx] = InferenceResult(outs, now_ms() - starts[idx], self.backend, self.device)

        with self._queue_lock:
            if self._queue is None:
                n = self._config.num_requests or 0  # 0: the device's optimal number of requests
                self._queue = self._runtime.AsyncInferQueue(self._compiled, n)
            queue = self._queue
            queue.set_callback(done)
            for i, x in enumerate(batch):
                starts[i] = now_ms()
                queue.start_async(self._feed(x), i)
            queue.wait_all()
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            raise BackendError(f"OpenVINO async queue lost {len(missing)} of {len(batch)} results")
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self._queue = None
        self._request = None
        self._compiled = None


def _spec(port: Any) -> TensorSpec:
    try:
        name = port.get_any_name()
    except Exception:  # unnamed outputs exist in some IRs
        name = f"output{port.get_index()}"
    pshape = port.get_partial_shape()
    shape = tuple(d.get_length() if d.is_static else -1 for d in pshape) if pshape.rank.is_static else ()
    return TensorSpec(name, shape, str(port.get_element_type().get_type_name()))


@register_backend
class OpenVINOBackend(Backend):
    name = "openvino"
    config_model = OpenVINOConfig
    formats = ("openvino", "onnx", "tflite")
    description = "Intel OpenVINO: x86 CPUs, Intel GPU/NPU, Movidius NCS/NCS2 (MYRIAD, 2022.3 LTS only)"
    config: OpenVINOConfig

    def __init__(self, config: Optional[OpenVINOConfig] = None, importer: Importer = importlib.import_module):
        super().__init__(config)
        self._importer = importer
        self._rt: Any = None
        self._rt_version = ""
        self._core: Any = None

    def _runtime(self) -> tuple[Any, Any]:
        if self._core is None:
            self._rt, self._rt_version = import_openvino(self._importer)
            self._core = self._rt.Core()
        return self._rt, self._core

    def probe(self) -> BackendStatus:
        try:
            _, core = self._runtime()
        except BackendUnavailable as e:
            return BackendStatus(name=self.name, available=False, reason=str(e))
        devices = list(core.available_devices)
        return BackendStatus(name=self.name, available=True, runtime=self._rt_version, devices=devices)

    def formats_for(self, device: str) -> tuple[str, ...]:
        # The TFLite frontend arrived in 2023.0; the 2022.3 runtime (MYRIAD's) reads only IR and ONNX.
        if self._core is not None and _major(self._rt_version) < 2023:
            return ("openvino", "onnx")
        return self.formats

    def check_device(self, device: str) -> None:
        """Raise DeviceUnavailable naming what is missing; virtual devices (AUTO, MULTI:..) are always accepted."""
        _, core = self._runtime()
        base = device.split(".")[0].split(":")[0]
        if base in ("AUTO", "MULTI", "HETERO", "BATCH"):
            return
        available = self.status().devices  # probed once: querying the devices costs ~40 ms on first call
        if device in available or any(d.split(".")[0] == device for d in available):
            return
        if base == "MYRIAD":
            # Without the plugin, get_versions answers {} (current releases) or raises (older ones).
            try:
                has_plugin = "MYRIAD" in core.get_versions("MYRIAD")
            except Exception:
                has_plugin = False
            if not has_plugin:
                raise DeviceUnavailable(f"{self._rt_version} has no MYRIAD plugin. {MYRIAD_HELP}")
            raise DeviceUnavailable(
                "no Movidius NCS/NCS2 found: plug the stick in (lsusb shows 03e7:2150 or 03e7:2485) and check "
                "that the udev rules give this user access to it"
            )
        hints = {
            "GPU": "no Intel GPU visible to OpenVINO: install the Intel compute runtime (intel-opencl-icd) and add "
            "this user to the 'render' group",
            "NPU": "no Intel NPU visible to OpenVINO: install the intel-npu-driver and check /dev/accel/accel0",
        }
        raise DeviceUnavailable(
            f"OpenVINO device {device!r} not found (this node has: {', '.join(available) or 'none'}). "
            + hints.get(base, f"known devices: {', '.join(KNOWN_DEVICES)}")
        )

    def compile_properties(self, device: str, supported: Optional[list[str]] = None) -> dict[str, Any]:
        """Properties for compile_model; ``supported`` (the device's SUPPORTED_PROPERTIES) gates newer ones."""
        cfg = self.config
        props: dict[str, Any] = {"PERFORMANCE_HINT": cfg.performance_hint}
        base = device.split(".")[0]
        precision = cfg.precision_hint or ("f32" if base == "CPU" else None)
        if precision:
            props["INFERENCE_PRECISION_HINT"] = precision
        if cfg.num_threads and base == "CPU":
            props["INFERENCE_NUM_THREADS"] = cfg.num_threads
        if base == "CPU" and supported is not None and "ENABLE_CPU_PINNING" in supported:
            props["ENABLE_CPU_PINNING"] = cfg.cpu_pinning  # 2023.0+; older runtimes would reject it
        if base == "MYRIAD":
            # The 2022.3 MYRIAD plugin rejects hints it does not know; keep only what it accepts.
            props = {"PERFORMANCE_HINT": cfg.performance_hint}
        return props

    def load(self, path: Path, device: Optional[str] = None) -> LoadedModel:
        rt, core = self._runtime()
        device = (device or self.config.device).upper()
        self.check_device(device)
        if self.config.cache_dir is not None:
            self.config.cache_dir.mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(self.config.cache_dir)})
        t0 = now_ms()
        try:
            model = core.read_model(str(path))
            supported = _supported_properties(core, device)
            compiled = core.compile_model(model, device, self.compile_properties(device, supported))
        except Exception as e:
            raise BackendError(f"OpenVINO could not load {path.name} on {device}: {e}") from e
        loaded = OpenVINOModel(compiled, rt, device, path, self.config)
        loaded.load_ms = now_ms() - t0
        return loaded
