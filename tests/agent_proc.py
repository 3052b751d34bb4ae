"""Runs a real cv-worker agent process for tests, and a controller that watches its topics."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.client import Controller
from agent.config import MqttConfig
from agent.devbroker import Mosquitto

REPO = Path(__file__).resolve().parent.parent
CONNECTED = "connected to MQTT broker"  # what the agent logs on every CONNACK


def child_pids(pid: int) -> list[int]:
    try:
        return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    except FileNotFoundError:
        return []


def _die_with_parent() -> None:
    """In the agent's process before it runs: SIGKILL it when the test process goes, so an interrupted or crashed
    test run never leaves agents behind (they would hold brokers' ports and tmpfs mounts). Linux ties this to the
    thread that started the process: start agents from the test's own thread, not from a short-lived one."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def toml_value(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, bool) else ("true" if v else "false")


def write_config(path: Path, data: dict[str, Any]) -> Path:
    lines = []
    sections = {k: v for k, v in data.items() if isinstance(v, dict)}
    # None means "leave unset" (TOML has no null).
    for k, v in data.items():
        if not isinstance(v, dict) and v is not None:
            lines.append(f"{k} = {toml_value(v)}")
    for name, sec in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in sec.items() if v is not None]
    path.write_text("\n".join(lines) + "\n")
    return path


class AgentProc:
    """One `cv-worker run` process with its own config and state directory."""

    command = "run"  # the cv-worker subcommand this process runs
    repo = REPO  # the checkout whose code runs (a benchmark may point it at another version)

    def __init__(self, workdir: Path, broker: Mosquitto, node_id: str, **overrides: Any):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.node_id = node_id
        self.broker = broker
        self.state_dir = self.workdir / "state"
        cfg: dict[str, Any] = {
            "node_id": node_id,
            "state_dir": str(self.state_dir),
            "mqtt": {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.2, "reconnect_max_s": 2.0,
                     "keepalive": 10},
            "jobs": {"enable_debug_jobs": True, "progress_interval_s": 0.1},
            "discovery": {"enabled": False},
            # Tests that want the HTTP API enable it on a free port (tests/http); the default port would collide.
            "http": {"enabled": False},
        }
        for key, value in overrides.items():
            if isinstance(value, dict):
                cfg.setdefault(key, {}).update(value)
            else:
                cfg[key] = value
        self.cfg = cfg
        self.config_path = write_config(self.workdir / "config.toml", cfg)
        self.log_path = self.workdir / "agent.log"
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.wrapped = False  # self.proc is the wrapper (strace), the agent its child

    def start(self, wait_online: bool = True, timeout: float = 20.0, wrap: tuple[str, ...] = (),
              env: Optional[dict[str, str]] = None) -> "AgentProc":
        """``wrap``: a command the agent runs under (e.g. faketime, strace); ``env``: extra environment.
        ``wait_online``: until this run is serving (the log is appended to, so earlier runs' lines do not count)."""
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env.pop("CV_WORKER_CONFIG", None)
        connected_before = self.log().count(CONNECTED)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*wrap, sys.executable, "-m", "agent.cli", self.command, "--config", str(self.config_path)],
            stdout=log, stderr=log, cwd=self.repo, env=full_env, preexec_fn=_die_with_parent,
        )
        log.close()
        self.wrapped = bool(wrap)
        if wait_online:
            self.wait_log(CONNECTED, timeout, count=connected_before + 1)
        return self

    def wait_log(self, text: str, timeout: float = 20.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count(text) >= count:
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"agent log has no {text!r} after {timeout}s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGABRT)  # faulthandler writes every thread's stack to the log
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
                self.proc = None
                raise AssertionError(f"agent did not stop within {timeout}s:\n{self.log()[-8000:]}") from None
        rc = self.proc.returncode
        self.proc = None
        assert "STATE SNAPSHOT MISMATCH" not in self.log(), self.log()[-3000:]
        return rc

    def kill(self) -> None:
        """SIGKILL: a power cut as far as the agent can tell."""
        if self.proc is not None and self.proc.poll() is None:
            if self.wrapped:
                # Killing the tracer would only detach the agent; killed, the agent takes the tracer with it.
                for pid in child_pids(self.proc.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            else:
                self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agent.cli", *args, "--config", str(self.config_path)],
                              capture_output=True, text=True, cwd=self.repo, timeout=timeout)

    def jobs(self) -> dict[str, dict[str, Any]]:
        """The jobs in the agent's state on disk (read as `cv-worker jobs` does, also while it runs)."""
        from agent.state import StateStore

        if not self.state_dir.exists():
            return {}
        return {j["job_id"]: j for j in StateStore(self.state_dir, read_only=True).all_jobs()}


def subscribe_and_wait(client: mqtt.Client, filters: list[tuple[str, int]], timeout: float = 20.0) -> None:
    """Subscribe and return once the broker has acknowledged it (SUBACK): what is published from then on reaches
    ``client``. Fails on a refused subscription."""
    if not filters:
        return
    acked: dict[int, list[Any]] = {}
    cond = threading.Condition()

    def on_subscribe(c: mqtt.Client, userdata: Any, mid: int, reason_codes: list[Any], properties: Any) -> None:
        with cond:
            acked[mid] = reason_codes
            cond.notify_all()

    client.on_subscribe = on_subscribe
    _, mid = client.subscribe(filters)
    with cond:
        if not cond.wait_for(lambda: mid in acked, timeout):
            raise AssertionError(f"the broker did not acknowledge the subscriptions to {filters} in {timeout} s")
    client.on_subscribe = None
    assert not any(rc.is_failure for rc in acked[mid]), (filters, acked[mid])


def wait_until(pred: Callable[[], Any], timeout: float = 20.0, what: str = "condition",
               detail: Callable[[], Any] = lambda: "", poll: float = 0.05) -> Any:
    """Poll ``pred`` until it returns something true (returned), or fail after ``timeout`` naming ``what``.
    ``poll``: longer for a costly ``pred`` (one that reads the node's whole state)."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met after {timeout} s {detail()}")
        time.sleep(poll)


def controller(broker: Mosquitto, **mqtt_overrides: Any) -> Controller:
    cfg = MqttConfig(host=broker.host, port=broker.port, **mqtt_overrides)
    return Controller(cfg, broker.host, broker.port).connect()


class Recorder:
    """Subscribes to topic filters and records every message (topic, payload dict or bytes, properties, retain).

    ``session_expiry_s`` > 0 gives it a persistent session (pass a fixed ``client_id``): it reconnects by itself
    after a broker restart and the broker keeps what was published for it meanwhile, as a controller that must not
    miss a status would do."""

    def __init__(self, broker: Mosquitto, *filters: str, session_expiry_s: int = 0, **client_kw: Any):
        self.messages: list[tuple[str, Any, Any, bool]] = []
        self._cond = threading.Condition()
        self.filters = filters
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5,
                                  **client_kw)
        self.client.on_message = self._on_message
        if session_expiry_s:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = session_expiry_s
            self.client.reconnect_delay_set(0.05, 0.5)
            self.client.connect(broker.host, broker.port, clean_start=False, properties=props)
        else:
            self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        wait_until(self.client.is_connected, 10, "the recorder's connection")
        # Recording starts when the broker has taken the subscriptions, not after a guessed pause: anything
        # published from then on is ours.
        subscribe_and_wait(self.client, [(f, 1) for f in filters])
        self.client.on_connect = self._on_reconnect

    def _on_reconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        # A resumed session still holds the subscriptions (and what arrived for them while we were away).
        if self.filters and not flags.session_present:
            client.subscribe([(f, 1) for f in self.filters])

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            payload: Any = json.loads(msg.payload)
        except ValueError:
            payload = msg.payload
        with self._cond:
            self.messages.append((msg.topic, payload, msg.properties, bool(msg.retain)))
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[list[tuple[str, Any, Any, bool]]], bool], timeout: float = 20.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: pred(self.messages), timeout):
                raise AssertionError(f"condition not met after {timeout}s; got {len(self.messages)} messages: "
                                     f"{[(t, p) for t, p, _, _ in self.messages[-10:]]}")

    def payloads(self, topic_suffix: str = "") -> list[Any]:
        with self._cond:
            return [p for t, p, _, _ in self.messages if t.endswith(topic_suffix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def final_states(rec: Recorder, node_id: str, prefix: str = "cvw/v1") -> dict[str, dict[str, Any]]:
    """Latest status (highest version) of each job seen on a node's status topics."""
    out: dict[str, dict[str, Any]] = {}
    for topic, payload, _, _ in list(rec.messages):
        mine = topic.startswith(f"{prefix}/nodes/{node_id}/jobs/") and topic.endswith("/status")
        if mine and isinstance(payload, dict):
            cur = out.get(payload["job_id"])
            if cur is None or payload["version"] > cur["version"]:
                out[payload["job_id"]] = payload
    return out
