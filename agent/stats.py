"""``N/stats``: the node's runtime analysis — streams, models, CPU, memory, disk, SoC temperature, uptime, jobs.

Published every ``[stats] interval_s`` (default 30 s) and on a `node.stats` request. System figures come from
/proc and /sys directly (what psutil would read), so the agent needs no extra package on a Pi.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import logging
import os
import shutil
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from agent.streams.messages import ModelStats, NodeStats, StorageRemoved, StorageStats
from agent.streams.metrics import Rate, Samples

if TYPE_CHECKING:
    from agent.node import Node

log = logging.getLogger("cv_worker.stats")


class ModelMetrics:
    """Per-model inference counts, latency and load, fed by whoever runs a model (streams, inference jobs)."""

    WINDOW_S = 10.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lat: dict[str, Samples] = {}
        self._rate: dict[str, Rate] = {}
        self._busy: dict[str, collections.deque[tuple[float, float]]] = {}
        self._listeners: list[Callable[[str, str, float], None]] = []

    def add_listener(self, fn: Callable[[str, str, float], None]) -> None:
        """``fn(model, backend, ms)`` after every recorded inference, on the inferring thread (e.g. the HTTP API's
        Prometheus histograms); keep it short."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[str, str, float], None]) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def record(self, model: str, ms: float, backend: Optional[str] = None) -> None:
        """One inference of ``model`` that took ``ms`` in the runtime (``backend``: litert, openvino...)."""
        for fn in list(self._listeners):
            try:
                fn(model, backend or "unknown", ms)
            except Exception:  # metrics must never fail an inference
                log.exception("model metrics listener failed")
        now = time.monotonic()
        with self._lock:
            if model not in self._lat:
                self._lat[model], self._rate[model] = Samples(), Rate(self.WINDOW_S)
                self._busy[model] = collections.deque()
            busy = self._busy[model]
            busy.append((now, ms))
            while busy and busy[0][0] < now - self.WINDOW_S:
                busy.popleft()
        self._lat[model].add(ms)
        self._rate[model].add(now)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        out: dict[str, dict[str, Any]] = {}
        with self._lock:
            names = list(self._lat)
            busy_ms = {n: sum(ms for t, ms in self._busy[n] if t >= now - self.WINDOW_S) for n in names}
        for n in names:
            out[n] = {"inferences": self._rate[n].total, "per_s": self._rate[n].per_s(),
                      "busy": round(min(1.0, busy_ms[n] / 1000 / self.WINDOW_S), 3),
                      "latency_ms": self._lat[n].percentiles(50, 95)}
        return out


MODEL_METRICS = ModelMetrics()


class SystemSampler:
    """CPU use between two samples (whole machine from /proc/stat, this process from os.times)."""

    def __init__(self) -> None:
        self._cpu = self._read_cpu()
        self._proc = (time.monotonic(), self._proc_cpu())

    @staticmethod
    def _read_cpu() -> Optional[tuple[float, float]]:
        try:
            with open("/proc/stat") as f:
                parts = [float(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = parts[3] + (parts[4] if len(parts) > 4 else 0.0)  # idle + iowait
        return sum(parts), idle

    @staticmethod
    def _proc_cpu() -> float:
        t = os.times()
        return t.user + t.system

    def cpu_percent(self) -> Optional[float]:
        cur = self._read_cpu()
        prev, self._cpu = self._cpu, cur
        if cur is None or prev is None or cur[0] <= prev[0]:
            return None
        total, idle = cur[0] - prev[0], cur[1] - prev[1]
        return round(100.0 * (1 - idle / total), 1)

    def process_cpu_percent(self) -> Optional[float]:
        now, cpu = time.monotonic(), self._proc_cpu()
        (t0, c0), self._proc = self._proc, (now, cpu)
        return round(100.0 * (cpu - c0) / (now - t0), 1) if now > t0 else None


def memory() -> dict[str, Any]:
    info: dict[str, float] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                info[k] = float(v.split()[0]) / 1024  # kB -> MB
    except (OSError, ValueError, IndexError):
        pass
    out: dict[str, Any] = {}
    if "MemTotal" in info:
        total, avail = info["MemTotal"], info.get("MemAvailable", info.get("MemFree", 0.0))
        out = {"total_mb": round(total, 1), "available_mb": round(avail, 1),
               "used_percent": round(100 * (1 - avail / total), 1) if total else None}
    try:
        with open("/proc/self/statm") as f:
            out["process_rss_mb"] = round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return out


def disk(path: str) -> dict[str, Any]:
    try:
        u = shutil.disk_usage(path)
    except OSError:
        return {}
    return {"path": path, "total_mb": round(u.total / 2**20, 1), "free_mb": round(u.free / 2**20, 1),
            "used_percent": round(100 * u.used / u.total, 1) if u.total else None}


def storage_stats(node: "Node") -> StorageStats:
    """From what the state, the retention and the disk guard keep up to date: a statvfs, one scan of the results
    and outputs directories (a finished job's outputs are measured once), no walk of the journal."""
    st, disk_reading, kept = node.state.storage_figures(), node.disk.reading(), node.retention.snapshot()
    return StorageStats(
        level=disk_reading.level, free_bytes=disk_reading.free_bytes, reserve_bytes=disk_reading.reserve_bytes,
        write_error=st.last_write_error, snapshot_bytes=st.snapshot_bytes, journal_bytes=st.journal_bytes,
        spool_files=st.spool_files, spool_bytes=st.spool_bytes, jobs=st.jobs, jobs_bytes=st.jobs_bytes,
        tombstones=st.tombstones, tombstone_bytes=st.tombstone_bytes, result_logs=kept.result_logs,
        results_bytes=kept.results_bytes, outputs_jobs=kept.outputs_jobs, outputs_files=kept.outputs_files,
        outputs_bytes=kept.outputs_bytes, removed=StorageRemoved(**dataclasses.asdict(kept.removed)))


def soc_temp_c(root: str = "/sys/class/thermal") -> Optional[float]:
    """The SoC temperature: on a Pi thermal_zone0 is the `cpu-thermal` zone; elsewhere prefer a CPU/SoC zone."""
    zones = []
    for zone in sorted(glob.glob(os.path.join(root, "thermal_zone*"))):
        try:
            with open(os.path.join(zone, "temp")) as f:
                milli = float(f.read().strip())
            with open(os.path.join(zone, "type")) as f:
                kind = f.read().strip().lower()
        except (OSError, ValueError):
            continue
        zones.append((kind, milli / 1000.0))
    if not zones:
        return None
    for kind, c in zones:
        if any(k in kind for k in ("cpu", "soc", "x86_pkg")):
            return round(c, 1)
    return round(zones[0][1], 1)


def system_uptime_s() -> Optional[float]:
    try:
        with open("/proc/uptime") as f:
            return round(float(f.read().split()[0]), 1)
    except (OSError, ValueError, IndexError):
        return None


class StatsPublisher:
    def __init__(self, node: "Node"):
        self.node = node
        self.config = node.config.stats
        self.sampler = SystemSampler()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self.topic = f"{node.topics.node}/stats"

    def start(self) -> None:
        if not self.config.enabled:
            return
        self._thread = threading.Thread(target=self._loop, name="stats", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(3)

    def _loop(self) -> None:
        while not self._stop.wait(self.config.interval_s):
            try:
                self.publish(self.collect())
            except Exception:  # figures are best-effort; the loop must survive e.g. a vanished disk
                log.exception("stats failed")

    def _models(self) -> dict[str, ModelStats]:
        out: dict[str, ModelStats] = {}
        metrics = MODEL_METRICS.snapshot()
        mm = getattr(self.node, "_model_manager", None)  # not the property: stats must not load the runtimes
        loaded = mm.loaded() if mm is not None else {}
        for name in sorted(set(loaded) | set(metrics)):
            fields: dict[str, Any] = dict(metrics.get(name, {}))
            if name in loaded and mm is not None:
                try:
                    with mm.acquire(name) as p:
                        fields.update(version=p.version, backend=p.model.backend, device=p.model.device,
                                      load_ms=round(float(p.model.load_ms), 1))
                except Exception:
                    fields["version"] = loaded[name]
            out[name] = ModelStats(**fields)
        return out

    def collect(self) -> NodeStats:
        node = self.node
        with self._lock:  # the interval loop and a node.stats job may sample at once
            cpu, pcpu = self.sampler.cpu_percent(), self.sampler.process_cpu_percent()
        counts = node.state.job_state_counts()
        streams = getattr(node, "streams", None)
        try:
            load = [round(x, 2) for x in os.getloadavg()]
        except OSError:
            load = None
        return NodeStats(
            node_id=node.node_id, ts=round(time.time(), 3), uptime_s=round(time.time() - node.started_at, 1),
            system_uptime_s=system_uptime_s(), cpu_percent=cpu, cpu_count=os.cpu_count() or 1, load_avg=load,
            process_cpu_percent=pcpu, memory=memory(), disk=disk(str(node.config.state_dir)), soc_temp_c=soc_temp_c(),
            jobs={"by_state": counts, "running": len(node.engine.running_ids()), "queued": node.engine.queue_depth()},
            streams={s.id: s.stats() for s in streams.all()} if streams is not None else {},
            models=self._models(), storage=self._storage(),
        )

    def _storage(self) -> Optional[StorageStats]:
        try:
            return storage_stats(self.node)
        except Exception:  # the other figures still go out
            log.exception("storage figures failed")
            return None

    def publish(self, stats: NodeStats) -> bool:
        link = self.node.link
        if link is None or not link.connected.is_set():
            return False
        link.publish_now(self.topic, stats.model_dump_json().encode(), retain=self.config.retain)
        return True
