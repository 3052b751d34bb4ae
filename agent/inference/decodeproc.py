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
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any, Optional, Union

from agent.inference.config import InferenceConfig
from agent.inference.params import ImageItem
from agent.inference.runproc import RuntimeKey, RuntimeWorker, output_layout, recv, send
from agent.inference.sources import ItemFailure

if TYPE_CHECKING:
    import numpy as np

    from accelerators.base import InferenceResult
    from agent.inference.predict import Prepared
    from models.manifest import InputSpec
    from models.runtime import Pipeline

log = logging.getLogger("cv_worker.infer")

_ITEMSIZE = {"float32": 4, "uint8": 1, "int8": 1}

# Images inferred before the pool compares the stages' times and gives the slower one the CPU first, and how much
# lower the faster one then runs (a nice step of 5: about a third of the CPU weight when both want a core).
PRIORITY_SAMPLE = 32
YIELD_NICE = 5

# Longest wait for an inference process to load its model: when a job asked to wait for it (runtime_mode
# "process"), or after a crash mid-batch (the batch goes on in the agent's process past it).
RUNTIME_LOAD_TIMEOUT_S = 120.0


# -- the worker process ----------------------------------------------------------------------------------------

def _worker_main(conn: Connection) -> None:
    """A decode worker: ``setup`` attaches a job's ring, ``item`` decodes one image into its slot."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C on the agent's terminal: the agent stops us
    from multiprocessing import shared_memory

    import numpy as np

    from agent.inference.predict import decode_image, to_tensor_fast
    from agent.inference.runproc import set_process_name
    from agent.inference.sources import fetch
    from models.preprocess import Transform

    set_process_name("cvw-decode")
    shm: Optional[shared_memory.SharedMemory] = None
    cfg: Optional[InferenceConfig] = None
    spec: Any = None
    slot_bytes = 0
    to_nchw = False
    while True:
        try:
            msg = recv(conn)
        except (EOFError, OSError):
            break  # the agent is gone
        kind = msg[0]
        if kind == "stop":
            break
        if kind == "setup":
            _, cfg, spec, name, slot_bytes, to_nchw = msg
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
            if to_nchw and x.ndim == 4:  # the runtime's own layout (OpenCV's TFLite importer), written in one copy
                x = x.transpose(0, 3, 1, 2)
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
            send(conn, out)
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
            send(self.conn, msg)
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
        # The inference process of the last model run here (agent/inference/runproc.py); touched only by the job
        # holding the pool, and by close().
        self._runtime: Optional[RuntimeWorker] = None
        self.runtime_restarts = 0
        self._nice: dict[int, int] = {}  # worker pid -> the nice value set on it
        self.results_in_shm = 0  # inference results that came back through the output ring (not pickled)

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
        lease = self.try_stream(pipeline, items, depth)
        return None if lease is None else iter(lease)

    def try_stream(self, pipeline: "Pipeline", items: Iterable[ImageItem], depth: int,
                   runtime: Optional[RuntimeKey] = None, wait: bool = False, start: bool = True
                   ) -> Optional["Lease"]:
        """The pool for one job, or None when another job holds it (decode in threads then).

        With ``runtime`` (the job's model, on a CPU device), inference runs in the inference process when it has
        that model loaded (``Lease.inferred``: the stream yields ``(item, Prepared or error, InferenceResult or
        error)``). Otherwise the stream yields ``(item, Prepared or error)`` for the agent's own runtime, and a
        process for ``runtime`` starts loading meanwhile when ``start`` is set, for the next job; ``wait`` waits
        for that load instead. Closing the stream (or exhausting it) hands the pool back."""
        if self._closed or not self._busy.acquire(blocking=False):
            return None
        try:
            self._ensure()
        except Exception as e:
            self._busy.release()
            log.warning("decode worker processes could not start (%s); decoding in threads", e)
            return None
        rt = None
        if runtime is not None:
            try:
                rt = self._runtime_for(runtime, wait, start)
            except Exception as e:  # the batch still runs, in the agent's process
                log.warning("inference process could not start (%s); inference runs in the agent's process", e)
        return Lease(self, pipeline, iter(items), max(1, depth), rt)

    def _runtime_for(self, key: RuntimeKey, wait: bool, start: bool) -> Optional[RuntimeWorker]:
        rt = self._runtime
        if rt is not None and (not rt.key.same(key) or rt.state == "failed" or not rt.proc.is_alive()):
            if rt.state == "failed" and rt.key.same(key) and not wait:
                return None  # this model did not load there: do not retry it at every job
            self._drop_runtime()
            rt = None
        if rt is None:
            if not (start or wait):
                return None
            rt = self._runtime = RuntimeWorker(self._ctx, key)
        return rt if rt.ready(RUNTIME_LOAD_TIMEOUT_S if wait else 0.0) else None

    def _drop_runtime(self) -> None:
        if self._runtime is not None:
            self._runtime.stop()
            self._runtime = None

    def replace_runtime(self, old: RuntimeWorker) -> Optional[RuntimeWorker]:
        """A new inference process for ``old``'s model after ``old`` died; None when it cannot load it."""
        old.kill()
        self.runtime_restarts += 1
        rt = self._runtime = RuntimeWorker(self._ctx, old.key)
        return rt if rt.ready(RUNTIME_LOAD_TIMEOUT_S) else None

    def prioritise(self, slower: Optional[str]) -> None:
        """Give the slower stage ("decode" or "infer") the CPU first: the faster one runs YIELD_NICE lower; None:
        both at the agent's own priority (a batch whose inference runs in the agent).

        On a small CPU the two stages, the agent's threads and the broker compete for the cores; a stage that waits
        in the run queue while the other has time to spare is lost throughput when it is the slower one (measured:
        the OpenCV inference process waited 0.3-0.5 ms per image for a core). Lowering a nice value back needs
        RLIMIT_NICE (the systemd unit sets LimitNICE=+0); without it a stage stays where it was."""
        base = os.getpriority(os.PRIO_PROCESS, 0)
        lower = min(19, base + YIELD_NICE)
        targets = [(w.proc.pid, lower if slower == "infer" else base) for w in self._workers]
        rt = self._runtime
        if rt is not None:
            targets.append((rt.proc.pid, lower if slower == "decode" else base))
        for pid, nice in targets:
            if pid is None or self._nice.get(pid) == nice:
                continue
            try:
                os.setpriority(os.PRIO_PROCESS, pid, nice)
                self._nice[pid] = nice
            except OSError as e:  # not permitted (raising it back without RLIMIT_NICE), or already gone
                log.debug("cannot set the nice value of worker %s to %s: %s", pid, nice, e)
        if slower is not None:
            log.debug("the %s stage is the slower one: it gets the CPU first", slower)

    def runtime_pid(self) -> Optional[int]:
        rt = self._runtime
        return rt.proc.pid if rt is not None and rt.proc.is_alive() else None

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
            self._drop_runtime()
        finally:
            if held:
                self._busy.release()


class Lease:
    """One job's hold on the pool: iterate it once; exhausting or closing it hands the pool back.

    ``inferred``: the stream yields ``(item, Prepared or error, InferenceResult or error)``, inference done in the
    inference process; otherwise ``(item, Prepared or error)`` for the agent's runtime."""

    def __init__(self, pool: DecodePool, pipeline: "Pipeline", items: Iterator[ImageItem], depth: int,
                 runtime: Optional[RuntimeWorker]):
        self.pool = pool
        self.pipeline = pipeline
        self.items = items
        self.depth = depth
        self.runtime = runtime
        self.inferred = runtime is not None
        self._gen: Optional[Iterator[Any]] = None
        self._released = False

    def __iter__(self) -> Iterator[Any]:
        if self._gen is None:
            self._gen = self._stream()
        return self._gen

    def _stream(self) -> Iterator[Any]:
        from multiprocessing import shared_memory

        spec: InputSpec = self.pipeline.manifest.input
        slot_bytes = spec.width * spec.height * 3 * _ITEMSIZE[spec.dtype]
        shm = shared_memory.SharedMemory(create=True, size=slot_bytes * self.depth)
        # With an inference process, the decode workers also convert the tensor to the runtime's layout, so that
        # the process does nothing but run the model.
        staged = self.runtime is not None and getattr(self.pipeline.model, "wants_nchw", False)
        run = _Run(self.pool, self.pipeline, shm, slot_bytes, self.depth, staged)
        try:
            for w in self.pool._workers:
                run.setup(w)
            if self.runtime is not None:
                yield from run.stream_inferred(self.items, self.runtime)
            else:
                self.pool.prioritise(None)  # a previous batch may have left the decode workers yielding
                yield from run.stream(self.items)
        finally:
            run.drain()
            for w in self.pool._workers:
                w.send(("setup", None, None, None, 0, False))  # detach the ring before it is unlinked
            if run.rt is not None:
                run.rt.send(("attach", None))
                run.rt.send(("attach_out", None, {}, 0))
            shm.close()
            shm.unlink()
            if run.out_shm is not None:
                run.out_shm.close()
                run.out_shm.unlink()
            self._release()

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()
        self._release()

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self.pool._busy.release()


class _Run:
    """One job's use of the pool: dispatch within a window of ``depth`` images, answers read back in order."""

    def __init__(self, pool: DecodePool, pipeline: "Pipeline", shm: Any, slot_bytes: int, depth: int,
                 staged: bool = False):
        self.pool = pool
        self.staged = staged
        self.pipeline = pipeline
        self.shm = shm
        self.slot_bytes = slot_bytes
        self.depth = depth
        self.items: dict[int, ImageItem] = {}
        self.attempts: dict[int, int] = {}
        self.answers: dict[int, Any] = {}
        # With an inference process: the process (None once the batch fell back to the agent's runtime), the
        # decoded items waiting for their inference, their inputs' shape and dtype, and the results.
        self.rt: Optional[RuntimeWorker] = None
        self.decoded: dict[int, Union["Prepared", BaseException]] = {}
        self.inputs: dict[int, tuple[Any, str]] = {}
        self.results: dict[int, Union["InferenceResult", BaseException]] = {}
        self.rt_attempts: dict[int, int] = {}
        # Decode (fetch + decode + preprocess) and inference milliseconds, summed, and the images inferred: after a
        # sample the slower stage is given the CPU first (DecodePool.prioritise).
        self.stage_ms = [0.0, 0.0]
        self.stage_n = 0
        self.prioritised = False
        self._poller: Any = None
        self._polled: tuple[int, ...] = ()
        # The inference process's output ring (made at its first result; see runproc) and its slot layout.
        self.out_shm: Any = None
        self.out_layout: dict[str, tuple[tuple[int, ...], str, int]] = {}
        self.out_slot_bytes = 0

    def setup(self, w: _Worker) -> None:
        w.send(("setup", self.pool.cfg, self.pipeline.manifest.input, self.shm.name, self.slot_bytes, self.staged))

    def _dispatch(self, seq: int) -> None:
        w = min(self.pool._workers, key=lambda w: len(w.outstanding))
        w.outstanding.append(seq)
        w.send(("item", seq, seq % self.depth, self.items[seq]))

    def _fill(self, items: Iterator[ImageItem], sent: int, done: int) -> tuple[int, bool]:
        """Dispatch images while a slot is free: the new count sent, and whether ``items`` has more."""
        while sent - done < self.depth:
            try:
                item = next(items)
            except StopIteration:
                return sent, False
            self.items[sent] = item
            self._dispatch(sent)
            sent += 1
        return sent, True

    def stream(self, items: Iterator[ImageItem]) -> Iterator[tuple[ImageItem, Union["Prepared", BaseException]]]:
        sent = done = 0
        more = True
        while True:
            if more:
                sent, more = self._fill(items, sent, done)
            if done == sent:
                return
            msg = self._await(done)
            item = self.items.pop(done)
            self.attempts.pop(done, None)
            yield item, self._prepared(item, msg)  # the slot is copied out: free for the next dispatch
            done += 1

    def stream_inferred(self, items: Iterator[ImageItem], rt: RuntimeWorker
                        ) -> Iterator[tuple[ImageItem, Union["Prepared", BaseException],
                                            Union["InferenceResult", BaseException, None]]]:
        """Decode in the workers, infer in the inference process, in order: a slot stays busy from its image's
        dispatch to its inference's answer, so ``depth`` bounds both stages together."""
        self.rt = rt
        rt.send(("attach", self.shm.name))
        sent = fwd = done = 0
        more = True
        while True:
            if more:
                sent, more = self._fill(items, sent, done)
            while fwd < sent and fwd in self.answers:
                self._forward(fwd, self.answers.pop(fwd))
                fwd += 1
            if not self.prioritised and self.stage_n >= PRIORITY_SAMPLE:
                self.prioritised = True
                decode, infer = self.stage_ms[0] / len(self.pool._workers), self.stage_ms[1]
                self.pool.prioritise("infer" if infer >= decode else "decode")
            if done < fwd and (done in self.results or isinstance(self.decoded[done], BaseException)):
                item = self.items.pop(done)
                self.attempts.pop(done, None)
                self.inputs.pop(done, None)
                yield item, self.decoded.pop(done), self.results.pop(done, None)
                done += 1
                continue
            if done == sent:
                return
            self._pump()

    def _forward(self, seq: int, msg: Any) -> None:
        """A decoded image to the inference process (or, after it was lost, to the agent's runtime)."""
        from agent.inference.predict import Prepared

        item = self.items[seq]
        if msg[0] == "err":
            self.decoded[seq] = ItemFailure(msg[2], msg[3])
            return
        _, _, shape, dtype, ow, oh, tf, fetch_ms, decode_ms = msg
        self.decoded[seq] = Prepared(item, ow, oh, None, tf, None, fetch_ms, decode_ms)
        self.stage_ms[0] += fetch_ms + decode_ms
        self.inputs[seq] = (shape, dtype)
        self._infer(seq)

    def _infer(self, seq: int) -> None:
        shape, dtype = self.inputs[seq]
        rt = self.rt
        if rt is not None:
            rt.outstanding.append(seq)
            rt.send(("run", seq, seq % self.depth, (seq % self.depth) * self.slot_bytes, shape, dtype,
                     self.pipeline.manifest.input.name, self.staged))
            return
        import numpy as np

        from accelerators.base import Staged

        view = np.ndarray(shape, np.dtype(dtype), buffer=self.shm.buf, offset=(seq % self.depth) * self.slot_bytes)
        name = self.pipeline.manifest.input.name
        try:
            feed = Staged({"": view}) if self.staged else ({name: view} if name else view)
            self.results[seq] = self.pipeline.model.infer(feed)
        except Exception as e:
            self.results[seq] = e
        finally:
            del view

    def _pump(self) -> None:
        """Wait for at least one answer (a decoder's or the inference process's), then read all that came."""
        rt = self.rt
        if not (rt is not None and rt.outstanding) and not any(w.outstanding for w in self.pool._workers):
            return
        ready = self._poll()
        for w in list(self.pool._workers):
            died = w.proc.sentinel in ready  # asking is_alive() each time built a selector per call
            if w.conn.fileno() in ready or died:
                try:
                    while w.outstanding and w.conn.poll():
                        msg = recv(w.conn)
                        w.outstanding.remove(msg[1])
                        self.answers[msg[1]] = msg
                    if died and not w.conn.poll():
                        raise EOFError
                except (EOFError, OSError):
                    self._crashed(w)
        if rt is not None and (rt.answers.fileno() in ready or rt.proc.sentinel in ready):
            self._read_runtime(rt, rt.proc.sentinel in ready)

    def _poll(self) -> set[int]:
        """Ready descriptors among the workers' pipes and process sentinels (a sentinel is ready once its process
        has died). One poll object for the run, made again only when a worker was replaced: building one per wait
        was a tenth of the job thread's time."""
        import select

        rt = self.rt
        fds = tuple(fd for w in self.pool._workers for fd in (w.conn.fileno(), w.proc.sentinel))
        if rt is not None:
            fds += (rt.answers.fileno(), rt.proc.sentinel)
        if self._poller is None or self._polled != fds:
            self._poller = select.poll()
            for fd in fds:
                self._poller.register(fd, select.POLLIN)
            self._polled = fds
        return {fd for fd, _ in self._poller.poll()}

    def _read_runtime(self, rt: RuntimeWorker, died: bool) -> None:
        import numpy as np

        from accelerators.base import InferenceResult

        try:
            while rt.outstanding and rt.answers.poll():
                msg = recv(rt.answers)
                seq = rt.outstanding.popleft()  # answered in the order sent
                if msg[0] == "shm":
                    # Copied out now: the slot is written again once this image's input slot is reused.
                    base = (seq % self.depth) * self.out_slot_bytes
                    outputs = {k: np.ndarray(shp, np.dtype(dt), buffer=self.out_shm.buf, offset=base + off).copy()
                               for k, (shp, dt, off) in self.out_layout.items()}
                    self.results[seq] = InferenceResult(outputs, msg[2], rt.key.backend, rt.key.device)
                    self.stage_ms[1] += msg[2]
                    self.stage_n += 1
                    self.pool.results_in_shm += 1
                elif msg[0] == "ok":
                    self.results[seq] = InferenceResult(msg[2], msg[3], rt.key.backend, rt.key.device)
                    self.stage_ms[1] += msg[3]
                    self.stage_n += 1
                    if self.out_shm is None:
                        self._attach_outputs(rt, msg[2])
                else:
                    self.results[seq] = RuntimeFailure(msg[2])
            if died and not rt.answers.poll():
                raise EOFError
        except (EOFError, OSError):
            self._runtime_crashed(rt)

    def _attach_outputs(self, rt: RuntimeWorker, outputs: dict[str, Any]) -> None:
        """An output ring shaped like these outputs, one slot per input slot; the process writes results there."""
        from multiprocessing import shared_memory

        self.out_layout, self.out_slot_bytes = output_layout(outputs)
        self.out_shm = shared_memory.SharedMemory(create=True, size=self.out_slot_bytes * self.depth)
        rt.send(("attach_out", self.out_shm.name, self.out_layout, self.out_slot_bytes))

    def _runtime_crashed(self, rt: RuntimeWorker) -> None:
        lost = list(rt.outstanding)
        rt.proc.join(1)
        code = rt.proc.exitcode
        culprit = lost[0] if lost else None
        if culprit is not None:
            n = self.rt_attempts[culprit] = self.rt_attempts.get(culprit, 0) + 1
            item = self.items[culprit]
            log.warning("inference process died (exit code %s) on %s; %s", code, item.id,
                        "retrying it" if n <= self.pool.crash_retries else "reporting it as inference_crashed")
            if n > self.pool.crash_retries:
                self.decoded[culprit] = ItemFailure(
                    "inference_crashed", f"image {item.id}: the inference runtime crashed on it (exit code {code})")
                lost = lost[1:]
        else:
            log.warning("inference process died (exit code %s) between images", code)
        self.rt = self.pool.replace_runtime(rt)
        if self.rt is None:
            log.warning("no inference process for the rest of this batch: it runs in the agent's process")
        else:
            self.rt.send(("attach", self.shm.name))
            if self.out_shm is not None:
                self.rt.send(("attach_out", self.out_shm.name, self.out_layout, self.out_slot_bytes))
        for seq in lost:  # their slots still hold their inputs: infer them again, in order
            self._infer(seq)

    def _await(self, seq: int) -> Any:
        while seq not in self.answers:
            w = next(w for w in self.pool._workers if seq in w.outstanding)
            ready = wait([w.conn, w.proc.sentinel])
            try:
                if w.conn not in ready and not w.conn.poll():
                    raise EOFError  # exited with nothing left to read
                msg = recv(w.conn)
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
        rt = self.rt
        if rt is not None:
            try:
                while rt.outstanding and rt.answers.poll(max(0.0, limit - time.monotonic())):
                    recv(rt.answers)
                    rt.outstanding.popleft()
            except (EOFError, OSError):
                pass
            if rt.outstanding:  # hung or dead: the next job starts a fresh one
                rt.outstanding.clear()
                self.pool._drop_runtime()
                self.rt = None
        for w in list(self.pool._workers):
            while w.outstanding:
                left = limit - time.monotonic()
                if left <= 0 or not w.conn.poll(left):
                    w.outstanding.clear()
                    self.pool.replace(w)
                    break
                try:
                    msg = recv(w.conn)
                    w.outstanding.remove(msg[1])
                except (EOFError, OSError, ValueError):
                    w.outstanding.clear()
                    self.pool.replace(w)
                    break


class RuntimeFailure(Exception):
    """An image's inference failed in the inference process; the message names the runtime's own error."""

    def __init__(self, detail: tuple[str, str]):
        super().__init__(detail[1])
        self.kind = detail[0]

    def __str__(self) -> str:
        return f"{self.kind}: {self.args[0]}"


def _owned(feed: Any, view: "np.ndarray") -> Any:
    """``feed`` with every array that still points into the shared slot copied out of it."""
    import numpy as np

    if isinstance(feed, np.ndarray):
        return feed.copy() if np.shares_memory(feed, view) else feed
    for k, v in list(feed.items()):
        if isinstance(v, np.ndarray) and np.shares_memory(v, view):
            feed[k] = v.copy()
    return feed
