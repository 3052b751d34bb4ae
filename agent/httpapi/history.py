"""The recent status versions of each job, in memory, for the server-sent events of ``/v1/jobs/{id}/events``.

The state keeps only a job's latest status, and SSE streams wake once per durable commit, which may cover several
versions of a job (group commit). So the HTTP service records every status the engine queues, as it is queued, and
a stream replays them from here. Memory is bounded whatever the load: a few versions per job, a few jobs, and a
few statuses in all; what fell out (or was never here: versions from before the agent started) is reported to the
client as a gap, never silently skipped.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

VERSIONS_PER_JOB = 256
MAX_JOBS = 2000
# 2,000 jobs x 256 versions of a few hundred bytes each would be ~200 MB, too much for a Pi; this bound keeps the
# history at ~20 MB while still holding every version of a few long jobs, or the few versions of many short ones.
MAX_STATUSES = 50_000


def encode_status(status: Mapping[str, Any]) -> str:
    """A JobStatus (JSON data) exactly as the outbox sends it on MQTT."""
    return json.dumps(status, separators=(",", ":"), default=str)


@dataclass(frozen=True, slots=True)
class StatusEvent:
    version: int
    data: str  # the JobStatus as JSON, as published on MQTT


class StatusHistory:
    """Per job, its most recent statuses in version order. ``record`` runs on the engine's threads (inside a state
    transaction), the readers on the HTTP server's loop."""

    def __init__(self, versions_per_job: int = VERSIONS_PER_JOB, max_jobs: int = MAX_JOBS,
                 max_statuses: int = MAX_STATUSES):
        self.versions_per_job = versions_per_job
        self.max_jobs = max_jobs
        self.max_statuses = max_statuses
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, deque[StatusEvent]] = OrderedDict()  # least recently changed first
        self._count = 0

    def record(self, status: Mapping[str, Any]) -> None:
        job_id: str = status["job_id"]
        event = StatusEvent(int(status["version"]), encode_status(status))
        with self._lock:
            events = self._jobs.get(job_id)
            if events is None:
                events = self._jobs[job_id] = deque(maxlen=self.versions_per_job)
            else:
                self._jobs.move_to_end(job_id)
            if events and event.version == events[-1].version:
                events[-1] = event  # a duplicate request re-published it
                return
            if events and event.version < events[-1].version:
                # Versions only grow while a job lives; a smaller one is a new job under a pruned job's id.
                self._count -= len(events)
                events.clear()
            if len(events) < self.versions_per_job:
                self._count += 1
            events.append(event)
            while len(self._jobs) > self.max_jobs or (self._count > self.max_statuses and len(self._jobs) > 1):
                _, dropped = self._jobs.popitem(last=False)
                self._count -= len(dropped)

    def after(self, job_id: str, version: int, upto: Optional[int] = None) -> list[StatusEvent]:
        """The job's known statuses with ``version < v <= upto``, oldest first."""
        with self._lock:
            events = self._jobs.get(job_id)
            if not events:
                return []
            out = []
            for event in reversed(events):  # a follower asks for the last few: stop at what it has
                if event.version <= version:
                    break
                if upto is None or event.version <= upto:
                    out.append(event)
        out.reverse()
        return out

    def __len__(self) -> int:
        """Statuses held, over all jobs."""
        with self._lock:
            return self._count

    def clear(self) -> None:
        with self._lock:
            self._jobs.clear()
            self._count = 0
