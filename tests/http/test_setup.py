"""How the HTTP side is set up: TLS, a token file of one's own (rotated without restart), a port already taken, the
port in the mDNS TXT record, and an agent without HTTP that never imports the web stack."""

from __future__ import annotations

import socket
import subprocess
import sys
import uuid

import requests

from agent.discovery import browse
from tests.agent_proc import REPO, controller
from tests.certs import make_test_pki
from tests.discovery.conftest import LO
from tests.http.conftest import Api, http_agent, problem_of, wait_http


def test_tls_and_own_token_file_rotated_live(tmp_path, broker, blazeface_store):
    pki = make_test_pki(tmp_path / "pki")
    token_file = tmp_path / "api-token"
    token_file.write_text("first-token-0123456789abcdef\n")
    a = http_agent(tmp_path / "a", broker, blazeface_store, "tls-node", token_file=str(token_file),
                   tls_cert=str(pki["server.pem"]), tls_key=str(pki["server.key"])).start()
    try:
        base = f"https://127.0.0.1:{a.cfg['http']['port']}"
        wait_http(base, verify=str(pki["ca.pem"]))
        api = Api(base, "first-token-0123456789abcdef", verify=str(pki["ca.pem"]))
        assert api.get("/v1/node").json()["http"]["tls"] is True
        assert not (a.state_dir / "http-token").exists()  # the configured file is used, none is made
        # Plain HTTP on the TLS port gets no API.
        try:
            r = requests.get(f"http://127.0.0.1:{a.cfg['http']['port']}/v1/node", timeout=5)
            assert r.status_code >= 400
        except requests.ConnectionError:
            pass
        # The token changes on disk: the new one works at once, the old one no more.
        token_file.write_text("second-token-0123456789abcdef\n")
        api.token = "second-token-0123456789abcdef"
        assert api.get("/v1/node").status_code == 200
        problem_of(api.get("/v1/node", token="first-token-0123456789abcdef"), 401, "unauthorized")
        assert "second-token" not in a.log() and "first-token" not in a.log()  # never logged
    finally:
        a.stop()


def test_port_taken_is_reported_and_the_node_runs_on(tmp_path, broker, blazeface_store):
    a = http_agent(tmp_path / "a", broker, blazeface_store, "busy-node")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", a.cfg["http"]["port"]))
        s.listen()
        a.start()
        try:
            a.wait_log("HTTP API not started: cannot listen on 127.0.0.1")
            assert "choose another [http] port" in a.log() and "Traceback" not in a.log()
            with controller(broker) as ctl:
                out = ctl.wait(ctl.submit("node.info", node="busy-node"), timeout=30)
                assert out.state == "SUCCEEDED"
                assert out.results[-1]["info"]["http"]["listening"] is False
                assert "cannot listen" in out.results[-1]["info"]["http"]["error"]
        finally:
            a.stop()


def test_http_port_in_mdns_txt(tmp_path, broker, blazeface_store):
    node_id = f"web-{uuid.uuid4().hex[:8]}"
    a = http_agent(tmp_path / "a", broker, blazeface_store, node_id)
    a.cfg["discovery"] = {"enabled": True, "interfaces": LO}
    from tests.agent_proc import write_config

    write_config(a.config_path, a.cfg)
    a.start()
    try:
        port = a.cfg["http"]["port"]
        for event in browse(15.0, interfaces=LO):
            if event.node.node_id == node_id and event.kind != "removed":
                assert event.node.http_port == port and event.node.port == port, event.node
                break
        else:
            raise AssertionError(f"node {node_id} not seen over mDNS")
        wait_http(f"http://127.0.0.1:{port}")
    finally:
        a.stop()


def test_no_web_stack_without_http():
    code = ("import sys, tempfile; from agent.config import AgentConfig; from agent.node import Node; "
            "n = Node(AgentConfig(node_id='x', state_dir=tempfile.mkdtemp(), http={'enabled': False})); "
            "print(n.http, sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'prometheus_client') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.stdout.strip() == "None []", out.stdout + out.stderr
