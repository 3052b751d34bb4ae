"""Ordered, bounded pipeline stages: the machinery that keeps inference fed and never waiting.

``Prefetch`` is a parallel map: worker threads fetch, decode and preprocess images ahead of inference (or, with
``inference.decode_mode`` processes, ``agent.inference.decodeproc.DecodePool`` does it in worker processes). ``Relay``
runs the inference itself on one dedicated thread, so that the job's thread (output decoding, result messages,
durable chunks) works on earlier images meanwhile. cv2 and the runtimes release the GIL, so the stages overlap on
real cores. Each stage holds at most ``depth`` items (done or in flight), which bounds memory however long the batch
is; items come out in input order, so that a chunk boundary is a clean resume point.

Why a thread of its own for the runtime: when it is the slowest stage (OpenCV DNN on a small CPU), every
microsecond of Python on its thread, and every wait for the GIL after a runtime call returns, is lost throughput.
On the job's thread, output decoding, result building and waits for the disk cost it 25-35 % of its images/s.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Generic, Optional, TypeVar, Union

T = TypeVar("T")
R = TypeVar("R")
V = TypeVar("V")


class Prefetch(Generic[T, R]):
    """``for item, result in Prefetch(fn, items)``: ``result`` is ``fn(item)`` or the exception it raised."""

    def __init__(self, fn: Callable[[T], R], items: Iterable[T], workers: int = 1, depth: int = 8):
        self._fn = fn
        self._items = iter(items)
        self._depth = max(1, depth)
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="infer-decode")
        self._pending: deque[tuple[T, Future[R]]] = deque()

    def _fill(self) -> None:
        while len(self._pending) < self._depth:
            try:
                item = next(self._items)
            except StopIteration:
                return
            self._pending.append((item, self._pool.submit(self._fn, item)))

    def __iter__(self) -> Iterator[tuple[T, Union[R, BaseException]]]:
        try:
            self._fill()
            while self._pending:
                item, fut = self._pending.popleft()
                self._fill()  # keep the workers busy while the caller works on this one
                exc = fut.exception()
                yield item, (exc if exc is not None else fut.result())
        finally:
            self.close()

    def close(self) -> None:
        # Queued work is dropped; in-flight work finishes (one image per worker at most).
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "Prefetch[T, R]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Relay(Generic[T, V, R]):
    """``for item, value, result in Relay(begin, end, pairs)``: ``end(begin(value))`` for each ``(item, value)`` of
    an ordered source (a ``Prefetch``), on one thread of its own, in order, at most ``depth`` results ahead of the
    consumer.

    ``result`` is what ``end`` returned or the exception raised; a ``value`` that is itself an exception (the item
    failed upstream) is passed through with ``result`` None. The result of one item is handed over between
    ``begin`` and ``end`` of the next: the consumer it wakes then runs while this thread is inside the runtime
    (GIL released) instead of taking the GIL from it at its next short release (see ``LoadedModel.begin``). The
    source is iterated and closed on the relay's thread; leaving the loop early stops the thread and the source."""

    _END = object()

    def __init__(self, begin: Callable[[V], Any], end: Callable[[Any], R],
                 source: Iterable[tuple[T, Union[V, BaseException]]], depth: int = 4, name: str = "infer-run"):
        self._begin = begin
        self._end = end
        self._source = source
        self._q: "queue.Queue[Any]" = queue.Queue(max(1, depth))
        self._stop = threading.Event()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False

    def _put(self, entry: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        it = iter(self._source)
        done: Optional[tuple[Any, Any, Any]] = None  # the last result, not yet handed over
        try:
            for item, value in it:
                if self._stop.is_set():
                    break
                pending: Any = None
                entry: Optional[tuple[Any, Any, Any]] = None
                if isinstance(value, BaseException):
                    entry = (item, value, None)
                else:
                    try:
                        pending = self._begin(value)
                    except Exception as e:  # one failed item must not end the batch: the consumer reports it
                        entry = (item, value, e)
                if done is not None and not self._put(done):
                    if entry is None:
                        self._end(pending)  # frees the runtime; the result is not wanted any more
                    break
                done = entry
                if done is None:
                    try:
                        done = (item, value, self._end(pending))
                    except Exception as e:
                        done = (item, value, e)
            if done is not None:
                self._put(done)
        except BaseException as e:  # the source itself broke: hand it to the consumer rather than lose it
            self._error = e
        finally:
            _close(it, self._source)
            self._put(self._END)

    def __iter__(self) -> Iterator[tuple[T, Union[V, BaseException], Union[R, BaseException, None]]]:
        if not self._started:
            self._started = True
            self._thread.start()
        try:
            while True:
                entry = self._q.get()
                if entry is self._END:
                    if self._error is not None:
                        raise self._error
                    return
                yield entry
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        if self._started:
            # Unblock the relay if it waits for room in the queue, then wait for it (one item in flight at most).
            while self._thread.is_alive():
                try:
                    self._q.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._thread.join()
        else:
            _close(self._source)

    def __enter__(self) -> "Relay[T, V, R]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close(*objs: Any) -> None:
    """Close an iterator and its iterable (a lease on the decode pool is handed back even when never iterated)."""
    for o in objs:
        close = getattr(o, "close", None)
        if close is not None:
            close()
