"""One running stream: a capture thread and an inference thread joined by a one-frame mailbox.

capture thread: source.read() -> LatestFrame.put (overwrites: the newest frame wins, older ones are counted as
dropped). When the source fails it is closed and reopened with doubling backoff; its state is reported.
inference thread: LatestFrame.take -> fps limit -> model -> detections (QoS 0, rate-limited) -> tracker events
(QoS 1 through the durable outbox) -> snapshot on event start (retained JPEG).
Nothing here may raise out of a thread: a failing source or model is reported in the stream's state, and the
agent carries on.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.stats import MODEL_METRICS
from agent.streams.config import StreamConfig
from agent.streams.messages import StreamStats
from agent.streams.metrics import Rate, Samples
from agent.streams.sources import Backoff, FrameSource, LatestFrame, SourceError, make_source
from agent.streams.tracker import IouTracker, TrackEvent

if TYPE_CHECKING:
    from agent.node import Node

log = logging.getLogger("cv_worker.streams")


def snapshot_topic(node: "Node", stream_id: str) -> str:
    return f"{node.topics.node}/streams/{stream_id}/snapshot"


def _props(content_type: str, expiry_s: int = 0, **user: Any) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = content_type
    if content_type == "application/json":
        props.PayloadFormatIndicator = 1
    if expiry_s:
        props.MessageExpiryInterval = int(expiry_s)
    if user:
        props.UserProperty = [(k, str(v)) for k, v in user.items()]
    return props


_JSON_PROPS = _props("application/json")


class Stream:
    def __init__(self, node: "Node", spec: StreamConfig, origin: str = "job"):
        self.node = node
        self.spec = spec
        self.origin = origin  # "config" or "job": where the stream was declared
        self.id = spec.stream_id
        base = f"{node.topics.node}/streams/{self.id}"
        self.topic_detections = f"{base}/detections"
        self.topic_events = f"{base}/events"
        self.topic_snapshot = snapshot_topic(node, self.id)
        self.mailbox = LatestFrame()
        self.tracker = IouTracker(spec.tracker)
        self.state = "starting"
        self.last_error: Optional[str] = None
        self.reconnects = 0
        self.started_at = time.time()
        self.processed = Rate()
        self.captured = Rate()
        self.skipped = Rate()  # dropped in the mailbox or refused by the fps limit
        self.skipped_fps_limit = 0
        self.inference_ms = Samples()
        self.latency_ms = Samples()
        self.events_started = 0
        self._model_error: Optional[str] = None
        self._stop = threading.Event()
        self._last_lock = threading.Lock()
        self._last: Optional[tuple[np.ndarray, list[dict[str, Any]], int, float]] = None
        self._last_det_pub = 0.0
        self._last_snapshot = 0.0
        self._threads: list[threading.Thread] = []

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> "Stream":
        for target, name in ((self._capture_loop, "capture"), (self._process_loop, "infer")):
            t = threading.Thread(target=self._guard, args=(target,), name=f"stream-{self.id}-{name}", daemon=True)
            self._threads.append(t)
            t.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.mailbox.wake()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))
        # Whoever follows the events must see every object closed, also when the stream is stopped mid-sighting.
        self._emit(self.tracker.end_all(time.time(), self.mailbox.seq), None, [])
        self.state = "stopped"

    def _guard(self, fn: Any) -> None:
        try:
            fn()
        except Exception as e:  # a bug in one stream must not take the agent (or other streams) down
            log.exception("stream %s: %s crashed", self.id, fn.__name__)
            self.state, self.last_error = "failed", f"internal error: {type(e).__name__}: {e}"

    def _set_state(self, state: str, error: Optional[str] = None) -> None:
        if state != self.state or (error and error != self.last_error):
            level = logging.WARNING if state in ("reconnecting", "failed") else logging.INFO
            log.log(level, "stream %s: %s%s", self.id, state, f" ({error})" if error else "",
                    extra={"CVW_STREAM": self.id})
        self.state = state
        if error:
            self.last_error = error

    # -- capture --------------------------------------------------------------------------------------------

    def _capture_loop(self) -> None:
        spec = self.spec
        backoff = Backoff(spec.reconnect_min_s, spec.reconnect_max_s)
        while not self._stop.is_set():
            src: FrameSource = make_source(spec.source, spec.size, spec.fps, spec.loop)
            try:
                src.open()
                self._set_state("running")
                while not self._stop.is_set():
                    frame = src.read()
                    if frame is None:  # a file without `loop` is finished: nothing to retry
                        self._set_state("ended")
                        src.close()
                        self._stop.wait()
                        return
                    now = time.monotonic()
                    if self.mailbox.put(frame, now, time.time()):
                        self.skipped.add(now)
                    self.captured.add(now)
                    backoff.reset()
            except SourceError as e:
                self._set_state("reconnecting", str(e))
            except Exception as e:  # OpenCV and camera stacks raise all sorts; treat all as a dropped source
                self._set_state("reconnecting", f"{type(e).__name__}: {e}")
            finally:
                src.close()
            if self._stop.wait(backoff.next_delay()):
                break
            self.reconnects += 1

    # -- inference ------------------------------------------------------------------------------------------

    def _process_loop(self) -> None:
        spec = self.spec
        interval = 1.0 / spec.fps if spec.fps else 0.0
        next_due = 0.0
        min_pub_gap = 1.0 / spec.publish.detections_max_hz
        while not self._stop.is_set():
            item = self.mailbox.take(0.25)
            if item is None:
                # No frames (source down or slow): objects still leave after end_after_s.
                self._emit(self.tracker.expire(time.time(), self.mailbox.seq), None, [])
                continue
            frame, seq, t_cap, t_wall = item
            if interval:
                # Accept a frame slightly early so a 30 fps camera limited to 10 fps gives 10, not 7.5.
                if t_cap < next_due - 0.25 * interval:
                    self.skipped_fps_limit += 1
                    self.skipped.add(t_cap)
                    continue
                next_due = next_due + interval if t_cap - next_due < interval else t_cap + interval
            dets, inf_ms = self._infer(frame)
            if dets is None:
                continue
            self.processed.add()
            self.inference_ms.add(inf_ms)
            h, w = frame.shape[:2]
            now_m = time.monotonic()
            if spec.publish.detections and (dets or spec.publish.empty_frames) and \
                    now_m - self._last_det_pub >= min_pub_gap * 0.95:
                self._last_det_pub = now_m
                msg = {"stream_id": self.id, "node_id": self.node.node_id, "frame": seq, "ts": round(t_wall, 4),
                       "width": w, "height": h, "model": spec.model, "detections": dets,
                       "inference_ms": round(inf_ms, 2), "latency_ms": round((now_m - t_cap) * 1000, 2)}
                self._publish_qos0(self.topic_detections, json.dumps(msg, separators=(",", ":")).encode())
            self.latency_ms.add((time.monotonic() - t_cap) * 1000)
            with self._last_lock:
                self._last = (frame, dets, seq, t_wall)
            events = self.tracker.update([(d["label"], d["score"], tuple(d["box"])) for d in dets], t_wall, seq)
            self._emit(events, frame, dets)

    def _infer(self, frame: np.ndarray) -> tuple[Optional[list[dict[str, Any]]], float]:
        spec = self.spec
        h, w = frame.shape[:2]
        ox = oy = 0
        img = frame
        if spec.roi is not None:
            x1, y1, x2, y2 = spec.roi
            ox, oy = int(x1 * w), int(y1 * h)
            img = frame[oy:max(oy + 1, int(y2 * h)), ox:max(ox + 1, int(x2 * w))]
        t0 = time.perf_counter()
        try:
            pred = self.node.model_manager.predict(spec.model, img, image_color="BGR")
        except Exception as e:  # model removed, failed to load...: report, retry slowly, keep the source open
            err = f"model {spec.model}: {e}"
            if err != self._model_error:
                log.error("stream %s: %s", self.id, err, extra={"CVW_STREAM": self.id})
            self._model_error = err
            self.last_error = err
            self._stop.wait(1.0)
            return None, 0.0
        ms = (time.perf_counter() - t0) * 1000
        self._model_error = None
        MODEL_METRICS.record(spec.model, pred.timing_ms.get("infer", ms), backend=pred.backend)
        out = []
        for d in pred.detections:
            if spec.threshold is not None and d.score < spec.threshold:
                continue
            if spec.classes is not None and d.label not in spec.classes:
                continue
            b = d.box
            out.append({"label": d.label, "score": round(float(d.score), 4),
                        "box": [round(b[0] + ox, 1), round(b[1] + oy, 1), round(b[2] + ox, 1), round(b[3] + oy, 1)]})
        return out, ms

    # -- publishing -----------------------------------------------------------------------------------------

    def _publish_qos0(self, topic: str, payload: bytes) -> None:
        link = self.node.link
        if link is not None and link.connected.is_set():
            # QoS 0 straight to the client: a stale detection is worthless, so it is never stored or retried.
            link.client.publish(topic, payload, qos=0, properties=_JSON_PROPS)

    def _emit(self, events: list[TrackEvent], frame: Optional[np.ndarray], dets: list[dict[str, Any]]) -> None:
        if not events:
            return
        snap = False
        if frame is not None and self.spec.publish.snapshots and any(e.kind == "start" for e in events):
            if time.monotonic() - self._last_snapshot >= self.spec.publish.snapshot_min_interval_s:
                snap = self.publish_snapshot(frame, dets, events[0].frame, reason="event") is not None
        self.events_started += sum(1 for e in events if e.kind == "start")
        if not self.spec.publish.events:
            return
        payloads = []
        for e in events:
            p = {"stream_id": self.id, "node_id": self.node.node_id, **e.payload()}
            p["snapshot"] = snap and e.kind == "start"
            payloads.append(p)
        # QoS 1 through the durable outbox: an event survives a broker outage or an agent restart.
        with self.node.state.transaction():
            for p in payloads:
                self.node.outbox.add(self.topic_events, p, kind="event")

    def publish_snapshot(self, frame: np.ndarray, dets: list[dict[str, Any]], frame_no: int,
                         reason: str) -> Optional[dict[str, Any]]:
        from agent.streams.snapshot import render_jpeg

        pub = self.spec.publish
        jpeg = render_jpeg(frame, dets, pub.snapshot_quality, pub.snapshot_max_width)
        self._last_snapshot = time.monotonic()
        link = self.node.link
        # Once stopping, no snapshot: `stream.stop` clears the retained one after the stop, and a late snapshot
        # (an inference that outlived the join) would bring it back.
        if link is None or not link.connected.is_set() or self._stop.is_set():
            return None
        props = _props("image/jpeg", self.node.config.stream_limits.snapshot_expiry_s, stream_id=self.id,
                       frame=frame_no, ts=round(time.time(), 3), reason=reason,
                       detections=json.dumps(dets, separators=(",", ":")))
        link.client.publish(self.topic_snapshot, jpeg, qos=1, retain=True, properties=props)
        return {"topic": self.topic_snapshot, "bytes": len(jpeg), "frame": frame_no, "detections": dets}

    def latest(self) -> Optional[tuple[np.ndarray, list[dict[str, Any]], int, float]]:
        """The latest processed frame, its detections, frame number and wall time (the HTTP live view reads it)."""
        with self._last_lock:
            return self._last

    def snapshot_now(self) -> Optional[dict[str, Any]]:
        """Publish the latest processed frame (on request); None when no frame was processed yet."""
        with self._last_lock:
            last = self._last
        if last is None:
            return None
        frame, dets, frame_no, _ = last
        return self.publish_snapshot(frame, dets, frame_no, reason="request")

    # -- reporting ------------------------------------------------------------------------------------------

    def stats(self) -> StreamStats:
        state = self.state
        if self._model_error and state == "running":
            state = "failed"
        return StreamStats(
            stream_id=self.id, source=self.spec.source, model=self.spec.model, state=state,
            last_error=self.last_error, reconnects=self.reconnects, frames_captured=self.captured.total,
            frames_processed=self.processed.total, frames_dropped=self.mailbox.dropped,
            frames_skipped_fps=self.skipped_fps_limit, capture_fps=self.captured.per_s(),
            processed_fps=self.processed.per_s(), skipped_fps=self.skipped.per_s(),
            inference_ms=self.inference_ms.percentiles(50, 95), latency_ms=self.latency_ms.percentiles(50, 95),
            events=self.events_started, active_objects=len(self.tracker.active()), started_at=round(self.started_at, 3),
        )

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec.model_dump(mode="json"), "origin": self.origin,
                **self.stats().model_dump(mode="json")}
