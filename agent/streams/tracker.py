"""A small IoU tracker that turns per-frame detections into object events (start / update / end).

Greedy matching by IoU within a label is enough for the slow-moving objects of a fixed camera, and costs nothing
next to the model. A track becomes an *event* after ``min_hits`` frames (so a one-frame false positive does not
alert anyone), sends ``update`` when its box moved or its best score rose noticeably, and ``end`` once it has
not been seen for ``end_after_s``. At most ``max_tracks`` tracks are kept: the state of a stream that runs for
months must not grow with what its model sees.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from agent.streams.config import TrackerOptions

Box = tuple[float, float, float, float]


def iou(a: Box, b: Box) -> float:
    ix1, iy1 = max(a[0], b[0]), max(a[1], b[1])
    ix2, iy2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, ix2 - ix1) * max(0.0, iy2 - iy1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class Track:
    label: str
    box: Box
    score: float
    first_seen: float
    last_seen: float
    first_frame: int
    last_frame: int
    hits: int = 1
    best_score: float = 0.0
    best_box: Box = (0.0, 0.0, 0.0, 0.0)
    event_id: Optional[str] = None  # set once the track is reported (start sent)
    published_box: Optional[Box] = None
    published_score: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrackEvent:
    kind: str  # start | update | end
    track: Track
    ts: float
    frame: int

    def payload(self) -> dict[str, Any]:
        t = self.track
        return {
            "event": self.kind, "event_id": t.event_id, "label": t.label,
            "score": round(t.best_score, 4), "box": [round(v, 1) for v in t.best_box],
            "last_box": [round(v, 1) for v in t.box], "last_score": round(t.score, 4),
            "first_seen": round(t.first_seen, 3), "last_seen": round(t.last_seen, 3),
            "duration_s": round(t.last_seen - t.first_seen, 3), "frames": t.hits, "frame": self.frame,
            "ts": round(self.ts, 3),
        }


class IouTracker:
    def __init__(self, options: TrackerOptions):
        self.opt = options
        self.tracks: list[Track] = []

    def update(self, detections: list[tuple[str, float, Box]], now: float, frame: int) -> list[TrackEvent]:
        """Feed one processed frame's detections (label, score, box); returns the events it caused."""
        events: list[TrackEvent] = []
        if len(detections) > self.opt.max_tracks:
            # More objects than the tracker may hold: the surest ones. Also bounds the pairs below (tracks x dets).
            detections = sorted(detections, key=lambda d: d[1], reverse=True)[:self.opt.max_tracks]
        # Candidate pairs, best IoU first: greedy one-to-one assignment.
        pairs = sorted(
            ((iou(t.box, d[2]), ti, di) for ti, t in enumerate(self.tracks) for di, d in enumerate(detections)
             if t.label == d[0]),
            reverse=True,
        )
        used_t: set[int] = set()
        used_d: set[int] = set()
        for ov, ti, di in pairs:
            if ov < self.opt.iou_match or ti in used_t or di in used_d:
                continue
            used_t.add(ti)
            used_d.add(di)
            ev = self._hit(self.tracks[ti], detections[di], now, frame)
            if ev is not None:
                events.append(ev)
        for di, (label, score, box) in enumerate(detections):
            if di in used_d:
                continue
            t = Track(label, box, score, now, now, frame, frame, best_score=score, best_box=box)
            self.tracks.append(t)
            if self.opt.min_hits <= 1:
                events.append(self._start(t, now, frame))
        events += self.expire(now, frame)
        events += self._evict(now, frame)
        return events

    def _evict(self, now: float, frame: int) -> list[TrackEvent]:
        """Drop the tracks unseen longest (never-reported ones first among equals) beyond ``max_tracks``.

        This frame's tracks all have ``last_seen == now`` and number at most ``max_tracks`` (the detections were
        cut to it), so only older tracks go: an object that is still in view is never dropped for a new one.
        """
        excess = len(self.tracks) - self.opt.max_tracks
        if excess <= 0:
            return []
        drop = {id(t) for t in sorted(self.tracks, key=lambda t: (t.last_seen, t.event_id is not None))[:excess]}
        events = [TrackEvent("end", t, now, frame) for t in self.tracks if id(t) in drop and t.event_id is not None]
        self.tracks = [t for t in self.tracks if id(t) not in drop]
        return events

    def expire(self, now: float, frame: int) -> list[TrackEvent]:
        """End the tracks not seen for ``end_after_s``; also called when no frames arrive (source down)."""
        events: list[TrackEvent] = []
        keep: list[Track] = []
        for t in self.tracks:
            if now - t.last_seen >= self.opt.end_after_s:
                if t.event_id is not None:
                    events.append(TrackEvent("end", t, now, frame))
            else:
                keep.append(t)
        self.tracks = keep
        return events

    def end_all(self, now: float, frame: int) -> list[TrackEvent]:
        events = [TrackEvent("end", t, now, frame) for t in self.tracks if t.event_id is not None]
        self.tracks = []
        return events

    def active(self) -> list[Track]:
        return [t for t in self.tracks if t.event_id is not None]

    def _start(self, t: Track, now: float, frame: int) -> TrackEvent:
        t.event_id = uuid.uuid4().hex[:16]
        t.published_box, t.published_score = t.best_box, t.best_score
        return TrackEvent("start", t, now, frame)

    def _hit(self, t: Track, det: tuple[str, float, Box], now: float, frame: int) -> Optional[TrackEvent]:
        _, score, box = det
        t.box, t.score, t.last_seen, t.last_frame = box, score, now, frame
        t.hits += 1
        if score > t.best_score:
            t.best_score, t.best_box = score, box
        if t.event_id is None:
            return self._start(t, now, frame) if t.hits >= self.opt.min_hits else None
        moved = t.published_box is None or iou(t.published_box, box) < self.opt.update_iou
        better = t.best_score - t.published_score >= self.opt.update_score_delta
        if moved or better:
            t.published_box, t.published_score = box, t.best_score
            return TrackEvent("update", t, now, frame)
        return None
