"""Broker discovery against a real mosquitto advertised under _mqtt._tcp on loopback."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from zeroconf import ServiceInfo

from agent.config import DiscoveryConfig
from agent.devbroker import Mosquitto
from agent.discovery import MQTT_TYPE, SECURE_MQTT_TYPE, find_broker, new_zeroconf
from tests.discovery.conftest import LO


class BrokerAds:
    """Advertise broker services the way avahi or a provisioning script would, from one responder."""

    def __init__(self) -> None:
        self.zc = new_zeroconf(LO)
        self.infos: list[ServiceInfo] = []

    def add(self, name: str, port: int, *, tls: bool = False, txt: dict | None = None) -> None:
        type_ = SECURE_MQTT_TYPE if tls else MQTT_TYPE
        info = ServiceInfo(type_, f"{name}.{type_}", port=port, properties=txt or {},
                           server=f"{name}-host.local.", parsed_addresses=["127.0.0.1"])
        self.zc.register_service(info, cooperating_responders=True)  # skip probing: names are unique per test
        self.infos.append(info)

    def close(self) -> None:
        for info in self.infos:
            self.zc.unregister_service(info)
        self.zc.close()


@pytest.fixture
def ads() -> Iterator[BrokerAds]:
    a = BrokerAds()
    yield a
    a.close()


def test_find_the_advertised_mosquitto_and_connect(mosquitto: Mosquitto, ads: BrokerAds) -> None:
    name = f"mosq-{uuid.uuid4().hex[:8]}"
    ads.add(name, mosquitto.port, txt={"priority": "5"})
    broker = find_broker(DiscoveryConfig(interfaces=LO, broker_preference=name), timeout=5)
    assert broker is not None
    assert (broker.name, broker.host, broker.port, broker.tls) == (name, "127.0.0.1", mosquitto.port, False)
    assert broker.priority == 5 and broker.server == f"{name}-host.local"

    # It really is the broker: connect to what discovery returned.
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"disc-{name}")
    assert client.connect(broker.host, broker.port) == mqtt.MQTT_ERR_SUCCESS
    client.disconnect()


def test_rule_prefers_tls_then_priority(mosquitto: Mosquitto, ads: BrokerAds) -> None:
    tag = uuid.uuid4().hex[:6]
    ads.add(f"plain-hi-{tag}", mosquitto.port, txt={"priority": "10"})
    ads.add(f"plain-lo-{tag}", mosquitto.port, txt={"priority": "1"})
    cfg = DiscoveryConfig(interfaces=LO)
    # Only plain brokers: the lowest priority wins.
    chosen = find_broker(cfg, timeout=2.5)
    assert chosen is not None and chosen.name == f"plain-lo-{tag}"

    ads.add(f"secure-{tag}", 8883, tls=True, txt={"priority": "50"})
    chosen = find_broker(cfg, timeout=2.5)
    assert chosen is not None and chosen.name == f"secure-{tag}" and chosen.tls and chosen.port == 8883

    # A node configured with a CA never falls back to a plain broker.
    ads_only_plain = find_broker(DiscoveryConfig(interfaces=LO, broker_preference=f"plain-hi-{tag}"), timeout=2.5,
                                 require_tls=True)
    assert ads_only_plain is not None and ads_only_plain.tls


def test_no_broker_advertised_returns_none() -> None:
    assert find_broker(DiscoveryConfig(interfaces=LO), timeout=1.0, service_types=["_cvw-none._tcp.local."]) is None
