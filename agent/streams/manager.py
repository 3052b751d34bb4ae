"""The node's streams: start, stop, list, and the persisted desired set that survives restarts and power cuts.

The desired set lives in state meta (``streams``: stream_id -> params), written in the same durable state as
jobs, so a `stream.start` whose job reports SUCCEEDED is also on disk (the outbox publishes that status only after
the change that caused it is durable). At boot the node starts the `[[streams]]` of its config, then the persisted
ones (a persisted stream replaces a config stream of the same id). `stream.stop` of a config-declared stream
stops it until the next start: the config file is the operator's declaration.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Optional

from pydantic import ValidationError

from agent.streams.config import StreamConfig
from agent.streams.pipeline import Stream

if TYPE_CHECKING:
    from agent.node import Node

log = logging.getLogger("cv_worker.streams")

META_KEY = "streams"


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

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start_all(self) -> None:
        """Boot: the config's streams, then the persisted desired set. A bad entry is logged and skipped."""
        wanted: dict[str, tuple[StreamConfig, str]] = {s.stream_id: (s, "config") for s in self.node.config.streams}
        for sid, raw in self.desired().items():
            try:
                wanted[sid] = (StreamConfig.model_validate(raw), "job")
            except ValidationError as e:
                log.error("persisted stream %s is not valid any more, skipped: %s", sid, e)
        for spec, origin in wanted.values():
            try:
                self.start(spec, persist=False, origin=origin)
            except Exception:
                log.exception("cannot start stream %s", spec.stream_id)
        if wanted:
            log.info("streams resumed: %s", ", ".join(sorted(wanted)))

    def start(self, spec: StreamConfig, persist: bool = True, origin: str = "job") -> tuple[Stream, bool]:
        """Start (or restart with new params) a stream. Returns the stream and whether it was already running
        with exactly these params (then nothing changes: `stream.start` is idempotent)."""
        with self._lock:
            old = self._streams.get(spec.stream_id)
            if old is not None and old.spec == spec and old.state not in ("failed", "stopped"):
                if persist:
                    self._persist(spec.stream_id, spec)
                return old, True
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
        with self._lock:
            stream = self._streams.pop(stream_id, None)
            if persist and (stream is not None or stream_id in self.desired()):
                self._persist(stream_id, None)
        if stream is not None:
            stream.stop()
            log.info("stream %s stopped", stream_id, extra={"CVW_STREAM": stream_id})
        return stream

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
