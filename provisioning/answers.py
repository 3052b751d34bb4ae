"""What `cv-worker provision` needs to know: defaults, then an answers file, then flags, then prompts."""

from __future__ import annotations

import json
import socket
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

try:
    import tomllib
except ImportError:  # Python < 3.11 (Pi OS bullseye)
    import tomli as tomllib  # type: ignore[no-redef]

ACCELERATORS = ("auto", "none", "coral", "coral-pcie", "movidius", "openvino")


@dataclass
class Answers:
    node_id: str = ""
    broker: str = ""  # host[:port]; empty: find one over mDNS at run time
    username: str = ""
    password: str = field(default="", repr=False)
    password_file: str = ""  # read the password from this file instead
    tls_ca: str = ""  # a CA file to copy to /etc/cv-worker/ca.pem
    pools: list[str] = field(default_factory=list)
    accelerator: str = "auto"
    user: str = "cv-worker"
    enable_debug_jobs: bool = False

    def broker_host_port(self) -> tuple[Optional[str], Optional[int]]:
        if not self.broker:
            return None, None
        host, sep, port = self.broker.rpartition(":")
        if sep and port.isdigit() and "]" not in port:
            return host.strip("[]"), int(port)
        return self.broker.strip("[]"), None

    def secret(self) -> str:
        if self.password_file:
            return Path(self.password_file).read_text().strip()
        return self.password

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d["password"] = "***" if self.password else ""
        return d


def default_node_id(root: Path) -> str:
    """Same rule as the agent: cvw- and the first 12 characters of the machine id, else the host name."""
    try:
        mid = (root / "etc/machine-id").read_text().strip()
        if mid:
            return f"cvw-{mid[:12]}"
    except OSError:
        pass
    return socket.gethostname().split(".")[0] or "cvw-node"


def load_answers_file(path: Path) -> dict[str, Any]:
    """TOML or JSON with the field names of :class:`Answers`; unknown keys are an error (typos must not pass)."""
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    known = {f.name for f in fields(Answers)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return data


def from_existing_config(root: Path) -> dict[str, Any]:
    """Answers implied by a config.toml already there: a re-run keeps them as its defaults."""
    try:
        data = tomllib.loads((root / "etc/cv-worker/config.toml").read_text())
    except (OSError, ValueError):
        return {}
    mqtt = data.get("mqtt", {})
    out: dict[str, Any] = {k: data[k] for k in ("node_id", "pools") if k in data}
    if mqtt.get("host"):
        out["broker"] = f"{mqtt['host']}:{mqtt['port']}" if mqtt.get("port") else mqtt["host"]
    if mqtt.get("username"):
        out["username"] = mqtt["username"]
    if "enable_debug_jobs" in data.get("jobs", {}):
        out["enable_debug_jobs"] = bool(data["jobs"]["enable_debug_jobs"])
    return out


def collect(root: Path, file_data: dict[str, Any], flags: dict[str, Any], interactive: bool,
            ask: Callable[[str, str], str] = lambda q, d: input(f"{q} [{d}]: ")) -> Answers:
    a = Answers(node_id=default_node_id(root))
    for source in (from_existing_config(root), file_data, {k: v for k, v in flags.items() if v is not None}):
        for k, v in source.items():
            setattr(a, k, v)
    if isinstance(a.pools, str):
        a.pools = [p.strip() for p in a.pools.split(",") if p.strip()]
    if interactive:
        a.node_id = ask("Node id", a.node_id) or a.node_id
        a.broker = ask("MQTT broker host[:port] (empty: find one over mDNS)", a.broker) or a.broker
        a.username = ask("MQTT user name (empty: none)", a.username) or a.username
        if a.username and not (a.password or a.password_file):
            import getpass

            a.password = getpass.getpass("MQTT password (not echoed; empty: none): ")
        pools = ask("Pools (comma separated)", ",".join(a.pools))
        a.pools = [p.strip() for p in pools.split(",") if p.strip()]
        a.accelerator = ask(f"Accelerator ({'/'.join(ACCELERATORS)})", a.accelerator) or a.accelerator
    if a.accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator must be one of {', '.join(ACCELERATORS)}, not {a.accelerator!r}")
    if not a.node_id or any(c in a.node_id for c in "/#+ "):
        raise ValueError(f"node id {a.node_id!r} is empty or has MQTT wildcard or space characters")
    return a


def is_interactive(non_interactive: bool) -> bool:
    return not non_interactive and sys.stdin.isatty()
