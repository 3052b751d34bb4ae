"""The inference runtime in a process of its own, fed from the decode workers' shared-memory ring.

Why: on a small CPU the agent's process holds a GIL that the runtime's thread must take back after every call into
the runtime. The job's thread (output decoding, result items), the state committer and the MQTT threads run Python
meanwhile, so the runtime thread waited for them and ran 15-25 % below the runtime's own speed whenever inference
was the slower stage (OpenCV DNN; docs/inference.md, "Speed"). In a process whose only Python is a short loop
around the runtime call, it runs at the runtime's own speed.

What it costs: a second copy of the model in memory while the process is kept (it is kept for the next job of the
same model version, and replaced when another model or version comes), and a few tens of microseconds per image
to hand the input slot over and the outputs back. Only models on a CPU device run here: an EdgeTPU or a Movidius
stick is opened by one process at a time, and that is the agent.

Protocol: commands on one pipe (``load``, ``attach`` a job's input ring, ``attach_out`` its output ring, ``run`` one
slot, ``stop``), answers on another (``ready``/``error`` after a load; per image, in order, ``shm`` when the outputs
are in the output ring, ``ok`` with the outputs pickled, or ``err``). The output ring is made by the agent once the
first result shows the outputs' shapes; results that do not fit it (dynamic shapes) still come pickled. Unpickling
tens of kB of outputs per image was a quarter of the job thread's time. The answer pipe is enlarged so that several
answers wait there without blocking the runtime while the agent is busy.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections import deque
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple, Optional

log = logging.getLogger("cv_worker.infer")

# 1 MiB: Linux's default ceiling for an unprivileged process (/proc/sys/fs/pipe-max-size).
_PIPE_BYTES = 1 << 20


class RuntimeKey(NamedTuple):
    """What a runtime process has loaded: a model file on one backend and device, with the backend's settings."""

    backend: str
    device: str
    path: str
    config: Any  # the backend's pydantic config section (picklable)

    def same(self, other: "RuntimeKey") -> bool:
        return (self.backend, self.device, self.path, self.config) == (other.backend, other.device, other.path,
                                                                      other.config)

    def describe(self) -> str:
        return f"{Path(self.path).name} on {self.backend}:{self.device}"


def set_process_name(name: str) -> None:
    """The name ``ps``, ``top`` and the journal show for a worker (Linux ``comm``, 15 bytes at most)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15] + b"\0", 0, 0, 0)  # PR_SET_NAME
    except Exception:  # noqa: S110 - a cosmetic nicety: other platforms keep the interpreter's name
        pass


def send(conn: Connection, msg: Any) -> None:
    """A message to or from a worker: plain pickle (multiprocessing's own pickler builds a reducer table per message,
    a few microseconds of the job's thread per image; nothing sent here needs it)."""
    conn.send_bytes(pickle.dumps(msg, pickle.HIGHEST_PROTOCOL))


def recv(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def _grow_pipe(conn: Connection) -> None:
    try:
        import fcntl

        fcntl.fcntl(conn.fileno(), 1031, _PIPE_BYTES)  # F_SETPIPE_SZ
    except OSError:
        pass  # the default 64 kB still works; the runtime then waits for the agent a little more often


# -- the runtime process ---------------------------------------------------------------------------------------

def _runtime_main(commands: Connection, answers: Connection) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C on the agent's terminal: the agent stops us
    set_process_name("cvw-infer")
    from multiprocessing import shared_memory

    import numpy as np

    from accelerators.base import Staged

    model: Any = None
    shm: Optional[shared_memory.SharedMemory] = None
    out_shm: Optional[shared_memory.SharedMemory] = None
    out_layout: dict[str, tuple[tuple[int, ...], str, int]] = {}  # name -> shape, dtype, offset in a slot
    out_slot_bytes = 0
    while True:
        try:
            msg = recv(commands)
        except (EOFError, OSError):
            break  # the agent is gone
        kind = msg[0]
        if kind == "stop":
            break
        try:
            if kind == "run":
                _, seq, slot, offset, shape, dtype, name, staged = msg
                view = np.ndarray(shape, np.dtype(dtype), buffer=shm.buf, offset=offset)  # type: ignore[union-attr]
                try:
                    # staged: the decode worker already wrote the runtime's own layout (LoadedModel.wants_nchw)
                    res = model.infer(Staged({"": view}) if staged else ({name: view} if name else view))
                    out: tuple[Any, ...] = ("ok", seq, res.outputs, res.infer_ms)
                    if out_shm is not None and _fits(res.outputs, out_layout):
                        base = slot * out_slot_bytes
                        for k, arr in res.outputs.items():
                            shp, dt, off = out_layout[k]
                            np.ndarray(shp, np.dtype(dt), buffer=out_shm.buf, offset=base + off)[...] = arr
                        out = ("shm", seq, res.infer_ms)
                except Exception as e:  # this image's failure; the next one is tried as usual
                    out = ("err", seq, (type(e).__name__, str(e)))
                del view  # the ring can only be detached once no array points into it
                send(answers, out)
            elif kind == "attach_out":
                if out_shm is not None:
                    out_shm.close()
                _, out_name, out_layout, out_slot_bytes = msg
                out_shm = shared_memory.SharedMemory(name=out_name) if out_name else None
            elif kind == "attach":
                if shm is not None:
                    shm.close()
                shm = shared_memory.SharedMemory(name=msg[1]) if msg[1] else None
            elif kind == "load":
                _, key = msg
                if model is not None:
                    model.close()
                    model = None
                try:
                    from accelerators.registry import backend_class

                    t0 = time.perf_counter()
                    model = backend_class(key.backend)(key.config).load(Path(key.path), key.device)
                    send(answers, ("ready", (time.perf_counter() - t0) * 1000))
                except Exception as e:
                    send(answers, ("error", f"{type(e).__name__}: {e}"))
        except (EOFError, OSError, BrokenPipeError):
            break
    if shm is not None:
        shm.close()
    if out_shm is not None:
        out_shm.close()


def _fits(outputs: dict[str, Any], layout: dict[str, tuple[tuple[int, ...], str, int]]) -> bool:
    """The outputs have exactly the names, shapes and dtypes of the output ring's layout."""
    return outputs.keys() == layout.keys() and all(
        tuple(a.shape) == layout[k][0] and a.dtype.str == layout[k][1] for k, a in outputs.items())


def output_layout(outputs: dict[str, Any]) -> tuple[dict[str, tuple[tuple[int, ...], str, int]], int]:
    """A slot layout for outputs like these (64-byte aligned), and the slot's size."""
    layout, off = {}, 0
    for k, a in outputs.items():
        layout[k] = (tuple(a.shape), a.dtype.str, off)
        off += -(-a.nbytes // 64) * 64
    return layout, max(off, 64)


# -- the agent's side ------------------------------------------------------------------------------------------

class RuntimeWorker:
    """The agent's handle on one runtime process: started and loading as soon as it is made."""

    def __init__(self, ctx: Any, key: RuntimeKey):
        self.key = key
        cmd_r, self.commands = ctx.Pipe(duplex=False)
        self.answers, ans_w = ctx.Pipe(duplex=False)
        _grow_pipe(ans_w)
        self.proc = ctx.Process(target=_runtime_main, args=(cmd_r, ans_w), name="cvw-infer", daemon=True)
        self.proc.start()
        cmd_r.close()
        ans_w.close()
        self.state = "loading"  # -> ready | failed
        self.error: Optional[str] = None
        self.outstanding: deque[int] = deque()  # seqs sent and not answered, in order
        self._t0 = time.monotonic()
        self.send(("load", key))

    def send(self, msg: Any) -> bool:
        try:
            send(self.commands, msg)
            return True
        except (OSError, EOFError, ValueError):
            return False  # dead: noticed when its answer is awaited

    def ready(self, timeout: float = 0.0) -> bool:
        """True once the model is loaded; waits up to ``timeout`` seconds for the load to finish."""
        if self.state == "loading":
            try:
                if self.answers.poll(timeout):
                    kind, detail = recv(self.answers)
                    if kind == "ready":
                        self.state = "ready"
                        log.info("inference process (pid %s) loaded %s in %.0f ms; batches of this model run there",
                                 self.proc.pid, self.key.describe(), detail)
                    else:
                        self.state, self.error = "failed", str(detail)
                elif not self.proc.is_alive():
                    self.state, self.error = "failed", f"the process exited (code {self.proc.exitcode}) while loading"
            except (EOFError, OSError):
                self.state, self.error = "failed", f"the process exited (code {self.proc.exitcode}) while loading"
            if self.state == "failed":
                log.warning("inference process could not load %s (%s); batches run in the agent's process",
                            self.key.describe(), self.error)
        return self.state == "ready"

    def stop(self, timeout: float = 5.0) -> None:
        self.send(("stop",))
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.commands.close()
        self.answers.close()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.commands.close()
        self.answers.close()
