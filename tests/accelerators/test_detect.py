"""Hardware detection from a fabricated sysfs/dev/proc tree, and the selection explainer."""

from __future__ import annotations

from pathlib import Path

import pytest

from accelerators.config import AcceleratorsConfig
from accelerators.detect import detect, list_accelerators, pi_model, scan_usb, soc_temperature
from accelerators.litert_backend import LiteRTConfig
from accelerators.registry import create_backends
from accelerators.selection import select


def usb_device(sysfs: Path, name: str, vid: str, pid: str) -> None:
    d = sysfs / "bus" / "usb" / "devices" / name
    d.mkdir(parents=True)
    (d / "idVendor").write_text(vid + "\n")
    (d / "idProduct").write_text(pid + "\n")


@pytest.fixture
def fake_host(tmp_path: Path) -> AcceleratorsConfig:
    sysfs, dev, proc = tmp_path / "sys", tmp_path / "dev", tmp_path / "proc"
    usb_device(sysfs, "1-1", "1a6e", "089a")   # Coral USB before firmware load
    usb_device(sysfs, "2-1", "18d1", "9302")   # Coral USB after
    usb_device(sysfs, "1-2", "03e7", "2485")   # NCS2
    usb_device(sysfs, "1-3", "046d", "0825")   # a webcam: ignored
    (sysfs / "bus" / "usb" / "devices" / "1-1:1.0").mkdir()  # an interface: no ids
    dev.mkdir()
    (dev / "apex_0").write_text("")
    (dev / "apex_x").write_text("")  # not a device index
    (proc / "device-tree").mkdir(parents=True)
    (proc / "device-tree" / "model").write_bytes(b"Raspberry Pi 5 Model B Rev 1.0\x00")
    tz = sysfs / "class" / "thermal" / "thermal_zone0"
    tz.mkdir(parents=True)
    (tz / "type").write_text("cpu-thermal\n")
    (tz / "temp").write_text("48312\n")
    return AcceleratorsConfig(sysfs_root=sysfs, dev_root=dev, proc_root=proc,
                              litert=LiteRTConfig(edgetpu_library=str(tmp_path / "no" / "libedgetpu.so.1")))


def test_usb_scan_finds_known_ids(fake_host: AcceleratorsConfig) -> None:
    assert scan_usb(fake_host.sysfs_root) == [("1a6e:089a", "1-1"), ("03e7:2485", "1-2"), ("18d1:9302", "2-1")]


def test_host_info(fake_host: AcceleratorsConfig) -> None:
    assert pi_model(fake_host.proc_root) == "Raspberry Pi 5 Model B Rev 1.0"
    assert soc_temperature(fake_host.sysfs_root) == pytest.approx(48.312)


def test_detect_reports_every_accelerator_with_reasons(fake_host: AcceleratorsConfig) -> None:
    rep = detect(fake_host)
    assert rep.host.pi_model.startswith("Raspberry Pi 5")
    by_kind = {}
    for a in rep.accelerators:
        by_kind.setdefault(a.kind, []).append(a)
    corals = by_kind["coral-usb"]
    assert [(c.device, c.usb_id) for c in corals] == [("EDGETPU:usb:0", "1a6e:089a"), ("EDGETPU:usb:1", "18d1:9302")]
    assert "firmware not loaded" in corals[0].state and "ready" in corals[1].state
    # The EdgeTPU library is not installed here: found, but not usable, saying what to install.
    assert all(not c.usable and "libedgetpu1-std" in c.reason for c in corals)
    pcie = by_kind["coral-pcie"][0]
    assert pcie.device == "EDGETPU:pci:0" and pcie.location.endswith("apex_0") and not pcie.usable
    ncs2 = by_kind["movidius-ncs2"][0]
    assert ncs2.backend == "openvino" and ncs2.device == "MYRIAD" and not ncs2.usable
    assert "2022.3" in ncs2.reason  # the installed OpenVINO has no MYRIAD: say which one does
    assert by_kind["cpu"][0].usable
    # Birth message form: plain JSON-able data.
    infos = list_accelerators(fake_host)
    assert {i.kind for i in infos} >= {"coral-usb", "coral-pcie", "movidius-ncs2", "cpu"}
    assert all(isinstance(i.model_dump(mode="json"), dict) for i in infos)


def test_empty_tree(tmp_path: Path) -> None:
    cfg = AcceleratorsConfig(sysfs_root=tmp_path / "s", dev_root=tmp_path / "d", proc_root=tmp_path / "p")
    rep = detect(cfg)
    assert [a.kind for a in rep.accelerators] == ["cpu"]
    assert rep.host.pi_model is None and rep.host.soc_temperature_c is None


def test_edgetpu_usable_with_library(fake_host: AcceleratorsConfig, fake_edgetpu: Path) -> None:
    fake_host.litert.edgetpu_library = str(fake_edgetpu)
    rep = detect(fake_host)
    assert all(a.usable for a in rep.accelerators if a.kind.startswith("coral"))


FORMATS = ["edgetpu", "tflite"]
PREFERRED = ["litert:EDGETPU", "openvino:CPU", "litert:CPU"]


def test_selection_prefers_the_edgetpu_when_usable(fake_host: AcceleratorsConfig, fake_edgetpu: Path) -> None:
    fake_host.litert.edgetpu_library = str(fake_edgetpu)
    backends = create_backends(fake_host)
    sel = select("det", FORMATS, PREFERRED, backends, detect(fake_host, backends), fake_host)
    assert (sel.chosen.backend, sel.chosen.device, sel.chosen.format) == ("litert", "EDGETPU", "edgetpu")
    others = {f"{c.backend}:{c.device}": c.reason for c in sel.candidates}
    assert "litert:EDGETPU is preferred" in others["openvino:CPU"]


def test_selection_explains_why_not(fake_host: AcceleratorsConfig, tmp_path: Path) -> None:
    backends = create_backends(fake_host)
    rep = detect(fake_host, backends)
    sel = select("det", FORMATS, PREFERRED, backends, rep, fake_host)
    reasons = {f"{c.backend}:{c.device}": c.reason for c in sel.candidates}
    assert "libedgetpu1-std" in reasons["litert:EDGETPU"]
    assert (sel.chosen.backend, sel.chosen.device, sel.chosen.format) == ("openvino", "CPU", "tflite")
    assert "no MYRIAD" in reasons["openvino:MYRIAD"]
    # An ONNX-only model: LiteRT cannot read it, whatever the device.
    sel = select("ocr", ["onnx"], ["litert:CPU", "opencv:CPU"], backends, rep, fake_host)
    assert sel.chosen.backend == "opencv"
    assert "no tflite file" in next(c.reason for c in sel.candidates if c.backend == "litert" and c.device == "CPU")
    # No Coral at all: the reason says so.
    empty = AcceleratorsConfig(sysfs_root=tmp_path / "x", dev_root=tmp_path / "y", proc_root=tmp_path / "z")
    b2 = create_backends(empty)
    sel = select("det", FORMATS, PREFERRED, b2, detect(empty, b2), empty)
    assert "no Coral EdgeTPU detected" in sel.candidates[0].reason
