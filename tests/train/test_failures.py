"""Bad training input fails with the CSV line at fault; a build peer that vanishes fails the node's job after the
grace period, or is followed again when it comes back in time. The node here has no build peer configured: it
finds the trainer over mDNS (`role=build`, loopback only)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.devbroker import Mosquitto
from tests.agent_proc import AgentProc, Recorder
from tests.train.conftest import LO, PREFIX, Digits, TrainerProc, make_node, make_trainer


@pytest.fixture(scope="module")
def mdns_node(tmp_path_factory: pytest.TempPathFactory, broker: Mosquitto, digits: Digits,
              trainer: TrainerProc) -> Iterator[AgentProc]:
    a = make_node(tmp_path_factory.mktemp("mdns-node"), broker, "edge-mdns", digits.root,
                  discovery={"enabled": True, "interfaces": LO}, train={"discovery_timeout_s": 2.5}).start()
    yield a
    a.stop()


def _bad_csvs(root: Path) -> dict[str, tuple[str, int, str]]:
    """name -> (CSV text, line at fault, words the message must contain)."""
    return {
        "missing": ("image,x,y,width,height,class\ndigits/0000.png,0,0,8,8,0\n\ndigits/nope.png,0,0,8,8,1\n",
                    4, "digits/nope.png' not found"),
        "outside": ("digits/0000.png,0,0,8,8,0\ndigits/0001.png,2,0,8,8,1\n", 2, "lies outside image"),
        "layout": ("file;left;top;class\ndigits/0000.png;0;0;0\n", 1, "unknown column layout"),
        "columns": ("image,x,y,width,height,class\ndigits/0000.png,0,0,8,8,0\ndigits/0001.png,0,0,8\n", 3,
                    "4 columns"),
        "empty": ("", 1, "empty"),
    }


def test_bad_annotations_fail_with_the_line(mdns_node: AgentProc, ctl, digits: Digits) -> None:
    cases = _bad_csvs(digits.root)
    jobs = {}
    for name, (text, _, _) in cases.items():
        (digits.root / f"bad-{name}.csv").write_text(text)
        jobs[name] = ctl.submit("train", {"annotations": f"bad-{name}.csv", "epochs": 1}, node=mdns_node.node_id)
    for name, (_, line, words) in cases.items():
        out = ctl.wait(jobs[name], timeout=120)
        assert out.state == "FAILED", (name, out.last)
        err = out.last["error"]
        assert err["code"] == "bad_annotations", (name, err)
        assert f"bad-{name}.csv: line {line}: " in err["message"] and words in err["message"], (name, err)
        assert "build-1" in err["message"]  # which peer said so: the one found over mDNS
    assert "build peer build-1 found over mDNS" in mdns_node.log()


def test_unknown_plugin_and_options_are_named(mdns_node: AgentProc, ctl) -> None:
    out = ctl.wait(ctl.submit("train", {"annotations": "small.csv", "plugin": "detector"}, node=mdns_node.node_id),
                   timeout=60)
    assert out.state == "FAILED" and out.last["error"]["code"] == "unknown_plugin"
    assert "installed: classifier" in out.last["error"]["message"]
    out = ctl.wait(ctl.submit("train", {"annotations": "small.csv", "options": {"lerning_rate": 0.1}},
                              node=mdns_node.node_id), timeout=60)
    assert out.state == "FAILED" and out.last["error"]["code"] == "invalid_options"
    assert "lerning_rate" in out.last["error"]["message"] and "learning_rate" in out.last["error"]["message"]


@pytest.fixture(scope="module")
def spare_trainer(tmp_path_factory: pytest.TempPathFactory, broker: Mosquitto,
                  digits: Digits) -> Iterator[TrainerProc]:
    """A trainer of its own for the tests that stop and kill it (not advertised, so mDNS never offers it)."""
    t = make_trainer(tmp_path_factory.mktemp("spare"), broker, "build-spare", digits.root,
                     discovery={"enabled": False}).start()
    yield t
    if t.proc is not None and t.proc.poll() is None:
        os.kill(t.proc.pid, signal.SIGCONT)
    t.kill()


def _wait_details(ctl, jid: str, pred, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = ctl.outcome(jid)
        for s in out.statuses:
            if pred(s):
                return s
        if out.done:
            raise AssertionError(f"job ended first: {out.last}")
        time.sleep(0.1)
    raise AssertionError(f"no matching status of {jid} after {timeout}s: {ctl.outcome(jid).last}")


def test_node_reattaches_when_the_peer_comes_back(node: AgentProc, spare_trainer: TrainerProc, ctl,
                                                 broker: Mosquitto) -> None:
    rec = Recorder(broker, f"{PREFIX}/trainers/jobs/+/status")
    try:
        jid = ctl.submit("train", {"annotations": "annotations.csv", "epochs": 200, "peer": "build-spare",
                                   "grace_period_s": 120}, node=node.node_id)
        _wait_details(ctl, jid, lambda s: (s["details"].get("epoch_current") or 0) >= 1)
        os.kill(spare_trainer.proc.pid, signal.SIGSTOP)  # frozen: the broker publishes its will after keepalive
        gone = _wait_details(ctl, jid, lambda s: s["details"].get("peer_state") == "offline", timeout=60)
        os.kill(spare_trainer.proc.pid, signal.SIGCONT)
        back = _wait_details(ctl, jid, lambda s: s["details"].get("reattached") is True, timeout=60)
        assert back["version"] > gone["version"]
        epoch_then = gone["details"]["epoch_current"]
        _wait_details(ctl, jid, lambda s: (s["details"].get("epoch_current") or 0) > epoch_then, timeout=60)
        # Canceling the node's job cancels the peer's job too.
        cancel = ctl.wait(ctl.submit("job.cancel", {"job_id": jid}, node=node.node_id), timeout=30)
        assert cancel.state == "SUCCEEDED"
        assert ctl.wait(jid, timeout=30).state == "CANCELED"
        rec.wait_for(lambda msgs: any(isinstance(p, dict) and p.get("job_id") == f"edge-1.{jid}"
                                      and p.get("state") == "CANCELED" for _, p, _, _ in msgs), timeout=30)
    finally:
        rec.close()
    assert "is back; following its job again" in node.log()


def test_node_job_fails_when_the_peer_is_gone_past_the_grace_period(node: AgentProc, spare_trainer: TrainerProc,
                                                                    ctl) -> None:
    jid = ctl.submit("train", {"annotations": "annotations.csv", "epochs": 200, "peer": "build-spare",
                               "grace_period_s": 2}, node=node.node_id)
    _wait_details(ctl, jid, lambda s: (s["details"].get("epoch_current") or 0) >= 1)
    spare_trainer.kill()
    out = ctl.wait(jid, timeout=60)
    assert out.state == "FAILED", out.last
    err = out.last["error"]
    assert err["code"] == "build_peer_lost"
    assert "build peer build-spare went offline during training at epoch" in err["message"]
    assert "did not come back within 2 s (train.grace_period_s)" in err["message"]


def test_no_build_peer_answers(node: AgentProc, ctl) -> None:
    out = ctl.wait(ctl.submit("train", {"annotations": "small.csv", "peer": "nobody", "grace_period_s": 1},
                              node=node.node_id), timeout=30)
    assert out.state == "FAILED" and out.last["error"]["code"] == "build_peer_lost"
    assert "build peer nobody is not online (it never published a birth message)" in out.last["error"]["message"]


def test_node_restart_resumes_following_and_deploys(tmp_path: Path, broker: Mosquitto, trainer: TrainerProc, ctl,
                                                    digits: Digits) -> None:
    """A node killed mid-training picks its train job up again after the restart: same peer job, then deploy."""
    a = make_node(tmp_path / "edge-restart", broker, "edge-restart", digits.root,
                  train={"build_peer": "build-1"}).start()
    try:
        jid = ctl.submit("train", {"annotations": "annotations.csv", "epochs": 12, "name": "resumed"},
                         node=a.node_id)
        _wait_details(ctl, jid, lambda s: (s["details"].get("epoch_current") or 0) >= 1)
        a.kill()
        a.start()
        out = ctl.wait(jid, timeout=300)
        assert out.state == "SUCCEEDED", out.last
        assert any(s["details"].get("resumed") for s in out.statuses)
        assert out.results[-1]["deployed"]["name"] == "resumed"
        assert out.results[-1]["peer_job_id"] == f"edge-restart.{jid}"
        # The peer ran the training once: the repeated request only made it publish its status again.
        assert trainer.log().count(f"job edge-restart.{jid} (train) started") == 1
        assert f"duplicate request for job edge-restart.{jid}" in trainer.log()
    finally:
        a.stop()
