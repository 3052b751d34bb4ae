"""A controller-side client: publish a job to a node or pool and follow its status and results.

Used by ``cv-worker submit``, the demo, the benchmarks and the tests; also a small Python API for fleet
controllers (``Controller(cfg).submit(...)``). Requests carry an MQTT 5 Response Topic and Correlation Data, so
replies come back on this client's private topic even when a pool decides which node runs the job.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

from agent.config import MqttConfig
from agent.mqtt import make_client, publish_properties
from agent.protocol import TERMINAL_STATES, JobState


class ControllerError(Exception):
    pass


@dataclass
class JobOutcome:
    job_id: str
    statuses: list[dict[str, Any]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last(self) -> Optional[dict[str, Any]]:
        return self.statuses[-1] if self.statuses else None

    @property
    def state(self) -> Optional[str]:
        return self.last["state"] if self.last else None

    @property
    def done(self) -> bool:
        """The job ended and its final result arrived (every job that ends sends one before its terminal status;
        a job the node pruned long ago is answered with its final status alone)."""
        if self.last is None or JobState(self.last["state"]) not in TERMINAL_STATES:
            return False
        return any(r.get("final") for r in self.results) or bool((self.last.get("details") or {}).get("pruned"))

    @property
    def final(self) -> Optional[dict[str, Any]]:
        return next((r for r in self.results if r.get("final")), None)


class Controller:
    """One MQTT connection that can submit many jobs and wait for them."""

    def __init__(self, cfg: MqttConfig, host: str, port: int, client_id: Optional[str] = None):
        self.cfg = cfg
        self.prefix = cfg.topic_prefix
        self.client_id = client_id or f"cvw-ctl-{uuid.uuid4().hex[:10]}"
        self.reply_topic = f"{self.prefix}/clients/{self.client_id}/replies"
        self.client = make_client(cfg, self.client_id)
        self.client.on_message = self._on_message
        self._outcomes: dict[str, JobOutcome] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._events: "queue.Queue[tuple[str, dict[str, Any]]]" = queue.Queue()
        self.host, self.port = host, port
        self.node_states: dict[str, dict[str, Any]] = {}
        self._connected = False

    def connect(self, timeout: float = 10.0) -> "Controller":
        if self._connected:
            # Entering a connected controller (`with Controller(...).connect() as ctl`): paho's loop thread owns the
            # connection now, and a second connect() would swap the socket under its feet (seen as a CONNACK that
            # never comes).
            return self
        try:
            self.client.connect(self.host, self.port, keepalive=30)
        except (OSError, ValueError) as e:
            raise ControllerError(f"cannot reach the MQTT broker at {self.host}:{self.port}: {e}") from None
        self.client.loop_start()
        deadline = time.monotonic() + timeout
        while not self.client.is_connected():
            if time.monotonic() > deadline:
                self.close()
                raise ControllerError(f"the broker at {self.host}:{self.port} did not accept the connection "
                                      "(check credentials and TLS settings)")
            time.sleep(0.02)
        filters = [self.reply_topic, f"{self.prefix}/nodes/+/status"]
        subacks: set[int] = set()
        subacked = threading.Condition()

        def on_subscribe(client: mqtt.Client, userdata: Any, mid: int, reason_codes: list[Any], props: Any) -> None:
            with subacked:
                subacks.add(mid)
                subacked.notify_all()

        self.client.on_subscribe = on_subscribe
        _, mid = self.client.subscribe([(f, 1) for f in filters])
        # Wait for the SUBACK rather than a guessed pause: from then on the broker routes the retained node births
        # (node_states) and every reply to this client.
        with subacked:
            got = subacked.wait_for(lambda: mid in subacks, max(0.0, deadline - time.monotonic()) + 5.0)
        self.client.on_subscribe = None
        if not got:
            self.close()
            raise ControllerError(f"the broker at {self.host}:{self.port} did not acknowledge the subscriptions")
        self._connected = True
        return self

    def close(self) -> None:
        self._connected = False
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> "Controller":
        return self.connect()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            data = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        if msg.topic.endswith("/status") and "/nodes/" in msg.topic and "/jobs/" not in msg.topic:
            self.node_states[msg.topic.split("/")[-2]] = data
            return
        job_id = data.get("job_id")
        corr = getattr(msg.properties, "CorrelationData", None)
        if corr:
            job_id = corr.decode(errors="replace")
        if not job_id:
            return
        with self._changed:
            outcome = self._outcomes.setdefault(job_id, JobOutcome(job_id))
            if "state" in data and "version" in data:
                # At-least-once delivery: keep one copy of each version, in version order.
                if all(s["version"] != data["version"] for s in outcome.statuses):
                    outcome.statuses.append(data)
                    outcome.statuses.sort(key=lambda s: s["version"])
                    self._events.put(("status", data))
            elif "seq" in data:
                if all(r["seq"] != data["seq"] for r in outcome.results):
                    outcome.results.append(data)
                    outcome.results.sort(key=lambda r: r["seq"])
                    self._events.put(("result", data))
            self._changed.notify_all()

    def request_topic(self, job_id: str, node: Optional[str] = None, pool: Optional[str] = None) -> str:
        if (node is None) == (pool is None):
            raise ControllerError("name exactly one target: a node (--node) or a pool (--pool)")
        if pool:
            return f"{self.prefix}/pools/{pool}/jobs/{job_id}/request"
        return f"{self.prefix}/nodes/{node}/jobs/{job_id}/request"

    def submit(self, job_type: str, params: Optional[dict[str, Any]] = None, node: Optional[str] = None,
               pool: Optional[str] = None, job_id: Optional[str] = None, timeout_s: Optional[float] = None,
               priority: int = 0, raw_payload: Optional[bytes] = None, topic: Optional[str] = None) -> str:
        """Publish a request (QoS 1) and wait for the broker's PUBACK. Returns the job id.

        ``topic`` replaces the node/pool request topic (e.g. the training queue, see agent.trainer.topics)."""
        job_id = job_id or f"{job_type.replace('.', '-')}-{uuid.uuid4().hex[:12]}"
        topic = topic or self.request_topic(job_id, node, pool)
        body: dict[str, Any] = {"type": job_type, "params": params or {}}
        if timeout_s is not None:
            body["timeout_s"] = timeout_s
        if priority:
            body["priority"] = priority
        payload = raw_payload if raw_payload is not None else json.dumps(body).encode()
        with self._lock:
            self._outcomes.setdefault(job_id, JobOutcome(job_id))
        props = publish_properties(correlation=job_id.encode(), response_topic=self.reply_topic)
        info = self.client.publish(topic, payload, qos=1, properties=props)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ControllerError(f"publish failed: {mqtt.error_string(info.rc)}")
        info.wait_for_publish(10)
        return job_id

    def outcome(self, job_id: str) -> JobOutcome:
        with self._lock:
            return self._outcomes.setdefault(job_id, JobOutcome(job_id))

    def wait(self, job_id: str, timeout: Optional[float] = None,
             on_update: Optional[Callable[[JobOutcome], None]] = None) -> JobOutcome:
        """Block until the job ends (and, if it succeeded, its final result arrived). Raises TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            outcome = self._outcomes.setdefault(job_id, JobOutcome(job_id))
            while not outcome.done:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"job {job_id} not finished after {timeout} s (state {outcome.state})")
                self._changed.wait(0.2 if remaining is None else min(0.2, remaining))
                if on_update is not None:
                    self._changed.release()
                    try:
                        on_update(outcome)
                    finally:
                        self._changed.acquire()
            return outcome
