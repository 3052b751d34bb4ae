"""Cheap rolling figures for streams and models: event rates over a time window, and latency percentiles."""

from __future__ import annotations

import collections
import threading
import time
from typing import Optional


class Rate:
    """Events per second over the last ``window_s`` seconds (or since creation, when younger)."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self._t: collections.deque[float] = collections.deque()
        self._born = time.monotonic()
        self._lock = threading.Lock()
        self.total = 0

    def add(self, now: Optional[float] = None, n: int = 1) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self.total += n
            for _ in range(n):
                self._t.append(now)
            self._trim(now)

    def _trim(self, now: float) -> None:
        cutoff = now - self.window_s
        while self._t and self._t[0] < cutoff:
            self._t.popleft()

    def per_s(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            span = min(self.window_s, max(now - self._born, 1e-3))
            return round(len(self._t) / span, 2)


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
