"""Hostile input: thousands of generated payloads at a running agent; every one is answered, none crashes it."""

from __future__ import annotations

import itertools
import json
import threading
import time

import paho.mqtt.client as mqtt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.agent_proc import controller, subscribe_and_wait, wait_until

LIMIT = 4096  # a small payload limit so generated payloads also exercise payload_too_large

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                            st.dictionaries(st.text(max_size=10), inner, max_size=5)),
                          max_leaves=20)
job_types = st.one_of(st.sampled_from(["node.info", "config.get", "job.cancel", "node.rebirth", "debug.sleep",
                                       "infer", "", "node.info ", "NODE.INFO"]), st.text(max_size=80), json_value)
request_like = st.fixed_dictionaries(
    {"type": job_types},
    optional={"params": st.one_of(json_value, st.dictionaries(st.sampled_from(["job_id", "seconds", "steps", "x"]),
                                                              json_value, max_size=3)),
              "timeout_s": json_value, "priority": json_value, "job_id": st.one_of(st.text(max_size=20), json_value),
              "extra": json_value},
)
payloads = st.one_of(
    st.binary(max_size=200),
    json_value.map(lambda v: json.dumps(v).encode()),
    request_like.map(lambda v: json.dumps(v).encode()),
    request_like.map(lambda v: json.dumps(v).encode()[:-1]),  # truncated JSON
    st.integers(LIMIT - 10, LIMIT + 2000).map(
        lambda n: json.dumps({"type": "node.info", "params": {"pad": "x" * n}}).encode()),
    st.just(b"[" * 5000 + b"]" * 5000),  # deep nesting
    st.just("{\"type\": \"node.info\", \"params\": {\"s\": \"\udcff\"}}".encode("utf-8", "surrogatepass")),
)


def mqtt_chars(forbidden: str) -> st.SearchStrategy[str]:
    """Characters a broker accepts in a topic (it disconnects clients that send control characters or
    non-characters there), minus ``forbidden``."""
    return st.characters(blacklist_characters=forbidden, blacklist_categories=("Cs", "Cc", "Cn"))


# Topic levels that are not safe job ids (MQTT itself forbids '/', '+', '#' and NUL in a level we publish to).
unsafe_ids = st.one_of(
    st.text(mqtt_chars("/+#"), min_size=1, max_size=40)
    .filter(lambda s: not s.replace(".", "").replace("_", "").replace("-", "").isalnum() or not s[0].isalnum()),
    st.just("a" * 200), st.just(".."), st.just("-x"), st.just("$x"), st.just("a b"), st.just("é"),
)
# The broker itself disconnects a client whose response topic has wildcards, so those never reach a node.
response_topics = st.one_of(st.none(), st.just("ctl/replies/x"), st.just("$SYS/x"),
                            st.text(mqtt_chars("+#"), min_size=1, max_size=20))


class Answers:
    def __init__(self) -> None:
        self.status_jobs: set[str] = set()
        self.error_topics: set[str] = set()
        self.lock = threading.Lock()

    def on_message(self, client, userdata, msg) -> None:
        if not msg.payload:
            return  # a pruned job's retained status being cleared
        data = json.loads(msg.payload)
        with self.lock:
            if msg.topic.endswith("/errors"):
                self.error_topics.add(data["topic"])
            else:
                self.status_jobs.add(data["job_id"])


def test_hostile_payloads_are_all_answered(agents, mosquitto):
    agent = agents("node-h", jobs={"max_payload_bytes": LIMIT, "workers": 2})
    answers = Answers()
    sub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    sub.on_message = answers.on_message
    sub.connect(mosquitto.host, mosquitto.port)
    sub.loop_start()
    wait_until(sub.is_connected, 10, "the subscriber's connection")
    # Errors on N/errors are not retained: an answer published before the broker took this subscription is lost.
    subscribe_and_wait(sub, [("cvw/v1/nodes/node-h/jobs/+/status", 1), ("cvw/v1/nodes/node-h/errors", 1)])
    pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    pub.max_inflight_messages_set(100)
    pub.connect(mosquitto.host, mosquitto.port)
    pub.loop_start()
    wait_until(pub.is_connected, 10, "the publisher's connection")
    counter = itertools.count()
    sent_jobs: set[str] = set()
    sent_bad_topics: set[str] = set()

    @settings(max_examples=2500, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
    @given(payload=payloads, unsafe=st.one_of(st.none(), unsafe_ids), response=response_topics)
    def throw(payload: bytes, unsafe, response) -> None:
        if unsafe is None:
            job_id = f"h-{next(counter)}"
            topic = f"cvw/v1/nodes/node-h/jobs/{job_id}/request"
            sent_jobs.add(job_id)
        else:
            topic = f"cvw/v1/nodes/node-h/jobs/{unsafe}/request"
            sent_bad_topics.add(topic)
        props = None
        if response is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = response
            props.CorrelationData = b"\x00\xff"
        info = pub.publish(topic, payload, qos=1, properties=props)
        if next(counter) % 100 == 0:
            info.wait_for_publish(10)

    # Hypothesis may end a run early once it stops finding new inputs; keep throwing until thousands went out.
    for _ in range(6):
        throw()
        if len(sent_jobs) + len(sent_bad_topics) >= 2000:
            break
    # Wait while answers keep coming: how long thousands take depends on the machine's load, a stall does not.
    answered, last_progress = -1, time.monotonic()
    while time.monotonic() - last_progress < 60:
        with answers.lock:
            if sent_jobs <= answers.status_jobs and sent_bad_topics <= answers.error_topics:
                break
            now_answered = len(answers.status_jobs) + len(answers.error_topics)
        if now_answered != answered:
            answered, last_progress = now_answered, time.monotonic()
        time.sleep(0.25)
    with answers.lock:
        missing_jobs = sent_jobs - answers.status_jobs
        missing_topics = sent_bad_topics - answers.error_topics
    assert not missing_jobs, f"{len(missing_jobs)} requests got no status, e.g. {sorted(missing_jobs)[:5]}"
    assert not missing_topics, f"{len(missing_topics)} bad topics got no error, e.g. {sorted(missing_topics)[:5]}"
    assert len(sent_jobs) + len(sent_bad_topics) >= 2000
    # Still alive and responsive, with no traceback in its log.
    assert agent.proc.poll() is None
    with controller(mosquitto) as ctl:
        assert ctl.wait(ctl.submit("node.info", node="node-h"), timeout=30).state == "SUCCEEDED"
    assert "Traceback" not in agent.log()
    pub.disconnect()
    sub.disconnect()


def test_rejections_carry_precise_codes(agents, mosquitto):
    agents("node-j", jobs={"max_payload_bytes": 2048})
    cases = {
        "bad-json": (b"{not json", "invalid_json"),
        "not-object": (b"[1,2]", "invalid_request"),
        "no-type": (b'{"params": {}}', "invalid_request"),
        "wrong-type": (b'{"type": "node.info", "priority": "high"}', "invalid_request"),
        "unknown": (b'{"type": "make.coffee"}', "unknown_job_type"),
        "bad-params": (b'{"type": "job.cancel", "params": {}}', "invalid_params"),
        "extra-param": (b'{"type": "node.info", "params": {"x": 1}}', "invalid_params"),
        "mismatch": (b'{"type": "node.info", "job_id": "other"}', "job_id_mismatch"),
        "too-big": (json.dumps({"type": "node.info", "pad": "x" * 4000}).encode(), "payload_too_large"),
    }
    with controller(mosquitto) as ctl:
        for job_id, (payload, _) in cases.items():
            ctl.submit("ignored", node="node-j", job_id=job_id, raw_payload=payload)
        for job_id, (_, code) in cases.items():
            out = ctl.wait(job_id, timeout=20)
            assert out.state == "REJECTED", job_id
            assert out.last["error"]["code"] == code, (job_id, out.last["error"])
            assert len(out.last["error"]["message"]) > 10
        msg = ctl.outcome("unknown").last["error"]["message"]
        assert "node.info" in msg, "the message lists the job types the node accepts"
        assert "priority" in ctl.outcome("wrong-type").last["error"]["message"], "the message names the field"
        # A rejected job id can be reused with a corrected request.
        ctl.submit("node.info", node="node-j", job_id="bad-json")
        deadline = time.monotonic() + 20
        while ctl.outcome("bad-json").state != "SUCCEEDED" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ctl.outcome("bad-json").state == "SUCCEEDED"
