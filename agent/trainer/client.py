"""The node's connection to the training queue: a controller (``agent.client.Controller``) that also follows
the build peers' births and wills and one training job's retained status, and resubscribes after a reconnect."""

from __future__ import annotations

import json
from typing import Any, Optional

import paho.mqtt.client as mqtt

from agent.client import Controller
from agent.config import MqttConfig
from agent.trainer.topics import job_status_topic, peer_status_filter


class TrainerClient(Controller):
    def __init__(self, cfg: MqttConfig, host: str, port: int, client_id: str):
        super().__init__(cfg, host, port, client_id=client_id)
        self.peer_states: dict[str, dict[str, Any]] = {}
        self._watched: list[str] = []
        self._peers_prefix = f"{self.prefix}/trainers/peers/"
        self.client.on_connect = self._on_connect

    def _filters(self) -> list[str]:
        return [self.reply_topic, peer_status_filter(self.prefix), *self._watched]

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        # The session is not persistent: after a reconnect every subscription is made again (the retained
        # statuses then bring this client up to date).
        if not reason_code.is_failure:
            client.subscribe([(f, 1) for f in self._filters()])

    def connect(self, timeout: float = 10.0) -> "TrainerClient":
        super().connect(timeout)
        self.client.subscribe([(f, 1) for f in self._filters()])
        return self

    def watch_job(self, job_id: str) -> None:
        """Follow a training job's retained status topic (whichever peer runs it)."""
        topic = job_status_topic(self.prefix, job_id)
        if topic not in self._watched:
            self._watched.append(topic)
            self.client.subscribe(topic, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.startswith(self._peers_prefix) and msg.topic.endswith("/status"):
            peer = msg.topic[len(self._peers_prefix): -len("/status")]
            try:
                data = json.loads(msg.payload) if msg.payload else {"state": "gone"}
            except ValueError:
                return
            if isinstance(data, dict) and "/" not in peer:
                with self._changed:
                    self.peer_states[peer] = data
                    self._changed.notify_all()
            return
        super()._on_message(client, userdata, msg)

    def peer_state(self, peer: str) -> Optional[str]:
        with self._lock:
            st = self.peer_states.get(peer)
            return st.get("state") if st else None

    def online_peers(self) -> list[str]:
        with self._lock:
            return sorted(p for p, st in self.peer_states.items() if st.get("state") == "online")

    def wait_change(self, timeout: float) -> None:
        with self._changed:
            self._changed.wait(timeout)
