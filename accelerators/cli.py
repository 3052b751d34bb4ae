"""`cv-worker accelerators`: what compute this node has and which backend serves which model.

The lead's agent/cli.py calls ``add_parsers(subparsers, common_parent)``; the handler gets ``(args, cfg)``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

HELP = """\
Scan for inference hardware and runtimes, and explain model placement:

  * USB: Coral USB Accelerator (1a6e:089a before its firmware loads, 18d1:9302 after),
    Intel Movidius NCS (03e7:2150) and NCS2 (03e7:2485), read from sysfs;
  * PCIe/M.2: Coral modules appear as /dev/apex_N (needs the gasket-dkms driver);
  * runtimes: OpenVINO devices (CPU, GPU, NPU, MYRIAD), LiteRT (CPU, EdgeTPU library), OpenCV DNN;
  * host: Raspberry Pi model and SoC temperature when present.

For every installed model it shows the backend:DEVICE that will run it and why each other
candidate was not chosen (runtime missing, device absent, no file in a format it reads).
Nothing is loaded or changed; no root needed.
"""

EPILOG = """\
examples:
  cv-worker accelerators
  cv-worker accelerators --json            # machine-readable (as in the birth message)
  CV_WORKER_ACCELERATORS__SYSFS_ROOT=/tmp/fake-sys cv-worker accelerators

exit status: 0 always when the scan ran (missing hardware is not an error), 1 when it could not run.
"""


def add_parsers(subparsers: Any, common_parent: argparse.ArgumentParser) -> None:
    s = subparsers.add_parser(
        "accelerators", parents=[common_parent], help="detected accelerators, backends and model placement",
        description=HELP, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    s.add_argument("--no-models", action="store_true", help="skip the per-model placement table")
    s.set_defaults(func=cmd_accelerators)


def sections(cfg: Any) -> tuple[Any, Any]:
    """(AcceleratorsConfig, ModelsConfig) from the agent config, defaults when a section is not wired (yet)."""
    from accelerators.config import AcceleratorsConfig
    from models.config import ModelsConfig

    accel = getattr(cfg, "accelerators", None) or AcceleratorsConfig()
    models = getattr(cfg, "models", None) or ModelsConfig()
    return accel, models


def _err(msg: str) -> None:
    print(f"cv-worker: error: {msg}", file=sys.stderr)


def cmd_accelerators(args: argparse.Namespace, cfg: Optional[Any]) -> int:
    try:
        return _run(args, cfg)
    except Exception as e:  # never a traceback for the operator
        _err(f"{type(e).__name__}: {e}")
        return EXIT_FAIL


def _run(args: argparse.Namespace, cfg: Optional[Any]) -> int:
    from accelerators.detect import detect
    from accelerators.registry import create_backends
    from accelerators.selection import select

    accel_cfg, models_cfg = sections(cfg)
    backends = create_backends(accel_cfg)
    report = detect(accel_cfg, backends)
    selections = []
    store_note = None
    if not args.no_models:
        from models.store import ModelStore

        root = models_cfg.resolve_dir(getattr(cfg, "state_dir", None))
        if root.is_dir():
            store = ModelStore(root, models_cfg)
            for m in store.list():
                try:
                    man = store.manifest(m.name)
                except Exception as e:  # ManifestError, StoreError: report and go on with the other models
                    store_note = f"{m.name}: {e}"
                    continue
                sel = select(man.name, list(man.files), man.preferred_backends, backends, report, accel_cfg)
                selections.append(sel)
        else:
            store_note = f"no model store at {root} (install one with `cv-worker models install blazeface`)"
    if args.json:
        doc = report.model_dump(mode="json")
        doc["models"] = [s.model_dump(mode="json") for s in selections]
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    _print(report, selections, store_note)
    return EXIT_OK


def _print(report: Any, selections: list[Any], note: Optional[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    h = report.host
    host = f"{h.machine}, {h.cpu_count} CPU(s)"
    if h.pi_model:
        host += f", {h.pi_model}"
    if h.soc_temperature_c is not None:
        host += f", SoC {h.soc_temperature_c:.1f} °C"
    con.print(f"[bold]Host:[/bold] {host}")

    t = Table(title="Accelerators", title_justify="left")
    for col in ("kind", "name", "backend:device", "found via", "state", "usable"):
        t.add_column(col)
    for a in report.accelerators:
        where = a.source + (f" {a.usb_id}" if a.usb_id else "") + (f" {a.location}" if a.location else "")
        usable = "[green]yes[/green]" if a.usable else f"[red]no[/red]: {a.reason}"
        t.add_row(a.kind, a.name, f"{a.backend or '-'}:{a.device or '-'}", where, a.state or "", usable)
    con.print(t)

    t = Table(title="Backends", title_justify="left")
    for col in ("backend", "available", "runtime", "devices", "formats"):
        t.add_column(col)
    for b in sorted(report.backends, key=lambda b: b.name):
        avail = "[green]yes[/green]" if b.available else f"[red]no[/red]: {b.reason}"
        t.add_row(b.name, avail, b.runtime or "-", ", ".join(b.devices), ", ".join(b.formats))
    con.print(t)

    if selections:
        t = Table(title="Model placement", title_justify="left")
        for col in ("model", "candidate", "decision"):
            t.add_column(col)
        for s in selections:
            for i, c in enumerate(s.candidates):
                mark = "[green]✔ [/green]" if c.ok else "  "
                t.add_row(s.model if i == 0 else "", f"{mark}{c.backend}:{c.device}", c.reason)
            if s.chosen is None:
                t.add_row("", "[red]none[/red]", "no backend on this node can run this model")
        con.print(t)
    if note:
        con.print(f"[dim]{note}[/dim]")
