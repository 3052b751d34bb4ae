"""The node's MQTT link against a real mosquitto: when it counts as connected, how it comes back after a broker
outage, and how it subscribes to requests."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.config import MqttConfig
from agent.devbroker import Mosquitto, free_port
from agent.mqtt import Backoff, MqttLink
from tests.agent_proc import AgentProc, controller, wait_until
from tests.slowlink import SlowUplink

# What a connect handshake (TCP, CONNECT/CONNACK, SUBSCRIBE/SUBACK, the fsync of the next bd_seq) may take on a
# loaded test machine, on top of the longest reconnect delay the node may be sleeping when the broker returns.
HANDSHAKE_ALLOWANCE_S = 5.0

LOST = re.compile(r"MQTT connection to \S+ lost.*; reconnecting in ([0-9.]+) s")


class Links:
    """MqttLinks made by a test, each acknowledging what it receives as the node's intake does; all stopped at the
    end."""

    def __init__(self) -> None:
        self.made: list[MqttLink] = []

    def make(self, port: int, subs: list[str], on_message: Optional[Callable[[mqtt.MQTTMessage], None]] = None,
             client_id: Optional[str] = None, **cfg: Any) -> MqttLink:
        link_ref: list[MqttLink] = []

        def received(msg: mqtt.MQTTMessage, epoch: int) -> None:
            if on_message is not None:
                on_message(msg)
            link_ref[0].ack(msg.mid, msg.qos, epoch)  # manual acks: an unacked request would come back on resume

        config = MqttConfig(host="127.0.0.1", port=port, keepalive=10, **cfg)
        link = MqttLink(config, client_id or f"test-{uuid.uuid4().hex[:8]}", "127.0.0.1", port,
                        subscriptions=lambda: subs, will=lambda: ("test/will", b"offline"), on_message=received,
                        on_connected=lambda session_present: None, on_published=lambda mid, rc: None)
        link_ref.append(link)
        self.made.append(link)
        link.start()
        return link


@pytest.fixture
def links() -> Iterator[Links]:
    made = Links()
    yield made
    for link in made.made:
        link.stop(timeout=2.0)


def _publisher(broker: Mosquitto) -> mqtt.Client:
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    wait_until(c.is_connected, 10, "the publisher's connection")
    return c


def _lost_delays(records: list[logging.LogRecord]) -> list[float]:
    return [float(m.group(1)) for r in records if (m := LOST.search(r.getMessage()))]


def test_backoff_spreads_every_delay_and_grows_to_its_cap():
    for _ in range(200):
        b = Backoff(1.0, 8.0)
        delays = [b.next_delay() for _ in range(6)]
        assert all(1.0 <= d <= cap for d, cap in zip(delays, [2, 4, 8, 8, 8, 8])), delays
        b.reset()
        assert 1.0 <= b.next_delay() <= 2.0
    # Even the first retry is jittered: a fleet that lost its broker together does not come back together.
    assert len({Backoff(1.0, 8.0).next_delay() for _ in range(20)}) > 1


def test_backoff_starts_over_at_connack(tmp_path: Path, links: Links, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="cv_worker.mqtt")
    port = free_port()
    min_s = 0.2
    link = links.make(port, ["test/req/+"], reconnect_min_s=min_s, reconnect_max_s=5.0)
    broker = Mosquitto(tmp_path / "broker", port=port)
    try:
        wait_until(lambda: link.backoff.failures >= 5, 60, "five failed connection attempts")
        broker.start()
        wait_until(link.connected.is_set, 30, "the connection once the broker is up")
        assert link.backoff.failures == 0, "a CONNACK is a success: the backoff starts over"
        # The next outage starts from reconnect_min_s again, however long the connection lasted.
        broker.kill()
        delays = wait_until(lambda: _lost_delays(caplog.records), 20, "the connection loss")
        assert delays[0] <= round(2 * min_s, 1), delays
    finally:
        broker.close()


def test_agent_is_back_within_reconnect_max_s_of_the_brokers_return(agents: Callable[..., AgentProc],
                                                                   mosquitto: Mosquitto):
    min_s, max_s = 0.2, 2.0
    a = agents("node-back", mqtt={"reconnect_min_s": min_s, "reconnect_max_s": max_s})
    mosquitto.kill()
    # Down until the backoff has reached its cap (min_s * 2**n >= max_s), so the node may be in its longest sleep.
    a.wait_log("cannot connect to", count=5, timeout=60)
    mosquitto.start()
    returned = time.monotonic()
    a.wait_log("connected to MQTT broker", count=2, timeout=max_s + HANDSHAKE_ALLOWANCE_S + 30)
    back_after = time.monotonic() - returned
    assert back_after <= max_s + HANDSHAKE_ALLOWANCE_S, f"back {back_after:.1f} s after the broker"
    # A second outage right away starts again from reconnect_min_s (the node logged the delay it chose).
    mosquitto.kill()
    a.wait_log("reconnecting in", count=2, timeout=20)
    assert [float(d) for d in LOST.findall(a.log())][1] <= round(2 * min_s, 1), a.log()[-2000:]
    mosquitto.start()
    a.wait_log("connected to MQTT broker", count=3, timeout=30)
    with controller(mosquitto) as ctl:
        assert ctl.wait(ctl.submit("node.info", node=a.node_id), 30).state == "SUCCEEDED"


def test_a_request_sent_when_the_node_says_connected_is_served(agents: Callable[..., AgentProc],
                                                               mosquitto: Mosquitto):
    """The node's word that it is connected (the log line; the same moment sets `connected`, READY=1 and the
    birth) means the broker routes requests to it: on a new session, before the broker has processed the
    node's SUBSCRIBE, a request is dropped. A slow uplink holds the node's packets for a while, so a node that
    announced itself at CONNACK would lose this request every time."""
    with SlowUplink(mosquitto.host, mosquitto.port, uplink_delay_s=1.5).start() as link, \
            controller(mosquitto) as ctl:
        a = agents("node-slow", start=False, mqtt={"port": link.port})
        a.start(timeout=30)
        assert "(session new)" in a.log()
        out = ctl.wait(ctl.submit("node.info", node=a.node_id), 30)
        assert out.state == "SUCCEEDED", out.last


def test_request_subscriptions_keep_the_retain_flag_and_skip_retained_on_resume(mosquitto: Mosquitto,
                                                                                links: Links):
    got: list[tuple[str, bytes, bool]] = []

    def record(msg: mqtt.MQTTMessage) -> None:
        got.append((msg.topic, msg.payload, bool(msg.retain)))

    pool_filter = "$share/p1/test/pool/+/request"
    link = links.make(mosquitto.port, ["test/req/+", pool_filter], on_message=record, client_id="node-ret")
    wait_until(link.connected.is_set, 20, "the link's connection")
    pub = _publisher(mosquitto)
    try:
        pub.publish("test/req/r1", b"retained", qos=1, retain=True).wait_for_publish(10)
        pub.publish("test/pool/r2/request", b"pool-retained", qos=1, retain=True).wait_for_publish(10)
        wait_until(lambda: len(got) == 2, 20, "the two requests")
        # retainAsPublished: the node sees that the publisher set retain (the intake refuses such requests).
        assert sorted(got) == [("test/pool/r2/request", b"pool-retained", True), ("test/req/r1", b"retained", True)]

        # The link's acks go out in order before this publish: once the broker acknowledges it, it has both PUBACKs,
        # and what follows cannot be a redelivery of an unacknowledged message.
        barrier = link.client.publish("test/barrier", b"", qos=1)
        wait_until(barrier.is_published, 20, "the broker's PUBACK of the barrier")
        # A lost connection; the session resumes and the link subscribes again.
        epoch = link.epoch
        sock = link.client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)
        wait_until(lambda: link.epoch > epoch and link.connected.is_set(), 30, "the reconnection")
        # Messages reach a subscriber in the order the broker queued them: once a request sent after the new
        # SUBACK is in, any retained message the re-subscription brought would be in too.
        pub.publish("test/req/after", b"after", qos=1).wait_for_publish(10)
        wait_until(lambda: any(p == b"after" for _, p, _ in got), 20, "the request sent after the reconnection")
        assert [p for _, p, _ in got] == [p for _, p, _ in got[:2]] + [b"after"], "retainHandling=1: no re-send"
        assert got[-1][2] is False

        # The retained request is still on the broker: a new subscription (a fresh node) gets it, once.
        fresh: list[tuple[str, bytes, bool]] = []
        link2 = links.make(mosquitto.port, ["test/req/+"], on_message=lambda m: fresh.append(
            (m.topic, m.payload, bool(m.retain))), client_id="node-fresh")
        wait_until(link2.connected.is_set, 20, "the second link's connection")
        wait_until(lambda: fresh, 20, "the retained request on a new subscription")
        assert fresh == [("test/req/r1", b"retained", True)]
    finally:
        for t in ("test/req/r1", "test/pool/r2/request"):
            pub.publish(t, b"", qos=1, retain=True).wait_for_publish(10)
        pub.disconnect()
        pub.loop_stop()


def _dynsec_plugin() -> Path:
    found = sorted(Path("/usr/lib").glob("**/mosquitto_dynamic_security.so"))
    if not found:
        pytest.fail("mosquitto's dynamic security plugin is missing (Debian's mosquitto package ships it)")
    return found[0]


def test_a_refused_subscription_is_an_error_in_the_log(tmp_path: Path, links: Links,
                                                       caplog: pytest.LogCaptureFixture):
    # mosquitto's acl_file grants every subscription and filters at delivery; the dynamic security plugin
    # refuses in the SUBACK (Not authorized), as brokers with subscribe ACLs do.
    broker = Mosquitto(tmp_path / "broker")
    dynsec = broker.workdir / "dynamic-security.json"  # where the broker may write it as user mosquitto
    dynsec.write_text(json.dumps({
        "defaultACLAccess": {"publishClientSend": True, "publishClientReceive": True, "subscribe": False,
                             "unsubscribe": True},
        "clients": [], "groups": [{"groupname": "anonymous", "roles": [{"rolename": "tests"}]}],
        "anonymousGroup": "anonymous",
        "roles": [{"rolename": "tests", "acls": [{"acltype": "subscribePattern", "topic": "test/#", "allow": True}]}],
    }))
    if os.geteuid() == 0:
        shutil.chown(dynsec, user="mosquitto")
    broker.extra_conf = f"plugin {_dynsec_plugin()}\nplugin_opt_config_file {dynsec}"
    broker.start()
    try:
        caplog.set_level(logging.INFO, logger="cv_worker.mqtt")
        link = links.make(broker.port, ["test/req/+", "elsewhere/req/+"], client_id="node-acl")
        wait_until(link.connected.is_set, 20, "the link's connection")
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("refused the subscription to elsewhere/req/+ (Not authorized)" in e and "node-acl" in e
                   for e in errors), errors
        assert not any("test/req/+" in e for e in errors)
        # The connection still carries what the node publishes (statuses, results): it goes on serving.
        assert "connected to MQTT broker" in caplog.text
    finally:
        broker.close()


def test_entering_a_connected_controller_keeps_its_connection(mosquitto: Mosquitto):
    """`with controller(broker) as ctl` enters a controller that is already connected. Connecting again swapped the
    socket under paho's loop thread, and now and then no CONNACK ever came (a ControllerError after 10 s)."""
    ctl = controller(mosquitto)
    sock = ctl.client.socket()
    with ctl as entered:
        assert entered is ctl and ctl.client.socket() is sock
        info = ctl.client.publish("test/ping", b"", qos=1)
        wait_until(info.is_published, 20, "the PUBACK on the controller's one connection")
