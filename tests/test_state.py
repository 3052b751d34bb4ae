"""The state store: atomic, crash-safe files, group commit, outbox order, result logs."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

from agent.state import StateStore
from tests.agent_proc import REPO

WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from agent.state import StateStore
    store = StateStore(Path(sys.argv[1]))
    i = 0
    while True:
        with store.transaction():
            store.put_job({"job_id": f"j{i}", "state": "QUEUED", "pad": "x" * 2000})
            store.outbox_add({"t": "x", "i": i})
        if i % 20 == 0:
            store.wait_durable()
            print(i, flush=True)  # everything up to i is durable
        i += 1
""")


def test_sigkill_never_leaves_a_torn_file(tmp_path):
    state_dir = tmp_path / "state"
    for round_ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(state_dir)], stdout=subprocess.PIPE, text=True,
                                cwd=REPO)
        acked = -1
        deadline = time.monotonic() + 0.4 + 0.15 * round_
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line:
                acked = int(line)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        # Both files always parse, and what was reported durable is there.
        jobs = json.loads((state_dir / "jobs.json").read_text())["jobs"]
        outbox = json.loads((state_dir / "outbox.json").read_text())["outbox"]
        if acked >= 0:
            assert f"j{acked}" in jobs
            assert len(outbox) >= acked + 1
        shutil.rmtree(state_dir, ignore_errors=True)


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
    store.append_result("j1", {"seq": 1, "v": "b2"})
    with open(tmp_path / "results" / "j1.jsonl", "ab") as f:
        f.write(b'{"seq": 2, "v": "tor')  # torn by a crash
    assert [r["v"] for r in store.read_results("j1")] == ["a", "b2"]
    store.close()


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


def test_corrupt_file_is_moved_aside(tmp_path):
    (tmp_path / "jobs.json").write_text('{"jobs": {"a": ')
    store = StateStore(tmp_path)
    assert store.all_jobs() == []
    assert list(tmp_path.glob("jobs.json.corrupt-*"))
    store.close()


def test_disk_matches_memory_while_only_changed_documents_are_reencoded(tmp_path, monkeypatch):
    monkeypatch.delenv("CV_WORKER_STATE_VERIFY", raising=False)  # check the cache itself, not its self-check
    s = StateStore(tmp_path)
    big = {"images": [{"id": f"i{k}", "path": f"{k}.jpg"} for k in range(2000)]}

    def on_disk() -> dict:
        assert s.wait_durable(s.generation, timeout=10)
        return json.loads((tmp_path / "jobs.json").read_text())["jobs"]

    with s.transaction():
        s.put_job({"job_id": "old", "type": "infer", "state": "SUCCEEDED", "params": big})
        s.put_job({"job_id": "run", "type": "infer", "state": "IN_PROGRESS", "progress": 0.0})
    assert on_disk()["old"]["params"] == big
    for k in range(1, 4):
        with s.transaction():
            s.update_job("run", {"progress": k / 4, "details": {"processed": k}})
        assert on_disk()["run"]["progress"] == k / 4 and on_disk()["run"]["details"] == {"processed": k}
    with s.transaction():
        s.put_job({"job_id": "old", "type": "infer", "state": "FAILED", "params": {}})  # replaced whole
        s.meta_set("bd_seq", 7)
    disk = on_disk()
    assert disk["old"] == {"job_id": "old", "type": "infer", "state": "FAILED", "params": {}}
    with s.transaction():
        s.remove_jobs(["old"])
    assert set(on_disk()) == {"run"}
    s.close()
    # And a fresh store reads back exactly what the agent had in memory.
    again = StateStore(tmp_path, read_only=True)
    assert again.get_job("run")["progress"] == 0.75 and again.get_job("old") is None
    assert again.meta_get("bd_seq") == 7
