"""Nothing twice, also after retention: tombstones of pruned jobs (weeks later in simulated time), retained requests
refused, strict request types, retained statuses cleared when jobs are pruned."""

from __future__ import annotations

import json
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.state import StateStore
from tests.agent_proc import Recorder, controller, wait_until

DAY = 86400


def _days_pass(state_dir: Path, days: float) -> None:
    """Simulated time, with the agent stopped: every time the node recorded moves `days` into the past, as if the
    node were started that much later. (libfaketime cannot do this here: under it Python's time.sleep fails with
    EINVAL once the monotonic clock is left alone, and condition waits hang when it is not.)"""
    store = StateStore(state_dir)
    shift = days * DAY
    with store.transaction():
        for job in store.all_jobs():
            store.put_job({**job, **{k: job[k] - shift for k in ("created", "updated", "started", "finished")
                                     if isinstance(job.get(k), (int, float))}})
        for job_id, tomb in store.tombstones():
            store.put_tombstone(job_id, {**tomb, "finished": tomb["finished"] - shift,
                                         "pruned": tomb["pruned"] - shift})
    store.close()


def _publish(broker, topic: str, payload: bytes, retain: bool = False) -> None:
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)
    c.disconnect()
    c.loop_stop()


def _retained(broker, topic_filter: str) -> dict[str, bytes]:
    """The retained messages a new subscriber gets (they arrive right after SUBACK, before a marker we send)."""
    got: dict[str, bytes] = {}
    marker = f"cvw-test/marker/{time.monotonic_ns()}"
    done = []
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)

    def on_message(client, userdata, msg):
        if msg.topic == marker:
            done.append(True)
        elif msg.retain:
            got[msg.topic] = msg.payload

    c.on_message = on_message
    c.connect(broker.host, broker.port)
    c.loop_start()
    c.subscribe([(topic_filter, 1), (marker, 1)])
    # The broker sends the retained messages of a subscription before it forwards anything published after it.
    deadline = time.monotonic() + 10
    while not done and time.monotonic() < deadline:
        c.publish(marker, b"x", qos=1).wait_for_publish(5)
        time.sleep(0.05)
    c.disconnect()
    c.loop_stop()
    assert done, "the marker never came back"
    return got


def test_a_pruned_job_resent_31_days_later_is_answered_not_run_again(agents, mosquitto):
    agent = agents("node-t", jobs={"retention_days": 7, "tombstone_days": 30})
    with controller(mosquitto) as ctl:
        out = ctl.wait(ctl.submit("debug.sleep", {"seconds": 0, "steps": 1, "side_effect": True}, node="node-t",
                                  job_id="once-1"), timeout=20)
        assert out.state == "SUCCEEDED"
        version = out.last["version"]
    assert (agent.state_dir / "debug-side-effects.log").read_text() == "once-1\n"
    status_topic = "cvw/v1/nodes/node-t/jobs/once-1/status"
    assert status_topic in _retained(mosquitto, "cvw/v1/nodes/node-t/jobs/+/status")

    # Eight days later the job is pruned at start: a tombstone keeps its id, and its retained status is cleared.
    agent.stop()
    _days_pass(agent.state_dir, 8)
    agent.start()
    agent.wait_log("pruned 1 finished jobs")
    rec = Recorder(mosquitto, "cvw/v1/nodes/node-t/status")
    rec.wait_for(lambda m: any(isinstance(p, dict) and p.get("state") == "online" for _, p, _, _ in m))
    rec.close()
    deadline = time.monotonic() + 10
    while status_topic in _retained(mosquitto, "cvw/v1/nodes/node-t/jobs/+/status"):
        assert time.monotonic() < deadline, "the pruned job's retained status was not cleared"
    assert "once-1" not in agent.jobs()

    # Thirty-one days after it ran, the same request comes again: the old final status, never a second run.
    agent.stop()
    _days_pass(agent.state_dir, 31 - 8)
    agent.start()
    with controller(mosquitto) as ctl:
        again = ctl.wait(ctl.submit("debug.sleep", {"seconds": 0, "steps": 1, "side_effect": True}, node="node-t",
                                    job_id="once-1"), timeout=20)
    assert again.state == "SUCCEEDED" and again.last["version"] == version, "versions never go backwards"
    assert again.last["details"]["pruned"] is True and again.results == []
    assert (agent.state_dir / "debug-side-effects.log").read_text() == "once-1\n", "it ran again"
    assert "once-1" not in agent.jobs()
    assert "job once-1 (debug.sleep) started" not in agent.log().split("pruned 1 finished jobs")[-1]

    # Past the tombstone window the id is forgotten (tombstones are bounded too).
    agent.stop()
    _days_pass(agent.state_dir, 8)
    agent.start()
    agent.wait_log("forgot 1 tombstones")


def test_a_retained_request_is_refused_and_never_runs(agents, mosquitto):
    agent = agents("node-rr")
    rec = Recorder(mosquitto, "cvw/v1/nodes/node-rr/jobs/#")
    topic = "cvw/v1/nodes/node-rr/jobs/ret-1/request"
    _publish(mosquitto, topic, json.dumps({"type": "node.info"}).encode(), retain=True)
    rec.wait_for(lambda m: any(t.endswith("ret-1/status") and p["state"] == "REJECTED" for t, p, _, _ in m
                               if isinstance(p, dict)))
    status = [p for t, p, _, _ in rec.messages if t.endswith("ret-1/status")][-1]
    assert status["error"]["code"] == "retained_request" and "retain" in status["error"]["message"]
    # The retained request is still on the broker: a restart (a resumed session) must not run it either.
    agent.stop()
    agent.start()
    with controller(mosquitto) as ctl:
        ctl.wait(ctl.submit("node.info", node="node-rr"), timeout=20)  # the node is serving again
    assert agent.jobs()["ret-1"]["state"] == "REJECTED"
    assert "job ret-1 (node.info) started" not in agent.log()
    # Clearing it (an empty retained message, which the broker also forwards) is not a request.
    _publish(mosquitto, topic, b"", retain=True)
    agent.wait_log("retained request on cvw/v1/nodes/node-rr/jobs/ret-1/request cleared")
    assert agent.jobs()["ret-1"]["version"] == 1
    rec.close()


@pytest.mark.parametrize("body, code, field", [
    ({"type": "node.info", "priority": "5"}, "invalid_request", "priority"),
    ({"type": "node.info", "priority": True}, "invalid_request", "priority"),
    ({"type": "node.info", "timeout_s": "10"}, "invalid_request", "timeout_s"),
    ({"type": "debug.sleep", "params": {"seconds": "1"}}, "invalid_params", "seconds"),
    ({"type": "debug.sleep", "params": {"steps": 2.0}}, "invalid_params", "steps"),
])
def test_request_types_are_strict(agents, mosquitto, body, code, field):
    agents("node-s")
    with controller(mosquitto) as ctl:
        out = ctl.wait(ctl.submit("x", node="node-s", raw_payload=json.dumps(body).encode()), timeout=20)
    assert out.state == "REJECTED" and out.last["error"]["code"] == code and field in out.last["error"]["message"]


def test_pruned_jobs_retained_statuses_are_cleared(agents, mosquitto):
    agent = agents("node-p", jobs={"retention_count": 2})
    with controller(mosquitto) as ctl:
        ids = [ctl.submit("node.info", node="node-p", job_id=f"keep-{i}") for i in range(5)]
        for j in ids:
            ctl.wait(j, timeout=20)
    agent.stop()
    agent.start()  # prunes at start
    agent.wait_log("pruned 3 finished jobs")
    kept = set(wait_until(lambda: len(agent.jobs()) == 2 and agent.jobs(), what="two jobs kept"))
    want = {f"cvw/v1/nodes/node-p/jobs/{j}/status" for j in kept}
    wait_until(lambda: set(_retained(mosquitto, "cvw/v1/nodes/node-p/jobs/+/status")) == want,
               what="retained statuses of the pruned jobs cleared from the broker",
               detail=lambda: (sorted(_retained(mosquitto, "cvw/v1/nodes/node-p/jobs/+/status")), sorted(want)))
    with controller(mosquitto) as ctl:
        for j in set(ids) - kept:
            out = ctl.wait(ctl.submit("node.info", node="node-p", job_id=j), timeout=20)
            assert out.state == "SUCCEEDED" and out.last["version"] == 3 and out.last["details"]["pruned"]
