"""The state store with a job of thousands of images: its params' JSON is cached across commits (agent/storage.py),
what reaches disk is still exactly the data, and a params value changed in place is caught by verification."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

import agent.storage
from agent.state import StateStore

IMAGES = 5000


def big_job(job_id: str) -> dict[str, Any]:
    return {"job_id": job_id, "type": "infer", "state": "QUEUED", "version": 1, "progress": None, "details": {},
            "params": {"model": "blazeface", "threshold": 0.5,
                       "images": [{"id": f"img{k:05d}", "path": f"cam1/img{k:05d}.jpg"} for k in range(IMAGES)]},
            "checkpoint": None, "result_seq": 0}


def emit(store: StateStore, job_id: str, **fields: Any) -> None:
    """A status change as the engine makes one (JobEngine._emit): a shallow copy, changed, written back whole."""
    job = store.get_job(job_id)
    assert job is not None
    job.update(fields)
    job["version"] += 1
    store.put_job(job)


def on_disk(store: StateStore, state_dir: Path) -> bytes:
    assert store.wait_durable(store.generation, timeout=30)
    return (state_dir / "jobs.json").read_bytes()


def mismatches(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "STATE SNAPSHOT MISMATCH" in r.getMessage()]


def test_large_params_survive_many_checkpoints_and_a_reopen(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.CRITICAL, logger="agent.storage")
    params_encodings = 0
    real_dumps = agent.storage._dumps

    def counting_dumps(value: Any) -> str:
        nonlocal params_encodings
        text = real_dumps(value)
        # The big job's params encoded on their own or inside its document; not verify mode's encoding of it all.
        if len(text) > 100_000 and not (isinstance(value, dict) and "jobs" in value):
            params_encodings += 1
        return text

    # Verification stays on (tests/conftest.py): every commit is also compared with a full encoding of the data.
    monkeypatch.setattr(agent.storage, "_dumps", counting_dumps)
    store = StateStore(tmp_path)
    storage = store._jobs_db.storage
    commits: list[int] = []
    store.add_commit_listener(commits.append)
    with store.transaction():
        store.put_job(big_job("big"))
        store.put_job({"job_id": "small", "type": "node.info", "state": "SUCCEEDED", "params": {}})
    on_disk(store, tmp_path)
    emit(store, "big", state="IN_PROGRESS", progress=0.0)
    before = params_encodings
    chunks = IMAGES // 32 + 1
    for k in range(chunks):
        # What engine._publish_result and a progress update do per chunk of 32 images.
        with store.transaction():
            store.update_job("big", {"result_seq": k + 1})
            store.update_job("big", {"checkpoint": {"next": min(IMAGES, 32 * (k + 1)), "chunk": k}})
            emit(store, "big", progress=min(1.0, 32 * (k + 1) / IMAGES), details={"processed": 32 * (k + 1)})
        if k % 10 == 0:
            on_disk(store, tmp_path)
    with store.transaction():
        emit(store, "big", state="SUCCEEDED", progress=1.0, checkpoint=None)
    disk = on_disk(store, tmp_path)

    expected = big_job("big")
    expected.update(state="SUCCEEDED", progress=1.0, checkpoint=None, result_seq=chunks, version=chunks + 3,
                    details={"processed": 32 * chunks})
    memory = storage.read()
    assert memory["jobs"]["big"] == expected
    # Exactly what a full encoding of the data gives, byte for byte (key order included), not only equal data.
    assert disk == real_dumps(memory).encode()
    assert json.loads(disk)["jobs"]["big"] == expected
    assert not mismatches(caplog)
    # Many commits re-encoded the changed document, and none of them its params: the object never changed.
    assert len(commits) >= chunks // 10
    assert params_encodings == before == 1

    store.close()
    small = {"job_id": "small", "type": "node.info", "state": "SUCCEEDED", "params": {}}
    for read_only in (True, False):
        again = StateStore(tmp_path, read_only=read_only)
        assert again.get_job("big") == expected and again.get_job("small") == small
        again.close()

    # Replacing params (as the HTTP API does when a job ends) is a new object: its new JSON is what is written.
    store = StateStore(tmp_path)
    slim = {**expected["params"], "images": expected["params"]["images"][:3]}
    with store.transaction():
        store.update_job("big", {"checkpoint": {"next": 1}})  # the loaded params' JSON is cached now
    on_disk(store, tmp_path)
    with store.transaction():
        store.update_job("big", {"params": slim})
    assert json.loads(on_disk(store, tmp_path))["jobs"]["big"]["params"] == slim
    assert not mismatches(caplog)
    store.close()
    again = StateStore(tmp_path, read_only=True)
    assert again.get_job("big") == {**expected, "checkpoint": {"next": 1}, "params": slim}
    assert again.get_job("small") == small

    # A removed job's cached params go with it: nothing keeps megabytes of a pruned job alive.
    store = StateStore(tmp_path)
    with store.transaction():
        store.put_job(big_job("big2"))
    on_disk(store, tmp_path)
    assert "big2" in store._jobs_db.storage._params["jobs"]
    with store.transaction():
        store.remove_jobs(["big2"])
    assert "big2" not in json.loads(on_disk(store, tmp_path))["jobs"]
    assert "big2" not in store._jobs_db.storage._params["jobs"]
    store.close()


@pytest.mark.parametrize("verify", [True, False])
def test_params_changed_in_place_is_caught_by_verify(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch, verify: bool) -> None:
    caplog.set_level(logging.CRITICAL, logger="agent.storage")
    if verify:
        monkeypatch.setenv("CV_WORKER_STATE_VERIFY", "1")
    else:
        monkeypatch.delenv("CV_WORKER_STATE_VERIFY", raising=False)
    store = StateStore(tmp_path)
    with store.transaction():
        store.put_job(big_job("j"))
    on_disk(store, tmp_path)
    # get_job hands out a shallow copy: its params is the stored object. Changing it in place is the mistake the
    # params cache cannot see; the document itself is then touched, so only the params' JSON is stale.
    job = store.get_job("j")
    job["params"]["images"][7]["path"] = "changed.jpg"
    with store.transaction():
        store.update_job("j", {"checkpoint": {"next": 32}})
    disk = json.loads(on_disk(store, tmp_path))["jobs"]["j"]
    assert disk["checkpoint"] == {"next": 32}
    if verify:
        assert mismatches(caplog), "verify mode must notice the stale params cache"
        assert disk["params"]["images"][7]["path"] == "changed.jpg", "the full encoding must be what was written"
        # After the mismatch nothing cached is trusted; later commits are right again, and quiet.
        caplog.clear()
        with store.transaction():
            store.update_job("j", {"checkpoint": {"next": 64}})
        disk = json.loads(on_disk(store, tmp_path))["jobs"]["j"]
        assert disk["checkpoint"] == {"next": 64} and disk["params"]["images"][7]["path"] == "changed.jpg"
        assert not mismatches(caplog)
    else:
        # Without verification the stale JSON is written: the mistake is real, and only verify mode finds it.
        assert not mismatches(caplog)
        assert disk["params"]["images"][7]["path"] == "cam1/img00007.jpg"
    store.close()
