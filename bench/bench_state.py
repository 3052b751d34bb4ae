#!/usr/bin/env python3
"""What a state commit costs per result chunk of a batch `infer` job, with the job's params encoded each time
(old) or taken from their cache (new).

A running job's document holds its params: for `infer`, the list of every image. The engine changes that document
on every result chunk (``result_seq``, ``checkpoint``) and progress update, and the committer's ``snapshot()``
re-encodes each changed document, under the state lock. This script builds a jobs file as the agent keeps it (one
running `infer` job with N images, and a number of small finished jobs), then, per chunk, makes the engine's
changes through the agent's own table (``_StrIdTable``: the result_seq and checkpoint updates of
``_publish_result``, the get/upsert of ``_emit`` for progress) and times the serialisation of the whole file:

  old  — ``DurableJSONStorage.snapshot`` as it was before the params cache (commit 985f2bb), copied below: every
         changed document encoded whole, params included, and the file's text joined, all under the state lock;
  new  — as the agent's committer runs it now: ``snapshot_parts()`` under the lock (changed documents encoded,
         their params' JSON taken from the cache), then ``join()`` of the parts after the lock is released.

Both run in the same process on the same data, alternating chunk by chunk, each with its own cache, and every
pair of blobs is checked to be byte-identical (the script stops if one differs). Times are CPU time of this
thread (time.thread_time) per commit, median and 90th percentile, in ms; the ratios are old over new under the
lock, and old over new in all (lock + join). The new path is then timed alone over as many more chunks (the old
one, run in between, leaves the CPU caches cold for it). For scale it also prints the atomic write of the file
(temp file, fsync, rename, fsync of the directory), which happens outside the lock and is the same for both.
Verification mode is turned off: it would add a full encoding to every commit.

    .venv/bin/python bench/bench_state.py [--sizes 1000,10000,50000] [--chunks 60] [--finished-jobs 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.pop("CV_WORKER_STATE_VERIFY", None)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinydb import TinyDB  # noqa: E402
from tinydb.table import Document  # noqa: E402

from agent.state import _StrIdTable  # noqa: E402
from agent.storage import DurableJSONStorage, atomic_write_bytes  # noqa: E402


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


class OldCache:
    """The per-document cache and snapshot of DurableJSONStorage before the params cache, verbatim."""

    def __init__(self) -> None:
        self.encoded: dict[str, dict[str, str]] = {}

    def touch(self, table: str, doc_id: str) -> None:
        cached = self.encoded.get(table)
        if cached is not None:
            cached.pop(doc_id, None)

    def snapshot(self, data: dict[str, Any]) -> bytes:
        tables = []
        for name, docs in data.items():
            cached = self.encoded.setdefault(name, {})
            if len(cached) > 2 * len(docs) + 64:
                for gone in cached.keys() - docs.keys():
                    del cached[gone]
            parts = []
            for doc_id, doc in docs.items():
                enc = cached.get(doc_id)
                if enc is None:
                    enc = cached[doc_id] = _dumps(doc)
                parts.append(f"{_dumps(doc_id)}:{enc}")
            tables.append(f"{_dumps(name)}:{{{','.join(parts)}}}")
        return ("{" + ",".join(tables) + "}").encode()


class BothStorage(DurableJSONStorage):
    """The agent's storage, also telling the old cache about every touch, so both see the same changes."""

    old: OldCache

    def touch(self, table: str, doc_id: str) -> None:
        self.old.touch(table, doc_id)
        super().touch(table, doc_id)


def job_doc(job_id: str, images: int, state: str) -> dict[str, Any]:
    """A job document shaped as JobEngine.accept writes it."""
    return {
        "job_id": job_id, "type": "infer",
        "params": {"model": "blazeface", "threshold": 0.5,
                   "images": [{"id": f"img{k:06d}", "path": f"incoming/2024-05-01/cam3/img{k:06d}.jpg"}
                              for k in range(images)]},
        "state": state, "version": 3, "progress": None, "details": {}, "error": None, "created": 1714550400.0,
        "updated": 1714550400.0, "started": 1714550401.0, "finished": None, "timeout_s": 3600, "priority": 0,
        "pool": None, "source": "mqtt", "response_topic": None, "correlation": None, "checkpoint": None,
        "result_seq": 0,
    }


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def run(images: int, chunks: int, finished: int, tmp: Path) -> dict[str, float]:
    db = TinyDB(tmp / f"jobs-{images}.json", storage=BothStorage)
    storage: BothStorage = db.storage  # type: ignore[assignment]
    storage.old = OldCache()
    storage._verify = False
    db.table_class = _StrIdTable
    jobs = db.table("jobs", cache_size=0)
    for i in range(finished):
        done = job_doc(f"done-{i:04d}", 32, "SUCCEEDED")
        jobs.insert(Document(done, doc_id=done["job_id"]))  # type: ignore[arg-type]
    job = job_doc("batch", images, "IN_PROGRESS")
    jobs.insert(Document(job, doc_id="batch"))  # type: ignore[arg-type]
    data = storage.read() or {}
    # Both caches start warm, as in an agent that has been committing all along.
    assert storage.snapshot() == storage.old.snapshot(data)

    def chunk_done(k: int) -> None:
        """What one result chunk does to the document (engine._publish_result), and a progress update (_emit)."""
        jobs.update({"result_seq": k + 1}, doc_ids=["batch"])  # type: ignore[list-item]
        jobs.update({"checkpoint": {"next": 32 * (k + 1), "bytes": 1234 * k}}, doc_ids=["batch"])  # type: ignore[list-item]
        current = dict(jobs.get(doc_id="batch"))  # type: ignore[arg-type]
        current.update(progress=32 * (k + 1) / images, version=current["version"] + 1, updated=time.time())
        jobs.upsert(Document(current, doc_id="batch"))  # type: ignore[arg-type]

    old_ms: list[float] = []
    new_ms: list[float] = []  # snapshot_parts(), under the lock
    join_ms: list[float] = []  # join(), outside it
    blob = b""
    for k in range(chunks):
        chunk_done(k)
        order = ("old", "new") if k % 2 == 0 else ("new", "old")
        blobs: dict[str, bytes] = {}
        for which in order:
            t0 = time.thread_time()
            if which == "old":
                blobs["old"] = storage.old.snapshot(data)
                old_ms.append((time.thread_time() - t0) * 1e3)
            else:
                parts = storage.snapshot_parts()
                t1 = time.thread_time()
                blobs["new"] = storage.join(parts)
                new_ms.append((t1 - t0) * 1e3)
                join_ms.append((time.thread_time() - t1) * 1e3)
        if blobs["old"] != blobs["new"]:
            sys.exit(f"{images} images, chunk {k}: the new snapshot differs from the old one")
        blob = blobs["new"]
    # The new path again without the old one in between, whose megabytes of fresh text evict the caches.
    alone_ms: list[float] = []
    for k in range(chunks, 2 * chunks):
        chunk_done(k)
        t0 = time.thread_time()
        parts = storage.snapshot_parts()
        alone_ms.append((time.thread_time() - t0) * 1e3)
        storage.join(parts)
    write_ms = []
    for _ in range(5):
        t0 = time.perf_counter()
        atomic_write_bytes(storage.path, blob)
        write_ms.append((time.perf_counter() - t0) * 1e3)
    return {"old": statistics.median(old_ms), "old90": pct(old_ms, 0.9), "new": statistics.median(new_ms),
            "new90": pct(new_ms, 0.9), "join": statistics.median(join_ms), "alone": statistics.median(alone_ms),
            "total": statistics.median(n + j for n, j in zip(new_ms, join_ms)),
            "write": statistics.median(write_ms), "mb": len(blob) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,10000,50000", help="images in the running job's params")
    ap.add_argument("--chunks", type=int, default=60, help="chunk updates (commits) timed per size and path")
    ap.add_argument("--finished-jobs", type=int, default=200, help="small finished jobs also in the file")
    args = ap.parse_args()
    print(f"CPU ms per commit of the jobs file (thread time), median / p90 over {args.chunks} chunk updates; "
          f"{args.finished_jobs} finished jobs of 32 images also in the file")
    print("  old: snapshot() before the params cache, all of it under the state lock")
    print("  new lock: snapshot_parts(), under the lock;  join: join() of its parts, after the lock is released")
    print("  alone: snapshot_parts() median in as many more chunk updates, without the old path in between")
    print(f"{'images':>7} {'file MB':>8} {'old':>15} {'new lock':>15} {'join':>6} {'old/new lock':>13} "
          f"{'old/new total':>14} {'alone':>6} {'write':>7}")
    with tempfile.TemporaryDirectory() as d:
        for size in (int(s) for s in args.sizes.split(",")):
            r = run(size, args.chunks, args.finished_jobs, Path(d))
            print(f"{size:>7} {r['mb']:>8.2f} {r['old']:>7.3f} / {r['old90']:<5.3f} {r['new']:>7.3f} / "
                  f"{r['new90']:<5.3f} {r['join']:>6.3f} {r['old'] / r['new']:>12.1f}x {r['old'] / r['total']:>13.1f}x "
                  f"{r['alone']:>6.3f} {r['write']:>7.2f}")
    print("write: wall ms of the atomic write of that file (fsync included), outside the lock, the same old or new")

if __name__ == "__main__":
    main()
