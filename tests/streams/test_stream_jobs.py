"""stream.start / stream.stop / stream.list against a real agent, mosquitto and BlazeFace."""

from __future__ import annotations

import time

from tests.agent_proc import Recorder
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
    # Rate limit: at most 5 detections messages per second (QoS 0).
    n0 = len(rec.payloads("/door/detections"))
    time.sleep(2.0)
    assert len(rec.payloads("/door/detections")) - n0 <= 12
    # Same params again: a no-op; the stream keeps its counters.
    assert run_job(ctl, a.node_id, "stream.start", params)["unchanged"] is True

    listed = stream_list(ctl, a.node_id)["door"]
    assert listed["state"] == "running" and listed["origin"] == "job" and listed["spec"]["source"] == params["source"]
    assert listed["frames_processed"] > 10 and 20 < listed["capture_fps"] <= 33
    assert listed["latency_ms"]["p50"] is not None and listed["inference_ms"]["p95"] is not None

    stopped = run_job(ctl, a.node_id, "stream.stop", {"stream_id": "door"})
    assert stopped["stopped"] == "door" and stopped["stats"]["frames_processed"] > 10
    assert stream_list(ctl, a.node_id) == {}
    time.sleep(0.5)
    n = len(rec.payloads("/door/detections"))
    time.sleep(1.0)
    assert len(rec.payloads("/door/detections")) == n, "detections after stream.stop"
    # The face was in view all along: stopping ends its event.
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
    time.sleep(1.5)
    s = stream_list(ctl, a.node_id)["gone"]
    assert s["state"] == "reconnecting" and "no such video file" in s["last_error"] and s["reconnects"] >= 2
    assert run_job(ctl, a.node_id, "node.info")["info"]["node_id"] == a.node_id
