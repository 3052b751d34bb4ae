"""``GET /metrics``: the node in Prometheus text format, from a registry of its own (not the process-global one).

Most figures are read from the node when scraped (a collector); inference latency is a histogram fed by every
inference the node runs (batch ``infer`` jobs and live streams) through ``agent.stats.MODEL_METRICS``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from agent import __version__
from agent.protocol import JobState
from agent.stats import MODEL_METRICS

if TYPE_CHECKING:
    from agent.node import Node

# Seconds; a BlazeFace inference on a Pi 4 CPU takes ~10 ms, a large model on a busy one seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class NodeCollector(Collector):
    def __init__(self, node: "Node"):
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        yield InfoMetricFamily("cvw_node", "This node's identity.", value={"node_id": node.node_id,
                                                                          "version": __version__})
        yield GaugeMetricFamily("cvw_uptime_seconds", "Seconds since the agent started.",
                                value=time.time() - node.started_at)
        counts = node.state.job_state_counts()
        jobs = GaugeMetricFamily("cvw_jobs", "Jobs in the node's local state, by state.", labels=["state"])
        for s in JobState:
            jobs.add_metric([s.value], counts.get(s.value, 0))
        yield jobs
        yield GaugeMetricFamily("cvw_jobs_running", "Jobs running now.", value=len(node.engine.running_ids()))
        yield GaugeMetricFamily("cvw_jobs_queued", "Jobs waiting for a worker.", value=node.engine.queue_depth())
        yield CounterMetricFamily("cvw_requests_accepted", "Job requests accepted (MQTT and HTTP) since start.",
                                  value=node.intake.accepted)
        yield CounterMetricFamily("cvw_requests_rejected", "Job requests refused (MQTT and HTTP) since start.",
                                  value=node.intake.rejected)
        link = node.link
        yield GaugeMetricFamily("cvw_mqtt_connected", "1 while the MQTT session to the broker is up.",
                                value=1 if link is not None and link.connected.is_set() else 0)
        yield GaugeMetricFamily("cvw_outbox_depth", "Status/result messages stored and not yet acknowledged by the "
                                "broker.", value=node.outbox.depth())
        yield CounterMetricFamily("cvw_outbox_refused", "Messages the broker refused (dropped) since start.",
                                  value=node.outbox.refused)
        yield from self._streams()
        yield from self._models()

    def _streams(self) -> Iterator[Metric]:
        fps = GaugeMetricFamily("cvw_stream_fps", "Frames per second of each stream, by kind (captured from the "
                                "source, processed by the model, skipped).", labels=["stream", "kind"])
        frames = CounterMetricFamily("cvw_stream_frames", "Frames of each stream since it started, by kind.",
                                     labels=["stream", "kind"])
        up = GaugeMetricFamily("cvw_stream_up", "1 while a stream is running, with its state as a label.",
                               labels=["stream", "state"])
        active = GaugeMetricFamily("cvw_stream_active_objects", "Objects tracked in view now.", labels=["stream"])
        for s in self.node.streams.all():
            st = s.stats()
            fps.add_metric([s.id, "captured"], st.capture_fps or 0.0)
            fps.add_metric([s.id, "processed"], st.processed_fps or 0.0)
            fps.add_metric([s.id, "skipped"], st.skipped_fps or 0.0)
            frames.add_metric([s.id, "captured"], st.frames_captured)
            frames.add_metric([s.id, "processed"], st.frames_processed)
            frames.add_metric([s.id, "dropped"], st.frames_dropped)
            up.add_metric([s.id, st.state], 1 if st.state == "running" else 0)
            active.add_metric([s.id], st.active_objects)
        yield from (fps, frames, up, active)

    def _models(self) -> Iterator[Metric]:
        loaded = GaugeMetricFamily("cvw_model_loaded", "1 for each model loaded for serving, with where it runs.",
                                   labels=["model", "version", "backend", "device"])
        mm = getattr(self.node, "_model_manager", None)  # not the property: a scrape must not load the runtimes
        if mm is not None:
            for name in mm.loaded():
                try:
                    with mm.acquire(name) as p:
                        loaded.add_metric([name, p.version, p.model.backend, p.model.device], 1)
                except Exception:  # unloaded between the two calls
                    continue
        yield loaded


class NodeMetrics:
    def __init__(self, node: "Node"):
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(NodeCollector(node))
        self.inference = Histogram(
            "cvw_inference_seconds", "Time of one model inference in the runtime, by model and backend.",
            ["model", "backend"], buckets=LATENCY_BUCKETS, registry=self.registry)
        MODEL_METRICS.add_listener(self._observe)

    def _observe(self, model: str, backend: str, ms: float) -> None:
        self.inference.labels(model, backend).observe(ms / 1000.0)

    def close(self) -> None:
        MODEL_METRICS.remove_listener(self._observe)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
