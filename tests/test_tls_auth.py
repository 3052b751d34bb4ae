"""TLS with a test CA, client certificates and password authentication against a real mosquitto."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import time

import pytest

from agent.client import Controller, ControllerError
from agent.config import MqttConfig
from agent.devbroker import Mosquitto, free_port
from tests.agent_proc import AgentProc, wait_until
from tests.certs import make_test_pki


@pytest.fixture
def tls_broker(tmp_path):
    broker = Mosquitto(tmp_path / "mosq", anonymous=False)
    pki = make_test_pki(broker.workdir / "pki")
    passwd = broker.workdir / "passwd"
    passwd.touch()
    acl = broker.workdir / "acl"
    # The controller may use a private reply topic the node is not allowed to publish to.
    acl.write_text("user node-tls\ntopic readwrite cvw/#\n\nuser controller\ntopic readwrite cvw/#\n"
                   "topic readwrite forbidden/#\n")
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "node-tls", "right-password"], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "controller", "ctl-password"], check=True)
    if os.geteuid() == 0:
        for p in [passwd, acl, *pki.values(), broker.workdir / "pki"]:
            shutil.chown(p, user="mosquitto")
    tls_port = free_port()
    broker.extra_conf = (
        f"password_file {passwd}\nacl_file {acl}\n"
        f"listener {tls_port} 127.0.0.1\n"
        f"cafile {pki['ca.pem']}\ncertfile {pki['server.pem']}\nkeyfile {pki['server.key']}\n"
        "require_certificate true\n"
    )
    broker.start()
    broker.tls_port = tls_port
    broker.pki = pki
    yield broker
    broker.close()


def _tls_cfg(broker, **kw):
    pki = broker.pki
    return dict(host="127.0.0.1", port=broker.tls_port, tls_ca=str(pki["ca.pem"]), tls_cert=str(pki["client.pem"]),
                tls_key=str(pki["client.key"]), reconnect_min_s=0.3, reconnect_max_s=2.0, **kw)


def _tls_agent(broker, tmp_path, password: str) -> AgentProc:
    """The node over mutual TLS, its password in a file as the config recommends."""
    pwfile = tmp_path / "mqtt-password"
    pwfile.write_text(password + "\n")
    return AgentProc(tmp_path / "agent", broker, "node-tls",
                     mqtt=_tls_cfg(broker, username="node-tls", password_file=str(pwfile)))


def _tls_controller(broker) -> Controller:
    cfg = MqttConfig(**_tls_cfg(broker, username="controller", password="ctl-password"))
    return Controller(cfg, "127.0.0.1", broker.tls_port)


def test_job_round_trip_over_tls_with_password(tls_broker, tmp_path):
    agent = _tls_agent(tls_broker, tmp_path, "right-password")
    try:
        agent.start()
        with _tls_controller(tls_broker) as ctl:
            out = ctl.wait(ctl.submit("node.info", node="node-tls"), timeout=20)
        assert out.state == "SUCCEEDED"
        assert out.results[-1]["info"]["mqtt"]["tls"] is True
        # The password never appears in what the node publishes or logs.
        assert "right-password" not in agent.log()
    finally:
        agent.stop()


def test_message_the_broker_refuses_is_dropped_not_retried(tls_broker, tmp_path):
    """A status the broker refuses (PUBACK 0x87 not authorized) is logged once and dropped; the rest flows."""
    agent = _tls_agent(tls_broker, tmp_path, "right-password")
    try:
        agent.start()
        with _tls_controller(tls_broker) as ctl:
            ctl.reply_topic = "forbidden/replies"  # the node may not publish there
            job = ctl.submit("node.info", node="node-tls")
            # QUEUED, IN_PROGRESS, result, SUCCEEDED: each refused once
            agent.wait_log("broker refused message to forbidden/replies", count=4)
            ctl.reply_topic = f"cvw/v1/clients/{ctl.client_id}/replies"
            out = ctl.wait(ctl.submit("node.info", node="node-tls"), timeout=20)
            assert out.state == "SUCCEEDED"
        # The outbox empties (the refused messages are dropped, not kept for another try)...
        wait_until(lambda: json.loads(agent.cli("status", "--json").stdout)["outbox_depth"] == 0, 20,
                   "an empty outbox")
        time.sleep(1.0)  # ...and a retry loop, if there were one, gets time to show
        assert agent.log().count("broker refused message to forbidden/replies") == 4, "never retried"
        assert job
    finally:
        agent.stop()


def test_wrong_password_is_reported_and_retried_with_backoff(tls_broker, tmp_path):
    agent = _tls_agent(tls_broker, tmp_path, "wrong-password")
    try:
        agent.start(wait_online=False)
        agent.wait_log("broker refused the connection", count=3, timeout=30)
        stamps = [datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                  for line in agent.log().splitlines() if "ERROR" in line and "broker refused the connection" in line]
        assert len(stamps) >= 2
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        # Backing off (reconnect_min_s = 0.3), not hammering the broker.
        assert min(gaps) >= 0.25, gaps
        assert "Not authorized" in agent.log() or "Bad user name or password" in agent.log()
        assert agent.proc.poll() is None, "the agent keeps running and keeps trying"
    finally:
        agent.stop()


def test_plain_connection_to_tls_listener_fails_cleanly(tls_broker):
    cfg = MqttConfig(host="127.0.0.1", port=tls_broker.tls_port)
    with pytest.raises(ControllerError):
        Controller(cfg, "127.0.0.1", tls_broker.tls_port).connect(timeout=3)
