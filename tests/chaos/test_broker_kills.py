"""SIGKILL of the broker (saving on every change, the test fixture's default) while jobs run: nothing is lost."""

from __future__ import annotations

import random
import time

import pytest

from tests.agent_proc import CONNECTED
from tests.chaos.harness import (
    STRACE,
    JobController,
    JobRecorder,
    infer_job,
    kill_broker_between_loops,
    settle_and_check,
)

BROKER_KILLS = 6
BATCH_IMAGES = 600


@pytest.mark.skipif(STRACE is None, reason="strace is not installed (make test installs it)")
def test_broker_sigkill_while_jobs_run_loses_nothing(tmp_path, mosquitto, pictures, seed, chaos_agent):
    rng = random.Random(seed)
    agent = chaos_agent(tmp_path / "agent", mosquitto, "bk-node")
    rec = JobRecorder(mosquitto, agent.node_id)
    ctl = JobController(mosquitto, agent.node_id, "chaos-ctl-bk")
    try:
        agent.start()
        # A broker that saves after every change rewrites all it holds each time: a slower stream keeps it usable.
        ctl.start_stream(random.Random(rng.random()), rate=30)
        batch = infer_job("batch-bk", pictures[1], BATCH_IMAGES)
        assert ctl.submit(batch)
        for _ in range(BROKER_KILLS):
            time.sleep(rng.uniform(0.5, 2.5))  # jobs run and report; the kill comes at some moment of that
            kill_broker_between_loops(mosquitto, rng.randint(1, 40))
            time.sleep(rng.uniform(0.1, 1.5))  # the node works on without a broker
            connected = agent.log().count(CONNECTED)
            mosquitto.start()
            agent.wait_log(CONNECTED, count=connected + 1)  # the next kill finds the node connected
        sent = ctl.stop_stream()
        acked = ctl.acked()
        ends = settle_and_check(ctl, rec, agent, mosquitto, acked, seed, timeout=120)
        assert agent.log().count(CONNECTED) == BROKER_KILLS + 1
        print(f"{BROKER_KILLS} broker kills; {sent} jobs sent, {len(acked)} acknowledged, a batch of {BATCH_IMAGES} "
              f"images; outcomes {ends}")
    finally:
        ctl.close()
        rec.close()
