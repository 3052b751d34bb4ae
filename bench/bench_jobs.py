#!/usr/bin/env python3
"""Job intake throughput and submit→SUCCEEDED latency of the agent, against a real mosquitto.

Prints, measured in the same run:
  * accepted jobs/s — N `node.info` requests are queued at the broker while the agent is stopped (its persistent
    session keeps them), then the agent starts and drains them; accepted/s is N over the time from the first to the
    last QUEUED status the agent publishes (each one written durably before its PUBACK).
  * the same for a baseline: a bare paho echo that answers each request with a status and stores nothing — the
    ceiling set by the broker and the MQTT client library on this machine.
  * submit→SUCCEEDED latency p50/p99 for `node.info`, one job at a time, on an idle node and while 40 `infer`
    requests of 7 MB inline images are queued on it (the flood of issue 13), with their ratio.
  * with ``--compare-with DIR`` (another checkout of cv-worker, e.g. a worktree of an older commit), its accepted
    jobs/s too, alternating runs of both in this process, so the two are measured under the same conditions.
Targets: at least 300 accepted jobs/s (issue 2); within 10% of the earlier version's (issue 13).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.client import Controller  # noqa: E402
from agent.config import MqttConfig  # noqa: E402
from agent.devbroker import Mosquitto  # noqa: E402
from tests.agent_proc import AgentProc  # noqa: E402


def _client(broker: Mosquitto, client_id: str = "") -> mqtt.Client:
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5,
                    client_id=client_id)
    c.max_inflight_messages_set(200)
    return c


def preload(broker: Mosquitto, node_id: str, n: int, tag: str) -> None:
    pub = _client(broker)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    body = json.dumps({"type": "node.info"}).encode()
    infos = [pub.publish(f"cvw/v1/nodes/{node_id}/jobs/{tag}-{i}/request", body, qos=1) for i in range(n)]
    for info in infos:
        info.wait_for_publish(30)
    pub.disconnect()
    pub.loop_stop()


class StatusCounter:
    def __init__(self, broker: Mosquitto, topic: str, state: str):
        self.state = state
        self.times: list[float] = []
        self.done = threading.Event()
        self.expected = 0
        self.c = _client(broker)
        self.c.on_message = self._on
        self.c.connect(broker.host, broker.port)
        self.c.subscribe(topic, qos=1)
        self.c.loop_start()
        time.sleep(0.3)

    def _on(self, client, userdata, msg) -> None:
        if msg.retain:
            return
        if json.loads(msg.payload).get("state") == self.state:
            self.times.append(time.monotonic())
            if len(self.times) >= self.expected:
                self.done.set()

    def rate(self) -> float:
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def bench_agent_intake(broker: Mosquitto, workdir: Path, n: int, repo: Optional[Path] = None) -> float:
    agent = AgentProc(workdir, broker, "bench-node", jobs={"progress_interval_s": 1.0})
    if repo is not None:
        agent.repo = repo
    agent.start()  # creates the persistent session and subscriptions
    agent.stop()
    preload(broker, "bench-node", n, "acc")
    counter = StatusCounter(broker, "cvw/v1/nodes/bench-node/jobs/+/status", "QUEUED")
    counter.expected = n
    agent.start(wait_online=False)
    ok = counter.done.wait(300)
    counter.close()
    agent.stop()
    if not ok:
        raise SystemExit(f"only {len(counter.times)} of {n} jobs accepted")
    return counter.rate()


def bench_echo_baseline(broker: Mosquitto, n: int) -> float:
    """A bare responder: subscribe, answer each request with a QUEUED status, store nothing."""
    echo = _client(broker, "echo-node")

    def on_message(client, userdata, msg) -> None:
        job_id = msg.topic.split("/")[-2]
        client.publish(f"cvw/v1/nodes/echo-node/jobs/{job_id}/status",
                       json.dumps({"job_id": job_id, "state": "QUEUED", "version": 1}), qos=1)

    echo.on_message = on_message
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 600  # like the agent: requests queue at the broker while it is away
    echo.connect(broker.host, broker.port, clean_start=False, properties=props)
    echo.subscribe("cvw/v1/nodes/echo-node/jobs/+/request", qos=1)
    echo.loop_start()
    time.sleep(0.3)
    echo.disconnect()
    echo.loop_stop()
    preload(broker, "echo-node", n, "echo")
    counter = StatusCounter(broker, "cvw/v1/nodes/echo-node/jobs/+/status", "QUEUED")
    counter.expected = n
    echo.reconnect()
    echo.loop_start()
    ok = counter.done.wait(300)
    counter.close()
    echo.disconnect()
    echo.loop_stop()
    if not ok:
        raise SystemExit("baseline did not finish")
    return counter.rate()


def _latencies(ctl: Controller, node: str, n: int) -> list[float]:
    lat = []
    for _ in range(n):
        t0 = time.monotonic()
        out = ctl.wait(ctl.submit("node.info", node=node), timeout=30)
        lat.append((time.monotonic() - t0) * 1000)
        assert out.state == "SUCCEEDED"
    return sorted(lat)


def bench_latency(broker: Mosquitto, workdir: Path, n: int, flood: int) -> tuple[list[float], list[float]]:
    """node.info latencies on an idle node, then with `flood` infer requests of 7 MB queued behind a busy worker."""
    agent = AgentProc(workdir / "agent-lat", broker, "lat-node", jobs={"workers": 1}).start()
    data = base64.b64encode(os.urandom(5_250_000)).decode()
    with Controller(MqttConfig(host=broker.host, port=broker.port), broker.host, broker.port) as ctl:
        idle = _latencies(ctl, "lat-node", n)
        blocker = ctl.submit("debug.sleep", {"seconds": 600, "steps": 600}, node="lat-node")
        for i in range(flood):
            ctl.submit("infer", {"model": "blazeface", "images": [{"id": "big", "data": data}]}, node="lat-node",
                       job_id=f"flood-{i}")
        deadline = time.monotonic() + 120
        while sum(1 for j in agent.jobs().values() if j["state"] == "QUEUED") < flood:
            if time.monotonic() > deadline:
                raise SystemExit("the flood was not queued")
            time.sleep(0.1)
        flooded = _latencies(ctl, "lat-node", n)
        ctl.wait(ctl.submit("job.cancel", {"job_id": blocker}, node="lat-node"), timeout=30)
    agent.stop()
    return idle, flooded


def pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(len(values) * p))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2000, help="requests for the throughput runs (default 2000)")
    ap.add_argument("--latency-jobs", type=int, default=200, help="sequential jobs for the latency run")
    ap.add_argument("--flood", type=int, default=40, help="7 MB infer requests queued for the flooded latency run")
    ap.add_argument("--compare-with", type=Path, default=None,
                    help="another cv-worker checkout whose agent is measured in the same run")
    ap.add_argument("--rounds", type=int, default=3, help="throughput runs per agent (the best is kept)")
    args = ap.parse_args()
    other: list[float] = []
    ours: list[float] = []
    with tempfile.TemporaryDirectory(prefix="cvw-bench-") as tmp:
        broker = Mosquitto(Path(tmp) / "broker", save_every_change=False).start()
        try:
            baseline = bench_echo_baseline(broker, args.jobs)
            for r in range(args.rounds):
                ours.append(bench_agent_intake(broker, Path(tmp) / f"ours{r}", args.jobs))
                if args.compare_with is not None:
                    other.append(bench_agent_intake(broker, Path(tmp) / f"other{r}", args.jobs,
                                                    repo=args.compare_with.resolve()))
            idle, flooded = bench_latency(broker, Path(tmp), args.latency_jobs, args.flood)
        finally:
            broker.close()
    accepted = max(ours)
    print(f"{'measure':<56}{'value':>12}")
    print(f"{'bare MQTT echo, no state (baseline) jobs/s':<56}{baseline:>12.0f}")
    print(f"{'cv-worker accepted jobs/s (durable before ack), best':<56}{accepted:>12.0f}"
          f"   runs: {', '.join(f'{x:.0f}' for x in ours)}")
    print(f"{'ratio cv-worker / baseline':<56}{accepted / baseline:>12.2f}")
    if other:
        print(f"{'compared checkout accepted jobs/s, best':<56}{max(other):>12.0f}"
              f"   runs: {', '.join(f'{x:.0f}' for x in other)}")
        print(f"{'ratio cv-worker / compared checkout':<56}{accepted / max(other):>12.2f}")
    print(f"{'node.info submit->SUCCEEDED p50 / p99 ms, idle':<56}{statistics.median(idle):>12.1f} / "
          f"{pct(idle, 0.99):.1f}")
    print(f"{f'the same with {args.flood} x 7 MB infer requests queued':<56}{statistics.median(flooded):>12.1f} / "
          f"{pct(flooded, 0.99):.1f}   ratio p50 {statistics.median(flooded) / statistics.median(idle):.2f}")
    target = 300
    verdict = "meets" if accepted >= target else "MISSES"
    print(f"target: >= {target} accepted jobs/s — {verdict} ({accepted:.0f}/s)")
    return 0 if accepted >= target else 1


if __name__ == "__main__":
    sys.exit(main())
