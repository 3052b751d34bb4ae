"""Importing cv-worker's packages stays light, and a missing runtime is reported, never a crash."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from accelerators.base import BackendUnavailable
from accelerators.litert_backend import LiteRTBackend, import_litert
from accelerators.opencv_backend import OpenCVBackend
from accelerators.openvino_backend import OpenVINOBackend, OpenVINOConfig, import_openvino
from accelerators.registry import backend_classes, create_backends

ROOT = Path(__file__).resolve().parents[2]


def test_import_does_not_load_runtimes() -> None:
    code = (
        "import sys, accelerators, accelerators.registry as r, accelerators.detect, accelerators.selection, "
        "accelerators.cli, models, models.store, models.manifest, models.runtime, models.catalog, models.cli\n"
        "r.backend_classes()\n"
        "heavy = [m for m in ('openvino', 'cv2', 'ai_edge_litert', 'tflite_runtime') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing cv-worker loaded runtimes: {out.stdout}"


def test_registry_lists_all_backends() -> None:
    assert set(backend_classes()) == {"openvino", "litert", "opencv"}
    backends = create_backends()
    for name, b in backends.items():
        st = b.status()
        assert st.available, f"{name}: {st.reason}"
        assert "CPU" in st.devices


def _missing(name: str):
    raise ImportError(f"No module named {name!r}")


def test_missing_openvino_is_unavailable_with_reason() -> None:
    b = OpenVINOBackend(importer=_missing)
    st = b.status()
    assert not st.available
    assert "pip install openvino" in st.reason and "2022.3" in st.reason
    with pytest.raises(BackendUnavailable):
        import_openvino(_missing)


def test_missing_litert_is_unavailable_with_reason() -> None:
    st = LiteRTBackend(importer=_missing).status()
    assert not st.available
    assert "ai-edge-litert" in st.reason and "tflite-runtime" in st.reason


def test_tflite_runtime_fallback_import() -> None:
    """ai-edge-litert absent: the tflite_runtime module is used (here: the same API, served by ai_edge_litert)."""
    import importlib

    seen = []

    def importer(name: str):
        seen.append(name)
        if name.startswith("ai_edge_litert"):
            raise ImportError("No module named 'ai_edge_litert'")
        return importlib.import_module("ai_edge_litert.interpreter")  # stands in for tflite_runtime.interpreter

    mod, version = import_litert(importer)
    assert seen == ["ai_edge_litert.interpreter", "tflite_runtime.interpreter"]
    assert version.startswith("tflite-runtime")
    assert hasattr(mod, "Interpreter") and hasattr(mod, "load_delegate")


def test_broken_runtime_reports_instead_of_raising() -> None:
    def broken(name: str):
        raise SystemError("initialization of _pywrap failed (numpy ABI)")

    st = LiteRTBackend(importer=broken).status()
    assert not st.available and "SystemError" in st.reason


def test_disabled_backend() -> None:
    st = OpenVINOBackend(OpenVINOConfig(enabled=False)).status()
    assert not st.available and st.reason == "disabled in the configuration"


def test_opencv_refuses_other_devices(blazeface_path: Path) -> None:
    from accelerators.base import DeviceUnavailable

    with pytest.raises(DeviceUnavailable, match="CPU only"):
        OpenCVBackend().load(blazeface_path, "GPU")
