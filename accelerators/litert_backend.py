"""LiteRT (TensorFlow Lite) backend: CPU with XNNPACK, and the Coral EdgeTPU through its delegate.

``ai-edge-litert`` is tried first (works with numpy 2); ``tflite-runtime`` is the fallback for older Raspberry Pi
images pinned to numpy<2 (tflite-runtime 2.14 breaks on numpy 2 with a SystemError inside ``Interpreter``).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import numpy as np
from pydantic import Field, field_validator

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

EDGETPU_DEVICE_RE = re.compile(r"^(usb|pci)(:\d{1,3})?$")

EDGETPU_LIB_HELP = (
    "install the Coral EdgeTPU runtime: add the apt repository https://packages.cloud.google.com/apt "
    "(coral-edgetpu-stable) and `apt-get install libedgetpu1-std` (or libedgetpu1-max); it is not on PyPI, and "
    "the PyPI package named pycoral is an unrelated project"
)


class LiteRTConfig(BackendConfig):
    num_threads: Optional[int] = Field(None, ge=1, le=64, description="CPU threads per interpreter; empty: all cores.")
    edgetpu_library: str = Field(
        "libedgetpu.so.1", description="EdgeTPU delegate library (a file name searched by the loader, or a path)."
    )
    edgetpu_device: Optional[str] = Field(
        None,
        description="Which EdgeTPU to use: usb, usb:N, pci or pci:N (N counts from 0). Empty: the first one found.",
    )

    @field_validator("edgetpu_device")
    @classmethod
    def _device(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not EDGETPU_DEVICE_RE.match(v):
            raise ValueError("must be usb, usb:N, pci or pci:N")
        return v


Importer = Callable[[str], ModuleType]


def import_litert(importer: Importer = importlib.import_module) -> tuple[Any, str]:
    """The interpreter module (with ``Interpreter`` and ``load_delegate``) and its package name + version."""
    errors = []
    candidates = (("ai_edge_litert.interpreter", "ai-edge-litert"), ("tflite_runtime.interpreter", "tflite-runtime"))
    for mod_name, package in candidates:
        try:
            mod = importer(mod_name)
        except Exception as e:  # ImportError, or an ABI error from a wheel built for numpy 1
            errors.append(f"{package}: {type(e).__name__}: {e}")
            continue
        version = _dist_version(package)
        return mod, f"{package} {version}"
    raise BackendUnavailable(
        "no TensorFlow Lite runtime: pip install ai-edge-litert (or tflite-runtime with numpy<2 on 32-bit Pi OS) — "
        + "; ".join(errors)
    )


def _dist_version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return "?"


def parse_device(device: Optional[str], config: LiteRTConfig) -> tuple[str, Optional[str]]:
    """('CPU', None) or ('EDGETPU', 'usb:0'|None). Accepts CPU, EDGETPU, EDGETPU:usb, EDGETPU:usb:1, EDGETPU:pci:0."""
    d = (device or "CPU").strip()
    if d.upper() == "CPU":
        return "CPU", None
    head, _, rest = d.partition(":")
    if head.upper() != "EDGETPU":
        raise DeviceUnavailable(f"LiteRT devices are CPU and EDGETPU[:usb|usb:N|pci|pci:N], not {device!r}")
    sel = rest.lower() or config.edgetpu_device
    if sel is not None and not EDGETPU_DEVICE_RE.match(sel):
        raise DeviceUnavailable(f"bad EdgeTPU selector {sel!r}: use usb, usb:N, pci or pci:N")
    return "EDGETPU", sel


def delegate_options(selector: Optional[str]) -> dict[str, str]:
    """Options for libedgetpu's ``tflite_plugin_create_delegate``: {"device": "usb:0"} etc.; none picks any TPU."""
    return {"device": selector} if selector else {}


class LiteRTModel(LoadedModel):
    def __init__(self, interpreter: Any, device: str, path: Path, delegate: Any = None):
        inputs = [_spec(d) for d in interpreter.get_input_details()]
        outputs = [_spec(d) for d in interpreter.get_output_details()]
        super().__init__("litert", device, path, inputs, outputs)
        self._it = interpreter
        self._delegate = delegate  # keep the delegate alive as long as the interpreter
        self._in_index = {d["name"]: d["index"] for d in interpreter.get_input_details()}
        self._first_in = interpreter.get_input_details()[0]["index"]
        self._out = [(d["name"], d["index"]) for d in interpreter.get_output_details()]

    def infer(self, inputs: Inputs) -> InferenceResult:
        it = self._it
        with self._lock:
            t0 = now_ms()
            if isinstance(inputs, np.ndarray):
                it.set_tensor(self._first_in, inputs)
            else:
                for name, arr in inputs.items():
                    it.set_tensor(self._in_index[name], arr)
            it.invoke()
            # get_tensor returns a copy, so results survive the next invoke.
            outs = {name: it.get_tensor(idx) for name, idx in self._out}
            dt = now_ms() - t0
        return InferenceResult(outs, dt, self.backend, self.device)

    def close(self) -> None:
        self._it = None
        self._delegate = None


def _spec(d: dict[str, Any]) -> TensorSpec:
    sig = d.get("shape_signature", d["shape"])
    return TensorSpec(d["name"], tuple(int(x) for x in sig), getattr(d["dtype"], "__name__", str(d["dtype"])))


@register_backend
class LiteRTBackend(Backend):
    name = "litert"
    config_model = LiteRTConfig
    formats = ("tflite",)
    description = "LiteRT/TensorFlow Lite: ARM and x86 CPUs (XNNPACK), Coral EdgeTPU (USB, PCIe/M.2)"
    config: LiteRTConfig

    def __init__(self, config: Optional[LiteRTConfig] = None, importer: Importer = importlib.import_module):
        super().__init__(config)
        self._importer = importer
        self._mod: Any = None
        self._version = ""

    def _runtime(self) -> Any:
        if self._mod is None:
            self._mod, self._version = import_litert(self._importer)
        return self._mod

    def probe(self) -> BackendStatus:
        try:
            self._runtime()
        except BackendUnavailable as e:
            return BackendStatus(name=self.name, available=False, reason=str(e))
        devices = ["CPU"]
        if edgetpu_library_loadable(self.config.edgetpu_library):
            devices.append("EDGETPU")
        return BackendStatus(name=self.name, available=True, runtime=self._version, devices=devices)

    def formats_for(self, device: str) -> tuple[str, ...]:
        # The EdgeTPU runs only models compiled by edgetpu_compiler; a plain .tflite would silently run on CPU.
        return ("edgetpu",) if device.upper().startswith("EDGETPU") else ("tflite",)

    def load_edgetpu_delegate(self, selector: Optional[str]) -> Any:
        mod = self._runtime()
        lib = self.config.edgetpu_library
        where = selector or "any"
        try:
            return mod.load_delegate(lib, delegate_options(selector))
        except OSError as e:
            # ctypes could not dlopen the library: the runtime is not installed (the docstring says ValueError,
            # but a missing library surfaces as OSError).
            raise DeviceUnavailable(f"EdgeTPU library {lib!r} cannot be loaded ({e}): {EDGETPU_LIB_HELP}") from None
        except ValueError as e:
            # The library loaded but created no delegate: no TPU at that address (or no permission).
            detail = " ".join(str(e).split())
            raise DeviceUnavailable(
                f"no Coral EdgeTPU at device {where!r} ({detail}). Plug in the Coral USB Accelerator (lsusb shows "
                "1a6e:089a or 18d1:9302; use a USB 3 port) or, for PCIe/M.2, install gasket-dkms so /dev/apex_0 "
                "exists, and check that this user may access it (udev rules, group 'apex' or 'plugdev')"
            ) from None

    def load(self, path: Path, device: Optional[str] = None) -> LoadedModel:
        mod = self._runtime()
        kind, selector = parse_device(device, self.config)
        threads = self.config.num_threads or os.cpu_count() or 1
        delegate = self.load_edgetpu_delegate(selector) if kind == "EDGETPU" else None
        t0 = now_ms()
        try:
            it = mod.Interpreter(
                model_path=str(path),
                num_threads=threads,
                experimental_delegates=[delegate] if delegate is not None else None,
            )
            it.allocate_tensors()
        except (ValueError, RuntimeError, SystemError) as e:
            hint = ""
            if isinstance(e, SystemError):
                hint = " (tflite-runtime 2.14 does not work with numpy 2: use ai-edge-litert)"
            raise BackendError(f"LiteRT could not load {path.name}: {e}{hint}") from e
        label = "CPU" if kind == "CPU" else f"EDGETPU:{selector}" if selector else "EDGETPU"
        loaded = LiteRTModel(it, label, path, delegate)
        loaded.load_ms = now_ms() - t0
        return loaded


def edgetpu_library_loadable(library: str) -> bool:
    """Whether the EdgeTPU delegate library can be dlopen'ed (installed), without creating a delegate."""
    import ctypes

    try:
        ctypes.CDLL(library)
        return True
    except OSError:
        return False
