"""Topics of the training queue. A build peer serves them with the node's job engine, so this class has the
same interface as ``agent.protocol.Topics``; only the root differs: ``{prefix}/trainers``.

- ``{prefix}/trainers/jobs/{job_id}/request``: the shared queue (peers subscribe with ``$share/{group}/...``)
- ``{prefix}/trainers/peers/{peer_id}/jobs/{job_id}/request``: one peer by name
- ``{prefix}/trainers/jobs/{job_id}/status`` and ``/result``: whichever peer took the job (the status names it)
- ``{prefix}/trainers/peers/{peer_id}/status``: the peer's retained birth/will, ``/errors``: unreadable requests
"""

from __future__ import annotations

from typing import Optional

from agent.protocol import Topics


class TrainerTopics(Topics):
    def __init__(self, prefix: str, peer_id: str, group: str = "trainers"):
        super().__init__(prefix, peer_id)
        self.group = group
        self.root = f"{prefix}/trainers"
        self.node = f"{self.root}/peers/{peer_id}"  # status, errors and request_filter derive from it

    @property
    def shared_request_filter(self) -> str:
        return f"$share/{self.group}/{self.root}/jobs/+/request"

    def job_status(self, job_id: str) -> str:
        return job_status_topic(self.prefix, job_id)

    def job_result(self, job_id: str) -> str:
        return f"{self.root}/jobs/{job_id}/result"

    def parse_request_topic(self, topic: str) -> Optional[tuple[str, Optional[str]]]:
        """``(job id level, group or None)`` for a request topic of this peer, else None."""
        for start, pool in ((f"{self.node}/jobs/", None), (f"{self.root}/jobs/", self.group)):
            if topic.startswith(start) and topic.endswith("/request"):
                job = topic[len(start): -len("/request")]
                if "/" not in job:
                    return job, pool
        return None


def queue_request_topic(prefix: str, job_id: str, peer: Optional[str] = None) -> str:
    """Where to send a training job: to one peer by id, or (``peer`` None or ``*``) to the shared queue."""
    if peer and peer != "*":
        return f"{prefix}/trainers/peers/{peer}/jobs/{job_id}/request"
    return f"{prefix}/trainers/jobs/{job_id}/request"


def job_status_topic(prefix: str, job_id: str) -> str:
    return f"{prefix}/trainers/jobs/{job_id}/status"


def peer_status_filter(prefix: str) -> str:
    return f"{prefix}/trainers/peers/+/status"
