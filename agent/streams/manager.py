"""The node's streams: start, stop, list, and the persisted desired set that survives restarts and power cuts.

The desired set lives in state meta (``streams``: stream_id -> params), written in the same durable state as
jobs, so a `stream.start` whose job reports SUCCEEDED is also on disk (the outbox publishes that status only after
the change that caused it is durable). At boot the node starts the `[[streams]]` of its config, then the persisted
ones (a persisted stream replaces a config stream of the same id). `stream.stop` of a config-declared stream
stops it until the next start: the config file is the operator's declaration.

A node runs at most ``stream_limits.max_streams`` streams. The running streams and the persisted ones count
together, so the persisted set can never hold more than the limit either; at boot the config's streams take
their places first and persisted streams that no longer fit are dropped from the persisted set, with a log line.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Optional

from pydantic import ValidationError

from agent.streams.config import StreamConfig
from agent.streams.pipeline import Stream, snapshot_topic

if TYPE_CHECKING:
    from agent.node import Node

log = logging.getLogger("cv_worker.streams")

META_KEY = "streams"


class TooManyStreams(Exception):
    """A new stream would exceed ``stream_limits.max_streams``; the message names the limit and the streams."""


class StreamManager:
    def __init__(self, node: "Node"):
        self.node = node
        self._streams: dict[str, Stream] = {}
        self._lock = threading.Lock()

    # -- persistence ----------------------------------------------------------------------------------------

    def desired(self) -> dict[str, dict[str, Any]]:
        return dict(self.node.state.meta_get(META_KEY, {}) or {})

    def _persist(self, stream_id: str, spec: Optional[StreamConfig]) -> None:
        with self.node.state.transaction():
            cur = dict(self.node.state.meta_get(META_KEY, {}) or {})
            if spec is None:
                cur.pop(stream_id, None)
            else:
                cur[stream_id] = spec.model_dump(mode="json")
            self.node.state.meta_set(META_KEY, cur)

    # -- the limit ------------------------------------------------------------------------------------------

    @property
    def max_streams(self) -> int:
        return self.node.config.stream_limits.max_streams

    def _held(self) -> list[str]:
        """Ids that take a place: running streams and persisted ones (caller holds the lock)."""
        return list(dict.fromkeys([*self._streams, *self.desired()]))

    def _refuse_new(self, stream_id: str) -> None:
        held = self._held()
        if stream_id in held or len(held) < self.max_streams:
            return
        if self.max_streams == 0:
            raise TooManyStreams("this node runs no streams (stream_limits.max_streams = 0)")
        raise TooManyStreams(
            f"this node runs at most {self.max_streams} streams (stream_limits.max_streams) and has {len(held)}: "
            f"{', '.join(held) or 'none'}; stop one with stream.stop, or restart one of them with new params")

    def check_room(self, stream_id: str) -> None:
        """Raise TooManyStreams when ``stream_id`` would be one stream too many (restarting one is not)."""
        with self._lock:
            self._refuse_new(stream_id)

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start_all(self) -> None:
        """Boot: the config's streams, then the persisted desired set, up to the limit. A persisted entry that is
        invalid or does not fit is logged and dropped from the persisted set (it would be refused at every boot)."""
        limit = self.max_streams
        wanted: dict[str, tuple[StreamConfig, str]] = {}
        for spec in self.node.config.streams:
            if spec.stream_id not in wanted and len(wanted) >= limit:
                log.error("config stream %s not started: this node runs at most %d streams "
                          "(stream_limits.max_streams)", spec.stream_id, limit, extra={"CVW_STREAM": spec.stream_id})
                continue
            wanted[spec.stream_id] = (spec, "config")
        persisted = self.desired()
        keep: dict[str, Any] = {}
        for sid, raw in persisted.items():
            try:
                spec = StreamConfig.model_validate(raw)
            except ValidationError as e:
                log.error("persisted stream %s is not valid any more; dropped from the persisted set: %s", sid, e)
                continue
            if spec.stream_id != sid:
                log.error("persisted stream %s holds the params of stream %s; dropped from the persisted set", sid,
                          spec.stream_id)
                continue
            if sid not in wanted and len(wanted) >= limit:
                log.error("persisted stream %s not resumed: this node runs at most %d streams "
                          "(stream_limits.max_streams) and %s take them; dropped from the persisted set",
                          sid, limit, ", ".join(wanted) or "none", extra={"CVW_STREAM": sid})
                continue
            wanted[sid] = (spec, "job")
            keep[sid] = raw
        if keep != persisted:
            with self.node.state.transaction():
                self.node.state.meta_set(META_KEY, keep)
        for spec, origin in wanted.values():
            try:
                self.start(spec, persist=False, origin=origin)
            except TooManyStreams as e:  # a stream.start job that ran while the node was booting took the place
                log.error("stream %s not started: %s", spec.stream_id, e, extra={"CVW_STREAM": spec.stream_id})
            except Exception:
                log.exception("cannot start stream %s", spec.stream_id)
        if wanted:
            log.info("streams resumed: %s", ", ".join(sorted(wanted)))

    def start(self, spec: StreamConfig, persist: bool = True, origin: str = "job") -> tuple[Stream, bool]:
        """Start (or restart with new params) a stream. Returns the stream and whether it was already running
        with exactly these params (then nothing changes: `stream.start` is idempotent). Raises TooManyStreams
        when a new stream would exceed the limit."""
        with self._lock:
            old = self._streams.get(spec.stream_id)
            if old is not None and old.spec == spec and old.state not in ("failed", "stopped"):
                if persist:
                    self._persist(spec.stream_id, spec)
                return old, True
            self._refuse_new(spec.stream_id)
            if old is not None:
                old.stop()
            if persist:
                self._persist(spec.stream_id, spec)
            stream = Stream(self.node, spec, origin=origin).start()
            self._streams[spec.stream_id] = stream
        log.info("stream %s started: %s -> %s", spec.stream_id, spec.source, spec.model,
                 extra={"CVW_STREAM": spec.stream_id})
        return stream, False

    def stop(self, stream_id: str, persist: bool = True) -> Optional[Stream]:
        """Stop a stream. With ``persist`` (a `stream.stop`), it also leaves the persisted set and its retained
        snapshot is cleared: the broker should not show a stream the node no longer has."""
        with self._lock:
            stream = self._streams.pop(stream_id, None)
            known = stream is not None or stream_id in self.desired()
            if persist and known:
                self._persist(stream_id, None)
        if stream is not None:
            stream.stop()
            log.info("stream %s stopped", stream_id, extra={"CVW_STREAM": stream_id})
        if persist and known:
            self._clear_snapshot(stream_id)
        return stream

    def _clear_snapshot(self, stream_id: str) -> None:
        link = self.node.link
        if link is None:
            return
        # An empty retained message deletes the retained one. QoS 1 even when disconnected: paho keeps it and sends
        # it after the reconnect (the snapshot's expiry covers an agent that stops before then). Published after
        # the stream stopped: a stopped stream publishes no snapshot (Stream.publish_snapshot), so none follows it.
        link.client.publish(snapshot_topic(self.node, stream_id), b"", qos=1, retain=True)

    def get(self, stream_id: str) -> Optional[Stream]:
        with self._lock:
            return self._streams.get(stream_id)

    def all(self) -> list[Stream]:
        with self._lock:
            return list(self._streams.values())

    def list(self) -> list[dict[str, Any]]:
        return [s.describe() for s in sorted(self.all(), key=lambda s: s.id)]

    def close(self) -> None:
        """Agent shutdown: stop every stream but keep the desired set, so the next start resumes them."""
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for s in streams:
            s.stop(timeout=2.0)
