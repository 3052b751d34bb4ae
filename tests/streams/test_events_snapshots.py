"""Object events and snapshots for a face that enters and leaves a real video (astronaut over a coffee cup)."""

from __future__ import annotations

import time

import cv2
import numpy as np

from tests.agent_proc import Recorder
from tests.streams.conftest import run_job, stream_list


def _jpeg(payload: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None, "snapshot is not a JPEG"
    return img


def test_face_enters_and_leaves(stream_agent, ctl, mosquitto, videos):
    a = stream_agent()
    N = f"cvw/v1/nodes/{a.node_id}/streams/lobby"
    rec = Recorder(mosquitto, f"{N}/events", f"{N}/snapshot")
    t0 = time.time()
    run_job(ctl, a.node_id, "stream.start", {"stream_id": "lobby", "source": str(videos["enter_leave"]),
                                             "model": "blazeface", "threshold": 0.6, "classes": ["face"]})
    rec.wait_for(lambda m: any(isinstance(p, dict) and p.get("event") == "end" for t, p, _, _ in m), timeout=20)
    events = rec.payloads("/events")
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("start") == 1, kinds
    start, end = events[0], events[-1]
    assert start["event_id"] == end["event_id"] and all(e["event_id"] == start["event_id"] for e in events)
    assert start["label"] == "face" and start["stream_id"] == "lobby" and start["node_id"] == a.node_id
    assert end["score"] >= start["score"] > 0.8
    x1, y1, x2, y2 = end["box"]
    assert 80 < x1 < 130 and 50 < y1 < 100 and 200 < x2 < 250 and 150 < y2 < 195
    # The face is in frames 31-90 of the video (1-based): the event starts there and lasts about 2 s.
    assert 31 <= start["frame"] <= 45 and 90 < end["frame"] < 140, (start, end)
    assert 1.4 < end["duration_s"] < 2.6 and start["first_seen"] > t0, end
    assert start["snapshot"] is True

    # The snapshot of the event start: a retained JPEG of the frame with the box drawn.
    snaps = [(p, props, r) for t, p, props, r in rec.messages if t.endswith("/snapshot")]
    assert snaps, "no snapshot on event start"
    payload, props, _ = snaps[0]
    img = _jpeg(payload)
    assert img.shape == (240, 320, 3)
    assert props.ContentType == "image/jpeg" and dict(props.UserProperty)["reason"] == "event"
    rec.close()

    late = Recorder(mosquitto, f"{N}/snapshot")  # a controller that connects later still gets the last one
    late.wait_for(lambda m: len(m) >= 1)
    assert late.messages[0][3] is True and isinstance(late.messages[0][1], bytes)
    late.close()

    # On request: the latest processed frame (background only by now, so no boxes).
    rec = Recorder(mosquitto, f"{N}/snapshot")
    res = run_job(ctl, a.node_id, "stream.snapshot", {"stream_id": "lobby"})
    assert res["snapshot"]["bytes"] > 1000 and res["snapshot"]["topic"] == f"{N}/snapshot"
    rec.wait_for(lambda m: any(dict(p.UserProperty).get("reason") == "request" for _, _, p, _ in m))
    rec.close()
    # The file has no `loop`: at its end the stream says so and waits.
    deadline = time.monotonic() + 10
    while stream_list(ctl, a.node_id)["lobby"]["state"] != "ended":
        assert time.monotonic() < deadline, "stream did not report the end of its file"
        time.sleep(0.3)
