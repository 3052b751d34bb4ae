"""The build-system peer (``cv-worker trainer``): takes `train` jobs from the training queue and trains.

It is a Node in everything but its job types and topics: the same durable state, outbox, intake, job engine
(state machine, timeouts, cancel, recovery) and MQTT link, serving ``registry.TRAINER`` job types on
``{prefix}/trainers/...`` (see ``agent.trainer.topics``): the shared queue, balanced between the peers of a group,
and a topic of its own. It advertises ``role=build`` over mDNS and runs the read-only artifact server.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
import uuid
from typing import Any, Callable, Optional

from agent import __version__
from agent.config import AgentConfig
from agent.discovery import Advertiser, format_endpoint
from agent.engine import JobEngine
from agent.intake import Intake
from agent.jobs import registry
from agent.jobs.base import JobError
from agent.mqtt import MqttLink
from agent.node import Node
from agent.outbox import Outbox
from agent.trainer.artifacts import ArtifactServer
from agent.trainer.topics import TrainerTopics

log = logging.getLogger("cv_worker.trainer")


class TrainerPeer(Node):
    realm = registry.TRAINER

    # Node.__init__ is not called: it opens the model store, streams and stats of an edge node, none of which a
    # build peer has. What the inherited methods (birth and will, run_forever, watchdog checks) use is set here.
    def __init__(self, config: AgentConfig):  # noqa: D107
        t = config.trainer
        # The peer's own identity and state: a node and a trainer may share a machine and a config file.
        config = config.model_copy(update={"node_id": t.resolve_peer_id(config.node_id),
                                           "state_dir": t.resolve_state_dir(config.state_dir)})
        config.discovery = config.discovery.model_copy(update={"role": "build"})
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.node_id = config.node_id
        self.topics = TrainerTopics(config.mqtt.topic_prefix, self.node_id, config.trainer.group)  # type: ignore
        self.boot_id = uuid.uuid4().hex
        self.started_at = time.time()
        self._open_state()
        self.outbox = Outbox(self.state)
        self.engine = JobEngine(self)
        self.intake = Intake(self)
        self.link: MqttLink = None  # type: ignore[assignment]
        self._stop = threading.Event()
        self._notify: Callable[..., None] = lambda **kw: None
        self._model_manager = None
        self.http = None  # a build peer serves artifacts (ArtifactServer), not the node's HTTP API
        self._accelerators: list[dict[str, Any]] = []
        self.advertiser: Optional[Advertiser] = None
        self.artifacts: Optional[ArtifactServer] = None
        self._device: Optional[tuple[str, str]] = None
        self._device_lock = threading.Lock()
        registry.load_trainer()

    # -- identity -----------------------------------------------------------------------------------------

    def accepts(self, job_type: str) -> bool:
        return registry.get(job_type, self.realm) is not None

    def capabilities(self) -> list[str]:
        return sorted(registry.handlers(self.realm))

    def models(self) -> list[dict[str, Any]]:
        return []

    def job_finished(self, job: dict[str, Any]) -> None:
        pass

    def announce_change(self) -> None:
        if self.link is not None and self.link.connected.is_set():
            self.publish_birth()
        if self.advertiser is not None:
            try:
                self.advertiser.update(accel=self._accel_names(), caps=self.capabilities())
            except ValueError as e:
                log.warning("mDNS TXT not updated: %s", e)

    def info(self) -> dict[str, Any]:
        from agent.trainer.plugins import available

        info = super().info()
        info["trainer"] = {"group": self.config.trainer.group, "plugins": sorted(available()),
                           "artifacts": self.artifacts.base_url if self.artifacts else None,
                           "device": self._device[0] if self._device else None}
        return info

    def _subscriptions(self) -> list[str]:
        return [self.topics.request_filter, self.topics.shared_request_filter]

    # -- the training device --------------------------------------------------------------------------------

    def device(self) -> tuple[str, str]:
        """(torch device, description): the GPU when torch sees one (or `trainer.device` says so), else the CPU."""
        with self._device_lock:
            if self._device is None:
                self._device = _pick_device(self.config.trainer.device)
                kind = "cuda" if self._device[0].startswith("cuda") else "cpu"
                self._accelerators = [{"kind": kind, "name": self._device[1], "device": self._device[0],
                                       "usable": True}]
            return self._device

    def _detect_device(self) -> None:
        try:
            dev, name = self.device()
        except JobError as e:
            log.error("%s", e.message)
            return
        except ImportError as e:
            log.error("cannot train: %s (install cv-worker with the train extra: pip install 'cv-worker[train]')", e)
            return
        log.info("training on %s (%s)%s", dev, name, "" if dev.startswith("cuda") else "; torch sees no GPU")
        self.announce_change()

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.config
        host, port = self.resolve_broker()
        self.artifacts = ArtifactServer(cfg.trainer.resolve_artifacts_dir(cfg.state_dir), cfg.trainer.http_host,
                                        cfg.trainer.http_port, cfg.trainer.public_url,
                                        cfg.discovery.interfaces).start()
        self.link = MqttLink(
            cfg.mqtt, cfg.mqtt.client_id or f"cvw-trainer-{self.node_id}", host, port,
            subscriptions=self._subscriptions, will=self._will, on_message=self._on_message,
            on_connected=self._on_connected, on_published=self.outbox.on_published,
            rediscover=self._discover_broker if cfg.discovery.enabled and not cfg.mqtt.host else None,
            rediscover_after_s=cfg.discovery.rebrowse_after_s,
        )
        self.engine.start()
        self.intake.start()
        self.outbox.start(self.link)
        self.link.start()
        threading.Thread(target=self._detect_device, name="detect", daemon=True).start()
        self.advertiser = Advertiser.from_config(
            cfg, mqtt_endpoint=format_endpoint(host, port), caps=self.capabilities(), http_port=self.artifacts.port,
            on_conflict=lambda c: log.warning("mDNS name conflict: %s", c))
        self.advertiser.start()
        log.info("cv-worker %s build peer %s started (state in %s, broker %s:%d, queue %s, artifacts at %s, "
                 "%d workers)", __version__, self.node_id, cfg.state_dir, host, port,
                 self.topics.shared_request_filter, self.artifacts.base_url, cfg.jobs.workers)

    def stop(self) -> None:
        log.info("stopping: finishing in-flight work")
        self._notify(stopping=True, status="stopping")
        self.intake.stop()
        self.engine.stop()
        if self.link.connected.is_set():
            self.outbox.wait_empty(3.0)
        self.link.stop(final=(self.topics.status, self.node_status("stopped").model_dump_json().encode()))
        if self.advertiser is not None:
            self.advertiser.stop()
        if self.artifacts is not None:
            self.artifacts.stop()
        self.outbox.stop()
        self.state.close()
        log.info("stopped")


def _pick_device(pref: str) -> tuple[str, str]:
    import torch

    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise JobError("no_gpu", "trainer.device is 'cuda' but torch sees no GPU (torch "
                           f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); set trainer.device "
                           "= 'auto' to train on the CPU")
        return "cuda:0", torch.cuda.get_device_name(0)
    return "cpu", f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
