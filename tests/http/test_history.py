"""The bounds and rules of the in-memory status history behind the job SSE stream."""

from __future__ import annotations

import json
from typing import Any

from agent.httpapi.history import StatusHistory


def status(job_id: str, version: int, **more: Any) -> dict[str, Any]:
    return {"job_id": job_id, "version": version, "state": "IN_PROGRESS", **more}


def versions(h: StatusHistory, job_id: str, after: int = 0, upto: Any = None) -> list[int]:
    return [e.version for e in h.after(job_id, after, upto)]


def test_after_and_upto():
    h = StatusHistory()
    for v in range(1, 6):
        h.record(status("a", v))
    assert versions(h, "a") == [1, 2, 3, 4, 5]
    assert versions(h, "a", after=2) == [3, 4, 5] and versions(h, "a", after=2, upto=4) == [3, 4]
    assert versions(h, "a", after=5) == [] and versions(h, "nope") == []
    assert json.loads(h.after("a", 4)[0].data) == status("a", 5)


def test_a_republished_version_is_kept_once_and_a_new_job_under_an_old_id_starts_over():
    h = StatusHistory()
    h.record(status("a", 1))
    h.record(status("a", 2))
    h.record(status("a", 2, note="again"))
    assert versions(h, "a") == [1, 2] and json.loads(h.after("a", 1)[0].data)["note"] == "again" and len(h) == 2
    h.record(status("a", 1, state="QUEUED"))  # pruned, then submitted again with the same id
    assert versions(h, "a") == [1] and len(h) == 1


def test_memory_is_bounded_per_job_in_jobs_and_in_all():
    h = StatusHistory(versions_per_job=4, max_jobs=3, max_statuses=8)
    for v in range(1, 11):
        h.record(status("long", v))
    assert versions(h, "long") == [7, 8, 9, 10] and len(h) == 4
    for job in ("b", "c"):
        h.record(status(job, 1))
    h.record(status("long", 11))  # the job changed most recently is kept longest
    h.record(status("d", 1))  # a fourth job: the least recently changed one goes
    assert versions(h, "b") == [] and versions(h, "long") == [8, 9, 10, 11] and len(h) == 6
    for v in range(1, 5):
        h.record(status("e", v))  # "c" goes for the fifth job; then 9 statuses in all: "long" goes too
    assert versions(h, "c") == versions(h, "long") == [] and versions(h, "e") == [1, 2, 3, 4]
    assert versions(h, "d") == [1] and len(h) == 5
    h.clear()
    assert len(h) == 0 and versions(h, "e") == []
