"""The running agent: wires config, state, MQTT, intake, engine and outbox together and runs until stopped."""

from __future__ import annotations

import json
import logging
import os
import platform
import signal
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Optional

import paho.mqtt.client as mqtt

from accelerators.detect import list_accelerators
from agent import __version__
from agent.config import AgentConfig
from agent.discovery import Advertiser, find_broker, format_endpoint
from agent.diskguard import MB, DiskGuard, DiskLimits, DiskReading
from agent.engine import JobEngine
from agent.intake import Intake
from agent.jobs import registry
from agent.mqtt import MqttLink
from agent.outbox import Outbox
from agent.protocol import ErrorCode, ErrorInfo, JobState, NodeError, NodeStatus, Topics, now
from agent.retention import Retention, RetentionLimits
from agent.state import StateStore
from agent.stats import StatsPublisher
from agent.storage import atomic_write_bytes
from agent.streams.manager import StreamManager
from models.runtime import ModelManager
from models.store import ModelStore

if TYPE_CHECKING:
    from agent.httpapi.service import HttpService
    from agent.inference.decodeproc import DecodePool

log = logging.getLogger("cv_worker")


class Node:
    realm = registry.NODE  # the job types this process runs (a build peer runs registry.TRAINER ones)
    _runtime_error: Optional[str] = None  # why runtime.json could not be written last time

    def __init__(self, config: AgentConfig):
        self.config = config
        self.node_id = config.node_id
        self.topics = Topics(config.mqtt.topic_prefix, self.node_id)
        self.boot_id = uuid.uuid4().hex
        self.started_at = time.time()
        self._open_state()
        self.outbox = Outbox(self.state)
        self.engine = JobEngine(self)
        self.intake = Intake(self)
        self.link: MqttLink = None  # type: ignore[assignment]  # created in start(): it needs the broker address
        self._stop = threading.Event()
        self._notify: Callable[..., None] = lambda **kw: None
        self.model_store = ModelStore(config.models.resolve_dir(config.state_dir), config.models)
        self._model_manager: Optional[ModelManager] = None
        self._decode_pool: Optional["DecodePool"] = None
        self._decode_pool_lock = threading.Lock()
        self._accelerators: list[dict[str, Any]] = []
        self.advertiser: Optional[Advertiser] = None
        self.streams = StreamManager(self)
        self.stats = StatsPublisher(self)
        self.http: Optional["HttpService"] = None
        if config.http.enabled:
            from agent.httpapi.service import HttpService  # stdlib only; FastAPI loads on the server's thread

            self.http = HttpService(self)
        registry.load_builtin()

    def _open_state(self) -> None:
        """The state store, the retention of what jobs leave on disk, and the disk guard that watches both."""
        cfg = self.config
        st = cfg.storage
        self.state = StateStore(cfg.state_dir, spool_min_bytes=st.spool_min_kb * 1024)
        self.retention = Retention(self.state, cfg.inference.resolve_outputs_dir(cfg.state_dir), RetentionLimits(
            results_max_bytes=int(st.results_max_mb * MB), outputs_max_bytes=int(st.outputs_max_mb * MB),
            outputs_max_age_s=st.outputs_days * 86400))
        self.disk = DiskGuard(cfg.state_dir, DiskLimits(
            free_low_bytes=int(st.free_low_mb * MB), free_resume_bytes=int(st.free_resume_mb * MB),
            reserve_bytes=int(st.reserve_mb * MB), check_interval_s=st.check_interval_s),
            free_space=self.retention.free, on_change=self._disk_changed)
        self.state.add_write_error_listener(self.disk.report)
        self._disk_refusing = False
        self._disk_lock = threading.Lock()

    def _disk_changed(self, reading: DiskReading) -> None:
        # One N/errors message each time the node starts refusing work, not for low -> full and back. The guard's
        # thread and a failing writer's may both get here.
        refusing = reading.level != "ok"
        with self._disk_lock:
            starts, self._disk_refusing = refusing and not self._disk_refusing, refusing
        if starts:
            self._publish_disk_error(reading)
        self.announce_change()

    def _publish_disk_error(self, reading: DiskReading) -> None:
        """``disk_full`` on N/errors: a condition of the node, published at once and not through the outbox, which
        waits for state commits that a full disk may be holding up. Not kept for later: a controller that was away
        reads the `disk` field of the retained birth, and a reconnect publishes this again while it lasts."""
        if self.link is None or not self.link.connected.is_set():
            return
        free = f"{reading.free_bytes / MB:.1f} MB free" if reading.free_bytes is not None else "no free space"
        err = NodeError(node_id=self.node_id, topic=None, ts=now(), error=ErrorInfo(
            code=ErrorCode.disk_full.value,
            message=f"the state disk has {free} (storage.free_low_mb = {self.config.storage.free_low_mb:g}): "
                    "new work is refused with disk_full and running jobs are paused until "
                    f"{self.config.storage.free_resume_mb:g} MB are free; old outputs and result logs are "
                    "being deleted"))
        self.link.publish_now(self.topics.errors, err.model_dump_json().encode())

    # -- identity -----------------------------------------------------------------------------------------

    def accepts(self, job_type: str) -> bool:
        if registry.get(job_type) is None:
            return False
        return self.config.jobs.enable_debug_jobs or not job_type.startswith("debug.")

    def capabilities(self) -> list[str]:
        return sorted(t for t in registry.handlers() if self.accepts(t))

    def decode_pool(self) -> "DecodePool":
        """The decode worker processes of `infer` jobs (inference.decode_mode), created on first use."""
        with self._decode_pool_lock:
            if self._decode_pool is None:
                from agent.inference.decodeproc import DecodePool

                cfg = self.config.inference
                self._decode_pool = DecodePool(cfg, cfg.workers())
            return self._decode_pool

    @property
    def model_manager(self) -> ModelManager:
        """Loaded models, shared by every job; created on first use so the agent starts without the runtimes."""
        if self._model_manager is None:
            self._model_manager = ModelManager(self.model_store, self.config.accelerators)
        return self._model_manager

    def accelerators(self) -> list[dict[str, Any]]:
        return list(self._accelerators)

    def models(self) -> list[dict[str, Any]]:
        try:
            return [m.model_dump(mode="json") for m in self.model_store.list()]
        except Exception as e:  # a damaged store must not take the birth message down with it
            log.error("cannot list models: %s", e)
            return []

    def _detect_accelerators(self) -> None:
        """Runs beside the MQTT connect: asking the runtimes for devices imports them, which takes a while.
        Then loads the models named in ``models.preload``."""
        try:
            found = list_accelerators(self.config.accelerators)
            self._accelerators = [a.model_dump(mode="json") for a in found]
        except Exception as e:
            log.error("accelerator detection failed: %s", e)
            return
        log.info("accelerators: %s", ", ".join(a.get("name") or a.get("kind", "?") for a in self._accelerators)
                 or "none")
        self.announce_change()
        for name in self.config.models.preload:
            try:
                pipeline = self.model_manager.load(name)
                log.info("preloaded model %s %s", name, pipeline.version, extra={"CVW_MODEL": name})
            except Exception as e:  # a bad model must not stop the node; jobs naming it will fail clearly
                log.error("cannot preload model %s: %s", name, e, extra={"CVW_MODEL": name})

    def announce_change(self) -> None:
        """Models or accelerators changed: refresh the retained birth message and the mDNS TXT record."""
        if self.link is not None and self.link.connected.is_set():
            self.publish_birth()
        if self.advertiser is not None:
            try:
                self.advertiser.update(accel=self._accel_names(), models=[m["name"] for m in self.models()],
                                       caps=self.capabilities())
            except ValueError as e:
                log.warning("mDNS TXT not updated: %s", e)

    def _accel_names(self) -> list[str]:
        return sorted({str(a.get("name") or a.get("kind")) for a in self._accelerators})

    def job_finished(self, job: dict[str, Any]) -> None:
        if job["type"] in ("model.deploy", "model.remove") and job["state"] == JobState.SUCCEEDED.value:
            self.announce_change()

    def node_status(self, state: str) -> NodeStatus:
        return NodeStatus(
            state=state,  # type: ignore[arg-type]
            node_id=self.node_id, version=__version__, boot_id=self.boot_id,
            bd_seq=int(self.state.meta_get("bd_seq", 0)), ts=now(), accelerators=self.accelerators(),
            models=self.models(), capabilities=self.capabilities(), pools=list(self.config.pools),
            disk=self.disk.level,
        )

    def info(self) -> dict[str, Any]:
        """What `node.info` returns and `cv-worker status` shows."""
        counts: dict[str, int] = {s.value: 0 for s in JobState}
        counts.update(self.state.job_state_counts())
        return {
            **self.node_status("online").model_dump(mode="json"),
            "uptime_s": round(time.time() - self.started_at, 1),
            "hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "pid": os.getpid(),
            "mqtt": {"host": self.link.host if self.link else None, "port": self.link.port if self.link else None,
                     "connected": bool(self.link and self.link.connected.is_set()),
                     "tls": self.config.mqtt.tls},
            "jobs": {"by_state": counts, "running": self.engine.running_ids(), "queued": self.engine.queue_depth(),
                     "workers": self.config.jobs.workers},
            "outbox": {"depth": self.outbox.depth(), "refused": self.outbox.refused},
            "http": self.http.describe() if self.http is not None else {"enabled": False},
        }

    def publish_birth(self) -> None:
        self.link.publish_now(self.topics.status, self.node_status("online").model_dump_json().encode(), retain=True)

    # -- MQTT callbacks -----------------------------------------------------------------------------------

    def _subscriptions(self) -> list[str]:
        return [self.topics.request_filter] + [self.topics.pool_request_filter(p) for p in self.config.pools]

    def _will(self) -> tuple[str, bytes]:
        # Each connection gets the next bd_seq, made durable before CONNECT when the disk allows it. Birth and will
        # of one connection always carry the same number (it is read from memory); on a full disk the node still
        # connects, and boot_id tells its runs apart should a number repeat after a restart.
        with self.state.transaction():
            self.state.meta_set("bd_seq", int(self.state.meta_get("bd_seq", 0)) + 1)
        if not self.state.wait_durable(timeout=5.0, give_up_on_error=True):
            log.warning("bd_seq not yet on disk (%s); connecting anyway", self.state.write_error or "slow disk")
        return self.topics.status, self.node_status("offline").model_dump_json().encode()

    def _on_connected(self, session_present: bool) -> None:
        self.publish_birth()
        if self.disk.refusing():
            self._publish_disk_error(self.disk.reading())
        self.outbox.wake()
        self._write_runtime()
        self._notify(status="connected to broker, serving jobs")

    def _on_message(self, msg: mqtt.MQTTMessage, epoch: int) -> None:
        self.intake.submit(msg, epoch)

    def _write_runtime(self) -> None:
        """A small file for `cv-worker status` to read without talking to the broker."""
        runtime = {"pid": os.getpid(), "boot_id": self.boot_id, "started": self.started_at,
                   "mqtt": f"{self.link.host}:{self.link.port}", "connected": self.link.connected.is_set(),
                   "updated": now()}
        try:
            # Not fsynced: it describes this run only, and a stale one after a power cut names a pid that is gone.
            atomic_write_bytes(self.config.state_dir / "runtime.json", json.dumps(runtime).encode(),
                               durable=False)
        except OSError as e:
            if str(e) != self._runtime_error:  # every 5 s on a full disk: say it once
                log.warning("cannot write runtime file: %s", e)
            self._runtime_error = str(e)
        else:
            self._runtime_error = None

    # -- lifecycle ----------------------------------------------------------------------------------------

    def _discover_broker(self) -> Optional[tuple[str, int]]:
        found = find_broker(self.config.discovery, require_tls=self.config.mqtt.tls)
        return (found.host, found.port) if found is not None else None

    def resolve_broker(self) -> tuple[str, int]:
        m = self.config.mqtt
        if m.host:
            return m.host, m.effective_port
        if self.config.discovery.enabled:
            found = self._discover_broker()
            if found is not None:
                log.info("using MQTT broker %s:%d found over mDNS", *found)
                return found
            log.warning("no [mqtt] host configured and no broker advertised over mDNS; trying localhost:%d",
                        m.effective_port)
        else:
            log.warning("no [mqtt] host configured; using localhost:%d", m.effective_port)
        return "localhost", m.effective_port

    def start(self) -> None:
        host, port = self.resolve_broker()
        self.link = MqttLink(
            self.config.mqtt, self.config.mqtt.client_id or f"cvw-{self.node_id}", host, port,
            subscriptions=self._subscriptions, will=self._will, on_message=self._on_message,
            on_connected=self._on_connected, on_published=self.outbox.on_published,
            rediscover=self._discover_broker if self.config.discovery.enabled and not self.config.mqtt.host else None,
            rediscover_after_s=self.config.discovery.rebrowse_after_s,
        )
        self.disk.start()
        self.engine.start()
        self.intake.start()
        self.outbox.start(self.link)
        self.link.start()
        self.streams.start_all()  # config-declared and persisted streams resume without any controller action
        self.stats.start()
        threading.Thread(target=self._detect_accelerators, name="detect", daemon=True).start()
        http_port = self.http.start() if self.http is not None else None  # None: not listening (logged why)
        self.advertiser = Advertiser.from_config(
            self.config, mqtt_endpoint=format_endpoint(host, port), models=[m["name"] for m in self.models()],
            caps=self.capabilities(), http_port=http_port,
            on_conflict=lambda c: log.warning("mDNS name conflict: %s", c))
        self.advertiser.start()
        log.info("cv-worker %s node %s started (state in %s, broker %s:%d, %d workers, pools: %s)", __version__,
                 self.node_id, self.config.state_dir, host, port, self.config.jobs.workers,
                 ", ".join(self.config.pools) or "none")

    def stop(self) -> None:
        log.info("stopping: finishing in-flight work")
        self._notify(stopping=True, status="stopping")
        self.stats.stop()
        if self.http is not None:
            self.http.stop()  # no new HTTP jobs while the engine winds down
        self.streams.close()  # before the outbox drains: the streams' last events go out with it
        self.intake.stop()
        self.engine.stop()
        if self.link.connected.is_set():
            self.outbox.wait_empty(3.0)
        self.link.stop(final=(self.topics.status, self.node_status("stopped").model_dump_json().encode()))
        if self.advertiser is not None:
            self.advertiser.stop()
        if self._decode_pool is not None:
            self._decode_pool.close()
        if self._model_manager is not None:
            self._model_manager.close()
        self.outbox.stop()
        self.disk.stop()
        self.state.close()
        log.info("stopped")

    def request_stop(self) -> None:
        self._stop.set()

    def loops_healthy(self, stall_s: float = 30.0) -> bool:
        """For the systemd watchdog: the intake, the engine's worker/control/watch threads are alive, and the
        intake is not sitting on requests without processing any for ``stall_s``."""
        threads = {t.name: t.is_alive() for t in self.engine._threads}
        intake_thread = self.intake._thread
        if intake_thread is None or not intake_thread.is_alive():
            log.error("watchdog: the intake thread is dead")
            return False
        if not (threads.get("job-control") and threads.get("job-watch")):
            log.error("watchdog: an engine loop is dead: %s", threads)
            return False
        if self.config.jobs.workers and not any(alive for n, alive in threads.items() if n.startswith("job-worker")):
            log.error("watchdog: no job worker is alive")
            return False
        pending = self.intake._q.qsize()
        done = self.intake.accepted + self.intake.rejected
        t = time.monotonic()
        last = getattr(self, "_intake_progress", None)
        if last is None or pending == 0 or done != last[1] or pending < last[0]:
            self._intake_progress = (pending, done, t)
            return True
        if t - last[2] > stall_s:
            log.error("watchdog: intake has %d requests pending and made no progress for %.0f s", pending, t - last[2])
            return False
        return True

    def run_forever(self, notify: Optional[Callable[..., None]] = None) -> int:
        """Run until SIGTERM/SIGINT. ``notify`` receives systemd-style readiness and status updates."""
        from agent.sdnotify import watchdog_interval_s

        if notify is not None:
            self._notify = notify
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.request_stop())
        self.start()
        wd = watchdog_interval_s()  # WatchdogSec/2 under systemd, else None
        tick = min(5.0, wd) if wd else 5.0
        self._notify(status=f"connecting to broker {self.link.host}:{self.link.port}")
        started = time.monotonic()
        warned = False
        last_status = 0.0
        # READY=1 only once the MQTT session is up. Until then the start-up is extended in steps (so a broker that
        # is down for long does not make systemd kill and restart a node that has nothing wrong with it), and
        # STATUS= says what the agent waits for; jobs meanwhile wait in the broker session.
        while not self.link.connected.wait(0.2) and not self._stop.is_set():
            now_m = time.monotonic()
            if now_m - last_status >= tick:
                last_status = now_m
                reason = f" ({self.link.last_error})" if self.link.last_error else ""
                self._notify(status=f"waiting for broker {self.link.host}:{self.link.port}{reason}",
                             extend_timeout_s=3 * tick, watchdog=bool(wd))
            if not warned and now_m - started > 30:
                warned = True
                log.warning("not connected to the broker yet; jobs wait in the broker until the connection is up")
        if self.link.connected.is_set():
            self._notify(ready=True, status="connected to broker, serving jobs")
        next_runtime = 0.0
        while not self._stop.wait(tick):
            if wd and self.loops_healthy():
                self._notify(watchdog=True)  # a hung loop stops the pings and systemd restarts the agent
            if time.monotonic() >= next_runtime:
                self._write_runtime()
                next_runtime = time.monotonic() + 5.0
        self.stop()
        return 0
