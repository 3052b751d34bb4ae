"""In-process checks of the pieces: tracker, source parsing, the latest-frame mailbox, config validation, sysfs."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from pydantic import ValidationError

from agent.config import AgentConfig
from agent.stats import soc_temp_c
from agent.streams.config import StreamConfig, TrackerOptions
from agent.streams.sources import LatestFrame, OpenCVSource, Picamera2Source, SourceError, make_source
from agent.streams.tracker import IouTracker, iou

FACE = ("face", 0.9, (100.0, 80.0, 200.0, 180.0))


def test_tracker_start_update_end():
    tr = IouTracker(TrackerOptions(min_hits=2, end_after_s=1.0))
    assert tr.update([FACE], 0.0, 1) == []  # one sighting is not an event yet
    ev = tr.update([FACE], 0.1, 2)
    assert [e.kind for e in ev] == ["start"] and ev[0].payload()["event_id"]
    eid = ev[0].track.event_id
    assert tr.update([("face", 0.91, (102.0, 80.0, 202.0, 180.0))], 0.2, 3) == []  # small change: quiet
    ev = tr.update([("face", 0.92, (140.0, 80.0, 240.0, 180.0))], 0.3, 4)  # moved: update
    assert [e.kind for e in ev] == ["update"] and ev[0].track.event_id == eid
    assert tr.update([], 0.9, 5) == []
    ev = tr.update([], 1.31, 6)
    assert [e.kind for e in ev] == ["end"] and ev[0].payload()["score"] == 0.92 and ev[0].track.event_id == eid
    assert tr.tracks == []


def test_tracker_two_objects_and_one_frame_blip():
    tr = IouTracker(TrackerOptions(min_hits=2, end_after_s=0.5))
    other = ("face", 0.8, (300.0, 80.0, 380.0, 160.0))
    tr.update([FACE, other], 0.0, 1)
    ev = tr.update([FACE, other], 0.1, 2)
    assert sorted(e.kind for e in ev) == ["start", "start"] and len({e.track.event_id for e in ev}) == 2
    blip = ("face", 0.6, (0.0, 0.0, 20.0, 20.0))
    tr.update([FACE, other, blip], 0.2, 3)
    ev = tr.update([FACE, other], 0.8, 4)  # the blip expires without ever having been an event
    assert ev == []
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)


def test_make_source_parses_every_kind():
    assert isinstance(make_source("picamera2"), Picamera2Source) and make_source("picamera2:1").camera_num == 1
    for s, target in (("v4l2:0", 0), ("usb:2", 2), ("3", 3), ("/dev/video1", "/dev/video1")):
        src = make_source(s)
        assert isinstance(src, OpenCVSource) and src.kind == "v4l2" and src.target == target
    assert make_source("rtsp://cam.lan/stream").kind == "rtsp"
    assert make_source("http://127.0.0.1:8080/video.mjpg").kind == "http"
    f = make_source("file:/data/a.avi", loop=True)
    assert f.kind == "file" and f.target == "/data/a.avi" and f.loop is True
    assert make_source("clips/b.avi").kind == "file"


def test_missing_sources_raise_source_error(tmp_path):
    with pytest.raises(SourceError, match="no such video file"):
        make_source(str(tmp_path / "none.avi")).open()
    with pytest.raises(SourceError, match="no such camera device"):
        make_source("/dev/video99").open()
    with pytest.raises(SourceError, match="picamera2 is not usable"):
        make_source("picamera2").open()  # no libcamera here (the fake is only on the agents' PYTHONPATH)


def test_latest_frame_keeps_only_the_newest():
    box = LatestFrame()
    frames = [np.full((2, 2, 3), i, np.uint8) for i in range(5)]
    for i, f in enumerate(frames):
        box.put(f, float(i), float(i))
    item = box.take(0.1)
    assert item is not None and item[1] == 5 and int(item[0][0, 0, 0]) == 4
    assert box.dropped == 4 and box.take(0.05) is None
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(box.take(2.0)[1]))  # type: ignore[index]
    t.start()
    time.sleep(0.05)
    box.put(frames[0], 9.0, 9.0)
    t.join(2)
    assert got == [6]


def test_stream_config_validation():
    ok = StreamConfig(stream_id="door-1", source="0", model="blazeface", roi=(0.1, 0.1, 0.9, 0.9), size=(640, 480))
    assert ok.publish.detections_max_hz == 10 and ok.tracker.min_hits == 2
    for bad in ({"stream_id": "a/b"}, {"roi": (0.5, 0.1, 0.4, 0.9)}, {"size": (4, 4)}, {"fps": 0},
                {"reconnect_min_s": 5, "reconnect_max_s": 1}, {"unknown": 1}):
        with pytest.raises(ValidationError):
            StreamConfig(**{"stream_id": "s", "source": "0", "model": "m", **bad})
    cfg = AgentConfig(node_id="n", streams=[{"stream_id": "s", "source": "picamera2", "model": "blazeface"}])
    assert cfg.streams[0].source == "picamera2" and cfg.stats.interval_s == 30.0


def test_soc_temperature_from_sysfs(tmp_path):
    assert soc_temp_c(str(tmp_path)) is None
    for i, (kind, milli) in enumerate((("acpitz", "27800"), ("cpu-thermal", "48312"))):
        z = tmp_path / f"thermal_zone{i}"
        z.mkdir()
        (z / "type").write_text(kind + "\n")
        (z / "temp").write_text(milli + "\n")
    assert soc_temp_c(str(tmp_path)) == 48.3  # the Pi's cpu-thermal zone wins over others
