"""An ordered, bounded, parallel map: the stage that keeps inference fed.

Worker threads fetch, decode and preprocess images while the caller's thread runs inference on earlier ones.
cv2 and the runtimes release the GIL, so threads overlap on real cores. At most ``depth`` results exist at a time
(done or in flight), which bounds memory however long the batch is; results come back in input order so that a
chunk boundary is a clean resume point.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, TypeVar, Union

T = TypeVar("T")
R = TypeVar("R")


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
