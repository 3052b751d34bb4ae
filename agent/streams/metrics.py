"""Cheap rolling figures for streams and models: event rates over a time window, and latency percentiles."""

from __future__ import annotations

import collections
import threading
import time
from typing import Optional


class Rate:
    """Events per second over the last ``window_s`` seconds (or since creation, when younger).

    Counted in ``BUCKETS`` time slices rather than one timestamp per event: memory stays the same whatever the
    rate (a network source can deliver thousands of tiny frames a second), at the cost of the oldest slice being
    counted whole (1% of the window).
    """

    BUCKETS = 100

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self._width = window_s / self.BUCKETS
        # [slice number, count], oldest first; maxlen is the hard bound, _trim the exact one.
        self._slices: collections.deque[list[int]] = collections.deque(maxlen=self.BUCKETS + 1)
        self._born = time.monotonic()
        self._lock = threading.Lock()
        self.total = 0

    def add(self, now: Optional[float] = None, n: int = 1) -> None:
        now = time.monotonic() if now is None else now
        idx = int(now // self._width)
        with self._lock:
            self.total += n
            # Callers on two threads may pass slightly older times (a frame's capture time): they count in the
            # newest slice rather than reorder the slices.
            if self._slices and idx <= self._slices[-1][0]:
                self._slices[-1][1] += n
            else:
                self._slices.append([idx, n])
            self._trim(now)

    def _trim(self, now: float) -> None:
        oldest = int((now - self.window_s) // self._width)
        while self._slices and self._slices[0][0] < oldest:
            self._slices.popleft()

    def per_s(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            span = min(self.window_s, max(now - self._born, 1e-3))
            return round(sum(c for _, c in self._slices) / span, 2)


class Samples:
    """The last ``size`` values of a measurement (ms), with percentiles."""

    def __init__(self, size: int = 600):
        self._v: collections.deque[float] = collections.deque(maxlen=size)
        self._lock = threading.Lock()
        self.count = 0

    def add(self, value: float) -> None:
        with self._lock:
            self._v.append(value)
            self.count += 1

    def percentiles(self, *ps: float) -> dict[str, Optional[float]]:
        with self._lock:
            vals = sorted(self._v)
        out: dict[str, Optional[float]] = {}
        for p in ps:
            key = f"p{int(p)}"
            if not vals:
                out[key] = None
            else:
                out[key] = round(vals[min(len(vals) - 1, int(round(p / 100 * (len(vals) - 1))))], 2)
        return out

    def values(self) -> list[float]:
        with self._lock:
            return list(self._v)
