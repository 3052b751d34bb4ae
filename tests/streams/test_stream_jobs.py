"""stream.start / stream.stop / stream.list against a real agent, mosquitto and BlazeFace."""

from __future__ import annotations

import time

from tests.agent_proc import Recorder, wait_until
from tests.streams.conftest import run_job, stream_list


def test_start_list_stop(stream_agent, ctl, mosquitto, videos):
    a = stream_agent()
    N = f"cvw/v1/nodes/{a.node_id}/streams"
    rec = Recorder(mosquitto, f"{N}/#")
    params = {"stream_id": "door", "source": str(videos["face"]), "model": "blazeface", "loop": True,
              "publish": {"detections_max_hz": 5}}
    res = run_job(ctl, a.node_id, "stream.start", params)
    assert res["stream"]["stream_id"] == "door" and res["unchanged"] is False
    rec.wait_for(lambda m: len([1 for t, p, _, _ in m if t == f"{N}/door/detections"]) >= 5)
    dets = rec.payloads("/door/detections")
    d = dets[-1]
    assert d["stream_id"] == "door" and d["node_id"] == a.node_id and d["model"] == "blazeface"
    assert (d["width"], d["height"]) == (320, 240) and d["frame"] > 0 and abs(d["ts"] - time.time()) < 5
    assert d["detections"][0]["label"] == "face" and d["detections"][0]["score"] > 0.8
    x1, y1, x2, y2 = d["detections"][0]["box"]
    assert 80 < x1 < 130 and 50 < y1 < 100 and 200 < x2 < 250 and 150 < y2 < 195
    # Rate limit: at most 5 detections messages per second (QoS 0). Judged by when the node published each one
    # (capture time + latency, its own clock), not by when they reached us: delivery bunches them under load.
    rec.wait_for(lambda m: len([1 for t, _, _, _ in m if t == f"{N}/door/detections"]) >= 15)
    published = sorted(p["ts"] + p["latency_ms"] / 1000 for p in rec.payloads("/door/detections"))
    gaps = [b - a for a, b in zip(published, published[1:])]
    assert min(gaps) >= 0.95 / 5 - 0.001, gaps  # the limiter allows 5 % early, and ts is rounded to 0.1 ms
    # Same params again: a no-op; the stream keeps its counters.
    assert run_job(ctl, a.node_id, "stream.start", params)["unchanged"] is True

    listed = stream_list(ctl, a.node_id)["door"]
    assert listed["state"] == "running" and listed["origin"] == "job" and listed["spec"]["source"] == params["source"]
    assert listed["frames_processed"] > 10 and 20 < listed["capture_fps"] <= 33
    assert listed["latency_ms"]["p50"] is not None and listed["inference_ms"]["p95"] is not None

    stopped = run_job(ctl, a.node_id, "stream.stop", {"stream_id": "door"})
    assert stopped["stopped"] == "door" and stopped["stats"]["frames_processed"] > 10
    assert stream_list(ctl, a.node_id) == {}
    time.sleep(1.0)  # time for a stream that outlived its stop to publish again
    late = [p for p in rec.payloads("/door/detections") if p["ts"] + p["latency_ms"] / 1000 > stopped["ts"]]
    assert not late, "detections after stream.stop"
    # The face was in view all along: stopping ends its event.
    rec.wait_for(lambda m: any(t == f"{N}/door/events" and p["event"] == "end" for t, p, _, _ in m))
    ev = rec.payloads("/door/events")
    assert [e["event"] for e in ev][0] == "start" and ev[-1]["event"] == "end"
    rec.close()


def test_bad_requests(stream_agent, ctl, tmp_path):
    a = stream_agent()
    out = ctl.wait(ctl.submit("stream.start", {"stream_id": "x", "source": "0", "model": "nope"}, node=a.node_id), 20)
    assert out.state == "FAILED" and out.last["error"]["code"] == "model_not_found"
    out = ctl.wait(ctl.submit("stream.start", {"stream_id": "a/b", "source": "0", "model": "blazeface"},
                              node=a.node_id), 20)
    assert out.state == "REJECTED" and out.last["error"]["code"] == "invalid_params"
    out = ctl.wait(ctl.submit("stream.stop", {"stream_id": "ghost"}, node=a.node_id), 20)
    assert out.state == "FAILED" and out.last["error"]["code"] == "stream_not_found"
    # A source that does not exist is not a job failure: the stream retries it and says so; the agent lives on.
    run_job(ctl, a.node_id, "stream.start", {"stream_id": "gone", "source": str(tmp_path / "none.avi"),
                                             "model": "blazeface", "reconnect_min_s": 0.1, "reconnect_max_s": 0.4})
    s = wait_until(lambda: (g := stream_list(ctl, a.node_id)["gone"])["reconnects"] >= 2 and g, 30,
                   "two retries of the missing source")
    assert s["state"] == "reconnecting" and "no such video file" in s["last_error"]
    assert run_job(ctl, a.node_id, "node.info")["info"]["node_id"] == a.node_id
