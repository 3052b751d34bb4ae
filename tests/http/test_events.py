"""Server-sent events of a job: every version once and in order, also when versions come faster than commits,
replayed after a reconnect's `Last-Event-ID`, and an explicit gap for versions an agent restart forgot.

The agent here reports every progress call as a new version (`jobs.progress_interval_s = 0`) and runs one job at a
time, so a job queued behind a blocker starts only when the test cancels the blocker: by then its SSE client is
connected and following, and a `debug.sleep` of zero seconds then produces a couple of hundred versions at once,
many per state commit."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

from agent.devbroker import Mosquitto
from tests.agent_proc import AgentProc
from tests.http.conftest import Api, SseEvent, http_agent, sse_events, wait_http


@pytest.fixture(scope="module")
def fast_node(tmp_path_factory: pytest.TempPathFactory, broker: Mosquitto, blazeface_store: Path
              ) -> Iterator[AgentProc]:
    a = http_agent(tmp_path_factory.mktemp("sse-node"), broker, blazeface_store, "sse-node",
                   jobs={"progress_interval_s": 0, "workers": 1})
    a.start()
    wait_http(f"http://127.0.0.1:{a.cfg['http']['port']}")
    yield a
    a.stop()


@pytest.fixture(scope="module")
def fast_api(fast_node: AgentProc) -> Api:
    token = (fast_node.state_dir / "http-token").read_text().strip()
    return Api(f"http://127.0.0.1:{fast_node.cfg['http']['port']}", token)


def submit(api: Api, **params: Any) -> str:
    job_id = f"sse-{uuid.uuid4().hex[:8]}"
    r = api.post("/v1/jobs", json={"type": "debug.sleep", "params": params, "job_id": job_id})
    assert r.status_code == 202, r.text
    return job_id


def wait_job(api: Api, job_id: str, until: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Poll the job until ``until(job)``; a job that ends first fails the test (so the wait is bounded)."""
    while not until(job := api.get(f"/v1/jobs/{job_id}").json()):
        assert job["state"] in ("QUEUED", "IN_PROGRESS"), job
        time.sleep(0.05)
    return job


def statuses(events: list[SseEvent]) -> list[dict[str, Any]]:
    out = [json.loads(e.data) for e in events if e.event == "status"]
    assert [int(e.id) for e in events if e.event == "status" and e.id] == [s["version"] for s in out]
    return out


def follow(api: Api, job_id: str, last_event_id: Optional[str] = None, stop_at: Optional[int] = None,
           on_first: Optional[Callable[[], None]] = None) -> list[SseEvent]:
    """The job's events up to `end` (or up to the status with version `stop_at`, then the connection is dropped);
    `on_first` runs once the first event arrived, i.e. while the stream is open and following."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
    events: list[SseEvent] = []
    with api.get(f"/v1/jobs/{job_id}/events", stream=True, headers=headers, timeout=60) as resp:
        assert resp.status_code == 200, resp.text
        for ev in sse_events(resp):
            events.append(ev)
            if len(events) == 1 and on_first is not None:
                on_first()
            if stop_at is not None and ev.id == str(stop_at):
                break
    return events


def test_every_version_once_in_order_when_versions_come_faster_than_commits(fast_api: Api) -> None:
    steps = 200
    blocker = submit(fast_api, seconds=60)
    wait_job(fast_api, blocker, lambda j: j["state"] == "IN_PROGRESS")
    job_id = submit(fast_api, seconds=0, steps=steps, resumable=False)
    events = follow(fast_api, job_id, on_first=lambda: fast_api.delete(f"/v1/jobs/{blocker}").raise_for_status())
    assert [e.event for e in events] == ["status"] * (len(events) - 1) + ["end"], [e.event for e in events]
    got = statuses(events)
    # QUEUED, IN_PROGRESS, one version per step, SUCCEEDED.
    assert [s["version"] for s in got] == list(range(1, steps + 4))
    assert [s["state"] for s in got[:2]] == ["QUEUED", "IN_PROGRESS"] and got[-1]["state"] == "SUCCEEDED"
    assert [s["details"]["step"] for s in got[2:-1]] == list(range(1, steps + 1))
    assert json.loads(events[-1].data) == {"state": "SUCCEEDED"}
    # The same statuses as the job's final state shows.
    assert got[-1]["version"] == fast_api.get(f"/v1/jobs/{job_id}").json()["version"]


def test_reconnect_with_last_event_id_replays_what_came_after(fast_api: Api) -> None:
    steps = 150
    blocker = submit(fast_api, seconds=60)
    wait_job(fast_api, blocker, lambda j: j["state"] == "IN_PROGRESS")
    job_id = submit(fast_api, seconds=0, steps=steps, resumable=False)
    first = follow(fast_api, job_id, stop_at=20,
                   on_first=lambda: fast_api.delete(f"/v1/jobs/{blocker}").raise_for_status())
    assert [s["version"] for s in statuses(first)] == list(range(1, 21))
    rest = follow(fast_api, job_id, last_event_id="20")
    assert [e.event for e in rest] == ["status"] * (len(rest) - 1) + ["end"]
    assert [s["version"] for s in statuses(rest)] == list(range(21, steps + 4))
    assert statuses(rest)[-1]["state"] == "SUCCEEDED"
    # A client that has everything gets just the end; an id that is not a version counts as none: everything.
    assert [e.event for e in follow(fast_api, job_id, last_event_id=str(steps + 3))] == ["end"]
    assert statuses(follow(fast_api, job_id, last_event_id="²")) == statuses(first) + statuses(rest)


def test_versions_from_before_a_restart_are_an_explicit_gap(fast_api: Api, fast_node: AgentProc) -> None:
    done = submit(fast_api, seconds=0, steps=3, resumable=False)
    wait_job(fast_api, done, lambda j: j["state"] == "SUCCEEDED")
    running = submit(fast_api, seconds=60, steps=600)  # resumable: it checkpoints each step
    wait_job(fast_api, running, lambda j: j["version"] >= 5)
    fast_node.stop()
    before = fast_node.jobs()[running]
    assert before["state"] == "IN_PROGRESS"
    fast_node.start(wait_online=False)
    wait_http(fast_api.base)

    # A job that ended before the restart: only its current version is known.
    events = follow(fast_api, done, last_event_id="2")
    assert [e.event for e in events] == ["gap", "status", "end"]
    assert json.loads(events[0].data) == {"from": 3, "to": 5}
    assert [s["version"] for s in statuses(events)] == [6] and statuses(events)[0]["state"] == "SUCCEEDED"

    # The resumed job: everything since the restart, its first version (queued while the agent started, before
    # the HTTP server ran) included, after a gap for what the client missed before it.
    events = follow(fast_api, running, last_event_id="2",
                    on_first=lambda: fast_api.delete(f"/v1/jobs/{running}").raise_for_status())
    assert events[0].event == "gap" and json.loads(events[0].data) == {"from": 3, "to": before["version"]}
    got = statuses(events)
    assert [e.event for e in events] == ["gap"] + ["status"] * len(got) + ["end"]
    assert [s["version"] for s in got] == list(range(before["version"] + 1, before["version"] + 1 + len(got)))
    assert got[0]["state"] == "IN_PROGRESS" and got[0]["details"]["resumed"] is True
    assert got[-1]["state"] == "CANCELED" and json.loads(events[-1].data) == {"state": "CANCELED"}
    # Without Last-Event-ID the gap starts at the first version.
    again = follow(fast_api, running)
    assert json.loads(again[0].data) == {"from": 1, "to": before["version"]} and statuses(again) == got
