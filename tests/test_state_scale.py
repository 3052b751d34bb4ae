"""The state store with a job of thousands of images: its params are written once, whatever the number of chunk
commits; what the journal and snapshot hold is exactly the data in memory; a finished job keeps a summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent.journal import Journal
from agent.state import StateStore
from agent.summary import summarize

IMAGES = 5000


def big_params() -> dict[str, Any]:
    return {"model": "blazeface", "threshold": 0.5,
            "images": [{"id": f"img{k:05d}", "path": f"cam1/img{k:05d}.jpg"} for k in range(IMAGES)]}


def emit(store: StateStore, job_id: str, **fields: Any) -> None:
    """A status change as the engine makes one (JobEngine._emit): a shallow copy, changed, written back whole."""
    job = store.get_job(job_id)
    assert job is not None
    job.update(fields)
    job["version"] += 1
    store.put_job(job)


def journal_bytes(state_dir: Path) -> int:
    return sum(s.path.stat().st_size for s in Journal(state_dir).segments())


def test_large_params_are_written_once_over_many_checkpoints_and_a_reopen(tmp_path: Path) -> None:
    store = StateStore(tmp_path, spool_min_bytes=10**9, compact_min_bytes=10**9)  # params inline, no compaction
    params = big_params()
    with store.transaction():
        store.put_job({"job_id": "big", "type": "infer", "state": "QUEUED", "version": 1, "progress": None,
                       "details": {}, "checkpoint": None, "result_seq": 0})
        store.put_params("big", params)
        store.put_job({"job_id": "small", "type": "node.info", "state": "SUCCEEDED", "version": 3})
    store.wait_durable()
    after_accept = journal_bytes(tmp_path)
    assert after_accept > len(json.dumps(params)) / 2
    with store.transaction():
        emit(store, "big", state="IN_PROGRESS", progress=0.0)
    chunks = IMAGES // 32 + 1
    for k in range(chunks):
        # What engine._publish_result and a progress update do per chunk of 32 images.
        with store.transaction():
            store.update_job("big", {"result_seq": k + 1})
            store.update_job("big", {"checkpoint": {"next": min(IMAGES, 32 * (k + 1)), "chunk": k}})
            emit(store, "big", progress=min(1.0, 32 * (k + 1) / IMAGES), details={"processed": 32 * (k + 1)})
        if k % 10 == 0:
            store.wait_durable()
    with store.transaction():
        emit(store, "big", state="SUCCEEDED", progress=1.0, checkpoint=None)
        store.replace_params("big", summarize(params, 4096))
    store.wait_durable()
    per_chunk = (journal_bytes(tmp_path) - after_accept) / chunks
    assert per_chunk < 1000, f"{per_chunk:.0f} bytes per chunk commit: the params were written again"
    expected = store.get_job("big")
    assert expected["state"] == "SUCCEEDED" and expected["result_seq"] == chunks
    assert expected["version"] == chunks + 3
    summary = store.get_params("big")
    assert len(json.dumps(summary)) <= 4096 and summary["model"] == "blazeface"
    assert {"omitted": "list items", "items": IMAGES - 20} in summary["images"]
    store.close()
    for read_only in (True, False):
        again = StateStore(tmp_path, read_only=read_only)
        assert again.get_job("big") == expected and again.get_params("big") == summary
        assert again.get_job("small")["version"] == 3
        again.close()


def test_compaction_keeps_exactly_the_data(tmp_path: Path) -> None:
    """Many jobs, several compactions, spooled and inline params: a fresh reader sees what the writer had."""
    store = StateStore(tmp_path, spool_min_bytes=20_000, compact_min_bytes=50_000)
    for i in range(300):
        with store.transaction():
            job_id = f"job{i}"
            store.put_job({"job_id": job_id, "type": "infer", "state": "QUEUED", "version": 1})
            store.put_params(job_id, big_params() if i % 50 == 0 else {"model": "m", "images": [{"id": str(i)}]})
            old = f"job{i - 10}"
            if i >= 10 and store.get_job(old) is not None:
                emit(store, old, state="SUCCEEDED")
                store.replace_params(old, summarize(store.get_params(old), 512))
            if i % 7 == 0:
                store.remove_jobs([f"job{i - 5}"] if i >= 5 else [])
        if i % 25 == 0:
            store.wait_durable()
    store.wait_durable()
    jobs = {j["job_id"]: j for j in store.all_jobs()}
    params = {j: store.get_params(j) for j in jobs}
    store.close()
    assert store.figures.compactions >= 1
    assert not [p for p in (tmp_path / "spool").iterdir() if p.stem not in jobs]
    again = StateStore(tmp_path, read_only=True)
    assert {j["job_id"]: j for j in again.all_jobs()} == jobs
    assert {j: again.get_params(j) for j in jobs} == params
