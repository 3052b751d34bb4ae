"""Output formats, annotation, upload to a real local HTTP server, stored results read back, model sharing."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import cv2
import numpy as np

from tests.infer.conftest import ASTRONAUT_FACE, box_close, items_of, run_job


def test_vott_csv_with_annotations_uploaded(agent, ctl, http_server, image_dir: Path):
    base = f"{http_server.url}/up/job1"
    params = {"model": "blazeface", "output": "vott-csv", "annotate": True, "upload_url": base, "images": [
        {"id": "astro", "path": "astronaut.jpg"}, {"id": "cat", "url": f"{http_server.url}/chelsea.jpg"},
        {"id": "bad", "path": "notes.jpg"}]}
    out = run_job(ctl, agent.node_id, params)
    assert out.state == "SUCCEEDED", out.last
    final = out.results[-1]
    assert final["uploaded"] == f"{base}/results.csv" and final["annotate_errors"] == 0
    # the per-chunk rows and the uploaded file agree, with the header first
    chunk_rows = "".join(r["csv"] for r in out.results if "csv" in r)
    uploaded = (http_server.upload / "up/job1/results.csv").read_text()
    rows = list(csv.reader(io.StringIO(uploaded)))
    assert rows[0] == ["url", "x", "y", "width", "height", "class"]
    assert uploaded.split("\n", 1)[1] == chunk_rows
    assert len(rows) == 2  # one face; the cat and the failed item give no rows
    src, x, y, w, h, label = rows[1]
    assert src == "astronaut.jpg" and label == "face"
    x, y, w, h = map(float, (x, y, w, h))
    assert box_close((x, y, x + w, y + h), ASTRONAUT_FACE, 4.0)
    # annotated copies: real JPEGs of the original size, and the face box is drawn (pixels changed there)
    items = {i["id"]: i for i in items_of(out.results)}
    assert items["astro"]["annotated"] == f"{base}/annotated/astro.jpg"
    assert "annotated" not in items["bad"]
    drawn = cv2.imread(str(http_server.upload / "up/job1/annotated/astro.jpg"))
    orig = cv2.imread(str(image_dir / "astronaut.jpg"))
    assert drawn.shape == orig.shape
    diff = np.abs(drawn.astype(int) - orig.astype(int)).sum(axis=2) > 60
    x1, y1, x2, y2 = (int(v) for v in ASTRONAUT_FACE)
    assert diff[y1 - 3:y1 + 4, x1:x2].mean() > 0.5  # the top edge of the box
    assert diff[300:, :].mean() < 0.01  # and little else
    assert (http_server.upload / "up/job1/annotated/cat.jpg").exists()
    assert {p for p, _, _ in http_server.puts if p.startswith("/up/job1/")} == {
        "/up/job1/results.csv", "/up/job1/annotated/astro.jpg", "/up/job1/annotated/cat.jpg"}


def test_json_output_uploaded_and_local_annotations(agent, ctl, http_server):
    out = run_job(ctl, agent.node_id, {"model": "blazeface", "upload_url": f"{http_server.url}/up/json",
                                        "images": [{"id": "astro", "path": "astronaut.jpg"}]})
    assert out.state == "SUCCEEDED"
    doc = json.loads((http_server.upload / "up/json/results.json").read_text())
    assert doc["items"] == items_of(out.results)
    local = run_job(ctl, agent.node_id, {"model": "blazeface", "annotate": True,
                                         "images": [{"id": "astro", "path": "astronaut.jpg"}]})
    path = Path(items_of(local.results)[0]["annotated"])
    assert path.is_file() and path.is_relative_to(agent.state_dir / "outputs")
    assert cv2.imread(str(path)).shape == (512, 512, 3)


def test_upload_refused_is_reported_not_fatal(agent, ctl, http_server):
    out = run_job(ctl, agent.node_id, {"model": "blazeface", "annotate": True,
                                       "upload_url": f"{http_server.url}/refuse/x",
                                       "images": [{"id": "astro", "path": "astronaut.jpg"}]})
    assert out.state == "SUCCEEDED"
    item = items_of(out.results)[0]
    assert item["ok"] and "403" in item["annotate_error"] and "annotated" not in item
    final = out.results[-1]
    assert final["annotate_errors"] == 1 and "403" in final["upload_error"]


def test_results_read_back_by_job_id(agent, ctl):
    out = run_job(ctl, agent.node_id, {"model": "blazeface", "images": [
        {"id": f"i{n}", "path": "astronaut.jpg"} for n in range(6)]})
    assert out.state == "SUCCEEDED"
    # from disk, through the CLI
    r = agent.cli("job", out.job_id, "--result")
    assert r.returncode == 0, r.stderr
    stored = json.loads(r.stdout)
    assert [m["seq"] for m in stored] == [m["seq"] for m in out.results]
    assert items_of(stored) == items_of(out.results)
    # over MQTT: job.result publishes the same chunks again, then the totals as its final message
    jid = ctl.submit("job.result", {"job_id": out.job_id}, node=agent.node_id)
    again = ctl.wait(jid, timeout=20)
    assert again.state == "SUCCEEDED"
    assert items_of(again.results) == items_of(out.results)
    assert [m["of_seq"] for m in again.results] == [m["seq"] for m in out.results]
    assert again.results[-1]["total"] == 6 and again.results[-1]["republished"] == 2
    missing = ctl.wait(ctl.submit("job.result", {"job_id": "never-ran"}, node=agent.node_id), timeout=20)
    assert missing.state == "FAILED" and missing.last["error"]["code"] == "not_found"


def test_queued_jobs_share_one_loaded_model(agent, ctl):
    before = agent.log().count("model blazeface now serves")
    ids = [ctl.submit("infer", {"model": "blazeface", "images": [
        {"id": f"i{n}", "path": "coffee.jpg"} for n in range(20)]}, node=agent.node_id) for _ in range(4)]
    outs = [ctl.wait(j, timeout=60) for j in ids]
    assert all(o.state == "SUCCEEDED" for o in outs)
    assert before <= 1 and agent.log().count("model blazeface now serves") == max(1, before)


def test_segmentation_model_gives_a_mask_summary_and_text_boxes(agent, ctl, image_dir: Path):
    import cv2
    from skimage import data

    r = agent.cli("models", "install", "ppocr-det", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    cv2.imwrite(str(image_dir / "page.png"), data.page())
    out = run_job(ctl, agent.node_id, {"model": "ppocr-det", "images": [{"id": "page", "path": "page.png"}]})
    assert out.state == "SUCCEEDED", out.last
    item = items_of(out.results)[0]
    assert (item["width"], item["height"]) == (384, 191)
    mask = item["mask"]
    text = {c["label"]: c for c in mask["classes"]}
    assert 0.05 < sum(c["fraction"] for label, c in text.items() if label != "background") < 0.9, mask
    assert len(item["detections"]) >= 5  # the page's lines of text
    assert all(0 <= d["box"][0] < d["box"][2] <= 384 and 0 <= d["box"][1] < d["box"][3] <= 191
               for d in item["detections"])
    assert out.results[-1]["task"] == "segmentation"


def _text_mask_checks(png_path: Path, item: dict) -> None:
    """The mask PNG is the image's size, bright on the detected lines of text, and agrees with the summary."""
    m = cv2.imread(str(png_path), cv2.IMREAD_UNCHANGED)
    assert m is not None and m.dtype == np.uint8 and m.ndim == 2
    assert (m.shape[1], m.shape[0]) == (item["width"], item["height"])
    inside = np.zeros(m.shape, bool)
    for d in item["detections"]:
        x1, y1, x2, y2 = (int(round(v)) for v in d["box"])
        inside[y1:y2, x1:x2] = True
    assert m[inside].mean() > 3 * max(m[~inside].mean(), 1.0)  # text lit, the rest dark
    # thresholded like the decoder (0.3), the PNG covers about the text fraction the summary reports
    text = sum(c["fraction"] for c in item["mask"]["classes"] if c["label"] != "background")
    assert abs((m >= round(0.3 * 255)).mean() - text) < 0.05, (text, (m >= 77).mean())


def test_segmentation_mask_png_saved_and_uploaded(agent, ctl, http_server, image_dir: Path):
    from skimage import data

    r = agent.cli("models", "install", "ppocr-det", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    cv2.imwrite(str(image_dir / "page.png"), data.page())
    # skimage's text() is light text on a dark, textured ground that PP-OCR does not take for text: draw some
    sign = np.full((200, 520, 3), 245, np.uint8)
    cv2.putText(sign, "cv-worker 2026", (20, 80), cv2.FONT_HERSHEY_SIMPLEX, 1.8, (20, 20, 20), 4, cv2.LINE_AA)
    cv2.putText(sign, "mask PNG test", (20, 160), cv2.FONT_HERSHEY_SIMPLEX, 1.5, (20, 20, 20), 3, cv2.LINE_AA)
    cv2.imwrite(str(image_dir / "sign.jpg"), sign)
    images = [{"id": "page", "path": "page.png"}, {"id": "sign", "path": "sign.jpg"}]
    # local: under the job's outputs directory, referenced by path, shown by `cv-worker job ID --result`
    local = run_job(ctl, agent.node_id, {"model": "ppocr-det", "images": images})
    assert local.state == "SUCCEEDED", local.last
    items = {i["id"]: i for i in items_of(local.results)}
    for name, (w, h) in (("page", (384, 191)), ("sign", (520, 200))):
        item = items[name]
        assert (item["width"], item["height"]) == (w, h) and item["mask"]["png_kind"] == "probability"
        path = Path(item["mask_png"])
        assert path == agent.state_dir / "outputs" / local.job_id / "masks" / f"{name}.png"
        _text_mask_checks(path, item)
    assert local.results[-1]["mask_pngs"] == 2 and local.results[-1]["mask_png_errors"] == 0
    shown = agent.cli("job", local.job_id, "--result")
    assert shown.returncode == 0 and items_of(json.loads(shown.stdout)) == items_of(local.results)
    # upload_url: PUT alongside the results file, referenced by URL
    base = f"{http_server.url}/up/masks"
    up = run_job(ctl, agent.node_id, {"model": "ppocr-det", "upload_url": base, "images": images})
    assert up.state == "SUCCEEDED", up.last
    page = items_of(up.results)[0]
    assert page["mask_png"] == f"{base}/masks/page.png"
    _text_mask_checks(http_server.upload / "up/masks/masks/page.png", page)
    assert ("/up/masks/masks/sign.png", "image/png") in {(p, t) for p, t, _ in http_server.puts}
    # asked not to: the summary only
    off = run_job(ctl, agent.node_id, {"model": "ppocr-det", "mask_png": False, "images": images[:1]})
    item = items_of(off.results)[0]
    assert "mask_png" not in item and item["mask"]["classes"] and "mask_pngs" not in off.results[-1]
    # detection models make no mask PNG
    face = items_of(run_job(ctl, agent.node_id, {"model": "blazeface", "images": [
        {"id": "astro", "path": "astronaut.jpg"}]}).results)[0]
    assert "mask_png" not in face and "mask" not in face
