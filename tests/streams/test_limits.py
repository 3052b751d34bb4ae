"""Nothing a node's streams hold grows without bound: the number of streams (running and persisted), the retained
snapshots on the broker, the tracker, the rate counters and the persisted params. Real agent, real mosquitto, real
BlazeFace, real videos, except the in-process checks of the tracker and the counters."""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from typing import Any

import pytest
from pydantic import ValidationError

from agent.devbroker import Mosquitto
from agent.streams.config import StreamConfig, TrackerOptions
from agent.streams.metrics import Rate
from agent.streams.tracker import IouTracker
from tests.agent_proc import REPO, AgentProc, Recorder, write_config
from tests.streams.conftest import run_job, stream_list, streams_toml


def _params(sid: str, source: str, **kw: Any) -> dict[str, Any]:
    return {"stream_id": sid, "source": source, "model": "blazeface", "loop": True, "fps": 2, **kw}


def _start(a: AgentProc, broker: Mosquitto) -> AgentProc:
    """Start the agent and wait for its birth message. The agent sends it after its SUBSCRIBE on the same
    connection, so once the broker has it, requests reach the agent; a request sent between the agent's
    "connected" log line (what AgentProc.start waits for) and that point would be lost."""
    rec = Recorder(broker, f"cvw/v1/nodes/{a.node_id}/status")
    a.start()
    rec.wait_for(lambda m: any(isinstance(p, dict) and p.get("state") == "online" for _, p, _, _ in m))
    rec.close()
    return a


def _persisted(a: AgentProc) -> dict[str, Any]:
    """The desired set in the agent's durable state (read while the agent is stopped)."""
    from agent.state import StateStore

    return StateStore(a.state_dir, read_only=True).meta_get("streams")


def test_start_beyond_the_limit_fails_and_a_restart_is_not_a_new_stream(stream_agent, ctl, mosquitto, videos):
    a = _start(stream_agent(stream_limits={"max_streams": 2}, start=False), mosquitto)
    face = str(videos["face"])
    run_job(ctl, a.node_id, "stream.start", _params("s1", face))
    run_job(ctl, a.node_id, "stream.start", _params("s2", face))

    out = ctl.wait(ctl.submit("stream.start", _params("s3", face), node=a.node_id), 30)
    assert out.state == "FAILED" and out.last["error"]["code"] == "too_many_streams", out.last
    msg = out.last["error"]["message"]
    assert "at most 2 streams (stream_limits.max_streams) and has 2: s1, s2" in msg, msg

    # The same id with new params restarts that stream, and the same params again are a no-op: neither is new.
    res = run_job(ctl, a.node_id, "stream.start", _params("s1", face, fps=3))
    assert res["unchanged"] is False and res["stream"]["spec"]["fps"] == 3
    assert run_job(ctl, a.node_id, "stream.start", _params("s1", face, fps=3))["unchanged"] is True
    assert set(stream_list(ctl, a.node_id)) == {"s1", "s2"}

    # A stop frees a place.
    run_job(ctl, a.node_id, "stream.stop", {"stream_id": "s2"})
    run_job(ctl, a.node_id, "stream.start", _params("s3", face))
    assert set(stream_list(ctl, a.node_id)) == {"s1", "s3"}
    assert a.stop() == 0
    assert set(_persisted(a)) == {"s1", "s3"}


def test_persisted_set_is_cut_to_the_limit_at_boot(stream_agent, ctl, mosquitto, videos, tmp_path):
    a = _start(stream_agent(stream_limits={"max_streams": 3}, start=False), mosquitto)
    # Sources that do not exist: the streams retry them quietly, so three of them cost no CPU.
    for sid in ("j1", "j2", "j3"):
        run_job(ctl, a.node_id, "stream.start", _params(sid, str(tmp_path / f"{sid}.avi"), reconnect_min_s=5,
                                                        reconnect_max_s=5))
    assert a.stop() == 0
    assert list(_persisted(a)) == ["j1", "j2", "j3"]

    # The operator lowers the limit and declares a stream of their own: it goes first, one persisted stream fits.
    write_config(a.config_path, {**a.cfg, "stream_limits": {"max_streams": 2}})
    with open(a.config_path, "a") as f:
        f.write(streams_toml([_params("cfg", str(videos["face"]))]))
    _start(a, mosquitto)
    a.wait_log("streams resumed:")
    assert set(stream_list(ctl, a.node_id)) == {"cfg", "j1"}
    log = a.log()
    for sid in ("j2", "j3"):
        assert (f"persisted stream {sid} not resumed: this node runs at most 2 streams (stream_limits.max_streams) "
                "and cfg, j1 take them; dropped from the persisted set") in log, log[-3000:]
    assert a.stop() == 0
    assert list(_persisted(a)) == ["j1"], "the persisted set must not keep more than the limit"


def test_config_check_refuses_more_streams_than_the_limit(tmp_path):
    cfg = write_config(tmp_path / "c.toml", {"node_id": "n1", "stream_limits": {"max_streams": 1}})
    with open(cfg, "a") as f:
        f.write(streams_toml([_params("a", "0"), _params("b", "1")]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CV_WORKER_")}
    r = subprocess.run([sys.executable, "-m", "agent.cli", "config", "check", "--config", str(cfg)],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert r.returncode == 2, r.stdout
    assert "streams: declares 2 streams (a, b) but stream_limits.max_streams is 1" in r.stderr, r.stderr


def test_snapshot_expires_and_stream_stop_clears_it(stream_agent, ctl, mosquitto, videos):
    a = _start(stream_agent(start=False), mosquitto)
    N = f"cvw/v1/nodes/{a.node_id}"
    topic = f"{N}/streams/door/snapshot"
    rec = Recorder(mosquitto, topic)
    run_job(ctl, a.node_id, "stream.start", _params("door", str(videos["face"]), fps=5))
    rec.wait_for(lambda m: any(isinstance(p, bytes) and p for _, p, _, _ in m))
    props = rec.messages[0][2]
    # The broker forwards the remaining lifetime, so a message that has been on its way a moment shows a bit less.
    assert 86400 - 60 < props.MessageExpiryInterval <= 86400, props
    late = Recorder(mosquitto, topic)
    late.wait_for(lambda m: len(m) >= 1)
    assert late.messages[0][3] is True and 0 < late.messages[0][2].MessageExpiryInterval <= 86400
    late.close()

    run_job(ctl, a.node_id, "stream.stop", {"stream_id": "door"})
    rec.wait_for(lambda m: any(p == b"" for _, p, _, _ in m))  # the clearing message, seen by a live subscriber
    rec.close()
    # A new subscriber gets a topic's retained messages in the order it subscribed: once the node's retained birth
    # (subscribed second) arrives, a retained snapshot would already be there.
    after = Recorder(mosquitto, topic, f"{N}/status")
    after.wait_for(lambda m: any(t == f"{N}/status" for t, _, _, _ in m))
    assert [t for t, _, _, _ in after.messages] == [f"{N}/status"], "a retained snapshot of a stopped stream"
    after.close()


def test_snapshot_expiry_is_configurable(stream_agent, ctl, mosquitto, videos):
    a = _start(stream_agent(stream_limits={"snapshot_expiry_s": 600}, start=False), mosquitto)
    topic = f"cvw/v1/nodes/{a.node_id}/streams/door/snapshot"
    rec = Recorder(mosquitto, topic)
    run_job(ctl, a.node_id, "stream.start", _params("door", str(videos["face"]), fps=5))
    rec.wait_for(lambda m: len(m) >= 1)
    assert 540 < rec.messages[0][2].MessageExpiryInterval <= 600
    rec.close()


def test_tracker_holds_at_most_max_tracks():
    # Objects never end by time here (end_after_s of an hour): only the bound keeps the tracker small.
    tr = IouTracker(TrackerOptions(min_hits=1, end_after_s=3600, max_tracks=5))
    started: set[str] = set()
    ended: set[str] = set()
    for frame in range(1, 41):
        # Twenty new, non-overlapping objects every frame, the last ones with the best scores.
        dets = [("face", 0.5 + i / 100, (frame * 1000.0 + i * 20, 0.0, frame * 1000.0 + i * 20 + 10, 10.0))
                for i in range(20)]
        for e in tr.update(dets, float(frame), frame):
            (started if e.kind == "start" else ended).add(e.track.event_id)  # type: ignore[arg-type]
        assert len(tr.tracks) <= 5
    # The surest five of the last frame are what is tracked; every other object that started also ended.
    assert sorted(round(t.score, 2) for t in tr.tracks) == [0.65, 0.66, 0.67, 0.68, 0.69]
    assert ended == started - {t.event_id for t in tr.tracks} and len(started) == 40 * 5

    # An object still in view keeps its track when new ones arrive.
    tr = IouTracker(TrackerOptions(min_hits=1, end_after_s=3600, max_tracks=2))
    stay = ("face", 0.9, (0.0, 0.0, 100.0, 100.0))
    first = tr.update([stay], 0.0, 1)[0].track.event_id
    for frame in range(2, 10):
        tr.update([stay, ("face", 0.5, (frame * 200.0, 0.0, frame * 200.0 + 50, 50.0))], float(frame), frame)
    assert first in {t.event_id for t in tr.tracks} and len(tr.tracks) == 2


def test_rate_memory_does_not_grow_with_the_rate():
    r = Rate(window_s=10.0)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(200_000):  # 20 000 events a second for 10 s: a source of tiny frames
            r.add(1000.0 + i / 20_000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert r.total == 200_000
    assert grown < 64 * 1024, f"{grown} bytes for one rate counter"


def test_stream_params_are_bounded():
    ok = StreamConfig(stream_id="s", source="0", model="m", classes=["face"] * 256)
    assert ok.classes is not None and len(ok.classes) == 256
    for bad in (["face"] * 257, ["x" * 129], [""]):
        with pytest.raises(ValidationError, match="classes"):
            StreamConfig(stream_id="s", source="0", model="m", classes=bad)


def test_hostile_classes_are_refused_over_mqtt(stream_agent, ctl, mosquitto):
    a = _start(stream_agent(start=False), mosquitto)
    out = ctl.wait(ctl.submit("stream.start", {**_params("s", "0"), "classes": ["c"] * 100_000}, node=a.node_id), 30)
    assert out.state == "REJECTED" and out.last["error"]["code"] == "invalid_params", out.last
    assert "classes" in out.last["error"]["message"]
    assert stream_list(ctl, a.node_id) == {}
