"""Job types of live streams (``stream.start``, ``stream.stop``, ``stream.list``, ``stream.snapshot``) and
``node.stats``.

A stream outlives its job: ``stream.start`` checks the model, registers the stream with the node's stream
manager (which persists it) and ends SUCCEEDED while the stream keeps running; no worker is held.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from agent.jobs.base import Effects, JobContext, JobError, JobHandler
from agent.jobs.registry import register
from agent.streams.config import _STREAM_ID_PATTERN, StreamConfig
from agent.streams.manager import TooManyStreams


class StreamIdParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stream_id: str = Field(pattern=_STREAM_ID_PATTERN, description="The stream.")


class StatsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    publish: bool = Field(True, description="Also publish the figures on `N/stats`.")


def _manager(ctx: JobContext) -> Any:
    mgr = getattr(ctx.node, "streams", None)
    if mgr is None:
        raise JobError("unsupported", "this node has no stream manager")
    return mgr


@register
class StreamStart(JobHandler):
    type = "stream.start"
    effects = Effects.idempotent
    params_model = StreamConfig
    description = ("Start watching a source (Pi camera, V4L2/USB, RTSP/HTTP, video file) with a model; publishes "
                   "detections, events and snapshots under `N/streams/{stream_id}/`. Persisted: resumed after a "
                   "restart. Starting a running stream with new params restarts it; with the same params is a no-op. "
                   "Fails with `too_many_streams` (a new stream beyond `stream_limits.max_streams`), "
                   "`model_not_found` or `load_failed`; source problems are retried, not failures.")

    def run(self, ctx: JobContext) -> Optional[dict[str, Any]]:
        spec: StreamConfig = ctx.params
        node = ctx.node
        mgr = _manager(ctx)
        try:
            mgr.check_room(spec.stream_id)  # before loading a model for a stream that cannot run
        except TooManyStreams as e:
            raise JobError("too_many_streams", str(e)) from None
        if node.model_store.active_version(spec.model) is None:
            raise JobError("model_not_found", f"model {spec.model!r} is not installed on this node; deploy it first "
                           f"(model.deploy with source={spec.model!r} for a catalog model)")
        try:
            node.model_manager.load(spec.model)  # load now so that a broken model fails this job, not silently
        except Exception as e:
            raise JobError("load_failed", f"model {spec.model} cannot be loaded: {e}") from None
        try:
            stream, unchanged = mgr.start(spec)
        except TooManyStreams as e:  # another stream.start took the last place while the model loaded
            raise JobError("too_many_streams", str(e)) from None
        return {"stream": stream.describe(), "unchanged": unchanged}


@register
class StreamStop(JobHandler):
    type = "stream.stop"
    effects = Effects.idempotent
    params_model = StreamIdParams
    description = ("Stop a stream and remove it from the persisted set (its open object events end); its retained "
                   "snapshot on `N/streams/{id}/snapshot` is cleared.")
    control = True

    def run(self, ctx: JobContext) -> Optional[dict[str, Any]]:
        sid = ctx.params.stream_id
        mgr = _manager(ctx)
        known = mgr.get(sid) is not None or sid in mgr.desired()
        stream = mgr.stop(sid)
        if not known:
            raise JobError("stream_not_found", f"no stream {sid!r} on this node (stream.list shows them)")
        return {"stopped": sid, "stats": stream.stats().model_dump(mode="json") if stream else None}


@register
class StreamList(JobHandler):
    type = "stream.list"
    description = ("Every stream: params, origin (config or job), source state (running, reconnecting, ended, "
                   "failed), frame counts and rates, inference and latency percentiles.")
    control = True

    def run(self, ctx: JobContext) -> Optional[dict[str, Any]]:
        return {"streams": _manager(ctx).list()}


@register
class StreamSnapshot(JobHandler):
    type = "stream.snapshot"
    effects = Effects.idempotent
    params_model = StreamIdParams
    description = "Publish the latest processed frame, boxes drawn, as a retained JPEG on `N/streams/{id}/snapshot`."
    control = True

    def run(self, ctx: JobContext) -> Optional[dict[str, Any]]:
        sid = ctx.params.stream_id
        stream = _manager(ctx).get(sid)
        if stream is None:
            raise JobError("stream_not_found", f"no stream {sid!r} on this node")
        info = stream.snapshot_now()
        if info is None:
            raise JobError("no_frame", f"stream {sid} has not processed a frame yet (state {stream.state}); retry")
        return {"snapshot": info}


@register
class NodeStatsJob(JobHandler):
    type = "node.stats"
    params_model = StatsParams
    description = ("The node's runtime figures (streams, models, CPU, memory, disk, SoC temperature, uptime, job "
                   "counts), as on `N/stats`; published there too unless `publish` is false.")
    control = True

    def run(self, ctx: JobContext) -> Optional[dict[str, Any]]:
        pub = getattr(ctx.node, "stats", None)
        if pub is None:
            raise JobError("unsupported", "this node has no stats publisher")
        stats = pub.collect()
        if ctx.params.publish:
            pub.publish(stats)
        return {"stats": stats.model_dump(mode="json")}
