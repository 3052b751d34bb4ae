"""Every endpoint of the HTTP API against a running agent on a real broker."""

from __future__ import annotations

import json
import time
import uuid

import cv2
import numpy as np
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.agent_proc import Recorder, controller, final_states
from tests.http.conftest import ASTRONAUT_FACE, MAX_BODY_BYTES, MAX_IMAGE_BYTES, problem_of, sse_events


def _close(a, b, tol=15.0):
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def test_healthz_needs_no_token(api):
    r = api.get("/healthz", token=None)
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok" and h["node_id"] == "http-node" and h["mqtt_connected"] is True


def test_node_models_streams(api):
    info = api.get("/v1/node").json()
    assert info["node_id"] == "http-node" and info["state"] == "online" and info["mqtt"]["connected"]
    assert "infer" in info["capabilities"] and info["http"]["listening"] is True
    assert {"boot_id", "bd_seq", "accelerators", "models", "pools", "version"} <= set(info)
    models = {m["name"]: m for m in api.get("/v1/models").json()["models"]}
    assert models["blazeface"]["task"] == "detection" and models["blazeface"]["active"] == "0.6.0"
    streams = api.get("/v1/streams").json()["streams"]
    assert [s["stream_id"] for s in streams] == ["lobby"] and streams[0]["model"] == "blazeface"


def test_job_lifecycle_goes_through_mqtt_too(api, broker):
    """A job submitted over HTTP is the same job as an MQTT one: QUEUED/IN_PROGRESS/SUCCEEDED on its status topic,
    results on its result topic, and visible to `job.result` over MQTT."""
    job_id = f"http-{uuid.uuid4().hex[:8]}"
    rec = Recorder(broker, f"cvw/v1/nodes/http-node/jobs/{job_id}/#")
    r = api.post("/v1/jobs", json={"type": "debug.sleep", "params": {"seconds": 0.3}, "job_id": job_id})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["job_id"] == job_id and body["state"] == "QUEUED" and body["source"] == "http"
    assert r.headers["location"] == f"/v1/jobs/{job_id}" == body["links"]["self"]
    # The same POST again (a client retrying) does not make a second job.
    again = api.post("/v1/jobs", json={"type": "debug.sleep", "params": {"seconds": 0.3}, "job_id": job_id})
    assert again.status_code == 200 and again.json()["job_id"] == job_id
    job = api.wait_job(job_id)
    assert job["state"] == "SUCCEEDED" and job["progress"] == 1.0 and job["params"] == {"seconds": 0.3}
    rec.wait_for(lambda m: final_states(rec, "http-node").get(job_id, {}).get("state") == "SUCCEEDED")
    states = [p["state"] for t, p, _, _ in rec.messages if t.endswith("/status")]
    assert states[0] == "QUEUED" and states[-1] == "SUCCEEDED" and "IN_PROGRESS" in states
    rec.wait_for(lambda m: any(t.endswith("/result") for t, _, _, _ in m))
    rec.close()
    res = api.get(f"/v1/jobs/{job_id}/result").json()
    assert res["complete"] is True and res["state"] == "SUCCEEDED" and res["results"][-1]["final"] is True
    with controller(broker) as ctl:
        out = ctl.wait(ctl.submit("job.result", {"job_id": job_id}, node="http-node"), timeout=30)
        assert out.state == "SUCCEEDED" and out.results[-1]["of_state"] == "SUCCEEDED"
    listed = api.get("/v1/jobs", params={"source": "http", "type": "debug.sleep"}).json()
    assert job_id in [j["job_id"] for j in listed["jobs"]] and listed["by_state"]["SUCCEEDED"] >= 1
    assert all(j["source"] == "http" and j["type"] == "debug.sleep" for j in listed["jobs"])
    # MQTT jobs are listed too, and filters by state work.
    with controller(broker) as ctl:
        mqtt_id = ctl.submit("node.info", node="http-node")
        assert ctl.wait(mqtt_id, timeout=30).state == "SUCCEEDED"
    j = api.get(f"/v1/jobs/{mqtt_id}").json()
    assert j["source"] == "mqtt" and j["state"] == "SUCCEEDED"
    succeeded = api.get("/v1/jobs", params={"state": "SUCCEEDED", "limit": 1000}).json()["jobs"]
    assert {job_id, mqtt_id} <= {x["job_id"] for x in succeeded} and all(x["state"] == "SUCCEEDED" for x in succeeded)


def test_cancel(api):
    r = api.post("/v1/jobs", json={"type": "debug.sleep", "params": {"seconds": 30}})
    job_id = r.json()["job_id"]
    deadline = time.monotonic() + 20
    while api.get(f"/v1/jobs/{job_id}").json()["state"] != "IN_PROGRESS":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = api.delete(f"/v1/jobs/{job_id}")
    assert r.status_code == 200 and r.json()["state"] == "CANCELED", r.text
    assert api.get(f"/v1/jobs/{job_id}").json()["error"]["code"] == "canceled"
    problem_of(api.delete(f"/v1/jobs/{job_id}"), 409, "not_cancelable")
    problem_of(api.delete("/v1/jobs/no-such-job"), 404, "not_found")


def test_job_errors_use_the_protocol_codes(api):
    problem_of(api.post("/v1/jobs", data=b"{not json", headers={"Content-Type": "application/json"}), 400,
               "invalid_json")
    problem_of(api.post("/v1/jobs", json=["a", "list"]), 422, "invalid_request")
    problem_of(api.post("/v1/jobs", json={"params": {}}), 422, "invalid_request")
    p = problem_of(api.post("/v1/jobs", json={"type": "no.such.type"}), 422, "unknown_job_type")
    assert "node.info" in p["detail"]
    p = problem_of(api.post("/v1/jobs", json={"type": "infer", "params": {"model": "blazeface"}}), 422,
                   "invalid_params")
    assert "images" in p["detail"]
    problem_of(api.post("/v1/jobs", json={"type": "node.info", "job_id": "bad id!"}), 422, "invalid_job_id")
    problem_of(api.get("/v1/jobs/nope"), 404, "not_found")
    problem_of(api.get("/v1/jobs/nope/result"), 404, "not_found")
    problem_of(api.get("/v1/jobs/nope/events"), 404, "not_found")
    problem_of(api.get("/v1/jobs", params={"state": "SLEEPING"}), 422, "invalid_request")
    problem_of(api.get("/v1/no/such/thing"), 404, "not_found")
    problem_of(api.request("PUT", "/v1/jobs"), 405, "invalid_request")


def test_server_sent_events(api):
    r = api.post("/v1/jobs", json={"type": "debug.sleep", "params": {"seconds": 0.6}})
    job_id = r.json()["job_id"]
    with api.get(f"/v1/jobs/{job_id}/events", stream=True, timeout=30) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(resp))
    statuses = [json.loads(e.data) for e in events if e.event == "status"]
    assert [s["state"] for s in statuses][-1] == "SUCCEEDED" and "IN_PROGRESS" in [s["state"] for s in statuses]
    versions = [s["version"] for s in statuses]
    assert versions == sorted(set(versions)) and [int(e.id) for e in events if e.id] == versions
    assert all(s["job_id"] == job_id and s["node_id"] == "http-node" for s in statuses)
    assert json.loads(events[-1].data) == {"state": "SUCCEEDED"}
    # Reconnecting with Last-Event-ID gives only what came after; for an ended job just the end.
    with api.get(f"/v1/jobs/{job_id}/events", stream=True, headers={"Last-Event-ID": str(versions[-1])}) as resp:
        text = resp.text
    assert "event: status" not in text and "event: end" in text


def test_predict_waits_for_the_face(api, astronaut_jpeg, broker):
    rec = Recorder(broker, "cvw/v1/nodes/http-node/jobs/+/status")
    with open(astronaut_jpeg, "rb") as f:
        r = api.post("/v1/predict/blazeface", params={"wait": "true"}, files={"image": ("kitten.jpg", f)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["state"] == "SUCCEEDED" and body["model"] == "blazeface" and body["backend"]
    img = body["image"]
    assert img["id"] == "kitten.jpg" and (img["width"], img["height"]) == (512, 512)
    assert len(img["detections"]) == 1 and img["detections"][0]["label"] == "face"
    assert _close(img["detections"][0]["box"], ASTRONAUT_FACE, 6), img
    # An ordinary infer job, on MQTT too; once it ended it keeps a summary of its params, not the image.
    rec.wait_for(lambda m: final_states(rec, "http-node").get(body["job_id"], {}).get("state") == "SUCCEEDED")
    rec.close()
    job = api.get(f"/v1/jobs/{body['job_id']}").json()
    assert job["type"] == "infer" and job["params"]["model"] == "blazeface"
    data = job["params"]["images"][0]["data"]
    assert data["omitted"] == "string" and data["chars"] > 10_000


def test_predict_without_wait_and_filters(api, astronaut_jpeg):
    r = api.post("/v1/predict/blazeface", files={"image": ("a.jpg", astronaut_jpeg.read_bytes(), "image/jpeg")},
                 params={"classes": "cat"})
    assert r.status_code == 202 and r.json()["type"] == "infer", r.text
    job = api.wait_job(r.json()["job_id"])
    assert job["state"] == "SUCCEEDED"
    items = [i for m in api.get(f"/v1/jobs/{job['job_id']}/result").json()["results"] for i in m.get("items", [])]
    assert items[0]["ok"] and items[0]["detections"] == []  # the face is filtered out by classes=cat


def test_predict_errors_match_the_infer_job(api, astronaut_jpeg):
    jpeg = astronaut_jpeg.read_bytes()
    p = problem_of(api.post("/v1/predict/nomodel", params={"wait": "true"}, files={"image": ("a.jpg", jpeg)}), 404,
                   "model_not_found")
    assert api.get(f"/v1/jobs/{p['job_id']}").json()["state"] == "FAILED"
    problem_of(api.post("/v1/predict/blazeface", params={"wait": "true"},
                        files={"image": ("notes.jpg", b"this is text, not a JPEG")}), 422, "not_an_image")
    problem_of(api.post("/v1/predict/Bad Name!", files={"image": ("a.jpg", jpeg)}), 422, "invalid_params")
    problem_of(api.post("/v1/predict/blazeface", params={"threshold": 2}, files={"image": ("a.jpg", jpeg)}), 422,
               "invalid_params")
    problem_of(api.post("/v1/predict/blazeface", data={"picture": "x"}), 422, "invalid_request")
    # A decompression bomb: a tiny PNG that claims 30000 x 30000 pixels.
    big = np.zeros((8, 8, 3), np.uint8)
    ok, png = cv2.imencode(".png", big)
    raw = bytearray(png.tobytes())
    raw[16:24] = (30000).to_bytes(4, "big") + (30000).to_bytes(4, "big")
    problem_of(api.post("/v1/predict/blazeface", params={"wait": "true"}, files={"image": ("bomb.png", bytes(raw))}),
               413, "image_too_large")


def test_size_limits(api):
    # Image uploads: inference.max_image_bytes, as for an infer job's `data`.
    noise = np.random.default_rng(0).integers(0, 256, MAX_IMAGE_BYTES + 100, dtype=np.uint8).tobytes()
    p = problem_of(api.post("/v1/predict/blazeface", files={"image": ("big.jpg", noise)}), 413, "too_large")
    assert "inference.max_image_bytes" in p["detail"]
    # A multipart body far above it is refused from its Content-Length, without being parsed.
    huge = noise * 3
    problem_of(api.post("/v1/predict/blazeface", files={"image": ("huge.jpg", huge)}), 413, "payload_too_large")
    # JSON bodies: [http] max_body_bytes, by Content-Length and, for a chunked body without one, by counting.
    body = json.dumps({"type": "node.info", "params": {"pad": "x" * MAX_BODY_BYTES}}).encode()
    problem_of(api.post("/v1/jobs", data=body, headers={"Content-Type": "application/json"}), 413,
               "payload_too_large")

    def chunks():
        for i in range(0, len(body), 16384):
            yield body[i:i + 16384]

    r = api.post("/v1/jobs", data=chunks(), headers={"Content-Type": "application/json"})
    problem_of(r, 413, "payload_too_large")
    assert api.get("/healthz").status_code == 200


def test_auth(api, token):
    for method, path in (("GET", "/v1/node"), ("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/models"),
                         ("GET", "/v1/streams"), ("GET", "/openapi.json"), ("DELETE", "/v1/jobs/x"),
                         ("GET", "/v1/streams/lobby/snapshot.jpg"), ("POST", "/v1/predict/blazeface")):
        r = api.request(method, path, token=None)
        p = problem_of(r, 401, "unauthorized")
        assert r.headers["www-authenticate"].startswith("Bearer"), r.headers
        assert "token" in p["detail"]
        problem_of(api.request(method, path, token="wrong-" + token), 401, "unauthorized")
    r = api.get("/v1/node", token=None, headers={"Authorization": f"Basic {token}"})
    problem_of(r, 401, "unauthorized")
    # GET (only) may carry the token in the query, for <img> and EventSource.
    assert api.get(f"/v1/node?access_token={token}", token=None).status_code == 200
    problem_of(api.post(f"/v1/jobs?access_token={token}", token=None, json={"type": "node.info"}), 401,
               "unauthorized")
    # The console page itself holds no data and loads without a token; its API calls need one.
    r = api.get("/", token=None)
    assert r.status_code == 200 and "console.js" in r.text
    assert api.get("/console/console.js", token=None).status_code == 200
    assert api.get("/metrics", token=None).status_code == 200
    spec = api.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/predict/{model}", "/v1/jobs/{job_id}/events", "/healthz"} <= set(spec["paths"])


def test_stream_snapshot_and_mjpeg(api):
    deadline = time.monotonic() + 30
    while True:
        r = api.get("/v1/streams/lobby/snapshot.jpg")
        if r.status_code == 200:
            break
        problem_of(r, 503, "not_ready")
        assert time.monotonic() < deadline, "the stream processed no frame"
        time.sleep(0.2)
    assert r.headers["content-type"] == "image/jpeg"
    img = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (240, 320, 3)
    # The face's box is drawn: the snapshot is the clean frame with the detections of its header drawn on it.
    from agent.streams.snapshot import render_jpeg
    from tests.streams.media import background, with_face

    dets = json.loads(r.headers["x-detections"])
    assert [d["label"] for d in dets] == ["face"], dets
    x1, y1, x2, y2 = dets[0]["box"]
    assert 80 < x1 < 130 and 50 < y1 < 100 and 200 < x2 < 250 and 150 < y2 < 195, dets
    clean = with_face(background())
    drawn = cv2.imdecode(np.frombuffer(render_jpeg(clean, dets), np.uint8), cv2.IMREAD_COLOR)
    edge = (slice(int(y1) + 12, int(y2) - 2), slice(int(x1) - 1, int(x1) + 2))  # the box's left side

    def diff(a, b):
        return float(np.abs(a[edge].astype(int) - b[edge].astype(int)).mean())

    assert diff(img, drawn) < diff(img, clean) / 3, (diff(img, drawn), diff(img, clean))
    small = api.get("/v1/streams/lobby/snapshot.jpg", params={"width": 160})
    assert cv2.imdecode(np.frombuffer(small.content, np.uint8), cv2.IMREAD_COLOR).shape == (120, 160, 3)
    problem_of(api.get("/v1/streams/nope/snapshot.jpg"), 404, "not_found")
    problem_of(api.get("/v1/streams/nope/mjpeg"), 404, "not_found")

    # MJPEG: a multipart stream of JPEG frames; read two of them and hang up.
    with api.get("/v1/streams/lobby/mjpeg", params={"fps": 10}, stream=True, timeout=30) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("multipart/x-mixed-replace; boundary=frame")
        buf, frames = b"", []
        for chunk in resp.iter_content(8192):
            buf += chunk
            while b"\r\n\r\n" in buf:
                head, _, rest = buf.partition(b"\r\n\r\n")
                length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0]
                             .split(b":")[1])
                if len(rest) < length + 2:
                    break
                frames.append(rest[:length])
                buf = rest[length + 2:]
            if len(frames) >= 2:
                break
    for f in frames[:2]:
        assert cv2.imdecode(np.frombuffer(f, np.uint8), cv2.IMREAD_COLOR).shape == (240, 320, 3)


def test_metrics_parse(api, astronaut_jpeg):
    api.post("/v1/predict/blazeface", params={"wait": "true"}, files={"image": ("a.jpg", astronaut_jpeg.read_bytes())})
    r = requests.get(api.base + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}
    jobs = {s.labels["state"]: s.value for s in fams["cvw_jobs"].samples}
    assert set(jobs) == {"QUEUED", "IN_PROGRESS", "SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELED", "REJECTED"}
    assert jobs["SUCCEEDED"] >= 1
    assert fams["cvw_mqtt_connected"].samples[0].value == 1
    assert fams["cvw_outbox_depth"].type == "gauge" and fams["cvw_outbox_depth"].samples[0].value >= 0
    hist = fams["cvw_inference_seconds"]
    assert hist.type == "histogram"
    counts = {(s.labels["model"], s.labels["backend"]): s.value for s in hist.samples if s.name.endswith("_count")}
    # Both the predictions (infer jobs) and the stream feed it.
    assert counts.get(("blazeface", "litert"), 0) >= 2, counts
    buckets = [s for s in hist.samples if s.name.endswith("_bucket") and s.labels["model"] == "blazeface"]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == counts[("blazeface", "litert")]
    fps = {(s.labels["stream"], s.labels["kind"]): s.value for s in fams["cvw_stream_fps"].samples}
    assert fps[("lobby", "processed")] > 0
    up = [s for s in fams["cvw_stream_up"].samples if s.labels["stream"] == "lobby"]
    assert up and up[0].labels["state"] == "running" and up[0].value == 1
    assert fams["cvw_node_info"].samples[0].labels["node_id"] == "http-node"
