"""N/stats: periodic and on request, with per-stream, per-model and node figures."""

from __future__ import annotations

from tests.agent_proc import Recorder
from tests.streams.conftest import run_job


def test_stats_periodic_and_on_request(stream_agent, ctl, mosquitto, videos):
    a = stream_agent(stats={"interval_s": 1.0})
    rec = Recorder(mosquitto, f"cvw/v1/nodes/{a.node_id}/stats")
    run_job(ctl, a.node_id, "stream.start", {"stream_id": "s1", "source": str(videos["face"]), "model": "blazeface",
                                             "loop": True, "fps": 10})
    rec.wait_for(lambda m: sum(1 for p in rec.payloads() if p["streams"].get("s1", {}).get("frames_processed")) >= 2,
                 timeout=15)
    st = rec.payloads()[-1]
    assert st["node_id"] == a.node_id and st["uptime_s"] > 0 and st["cpu_count"] >= 1
    assert 0 <= st["cpu_percent"] <= 100 and st["process_cpu_percent"] >= 0 and len(st["load_avg"]) == 3
    mem = st["memory"]
    assert mem["total_mb"] > 0 and 0 < mem["used_percent"] < 100 and mem["process_rss_mb"] > 0
    assert st["disk"]["free_mb"] > 0 and st["disk"]["path"] == str(a.state_dir)
    assert "soc_temp_c" in st  # None on machines without a thermal zone
    assert st["jobs"]["by_state"]["SUCCEEDED"] >= 1 and "running" in st["jobs"] and "queued" in st["jobs"]
    s = st["streams"]["s1"]
    assert s["state"] == "running" and s["source"] == str(videos["face"]) and s["model"] == "blazeface"
    assert 20 <= s["capture_fps"] <= 33 and 0 < s["processed_fps"] <= 11 and s["skipped_fps"] > 10
    assert s["inference_ms"]["p50"] > 0 and s["inference_ms"]["p95"] >= s["inference_ms"]["p50"]
    assert s["latency_ms"]["p50"] > 0 and s["latency_ms"]["p95"] >= s["latency_ms"]["p50"]
    m = st["models"]["blazeface"]
    assert m["version"] == "0.6.0" and m["backend"] and m["device"] and m["load_ms"] > 0
    assert m["inferences"] > 0 and 0 < m["per_s"] <= 11 and 0 < m["busy"] < 1 and m["latency_ms"]["p50"] > 0

    # On request: the job returns the figures and publishes them.
    n = len(rec.payloads())
    res = run_job(ctl, a.node_id, "node.stats")
    assert set(res["stats"]) >= {"node_id", "cpu_percent", "memory", "disk", "soc_temp_c", "uptime_s", "jobs",
                                 "streams", "models"}
    rec.wait_for(lambda m: len(m) > n)
    retained = Recorder(mosquitto, f"cvw/v1/nodes/{a.node_id}/stats")
    retained.wait_for(lambda m: len(m) >= 1 and m[0][3] is True)
    retained.close()
    rec.close()
