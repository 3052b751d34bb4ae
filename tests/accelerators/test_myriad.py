"""The OpenVINO MYRIAD path (Movidius NCS/NCS2) up to the hardware boundary, and the 2022.3 API fallback.

NCS2 owners run OpenVINO 2022.3 LTS, whose API lives in ``openvino.runtime``. ``legacy_runtime`` below presents
exactly that layout: an ``openvino`` package without ``Core`` and an ``openvino.runtime`` module whose Core has
the MYRIAD plugin; the stick itself is simulated on top of the real CPU plugin (compile_model on MYRIAD compiles
for CPU), mimicking the real API: available_devices lists MYRIAD only with a stick plugged in, and
get_versions("MYRIAD") raises when the plugin is not registered.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from accelerators.base import DeviceUnavailable
from accelerators.openvino_backend import OpenVINOBackend, OpenVINOConfig, import_openvino


def legacy_runtime(plugin: bool, stick: bool, compiled_with: list) -> Any:
    import openvino as real

    class Core:
        def __init__(self) -> None:
            self._core = real.Core()

        @property
        def available_devices(self) -> list[str]:
            return list(self._core.available_devices) + (["MYRIAD"] if plugin and stick else [])

        def get_versions(self, device: str) -> dict:
            if device == "MYRIAD":
                return {"MYRIAD": "2022.3.0"} if plugin else {}  # what the real Core answers for unknown devices
            return self._core.get_versions(device)

        def read_model(self, path: str) -> Any:
            if path.endswith(".tflite"):
                raise RuntimeError("Unable to read the model: no frontend for .tflite in 2022.3")
            return self._core.read_model(path)

        def compile_model(self, model: Any, device: str, props: dict) -> Any:
            compiled_with.append((device, dict(props)))
            if device == "MYRIAD":
                if not (plugin and stick):
                    raise RuntimeError("Can not init Myriad device: NC_ERROR")
                return self._core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            return self._core.compile_model(model, device, props)

        def set_property(self, props: dict) -> None:
            pass

        def get_property(self, device: str, name: str) -> Any:
            return "Intel Movidius Myriad X VPU" if device == "MYRIAD" else self._core.get_property(device, name)

    runtime = types.SimpleNamespace(
        Core=Core, AsyncInferQueue=real.AsyncInferQueue, get_version=lambda: "2022.3.0-9052"
    )
    top = types.SimpleNamespace(__version__="2022.3.0")  # the 2022.3 top-level package has no Core

    def importer(name: str) -> Any:
        return {"openvino": top, "openvino.runtime": runtime}[name]

    return importer


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    from tests.accelerators.helpers import tiny_ir

    return tiny_ir(tmp_path, np.arange(24, dtype=np.float32).reshape(1, 6, 4))


def test_fallback_to_openvino_runtime_module() -> None:
    mod, version = import_openvino(legacy_runtime(True, True, []))
    assert version == "openvino.runtime 2022.3.0"
    assert hasattr(mod, "Core")


def test_myriad_with_stick_loads_and_runs(tiny_model: Path) -> None:
    calls: list = []
    b = OpenVINOBackend(OpenVINOConfig(device="MYRIAD"), importer=legacy_runtime(True, True, calls))
    st = b.status()
    assert st.available and "MYRIAD" in st.devices and st.runtime.startswith("openvino.runtime 2022.3")
    m = b.load(tiny_model)
    assert m.device == "MYRIAD"
    # The MYRIAD plugin rejects CPU-only hints: only the performance hint is passed.
    assert calls == [("MYRIAD", {"PERFORMANCE_HINT": "LATENCY"})]
    out = m.infer(np.zeros((1, 3, 16, 16), np.float32)).outputs["output0"]
    np.testing.assert_array_equal(out, np.arange(24, dtype=np.float32).reshape(1, 6, 4))
    # 2022.3 has no TFLite frontend: selection must not offer .tflite files to it.
    assert b.formats_for("MYRIAD") == ("openvino", "onnx")


def test_myriad_plugin_but_no_stick(tiny_model: Path) -> None:
    b = OpenVINOBackend(importer=legacy_runtime(True, False, []))
    with pytest.raises(DeviceUnavailable, match="no Movidius NCS/NCS2 found: plug the stick in.*03e7:2485"):
        b.load(tiny_model, "MYRIAD")


def test_myriad_without_plugin_names_the_runtime_to_install(tiny_model: Path) -> None:
    b = OpenVINOBackend(importer=legacy_runtime(False, True, []))
    with pytest.raises(DeviceUnavailable, match="has no MYRIAD plugin.*2022.3 LTS.*Python 3.10"):
        b.load(tiny_model, "MYRIAD")


def test_real_openvino_reports_missing_myriad(tiny_model: Path) -> None:
    """The installed (current) OpenVINO dropped MYRIAD: the real Core's answer is turned into advice."""
    with pytest.raises(DeviceUnavailable, match="has no MYRIAD plugin"):
        OpenVINOBackend().load(tiny_model, "MYRIAD")


@pytest.mark.parametrize("device", ["GPU", "NPU"])
def test_absent_intel_devices(tiny_model: Path, device: str) -> None:
    with pytest.raises(DeviceUnavailable, match=f"{device}.*not found"):
        OpenVINOBackend().load(tiny_model, device)


def test_auto_device_runs_on_cpu(tiny_model: Path) -> None:
    m = OpenVINOBackend().load(tiny_model, "AUTO")
    assert m.infer(np.zeros((1, 3, 16, 16), np.float32)).outputs["output0"].shape == (1, 6, 4)
