"""The state store: one commit is one atomic journal append, whatever kills the writer and wherever; group commit;
compaction; outbox order; result logs; a full disk; the start-up check; state of the earlier two-file format."""

from __future__ import annotations

import errno
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from agent.journal import SNAPSHOT, Journal
from agent.state import DiskFull, StateStore
from tests.agent_proc import REPO

# Each commit changes job "j" (a new version, one more result line), queues its status, and adds a finished job:
# on disk they must always agree, whatever instant the writer dies at.
WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from agent.state import DiskFull, StateStore
    store = StateStore(Path(sys.argv[1]), compact_min_bytes=int(sys.argv[3]))
    for i in range(int(sys.argv[2])):
        while True:
            try:
                with store.transaction():
                    job = store.get_job("j") or {"job_id": "j", "state": "IN_PROGRESS", "version": 0,
                                                 "result_seq": 0, "result_bytes": 0}
                    size = store.append_result("j", {"seq": job["result_seq"], "i": i, "pad": "r" * 50})
                    job.update(version=job["version"] + 1, result_seq=job["result_seq"] + 1, result_bytes=size)
                    store.put_job(job)
                    store.outbox_add({"k": "status", "j": "j", "v": job["version"], "r": True, "t": "s", "p": ""})
                    store.put_job({"job_id": f"done{i}", "state": "SUCCEEDED", "version": 1, "pad": "x" * 400})
                break
            except DiskFull:
                time.sleep(0.05)  # nothing of the transaction was kept; try again
        store.wait_durable()
        # Everything up to commit i is durable. Said with mkdir, not write(): the tests inject faults into writes.
        os.mkdir(os.path.join(sys.argv[4], str(i)))
    store.close()
""")


def run_writer(state_dir: Path, commits: int, compact_min: int, strace: list[str] = (),
               timeout: float = 60) -> tuple[int, int]:
    """(last commit the writer reported durable or -1, exit status)."""
    acks = state_dir.with_name(state_dir.name + ".acks")
    acks.mkdir(parents=True)
    cmd = [*strace, sys.executable, "-c", WRITER, str(state_dir), str(commits), str(compact_min), str(acks)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout)
    done = [int(p.name) for p in acks.iterdir()]
    shutil.rmtree(acks)
    return max(done, default=-1), proc.returncode


def assert_consistent(state_dir: Path, durable_upto: int) -> int:
    """Reopen as the agent does and check that the job, its queued statuses, its result log and the finished jobs
    all come from the same commits. Returns how many commits are on disk."""
    store = StateStore(state_dir)
    try:
        report = store.check()
        assert report.reannounce == [], report.problems
        job = store.get_job("j")
        n = job["version"] if job else 0
        assert n >= durable_upto + 1, f"commit {durable_upto} was reported durable but only {n} are on disk"
        statuses = sorted(e["v"] for _, e in store.outbox_after(0, limit=10**6) if e.get("j") == "j")
        assert statuses == list(range(1, n + 1)), f"job at v{n} but queued statuses {statuses}"
        results = store.read_results("j")
        assert [r["i"] for r in results] == list(range(n)), "result lines and the job's counter disagree"
        if job:
            assert store.result_path("j").stat().st_size == job["result_bytes"], "uncommitted bytes left in the log"
        assert sorted(j["job_id"] for j in store.all_jobs() if j["job_id"] != "j") == sorted(f"done{i}"
                                                                                          for i in range(n))
        return n
    finally:
        store.close()


STRACE = shutil.which("strace")
# What the agent's state writes with: files' contents, their fsyncs, the journal's fdatasync, the snapshot's rename,
# deleting covered segments. (Cutting a failed append back, ftruncate, happens only after a failed write: the
# full-disk test kills there.)
COMMIT_SYSCALLS = ("write", "fdatasync", "fsync", "rename", "unlink")


@pytest.mark.skipif(STRACE is None, reason="strace is not installed (make test installs it)")
@pytest.mark.parametrize("syscall", COMMIT_SYSCALLS)
def test_a_kill_at_every_step_of_a_commit_leaves_one_whole_commit(tmp_path, syscall):
    """SIGKILL at the 1st, 2nd, 3rd... call of each syscall the state makes (per thread, so every step of commits,
    result appends and compactions), until a run gets through untouched: the state on disk is always exactly the
    commits before the kill. The two-file format failed this at the rename between jobs.json and outbox.json."""
    commits = 8
    k = 1
    while True:
        state_dir = tmp_path / f"{syscall}-{k}"
        durable, rc = run_writer(state_dir, commits, compact_min=1500,
                                 strace=[STRACE, "-f", "-qq", "-o", "/dev/null",
                                         f"--inject={syscall}:signal=KILL:when={k}"])
        on_disk = assert_consistent(state_dir, durable)
        if rc == 0:
            assert on_disk == commits
            break
        assert rc == -signal.SIGKILL or rc == 128 + signal.SIGKILL, f"writer exited {rc}"
        shutil.rmtree(state_dir)
        k += 1
        assert k < 400, "the writer never got through"
    assert k > 1, f"no call of {syscall} was reached: the kills did not test the commits"


@pytest.mark.skipif(STRACE is None, reason="strace is not installed (make test installs it)")
def test_a_full_disk_fails_appends_whole_and_the_state_catches_up(tmp_path):
    """ENOSPC on a run of writes (journal, result log, snapshot): nothing half-written stays, the transaction that
    hit it is redone by the writer, and the committer retries until the disk takes it."""
    for first in (3, 6, 9, 12):
        state_dir = tmp_path / f"full-{first}"
        durable, rc = run_writer(state_dir, 6, compact_min=1500,
                                 strace=[STRACE, "-f", "-qq", "-o", "/dev/null",
                                         f"--inject=write:error=ENOSPC:when={first}..{first + 4}"])
        assert rc == 0 and durable == 5
        assert assert_consistent(state_dir, durable) == 6
        # And killed while cutting the failed write back: the next start cuts it.
        state_dir = tmp_path / f"full-kill-{first}"
        durable, rc = run_writer(state_dir, 6, compact_min=1500,
                                 strace=[STRACE, "-f", "-qq", "-o", "/dev/null",
                                         f"--inject=write:error=ENOSPC:when={first}..{first + 4}",
                                         "--inject=ftruncate:signal=KILL:when=1"])
        assert_consistent(state_dir, durable)
        for seg in Journal(state_dir).segments():
            assert seg.path.read_bytes().endswith(b"\n")


def test_sigkill_at_random_moments_never_tears_a_commit(tmp_path):
    for round_ in range(6):
        state_dir = tmp_path / f"r{round_}"
        acks = tmp_path / f"r{round_}.acks"
        acks.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(state_dir), "100000", "20000", str(acks)],
                                cwd=REPO)
        # Kill it at some moment after it has committed a few (how many depends on the machine).
        deadline = time.monotonic() + 30
        while len(list(acks.iterdir())) < 5 * (round_ + 1) and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        acked = max((int(p.name) for p in acks.iterdir()), default=-1)
        assert acked >= 0
        assert assert_consistent(state_dir, acked) >= acked + 1


def test_a_power_cut_inside_the_last_record_loses_exactly_that_commit(tmp_path):
    """Data written but not yet synced may reach the disk in part: cut the journal at every byte of its last
    record; loading gives the state before that commit, and the next commit goes on from there."""
    run_writer(tmp_path / "src", 3, compact_min=10**9)
    seg = Journal(tmp_path / "src").segments()[-1]
    data = seg.path.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    for cut in range(last_start, len(data)):
        state_dir = tmp_path / f"cut{cut}"
        shutil.copytree(tmp_path / "src", state_dir)
        (state_dir / "journal" / seg.path.name).write_bytes(data[:cut])
        store = StateStore(state_dir)
        assert store.get_job("j")["version"] == 2
        assert any("torn last record" in p for p in store.load_problems) == (cut > last_start)
        with store.transaction():
            store.meta_set("after", cut)
        store.close()
        again = StateStore(state_dir, read_only=True)
        assert again.get_job("j")["version"] == 2 and again.meta_get("after") == cut


def test_group_commit_batches_fsyncs(tmp_path):
    store = StateStore(tmp_path, min_commit_interval_s=0.01)
    commits = []
    store.add_commit_listener(commits.append)

    def writer(k: int) -> None:
        for i in range(200):
            with store.transaction():
                store.put_job({"job_id": f"w{k}-{i}", "state": "QUEUED"})

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.wait_durable(timeout=10)
    store.close()
    assert len(commits) < 800 / 4, f"{len(commits)} commits for 800 transactions"
    reopened = StateStore(tmp_path, read_only=True)
    assert len(reopened.all_jobs()) == 800


def test_commit_cost_depends_on_the_change_not_on_the_state(tmp_path):
    """A job update appends that job's document, however many jobs (and params) the state holds."""
    store = StateStore(tmp_path, compact_min_bytes=10**9)
    with store.transaction():
        for i in range(2000):
            store.put_job({"job_id": f"old{i}", "state": "SUCCEEDED", "version": 3, "pad": "p" * 200})
            store.put_params(f"old{i}", {"images": [{"id": str(k)} for k in range(20)]})
        store.put_job({"job_id": "run", "state": "IN_PROGRESS", "version": 1, "progress": 0.0})
    store.wait_durable()
    seg = Journal(tmp_path).segments()[-1].path
    before = seg.stat().st_size
    for k in range(1, 11):
        with store.transaction():
            store.update_job("run", {"progress": k / 10})
        store.wait_durable()
    per_commit = (seg.stat().st_size - before) / 10
    assert per_commit < 200, f"{per_commit:.0f} bytes appended per one-job update"
    store.close()
    again = StateStore(tmp_path, read_only=True)
    assert again.get_job("run")["progress"] == 1.0 and len(again.all_jobs()) == 2001


def test_compaction_writes_a_snapshot_and_drops_covered_segments(tmp_path):
    store = StateStore(tmp_path, compact_min_bytes=20_000)
    for i in range(400):
        with store.transaction():
            store.put_job({"job_id": f"j{i % 50}", "state": "QUEUED", "version": i, "pad": "x" * 100})
            store.meta_set("i", i)
        if i % 40 == 0:
            store.wait_durable()
    store.wait_durable()
    with store._cond:
        store._cond.wait_for(lambda: not store._compacting, 10)
    assert store.figures.compactions >= 2
    assert (tmp_path / SNAPSHOT).exists()
    journal_bytes = sum(s.path.stat().st_size for s in Journal(tmp_path).segments())
    assert journal_bytes < 60_000, "covered segments were deleted"
    expected = {j["job_id"]: j for j in store.all_jobs()}
    store.close()
    again = StateStore(tmp_path, read_only=True)
    assert {j["job_id"]: j for j in again.all_jobs()} == expected and again.meta_get("i") == 399


def test_a_reader_racing_compactions_always_sees_a_whole_state(tmp_path):
    """`cv-worker jobs` reads while the agent commits and compacts: it sees some commit, never a mix or a gap."""
    store = StateStore(tmp_path, compact_min_bytes=5_000)
    stop = threading.Event()

    def write() -> None:
        i = 0
        while not stop.is_set():
            with store.transaction():
                store.put_job({"job_id": "a", "state": "QUEUED", "version": i, "pad": "x" * 300})
                store.put_job({"job_id": "b", "state": "QUEUED", "version": i, "pad": "y" * 300})
            store.wait_durable()
            i += 1

    t = threading.Thread(target=write)
    t.start()
    try:
        seen = 0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            reader = StateStore(tmp_path, read_only=True)
            jobs = {j["job_id"]: j["version"] for j in reader.all_jobs()}
            if jobs:
                assert jobs["a"] == jobs["b"], jobs
                seen += 1
    finally:
        stop.set()
        t.join()
        store.close()
    assert seen > 5 and store.figures.compactions >= 1


def test_outbox_order_and_results_log(tmp_path):
    store = StateStore(tmp_path)
    with store.transaction():
        ids = [store.outbox_add({"n": n}) for n in range(5)]
    store.outbox_remove(ids[:2])
    assert [e["n"] for _, e in store.outbox_after(0)] == [2, 3, 4]
    assert [e["n"] for _, e in store.outbox_after(ids[3])] == [4]
    # A chunk redone after a crash appears twice in the log; readers see it once, the last copy.
    store.append_result("j1", {"seq": 0, "v": "a"})
    store.append_result("j1", {"seq": 1, "v": "b"})
    size = store.append_result("j1", {"seq": 1, "v": "b2"})
    with open(tmp_path / "results" / "j1.jsonl", "ab") as f:
        f.write(b'{"seq": 2, "v": "tor')  # written after the last commit that counted results
    assert [r["v"] for r in store.read_results("j1")] == ["a", "b2"]
    assert store.truncate_results("j1", size) and (tmp_path / "results" / "j1.jsonl").stat().st_size == size
    store.close()


@pytest.mark.parametrize("compacted", [False, True])
def test_outbox_order_survives_a_restart(tmp_path, compacted):
    """Entries come back in id order after a restart, also across a power of ten in one commit (a journal record
    lists its changes sorted as text: "10" before "9"). Out of order, the outbox published a job's statuses
    backwards after a restart, and the broker kept an old IN_PROGRESS as the retained status of a finished job."""
    store = StateStore(tmp_path, compact_min_bytes=1 if compacted else 4 * 1024 * 1024)
    with store.transaction():
        ids = [store.outbox_add({"n": n}) for n in range(12)]
    store.wait_durable()
    with store.transaction():
        store.meta_set("m", 1)  # a second commit: with compaction on, the first is in a snapshot by now
    store.close()
    assert (tmp_path / SNAPSHOT).exists() == compacted
    reopened = StateStore(tmp_path)
    assert [i for i, _ in reopened.outbox_after(0)] == ids
    assert [i for i, _ in reopened.outbox_after(ids[8])] == ids[9:]
    with reopened.transaction():
        assert reopened.outbox_add({"n": 12}) == ids[-1] + 1
    assert [i for i, _ in reopened.outbox_after(ids[-1])] == [ids[-1] + 1]
    reopened.close()


def test_outbox_ids_keep_growing_after_it_empties(tmp_path):
    store = StateStore(tmp_path)
    with store.transaction():
        old = [store.outbox_add({"n": n}) for n in range(3)]
    store.close()
    reopened = StateStore(tmp_path)
    with reopened.transaction():
        reopened.outbox_remove(old)  # acknowledged after the restart, before anything new was queued
    with reopened.transaction():
        new = reopened.outbox_add({"n": 3})
    assert new > max(old), "a publisher that handed out ids up to max(old) must still see the new entry"
    reopened.close()


def test_corrupt_snapshot_is_moved_aside(tmp_path):
    (tmp_path / SNAPSHOT).write_text('{"format": 2, "seq": 1, "tables": {"jobs": {"a": ')
    store = StateStore(tmp_path)
    assert store.all_jobs() == []
    assert list(tmp_path.glob(f"{SNAPSHOT}.corrupt-*"))
    store.close()


def _keeps_what_is_written(state_dir: Path) -> None:
    store = StateStore(state_dir)
    with store.transaction():
        store.put_job({"job_id": "a", "state": "QUEUED", "version": 1})
    assert store.wait_durable(timeout=10)
    assert store.get_job("a") is not None, "the write went nowhere"
    store.close()
    reopened = StateStore(state_dir)
    assert [j["job_id"] for j in reopened.all_jobs()] == ["a"]
    reopened.close()


@pytest.mark.parametrize("start", ["first segment created, its first record never written", "corrupt snapshot"])
def test_a_state_that_loads_empty_keeps_what_is_written_next(tmp_path, start):
    """A journal whose first record was never written (a kill between creating the segment and writing it, found
    by the chaos suite) and a snapshot moved aside both load as an empty state; writes to it must reach the disk.
    They once went to a throwaway dict: the node acknowledged every request and never ran one."""
    if start.startswith("first segment"):
        (tmp_path / "journal").mkdir()
        (tmp_path / "journal" / "00000000000000000001.log").write_bytes(b"")
    else:
        (tmp_path / SNAPSHOT).write_text('{"format": 2, "seq": 1, "tables": {"jobs": {"a": ')
    _keeps_what_is_written(tmp_path)


def test_large_params_are_spooled_and_finished_jobs_keep_a_summary(tmp_path):
    store = StateStore(tmp_path, spool_min_bytes=10_000)
    big = {"model": "m", "images": [{"id": str(k), "data": "A" * 1000} for k in range(50)]}
    with store.transaction():
        store.put_job({"job_id": "big", "state": "QUEUED", "version": 1})
        store.put_params("big", big)
    store.wait_durable()
    assert (tmp_path / "spool" / "big.json").exists()
    assert sum(s.path.stat().st_size for s in Journal(tmp_path).segments()) < 2_000, "params stay out of the journal"
    assert store.get_params("big") == big
    with store.transaction():
        store.replace_params("big", {"model": "m", "images": {"omitted": "list", "items": 50}})
    store.close()
    assert not (tmp_path / "spool" / "big.json").exists()
    again = StateStore(tmp_path)
    assert again.get_params("big")["images"] == {"omitted": "list", "items": 50}
    again.close()


def test_state_of_the_two_file_format_is_read_and_a_torn_pair_is_repaired(tmp_path):
    """The earlier format's defect, as a power-cut image showed it: jobs.json already at v3 (SUCCEEDED), outbox.json
    still from the commit before (only v2 queued). The start-up check finds the pair and queues v3 again; the state
    moves into the journal and the old files go."""
    (tmp_path / "jobs.json").write_text(json.dumps({
        "jobs": {"n1": {"job_id": "n1", "type": "node.info", "state": "SUCCEEDED", "version": 3,
                        "params": {}, "result_seq": 1}},
        "meta": {"bd_seq": {"value": 7}}}))
    (tmp_path / "outbox.json").write_text(json.dumps({"outbox": {
        "5": {"t": "cvw/v1/nodes/a/jobs/n1/status", "p": "{}", "r": True, "k": "status", "j": "n1", "v": 2}}}))
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "n1.jsonl").write_text('{"seq":0,"final":true}\n')
    store = StateStore(tmp_path)
    report = store.check()
    assert report.reannounce == ["n1"]
    assert store.meta_get("bd_seq") == 7 and store.get_params("n1") == {}
    with store.transaction():
        store.meta_set("touched", True)
    store.close()
    assert not (tmp_path / "jobs.json").exists() and not (tmp_path / "outbox.json").exists()
    again = StateStore(tmp_path, read_only=True)
    assert again.get_job("n1")["state"] == "SUCCEEDED" and again.meta_get("bd_seq") == 7


def test_in_place_changes_are_caught_in_verification_mode(tmp_path, caplog):
    store = StateStore(tmp_path)
    with store.transaction():
        store.put_job({"job_id": "a", "state": "QUEUED", "version": 1, "details": {"n": 1}})
    store.wait_durable()
    raw = store.jobs_table.raw()["a"]
    raw["details"]["n"] = 2  # behind the table's back: a bug the verification must catch
    with store.transaction():
        store.meta_set("x", 1)
    store.close()
    assert "STATE SNAPSHOT MISMATCH" in caplog.text
    assert StateStore(tmp_path, read_only=True).get_job("a")["details"] == {"n": 2}


def test_disk_full_error_is_classified(tmp_path, monkeypatch):
    store = StateStore(tmp_path)
    real_write = __import__("os").write

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("agent.state.os.write", full)
    with pytest.raises(DiskFull):
        store.append_result("x", {"seq": 0})
    monkeypatch.setattr("agent.state.os.write", real_write)
    assert not (tmp_path / "results" / "x.jsonl").read_bytes()
    store.close()
