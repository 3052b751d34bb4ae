"""The persistent outbox: every status and result message is stored before it is published.

Messages are added inside the state transaction that caused them and handed to the MQTT client only once that
transaction is on disk, oldest first. An entry leaves the outbox when the broker acknowledges it (PUBACK); while
the broker is away entries simply wait, and after a restart everything still in the outbox is sent again. A
message the broker refuses (an MQTT 5 PUBACK reason code >= 0x80) is logged and dropped, never retried in a loop.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
from typing import TYPE_CHECKING, Any, Optional

from agent.state import StateStore

if TYPE_CHECKING:
    from agent.mqtt import MqttLink

log = logging.getLogger("cv_worker.outbox")

# Entries handed to the MQTT client and not yet acknowledged; bounds memory when the broker is slow.
MAX_IN_FLIGHT = 500


class Outbox:
    def __init__(self, state: StateStore):
        self.state = state
        self.link: Optional["MqttLink"] = None
        self._wake = threading.Event()
        self._acks: "collections.deque[tuple[int, int]]" = collections.deque()
        self._mid_to_id: dict[int, int] = {}
        self._handed_upto = 0
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._idle = threading.Event()
        self.refused = 0
        # Entries left by an earlier run are on disk already; the generation numbers inside them belong to that
        # run's counter, so they must not be compared with this run's.
        existing = state.outbox_after(0, limit=10**9)
        self._preexisting_upto = existing[-1][0] if existing else 0
        state.add_commit_listener(lambda gen: self._wake.set())

    def add(self, topic: str, payload: Optional[dict[str, Any]], retain: bool = False, expiry: Optional[int] = None,
            correlation: Optional[str] = None, kind: str = "status", job: Optional[tuple[str, int]] = None) -> int:
        """Queue a message; call inside a state transaction. It is published after that transaction commits.

        ``payload`` None publishes an empty message (with ``retain``: clears the topic's retained message).
        ``job``: the (job id, version) a status belongs to, which lets the start-up check match statuses to jobs."""
        entry: dict[str, Any] = {
            "t": topic, "p": "" if payload is None else json.dumps(payload, separators=(",", ":"), default=str),
            "r": retain, "e": expiry, "c": correlation, "k": kind, "g": self.state.generation + 1,
        }
        if job is not None:
            entry["j"], entry["v"] = job
        return self.state.outbox_add(entry)

    def start(self, link: "MqttLink") -> None:
        self.link = link
        self._thread = threading.Thread(target=self._loop, name="outbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread:
            self._thread.join(5)

    def wake(self) -> None:
        self._wake.set()

    def on_published(self, mid: int, reason_code: int) -> None:
        """Called by the MQTT network thread on PUBACK; the outbox thread does the bookkeeping."""
        self._acks.append((mid, reason_code))
        self._wake.set()

    def depth(self) -> int:
        return self.state.outbox_len()

    def in_flight(self) -> int:
        return len(self._mid_to_id)

    def wait_empty(self, timeout: float) -> bool:
        """Wait until everything queued so far has been acknowledged by the broker (used at shutdown)."""
        self._idle.clear()
        self._wake.set()
        return self._idle.wait(timeout)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            try:
                self._settle_acks()
                self._hand_over()
            except Exception:  # keep publishing whatever one bad entry does
                log.exception("outbox error")
            if self.state.outbox_len() == 0:
                self._idle.set()

    def _settle_acks(self) -> None:
        done: list[int] = []
        while self._acks:
            mid, rc = self._acks.popleft()
            entry_id = self._mid_to_id.pop(mid, None)
            if entry_id is None:
                continue
            if rc >= 0x80:
                self.refused += 1
                doc = self.state.outbox_get(entry_id)
                log.error("broker refused message to %s (reason code %#x); dropped, not retried",
                          doc["t"] if doc else "?", rc)
            done.append(entry_id)
        if done:
            with self.state.transaction():
                self.state.outbox_remove(done)

    def _hand_over(self) -> None:
        link = self.link
        if link is None or not link.connected.is_set():
            return
        durable = self.state.durable_generation
        room = MAX_IN_FLIGHT - len(self._mid_to_id)
        if room <= 0:
            return
        for entry_id, entry in self.state.outbox_after(self._handed_upto, limit=room):
            if entry_id > self._preexisting_upto and entry.get("g", 0) > durable:
                break  # keep order: nothing goes out before the change that caused it is on disk
            mid = link.publish_entry(entry)
            if mid is None:
                if not link.connected.is_set():
                    return  # hand it over after the reconnect
                # Refused locally (e.g. invalid topic): the broker would refuse it too, so drop it now.
                self.refused += 1
                with self.state.transaction():
                    self.state.outbox_remove([entry_id])
            else:
                self._mid_to_id[mid] = entry_id
            self._handed_upto = entry_id
