"""Streams declared in the config start at boot; the desired set survives a power cut; a vanished source is
retried with backoff and picked up again when it comes back."""

from __future__ import annotations

import os
import shutil
import time

from tests.agent_proc import Recorder, wait_until
from tests.streams.conftest import run_job, stream_list


def _detections_from(rec: Recorder, sid: str, since: float) -> int:
    return sum(1 for t, p, _, _ in list(rec.messages)
               if t.endswith(f"/{sid}/detections") and isinstance(p, dict) and p["ts"] >= since)


def test_config_streams_and_resume_after_power_cut(stream_agent, ctl, mosquitto, videos):
    face = str(videos["face"])
    a = stream_agent(streams=[{"stream_id": "cfg", "source": face, "model": "blazeface", "loop": True, "fps": 5,
                               "publish": {"detections_max_hz": 5}}])
    rec = Recorder(mosquitto, f"cvw/v1/nodes/{a.node_id}/streams/+/detections")
    # Declared in the config: running without any controller action.
    rec.wait_for(lambda m: _detections_from(rec, "cfg", 0) >= 3)
    listed = stream_list(ctl, a.node_id)
    assert listed["cfg"]["origin"] == "config" and listed["cfg"]["state"] == "running"

    run_job(ctl, a.node_id, "stream.start", {"stream_id": "job1", "source": face, "model": "blazeface",
                                             "loop": True, "fps": 5})
    run_job(ctl, a.node_id, "stream.start", {"stream_id": "job2", "source": face, "model": "blazeface",
                                             "loop": True, "fps": 5})
    run_job(ctl, a.node_id, "stream.stop", {"stream_id": "job2"})
    rec.wait_for(lambda m: _detections_from(rec, "job1", 0) >= 2)

    a.kill()  # power cut
    t_restart = time.time()
    a.start()
    rec.wait_for(lambda m: _detections_from(rec, "job1", t_restart) >= 3 and _detections_from(rec, "cfg", t_restart)
                 >= 3, timeout=30)
    listed = stream_list(ctl, a.node_id)
    assert set(listed) == {"cfg", "job1"}, "job2 was stopped before the power cut and must stay stopped"
    assert listed["job1"]["origin"] == "job" and listed["job1"]["spec"]["fps"] == 5
    a.wait_log("streams resumed: cfg, job1")
    rec.close()


def test_source_disappears_and_comes_back(stream_agent, ctl, mosquitto, videos, tmp_path):
    clip = tmp_path / "clip.avi"
    shutil.copy(videos["face"], clip)  # 1 s, looped: the file is reopened at each loop point
    a = stream_agent()
    rec = Recorder(mosquitto, f"cvw/v1/nodes/{a.node_id}/streams/+/detections")
    run_job(ctl, a.node_id, "stream.start", {"stream_id": "cam", "source": f"file:{clip}", "model": "blazeface",
                                             "loop": True, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0})
    rec.wait_for(lambda m: _detections_from(rec, "cam", 0) >= 3)
    os.rename(clip, tmp_path / "away.avi")  # camera unplugged
    deadline = time.monotonic() + 10
    while (s := stream_list(ctl, a.node_id)["cam"])["state"] != "reconnecting":
        assert time.monotonic() < deadline, s
        time.sleep(0.2)
    assert "no such video file" in s["last_error"]
    s = wait_until(lambda: (c := stream_list(ctl, a.node_id)["cam"])["reconnects"] >= 2 and c, 30,
                   "two retries of the vanished source")
    assert s["state"] == "reconnecting", s  # retried with backoff, not given up
    assert run_job(ctl, a.node_id, "node.info")["info"]["node_id"] == a.node_id  # the agent lives on

    os.rename(tmp_path / "away.avi", clip)  # plugged back in
    t_back = time.time()
    rec.wait_for(lambda m: _detections_from(rec, "cam", t_back) >= 3, timeout=15)
    assert stream_list(ctl, a.node_id)["cam"]["state"] == "running"
    assert "stream cam: reconnecting (no such video file" in a.log()
    rec.close()
