"""`cv-worker discover`: JSON and table output, with the status cross-checked against a real broker."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import AgentConfig, DiscoveryConfig
from agent.devbroker import Mosquitto, free_port
from agent.discovery import Advertiser
from agent.discovery_cli import add_parser, run_discover
from tests.discovery.conftest import LO


def parse(*argv: str) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config")
    parser = argparse.ArgumentParser(prog="cv-worker")
    add_parser(parser.add_subparsers(dest="command"), [common])
    return parser.parse_args(["discover", *argv])


def publish_retained(broker: Mosquitto, topic: str, payload: dict) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-birth", protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.publish(topic, json.dumps(payload), qos=1, retain=True).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


@pytest.fixture
def cfg(tmp_path: Path) -> AgentConfig:
    return AgentConfig(node_id="technician-laptop", state_dir=tmp_path, discovery=DiscoveryConfig(interfaces=LO))


@pytest.fixture
def three_nodes(node_id: str, mosquitto: Mosquitto) -> Iterator[dict[str, Advertiser]]:
    """online: birth message on the test broker; silent: same broker, no birth; lost: its broker is down."""
    prefix = f"cvwtest/{node_id}"
    dead = f"127.0.0.1:{free_port()}"
    ep = f"127.0.0.1:{mosquitto.port}"
    nodes = {
        "online": Advertiser(f"{node_id}-on", interfaces=LO, mqtt=ep, prefix=prefix, accel=["cpu", "coral-usb"],
                             models=["blazeface"]),
        "silent": Advertiser(f"{node_id}-si", interfaces=LO, mqtt=ep, prefix=prefix),
        "lost": Advertiser(f"{node_id}-lo", interfaces=LO, mqtt=dead, prefix=prefix),
    }
    publish_retained(mosquitto, f"{prefix}/nodes/{node_id}-on/status",
                     {"state": "online", "node_id": f"{node_id}-on", "version": "0.1.0", "boot_id": "b",
                      "bd_seq": 0, "ts": 0})
    for adv in nodes.values():
        adv.start()
    for adv in nodes.values():
        assert adv.wait_registered(10)
    yield nodes
    for adv in nodes.values():
        adv.stop()


def test_discover_json_with_mqtt_cross_check(three_nodes: dict[str, Advertiser], node_id: str, cfg: AgentConfig,
                                             mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]) -> None:
    rc = run_discover(parse("--json", "--timeout", "2.5"), cfg)
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "Traceback" not in out.err
    found = {n["node_id"]: n for n in json.loads(out.out) if n["node_id"].startswith(node_id)}
    assert set(found) == {f"{node_id}-on", f"{node_id}-si", f"{node_id}-lo"}, found
    on = found[f"{node_id}-on"]
    assert on["status"] == "online" and str(mosquitto.port) in on["status_detail"]
    assert on["addresses"] == ["127.0.0.1"] and on["accel"] == ["cpu", "coral-usb"] and on["models"] == ["blazeface"]
    assert on["role"] == "edge" and on["version"] and on["proto"] == "1"
    assert found[f"{node_id}-si"]["status"] == "unknown"
    assert "no birth message" in found[f"{node_id}-si"]["status_detail"]
    lost = found[f"{node_id}-lo"]
    assert lost["status"] == "unknown" and "unreachable" in lost["status_detail"]

    # The will / a clean shutdown replace the retained birth message: discover reports them.
    publish_retained(mosquitto, f"cvwtest/{node_id}/nodes/{node_id}-on/status", {"state": "stopped"})
    assert run_discover(parse("--json", "--timeout", "2", "--role", "edge"), cfg) == 0
    found = {n["node_id"]: n for n in json.loads(capsys.readouterr().out)}
    assert found[f"{node_id}-on"]["status"] == "stopped"


def test_discover_table(three_nodes: dict[str, Advertiser], node_id: str, cfg: AgentConfig,
                        capsys: pytest.CaptureFixture[str]) -> None:
    assert run_discover(parse("--timeout", "2.5"), cfg) == 0
    out = capsys.readouterr().out
    for header in ("node id", "addresses", "version", "role", "accelerators", "models", "status"):
        assert header in out
    assert f"{node_id}-on" in out and "online" in out and "coral-usb" in out
    assert f"{node_id}-lo: status unknown: broker" in out.replace("\n", " ") or "unreachable" in out


def test_discover_finds_nothing_for_a_role_nobody_has(cfg: AgentConfig, capsys: pytest.CaptureFixture[str]) -> None:
    cfg.discovery.interfaces = LO
    rc = run_discover(parse("--json", "--timeout", "0.5", "--role", "build", "--interface", "127.0.0.1"), cfg)
    nodes = json.loads(capsys.readouterr().out)
    assert all(n["role"] == "build" for n in nodes)
    assert rc == (0 if nodes else 1)


def test_bad_interface_and_broker_are_usage_errors(cfg: AgentConfig, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_discover(parse("--interface", "nosuch0", "--timeout", "0.2"), cfg) == 2
    assert "unknown network interface" in capsys.readouterr().err
    assert run_discover(parse("--broker", "a b c"), cfg) == 2


def test_help_teaches_with_examples() -> None:
    parser = argparse.ArgumentParser(prog="cv-worker")
    sub = parser.add_subparsers(dest="command")
    p = add_parser(sub)
    text = p.format_help()
    assert "examples:" in text and "cv-worker discover --timeout 8 --json" in text
    for flag in ("--timeout", "--json", "--watch", "--role", "--broker", "--interface"):
        assert flag in text
    assert p.get_default("func") is run_discover
