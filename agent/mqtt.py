"""The node's MQTT connection: MQTT 5, persistent session, last will, manual acks, backoff with jitter.

The network loop runs on our own thread (``client.loop()``) instead of paho's ``loop_start`` so that we choose
the reconnect delay (exponential with full jitter, so a fleet does not reconnect in lockstep after a broker
restart) and set a fresh last will, carrying the next ``bd_seq``, before every connection attempt.

A connection counts as up (``MqttLink.connected``, the "connected to MQTT broker" log line, the birth message,
systemd's READY=1) only once the broker has acknowledged the request subscriptions (SUBACK), not at CONNACK: on a
new session the broker drops a request published before it has processed our SUBSCRIBE, so anyone who takes the
node's word that it is serving must be able to rely on it.
"""

from __future__ import annotations

import base64
import logging
import random
import socket
import ssl
import threading
import time
from typing import Any, Callable, Optional

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import MqttConfig

log = logging.getLogger("cv_worker.mqtt")


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    # paho leaves Nagle on: every small PUBLISH/PUBACK would then wait for the peer's delayed ACK (~40 ms).
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # not a TCP socket (unix socket, websocket wrapper)


def make_client(cfg: MqttConfig, client_id: str, manual_ack: bool = False) -> mqtt.Client:
    """A paho client configured from ``[mqtt]``: MQTT 5, TLS and credentials when configured."""
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5,
        manual_ack=manual_ack,
    )
    client.on_socket_open = _no_delay
    if cfg.username:
        client.username_pw_set(cfg.username, cfg.read_password())
    if cfg.tls:
        client.tls_set(
            ca_certs=str(cfg.tls_ca), certfile=str(cfg.tls_cert) if cfg.tls_cert else None,
            keyfile=str(cfg.tls_key) if cfg.tls_key else None, cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
        if cfg.tls_insecure:
            client.tls_insecure_set(True)
    return client


def valid_publish_topic(topic: Any) -> bool:
    """A topic we may publish to: what MQTT allows, minus the broker's own ``$`` topics."""
    return (isinstance(topic, str) and 0 < len(topic.encode()) < 65535 and not topic.startswith("$")
            and not any(c in topic for c in "+#\0"))


def publish_properties(expiry: Optional[int] = None, correlation: Optional[bytes] = None,
                       response_topic: Optional[str] = None) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.PayloadFormatIndicator = 1
    props.ContentType = "application/json"
    if expiry:
        props.MessageExpiryInterval = int(expiry)
    if correlation:
        props.CorrelationData = correlation
    if response_topic:
        props.ResponseTopic = response_topic
    return props


def request_subscribe_options() -> mqtt.SubscribeOptions:
    """How the node subscribes to its request filters.

    ``retainAsPublished``: the retain flag a request arrives with is the publisher's, so the intake can tell a
    retained request (which would run again on every new subscription) from a plain one; without it the broker
    clears the flag on everything it forwards live. ``retainHandling=RETAIN_SEND_IF_NEW_SUB``: retained messages
    only when the subscription is new, not again each time a resumed session re-subscribes after a reconnect."""
    return mqtt.SubscribeOptions(qos=1, retainAsPublished=True,
                                 retainHandling=mqtt.SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)


class Backoff:
    """Exponential backoff with full jitter: the n-th delay in a row is uniform(min, min(max, min * 2**n)).

    Even the first delay is spread over [min, 2 * min]: a fleet that lost its broker at the same instant must not
    all knock again at the same instant."""

    def __init__(self, min_s: float, max_s: float):
        self.min_s = min_s
        self.max_s = max(max_s, min_s)
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        cap = min(self.max_s, self.min_s * (2 ** min(self.failures, 30)))
        return random.uniform(self.min_s, cap)

    def reset(self) -> None:
        self.failures = 0


class MqttLink:
    """Owns the paho client and its connection; everything MQTT-specific stays behind this class."""

    def __init__(
        self,
        cfg: MqttConfig,
        client_id: str,
        host: str,
        port: int,
        subscriptions: Callable[[], list[str]],
        will: Callable[[], tuple[str, bytes]],
        on_message: Callable[[mqtt.MQTTMessage, int], None],
        on_connected: Callable[[bool], None],
        on_published: Callable[[int, int], None],
        rediscover: Optional[Callable[[], Optional[tuple[str, int]]]] = None,
        rediscover_after_s: float = 60.0,
    ):
        self.cfg = cfg
        self.client_id = client_id
        self.host = host
        self.port = port
        self._subscriptions = subscriptions
        self._will = will
        self._on_message_cb = on_message
        self._on_connected_cb = on_connected
        self._on_published_cb = on_published
        # Set when the broker came from mDNS: if it stays unreachable this long, browse again (it may have moved).
        self._rediscover = rediscover
        self._rediscover_after_s = rediscover_after_s
        self._down_since: Optional[float] = None
        self.client = make_client(cfg, client_id, manual_ack=True)
        self.client.max_inflight_messages_set(100)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        # Only the network thread may write to the socket. Without a loop thread of its own, paho's publish()
        # writes from the calling thread, so two publishers (outbox, streams) could interleave the bytes of a
        # partially sent large packet. With this (documented, external-event-loop) hook set, publish() only
        # queues the packet and wakes our loop, which does all the writing.
        self.client.on_socket_register_write = lambda client, userdata, sock: None
        # Set once the broker acknowledged our subscriptions: the node is serving (see the module docstring).
        self.connected = threading.Event()
        # Between CONNACK and the end of the connection: the socket carries our packets (acks, the final status)
        # even before the SUBACK, e.g. for requests a resumed session delivers right after the CONNACK.
        self._session_up = False
        self._pending_subscribe: Optional[tuple[int, list[str], bool]] = None  # (mid, filters, session_present)
        # Incremented on every CONNACK: a message id is only meaningful on the connection that delivered it.
        self.epoch = 0
        self.backoff = Backoff(cfg.reconnect_min_s, cfg.reconnect_max_s)
        self._stop = threading.Event()
        self._leaving = False  # a clean DISCONNECT is on its way: the closed socket is not a lost connection
        self._thread: Optional[threading.Thread] = None
        self.last_error: Optional[str] = None
        self.connected_since: Optional[float] = None

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)
        self._thread.start()

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.cfg.session_expiry_s
        props.ReceiveMaximum = self.cfg.receive_maximum
        return props

    def _set_will(self) -> None:
        topic, payload = self._will()
        props = Properties(PacketTypes.WILLMESSAGE)
        props.WillDelayInterval = self.cfg.will_delay_s
        props.PayloadFormatIndicator = 1
        props.ContentType = "application/json"
        self.client.will_set(topic, payload, qos=1, retain=True, properties=props)

    def _maybe_rediscover(self) -> None:
        now = time.monotonic()
        if self._rediscover is None or self._down_since is None or now - self._down_since < self._rediscover_after_s:
            return
        self._down_since = now
        found = self._rediscover()
        if found is not None and found != (self.host, self.port):
            log.warning("broker %s:%s unreachable for %.0f s; switching to %s:%s found over mDNS", self.host,
                        self.port, self._rediscover_after_s, found[0], found[1])
            self.host, self.port = found

    def _run(self) -> None:
        backoff = self.backoff
        while not self._stop.is_set():
            if self._down_since is not None:
                self._maybe_rediscover()
            try:
                self._set_will()
                self.client.connect(self.host, self.port, keepalive=self.cfg.keepalive, clean_start=False,
                                    properties=self._connect_properties())
            except (OSError, ssl.SSLError, ValueError) as e:
                if self._down_since is None:
                    self._down_since = time.monotonic()
                self.last_error = f"cannot connect to {self.host}:{self.port}: {e}"
                delay = backoff.next_delay()
                log.warning("%s; retrying in %.1f s", self.last_error, delay)
                self._stop.wait(delay)
                continue
            while not self._stop.is_set():
                rc = self.client.loop(timeout=0.5)
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
            if self._stop.is_set() or self._leaving:
                break
            self._connection_ended()
            if self._down_since is None:
                self._down_since = time.monotonic()
            delay = backoff.next_delay()
            log.warning("MQTT connection to %s:%s lost%s; reconnecting in %.1f s", self.host, self.port,
                        f" ({self.last_error})" if self.last_error else "", delay)
            self._stop.wait(delay)

    def stop(self, final: Optional[tuple[str, bytes]] = None, timeout: float = 5.0) -> None:
        """Publish ``final`` (the 'stopped' status) if connected, then disconnect cleanly (no will)."""
        # _session_up rather than connected: a stop that falls between CONNACK and SUBACK still leaves cleanly.
        if final is not None and self._session_up:
            info = self.client.publish(final[0], final[1], qos=1, retain=True, properties=publish_properties())
            deadline = time.monotonic() + timeout
            while not info.is_published() and time.monotonic() < deadline and self._session_up:
                time.sleep(0.02)
        if self._session_up:
            # Queued like everything else; the network thread sends it and closes the socket.
            self._leaving = True
            self.client.disconnect()
            deadline = time.monotonic() + 2.0
            while self._session_up and time.monotonic() < deadline:
                time.sleep(0.02)
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)
        self.connected.clear()

    # -- callbacks (network thread) -----------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self.last_error = f"broker refused the connection: {reason_code}"
            log.error("%s (check [mqtt] username/password_file/TLS settings)", self.last_error)
            return
        self.epoch += 1
        self._session_up = True
        # The broker is back: a later loss starts again from reconnect_min_s instead of the delay this outage
        # grew to (which would leave the node idle for up to reconnect_max_s after the broker's next restart).
        self.backoff.reset()
        self.last_error = None
        self._down_since = None
        self.connected_since = time.monotonic()
        session_present = bool(flags.session_present)
        subs = self._subscriptions()
        if not subs:
            self._serving(session_present)
            return
        rc, mid = client.subscribe([(s, request_subscribe_options()) for s in subs])
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            # Only a socket that is already gone gets here; the loop sees the loss and reconnects.
            log.warning("cannot subscribe to %s: %s", ", ".join(subs), mqtt.error_string(rc))
            return
        self._pending_subscribe = (mid, subs, session_present)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list[Any],
                      properties: Any) -> None:
        pending = self._pending_subscribe
        if pending is None or pending[0] != mid:
            return
        self._pending_subscribe = None
        _, subs, session_present = pending
        refused = [f"{f} ({rc})" for f, rc in zip(subs, reason_codes) if rc.is_failure]
        if refused:
            # Usually the broker's ACL: retrying would not help, and the connection still carries the node's
            # statuses and results, so the node goes on; but requests on these filters never reach it.
            self.last_error = f"broker refused the subscription to {', '.join(refused)}"
            log.error("%s: requests sent there are NOT received (check the broker's ACL for client %s)",
                      self.last_error, self.client_id)
        elif len(reason_codes) != len(subs):
            log.error("broker answered %d subscriptions with %d reason codes: %s", len(subs), len(reason_codes),
                      reason_codes)
        downgraded = [f for f, rc in zip(subs, reason_codes) if not rc.is_failure and rc.value == 0]
        if downgraded:
            log.warning("broker granted only QoS 0 on %s: requests there may be lost across a reconnect",
                        ", ".join(downgraded))
        self._serving(session_present)

    def _serving(self, session_present: bool) -> None:
        self.connected.set()
        log.info("connected to MQTT broker %s:%s (session %s)", self.host, self.port,
                 "resumed" if session_present else "new")
        self._on_connected_cb(session_present)

    def _connection_ended(self) -> None:
        self._session_up = False
        self._pending_subscribe = None
        self.connected.clear()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        was_connected = self._session_up
        self._connection_ended()
        # After a refused CONNECT the broker's close says "protocol error"; the refusal is the useful reason.
        if was_connected and reason_code is not None and getattr(reason_code, "is_failure", False):
            self.last_error = f"disconnected: {reason_code}"

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._on_message_cb(msg, self.epoch)
        except Exception:  # never let a bad message kill the network loop
            log.exception("error handling message on %s", msg.topic)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        self._on_published_cb(mid, int(reason_code.value) if hasattr(reason_code, "value") else 0)

    # -- operations (any thread) --------------------------------------------------------------------------

    def ack(self, mid: int, qos: int, epoch: int) -> None:
        """Acknowledge a request once it is durable; skipped if the connection that delivered it is gone
        (the broker then redelivers it and the job id makes the duplicate harmless)."""
        if qos > 0 and epoch == self.epoch and self._session_up:
            self.client.ack(mid, qos)

    def publish_entry(self, entry: dict[str, Any]) -> Optional[int]:
        """Publish one outbox entry; its message id, or None when it can never be published."""
        if not valid_publish_topic(entry["t"]):
            log.error("not publishing to invalid topic %r", entry["t"])
            return None
        corr = base64.b64decode(entry["c"]) if entry.get("c") else None
        try:
            info = self.client.publish(entry["t"], entry["p"], qos=1, retain=bool(entry.get("r")),
                                       properties=publish_properties(entry.get("e"), corr))
        except (ValueError, TypeError) as e:
            log.error("cannot publish to %s: %s", entry["t"], e)
            return None
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            # paho keeps the message and sends it after the reconnect in both of these cases.
            log.warning("publish to %s returned %s", entry["t"], info.rc)
        return info.mid

    def publish_now(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Publish outside the outbox (birth messages: they describe the present, not a durable event)."""
        self.client.publish(topic, payload, qos=1, retain=retain, properties=publish_properties())
