"""The state disk fills up while a batch runs, then is freed; and a node starting on a disk that is already full.
The state directory is a small tmpfs of its own, so "full" is a real ENOSPC from the kernel."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from tests.agent_proc import Recorder
from tests.chaos.harness import (
    Job,
    JobController,
    JobRecorder,
    assert_invariants,
    infer_job,
    wait_until,
)

MB = 1024 * 1024
DISK_MB = 48
# Low water at 12 MB free, work again from 16 MB, a 4 MB reserve released at the first ENOSPC, checked 5 times a second.
LIMITS = {"free_low_mb": 12, "free_resume_mb": 16, "reserve_mb": 4, "check_interval_s": 0.2}
BATCH_IMAGES = 1200
REFUSED = frozenset({"REJECTED:disk_full"})


@pytest.fixture
def small_disk(tmp_path: Path):
    """A tmpfs of DISK_MB mounted where the agent keeps its state; unmounted at the end whatever happens."""
    if os.geteuid() != 0:
        reason = "mounting a tmpfs needs root (CI runs the suite as root)"
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)
    mount = tmp_path / "agent" / "state"
    mount.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m,mode=0755", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def fill(path: Path, reserve: Path) -> None:
    """Take every free byte of the filesystem of ``path``: one allocation for the bulk, then block by block and
    byte by byte, so that the next write that needs a new page gets ENOSPC. Stops if the node gives up its reserve
    meanwhile: the disk is full then, and the test is about the node using its reserve, not a writer eating it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        st = os.statvfs(path)
        bulk = st.f_bavail * st.f_frsize - MB
        if bulk > 0:
            try:
                os.posix_fallocate(fd, 0, bulk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise  # else the node wrote meanwhile: the blocks below take what is left
        os.lseek(fd, 0, os.SEEK_END)
        for block in (64 * 1024, 4096, 1):
            while reserve.exists():
                try:
                    os.write(fd, b"\0" * block)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)


def free_mb(path: Path) -> float:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / MB


def test_disk_full_while_a_batch_runs_then_freed(tmp_path, small_disk, quiet_broker, pictures, seed, chaos_agent):
    broker = quiet_broker
    agent = chaos_agent(tmp_path / "agent", broker, "disk-node", storage=LIMITS)
    assert agent.state_dir == small_disk
    node = f"cvw/v1/nodes/{agent.node_id}"
    births = Recorder(broker, f"{node}/status")
    errors = Recorder(broker, f"{node}/errors")
    rec = JobRecorder(broker, agent.node_id)
    ctl = JobController(broker, agent.node_id, "chaos-ctl-disk")
    ballast = small_disk / "ballast"
    try:
        agent.start()
        rng = random.Random(seed)
        batch = infer_job("batch-disk", pictures[1], BATCH_IMAGES)
        assert ctl.submit(batch)
        rec.wait_results(batch.job_id, 2 + rng.randrange(8), timeout=60)

        fill(ballast, small_disk / "reserve")
        births.wait_for(lambda m: any(isinstance(p, dict) and p.get("disk") in ("low", "full") for _, p, _, _ in m))
        errors.wait_for(lambda m: any(isinstance(p, dict) and p["error"]["code"] == "disk_full" for _, p, _, _ in m))
        wait_until(lambda: (rec.latest(batch.job_id) or {}).get("details", {}).get("paused") == "disk_full", 30,
                   "the batch pauses at its next chunk")
        refused = [Job("full-sleep", "debug.sleep", {"seconds": 0.1}, REFUSED),
                   infer_job("full-infer", pictures[1], 5)]
        refused[1].may_end = REFUSED
        info = Job("full-info", "node.info", {}, frozenset({"SUCCEEDED"}))
        for job in [*refused, info]:
            assert ctl.submit(job)
        rec.wait_terminal([j.job_id for j in [*refused, info]], timeout=30)
        # Those answers did not fit in what the ballast left: the node hit ENOSPC and gave up its reserve for them.
        births.wait_for(lambda m: any(isinstance(p, dict) and p.get("disk") == "full" for _, p, _, _ in m))
        assert not (small_disk / "reserve").exists()
        assert rec.latest(batch.job_id)["state"] == "IN_PROGRESS", "the batch must wait, not fail"
        paused_at = len(rec.snapshot()[batch.job_id].results)
        assert paused_at < BATCH_IMAGES // 8, "the batch did not pause: it ran to its end on a full disk"

        ballast.unlink()
        rec.wait_terminal([batch.job_id], timeout=120)
        births.wait_for(lambda m: isinstance(m[-1][1], dict) and m[-1][1].get("disk") == "ok")
        ends = assert_invariants(ctl, rec, agent.state_dir, seed)
        assert rec.latest(batch.job_id)["state"] == "SUCCEEDED"
        _assert_whole_result_logs(small_disk)
        _assert_no_large_temp_files(small_disk)
        print(f"disk filled after {paused_at} chunks of {batch.job_id}; outcomes {ends}")

        # A node that starts on a disk that is already full still comes online and answers.
        agent.stop()
        fill(ballast, small_disk / "reserve")
        assert free_mb(small_disk) < 0.1
        n_births = len(births.messages)
        agent.start()
        births.wait_for(lambda m: len(m) > n_births and m[-1][1].get("state") == "online"
                        and m[-1][1].get("disk") in ("low", "full"))
        late = Job("full-start-info", "node.info", {}, frozenset({"SUCCEEDED"}))
        assert ctl.submit(late)
        rec.wait_terminal([late.job_id], timeout=30)
        assert_invariants(ctl, rec, agent.state_dir, seed, jobs=[late])
    finally:
        for r in (births, errors, rec):
            r.close()
        ctl.close()
        agent.kill()  # the mount goes away next; nothing may hold it


def _assert_whole_result_logs(state_dir: Path) -> None:
    for path in (state_dir / "results").glob("*.jsonl"):
        data = path.read_bytes()
        assert not data or data.endswith(b"\n"), f"{path.name} ends in half a line"
        for line in data.splitlines():
            json.loads(line)


def _assert_no_large_temp_files(state_dir: Path) -> None:
    temps = [(p, p.stat().st_size) for p in state_dir.rglob("*") if p.is_file() and ".tmp" in p.name]
    assert not [t for t in temps if t[1] > 64 * 1024], temps


def test_a_request_refused_on_a_full_disk_still_gets_its_rejected_status(tmp_path, small_disk, quiet_broker, seed,
                                                                          chaos_agent):
    """The disk fills up while the node idles, its reserve intact: the first request it must refuse needs room for
    its REJECTED status and final result. It used to fail on the final result's ENOSPC and answer only with an
    internal_error on N/errors, the job id never getting a status; now the reserve is given up for it."""
    agent = chaos_agent(tmp_path / "agent", quiet_broker, "idle-node", model=False, storage=LIMITS)
    errors = Recorder(quiet_broker, f"cvw/v1/nodes/{agent.node_id}/errors")
    rec = JobRecorder(quiet_broker, agent.node_id)
    ctl = JobController(quiet_broker, agent.node_id, "chaos-ctl-idle")
    reserve = small_disk / "reserve"
    try:
        agent.start()
        wait_until(lambda: reserve.exists() and reserve.stat().st_size == LIMITS["reserve_mb"] * MB, 10,
                   "the node keeps its reserve")
        fill(small_disk / "ballast", reserve)
        wait_until(lambda: "refusing new work" in agent.log(), 10, "the node sees the disk is low")
        job = Job("refused-on-full", "debug.sleep", {"seconds": 0.1}, REFUSED)
        assert ctl.submit(job)
        rec.wait_terminal([job.job_id], timeout=15)
        assert_invariants(ctl, rec, agent.state_dir, seed)
        assert not reserve.exists(), "the reserve is what made room for the answer"
        assert not [p for _, p, _, _ in errors.messages if p["error"]["code"] == "internal_error"]
    finally:
        for r in (errors, rec):
            r.close()
        ctl.close()
        agent.kill()
