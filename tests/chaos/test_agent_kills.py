"""SIGKILL of the agent at random moments while long `infer` batches run beside a 50 jobs/s stream of small jobs."""

from __future__ import annotations

import random
import time

from tests.chaos.harness import (
    JobController,
    JobRecorder,
    Proc,
    alive,
    assert_invariants,
    assert_retained_terminal,
    descendants,
    infer_job,
    wait_outbox_empty,
    wait_until,
)

KILLS = 16
BATCH_IMAGES = 800
BATCH_EVERY = 5  # a new batch with every fifth kill; that kill waits until the batch has reported a chunk


def test_sigkill_at_random_moments_loses_nothing_and_repeats_nothing(tmp_path, quiet_broker, pictures, seed,
                                                                     chaos_agent):
    rng = random.Random(seed)
    agent = chaos_agent(tmp_path / "agent", quiet_broker, "kill-node")
    rec = JobRecorder(quiet_broker, agent.node_id)
    ctl = JobController(quiet_broker, agent.node_id, "chaos-ctl-kill")
    batches = []
    left_behind: list[Proc] = []  # processes of killed agents (decode workers, inference process)
    try:
        agent.start()
        t0 = time.monotonic()
        ctl.start_stream(random.Random(rng.random()), rate=50)
        for k in range(KILLS):
            if k % BATCH_EVERY == 0:
                batch = infer_job(f"batch-{k}", pictures[1], BATCH_IMAGES)
                assert ctl.submit(batch)
                batches.append(batch)
                # A kill in the middle of the batch, not before it started: after its first chunk is out.
                rec.wait_results(batch.job_id, 1, timeout=60)
                time.sleep(rng.uniform(0.0, 0.6))
            else:
                # The moment of the kill: any time from start-up (recovery, reconnect) to seconds into the run.
                time.sleep(rng.uniform(0.05, 2.5))
            below = descendants(agent.proc.pid)
            agent.kill()
            left_behind += below
            agent.start(wait_online=rng.random() < 0.7)
        sent = ctl.stop_stream()
        t1 = time.monotonic()
        acked = ctl.acked()
        rec.wait_terminal([j.job_id for j in acked], timeout=180, why=f" (seed {seed})")
        t2 = time.monotonic()
        ends = assert_invariants(ctl, rec, agent.state_dir, seed)
        assert_retained_terminal(quiet_broker, rec, acked)
        wait_outbox_empty(agent)
        snap = rec.snapshot()
        resumed = [b.job_id for b in batches if any(s["details"].get("resumed") for _, s in snap[b.job_id].statuses)]
        assert resumed == [b.job_id for b in batches], "every batch was killed mid-run, so every batch resumed"
        # A killed agent leaves no decode or inference process behind: they notice and exit.
        wait_until(lambda: not [p for p in left_behind if alive(p)], 20, "the killed agents' worker processes exit")
        print(f"{KILLS} agent kills in {t1 - t0:.0f} s, backlog done {t2 - t1:.0f} s later; {sent} jobs sent, "
              f"{len(acked)} acknowledged; {len(batches)} batches of {BATCH_IMAGES} images, all resumed; "
              f"outcomes {ends}")
    finally:
        ctl.close()
        rec.close()
