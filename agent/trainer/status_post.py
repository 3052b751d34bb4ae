"""POSTs a job's progress to its `status` URL from a thread of its own, so a slow receiver never slows
training. Routine updates are rate-limited (and a newer one replaces one not yet sent); epoch ends and the last
message are always sent, in order."""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Optional

log = logging.getLogger("cv_worker.trainer.status")


class StatusPoster:
    def __init__(self, url: str, timeout_s: float, interval_s: float):
        import requests

        self.url = url
        self.timeout_s = timeout_s
        self.interval_s = interval_s
        self.sent = 0
        self.errors = 0
        self.last_error: Optional[str] = None
        self._session = requests.Session()
        self._q: "collections.deque[dict[str, Any]]" = collections.deque()
        self._pending: Optional[dict[str, Any]] = None  # the latest routine update not yet queued
        self._last_queued = 0.0
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="status-post", daemon=True)
        self._thread.start()

    def post(self, msg: dict[str, Any], force: bool = False) -> None:
        with self._cond:
            t = time.monotonic()
            if force or t - self._last_queued >= self.interval_s:
                self._pending = None
                self._q.append(msg)
                self._last_queued = t
                self._cond.notify()
            else:
                self._pending = msg

    def close(self, final: dict[str, Any], wait_s: float = 15.0) -> None:
        """Send ``final`` after everything queued, then stop (waiting at most ``wait_s``)."""
        with self._cond:
            self._pending = None
            self._q.append(final)
            self._closing = True
            self._cond.notify()
        self._thread.join(wait_s)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._q and not self._closing:
                    # A routine update that waited for its turn goes out once the interval has passed.
                    if self._pending is not None:
                        left = self.interval_s - (time.monotonic() - self._last_queued)
                        if left <= 0:
                            self._q.append(self._pending)
                            self._pending = None
                            self._last_queued = time.monotonic()
                            break
                        self._cond.wait(left)
                    else:
                        self._cond.wait()
                if not self._q:
                    return
                msg = self._q.popleft()
            self._send(msg)

    def _send(self, msg: dict[str, Any]) -> None:
        import requests

        try:
            r = self._session.post(self.url, json=msg, timeout=(min(5.0, self.timeout_s), self.timeout_s))
            if r.status_code >= 300:
                raise OSError(f"HTTP {r.status_code}")
            self.sent += 1
        except (requests.RequestException, OSError) as e:
            self.errors += 1
            if self.last_error is None:  # once per job in the log; the count goes into the result
                log.warning("progress POST to %s failed: %s", self.url, e)
            self.last_error = f"{type(e).__name__}: {e}"
