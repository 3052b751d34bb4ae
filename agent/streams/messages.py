"""Messages of live streams and node stats; listed in agent.protocol.MESSAGE_MODELS so the docs show them."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamDetection(_Msg):
    label: str
    score: float
    box: tuple[float, float, float, float] = Field(description="x1, y1, x2, y2 in pixels of the full frame.")


class StreamDetections(_Msg):
    """``N/streams/{stream_id}/detections``, QoS 0, not retained: one processed frame, at most
    `publish.detections_max_hz` per second."""

    stream_id: str
    node_id: str
    frame: int = Field(description="Frame number since the stream (re)started capturing.")
    ts: float = Field(description="Unix time the frame was captured.")
    width: int
    height: int
    model: str
    detections: list[StreamDetection]
    inference_ms: float
    latency_ms: float = Field(description="Capture to publish, measured on the node.")


class StreamEvent(_Msg):
    """``N/streams/{stream_id}/events``, QoS 1 (durable outbox): an object appeared (`start`), changed
    noticeably (`update`) or left (`end`). The three share one `event_id`."""

    stream_id: str
    node_id: str
    event: Literal["start", "update", "end"]
    event_id: str
    label: str
    score: float = Field(description="Best score seen so far for this object.")
    box: list[float] = Field(description="Box of the best-scoring sighting, x1, y1, x2, y2 in frame pixels.")
    last_box: list[float] = Field(description="Box of the latest sighting.")
    last_score: float
    first_seen: float = Field(description="Unix time of the first sighting.")
    last_seen: float = Field(description="Unix time of the latest sighting.")
    duration_s: float
    frames: int = Field(description="Frames the object was seen in.")
    frame: int = Field(description="Frame number at which this event was decided.")
    ts: float
    snapshot: bool = Field(False, description="A snapshot of this moment was published (on `start`).")


class StreamStats(_Msg):
    """One stream's figures in ``NodeStats.streams`` and in `stream.list`."""

    stream_id: str
    source: str
    model: str
    state: str = Field(description="`starting`, `running`, `reconnecting` (source dropped; retried with backoff), "
                       "`ended` (a file without loop reached its end), `failed` or `stopped`.")
    last_error: Optional[str] = None
    reconnects: int = Field(description="Times the source dropped and was reopened.")
    frames_captured: int
    frames_processed: int
    frames_dropped: int = Field(description="Captured frames replaced by a newer one before inference took them.")
    frames_skipped_fps: int = Field(description="Frames not processed because of the `fps` limit.")
    capture_fps: float
    processed_fps: float
    skipped_fps: float = Field(description="Captured frames per second that were not processed (dropped or limited).")
    inference_ms: dict[str, Optional[float]] = Field(description="p50, p95 of model time per processed frame.")
    latency_ms: dict[str, Optional[float]] = Field(description="p50, p95 of capture-to-publish time.")
    events: int = Field(description="Object events started since the stream started.")
    active_objects: int
    started_at: float


class ModelStats(_Msg):
    """One loaded model's figures in ``NodeStats.models``."""

    version: Optional[str] = None
    backend: Optional[str] = None
    device: Optional[str] = None
    load_ms: Optional[float] = Field(None, description="Time the backend took to load it.")
    inferences: int = Field(0, description="Inferences since the agent started (streams and jobs that report).")
    per_s: float = Field(0.0, description="Inferences per second over the last 10 s.")
    busy: float = Field(0.0, description="Fraction of the last 10 s spent in this model (its load).")
    latency_ms: dict[str, Optional[float]] = Field(default_factory=dict, description="p50, p95 per inference.")


class StorageRemoved(_Msg):
    """What retention deleted since the agent started: per kind, how many by reason."""

    jobs: dict[str, int] = Field(default_factory=dict, description="Finished jobs pruned with their result logs and "
                                 "outputs, each leaving a tombstone: `count` (over `jobs.retention_count`), `age` "
                                 "(older than `jobs.retention_days`).")
    tombstones: dict[str, int] = Field(default_factory=dict, description="Tombstones forgotten: `age` (older than "
                                       "`jobs.tombstone_days`), `bytes` (over `jobs.tombstone_max_kb`).")
    results: dict[str, int] = Field(default_factory=dict, description="Result logs deleted: `job pruned`, `bytes` "
                                    "(over `storage.results_max_mb`; the job stays, marked `results_pruned`), "
                                    "`disk pressure`.")
    outputs: dict[str, int] = Field(default_factory=dict, description="Jobs' outputs directories deleted: "
                                    "`job pruned`, `age` (older than `storage.outputs_days`), `bytes` (over "
                                    "`storage.outputs_max_mb`), `disk pressure`.")
    freed_bytes: int = Field(0, description="Bytes of result logs and outputs deleted.")


class StorageStats(_Msg):
    """``NodeStats.storage``: what the node keeps on its state disk (docs/storage.md) and how much room is left."""

    level: Literal["ok", "low", "full"] = Field(description="As the birth's `disk`: `low` under "
                                                "`storage.free_low_mb`, `full` after a write failed for lack of space.")
    free_bytes: Optional[int] = Field(description="Free space of the state directory's filesystem.")
    reserve_bytes: int = Field(description="Size of the reserve file (`storage.reserve_mb`); 0 while it is released "
                               "(disk pressure) or configured off.")
    write_error: Optional[str] = Field(None, description="Why state commits fail, while they do (e.g. no space).")
    snapshot_bytes: int = Field(description="The state snapshot.")
    journal_bytes: int = Field(description="The state journal written since the last snapshot.")
    spool_files: int = Field(description="Params of active jobs kept in files of their own (`storage.spool_min_kb`).")
    spool_bytes: int
    jobs: int = Field(description="Jobs kept in the state, active and finished.")
    jobs_bytes: int = Field(description="Their documents and params in the state.")
    tombstones: int = Field(description="Ids of pruned jobs remembered (`jobs.tombstone_days`).")
    tombstone_bytes: int
    result_logs: int = Field(description="Result logs of finished jobs.")
    results_bytes: int
    outputs_jobs: int = Field(description="Finished jobs with outputs (annotated copies, masks, output files).")
    outputs_files: int
    outputs_bytes: int
    removed: StorageRemoved


class NodeStats(_Msg):
    """``N/stats``, QoS 1 (retained by default): the node's runtime figures, every `stats.interval_s` and on a
    `node.stats` request."""

    node_id: str
    ts: float
    uptime_s: float = Field(description="Seconds since the agent started.")
    system_uptime_s: Optional[float] = None
    cpu_percent: Optional[float] = Field(None, description="Whole-machine CPU use since the previous sample.")
    cpu_count: int
    load_avg: Optional[list[float]] = None
    process_cpu_percent: Optional[float] = Field(None, description="This agent's CPU use (100 = one core).")
    memory: dict[str, Any] = Field(description="total_mb, available_mb, used_percent; process_rss_mb.")
    disk: dict[str, Any] = Field(description="Of the state directory: total_mb, free_mb, used_percent.")
    storage: Optional[StorageStats] = Field(None, description="What the node keeps on its state disk and what "
                                            "retention removed (docs/storage.md); absent from older agents.")
    soc_temp_c: Optional[float] = Field(None, description="SoC temperature when the board exposes one.")
    jobs: dict[str, Any] = Field(description="by_state counts, running, queued.")
    streams: dict[str, StreamStats] = Field(default_factory=dict)
    models: dict[str, ModelStats] = Field(default_factory=dict)


STREAM_MESSAGE_MODELS: dict[str, type[BaseModel]] = {
    "StreamDetections": StreamDetections,
    "StreamEvent": StreamEvent,
    "NodeStats": NodeStats,
}
