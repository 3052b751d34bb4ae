"""Disk pressure, end to end: a real agent whose state directory is a small tmpfs that real ballast files fill.

What a full disk must never do: fail a job, turn an image's output into an error, leave half a result line or a
temporary file, keep the node from connecting, or silence it. What it must do: refuse new work with `disk_full`
(REJECTED, `N/errors`, the birth's `disk`, `node.stats`), pause running jobs, delete the oldest outputs first, keep
answering control jobs, and go on by itself once there is room. Plus the disk guard's levels and reserve file,
on a real tmpfs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.diskguard import MB, DiskGuard, DiskLimits, DiskReading, free_bytes
from agent.inference import formats
from agent.storage import atomic_write_bytes
from tests.agent_proc import Recorder, controller, wait_until, write_config
from tests.http.conftest import free_port
from tests.infer.conftest import items_of
from tests.storage_helpers import images, infer_agent, storage_of

# -- a small disk ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size_mb: int) -> Iterator[Path]:
    """``path`` as a tmpfs of ``size_mb`` for the block; skipped (saying why) where it cannot be mounted."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for a full disk needs root (CI runs as root)")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs although root (a container without CAP_SYS_ADMIN?): {r.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)  # an agent that failed to stop still holds it


def fill(directory: Path, leave: int = 0) -> Path:
    """A ballast file that leaves about ``leave`` bytes free on the filesystem of ``directory``; 0: not a byte."""
    path = directory / "ballast"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        extra = (free_bytes(directory) or 0) - leave - (64 * 1024 if leave == 0 else 0)
        if extra > 0:
            os.posix_fallocate(fd, os.fstat(fd).st_size, extra)
        if leave == 0:
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\1" * 4096)
            assert free_bytes(directory) == 0
    finally:
        os.close(fd)
    return path


def temp_files(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if ".tmp" in p.name]


def assert_whole_result_lines(state_dir: Path) -> None:
    for path in (state_dir / "results").glob("*.jsonl"):
        data = path.read_bytes()
        assert not data or data.endswith(b"\n"), f"{path.name} ends in half a line"
        for line in data.splitlines():
            json.loads(line)


# -- an agent on it -----------------------------------------------------------------------------------------------


def births(rec: Recorder) -> list[dict[str, Any]]:
    return [p for p in rec.payloads("/status") if isinstance(p, dict) and p.get("state") == "online"]


def disk_errors(rec: Recorder) -> list[dict[str, Any]]:
    return [p for p in rec.payloads("/errors") if isinstance(p, dict) and p["error"]["code"] == "disk_full"]


def paused(outcome: Any) -> bool:
    return any((s.get("details") or {}).get("paused") == "disk_full" for s in outcome.statuses)


# -- end to end ---------------------------------------------------------------------------------------------------


def test_a_batch_that_fills_the_disk_pauses_and_goes_on_once_there_is_room(tmp_path, mosquitto, picture_dir):
    """The issue's measurement: two infer batches on a disk that runs full. They pause (the annotating one the
    moment an annotated copy does not fit), never fail, and end SUCCEEDED with every image once; meanwhile new work
    is REJECTED `disk_full`, control jobs answer, and the fleet is told."""
    node = "disk-batch"
    with tmpfs(tmp_path / node / "state", 48) as state:
        # No periodic check: only the failed writes themselves can tell the node that the disk is full.
        agent = infer_agent(tmp_path / node, mosquitto, picture_dir, node, storage={
            "free_low_mb": 2, "free_resume_mb": 4, "reserve_mb": 1, "check_interval_s": 3600})
        rec = Recorder(mosquitto, f"cvw/v1/nodes/{node}/status", f"cvw/v1/nodes/{node}/errors")
        agent.start()
        with controller(mosquitto) as ctl:
            wait_until(lambda: (state / "reserve").exists(), what="the reserve file")
            ballast = fill(state, leave=3 * MB)  # the annotated copies (~9 MB) cannot fit
            big = ctl.submit("infer", {"model": "blazeface", "annotate": True, "images": images(150)}, node=node)
            small = ctl.submit("infer", {"model": "blazeface", "output": "vott-csv", "images": images(300, "s")},
                               node=node)
            wait_until(lambda: paused(ctl.outcome(big)), 90, "the annotating batch paused",
                       lambda: (ctl.outcome(big).last, agent.log()[-3000:]))

            refused = ctl.wait(ctl.submit("infer", {"model": "blazeface", "images": images(1)}, node=node), 30)
            assert refused.state == "REJECTED" and refused.last["error"]["code"] == "disk_full", refused.last
            info = ctl.wait(ctl.submit("node.info", node=node), 30)
            assert info.state == "SUCCEEDED" and info.results[-1]["info"]["disk"] != "ok"
            storage = storage_of(ctl, node)
            assert storage["level"] != "ok" and storage["reserve_bytes"] == 0, storage
            rec.wait_for(lambda m: disk_errors(rec) and any(b["disk"] != "ok" for b in births(rec)))
            assert ctl.outcome(big).state == "IN_PROGRESS"
            assert not temp_files(state), temp_files(state)

            ballast.unlink()
            for jid, n, prefix in ((big, 150, "i"), (small, 300, "s")):
                out = ctl.wait(jid, timeout=180)
                assert out.state == "SUCCEEDED", (out.last, agent.log()[-3000:])
                items = items_of(out.results)
                assert [i["id"] for i in items] == [f"{prefix}{k}" for k in range(n)]  # each once, in order
                assert all(i["ok"] for i in items)
            out = ctl.outcome(big)
            assert out.results[-1]["annotate_errors"] == 0
            assert not [i for i in items_of(out.results) if "annotate_error" in i]
            assert all(Path(i["annotated"]).is_file() for i in items_of(out.results))
            rec.wait_for(lambda m: births(rec)[-1]["disk"] == "ok")
            assert storage_of(ctl, node)["level"] == "ok"
        rec.close()
        agent.stop()
        assert "Traceback" not in agent.log()
        assert_whole_result_lines(state)
        assert not temp_files(state), temp_files(state)


def test_under_the_low_water_mark_the_oldest_outputs_go_first(tmp_path, mosquitto, picture_dir):
    node = "disk-low"
    with tmpfs(tmp_path / node / "state", 32) as state:
        agent = infer_agent(tmp_path / node, mosquitto, picture_dir, node, storage={
            "free_low_mb": 4, "free_resume_mb": 4.5, "reserve_mb": 0, "check_interval_s": 0.2}).start()
        with controller(mosquitto) as ctl:
            done = []
            for prefix in ("a", "b"):
                out = ctl.wait(ctl.submit("infer", {"model": "blazeface", "annotate": True,
                                                    "images": images(30, prefix)}, node=node), timeout=60)
                assert out.state == "SUCCEEDED"
                done.append(out.job_id)
            older, newer = (state / "outputs" / j for j in done)
            size = sum(p.stat().st_size for p in older.rglob("*") if p.is_file())
            assert size > 1.5 * MB
            # Under the mark by less than the older job's outputs: those go, nothing else.
            fill(state, leave=int(4.5 * MB - size / 2))
            wait_until(lambda: not older.exists(), what="the older job's outputs deleted")
            agent.wait_log("under disk pressure")
            storage = storage_of(ctl, node)
            assert storage["level"] == "ok", storage  # freed within the check that found the disk low
            assert newer.is_dir()
            assert {p.stem for p in (state / "results").glob("*.jsonl")} >= set(done)  # outputs go before results
            assert storage["removed"]["outputs"] == {"disk pressure": 1}
            assert storage["outputs_jobs"] == 1 and not storage["removed"]["results"]


def test_an_agent_started_on_a_full_disk_connects_and_answers(tmp_path, mosquitto, picture_dir):
    """A new node whose disk is full before it ever ran: nothing it needs may wait for a write (its bd_seq, its
    runtime file, its HTTP token); it connects, says so, and takes the request that waited once there is room."""
    node = "disk-new"
    with tmpfs(tmp_path / node / "state", 8) as state:
        agent = infer_agent(tmp_path / node, mosquitto, picture_dir, node, model=False, storage={
            "free_low_mb": 2, "free_resume_mb": 3, "reserve_mb": 1, "check_interval_s": 0.5},
            http={"enabled": True, "bind": "127.0.0.1", "port": free_port()})
        ballast = fill(state)
        rec = Recorder(mosquitto, f"cvw/v1/nodes/{node}/status", f"cvw/v1/nodes/{node}/errors")
        agent.start(timeout=30)
        rec.wait_for(lambda m: births(rec) and disk_errors(rec))
        assert births(rec)[-1]["disk"] != "ok"
        agent.wait_log("cannot write runtime file")
        agent.wait_log("HTTP API not started")
        assert not temp_files(state), temp_files(state)
        assert not (state / "http-token").exists()  # an empty one would keep the API off for good
        with controller(mosquitto) as ctl:
            info = ctl.submit("node.info", node=node)
            ballast.unlink()
            out = ctl.wait(info, timeout=30)
            assert out.state == "SUCCEEDED", out.last
            rec.wait_for(lambda m: births(rec)[-1]["disk"] == "ok")
        rec.close()
        agent.stop()
        assert not temp_files(state), temp_files(state)


def test_a_node_restarted_on_a_full_disk_answers_from_its_reserve_and_reconnects(tmp_path, mosquitto,
                                                                                  picture_dir):
    node = "disk-old"
    with tmpfs(tmp_path / node / "state", 8) as state:
        agent = infer_agent(tmp_path / node, mosquitto, picture_dir, node, model=False, storage={
            "free_low_mb": 2, "free_resume_mb": 3, "reserve_mb": 1, "check_interval_s": 0.5}).start()
        # No jobs: no old result logs the guard could delete, so the reserve is all the room there is.
        wait_until(lambda: (state / "reserve").exists(), what="the reserve file")
        agent.stop()
        fill(state)
        rec = Recorder(mosquitto, f"cvw/v1/nodes/{node}/status")
        agent.start(wait_online=False)
        agent.wait_log("connected to MQTT broker", count=2, timeout=30)
        with controller(mosquitto) as ctl:
            out = ctl.wait(ctl.submit("node.info", node=node), timeout=30)
            assert out.state == "SUCCEEDED" and out.results[-1]["info"]["disk"] != "ok", out.last
        assert not (state / "reserve").exists()  # released for exactly this
        rec.wait_for(lambda m: births(rec) and births(rec)[-1]["disk"] != "ok")
        rec.close()
        mosquitto.stop()
        mosquitto.start()
        agent.wait_log("connected to MQTT broker", count=3, timeout=30)
        rec = Recorder(mosquitto, f"cvw/v1/nodes/{node}/status")
        rec.wait_for(lambda m: births(rec) and births(rec)[-1]["disk"] != "ok")
        with controller(mosquitto) as ctl:
            assert ctl.wait(ctl.submit("node.info", node=node), timeout=30).state == "SUCCEEDED"
        rec.close()
        agent.stop()
        assert not temp_files(state), temp_files(state)


def test_a_job_interrupted_by_a_crash_ends_once_there_is_room_without_holding_up_the_start(tmp_path, mosquitto,
                                                                                          picture_dir):
    """A job that cannot resume ends FAILED `interrupted` at the next start; on a disk full to the last byte (no
    reserve) its final result cannot be stored yet, and the start must not wait for that."""
    node = "disk-crash"
    with tmpfs(tmp_path / node / "state", 8) as state:
        agent = infer_agent(tmp_path / node, mosquitto, picture_dir, node, model=False, storage={
            "free_low_mb": 2, "free_resume_mb": 3, "reserve_mb": 0, "check_interval_s": 0.5}).start()
        with controller(mosquitto) as ctl:
            jid = ctl.submit("debug.sleep", {"seconds": 600, "resumable": False}, node=node)
            wait_until(lambda: ctl.outcome(jid).state == "IN_PROGRESS", what="the job running")
        agent.kill()
        ballast = fill(state)
        rec = Recorder(mosquitto, f"cvw/v1/nodes/{node}/status")
        agent.start(wait_online=False)
        agent.wait_log("connected to MQTT broker", count=2, timeout=30)
        rec.wait_for(lambda m: births(rec) and births(rec)[-1]["disk"] != "ok")
        assert agent.jobs()[jid]["state"] == "IN_PROGRESS"
        ballast.unlink()
        job = wait_until(lambda: (j := agent.jobs()[jid])["state"] != "IN_PROGRESS" and j, 30, "the job ended")
        assert job["state"] == "FAILED" and job["error"]["code"] == "interrupted"
        rec.close()
        agent.stop()


def test_outputs_elsewhere_that_fill_pause_the_job_but_not_the_node(tmp_path, mosquitto, picture_dir):
    """`inference.outputs_dir` on a filesystem of its own: when it fills, the job waits for it (and says so) but
    the state disk has room, so the node takes work, keeps its reserve, and tells nobody it is full."""
    node = "disk-outputs"
    with tmpfs(tmp_path / "outputs", 4) as outputs_dir:
        agent = infer_agent(tmp_path / node, mosquitto, picture_dir, node, storage={"reserve_mb": 1})
        agent.cfg["inference"]["outputs_dir"] = str(outputs_dir)
        write_config(agent.config_path, agent.cfg)
        rec = Recorder(mosquitto, f"cvw/v1/nodes/{node}/status", f"cvw/v1/nodes/{node}/errors")
        agent.start()
        with controller(mosquitto) as ctl:
            ballast = fill(outputs_dir, leave=1 * MB)
            jid = ctl.submit("infer", {"model": "blazeface", "annotate": True, "images": images(40)}, node=node)
            wait_until(lambda: paused(ctl.outcome(jid)), 60, "the job paused",
                       lambda: (ctl.outcome(jid).last, agent.log()[-3000:]))
            other = ctl.wait(ctl.submit("infer", {"model": "blazeface", "images": images(2, "o")}, node=node), 60)
            assert other.state == "SUCCEEDED"  # the node itself is not short of space
            storage = storage_of(ctl, node)
            assert storage["level"] == "ok" and storage["reserve_bytes"] == MB
            ballast.unlink()
            out = ctl.wait(jid, timeout=120)
            assert out.state == "SUCCEEDED", out.last
            items = items_of(out.results)
            assert [i["id"] for i in items] == [f"i{k}" for k in range(40)]
            assert out.results[-1]["annotate_errors"] == 0 and all(Path(i["annotated"]).is_file() for i in items)
            assert "paused" not in out.statuses[-1]["details"]
        assert not disk_errors(rec) and all(b["disk"] == "ok" for b in births(rec))
        rec.close()
        agent.stop()
        assert not temp_files(outputs_dir), temp_files(outputs_dir)


# -- what writes outputs ---------------------------------------------------------------------------------------


def test_output_files_that_do_not_fit_leave_nothing_behind(tmp_path):
    with tmpfs(tmp_path / "disk", 1) as disk:
        fill(disk, leave=64 * 1024)
        with pytest.raises(OSError) as e:
            atomic_write_bytes(disk / "annotated.jpg", os.urandom(256 * 1024), durable=False)
        assert e.value.errno == errno.ENOSPC
        chunks = [{"items": [{"id": f"i{k}", "ok": True, "pad": "x" * 1000} for k in range(50)]}] * 4
        with pytest.raises(OSError) as e:
            formats.write_outputs(iter(chunks), disk / "out", "json")
        assert e.value.errno == errno.ENOSPC
        assert not temp_files(disk) and not (disk / "annotated.jpg").exists()


# -- the guard ------------------------------------------------------------------------------------------------


class Changes:
    """The guard's level-change notifications and its requests for space, with a real file to delete."""

    def __init__(self, disk: Path, old_output: int = 0):
        self.readings: list[DiskReading] = []
        self.asked: list[int] = []
        self.old = disk / "old-output"
        if old_output:
            self.old.write_bytes(b"\0" * old_output)

    def free_space(self, want: int) -> int:
        self.asked.append(want)
        if not self.old.exists():
            return 0
        size = self.old.stat().st_size
        self.old.unlink()
        return size

    def levels(self) -> list[str]:
        return [r.level for r in self.readings]


def guard_on(disk: Path, changes: Changes, low: float = 4, resume: float = 6, reserve: float = 1) -> DiskGuard:
    return DiskGuard(disk, DiskLimits(free_low_bytes=int(low * MB), free_resume_bytes=int(resume * MB),
                                      reserve_bytes=int(reserve * MB), check_interval_s=3600),
                     free_space=changes.free_space, on_change=changes.readings.append)


def test_guard_levels_have_hysteresis_and_ask_for_what_is_missing(tmp_path):
    with tmpfs(tmp_path / "disk", 16) as disk:
        changes = Changes(disk)
        guard = guard_on(disk, changes)
        assert guard.check().level == "ok" and (disk / "reserve").stat().st_size == MB
        ballast = fill(disk, leave=3 * MB)
        assert guard.check().level == "low" and guard.refusing()
        assert changes.levels() == ["low"]
        assert abs(changes.asked[-1] - 3 * MB) < 0.1 * MB  # up to the resume mark
        os.truncate(ballast, ballast.stat().st_size - 2 * MB)  # 5 MB free: over low, under resume
        assert guard.check().level == "low" and changes.levels() == ["low"]
        os.truncate(ballast, ballast.stat().st_size - 2 * MB)
        assert guard.check().level == "ok" and changes.levels() == ["low", "ok"]


def test_guard_frees_space_and_takes_the_reserve_only_with_room_to_spare(tmp_path):
    with tmpfs(tmp_path / "disk", 16) as disk:
        changes = Changes(disk, old_output=3 * MB)
        guard = guard_on(disk, changes, reserve=2)
        fill(disk, leave=int(4.5 * MB))  # ok, but the reserve would take it under the low mark
        assert guard.check().level == "ok" and not (disk / "reserve").exists()
        fill(disk, leave=int(3.5 * MB))
        # Under the mark; deleting the old output (3 MB) gets it over the resume mark in the same check.
        assert guard.check().level == "ok" and not changes.old.exists()
        assert changes.levels() == ["ok"] and len(changes.asked) == 1


def test_a_failed_write_releases_the_reserve_at_once(tmp_path):
    with tmpfs(tmp_path / "disk", 16) as disk:
        changes = Changes(disk)
        guard = guard_on(disk, changes)
        guard.check()
        assert (disk / "reserve").exists()
        ballast = fill(disk)
        guard.report(OSError(errno.EIO, "I/O error"))
        guard.report(None)
        assert guard.level == "ok" and (disk / "reserve").exists()  # only lack of space counts
        guard.report(OSError(errno.ENOSPC, "No space left on device"))
        assert guard.level == "full" and changes.levels() == ["full"]
        assert not (disk / "reserve").exists() and (free_bytes(disk) or 0) >= MB
        assert guard.check().level == "full"  # 1 MB free: still under the low mark
        os.truncate(ballast, ballast.stat().st_size - 4 * MB)
        assert guard.check().level == "low"
        os.unlink(ballast)
        assert guard.check().level == "ok" and (disk / "reserve").stat().st_size == MB
        assert changes.levels() == ["full", "low", "ok"]


def test_a_full_disk_elsewhere_is_not_this_one(tmp_path):
    """ENOSPC from a write on another filesystem (an outputs directory of its own) leaves this disk's level and
    reserve alone: releasing the reserve would not help that write and would only make the node refuse work."""
    with tmpfs(tmp_path / "disk", 16) as disk:
        changes = Changes(disk)
        guard = guard_on(disk, changes)
        guard.check()
        guard.report(OSError(errno.ENOSPC, "No space left on device"))
        assert guard.level == "ok" and (disk / "reserve").exists() and not changes.readings


def test_the_guard_starts_on_a_full_disk_without_writing(tmp_path):
    with tmpfs(tmp_path / "disk", 8) as disk:
        fill(disk)
        before = sorted(os.listdir(disk))
        changes = Changes(disk)
        guard = guard_on(disk, changes)
        guard.start()
        try:
            assert guard.level == "low" and changes.levels() == ["low"]
            assert sorted(os.listdir(disk)) == before
        finally:
            guard.stop()
