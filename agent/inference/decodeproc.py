"""Decode workers as processes: fetch, decode and preprocess images in worker processes, tensors back through
shared memory.

Why: the decode stage is the slower one for LiteRT and OpenVINO on a small CPU, and in threads it waits for the
GIL whenever the job's thread or the runtime's thread runs Python (docs/inference.md, "Speed"). In a process of
its own it shares no GIL with the rest of the agent.

How: a persistent pool owned by the node (``Node.decode_pool``), started at the first ``infer`` job and reused;
one job holds it at a time (a concurrent job decodes in threads). Processes come from the ``forkserver`` context,
never ``fork``: the agent has many threads. Each job gets a shared-memory ring of ``depth`` slots, one model input
each; only small metadata (sizes, transform, timings, per-item errors) travels through the pipes. Items come back
in input order. A worker that dies (a native crash on a hostile image, the OOM killer) is replaced; the item it was
working on is retried once on the new worker, then reported as ``decode_crashed``; the batch and the agent go on.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any, Optional, Union

from agent.inference.config import InferenceConfig
from agent.inference.params import ImageItem
from agent.inference.sources import ItemFailure

if TYPE_CHECKING:
    import numpy as np

    from agent.inference.predict import Prepared
    from models.manifest import InputSpec
    from models.runtime import Pipeline

log = logging.getLogger("cv_worker.infer")

_ITEMSIZE = {"float32": 4, "uint8": 1, "int8": 1}


# -- the worker process ----------------------------------------------------------------------------------------

def _worker_main(conn: Connection) -> None:
    """A decode worker: ``setup`` attaches a job's ring, ``item`` decodes one image into its slot."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C on the agent's terminal: the agent stops us
    from multiprocessing import shared_memory

    import numpy as np

    from agent.inference.predict import decode_image, to_tensor_fast
    from agent.inference.sources import fetch
    from models.preprocess import Transform

    shm: Optional[shared_memory.SharedMemory] = None
    cfg: Optional[InferenceConfig] = None
    spec: Any = None
    slot_bytes = 0
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break  # the agent is gone
        kind = msg[0]
        if kind == "stop":
            break
        if kind == "setup":
            _, cfg, spec, name, slot_bytes = msg
            if shm is not None:
                shm.close()
            shm = shared_memory.SharedMemory(name=name) if name else None
            continue
        _, seq, slot, item = msg
        assert cfg is not None and spec is not None and shm is not None
        try:
            t0 = time.perf_counter()
            raw = fetch(item, cfg)
            t1 = time.perf_counter()
            label = item.source if item.data is None else f"image {item.id}"
            img, (ow, oh) = decode_image(raw, cfg, label, (spec.width, spec.height))
            del raw
            x, tf = to_tensor_fast(img, spec)
            rh, rw = img.shape[:2]
            if (rw, rh) != (ow, oh):
                tf = Transform(tf.scale_x * rw / ow, tf.scale_y * rh / oh, tf.pad_x, tf.pad_y, ow, oh, tf.in_w,
                               tf.in_h)
            if x.nbytes > slot_bytes:
                raise ValueError(f"tensor of {x.nbytes} bytes does not fit a {slot_bytes}-byte slot")
            np.ndarray(x.shape, x.dtype, buffer=shm.buf, offset=slot * slot_bytes)[...] = x
            t2 = time.perf_counter()
            out: tuple[Any, ...] = ("ok", seq, x.shape, x.dtype.str, ow, oh, tf, (t1 - t0) * 1000, (t2 - t1) * 1000)
        except ItemFailure as e:
            out = ("err", seq, e.code, e.message)
        except Exception as e:  # any other failure is this item's, as in the thread workers
            out = ("err", seq, "decode_failed", f"{type(e).__name__}: {e}")
        try:
            conn.send(out)
        except (EOFError, OSError):
            break
    if shm is not None:
        shm.close()


# -- the agent's side ------------------------------------------------------------------------------------------

class _Worker:
    def __init__(self, ctx: Any, index: int):
        parent, child = ctx.Pipe(duplex=True)
        self.conn: Connection = parent
        self.proc = ctx.Process(target=_worker_main, args=(child,), name=f"infer-decode-{index}", daemon=True)
        self.proc.start()
        child.close()
        self.outstanding: deque[int] = deque()  # seqs sent and not answered, in the order sent

    def send(self, msg: Any) -> bool:
        try:
            self.conn.send(msg)
            return True
        except (OSError, EOFError, ValueError):
            return False  # dead: noticed and handled when its answer is awaited

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()

    def stop(self, timeout: float) -> None:
        self.send(("stop",))
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()


class DecodePool:
    """Worker processes that decode for one job at a time (``lease``); started on first use, stopped by ``close``."""

    def __init__(self, cfg: InferenceConfig, workers: int, crash_retries: int = 1):
        self.cfg = cfg
        self.size = max(1, workers)
        self.crash_retries = crash_retries
        self._ctx = multiprocessing.get_context("forkserver")
        self._workers: list[_Worker] = []
        self._busy = threading.Lock()  # held by the job using the pool
        self._closed = False
        self.restarts = 0

    def _ensure(self) -> None:
        started = []
        for i in range(len(self._workers), self.size):
            self._workers.append(_Worker(self._ctx, i))
            started.append(self._workers[-1].proc.pid)
        if started:
            log.info("started %d decode worker process(es) (pid %s); images are decoded outside the agent's process",
                     len(started), ", ".join(str(p) for p in started))

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers if w.proc.pid is not None]

    def try_map(self, pipeline: "Pipeline", items: Iterable[ImageItem], depth: int
                ) -> Optional[Iterator[tuple[ImageItem, Union["Prepared", BaseException]]]]:
        """An ordered stream of ``(item, Prepared or the item's error)``, or None when another job holds the pool
        (decode in threads then). Closing the stream (or exhausting it) hands the pool back."""
        if self._closed or not self._busy.acquire(blocking=False):
            return None
        try:
            self._ensure()
        except Exception as e:
            self._busy.release()
            log.warning("decode worker processes could not start (%s); decoding in threads", e)
            return None
        return self._map(pipeline, iter(items), max(1, depth))

    def _map(self, pipeline: "Pipeline", items: Iterator[ImageItem], depth: int
             ) -> Iterator[tuple[ImageItem, Union["Prepared", BaseException]]]:
        from multiprocessing import shared_memory

        spec: InputSpec = pipeline.manifest.input
        slot_bytes = spec.width * spec.height * 3 * _ITEMSIZE[spec.dtype]
        shm = shared_memory.SharedMemory(create=True, size=slot_bytes * depth)
        run = _Run(self, pipeline, shm, slot_bytes, depth)
        try:
            for w in self._workers:
                run.setup(w)
            yield from run.stream(items)
        finally:
            run.drain()
            for w in self._workers:
                w.send(("setup", None, None, None, 0))  # detach the ring before it is unlinked
            shm.close()
            shm.unlink()
            self._busy.release()

    def replace(self, w: _Worker) -> _Worker:
        w.kill()
        i = self._workers.index(w)
        self._workers[i] = _Worker(self._ctx, i)
        self.restarts += 1
        return self._workers[i]

    def close(self, timeout: float = 5.0) -> None:
        self._closed = True
        # A job still streaming finishes its in-flight images first (Node.stop has ended the jobs already).
        held = self._busy.acquire(timeout=timeout)
        try:
            for w in self._workers:
                w.stop(timeout)
            self._workers.clear()
        finally:
            if held:
                self._busy.release()


class _Run:
    """One job's use of the pool: dispatch within a window of ``depth`` images, answers read back in order."""

    def __init__(self, pool: DecodePool, pipeline: "Pipeline", shm: Any, slot_bytes: int, depth: int):
        self.pool = pool
        self.pipeline = pipeline
        self.shm = shm
        self.slot_bytes = slot_bytes
        self.depth = depth
        self.items: dict[int, ImageItem] = {}
        self.attempts: dict[int, int] = {}
        self.answers: dict[int, Any] = {}

    def setup(self, w: _Worker) -> None:
        w.send(("setup", self.pool.cfg, self.pipeline.manifest.input, self.shm.name, self.slot_bytes))

    def _dispatch(self, seq: int) -> None:
        w = min(self.pool._workers, key=lambda w: len(w.outstanding))
        w.outstanding.append(seq)
        w.send(("item", seq, seq % self.depth, self.items[seq]))

    def stream(self, items: Iterator[ImageItem]) -> Iterator[tuple[ImageItem, Union["Prepared", BaseException]]]:
        sent = done = 0
        more = True
        while True:
            while more and sent - done < self.depth:
                try:
                    item = next(items)
                except StopIteration:
                    more = False
                    break
                self.items[sent] = item
                self._dispatch(sent)
                sent += 1
            if done == sent:
                return
            msg = self._await(done)
            item = self.items.pop(done)
            self.attempts.pop(done, None)
            yield item, self._prepared(item, msg)  # the slot is copied out: free for the next dispatch
            done += 1

    def _await(self, seq: int) -> Any:
        while seq not in self.answers:
            w = next(w for w in self.pool._workers if seq in w.outstanding)
            ready = wait([w.conn, w.proc.sentinel])
            try:
                if w.conn not in ready and not w.conn.poll():
                    raise EOFError  # exited with nothing left to read
                msg = w.conn.recv()
            except (EOFError, OSError):
                self._crashed(w)
                continue
            w.outstanding.remove(msg[1])
            self.answers[msg[1]] = msg
        return self.answers.pop(seq)

    def _crashed(self, w: _Worker) -> None:
        lost = list(w.outstanding)
        w.proc.join(1)
        code = w.proc.exitcode
        new = self.pool.replace(w)
        self.setup(new)
        if not lost:
            log.warning("decode worker died (exit code %s) between images; replaced", code)
            return
        # The worker answers in order, so the oldest unanswered item is the one it was decoding.
        culprit = lost[0]
        n = self.attempts[culprit] = self.attempts.get(culprit, 0) + 1
        item = self.items[culprit]
        log.warning("decode worker died (exit code %s) on %s; %s", code, item.id,
                    "retrying it" if n <= self.pool.crash_retries else "reporting it as decode_crashed")
        if n > self.pool.crash_retries:
            self.answers[culprit] = ("err", culprit, "decode_crashed",
                                     f"image {item.id}: the decoder crashed on it (worker exit code {code}); "
                                     "the file may be corrupt or hostile — check it, or re-encode it")
            lost = lost[1:]
        for seq in lost:  # sent to the dead worker but not started: send again, in order
            self._dispatch(seq)

    def _prepared(self, item: ImageItem, msg: Any) -> Union["Prepared", BaseException]:
        import numpy as np

        from agent.inference.predict import Prepared

        if msg[0] == "err":
            return ItemFailure(msg[2], msg[3])
        _, seq, shape, dtype, ow, oh, tf, fetch_ms, decode_ms = msg
        view = np.ndarray(shape, np.dtype(dtype), buffer=self.shm.buf, offset=(seq % self.depth) * self.slot_bytes)
        try:
            spec = self.pipeline.manifest.input
            feed = _owned(self.pipeline.model.stage({spec.name: view} if spec.name else view), view)
        except Exception as e:
            return e
        return Prepared(item, ow, oh, feed, tf, None, fetch_ms, decode_ms)

    def drain(self) -> None:
        """Read the answers still on their way (the stream was left early), so that the next job starts clean; a
        worker that does not answer within the download timeout is replaced."""
        limit = time.monotonic() + self.pool.cfg.download_timeout_s + 5
        for w in list(self.pool._workers):
            while w.outstanding:
                left = limit - time.monotonic()
                if left <= 0 or not w.conn.poll(left):
                    w.outstanding.clear()
                    self.pool.replace(w)
                    break
                try:
                    msg = w.conn.recv()
                    w.outstanding.remove(msg[1])
                except (EOFError, OSError, ValueError):
                    w.outstanding.clear()
                    self.pool.replace(w)
                    break


def _owned(feed: Any, view: "np.ndarray") -> Any:
    """``feed`` with every array that still points into the shared slot copied out of it."""
    import numpy as np

    if isinstance(feed, np.ndarray):
        return feed.copy() if np.shares_memory(feed, view) else feed
    for k, v in list(feed.items()):
        if isinstance(v, np.ndarray) and np.shares_memory(v, view):
            feed[k] = v.copy()
    return feed
