"""The agent's systemd protocol (Type=notify) over a real notify socket: READY=1 only once the MQTT session is up."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

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

    def collect(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                got.extend(sock.recv(4096).decode().split("\n"))
            except socket.timeout:
                pass

    broker = None
    try:
        collect(4.0)  # no broker yet
        assert "READY=1" not in got
        assert any(m.startswith("STATUS=waiting for broker 127.0.0.1:") for m in got), got
        assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in got), "start-up is extended, not timed out"
        assert "WATCHDOG=1" in got, "the watchdog is fed while start-up progresses"
        broker = Mosquitto(tmp_path / "broker", port=port).start()
        collect(5.0)
        assert "READY=1" in got
        assert "STATUS=connected to broker, serving jobs" in got
        agent.terminate()
        agent.wait(20)
        collect(0.5)
        assert "STOPPING=1" in got
    finally:
        if agent.poll() is None:
            agent.kill()
        if broker is not None:
            broker.close()
        sock.close()
