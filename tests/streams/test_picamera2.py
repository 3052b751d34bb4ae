"""The picamera2 source through the fake module (libcamera exists only on a Pi), in a real agent."""

from __future__ import annotations

import time

from tests.agent_proc import Recorder
from tests.streams.conftest import run_job, stream_list


def test_picamera2_stream(fake_picamera2, stream_agent, ctl, mosquitto):
    a = stream_agent()
    N = f"cvw/v1/nodes/{a.node_id}/streams/pi"
    rec = Recorder(mosquitto, f"{N}/detections", f"{N}/events")
    run_job(ctl, a.node_id, "stream.start", {"stream_id": "pi", "source": "picamera2", "model": "blazeface",
                                             "size": [320, 240], "fps": 15, "reconnect_min_s": 0.2,
                                             "reconnect_max_s": 0.5})
    rec.wait_for(lambda m: len(rec.payloads("/detections")) >= 5)
    d = rec.payloads("/detections")[-1]
    assert (d["width"], d["height"]) == (320, 240)
    # Colours arrive in the right order: BlazeFace finds the astronaut with its usual confidence.
    assert d["detections"] and d["detections"][0]["label"] == "face" and d["detections"][0]["score"] > 0.85
    rec.wait_for(lambda m: any(p.get("event") == "start" for p in rec.payloads("/events")))
    calls = fake_picamera2["log"].read_text().splitlines()
    assert calls[:4] == ["init 0",
                         "create_video_configuration main={'size': (320, 240), 'format': 'RGB888'} "
                         "controls={'FrameRate': 15.0} buffer_count=2",
                         "configure {'format': 'RGB888', 'size': (320, 240)}", "start"], calls
    s = stream_list(ctl, a.node_id)["pi"]
    assert s["state"] == "running" and 10 <= s["capture_fps"] <= 17

    # Camera unplugged: capture fails, the stream retries; plugged back: it runs again.
    fake_picamera2["unplugged"].touch()
    deadline = time.monotonic() + 10
    while (s := stream_list(ctl, a.node_id)["pi"])["state"] != "reconnecting":
        assert time.monotonic() < deadline, s
        time.sleep(0.2)
    assert "Pi camera 0" in s["last_error"]
    fake_picamera2["unplugged"].unlink()
    n = len(rec.payloads("/detections"))
    rec.wait_for(lambda m: len(rec.payloads("/detections")) >= n + 3, timeout=10)

    run_job(ctl, a.node_id, "stream.stop", {"stream_id": "pi"})
    calls = fake_picamera2["log"].read_text().splitlines()
    assert calls[-2:] == ["stop", "close"], calls[-6:]
    assert calls.count("init 0") == calls.count("close") >= 2  # every opened camera was released
    rec.close()
