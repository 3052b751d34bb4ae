"""The agent's systemd protocol (Type=notify) over a real notify socket: READY=1 only once the MQTT session is up."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Callable

from agent.devbroker import Mosquitto, free_port
from tests.agent_proc import REPO, write_config


def test_ready_only_after_the_broker_connection(tmp_path):
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.5)
    port = free_port()
    cfg = write_config(tmp_path / "c.toml", {
        "node_id": "notify-node", "state_dir": str(tmp_path / "state"),
        "mqtt": {"host": "127.0.0.1", "port": port, "reconnect_min_s": 0.2, "reconnect_max_s": 0.5},
        "discovery": {"enabled": False},
    })
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "2000000"}
    agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    got: list[str] = []

    def collect_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < end, f"no {what} after {timeout} s: {got}"
            try:
                got.extend(sock.recv(4096).decode().split("\n"))
            except socket.timeout:
                pass

    broker = None
    try:
        # No broker yet: start-up is extended (not timed out) and the watchdog fed, twice over, never READY=1.
        collect_until(lambda: got.count("WATCHDOG=1") >= 2 and
                      sum(m.startswith("EXTEND_TIMEOUT_USEC=") for m in got) >= 2, 30, "extended start-up")
        assert "READY=1" not in got
        assert any(m.startswith("STATUS=waiting for broker 127.0.0.1:") for m in got), got
        broker = Mosquitto(tmp_path / "broker", port=port).start()
        collect_until(lambda: "READY=1" in got, 30, "READY=1")
        assert "STATUS=connected to broker, serving jobs" in got
        agent.terminate()
        agent.wait(20)
        collect_until(lambda: "STOPPING=1" in got, 5, "STOPPING=1")
    finally:
        if agent.poll() is None:
            agent.kill()
        if broker is not None:
            broker.close()
        sock.close()
