"""`infer` end to end over a real broker: each image source, the astronaut's face, per-item errors, confinement."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from agent.devbroker import free_port
from tests.infer.conftest import ASTRONAUT_FACE, ASTRONAUT_SCORE, MAX_IMAGE_BYTES, box_close, items_of, run_job


def _face(item: dict[str, Any]) -> dict[str, Any]:
    assert item["ok"], item
    assert (item["width"], item["height"]) == (512, 512)
    assert len(item["detections"]) == 1, item["detections"]
    return item["detections"][0]


def test_astronaut_face_from_each_source(agent, ctl, http_server, image_dir: Path, astronaut_b64: str):
    params = {"model": "blazeface", "images": [
        {"id": "by-path", "path": str(image_dir / "astronaut.jpg")},
        {"id": "by-relative-path", "path": "astronaut.png"},
        {"id": "by-url", "url": f"{http_server.url}/astronaut.jpg"},
        {"id": "by-data", "data": astronaut_b64},
        {"id": "cat", "path": "chelsea.jpg"},
        {"id": "twice-as-large", "path": "astronaut-2x.jpg"},
    ]}
    out = run_job(ctl, agent.node_id, params)
    assert out.state == "SUCCEEDED", out.last
    items = {i["id"]: i for i in items_of(out.results)}
    assert list(items) == ["by-path", "by-relative-path", "by-url", "by-data", "cat", "twice-as-large"]
    for key in ("by-path", "by-relative-path", "by-url", "by-data"):
        face = _face(items[key])
        assert face["label"] == "face"
        assert box_close(face["box"], ASTRONAUT_FACE, 4.0), face["box"]
        assert abs(face["score"] - ASTRONAUT_SCORE) < 0.03, face["score"]
        assert len(face["keypoints"]) == 6
        assert items[key]["inference_ms"] > 0
    assert items["cat"]["ok"] and items["cat"]["detections"] == []
    # a large JPEG is decoded at reduced scale; sizes and boxes are still those of the original image
    big = items["twice-as-large"]
    assert (big["width"], big["height"]) == (1024, 1024)
    assert box_close(big["detections"][0]["box"], [2 * v for v in ASTRONAUT_FACE], 8.0), big["detections"]
    # chunks of 4 (the module agent's chunk_size): seq 0, 1, then the final totals
    chunks = [r for r in out.results if "items" in r]
    assert [len(c["items"]) for c in chunks] == [4, 2] and [c["seq"] for c in chunks] == [0, 1]
    assert not any(c["final"] for c in chunks)
    final = out.results[-1]
    assert final["final"] and final["total"] == 6 and final["succeeded"] == 6 and final["errors"] == 0
    assert final["detections"] == 5 and final["backend"] == "litert" and final["device"] == "CPU"
    assert final["model"] == "blazeface" and final["version"]
    progress = [s["details"] for s in out.statuses if s["state"] == "IN_PROGRESS" and "total" in s["details"]]
    assert progress and progress[-1]["total"] == 6


def test_per_item_errors_do_not_stop_the_batch(agent, ctl, http_server, image_dir: Path, astronaut_b64: str):
    closed = free_port()
    too_big = base64.b64encode(b"\xff\xd8" + b"x" * (MAX_IMAGE_BYTES + 100)).decode()
    params = {"model": "blazeface", "images": [
        {"id": "missing", "path": "nope.jpg"},
        {"id": "outside", "path": "/etc/hostname"},
        {"id": "dotdot", "path": "sub/../../etc/passwd"},
        {"id": "symlink-out", "path": "escape.jpg"},
        {"id": "directory", "path": "sub"},
        {"id": "text", "path": "notes.jpg"},
        {"id": "huge-file", "path": "huge.jpg"},
        {"id": "huge-data", "data": too_big},
        {"id": "huge-url", "url": f"{http_server.url}/huge.jpg"},
        {"id": "bad-b64", "data": "not base64 at all!"},
        {"id": "http-404", "url": f"{http_server.url}/absent.jpg"},
        {"id": "unreachable", "url": f"http://127.0.0.1:{closed}/x.jpg"},
        {"id": "good", "data": astronaut_b64},
        {"id": "good-sub", "path": "sub/rocket.jpg"},
    ]}
    out = run_job(ctl, agent.node_id, params)
    assert out.state == "SUCCEEDED", out.last
    items = {i["id"]: i for i in items_of(out.results)}
    codes = {k: (v.get("error") or {}).get("code") for k, v in items.items()}
    assert codes == {
        "missing": "not_found", "outside": "path_not_allowed", "dotdot": "path_not_allowed",
        "symlink-out": "path_not_allowed", "directory": "not_a_file", "text": "not_an_image",
        "huge-file": "too_large", "huge-data": "too_large", "huge-url": "too_large", "bad-b64": "bad_data",
        "http-404": "http_error", "unreachable": "url_unreachable", "good": None, "good-sub": None,
    }
    assert "inference.input_dirs" in items["outside"]["error"]["message"]
    assert "/etc/hostname" in items["outside"]["error"]["message"]
    assert "inference.max_image_bytes" in items["huge-file"]["error"]["message"]
    assert "404" in items["http-404"]["error"]["message"]
    assert str(closed) in items["unreachable"]["error"]["message"]
    assert box_close(_face(items["good"])["box"], ASTRONAUT_FACE, 4.0)
    final = out.results[-1]
    assert (final["succeeded"], final["errors"]) == (2, 12)
    assert final["error_codes"]["path_not_allowed"] == 3 and final["error_codes"]["too_large"] == 3


def test_nothing_processed_fails_with_every_reason(agent, ctl):
    out = run_job(ctl, agent.node_id, {"model": "blazeface", "images": [
        {"id": "a", "path": "nope.jpg"}, {"id": "b", "path": "notes.jpg"}]})
    assert out.state == "FAILED"
    err = out.last["error"]
    assert err["code"] == "no_images_processed"
    assert "1 not_found" in err["message"] and "1 not_an_image" in err["message"]
    # the per-item reasons were still streamed
    assert [i["error"]["code"] for i in items_of(out.results)] == ["not_found", "not_an_image"]
    # and the job's one final result says how many chunks came before it and that the output is not complete
    finals = [r for r in out.results if r["final"]]
    assert len(finals) == 1 and finals[0]["seq"] == len(out.results) - 1
    assert finals[0]["chunks"] == len(out.results) - 1 >= 1 and finals[0]["complete"] is False
    assert finals[0]["state"] == "FAILED" and finals[0]["error"]["code"] == "no_images_processed"


def test_missing_model_fails_clearly(agent, ctl):
    out = run_job(ctl, agent.node_id, {"model": "no-such-model", "images": [{"id": "a", "path": "astronaut.jpg"}]})
    assert out.state == "FAILED"
    assert out.last["error"]["code"] == "model_not_found"
    assert "no-such-model" in out.last["error"]["message"] and "model.deploy" in out.last["error"]["message"]


def test_malformed_requests_are_rejected_naming_the_field(agent, ctl):
    cases = [
        ({"model": "blazeface", "images": [{"id": "a", "path": "x.jpg", "url": "http://h/x.jpg"}]}, "exactly one"),
        ({"model": "blazeface", "images": [{"id": "a"}]}, "exactly one"),
        ({"model": "blazeface", "images": [{"id": "a", "path": "x"}, {"id": "a", "path": "y"}]}, "more than once"),
        ({"model": "blazeface", "images": [{"id": "../a", "path": "x"}]}, "images.0.id"),
        ({"model": "blazeface", "images": [{"id": "a", "url": "ftp://h/x.jpg"}]}, "images.0.url"),
        ({"model": "blazeface", "images": []}, "images"),
        ({"model": "blazeface", "images": [{"id": "a", "path": "x"}], "output": "xml"}, "output"),
        ({"model": "blazeface", "images": [{"id": "a", "path": "x"}], "threshold": 2}, "threshold"),
    ]
    for params, needle in cases:
        jid = ctl.submit("infer", params, node=agent.node_id)
        out = ctl.wait(jid, timeout=20)
        assert out.state == "REJECTED", (params, out.last)
        assert out.last["error"]["code"] == "invalid_params"
        assert needle in out.last["error"]["message"], (needle, out.last["error"]["message"])


def test_threshold_classes_and_max_detections_filter(agent, ctl):
    base = {"model": "blazeface", "images": [{"id": "a", "path": "astronaut.jpg"}]}
    low = run_job(ctl, agent.node_id, {**base, "threshold": 0.3})
    high = run_job(ctl, agent.node_id, {**base, "threshold": 0.99})
    other = run_job(ctl, agent.node_id, {**base, "classes": ["cat"]})
    none = run_job(ctl, agent.node_id, {**base, "max_detections": 0})
    assert len(items_of(low.results)[0]["detections"]) >= 1
    assert all(d["score"] >= 0.3 for d in items_of(low.results)[0]["detections"])
    for out in (high, other, none):
        assert out.state == "SUCCEEDED" and items_of(out.results)[0]["detections"] == []


def test_job_result_pages_through_the_chunks_of_a_batch(agent, ctl):
    """`job.result` with from_seq and max_chunks: pages of chunks, then the batch's own totals as the last page's
    final message (with of_chunks / of_complete), nothing sent twice, nothing skipped."""
    images = [{"id": f"a{k}", "path": "astronaut.jpg"} for k in range(10)]  # chunk_size 4: 3 chunks, then final
    out = run_job(ctl, agent.node_id, {"model": "blazeface", "images": images})
    assert out.state == "SUCCEEDED" and out.final["chunks"] == 3 and out.final["complete"] is True
    seen, seq, pages = [], 0, 0
    while True:
        jid = ctl.submit("job.result", {"job_id": out.job_id, "from_seq": seq, "max_chunks": 2}, node=agent.node_id)
        page = ctl.wait(jid, timeout=30)
        assert page.state == "SUCCEEDED"
        pages += 1
        seen += [r["of_seq"] for r in page.results if not r["final"]]
        if page.final["next_seq"] is None:
            assert page.final["of_state"] == "SUCCEEDED" and page.final["of_chunks"] == 3
            assert page.final["of_complete"] is True and page.final["succeeded"] == 10
            break
        seq = page.final["next_seq"]
    assert seen == [0, 1, 2] and pages == 2
