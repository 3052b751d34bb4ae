"""The whole agent killed at every step of a commit (strace fault injection) while jobs flow, then restarted
without strace: the invariants hold each time. tests/test_state.py does this for the StateStore alone."""

from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path

import pytest

from agent.journal import Journal, segment_name
from tests.chaos.harness import (
    STRACE,
    JobController,
    JobRecorder,
    assert_invariants,
    infer_job,
    settle_and_check,
    strace_command,
    wait_killed_by_strace,
)

# (syscall, K): SIGKILL at the K-th call in one thread. `write` counts only appends to the journal segment (the
# commit record itself); `fdatasync` is the journal's (the record written, not yet reported durable); `fsync` is
# every other durability step (result logs and spooled params before the record that counts them, their
# directories, the side-effect log of a job with effects `once`). K=1 of write and fdatasync is the very first
# commit of a start, the one that must precede the MQTT CONNECT.
RUNS = [("write", 1), ("write", 4), ("write", 15), ("fdatasync", 1), ("fdatasync", 5), ("fdatasync", 25),
        ("fsync", 1), ("fsync", 5), ("fsync", 30)]
BATCH_IMAGES = 600


def _journal_tail(state_dir: Path) -> Path:
    """The segment the next start appends to (the first one of an empty state)."""
    segments = Journal(state_dir, read_only=True).segments()
    return segments[-1].path if segments else state_dir / "journal" / segment_name(1)


@pytest.mark.skipif(STRACE is None, reason="strace is not installed (make test installs it)")
def test_a_kill_at_every_step_of_a_commit_loses_nothing(tmp_path, quiet_broker, pictures, seed, chaos_agent):
    rng = random.Random(seed)
    agent = chaos_agent(tmp_path / "agent", quiet_broker, "commit-node")
    rec = JobRecorder(quiet_broker, agent.node_id)
    ctl = JobController(quiet_broker, agent.node_id, "chaos-ctl-commit")
    fired = []
    try:
        # The node's first connection creates its broker session: requests sent before it exists reach nobody.
        agent.start()
        agent.stop()
        stream_rng = random.Random(rng.random())
        batch = infer_job("batch-strace", pictures[1], BATCH_IMAGES)
        assert ctl.submit(batch)
        for syscall, k in RUNS:
            paths = [_journal_tail(agent.state_dir)] if syscall == "write" else []
            # Jobs flow while the traced agent starts, works and is killed; they pause for each check, so the
            # backlog of one round does not carry over into the next.
            ctl.start_stream(stream_rng, rate=50)
            agent.start(wrap=strace_command(syscall, k, paths), wait_online=False)
            assert wait_killed_by_strace(agent, timeout=60), f"no {k}th {syscall} within 60 s"
            ctl.stop_stream()
            fired.append(f"{syscall}:{k}")
            _restart_and_check(agent, ctl, rec, seed, f"after a kill at {syscall} #{k}")
        # Compaction: its snapshot is written to a temp file and renamed over state.json. Kill at that rename
        # (strace attached to the running agent, whose pid names the temp file), however long until it comes.
        ctl.start_stream(stream_rng, rate=50)
        agent.start()
        tmp_snapshot = agent.state_dir / f".state.json.tmp{agent.proc.pid}"
        tracer = subprocess.Popen([*strace_command("rename", 1, [tmp_snapshot]), "-p", str(agent.proc.pid)])
        try:
            rc = agent.proc.wait(90)
        except subprocess.TimeoutExpired:
            tracer.kill()  # detaches the agent; the fixture stops it
            raise AssertionError("no compaction within 90 s of jobs") from None
        finally:
            tracer.wait(10)
        agent.proc = None
        ctl.stop_stream()
        assert rc == -9, f"agent ended {rc} instead of at its snapshot's rename"
        fired.append("rename:compaction")
        _restart_and_check(agent, ctl, rec, seed, "after a kill at a compaction's rename")
        assert "removed .state.json.tmp" in agent.log(), "the restart did not clean up the half-done compaction"
        agent.start()
        sent = len(ctl.all_jobs())
        acked = ctl.acked()
        ends = settle_and_check(ctl, rec, agent, quiet_broker, acked, seed, timeout=120)
        print(f"{len(fired)} injected kills {fired}; {sent} jobs sent, {len(acked)} acknowledged, a batch of "
              f"{BATCH_IMAGES} images; outcomes {ends}")
    finally:
        ctl.close()
        rec.close()


def _restart_and_check(agent, ctl, rec, seed, when: str) -> None:
    """Restart without strace; every job acknowledged so far ends and every invariant holds; then stop it."""
    t0 = time.monotonic()
    agent.start()
    jobs = [j for j in ctl.all_jobs() if j.type != "infer"]
    rec.wait_terminal([j.job_id for j in jobs if j.acked], timeout=60, why=f" {when} (seed {seed})")
    assert_invariants(ctl, rec, agent.state_dir, seed, jobs=jobs)
    t1 = time.monotonic()
    agent.stop()
    print(f"{when}: {len(jobs)} jobs checked; drained in {t1 - t0:.1f} s, stopped in {time.monotonic() - t1:.1f} s")
