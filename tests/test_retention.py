"""Retention of what jobs leave on disk: result logs and outputs by age and bytes, oldest first, what disk pressure
takes, running jobs untouched (on a real state store and real files); and, on a real agent, the budgets applied
soon after jobs end, pruned jobs taking their outputs along, and all of it in `node.stats`."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from agent.diskguard import MB
from agent.retention import Retention, RetentionLimits
from agent.state import StateStore
from tests.agent_proc import AgentProc, controller, wait_until
from tests.storage_helpers import infer_agent, storage_of

DAY = 86400.0
KB = 1024
NOW = 1_900_000_000.0


@contextlib.contextmanager
def stopping(agent: AgentProc) -> Iterator[AgentProc]:
    try:
        yield agent
    finally:
        agent.stop()


class Node:
    """A state directory with finished and running jobs, their result logs and outputs."""

    def __init__(self, root: Path, results_max: int = 10**9, outputs_max: int = 10**9, outputs_days: float = 7):
        self.store = StateStore(root / "state")
        self.outputs = root / "state" / "outputs"
        self.retention = Retention(self.store, self.outputs, RetentionLimits(
            results_max_bytes=results_max, outputs_max_bytes=outputs_max, outputs_max_age_s=outputs_days * DAY))

    def job(self, job_id: str, finished: float, results: int = 10 * KB, outputs: int = 0,
            state: str = "SUCCEEDED") -> None:
        running = state in ("QUEUED", "IN_PROGRESS")
        with self.store.transaction():
            self.store.put_job({"job_id": job_id, "type": "infer", "state": state, "version": 3,
                                "created": finished - 60, "updated": finished,
                                "finished": None if running else finished, "result_seq": 1})
            if results:
                # A line of exactly `results` bytes.
                size = self.store.append_result(job_id, {"seq": 0, "pad": "x" * (results - 19)})
                self.store.update_job(job_id, {"result_bytes": size})
        if outputs:
            d = self.outputs / job_id / "annotated"
            d.mkdir(parents=True)
            (d / "a.jpg").write_bytes(os.urandom(outputs // 2))
            (d / "b.jpg").write_bytes(os.urandom(outputs - outputs // 2))
        self.store.wait_durable()

    def has_outputs(self, job_id: str) -> bool:
        return (self.outputs / job_id).is_dir()

    def has_results(self, job_id: str) -> bool:
        return self.store.result_path(job_id).exists()

    def results_pruned(self, job_id: str) -> Optional[str]:
        return (self.store.get_job(job_id) or {}).get("results_pruned")


def test_outputs_older_than_outputs_days_go(tmp_path):
    n = Node(tmp_path, outputs_days=7)
    n.job("old", NOW - 8 * DAY, outputs=100 * KB)
    n.job("week", NOW - 6.9 * DAY, outputs=100 * KB)
    n.job("new", NOW - 60, outputs=100 * KB)
    assert n.retention.enforce(now=NOW) == 100 * KB
    assert [j for j in ("old", "week", "new") if n.has_outputs(j)] == ["week", "new"]
    assert n.has_results("old")  # results follow the job's own retention, not outputs_days
    assert n.retention.removed.outputs == {"age": 1}
    n.store.close()


def test_outputs_over_their_budget_go_oldest_first(tmp_path):
    n = Node(tmp_path, outputs_max=250 * KB)
    for k, job_id in enumerate(("a", "b", "c", "d")):
        n.job(job_id, NOW - 3600 + k, outputs=100 * KB)
    assert n.retention.enforce(now=NOW) == 200 * KB
    assert [j for j in "abcd" if n.has_outputs(j)] == ["c", "d"]
    assert n.retention.removed.outputs == {"bytes": 2}
    n.store.close()


def test_result_logs_over_their_budget_go_oldest_first_and_the_job_says_why(tmp_path):
    n = Node(tmp_path, results_max=25 * KB)
    for k, job_id in enumerate(("a", "b", "c")):
        n.job(job_id, NOW - 3600 + k, results=10 * KB)
    n.retention.enforce(now=NOW)
    assert [j for j in "abc" if n.has_results(j)] == ["b", "c"]
    assert n.results_pruned("a") == "bytes" and n.store.get_job("a")["state"] == "SUCCEEDED"
    assert n.retention.removed.results == {"bytes": 1}
    n.store.close()


def test_outputs_of_jobs_no_longer_kept_go(tmp_path):
    n = Node(tmp_path)
    n.job("kept", NOW - 60, outputs=10 * KB)
    (n.outputs / "pruned-long-ago" / "masks").mkdir(parents=True)
    (n.outputs / "pruned-long-ago" / "masks" / "m.png").write_bytes(b"png" * 100)
    n.retention.enforce(now=NOW)
    assert n.has_outputs("kept") and not n.has_outputs("pruned-long-ago")
    assert n.retention.removed.outputs == {"job pruned": 1}
    # What the engine does when it prunes a job: its record and result log go, then its outputs.
    results = n.store.remove_jobs(["kept"])
    n.retention.jobs_pruned(["kept"], {"kept": "age"}, results)
    assert not n.has_outputs("kept") and not n.has_results("kept")
    assert n.retention.removed.jobs == {"age": 1}
    assert n.retention.removed.results == {"job pruned": 1} and n.retention.removed.outputs == {"job pruned": 2}
    n.store.close()


def test_running_jobs_files_are_never_touched(tmp_path):
    n = Node(tmp_path, results_max=0, outputs_max=0, outputs_days=0.001)
    n.job("running", NOW - 30 * DAY, outputs=100 * KB, state="IN_PROGRESS")
    n.job("queued", NOW - 30 * DAY, results=0, outputs=10 * KB, state="QUEUED")
    n.job("done", NOW - 60, outputs=100 * KB)
    n.retention.enforce(now=NOW)
    assert n.retention.free(10**9) == 0  # nothing finished is left to take
    assert n.has_outputs("running") and n.has_results("running") and n.has_outputs("queued")
    assert not n.has_outputs("done") and not n.has_results("done")
    n.store.close()


def test_disk_pressure_takes_the_oldest_outputs_then_the_oldest_result_logs(tmp_path):
    n = Node(tmp_path)
    n.job("old", NOW - 7200, outputs=100 * KB)
    n.job("new", NOW - 3600, outputs=100 * KB)
    assert n.retention.free(50 * KB) == 100 * KB
    assert not n.has_outputs("old") and n.has_outputs("new")
    assert n.has_results("old") and n.has_results("new")  # every output goes before any result log
    assert n.retention.free(105 * KB) == 110 * KB
    assert not n.has_outputs("new") and not n.has_results("old") and n.has_results("new")
    assert n.results_pruned("old") == "disk pressure" and n.results_pruned("new") is None
    assert n.retention.removed.outputs == {"disk pressure": 2} and n.retention.removed.results == {"disk pressure": 1}
    n.store.close()


def test_the_snapshot_counts_what_is_kept_and_what_went(tmp_path):
    n = Node(tmp_path, outputs_max=150 * KB)
    n.job("a", NOW - 7200, results=4 * KB, outputs=100 * KB)
    n.job("b", NOW - 3600, results=6 * KB, outputs=100 * KB)
    n.job("c", NOW - 60, results=0, outputs=0, state="IN_PROGRESS")
    before = n.retention.snapshot()
    assert (before.result_logs, before.results_bytes) == (2, 10 * KB)
    assert (before.outputs_jobs, before.outputs_files, before.outputs_bytes) == (2, 4, 200 * KB)
    n.retention.enforce(now=NOW)
    after = n.retention.snapshot()
    assert (after.outputs_jobs, after.outputs_files, after.outputs_bytes) == (1, 2, 100 * KB)
    assert after.removed.outputs == {"bytes": 1} and after.removed.freed_bytes == 100 * KB
    n.store.close()


# -- on a real agent ----------------------------------------------------------------------------------------------


def test_node_stats_show_what_the_node_keeps_and_what_retention_removed(tmp_path, mosquitto, picture_dir):
    node = "keeper"
    # Two annotated pictures make 147 KB of outputs and a 1.2 KB result log: the budgets keep one job's of each.
    agent = infer_agent(tmp_path / node, mosquitto, picture_dir, node, storage={
        "outputs_max_mb": 0.2, "results_max_mb": 0.002, "reserve_mb": 1, "free_low_mb": 1, "free_resume_mb": 2},
        jobs={"retention_count": 5, "tombstone_max_kb": 64}).start()
    astronauts = [{"id": f"x{k}", "path": "astronaut.jpg"} for k in range(2)]
    with controller(mosquitto) as ctl, stopping(agent):
        a, b = "job-a", "job-b"
        for jid in (a, b):  # one after the other: `a` is the older
            ctl.submit("infer", {"model": "blazeface", "annotate": True, "images": astronauts}, node=node, job_id=jid)
            assert ctl.wait(jid, timeout=60).state == "SUCCEEDED"
        outputs = agent.state_dir / "outputs"
        # Applied a few seconds after a job ends, not at the next prune a minute later.
        wait_until(lambda: not (outputs / a).exists() and agent.jobs()[a].get("results_pruned"), 30,
                   "the older job's outputs and result log deleted over budget",
                   lambda: (sorted(p.name for p in outputs.iterdir()), agent.log()[-2000:]))
        assert (outputs / b).is_dir() and agent.jobs()[a]["results_pruned"] == "bytes"
        again = ctl.wait(ctl.submit("job.result", {"job_id": a}, node=node), timeout=20)
        assert again.state == "FAILED" and again.last["error"]["code"] == "results_pruned"

        storage = storage_of(ctl, node)
        assert storage["level"] == "ok" and storage["reserve_bytes"] == MB and storage["free_bytes"] > MB
        assert storage["outputs_jobs"] == 1 and storage["outputs_files"] == 2
        assert 100 * KB < storage["outputs_bytes"] < 0.2 * MB
        assert storage["result_logs"] >= 1 and storage["results_bytes"] <= 0.002 * MB
        assert storage["removed"]["outputs"].get("bytes") == 1 and storage["removed"]["results"].get("bytes") == 1
        assert storage["removed"]["freed_bytes"] > 100 * KB
        assert storage["jobs"] == 4 and storage["jobs_bytes"] > 0 and storage["journal_bytes"] > 0
        assert storage["write_error"] is None and storage["spool_files"] == 0

        # Far over jobs.retention_count: the oldest jobs are pruned with their outputs, leaving tombstones, of which
        # no more than jobs.tombstone_max_kb are kept.
        ids = [ctl.submit("node.info", node=node) for _ in range(600)]
        for jid in ids:
            assert ctl.wait(jid, timeout=60).state == "SUCCEEDED"
        storage = wait_until(lambda: (s := storage_of(ctl, node))["removed"]["tombstones"].get("bytes") and s, 90,
                             "tombstones forgotten over jobs.tombstone_max_kb")
        removed = storage["removed"]
        assert removed["jobs"]["count"] >= 500 and "age" not in removed["jobs"]
        assert removed["outputs"].get("job pruned") == 1 and not (outputs / b).exists()
        # Most result logs went with their jobs; some earlier, over storage.results_max_mb.
        assert removed["results"]["job pruned"] > 0 and removed["results"]["bytes"] > 1
        assert 400 < storage["tombstones"] and storage["tombstone_bytes"] <= 64 * KB
        assert storage["outputs_jobs"] == 0 and storage["outputs_bytes"] == 0
        gone = ctl.wait(ctl.submit("job.result", {"job_id": b}, node=node), timeout=20)
        assert gone.state == "FAILED" and gone.last["error"]["code"] == "not_found"


def test_jobs_and_tombstones_go_by_age_with_the_outputs_of_the_jobs(tmp_path, mosquitto, picture_dir):
    """jobs.retention_days and tombstone_days, made seconds long: pruning at the next start takes the job with its
    result log and outputs (reason `age`), and the start after that forgets its tombstone (`age`)."""
    node = "ager"
    days = 2.0 / DAY  # two seconds
    agent = infer_agent(tmp_path / node, mosquitto, picture_dir, node, storage={"reserve_mb": 1, "free_low_mb": 1,
                        "free_resume_mb": 2}, jobs={"retention_days": days, "tombstone_days": days}).start()
    with controller(mosquitto) as ctl:
        jid = ctl.submit("infer", {"model": "blazeface", "annotate": True,
                                   "images": [{"id": "a", "path": "astronaut.jpg"}]}, node=node)
        assert ctl.wait(jid, timeout=60).state == "SUCCEEDED"
    finished = agent.jobs()[jid]["finished"]
    assert (agent.state_dir / "outputs" / jid).is_dir()
    agent.stop()
    wait_until(lambda: time.time() - finished > 2 * days * DAY, what="the job older than retention_days")
    with controller(mosquitto) as ctl, stopping(agent.start()):
        removed = storage_of(ctl, node)["removed"]
        assert removed["jobs"] == {"age": 1} and removed["outputs"] == {"job pruned": 1}
        assert removed["results"] == {"job pruned": 1}
        assert not (agent.state_dir / "outputs" / jid).exists() and jid not in agent.jobs()
        pruned = ctl.wait(ctl.submit("job.result", {"job_id": jid}, node=node), timeout=20)
        assert pruned.state == "FAILED" and pruned.last["error"]["code"] == "not_found"
        tombstoned = time.time()
    wait_until(lambda: time.time() - tombstoned > 2 * days * DAY, what="the tombstone older than tombstone_days")
    with controller(mosquitto) as ctl, stopping(agent.start()):
        storage = storage_of(ctl, node)
        # The first job's tombstone is forgotten; the two jobs of the run before are pruned by age in their turn.
        assert storage["removed"]["tombstones"] == {"age": 1} and storage["removed"]["jobs"] == {"age": 2}
        assert storage["tombstones"] == 2
