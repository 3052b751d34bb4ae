"""Which backend and device serve a model, and why the others were not chosen.

Inputs are plain data (the model's file formats and preference list) so that this module does not depend on the
model store; ``models.runtime`` calls it with a manifest, the `accelerators` command with every installed model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from pydantic import BaseModel

from accelerators.base import Backend
from accelerators.config import AcceleratorsConfig
from accelerators.detect import HardwareReport


class Candidate(BaseModel):
    backend: str
    device: str
    format: Optional[str] = None
    ok: bool = False
    reason: str = ""


class Selection(BaseModel):
    model: str
    chosen: Optional[Candidate] = None
    candidates: list[Candidate]

    def explain(self) -> str:
        lines = []
        for c in self.candidates:
            mark = "->" if c is self.chosen else "  "
            lines.append(f"{mark} {c.backend}:{c.device}  {c.reason}")
        return "\n".join(lines)


def _device_present(backend: Backend, device: str, report: HardwareReport) -> tuple[bool, str]:
    st = backend.status()
    base = device.split(":")[0].split(".")[0].upper()
    if backend.name == "litert" and base == "EDGETPU":
        tpus = [a for a in report.accelerators if a.kind.startswith("coral")]
        if not tpus:
            return False, "no Coral EdgeTPU detected (USB 1a6e:089a/18d1:9302 or /dev/apex_N)"
        if not any(a.usable for a in tpus):
            return False, tpus[0].reason or "Coral EdgeTPU not usable"
        return True, ""
    if base in ("AUTO", "MULTI", "HETERO"):
        return True, ""
    if any(d.split(".")[0].upper() == base for d in st.devices):
        return True, ""
    return False, f"{backend.name} reports no {base} device (has: {', '.join(st.devices) or 'none'})"


def select(
    model: str,
    formats: Sequence[str],
    preferred: Sequence[str],
    backends: dict[str, Backend],
    report: HardwareReport,
    config: Optional[AcceleratorsConfig] = None,
) -> Selection:
    """Walk the model's preferred ``backend:DEVICE`` list (then the node's) and keep the first that can run it."""
    config = config or AcceleratorsConfig()
    order: list[str] = []
    for item in list(preferred) + list(config.preference):
        key = item if ":" in item else f"{item}:CPU"
        if key not in order:
            order.append(key)
    have = set(formats)
    cands: list[Candidate] = []
    chosen: Optional[Candidate] = None
    for key in order:
        bname, _, device = key.partition(":")
        c = Candidate(backend=bname, device=device)
        cands.append(c)
        b = backends.get(bname)
        if b is None:
            c.reason = "no such backend"
            continue
        st = b.status()
        if not st.available:
            c.reason = f"unavailable: {st.reason}"
            continue
        present, why = _device_present(b, device, report)
        if not present:
            c.reason = why
            continue
        readable = [f for f in b.formats_for(device) if f in have]
        if not readable:
            c.reason = f"model has no {' or '.join(b.formats_for(device))} file (has: {', '.join(sorted(have))})"
            continue
        c.format = readable[0]
        if chosen is None:
            c.ok = True
            c.reason = f"chosen: {c.format} file on {st.runtime}"
            chosen = c
        else:
            c.reason = f"could run it, but {chosen.backend}:{chosen.device} is preferred"
    return Selection(model=model, chosen=chosen, candidates=cands)
