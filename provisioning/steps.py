"""The provisioning steps. Each returns (status, detail) for the summary; all paths live under ``root``
so tests (and image builders) can provision a directory tree instead of the running system."""

from __future__ import annotations

import grp
import hashlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

from provisioning.answers import Answers
from provisioning.assets import udev_rules_text, unit_text

Result = tuple[str, str]  # (created|updated|unchanged|kept|skipped|ok|warning|failed, detail)
CONF_DIR = "etc/cv-worker"
STATE_DIR = "var/lib/cv-worker"
MARK = ".provisioned.json"  # sha256 of the files provision wrote: tells an owner's edit from our own output
DEFAULT_VENV_BIN = "/opt/cv-worker/venv/bin"


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def render_config(a: Answers, has_password: bool, has_ca: bool) -> str:
    host, port = a.broker_host_port()
    lines = ["# Written by `cv-worker provision`; fields: docs/configuration.md. Secrets are in separate files.",
             f"node_id = {toml_value(a.node_id)}", f"pools = {toml_value(a.pools)}", "", "[mqtt]"]
    if host:
        lines.append(f"host = {toml_value(host)}")
    if port:
        lines.append(f"port = {port}")
    if a.username:
        lines.append(f"username = {toml_value(a.username)}")
    if has_password:
        lines.append('password_file = "/etc/cv-worker/mqtt-password"')
    if has_ca:
        lines.append('tls_ca = "/etc/cv-worker/ca.pem"')
    lines += ["", "[jobs]", f"enable_debug_jobs = {toml_value(a.enable_debug_jobs)}", ""]
    return "\n".join(lines)


def _ids(user: str) -> tuple[Optional[int], Optional[int]]:
    try:
        pw = pwd.getpwnam(user)
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        return None, None


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Provisioner:
    def __init__(self, root: Path, answers: Answers, force: bool = False, dry_run: bool = False):
        self.root, self.a, self.force, self.dry_run = root, answers, force, dry_run
        self.live = root.resolve() == Path("/")
        self.conf = root / CONF_DIR
        self.marks: dict[str, str] = {}
        try:
            self.marks = json.loads((self.conf / MARK).read_text())
        except (OSError, ValueError):
            pass

    # -- helpers ------------------------------------------------------------------------------------------

    def _owner(self) -> tuple[int, int]:
        uid, gid = _ids(self.a.user)
        try:
            group_gid = grp.getgrnam(self.a.user).gr_gid
        except KeyError:
            group_gid = gid
        return (uid if uid is not None else -1), (group_gid if group_gid is not None else -1)

    def write_file(self, path: Path, data: bytes, mode: int, group_readable: bool = True,
                   protect_edits: bool = False) -> Result:
        """Write atomically with mode and root:<service group>; never clobber an owner's edit unless forced."""
        rel = str(path.relative_to(self.root))
        old = path.read_bytes() if path.exists() else None
        _, gid = self._owner()
        if old == data:
            st = path.stat()
            if (st.st_mode & 0o7777) != mode or (group_readable and gid >= 0 and st.st_gid != gid):
                if not self.dry_run:
                    os.chmod(path, mode)
                    if group_readable and gid >= 0:
                        os.chown(path, -1, gid)
                return "updated", f"{rel}: mode/owner fixed"
            self.marks[rel] = _sha(data)
            return "unchanged", rel
        if old is not None and protect_edits and not self.force and self.marks.get(rel) != _sha(old):
            return "kept", f"{rel} was edited by its owner; re-run with --force to replace it"
        if self.dry_run:
            return ("updated" if old is not None else "created"), f"{rel} (dry run)"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if group_readable and gid >= 0 and os.geteuid() == 0:
            os.chown(tmp, 0, gid)
        os.replace(tmp, path)
        self.marks[rel] = _sha(data)
        return ("updated" if old is not None else "created"), rel

    def save_marks(self) -> None:
        if not self.dry_run and self.conf.is_dir():
            (self.conf / MARK).write_text(json.dumps(self.marks, indent=1, sort_keys=True) + "\n")

    # -- steps --------------------------------------------------------------------------------------------

    def user(self) -> Result:
        if _ids(self.a.user)[0] is not None:
            return "unchanged", f"user {self.a.user} exists"
        if not self.live:
            return "skipped", f"user {self.a.user} missing; create it in the target (useradd --system {self.a.user})"
        if os.geteuid() != 0:
            return "failed", f"user {self.a.user} missing and not running as root"
        if not self.dry_run:
            subprocess.run(["useradd", "--system", "--user-group", "--home-dir", "/var/lib/cv-worker",
                            "--no-create-home", "--shell", "/usr/sbin/nologin", self.a.user], check=True)
        return "created", f"system user {self.a.user}"

    def directories(self) -> list[Result]:
        out: list[Result] = []
        uid, gid = self._owner()
        for rel, owner, mode in ((CONF_DIR, (0, gid), 0o750), (STATE_DIR, (uid, gid), 0o750),
                                 (f"{STATE_DIR}/models", (uid, gid), 0o750)):
            d = self.root / rel
            existed = d.is_dir()
            if not self.dry_run:
                d.mkdir(parents=True, exist_ok=True)
                os.chmod(d, mode)
                if os.geteuid() == 0 and owner[1] >= 0:
                    os.chown(d, owner[0], owner[1])
            out.append(("unchanged" if existed else "created", f"{rel}/ mode {mode:o}, owner {self.a.user}"))
        return out

    def secrets(self) -> list[Result]:
        out: list[Result] = []
        password = self.a.secret()
        if password:
            out.append(self.write_file(self.conf / "mqtt-password", password.encode() + b"\n", 0o640))
        if self.a.tls_ca:
            out.append(self.write_file(self.conf / "ca.pem", Path(self.a.tls_ca).read_bytes(), 0o640))
        return out

    def config(self) -> Result:
        # Secrets written by an earlier run stay referenced even when this run was not given them again.
        has_pw = bool(self.a.secret()) or (self.conf / "mqtt-password").is_file()
        has_ca = bool(self.a.tls_ca) or (self.conf / "ca.pem").is_file()
        text = render_config(self.a, has_pw, has_ca)
        return self.write_file(self.conf / "config.toml", text.encode(), 0o640, protect_edits=True)

    def udev(self) -> Result:
        r = self.write_file(self.root / "etc/udev/rules.d/99-cv-worker-accelerators.rules",
                            udev_rules_text().encode(), 0o644, group_readable=False)
        if r[0] in ("created", "updated") and self.live and shutil.which("udevadm") and not self.dry_run:
            subprocess.run(["udevadm", "control", "--reload"], check=False)
            subprocess.run(["udevadm", "trigger", "--subsystem-match=usb", "--subsystem-match=apex"], check=False)
        return r

    def unit(self) -> list[Result]:
        out = [self.write_file(self.root / "etc/systemd/system/cv-worker.service", unit_text().encode(), 0o644,
                               group_readable=False)]
        venv_bin = str(Path(sys.argv[0]).resolve().parent) if Path(sys.argv[0]).name == "cv-worker" \
            else str(Path(sys.executable).parent)
        dropin = self.root / "etc/systemd/system/cv-worker.service.d/venv.conf"
        if venv_bin != DEFAULT_VENV_BIN:
            text = f"[Service]\nExecStart=\nExecStart={venv_bin}/cv-worker run --config /etc/cv-worker/config.toml\n"
            out.append(self.write_file(dropin, text.encode(), 0o644, group_readable=False))
        # `systemctl enable` is this symlink; making it directly also works in an image or chroot.
        link = self.root / "etc/systemd/system/multi-user.target.wants/cv-worker.service"
        if link.is_symlink():
            out.append(("unchanged", "enabled (multi-user.target.wants)"))
        else:
            if not self.dry_run:
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to("/etc/systemd/system/cv-worker.service")
            out.append(("created", "enabled (multi-user.target.wants)"))
        return out

    def start(self, changed: bool) -> Result:
        if not self.live or not Path("/run/systemd/system").is_dir():
            return "skipped", "systemd is not running here; the unit starts on the next boot"
        if self.dry_run:
            return "skipped", "dry run"
        subprocess.run(["systemctl", "daemon-reload"], check=True)
        verb = "restart" if changed else "start"
        r = subprocess.run(["systemctl", verb, "cv-worker"], capture_output=True, text=True)
        if r.returncode:
            return "failed", f"systemctl {verb} cv-worker: {r.stderr.strip()} (journalctl -u cv-worker)"
        return "ok", f"systemctl {verb} cv-worker"

    def broker(self, timeout: float = 3.0) -> Result:
        host, port = self.a.broker_host_port()
        if host:
            port = port or (8883 if self.a.tls_ca else 1883)
            try:
                socket.create_connection((host, port), timeout=timeout).close()
                return "ok", f"broker {host}:{port} reachable"
            except OSError as e:
                return "warning", f"broker {host}:{port} not reachable now ({e}); the agent keeps retrying"
        from agent.config import DiscoveryConfig
        from agent.discovery import find_broker

        found = find_broker(DiscoveryConfig(browse_timeout_s=timeout), require_tls=bool(self.a.tls_ca))
        if found is None:
            return "warning", "no broker configured and none advertised over mDNS (_mqtt._tcp); give --broker"
        return "ok", f"no broker configured; the agent will use {found.host}:{found.port} found over mDNS"

    def accelerators(self) -> list[Result]:
        from accelerators.detect import list_accelerators

        out: list[Result] = []
        try:
            found = [a for a in list_accelerators() if a.source != "runtime" or a.kind != "cpu"]
        except Exception as e:  # detection must never stop provisioning
            return [("warning", f"accelerator detection failed: {e}")]
        for acc in found:
            if acc.usable:
                out.append(("ok", f"{acc.name} usable via {acc.backend} {acc.device}"))
            else:
                out.append(("warning", f"{acc.name} found but not usable: {acc.reason}"))
        wanted = self.a.accelerator
        kinds = {acc.kind for acc in found}
        if wanted in ("coral", "coral-pcie", "movidius") and not any(k.startswith(wanted.split("-")[0]) for k in kinds):
            out.append(("warning", f"{wanted} declared but not detected: is it plugged in (lsusb / ls /dev/apex_*)?"))
        if not out:
            out.append(("ok", "no accelerator found; models run on the CPU"))
        return out
