"""A private mosquitto for the demo, benchmarks and tests: free loopback port, persistence, kill, restart."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A free loopback port outside the kernel's ephemeral range.

    bind(0) would hand out a port from inside that range, which is where every outgoing connection on the machine
    takes its source port: while a broker on such a port is down (before its first start, or killed to be started
    again), another process's connection may take the port, or a client retrying against it may connect to itself
    (TCP simultaneous open), and the broker then cannot listen on it."""
    low, high = _ephemeral_ports()
    candidates = range(10000, low) if low > 12000 else range(high + 1, 65536)
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.choice(candidates)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))  # no SO_REUSEADDR: a port with connections in TIME_WAIT is skipped
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


class Mosquitto:
    """One mosquitto process. ``extra_conf`` is appended to the generated config (TLS, auth listeners)."""

    def __init__(self, workdir: Path, port: Optional[int] = None, extra_conf: str = "", anonymous: bool = True,
                 save_every_change: bool = True):
        if os.geteuid() == 0:
            # Started as root, mosquitto drops to user 'mosquitto', who cannot enter pytest's 0700 temp dirs:
            # its persistence file (what makes a SIGKILLed broker keep its sessions) must live elsewhere.
            workdir = Path(tempfile.mkdtemp(prefix="cvw-mosquitto-"))
            self._own_dir = True
        else:
            self._own_dir = False
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.extra_conf = extra_conf
        self.save_every_change = save_every_change
        self.anonymous = anonymous
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.conf_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        if os.geteuid() == 0:
            # mosquitto drops to user 'mosquitto' when started as root; its files must stay writable.
            shutil.chown(self.workdir, user="mosquitto")

    def write_conf(self) -> None:
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'true' if self.anonymous else 'false'}",
            "persistence true",
            f"persistence_location {self.workdir}/",
            # Saving on every change makes a SIGKILLed broker keep what it acknowledged (see ASSETS.md), at a
            # cost that grows with the retained messages it holds; benchmarks use mosquitto's default instead.
            *(["autosave_on_changes true", "autosave_interval 1"] if self.save_every_change else []),
            "max_queued_messages 100000",
            # Without it the broker's small writes wait on Nagle + delayed ACK (~40 ms per hop); any broker that
            # serves request/response traffic wants this (docs/deployment notes say so too).
            "set_tcp_nodelay true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
        ]
        if os.geteuid() == 0:
            lines.append("user mosquitto")
        self.conf_path.write_text("\n".join(lines) + "\n" + self.extra_conf + "\n")

    def start(self, timeout: float = 10.0) -> "Mosquitto":
        mosq = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.write_conf()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([mosq, "-c", str(self.conf_path)], stdout=log, stderr=log)
        log.close()
        wait_port(self.host, self.port, timeout)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: what a power cut or an OOM kill does to the broker."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
