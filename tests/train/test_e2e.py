"""Issue 8 end to end: a real mosquitto, a `cv-worker trainer` process and a `cv-worker run` node on one machine.

A `train` job sent to the node is trained on the build peer from PNG files and an annotations CSV, its progress
(epoch, step, loss, validation metrics) shows on the node's job status and arrives as POSTs at a local HTTP
server, and the model lands on the node, where an `infer` job classifies digits it never saw."""

from __future__ import annotations

import hashlib

import requests

from tests.train.conftest import PREFIX, Digits, HttpServer

EPOCHS = 8


def test_train_on_peer_deploys_a_classifier_that_infers_on_openvino(node, trainer, ctl, http_server: HttpServer,
                                                                     digits: Digits) -> None:
    jid = ctl.submit("train", {
        "annotations": "annotations.csv", "name": "digits", "version": "1.0.0", "epochs": EPOCHS,
        "batch_size": 32, "status": f"{http_server.url}/status/digits", "options": {"image_size": 28},
    }, node=node.node_id)
    out = ctl.wait(jid, timeout=300)
    assert out.state == "SUCCEEDED", out.last

    # Progress mirrored from the peer onto the node's own job status, epoch by epoch.
    details = [s["details"] for s in out.statuses if s["state"] == "IN_PROGRESS"]
    training = [d for d in details if d.get("phase") == "training" and d.get("epoch_current")]
    assert {d["epoch_current"] for d in training} == set(range(1, EPOCHS + 1)), training
    for d in training:
        assert d["epoch_total"] == EPOCHS and 1 <= d["step_current"] <= d["step_total"]
        assert isinstance(d["classification_loss"], float) and d["peer"] == "build-1"
    assert any("val_accuracy" in d for d in training) and training[-1]["device"] == "cpu"
    progress = [s["progress"] for s in out.statuses if s.get("progress") is not None]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert any(d.get("phase", "").startswith("deploy.") for d in details)

    # The final result: where the package is, its size and sha256, and the deployment.
    final = out.results[-1]
    model = final["model"]
    assert model["name"] == "digits" and model["version"] == "1.0.0" and model["labels"] == [str(i) for i in range(10)]
    assert {"onnx", "openvino"} <= set(model["formats"]) and "tflite" in model["skipped_formats"]
    blob = requests.get(model["url"], timeout=10).content  # the peer's read-only artifact server
    assert len(blob) == model["size"] and hashlib.sha256(blob).hexdigest() == model["sha256"]
    assert requests.put(model["url"], data=b"x", timeout=10).status_code == 405
    assert final["deployed"]["name"] == "digits" and final["deployed"]["version"] == "1.0.0"
    assert final["trained_on"] == "build-1" and final["metrics"]["val_accuracy"] > 0.8

    # The status URL got the same progress as POSTs: epochs, steps, loss, validation metrics, and the end.
    posts = http_server.posts("digits")
    assert posts[-1]["state"] == "SUCCEEDED" and posts[-1]["progress"] == 1.0
    assert posts[-1]["model"]["sha256"] == model["sha256"]
    epochs_posted = [p for p in posts if p["phase"] == "training" and p.get("epoch_current")]
    assert {p["epoch_current"] for p in epochs_posted} == set(range(1, EPOCHS + 1))
    ends = [p for p in epochs_posted if "val_accuracy" in p and p["step_current"] == p["step_total"]]
    assert {p["epoch_current"] for p in ends} == set(range(1, EPOCHS + 1))
    assert all(p["job_id"] == f"edge-1.{jid}" and p["epoch_total"] == EPOCHS for p in posts)
    assert all(0.0 <= p["progress"] <= 1.0 and isinstance(p.get("classification_loss", 0.0), float) for p in posts)

    # The node announces the new model, and classifies held-back digits on its OpenVINO backend.
    birth = ctl.node_states.get(node.node_id) or {}
    assert "digits" in [m["name"] for m in birth.get("models", [])]
    inf = ctl.wait(ctl.submit("infer", {"model": "digits", "top_k": 10, "images": [
        {"id": f"d{i}", "path": name} for i, (name, _) in enumerate(digits.held_out)]}, node=node.node_id),
        timeout=120)
    assert inf.state == "SUCCEEDED", inf.last
    assert inf.results[-1]["backend"] == "openvino" and inf.results[-1]["succeeded"] == len(digits.held_out)
    items = {it["id"]: it for r in inf.results for it in r.get("items", [])}
    correct = 0
    for i, (_, truth) in enumerate(digits.held_out):
        classes = items[f"d{i}"]["classes"]
        assert len(classes) == 10 and abs(sum(c["score"] for c in classes) - 1.0) < 1e-3
        assert [c["score"] for c in classes] == sorted((c["score"] for c in classes), reverse=True)
        correct += classes[0]["label"] == truth
    accuracy = correct / len(digits.held_out)
    print(f"held-out accuracy on the node: {accuracy:.3f} ({correct}/{len(digits.held_out)})")
    assert accuracy >= 0.9


def test_model_is_put_to_the_model_url_and_not_deployed(node, trainer, ctl, http_server: HttpServer) -> None:
    target = f"{http_server.url}/models/small.tar.gz"
    out = ctl.wait(ctl.submit("train", {"annotations": "small.csv", "name": "small", "epochs": 1, "deploy": False,
                                        "model": target}, node=node.node_id), timeout=180)
    assert out.state == "SUCCEEDED", out.last
    model = out.results[-1]["model"]
    stored = http_server.stored("/models/small.tar.gz")
    assert model["url"] == target and stored is not None
    assert hashlib.sha256(stored).hexdigest() == model["sha256"] and len(stored) == model["size"]
    assert model["artifact_url"].startswith("http://127.0.0.1:") and "deployed" not in out.results[-1]
    models = node.cli("models", "list", "--json")
    assert models.returncode == 0 and "small" not in [m["name"] for m in __import__("json").loads(models.stdout)]


def test_training_queue_takes_jobs_directly(trainer, ctl, http_server: HttpServer) -> None:
    """A controller may use the training queue itself (shared subscription): the model stays on the peer."""
    from agent.trainer.topics import queue_request_topic

    jid = "direct-1"
    ctl.submit("train", {"annotations": f"{http_server.url}/small.csv", "name": "direct", "epochs": 1},
               job_id=jid, topic=queue_request_topic(PREFIX, jid))
    out = ctl.wait(jid, timeout=180)
    assert out.state == "SUCCEEDED", out.last
    assert out.last["node_id"] == "build-1"
    model = out.results[-1]["model"]
    assert model["url"] == model["artifact_url"]
    assert hashlib.sha256(requests.get(model["url"], timeout=10).content).hexdigest() == model["sha256"]


def test_build_peer_answers_node_info_with_its_device_and_plugins(trainer, ctl) -> None:
    from agent.trainer.topics import queue_request_topic

    out = ctl.wait(ctl.submit("node.info", job_id="peer-info", topic=queue_request_topic(PREFIX, "peer-info",
                                                                                            "build-1")), timeout=30)
    assert out.state == "SUCCEEDED", out.last
    info = out.results[-1]["info"]
    assert info["node_id"] == "build-1" and info["capabilities"] == ["job.cancel", "job.result", "node.info", "train"]
    assert info["trainer"]["plugins"] == ["classifier"] and info["trainer"]["device"] == "cpu"
    assert info["accelerators"][0]["kind"] == "cpu" and info["trainer"]["artifacts"].startswith("http://127.0.0.1:")
