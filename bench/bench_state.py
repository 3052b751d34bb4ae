#!/usr/bin/env python3
"""What a state commit costs as finished jobs pile up: flat, whatever their number and the size of their params.

For each size N (default 10, 100, 1,000, 10,000) the script builds a real state directory the way the agent
fills it: N jobs accepted with 1 MB of params each (one inline base64 image, as an HTTP prediction or an MQTT
`infer` request with `data` carries it; spooled beside the journal while the job waits), then finished (their
params replaced by the summary a finished job keeps, the spool file deleted). Then, with those N finished jobs in
the state, it times the commits of a running `infer` job: per chunk, the engine's changes (result counter,
checkpoint, a progress status and its outbox entry) in one transaction, then waiting for it to be durable.

Printed per N, all measured in this run:
  * lock ms   — CPU time of the transaction itself (the engine's reads and writes under the state lock), median;
  * commit ms — CPU time of the committer thread per commit (encoding the changed documents, the journal append),
                mean; "+compaction" adds this commit's share of a compaction of the whole state (timed once
                after the run, spread over the journal bytes between two compactions);
  * durable ms — wall time from the end of the transaction until it is on disk (fdatasync included), p50/p90;
  * state MB  — snapshot + journal after the run; journal bytes per commit.
Ratios are against the smallest N, measured first in the same run: 1.0 means the cost does not grow.

    .venv/bin/python bench/bench_state.py [--sizes 10,100,1000,10000] [--commits 400] [--params-mb 1]
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.pop("CV_WORKER_STATE_VERIFY", None)  # it would add a full encoding of the state to every commit
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.journal import Journal  # noqa: E402
from agent.state import StateStore  # noqa: E402
from agent.summary import summarize  # noqa: E402

BATCH = 50  # jobs accepted per transaction while building (an intake batch)


def job_doc(job_id: str, state: str = "QUEUED") -> dict[str, Any]:
    t = time.time()
    return {"job_id": job_id, "type": "infer", "state": state, "version": 1, "progress": None, "details": {},
            "error": None, "created": t, "updated": t, "started": None, "finished": None, "timeout_s": None,
            "priority": 0, "pool": None, "source": "http", "response_topic": None, "correlation": None,
            "checkpoint": None, "result_seq": 0, "result_bytes": 0}


def build(store: StateStore, n: int, params: dict[str, Any]) -> float:
    t0 = time.monotonic()
    for first in range(0, n, BATCH):
        ids = [f"done{i:06d}" for i in range(first, min(n, first + BATCH))]
        with store.transaction():
            for job_id in ids:
                store.put_job(job_doc(job_id))
                store.put_params(job_id, params)
        store.wait_durable()
        with store.transaction():
            for job_id in ids:
                job = store.get_job(job_id)
                assert job is not None
                job.update(state="SUCCEEDED", version=3, progress=1.0, finished=time.time(), result_seq=1)
                store.put_job(job)
                store.replace_params(job_id, summarize(store.get_params(job_id), 4096))
        store.wait_durable()
    return time.monotonic() - t0


def measure(store: StateStore, commits: int) -> dict[str, float]:
    images = [{"id": f"img{k:05d}", "path": f"cam/img{k:05d}.jpg"} for k in range(2000)]
    with store.transaction():
        store.put_job({**job_doc("running"), "state": "IN_PROGRESS"})
        store.put_params("running", {"model": "blazeface", "images": images})
    store.wait_durable()
    f0 = store.storage_figures()
    lock_ms: list[float] = []
    durable_ms: list[float] = []
    for k in range(commits):
        c0 = time.thread_time()
        with store.transaction():
            job = store.get_job("running")
            assert job is not None
            job.update(result_seq=k + 1, checkpoint={"next": 32 * (k + 1), "chunk": k}, version=job["version"] + 1,
                       progress=k / commits, details={"processed": 32 * (k + 1), "total": 2000 * 32})
            store.put_job(job)
            store.outbox_add({"t": "cvw/v1/nodes/n/jobs/running/status", "p": "{}", "r": True, "k": "status",
                              "j": "running", "v": job["version"]})
        lock_ms.append((time.thread_time() - c0) * 1000)
        t0 = time.monotonic()
        store.wait_durable()
        durable_ms.append((time.monotonic() - t0) * 1000)
    with store._cond:  # let a compaction started by the last commits finish
        store._cond.wait_for(lambda: not store._compacting, 60)
    f1 = store.storage_figures()
    n_commits = max(1, f1.commits - f0.commits)
    per_commit_bytes = (f1.journal_bytes - f0.journal_bytes) / n_commits
    # One compaction of this state, timed as the agent runs it: the pieces taken under the lock, then written (and
    # the covered segments deleted) by the compactor. It runs once per max(compact_min_bytes, snapshot size) of
    # journal, so its share of one commit is its cost times this commit's journal bytes over that.
    with store._cond:
        c0 = time.thread_time()
        store._storage.take_changes()
        parts = store._storage.snapshot_parts()
        parts_ms = (time.thread_time() - c0) * 1000
        seq = store._seq
        store.journal.rotate(seq + 1)
    c0 = time.thread_time()
    snap_bytes = store.journal.write_snapshot(seq, parts)
    write_ms = (time.thread_time() - c0) * 1000
    share = per_commit_bytes / max(store.compact_min_bytes, snap_bytes)
    commit_ms = (f1.commit_cpu_s - f0.commit_cpu_s) / n_commits * 1000
    q = statistics.quantiles(durable_ms, n=10)
    return {
        "lock_ms": statistics.median(lock_ms), "commit_ms": commit_ms,
        "commit_amortized_ms": commit_ms + (parts_ms + write_ms) * share, "compaction_ms": parts_ms + write_ms,
        "compaction_lock_ms": parts_ms, "durable_p50": statistics.median(durable_ms), "durable_p90": q[8],
        "journal_per_commit": per_commit_bytes, "commits": n_commits,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,100,1000,10000", help="numbers of finished jobs, comma-separated")
    ap.add_argument("--commits", type=int, default=400, help="commits timed per size")
    ap.add_argument("--params-mb", type=float, default=1.0, help="params size of each finished job when submitted")
    ap.add_argument("--dir", default=None, help="where to build the state directories (default: a temp dir)")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    blob = base64.b64encode(os.urandom(int(args.params_mb * 1024 * 1024 * 3 / 4))).decode()
    params = {"model": "blazeface", "images": [{"id": "upload", "data": blob}], "threshold": 0.5}
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-state-") as tmp:
        for n in sizes:
            state_dir = Path(tmp) / f"n{n}"
            store = StateStore(state_dir)
            built_s = build(store, n, params)
            r = measure(store, args.commits)
            store.close()
            size = (state_dir / "state.json").stat().st_size if (state_dir / "state.json").exists() else 0
            size += sum(s.path.stat().st_size for s in Journal(state_dir).segments())
            spool = [p for p in (state_dir / "spool").iterdir() if p.stem != "running"]
            assert not spool, "finished jobs left spool files"
            r.update(n=n, state_mb=size / 2**20, built_s=built_s)
            rows.append(r)
            print(f"N={n:>6}: built in {built_s:6.1f} s ({n * args.params_mb:,.0f} MB of params submitted); "
                  f"state {r['state_mb']:.2f} MB; one compaction {r['compaction_ms']:.1f} ms CPU "
                  f"({r['compaction_lock_ms']:.1f} ms of it under the lock)", flush=True)
    base = rows[0]
    print()
    print(f"{'finished jobs':>13} | {'lock ms':>8} | {'commit ms':>9} | {'+compaction':>11} | "
          f"{'durable p50/p90 ms':>18} | {'B/commit':>8} | {'state MB':>8} | ratio lock / commit+comp / p50")
    for r in rows:
        print(f"{r['n']:>13,} | {r['lock_ms']:8.3f} | {r['commit_ms']:9.3f} | {r['commit_amortized_ms']:11.3f} | "
              f"{r['durable_p50']:8.2f} / {r['durable_p90']:7.2f} | {r['journal_per_commit']:8.0f} | "
              f"{r['state_mb']:8.2f} | {r['lock_ms'] / base['lock_ms']:.2f} / "
              f"{r['commit_amortized_ms'] / base['commit_amortized_ms']:.2f} / "
              f"{r['durable_p50'] / base['durable_p50']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
