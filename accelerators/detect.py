"""What compute this node has: USB/PCIe accelerators, runtime devices, Raspberry Pi model and SoC temperature.

Everything is read from files under configurable roots (``sysfs_root``, ``dev_root``, ``proc_root``) so that the
tests can run against a fabricated tree; nothing here needs root or loads a driver.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, Field

from accelerators.base import Backend, BackendStatus
from accelerators.config import AcceleratorsConfig

# vendor:product -> (kind, human name, state)
USB_IDS: dict[str, tuple[str, str, str]] = {
    "1a6e:089a": ("coral-usb", "Coral USB Accelerator", "firmware not loaded yet (loads on first use)"),
    "18d1:9302": ("coral-usb", "Coral USB Accelerator", "ready (firmware loaded)"),
    "03e7:2150": ("movidius-ncs", "Intel Movidius Neural Compute Stick", "present"),
    "03e7:2485": ("movidius-ncs2", "Intel Neural Compute Stick 2 (Myriad X)", "present"),
}


class AcceleratorInfo(BaseModel):
    """One compute device, as listed in the birth message and by `cv-worker accelerators`."""

    kind: str = Field(description="coral-usb, coral-pcie, movidius-ncs, movidius-ncs2, cpu, gpu, npu")
    name: str
    backend: Optional[str] = Field(None, description="Backend that drives it.")
    device: Optional[str] = Field(None, description="Device string for that backend, e.g. EDGETPU:usb:0, MYRIAD, CPU.")
    source: str = Field(description="usb, pci (a /dev node) or runtime (reported by an installed runtime).")
    usb_id: Optional[str] = None
    location: Optional[str] = Field(None, description="sysfs USB path or /dev node.")
    state: Optional[str] = None
    usable: bool = True
    reason: Optional[str] = Field(None, description="Why it cannot be used now, naming what to install.")


class HostInfo(BaseModel):
    machine: str
    cpu_count: int
    pi_model: Optional[str] = None
    soc_temperature_c: Optional[float] = None


class HardwareReport(BaseModel):
    host: HostInfo
    accelerators: list[AcceleratorInfo]
    backends: list[BackendStatus]


def scan_usb(sysfs_root: Path) -> list[tuple[str, str]]:
    """(vendor:product, sysfs device name) for every known accelerator on the USB bus, sorted by bus path."""
    base = sysfs_root / "bus" / "usb" / "devices"
    found = []
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return []
    for name in entries:
        try:
            vid = (base / name / "idVendor").read_text().strip().lower()
            pid = (base / name / "idProduct").read_text().strip().lower()
        except OSError:
            continue  # interfaces (1-1:1.0) have no ids
        usb_id = f"{vid}:{pid}"
        if usb_id in USB_IDS:
            found.append((usb_id, name))
    return found


def scan_apex(dev_root: Path) -> list[Path]:
    """Coral PCIe/M.2 modules: the gasket/apex driver creates /dev/apex_0, /dev/apex_1, ..."""
    try:
        return sorted(p for p in dev_root.glob("apex_*") if p.name[5:].isdigit())
    except OSError:
        return []


def pi_model(proc_root: Path) -> Optional[str]:
    # /proc/device-tree is a link to /sys/firmware/devicetree/base; try both under the configured roots.
    dt_sys = proc_root.parent / "sys" / "firmware" / "devicetree" / "base" / "model"
    for p in (proc_root / "device-tree" / "model", dt_sys):
        try:
            text = p.read_bytes().rstrip(b"\0").decode(errors="replace").strip()
        except OSError:
            continue
        if text:
            return text
    return None


def soc_temperature(sysfs_root: Path) -> Optional[float]:
    """Degrees Celsius from the SoC/CPU thermal zone (millidegrees in sysfs)."""
    zones = sorted((sysfs_root / "class" / "thermal").glob("thermal_zone*"))
    best: Optional[float] = None
    for z in zones:
        try:
            kind = (z / "type").read_text().strip().lower()
            value = int((z / "temp").read_text().strip()) / 1000.0
        except (OSError, ValueError):
            continue
        if any(k in kind for k in ("cpu", "soc", "x86_pkg")):
            return value
        if best is None:
            best = value
    return best


def host_info(cfg: AcceleratorsConfig) -> HostInfo:
    return HostInfo(
        machine=platform.machine(),
        cpu_count=os.cpu_count() or 1,
        pi_model=pi_model(cfg.proc_root),
        soc_temperature_c=soc_temperature(cfg.sysfs_root),
    )


def _usb_accelerators(cfg: AcceleratorsConfig, backends: dict[str, Backend]) -> list[AcceleratorInfo]:
    out = []
    coral_index = 0
    for usb_id, loc in scan_usb(cfg.sysfs_root):
        kind, name, state = USB_IDS[usb_id]
        if kind == "coral-usb":
            info = AcceleratorInfo(
                kind=kind, name=name, backend="litert", device=f"EDGETPU:usb:{coral_index}", source="usb",
                usb_id=usb_id, location=loc, state=state,
            )
            coral_index += 1
            _check_edgetpu(info, backends)
        else:
            info = AcceleratorInfo(
                kind=kind, name=name, backend="openvino", device="MYRIAD", source="usb", usb_id=usb_id, location=loc,
                state=state,
            )
            ov = backends.get("openvino")
            st = ov.status() if ov else None
            if st is None or not st.available:
                info.usable, info.reason = False, (st.reason if st else "OpenVINO backend not registered")
            elif not any(d.startswith("MYRIAD") for d in st.devices):
                from accelerators.openvino_backend import MYRIAD_HELP

                info.usable, info.reason = False, f"{st.runtime} does not list MYRIAD. {MYRIAD_HELP}"
        out.append(info)
    return out


def _check_edgetpu(info: AcceleratorInfo, backends: dict[str, Backend]) -> None:
    lt = backends.get("litert")
    st = lt.status() if lt else None
    if st is None or not st.available:
        info.usable, info.reason = False, (st.reason if st else "LiteRT backend not registered")
    elif "EDGETPU" not in st.devices:
        from accelerators.litert_backend import EDGETPU_LIB_HELP

        info.usable, info.reason = False, f"EdgeTPU library not installed: {EDGETPU_LIB_HELP}"


def _runtime_devices(backends: dict[str, Backend]) -> list[AcceleratorInfo]:
    out = []
    ov = backends.get("openvino")
    if ov is not None and ov.status().available:
        for dev in ov.status().devices:
            base = dev.split(".")[0]
            if base == "MYRIAD":
                continue  # listed from USB with its location
            out.append(
                AcceleratorInfo(
                    kind=base.lower(), name=_ov_device_name(ov, dev), backend="openvino", device=dev, source="runtime"
                )
            )
    return out


def _ov_device_name(backend: Backend, device: str) -> str:
    core = getattr(backend, "_core", None)
    try:
        return str(core.get_property(device, "FULL_DEVICE_NAME"))
    except Exception:
        return device


def detect(cfg: Optional[AcceleratorsConfig] = None, backends: Optional[dict[str, Backend]] = None) -> HardwareReport:
    """Everything the `accelerators` command shows; never raises for missing hardware or runtimes."""
    from accelerators.registry import create_backends

    cfg = cfg or AcceleratorsConfig()
    backends = backends if backends is not None else create_backends(cfg)
    accels = _usb_accelerators(cfg, backends)
    for i, dev in enumerate(scan_apex(cfg.dev_root)):
        info = AcceleratorInfo(
            kind="coral-pcie", name="Coral PCIe/M.2 Accelerator", backend="litert", device=f"EDGETPU:pci:{i}",
            source="pci", location=str(dev), state="present",
        )
        _check_edgetpu(info, backends)
        accels.append(info)
    accels.extend(_runtime_devices(backends))
    if not any(a.kind == "cpu" for a in accels):
        cpu_name = platform.processor() or platform.machine()
        accels.append(AcceleratorInfo(kind="cpu", name=cpu_name, device="CPU", source="runtime"))
    return HardwareReport(
        host=host_info(cfg), accelerators=accels, backends=[b.status() for b in backends.values()]
    )


def list_accelerators(cfg: Optional[AcceleratorsConfig] = None) -> list[AcceleratorInfo]:
    """For the node's birth message."""
    return detect(cfg).accelerators
