"""Round trip of every core job type against a real mosquitto and a real agent process."""

from __future__ import annotations

import json
import time

from tests.agent_proc import Recorder, controller, final_states, wait_until


def test_node_info_round_trip_with_response_topic(agents, mosquitto):
    agent = agents("node-a")
    rec = Recorder(mosquitto, "cvw/v1/nodes/node-a/#")
    with controller(mosquitto) as ctl:
        job_id = ctl.submit("node.info", node="node-a")
        out = ctl.wait(job_id, timeout=20)
    # Via the MQTT 5 response topic: every state in order, versions 1..n without gaps.
    states = [s["state"] for s in out.statuses]
    assert states == ["QUEUED", "IN_PROGRESS", "SUCCEEDED"]
    assert [s["version"] for s in out.statuses] == [1, 2, 3]
    info = out.results[-1]["info"]
    assert out.results[-1]["final"] is True and out.results[-1]["seq"] == 0
    assert info["node_id"] == "node-a" and info["state"] == "online"
    assert "node.info" in info["capabilities"] and info["mqtt"]["connected"] is True
    # And on the node's own topics: status retained with an expiry, result not retained.
    rec.wait_for(lambda m: any(t.endswith(f"{job_id}/status") and p["state"] == "SUCCEEDED" for t, p, _, _ in m))
    status_msgs = [(p, props) for t, p, props, _ in rec.messages if t == f"cvw/v1/nodes/node-a/jobs/{job_id}/status"]
    assert all(props.MessageExpiryInterval <= 3600 and props.MessageExpiryInterval > 3500 for _, props in status_msgs)
    rec.close()
    # A late subscriber still sees the final state (retained).
    late = Recorder(mosquitto, f"cvw/v1/nodes/node-a/jobs/{job_id}/status")
    late.wait_for(lambda m: len(m) == 1)
    topic, payload, _, retained = late.messages[0]
    assert retained and payload["state"] == "SUCCEEDED" and payload["version"] == 3
    late.close()
    assert agent.stop() == 0


def test_birth_will_and_stopped(agents, mosquitto):
    rec = Recorder(mosquitto, "cvw/v1/nodes/node-b/status")
    agent = agents("node-b")
    rec.wait_for(lambda m: any(p["state"] == "online" for _, p, _, _ in m))
    birth = [p for _, p, _, _ in rec.messages if p["state"] == "online"][-1]
    for key in ("node_id", "version", "boot_id", "bd_seq", "ts", "accelerators", "models", "capabilities"):
        assert key in birth
    assert set(birth["capabilities"]) >= {"node.info", "node.rebirth", "job.cancel", "config.get"}
    # Accelerator detection runs beside the connect; when it is done the birth is refreshed with what it found.
    rec.wait_for(lambda m: any(p["state"] == "online" and p["accelerators"] for _, p, _, _ in m), timeout=30)
    accel = [p for _, p, _, _ in rec.messages if p["accelerators"]][-1]["accelerators"]
    assert any(a.get("backend") == "openvino" or "openvino" in str(a) for a in accel), accel
    # SIGKILL: the broker publishes the will after the will delay, with the birth's bd_seq.
    agent.kill()
    rec.wait_for(lambda m: any(p["state"] == "offline" for _, p, _, _ in m), timeout=30)
    will = [p for _, p, _, _ in rec.messages if p["state"] == "offline"][-1]
    assert will["bd_seq"] == birth["bd_seq"] and will["boot_id"] == birth["boot_id"]
    # Restart: a new birth with the next bd_seq; a clean stop publishes "stopped" itself (no will).
    agent.start()
    rec.wait_for(lambda m: any(p["state"] == "online" and p["boot_id"] != birth["boot_id"] for _, p, _, _ in m))
    birth2 = [p for _, p, _, _ in rec.messages if p["state"] == "online"][-1]
    assert birth2["bd_seq"] == birth["bd_seq"] + 1 and birth2["boot_id"] != birth["boot_id"]
    agent.stop()
    rec.wait_for(lambda m: m[-1][1]["state"] == "stopped")
    time.sleep(6)  # longer than the will delay: no offline will follows a clean stop
    assert rec.messages[-1][1]["state"] == "stopped"
    rec.close()


def test_rebirth_config_get_and_cancel(agents, mosquitto, tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    agents("node-c", jobs={"workers": 1})
    rec = Recorder(mosquitto, "cvw/v1/nodes/node-c/status")
    with controller(mosquitto) as ctl:
        # node.rebirth publishes the birth message again.
        n_births = len(rec.messages)
        out = ctl.wait(ctl.submit("node.rebirth", node="node-c"), timeout=20)
        assert out.state == "SUCCEEDED"
        rec.wait_for(lambda m: len(m) > n_births)
        # config.get returns the effective config.
        out = ctl.wait(ctl.submit("config.get", node="node-c"), timeout=20)
        cfg = out.results[-1]["config"]
        assert cfg["node_id"] == "node-c" and cfg["jobs"]["workers"] == 1
        # job.cancel of a running job, and of one still queued behind it (one worker).
        running = ctl.submit("debug.sleep", {"seconds": 30, "steps": 30}, node="node-c")
        queued = ctl.submit("debug.sleep", {"seconds": 30}, node="node-c")
        deadline = time.monotonic() + 10
        while ctl.outcome(running).state != "IN_PROGRESS" and time.monotonic() < deadline:
            time.sleep(0.05)
        # The queued one first: once the running one ends, the worker would pick the queued one up.
        c2 = ctl.wait(ctl.submit("job.cancel", {"job_id": queued}, node="node-c"), timeout=10)
        c1 = ctl.wait(ctl.submit("job.cancel", {"job_id": running}, node="node-c"), timeout=10)
        assert c1.state == c2.state == "SUCCEEDED"
        assert ctl.wait(running, timeout=10).state == "CANCELED"
        assert ctl.wait(queued, timeout=10).state == "CANCELED"
        assert ctl.outcome(queued).last["error"]["code"] == "canceled"
        # The queued job never started.
        assert "IN_PROGRESS" not in [s["state"] for s in ctl.outcome(queued).statuses]
        # Canceling what already ended, or what does not exist, fails with a precise code.
        again = ctl.wait(ctl.submit("job.cancel", {"job_id": running}, node="node-c"), timeout=10)
        assert again.state == "FAILED" and again.last["error"]["code"] == "not_cancelable"
        missing = ctl.wait(ctl.submit("job.cancel", {"job_id": "nope"}, node="node-c"), timeout=10)
        assert missing.state == "FAILED" and missing.last["error"]["code"] == "not_found"
    rec.close()


def test_config_get_masks_password(agents, mosquitto):
    # The anonymous test broker ignores the credentials; the point here is that they never leave the node.
    agent = agents("node-p", mqtt={"password": "hunter2", "username": "u"})
    with controller(mosquitto) as ctl:
        out = ctl.wait(ctl.submit("config.get", node=agent.node_id), timeout=20)
    text = json.dumps(out.results)
    assert "hunter2" not in text and out.results[-1]["config"]["mqtt"]["password"] == "********"


def test_timeout_and_priority(agents, mosquitto):
    agents("node-t", jobs={"workers": 1})
    with controller(mosquitto) as ctl:
        blocker = ctl.submit("debug.sleep", {"seconds": 60, "steps": 600}, node="node-t")
        low = ctl.submit("debug.sleep", {"seconds": 0.1, "steps": 1}, node="node-t", priority=-5)
        high = ctl.submit("debug.sleep", {"seconds": 0.1, "steps": 1}, node="node-t", priority=50)
        # Both wait behind the blocker before it ends, whatever the machine's speed.
        for j in (low, high):
            wait_until(lambda j=j: ctl.outcome(j).state == "QUEUED", what=f"{j} queued")
        ctl.wait(ctl.submit("job.cancel", {"job_id": blocker}, node="node-t"), timeout=20)
        assert ctl.wait(blocker, timeout=20).state == "CANCELED"
        for j in (low, high):
            assert ctl.wait(j, timeout=20).state == "SUCCEEDED"
        started = {j: next(s["ts"] for s in ctl.outcome(j).statuses if s["state"] == "IN_PROGRESS")
                   for j in (low, high)}
        assert started[high] < started[low]
        # A handler that checks cancellation ends TIMED_OUT, long before its 30 s of work (the node's own clock)...
        out = ctl.wait(ctl.submit("debug.sleep", {"seconds": 30}, node="node-t", timeout_s=1.0), timeout=20)
        assert out.state == "TIMED_OUT" and out.last["error"]["code"] == "timed_out"
        started = next(s["ts"] for s in out.statuses if s["state"] == "IN_PROGRESS")
        assert out.last["ts"] - started < 30
        # ...and so does one that ignores it; its worker is replaced so later jobs still run.
        out = ctl.wait(ctl.submit("debug.sleep", {"seconds": 8, "ignore_cancel": True}, node="node-t",
                                  timeout_s=1.0), timeout=20)
        assert out.state == "TIMED_OUT"
        assert ctl.wait(ctl.submit("debug.sleep", {"seconds": 0.1}, node="node-t"), timeout=10).state == "SUCCEEDED"


def test_failed_job_reports_error(agents, mosquitto):
    agents("node-f")
    rec = Recorder(mosquitto, "cvw/v1/nodes/node-f/jobs/+/status")
    with controller(mosquitto) as ctl:
        out = ctl.wait(ctl.submit("debug.sleep", {"seconds": 0.1, "fail": True}, node="node-f"), timeout=20)
    assert out.state == "FAILED"
    assert out.last["error"] == {"code": "debug_failure", "message": "failed on request (params.fail = true)"}
    rec.wait_for(lambda m: any(p["state"] == "FAILED" for p in final_states(rec, "node-f").values()))
    rec.close()
