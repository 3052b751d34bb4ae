"""The agent itself over mDNS: it finds its broker, follows it when it moves, and advertises itself."""

from __future__ import annotations

import uuid

from agent.devbroker import Mosquitto
from agent.discovery import browse
from tests.agent_proc import AgentProc, controller
from tests.discovery.conftest import LO
from tests.discovery.test_broker import BrokerAds


def _wait_node(node_id: str, pred, timeout: float = 15.0):
    for event in browse(timeout, interfaces=LO):
        if event.node.node_id == node_id and event.kind != "removed" and pred(event.node):
            return event.node
    raise AssertionError(f"node {node_id} not seen with the expected TXT within {timeout}s")


def test_agent_finds_broker_follows_it_and_advertises_itself(tmp_path, mosquitto):
    node_id = f"agent-{uuid.uuid4().hex[:8]}"
    ads = BrokerAds()
    ads.add(f"mosq-a-{node_id}", mosquitto.port)
    agent = AgentProc(tmp_path / "agent", mosquitto, node_id,
                      mqtt={"host": None, "port": None, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
                      discovery={"enabled": True, "interfaces": LO, "rebrowse_after_s": 2.0,
                                 "browse_timeout_s": 1.5})
    broker_b = None
    try:
        agent.start()
        assert f"using MQTT broker 127.0.0.1:{mosquitto.port} found over mDNS" in agent.log()
        # It advertises itself, with the broker it uses and its capabilities.
        node = _wait_node(node_id, lambda n: "node.info" in n.caps)
        assert node.mqtt == f"127.0.0.1:{mosquitto.port}" and node.prefix == "cvw/v1" and node.role == "edge"
        # A model deployed over MQTT shows up in the TXT record without a re-registration.
        with controller(mosquitto) as ctl:
            out = ctl.wait(ctl.submit("model.deploy", {"source": "blazeface"}, node=node_id), timeout=60)
            assert out.state == "SUCCEEDED", out.last
        node = _wait_node(node_id, lambda n: "blazeface" in n.models)
        assert node.name == node_id
        # The broker moves: the old one dies and a new one is advertised; the node follows after rebrowse_after_s.
        mosquitto.kill()
        ads.close()
        broker_b = Mosquitto(tmp_path / "broker-b").start()
        ads = BrokerAds()
        ads.add(f"mosq-b-{node_id}", broker_b.port)
        agent.wait_log(f"connected to MQTT broker 127.0.0.1:{broker_b.port}", timeout=40)
        with controller(broker_b) as ctl:
            assert ctl.wait(ctl.submit("node.info", node=node_id), timeout=20).state == "SUCCEEDED"
    finally:
        agent.stop()
        ads.close()
        if broker_b is not None:
            broker_b.close()
    # A clean stop withdraws the advertisement.
    seen = [e for e in browse(3.0, interfaces=LO) if e.node.node_id == node_id and e.kind != "removed"]
    assert not seen
