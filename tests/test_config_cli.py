"""Config loading and the local CLI commands, run as a user would run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from agent.config import ConfigError, load_config
from tests.agent_proc import REPO, write_config


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("CV_WORKER_")}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=e, timeout=60)


def test_toml_env_precedence(tmp_path, monkeypatch):
    cfg_path = write_config(tmp_path / "c.toml", {"node_id": "n1", "pools": ["a"],
                                                  "mqtt": {"host": "h", "port": 1884, "keepalive": 45}})
    monkeypatch.setenv("CV_WORKER_MQTT__PORT", "2000")
    monkeypatch.setenv("CV_WORKER_JOBS__WORKERS", "3")
    cfg = load_config(cfg_path)
    assert (cfg.node_id, cfg.pools, cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.keepalive, cfg.jobs.workers) == \
        ("n1", ["a"], "h", 2000, 45, 3)
    monkeypatch.setenv("CV_WORKER_CONFIG", str(cfg_path))
    assert load_config().node_id == "n1"


def test_every_error_with_its_field_path(tmp_path):
    cfg_path = write_config(tmp_path / "c.toml", {"node_id": "bad id", "typo": 1,
                                                  "mqtt": {"port": 70000, "topic_prefix": "a/#"},
                                                  "jobs": {"workers": 0}})
    with pytest.raises(ConfigError) as e:
        load_config(cfg_path)
    paths = {p for p, _ in e.value.errors}
    assert paths == {"node_id", "typo", "mqtt.port", "mqtt.topic_prefix", "jobs.workers"}


def test_config_check_cli(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("secret-pw")
    good = write_config(tmp_path / "good.toml", {"node_id": "n1", "mqtt": {"password": "inline-secret",
                                                                          "username": "u"}})
    r = run_cli("config", "check", "--config", str(good))
    assert r.returncode == 0, r.stderr
    assert 'node_id = "n1"' in r.stdout and "inline-secret" not in r.stdout and "********" in r.stdout
    r = run_cli("config", "check", "--config", str(good), "--json")
    assert json.loads(r.stdout.split("\n", 1)[1])["mqtt"]["password"] == "********"
    # Environment overrides show in the effective config.
    r = run_cli("config", "check", "--config", str(good), env={"CV_WORKER_MQTT__HOST": "broker.lan"})
    assert 'host = "broker.lan"' in r.stdout
    bad = write_config(tmp_path / "bad.toml", {"jobs": {"workers": "many"}, "mqtt": {"password_file": "/nonexistent"}})
    r = run_cli("config", "check", "--config", str(bad))
    assert r.returncode == 2 and "jobs.workers" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "broken.toml").write_text("node_id = \n")
    r = run_cli("config", "check", "--config", str(tmp_path / "broken.toml"))
    assert r.returncode == 2 and "not valid TOML" in r.stderr
    r = run_cli("config", "check", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "no such file" in r.stderr


@pytest.mark.parametrize("cmd", [[], ["run"], ["submit"], ["jobs"], ["job"], ["status"], ["config", "check"],
                                 ["schema"]])
def test_help_teaches(cmd):
    r = run_cli(*cmd, "--help")
    assert r.returncode == 0 and "usage: cv-worker" in r.stdout
    assert len(r.stdout) > 300


def test_local_state_commands_without_agent(tmp_path):
    cfg = write_config(tmp_path / "c.toml", {"node_id": "n1", "state_dir": str(tmp_path / "state")})
    r = run_cli("jobs", "--config", str(cfg))
    assert r.returncode == 0 and "no jobs" in r.stdout
    r = run_cli("job", "nope", "--config", str(cfg))
    assert r.returncode == 1 and "no job 'nope'" in r.stderr
    r = run_cli("status", "--config", str(cfg), "--json")
    assert json.loads(r.stdout)["agent_running"] is False


def test_schema_command(tmp_path):
    r = run_cli("schema")
    schemas = json.loads(r.stdout)
    assert {"JobRequest", "JobStatus", "JobResult", "NodeStatus", "NodeError", "params/job.cancel"} <= set(schemas)
    r = run_cli("schema", "JobStatus")
    assert json.loads(r.stdout)["title"] == "JobStatus"
    r = run_cli("schema", "Nope")
    assert r.returncode == 2 and "choose from" in r.stderr
    r = run_cli("schema", "--out", str(tmp_path / "s"))
    assert (tmp_path / "s" / "JobRequest.schema.json").exists()


def test_submit_against_agent(agents, mosquitto):
    agent = agents("node-cli")
    r = agent.cli("submit", "node.info", "--node", "node-cli", "--wait")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "SUCCEEDED" in r.stdout and '"node_id": "node-cli"' in r.stdout
    r = agent.cli("submit", "debug.sleep", "--param", "seconds=0.3", "--param", "fail=true", "--wait")
    assert r.returncode == 1 and "debug_failure" in r.stderr
    r = agent.cli("submit", "debug.sleep", "-p", "seconds=5", "--wait", "--wait-timeout", "1")
    assert r.returncode == 4
    r = agent.cli("submit", "node.info", "--params", "[1]")
    assert r.returncode == 2 and "JSON object" in r.stderr
    r = agent.cli("submit", "node.info")
    assert r.returncode == 0 and r.stdout.strip().startswith("node-info-")
    job_id = r.stdout.strip()
    r = agent.cli("submit", "node.info", "--job-id", "cli-1", "--wait", "--json")
    assert json.loads(r.stdout)["status"]["state"] == "SUCCEEDED"
    # Local state views of what just ran.
    r = agent.cli("jobs", "--state", "succeeded", "--json")
    assert "cli-1" in {j["job_id"] for j in json.loads(r.stdout)}
    r = agent.cli("job", "cli-1")
    assert json.loads(r.stdout)["state"] == "SUCCEEDED"
    r = agent.cli("job", "cli-1", "--result")
    assert json.loads(r.stdout)[-1]["final"] is True
    r = agent.cli("status", "--json")
    st = json.loads(r.stdout)
    assert st["agent_running"] is True and st["connected"] is True
    assert job_id


def test_submit_unreachable_broker(tmp_path):
    cfg = write_config(tmp_path / "c.toml", {"node_id": "n1", "mqtt": {"host": "127.0.0.1", "port": 1}})
    r = run_cli("submit", "node.info", "--config", str(cfg), "--wait")
    assert r.returncode == 3 and "cannot reach the MQTT broker" in r.stderr and "Traceback" not in r.stderr
