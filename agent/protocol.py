"""The MQTT protocol of cv-worker: topics and every message, as pydantic models.

This module is the single source of truth: ``docs/protocol.md`` and the JSON Schemas printed by
``cv-worker schema`` are generated from it, so the documentation cannot drift from the code.
"""

from __future__ import annotations

import enum
import time
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from agent.config import SAFE_TOKEN_RE
from agent.streams.messages import STREAM_MESSAGE_MODELS

PROTOCOL_VERSION = 1


class JobState(str, enum.Enum):
    QUEUED = "QUEUED"
    IN_PROGRESS = "IN_PROGRESS"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    CANCELED = "CANCELED"
    REJECTED = "REJECTED"

    @property
    def terminal(self) -> bool:
        return self not in (JobState.QUEUED, JobState.IN_PROGRESS)


TERMINAL_STATES = frozenset(s for s in JobState if s.terminal)


class ErrorCode(str, enum.Enum):
    """Machine-readable reasons on ``error.code``. The message next to it says what to do."""

    invalid_json = "invalid_json"
    invalid_request = "invalid_request"
    invalid_params = "invalid_params"
    unknown_job_type = "unknown_job_type"
    payload_too_large = "payload_too_large"
    invalid_job_id = "invalid_job_id"
    job_id_mismatch = "job_id_mismatch"
    retained_request = "retained_request"
    disk_full = "disk_full"
    queue_full = "queue_full"
    interrupted = "interrupted"
    timed_out = "timed_out"
    canceled = "canceled"
    not_found = "not_found"
    not_cancelable = "not_cancelable"
    unsupported = "unsupported"
    internal_error = "internal_error"


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorInfo(_Msg):
    code: str = Field(description="Machine-readable reason, one of the codes listed in the protocol docs.")
    message: str = Field(description="What went wrong and what to do about it, for a person.")


class JobRequest(_Msg):
    """Controller → node on ``N/jobs/{job_id}/request`` (or a pool's request topic), QoS 1."""

    # Strict: a string "5" or `true` where a number belongs is a mistake in the controller, not a value to guess.
    type: str = Field(description="The job type, e.g. `node.info`.", min_length=1, max_length=64, strict=True)
    params: dict[str, Any] = Field(default_factory=dict, description="Parameters of the job type.", strict=True)
    job_id: Optional[str] = Field(None, description="Optional; when present it must equal the topic's job id.",
                                  strict=True)
    timeout_s: Optional[float] = Field(
        None, gt=0, le=30 * 24 * 3600, description="Seconds the job may run once started; then TIMED_OUT.", strict=True
    )
    priority: int = Field(0, ge=-100, le=100, description="Higher runs first among queued jobs; default 0.",
                          strict=True)


class JobStatus(_Msg):
    """Node → controller on ``N/jobs/{job_id}/status``: QoS 1, retained, with a message expiry."""

    job_id: str
    node_id: str
    type: str
    state: JobState
    version: int = Field(description="Increases by one on every update of this job; use it to drop stale copies.")
    progress: Optional[float] = Field(None, ge=0, le=1, description="0..1 when known.")
    details: dict[str, Any] = Field(default_factory=dict, description="Job-type specific, e.g. processed/total.")
    error: Optional[ErrorInfo] = None
    ts: float = Field(description="Unix time of this update.")


class JobResult(BaseModel):
    """Node → controller on ``N/jobs/{job_id}/result``, QoS 1. A job may send several chunks; every job that ends
    (SUCCEEDED, FAILED, TIMED_OUT, CANCELED or REJECTED) sends exactly one message with final=true, before its
    terminal status: it says how many chunks preceded it and whether the output is complete.

    Besides the fields below, a result carries the job type's own output fields; the final message of a job that
    did not succeed carries `state` and `error` instead.
    """

    model_config = ConfigDict(extra="allow")

    job_id: str
    node_id: str
    seq: int = Field(ge=0, description="0, 1, 2... in order of production.")
    final: bool = Field(description="True on the last result message of the job.")
    chunks: Optional[int] = Field(None, ge=0, description="On the final message: how many result messages preceded "
                                  "it (seq 0 .. chunks-1); a controller that has fewer asks `job.result` for the rest.")
    complete: Optional[bool] = Field(None, description="On the final message: true when the job succeeded and its "
                                     "output is whole; false when it ended otherwise (the chunks sent are still "
                                     "valid, the rest never came).")
    ts: float


class NodeStatus(_Msg):
    """``N/status``, retained, QoS 1: the birth message on every (re)connect, the will, or `stopped`."""

    state: Literal["online", "offline", "stopped"]
    node_id: str
    version: str = Field(description="cv-worker version.")
    proto: int = Field(PROTOCOL_VERSION, description="Protocol version of these messages.")
    boot_id: str = Field(description="Unique per agent start; a new value means the agent restarted.")
    bd_seq: int = Field(description="Birth/death sequence: the will carries the bd_seq of the birth it belongs to.")
    ts: float
    accelerators: list[dict[str, Any]] = Field(default_factory=list)
    models: list[dict[str, Any]] = Field(default_factory=list)
    capabilities: list[str] = Field(default_factory=list, description="Job types this node accepts.")
    pools: list[str] = Field(default_factory=list)
    disk: Literal["ok", "low", "full"] = Field(
        "ok", description="The state disk: `low` (under `storage.free_low_mb`) or `full` (writes failing): new work "
        "is REJECTED with `disk_full`, running jobs are paused, old outputs and result logs are deleted; back to "
        "`ok` by itself once space is free.")


class NodeError(_Msg):
    """``N/errors``, QoS 1: a request that could not be tied to a job id (so no job status topic exists), or a
    condition of the node itself (`disk_full`, when the node starts refusing work and at each reconnect while it
    does; published at once, not kept for later: the birth's `disk` field says how things stand)."""

    node_id: str
    topic: Optional[str] = Field(description="The topic the offending message arrived on; null for a condition of "
                                 "the node.")
    error: ErrorInfo
    ts: float


class CancelParams(_Msg):
    """Params of `job.cancel`."""

    job_id: str = Field(description="The job to cancel (queued or running, on this node).")


def now() -> float:
    return round(time.time(), 3)


class Topics:
    """Every topic of one node, derived from the prefix and node id."""

    def __init__(self, prefix: str, node_id: str):
        self.prefix = prefix
        self.node_id = node_id
        self.node = f"{prefix}/nodes/{node_id}"

    @property
    def status(self) -> str:
        return f"{self.node}/status"

    @property
    def errors(self) -> str:
        return f"{self.node}/errors"

    @property
    def request_filter(self) -> str:
        return f"{self.node}/jobs/+/request"

    def pool_request_filter(self, pool: str) -> str:
        return f"$share/{pool}/{self.prefix}/pools/{pool}/jobs/+/request"

    def pool_request(self, pool: str, job_id: str) -> str:
        return f"{self.prefix}/pools/{pool}/jobs/{job_id}/request"

    def request(self, job_id: str) -> str:
        return f"{self.node}/jobs/{job_id}/request"

    def job_status(self, job_id: str) -> str:
        return f"{self.node}/jobs/{job_id}/status"

    def job_result(self, job_id: str) -> str:
        return f"{self.node}/jobs/{job_id}/result"

    def parse_request_topic(self, topic: str) -> Optional[tuple[str, Optional[str]]]:
        """``(job id level, pool or None)`` for a request topic of this node, else None."""
        node_prefix = f"{self.node}/jobs/"
        if topic.startswith(node_prefix) and topic.endswith("/request"):
            return topic[len(node_prefix) : -len("/request")], None
        pools_prefix = f"{self.prefix}/pools/"
        if topic.startswith(pools_prefix) and topic.endswith("/request"):
            rest = topic[len(pools_prefix) : -len("/request")]
            pool, sep, job = rest.partition("/jobs/")
            if sep and "/" not in pool:
                return job, pool
        return None


def is_safe_job_id(job_id: str) -> bool:
    return bool(SAFE_TOKEN_RE.match(job_id))


MESSAGE_MODELS: dict[str, type[BaseModel]] = {
    "JobRequest": JobRequest,
    "JobStatus": JobStatus,
    "JobResult": JobResult,
    "NodeStatus": NodeStatus,
    "NodeError": NodeError,
    **STREAM_MESSAGE_MODELS,
}
