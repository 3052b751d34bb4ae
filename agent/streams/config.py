"""Configuration and parameters of live streams (``[[streams]]`` tables, ``stream.start``), of ``[stream_limits]``
and of ``[stats]``.

One model, ``StreamConfig``, serves both the config file and the ``stream.start`` job, so a stream declared in
TOML and one started over MQTT behave identically and persist in the same form.
"""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

# Same rule as node ids and job ids (agent.config.SAFE_TOKEN_RE): a stream id is one MQTT topic level.
_STREAM_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class PublishOptions(BaseModel):
    """What a stream publishes, and how often."""

    model_config = ConfigDict(extra="forbid")

    detections: bool = Field(True, description="Publish per-frame detections on `N/streams/{id}/detections` (QoS 0).")
    detections_max_hz: float = Field(
        10.0, gt=0, le=240, description="At most this many detections messages per second (frames in between are "
        "still processed for events).")
    empty_frames: bool = Field(
        True, description="Also publish frames with no detections (lets a controller see the stream is alive).")
    events: bool = Field(True, description="Publish object events (start/update/end) on `N/streams/{id}/events`.")
    snapshots: bool = Field(True, description="Publish a retained JPEG on `N/streams/{id}/snapshot` on event start.")
    snapshot_min_interval_s: float = Field(
        1.0, ge=0, description="Least time between two event-triggered snapshots (requests always get one).")
    snapshot_quality: int = Field(80, ge=10, le=100, description="JPEG quality of snapshots.")
    snapshot_max_width: int = Field(1280, ge=64, description="Snapshots wider than this are scaled down.")


class TrackerOptions(BaseModel):
    """The IoU tracker that turns per-frame detections into object events."""

    model_config = ConfigDict(extra="forbid")

    iou_match: float = Field(0.3, gt=0, lt=1, description="Least IoU for a detection to continue a track.")
    min_hits: int = Field(2, ge=1, le=100, description="Frames an object must be seen in before its `start` event "
                          "(filters one-frame false positives).")
    end_after_s: float = Field(1.0, gt=0, description="An object unseen this long has left: `end` event.")
    update_iou: float = Field(0.5, gt=0, lt=1, description="An `update` is sent when the box moved so that its IoU "
                              "with the last published box falls below this...")
    update_score_delta: float = Field(0.1, gt=0, le=1, description="...or the best score rose by this much.")
    max_tracks: int = Field(
        100, ge=1, le=1000, description="Most objects tracked at once. A frame's detections beyond it are ignored "
        "(lowest scores first), and when a new object needs room the one unseen longest is dropped (`end` if it "
        "had started); without this bound a noisy model or a long `end_after_s` would grow the tracker without end.")


class StreamConfig(BaseModel):
    """One live stream: a source, a model and what to publish. Params of `stream.start` and `[[streams]]` tables."""

    model_config = ConfigDict(extra="forbid")

    stream_id: str = Field(pattern=_STREAM_ID_PATTERN, description="Name of the stream; one topic level.")
    source: str = Field(
        min_length=1, max_length=2048,
        description="`picamera2` or `picamera2:N` (Pi camera N), `v4l2:N` / `usb:N` / `/dev/videoN` / `N` (V4L2 "
        "device), `rtsp://...`, `http(s)://...` (e.g. MJPEG), or a video file path (`file:PATH` or `PATH`).")
    model: str = Field(min_length=1, max_length=128, description="Installed model to run (e.g. `blazeface`).")
    fps: Optional[float] = Field(
        None, gt=0, le=240, description="Process at most this many frames per second; default: as fast as they come.")
    size: Optional[tuple[int, int]] = Field(
        None, description="Capture size `[width, height]` asked of the camera; file frames are scaled to it.")
    threshold: Optional[float] = Field(
        None, ge=0, le=1, description="Least detection score reported; default: the model's own threshold.")
    roi: Optional[tuple[float, float, float, float]] = Field(
        None, description="Region of interest `[x1, y1, x2, y2]` as fractions (0..1) of the frame; only this part is "
        "analysed, boxes stay in full-frame pixels.")
    # Bounded because the params are persisted and rewritten with the node's state: 256 labels is more than any
    # model here has, and an 8 MiB list would make every state commit slow.
    classes: Optional[list[Annotated[str, StringConstraints(min_length=1, max_length=128)]]] = Field(
        None, max_length=256, description="Only these labels are reported (at most 256); default: all.")
    loop: bool = Field(False, description="File sources: start again at the end instead of ending.")
    publish: PublishOptions = Field(default_factory=PublishOptions)
    tracker: TrackerOptions = Field(default_factory=TrackerOptions)
    reconnect_min_s: float = Field(0.5, gt=0, description="First retry delay when the source drops; doubles.")
    reconnect_max_s: float = Field(10.0, gt=0, description="Longest retry delay.")

    @field_validator("size")
    @classmethod
    def _size(cls, v: Optional[tuple[int, int]]) -> Optional[tuple[int, int]]:
        if v is not None and not (16 <= v[0] <= 8192 and 16 <= v[1] <= 8192):
            raise ValueError("width and height must be 16..8192")
        return v

    @field_validator("roi")
    @classmethod
    def _roi(cls, v: Optional[tuple[float, float, float, float]]) -> Optional[tuple[float, float, float, float]]:
        if v is not None:
            x1, y1, x2, y2 = v
            if not (0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1):
                raise ValueError("must be [x1, y1, x2, y2] with 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1")
        return v

    @model_validator(mode="after")
    def _backoff(self) -> "StreamConfig":
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be at least reconnect_min_s")
        return self


class StatsConfig(BaseModel):
    """The ``[stats]`` section: the node's runtime figures on ``N/stats``."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Publish `N/stats` periodically (a `node.stats` job always works).")
    interval_s: float = Field(30.0, ge=0.5, le=86400, description="Seconds between two `N/stats` messages.")
    retain: bool = Field(True, description="Publish `N/stats` retained, so a new dashboard sees the latest at once.")


class StreamLimitsConfig(BaseModel):
    """The ``[stream_limits]`` section: bounds on what a node's streams take, on the node and on the broker."""

    model_config = ConfigDict(extra="forbid")

    max_streams: int = Field(
        8, ge=0, le=256, description="Streams this node runs at once, config-declared and started by `stream.start` "
        "together (each costs a capture thread, an inference thread and a share of the accelerator). `stream.start` "
        "of one more fails with `too_many_streams` (restarting a running stream with new params is not one more); "
        "a config that declares more `[[streams]]` is invalid; persisted streams beyond it are not resumed at boot "
        "and are dropped from the persisted set. 0: this node runs no streams.")
    snapshot_expiry_s: int = Field(
        24 * 3600, ge=0, le=2**32 - 1, description="MQTT message expiry of the retained JPEG on "
        "`N/streams/{id}/snapshot`, so the broker forgets the snapshot of a stream that no longer exists (a stream "
        "stopped with `stream.stop` has its snapshot cleared at once). 0: no expiry.")
