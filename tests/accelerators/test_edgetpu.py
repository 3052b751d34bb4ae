"""The EdgeTPU path up to the hardware boundary: real ai-edge-litert load_delegate, stand-in libedgetpu."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from accelerators.base import DeviceUnavailable
from accelerators.litert_backend import LiteRTBackend, LiteRTConfig, delegate_options, parse_device

# ai-edge-litert's Delegate.__del__ reads self._library, which its __init__ never set when dlopen failed (OSError):
# a harmless AttributeError at garbage collection inside the runtime, not ours.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def read_options(log: Path) -> list[dict[str, str]]:
    calls, cur = [], {}
    for line in log.read_text().splitlines() if log.exists() else []:
        if line == "--":
            calls.append(cur)
            cur = {}
        else:
            k, _, v = line.partition("=")
            cur[k] = v
    return calls


def test_missing_library_names_the_package(tmp_path: Path, blazeface_path: Path) -> None:
    """Real load_delegate on a library that does not exist: OSError, turned into install instructions."""
    b = LiteRTBackend(LiteRTConfig(edgetpu_library=str(tmp_path / "libedgetpu.so.1")))
    with pytest.raises(DeviceUnavailable) as e:
        b.load(blazeface_path, "EDGETPU")
    msg = str(e.value)
    assert "libedgetpu1-std" in msg and "packages.cloud.google.com" in msg and "not on PyPI" in msg


def test_library_present_but_no_stick(fake_edgetpu: Path, edgetpu_env: Path, blazeface_path: Path) -> None:
    """The library loads but creates no delegate (ValueError from tflite): tell the user to plug the stick in."""
    b = LiteRTBackend(LiteRTConfig(edgetpu_library=str(fake_edgetpu)))
    with pytest.raises(DeviceUnavailable) as e:
        b.load(blazeface_path, "EDGETPU:usb:0")
    msg = str(e.value)
    assert "no Coral EdgeTPU at device 'usb:0'" in msg and "1a6e:089a" in msg and "Failed to open EdgeTPU" in msg
    assert read_options(edgetpu_env) == [{"device": "usb:0"}]


@pytest.mark.parametrize(
    ("device", "config_device", "expected"),
    [
        ("EDGETPU", None, {}),
        ("EDGETPU", "usb:1", {"device": "usb:1"}),
        ("EDGETPU:usb:1", None, {"device": "usb:1"}),
        ("EDGETPU:pci:0", "usb", {"device": "pci:0"}),
        ("edgetpu:usb", None, {"device": "usb"}),
    ],
)
def test_delegate_options_and_inference(
    fake_edgetpu: Path, edgetpu_env: Path, blazeface_path: Path, monkeypatch: pytest.MonkeyPatch,
    device: str, config_device: str, expected: dict,
) -> None:
    monkeypatch.setenv("FAKE_EDGETPU_DEVICES", "usb:0,usb:1,pci:0")
    b = LiteRTBackend(LiteRTConfig(edgetpu_library=str(fake_edgetpu), edgetpu_device=config_device))
    m = b.load(blazeface_path, device)
    assert read_options(edgetpu_env) == [expected]
    assert m.device.startswith("EDGETPU")
    # The stand-in claims no ops, so the interpreter runs on CPU: results must equal the CPU backend's.
    x = np.random.default_rng(1).uniform(-1, 1, (1, 128, 128, 3)).astype(np.float32)
    cpu = LiteRTBackend().load(blazeface_path).infer(x)
    tpu = m.infer(x)
    for k in cpu.outputs:
        np.testing.assert_allclose(tpu.outputs[k], cpu.outputs[k], atol=1e-5)


def test_selector_must_match_a_plugged_device(fake_edgetpu: Path, edgetpu_env: Path, blazeface_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_EDGETPU_DEVICES", "usb:0")
    b = LiteRTBackend(LiteRTConfig(edgetpu_library=str(fake_edgetpu)))
    with pytest.raises(DeviceUnavailable, match="pci:0"):
        b.load(blazeface_path, "EDGETPU:pci:0")


def test_device_strings() -> None:
    cfg = LiteRTConfig()
    assert parse_device(None, cfg) == ("CPU", None)
    assert parse_device("cpu", cfg) == ("CPU", None)
    assert parse_device("EDGETPU:pci:2", cfg) == ("EDGETPU", "pci:2")
    assert delegate_options(None) == {} and delegate_options("usb:3") == {"device": "usb:3"}
    with pytest.raises(DeviceUnavailable):
        parse_device("EDGETPU:wifi", cfg)
    with pytest.raises(DeviceUnavailable):
        parse_device("GPU", cfg)
    with pytest.raises(ValidationError):
        LiteRTConfig(edgetpu_device="usb:x")


def test_edgetpu_needs_compiled_model() -> None:
    b = LiteRTBackend()
    assert b.formats_for("EDGETPU:usb:0") == ("edgetpu",) and b.formats_for("CPU") == ("tflite",)


def test_status_lists_edgetpu_only_with_library(fake_edgetpu: Path, tmp_path: Path) -> None:
    assert "EDGETPU" in LiteRTBackend(LiteRTConfig(edgetpu_library=str(fake_edgetpu))).status().devices
    assert "EDGETPU" not in LiteRTBackend(LiteRTConfig(edgetpu_library=str(tmp_path / "none.so"))).status().devices
