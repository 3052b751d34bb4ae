"""A 60 s broker outage while jobs run and finish: the node reconnects within 2 s of the broker's return and
everything its outbox queued meanwhile arrives."""

from __future__ import annotations

import random
import time

from tests.agent_proc import Recorder
from tests.chaos.harness import (
    DONE,
    DONE_OR_INTERRUPTED,
    Job,
    JobController,
    JobRecorder,
    infer_job,
    settle_and_check,
    wait_until,
)

OUTAGE_S = 60.0
# Full jitter between reconnect_min_s and a cap that never exceeds reconnect_max_s: after the broker's return the
# next attempt comes within reconnect_max_s; the rest of the bound is the connection itself.
RECONNECT_MAX_S = 1.5
RECONNECT_BOUND_S = 2.0


def test_a_60s_outage_loses_nothing_and_the_node_is_back_within_2s(tmp_path, mosquitto, pictures, seed, chaos_agent):
    rng = random.Random(seed)
    agent = chaos_agent(tmp_path / "agent", mosquitto, "outage-node",
                        mqtt={"reconnect_min_s": 0.2, "reconnect_max_s": RECONNECT_MAX_S})
    node = f"cvw/v1/nodes/{agent.node_id}"
    births = Recorder(mosquitto, f"{node}/status")
    rec = JobRecorder(mosquitto, agent.node_id)
    ctl = JobController(mosquitto, agent.node_id, "chaos-ctl-outage")
    try:
        agent.start()
        jobs = [infer_job("batch-outage", pictures[1], 400)]
        for i in range(40):
            seconds = round(rng.uniform(0.5, 8.0), 2)
            side_effect = rng.random() < 0.25
            params = {"seconds": seconds, "steps": rng.randint(2, 10), "side_effect": side_effect}
            jobs.append(Job(f"out-{i:02d}", "debug.sleep", params, DONE_OR_INTERRUPTED if side_effect else DONE))
        jobs.append(Job("out-info", "node.info", {}, DONE))
        for job in jobs:
            assert ctl.submit(job)
        wait_until(lambda: all(j.acked for j in jobs), 10, "the broker acknowledged every request")
        wait_until(lambda: {j.job_id for j in jobs} <= set(agent.jobs()), 10, "the node has every job")
        births.wait_for(lambda m: any(isinstance(p, dict) and p.get("state") == "online" for _, p, _, _ in m))
        bd_seq = max(p["bd_seq"] for _, p, _, _ in births.messages if isinstance(p, dict))
        births.close()

        stopped = time.monotonic()
        mosquitto.stop()
        # Every job runs to its end with no broker (read from the node's state, as `cv-worker jobs` does).
        wait_until(lambda: all(j["state"] in ("SUCCEEDED", "FAILED") for j in agent.jobs().values()), OUTAGE_S - 5,
                   "every job ends during the outage", poll=0.5)
        time.sleep(max(0.0, stopped + OUTAGE_S - time.monotonic()))  # the rest of the outage, on purpose

        returned = time.time()  # taken before the broker's process even starts: a generous measure of the bound
        mosquitto.start()
        watcher = Recorder(mosquitto, f"{node}/status")  # the new birth: live, or retained if the node was quicker

        def back(m: list) -> bool:
            return any(isinstance(p, dict) and p.get("state") == "online" and p["bd_seq"] > bd_seq for _, p, _, _ in m)

        watcher.wait_for(back, timeout=30)
        took = time.time() - returned  # when the test saw it: the node cannot have been back any later
        watcher.close()
        assert took <= RECONNECT_BOUND_S, f"the node was back {took:.2f} s after the broker (bound 2 s)"

        ends = settle_and_check(ctl, rec, agent, mosquitto, jobs, seed, timeout=60)
        print(f"{OUTAGE_S:.0f} s outage: {len(jobs)} jobs ended meanwhile ({ends}); node back {took:.2f} s after "
              f"the broker")
    finally:
        ctl.close()
        rec.close()
