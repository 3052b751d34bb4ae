"""TXT encoding, limits, the secret guard, parsing and the broker choice rule: no network needed."""

from __future__ import annotations

import pytest
from zeroconf import ServiceInfo

from agent.config import AgentConfig, DiscoveryConfig, MqttConfig
from agent.discovery import (
    INSTANCE_MAX,
    PROTO_VERSION,
    SERVICE_TYPE,
    TXT_ENTRY_MAX,
    TXT_TOTAL_MAX,
    Advertiser,
    BrokerInfo,
    DiscoveryError,
    NodeInfo,
    SecretInTxtError,
    build_txt,
    choose_broker,
    instance_label,
    resolve_interfaces,
)


def wire_sizes(txt: dict[str, str]) -> list[int]:
    return [len(f"{k}={v}".encode()) for k, v in txt.items()]


def as_seen_by_browser(txt: dict[str, str], name: str = "n1") -> NodeInfo:
    # Round trip through zeroconf's own TXT encoding, as a browser would receive it.
    info = ServiceInfo(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", port=0, properties=txt, server="h.local.",
                       parsed_addresses=["10.1.2.3"])
    received = ServiceInfo(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", port=0, properties=info.text,
                           server="h.local.", parsed_addresses=["10.1.2.3"])
    return NodeInfo.from_service_info(received)


def test_txt_has_every_documented_key_and_parses_back() -> None:
    txt = build_txt(node_id="pi-kitchen", version="1.2.3", role="build", mqtt="broker.lan:8883", tls=True,
                    prefix="site/v1", accel=["cpu", "coral-usb"], models=["blazeface", "ppocr-det"],
                    caps=["detect", "ocr"], http_port=8080)
    assert txt["proto"] == PROTO_VERSION == "1"
    node = as_seen_by_browser(txt, "pi-kitchen")
    assert node.node_id == "pi-kitchen" and node.name == "pi-kitchen"
    assert node.version == "1.2.3" and node.role == "build" and node.proto == "1"
    assert node.mqtt == "broker.lan:8883" and node.mqtt_endpoint() == ("broker.lan", 8883) and node.tls
    assert node.prefix == "site/v1"
    assert node.accel == ["cpu", "coral-usb"] and node.models == ["blazeface", "ppocr-det"]
    assert node.caps == ["detect", "ocr"] and node.http_port == 8080
    assert node.models_total == 2 and not node.models_truncated
    assert node.addresses == ["10.1.2.3"]


def test_many_models_are_cut_at_name_boundaries_within_txt_limits() -> None:
    models = [f"model-{i:03d}-with-a-rather-long-name" for i in range(300)]
    txt = build_txt(node_id="n", models=models, accel=[f"acc{i}" for i in range(100)],
                    caps=[f"cap.{i}" for i in range(100)])
    assert max(wire_sizes(txt)) <= TXT_ENTRY_MAX
    assert sum(s + 1 for s in wire_sizes(txt)) <= TXT_TOTAL_MAX
    node = as_seen_by_browser(txt)
    assert 0 < len(node.models) < 300
    assert node.models == models[: len(node.models)]  # a prefix of whole names, none cut in half
    assert node.models_total == 300 and node.models_truncated
    assert node.accel == [f"acc{i}" for i in range(len(node.accel))]


def test_list_items_cannot_inject_separators_or_control_characters() -> None:
    txt = build_txt(node_id="n", models=["a,b", "c\nd", "", "  ", "e"])
    node = as_seen_by_browser(txt)
    assert node.models == ["a_b", "c_d", "e"]


def test_instance_label_keeps_to_one_dns_label() -> None:
    assert instance_label("pi.kitchen") == "pi-kitchen"
    long_id = "x" * 128
    assert len(instance_label(long_id).encode()) == INSTANCE_MAX


@pytest.mark.parametrize("kwargs, match", [
    ({"models": ["yolo", "hunter22pw"]}, "configured secret"),
    ({"mqtt": "user:hunter22pw@broker:1883"}, "user:password"),
    ({"mqtt": "mqtts://broker:8883"}, "user:password"),
    ({"extra": {"token": "abc"}}, "named like a credential"),
    ({"extra": {"apikey": "abc"}}, "named like a credential"),
    ({"models": ["eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.sig"]}, "looks like a token"),
    ({"version": "Bearer abcdef"}, "looks like a token"),
])
def test_secrets_never_reach_txt(kwargs: dict, match: str) -> None:
    with pytest.raises(SecretInTxtError, match=match):
        build_txt(node_id="n", secrets=["hunter22pw"], **kwargs)


def test_advertiser_from_config_keeps_password_out_of_txt(tmp_path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cr3t-Passw0rd\n")
    cfg = AgentConfig(node_id="pi-1", state_dir=tmp_path,
                      mqtt=MqttConfig(host="broker.lan", port=1884, username="fleet-user", password_file=pw))
    adv = Advertiser.from_config(cfg, models=["m1"], accel=["cpu"])
    txt = adv.txt
    blob = "\n".join(f"{k}={v}" for k, v in txt.items())
    assert "s3cr3t-Passw0rd" not in blob and "fleet-user" not in blob
    assert txt["mqtt"] == "broker.lan:1884" and txt["node_id"] == "pi-1" and txt["role"] == "edge"
    # A model named after the password is refused rather than broadcast.
    with pytest.raises(SecretInTxtError):
        adv.update(models=["s3cr3t-Passw0rd"])
    assert "s3cr3t-Passw0rd" not in "".join(adv.txt.values())


def test_disabled_advertiser_opens_nothing(tmp_path) -> None:
    cfg = AgentConfig(node_id="pi-1", state_dir=tmp_path, discovery=DiscoveryConfig(enabled=False))
    adv = Advertiser.from_config(cfg)
    adv.start()
    assert adv.state == "disabled" and adv._zc is None
    assert adv.update(models=["x"]) is None
    adv.stop()


def test_unknown_interface_name_is_a_clear_error() -> None:
    with pytest.raises(DiscoveryError, match="unknown network interface 'nosuch0'"):
        resolve_interfaces(["nosuch0"])
    assert resolve_interfaces(["lo"]) == ["127.0.0.1"]


def _broker(name: str, *, tls: bool = False, priority: int = 0, order: int = 0) -> BrokerInfo:
    return BrokerInfo(name=name, service_type="_secure-mqtt._tcp.local." if tls else "_mqtt._tcp.local.",
                      host="10.0.0.1", port=8883 if tls else 1883, tls=tls, priority=priority, order=order)


def test_broker_choice_rule() -> None:
    plain_first = _broker("a", order=0)
    plain_low = _broker("b", priority=-1, order=1)
    secure = _broker("c", tls=True, priority=10, order=2)
    assert choose_broker([]) is None
    # TLS beats plain whatever the priority.
    assert choose_broker([plain_first, plain_low, secure]) is secure
    # Among plain ones, the lowest priority, then the first seen.
    assert choose_broker([plain_first, plain_low]) is plain_low
    assert choose_broker([_broker("x", order=1), _broker("y", order=0)]).name == "y"
    # The configured preference beats everything, by instance name (or full service name).
    assert choose_broker([plain_first, plain_low, secure], "a") is plain_first
    assert choose_broker([plain_first, secure], "a._mqtt._tcp.local.") is plain_first
    # A preferred name advertised both ways: its TLS twin wins.
    twin = _broker("a", tls=True, order=3)
    assert choose_broker([plain_first, twin, plain_low], "a") is twin
    # A preference that matches nothing falls back to the rule.
    assert choose_broker([plain_first, secure], "zzz") is secure
