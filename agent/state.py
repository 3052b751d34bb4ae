"""Durable local state: jobs, the MQTT outbox, node metadata and job results.

All changes go through ``transaction()``; a background committer writes whatever changed since the last commit
in one atomic write per file (group commit), so hundreds of changes per second cost a few fsyncs. Code that must
not go on before a change is on disk (acknowledging a request, publishing a status) waits with
``wait_durable(gen)`` for the generation its transaction returned.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any, Callable, Optional

from tinydb import TinyDB
from tinydb.table import Document, Table

from agent.storage import DurableJSONStorage, fsync_dir

log = logging.getLogger(__name__)


class _KeyView(MutableMapping):  # type: ignore[type-arg]
    """The raw table dict seen with typed document ids, without copying it."""

    def __init__(self, raw: dict[str, Any], id_class: type, touch: Callable[[str], None]):
        self._raw = raw
        self._id = id_class
        self._touch = touch  # a writer that reads a document may change it in place

    def __getitem__(self, key: Any) -> Any:
        self._touch(str(key))
        return self._raw[str(key)]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._touch(str(key))
        self._raw[str(key)] = value

    def __delitem__(self, key: Any) -> None:
        self._touch(str(key))
        del self._raw[str(key)]

    def __contains__(self, key: object) -> bool:
        return str(key) in self._raw

    def __iter__(self) -> Iterator[Any]:
        return (self._id(k) for k in list(self._raw))

    def __len__(self) -> int:
        return len(self._raw)


class _InPlaceTable(Table):
    """A TinyDB table whose writes touch only the documents they change.

    Stock ``Table._update_table`` rebuilds the whole table dict twice per write (to convert document ids), which
    makes every job update cost time proportional to the jobs kept; with the storage held in memory the updater
    can work on the table in place.
    """

    def _update_table(self, updater: Callable[[dict[int, Mapping[str, Any]]], None]) -> None:
        tables = self._storage.read() or {}
        raw = tables.setdefault(self.name, {})
        storage_touch = getattr(self._storage, "touch", None)

        def touch(doc_id: str) -> None:
            if storage_touch is not None:
                storage_touch(self.name, doc_id)

        updater(_KeyView(raw, self.document_id_class, touch))  # type: ignore[arg-type]
        self._storage.write(tables)
        self.clear_cache()

    def raw_documents(self) -> Iterator[dict[str, Any]]:
        """The stored documents themselves (read-only use), without building Document objects."""
        return iter(list(self._read_table().values()))  # type: ignore[arg-type]


class _StrIdTable(_InPlaceTable):
    # Jobs are addressed by their job id; a string doc id gives O(1) lookups without a query scan.
    document_id_class = str  # type: ignore[assignment]


class StateStore:
    """The node's state directory. ``read_only=True`` is for the CLI reading a running agent's state."""

    def __init__(self, state_dir: Path, read_only: bool = False, min_commit_interval_s: float = 0.005):
        self.dir = Path(state_dir)
        self.read_only = read_only
        if not read_only:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.results_dir = self.dir / "results"
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._gen = 0
        self._durable_gen = 0
        self._min_interval = min_commit_interval_s
        self._stopping = False
        self._listeners: list[Callable[[int], None]] = []
        self._unsynced_results: set[Path] = set()
        self._state_counts: Optional[dict[str, int]] = None
        self._last_commit_s = 0.0

        self._jobs_db = TinyDB(self.dir / "jobs.json", storage=DurableJSONStorage, read_only=read_only)
        self._jobs_db.table_class = _StrIdTable
        self._outbox_db = TinyDB(self.dir / "outbox.json", storage=DurableJSONStorage, read_only=read_only)
        self._outbox_db.table_class = _InPlaceTable
        self.jobs_table = self._jobs_db.table("jobs", cache_size=0)
        self.meta_table = self._jobs_db.table("meta", cache_size=0)
        self.outbox_table = self._outbox_db.table("outbox", cache_size=0)
        # Our own id counter, not TinyDB's: TinyDB restarts at 1 when the table was emptied before its first insert,
        # and the outbox publisher relies on ids only growing while the process lives.
        self._outbox_next_id = max((int(k) for k in self.outbox_table._read_table()), default=0) + 1
        self._storages: list[DurableJSONStorage] = [self._jobs_db.storage, self._outbox_db.storage]  # type: ignore[list-item]
        self._committer: Optional[threading.Thread] = None
        if not read_only:
            self._committer = threading.Thread(target=self._commit_loop, name="state-commit", daemon=True)
            self._committer.start()

    # -- transactions and group commit -------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator["StateStore"]:
        """Hold the state lock for a group of changes; they reach disk together in the next commit."""
        with self._cond:
            yield self
            self._gen += 1
            self._cond.notify_all()

    @property
    def generation(self) -> int:
        with self._lock:
            return self._gen

    @property
    def durable_generation(self) -> int:
        with self._lock:
            return self._durable_gen

    def wait_durable(self, gen: Optional[int] = None, timeout: Optional[float] = None) -> bool:
        """Block until every change up to ``gen`` (default: all so far) is on disk."""
        with self._cond:
            target = self._gen if gen is None else gen
            return self._cond.wait_for(lambda: self._durable_gen >= target or self._stopping, timeout)

    def add_commit_listener(self, fn: Callable[[int], None]) -> None:
        """``fn(durable_generation)`` runs after each commit, on the committer thread; keep it short."""
        self._listeners.append(fn)

    def _commit_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._gen > self._durable_gen or self._stopping)
                if self._stopping and self._gen == self._durable_gen:
                    return
            # Let a burst of changes pile up so one fsync covers them all. Waiting as long as the last commit
            # took keeps the committer (whose JSON encoding holds the GIL) under half the CPU under load.
            time.sleep(max(self._min_interval, self._last_commit_s))
            t0 = time.monotonic()
            try:
                self._commit_once()
            except Exception:
                # The committer must outlive any bug: without it nothing reaches disk and every waiter hangs.
                log.exception("state commit failed; retrying in 1 s")
                with self._cond:
                    for storage in self._storages:
                        storage.dirty = True
                time.sleep(1.0)
            self._last_commit_s = time.monotonic() - t0

    def _commit_once(self) -> None:
        with self._cond:
            gen = self._gen
            snapshots = [(s, s.snapshot_parts()) for s in self._storages if s.dirty]
            results, self._unsynced_results = self._unsynced_results, set()
        blobs = [(storage, storage.join(parts)) for storage, parts in snapshots]
        try:
            # Result lines first: a state commit that counts a result must never reach disk before it.
            for path in results:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    continue  # pruned meanwhile
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            if results:
                fsync_dir(self.results_dir)
            for storage, blob in blobs:
                storage.commit_bytes(blob)
        except OSError as e:
            # Disk full or read-only: keep the data dirty and retry, loudly, rather than lose it.
            log.error("cannot write state to %s: %s; retrying", self.dir, e)
            with self._cond:
                for storage, _ in blobs:
                    storage.dirty = True
                self._unsynced_results |= results
            time.sleep(1.0)
            return
        with self._cond:
            self._durable_gen = max(self._durable_gen, gen)
            self._cond.notify_all()
        for fn in self._listeners:
            try:
                fn(gen)
            except Exception:  # a listener bug must not stop commits
                log.exception("state commit listener failed")

    def close(self) -> None:
        """Commit everything still pending and stop the committer."""
        if self.read_only or self._committer is None:
            return
        with self._cond:
            pending = self._gen > self._durable_gen
        if pending:
            self._commit_once()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._committer.join(5)

    # -- jobs ---------------------------------------------------------------------------------------------

    def get_job(self, job_id: str) -> Optional[dict[str, Any]]:
        with self._lock:
            doc = self.jobs_table.get(doc_id=job_id)  # type: ignore[arg-type]
            return dict(doc) if doc is not None else None

    def put_job(self, job: dict[str, Any]) -> None:
        with self._lock:
            old = self.jobs_table.get(doc_id=job["job_id"])  # type: ignore[arg-type]
            self._count(old["state"] if old else None, job["state"])
            self.jobs_table.upsert(Document(job, doc_id=job["job_id"]))  # type: ignore[arg-type]

    def update_job(self, job_id: str, fields: dict[str, Any]) -> None:
        with self._lock:
            if "state" in fields:
                old = self.jobs_table.get(doc_id=job_id)  # type: ignore[arg-type]
                self._count(old["state"] if old else None, fields["state"])
            self.jobs_table.update(fields, doc_ids=[job_id])  # type: ignore[list-item]

    def _count(self, old: Optional[str], new: Optional[str]) -> None:
        # Kept up to date on every write so `node.info` need not scan every job.
        if self._state_counts is None:
            return
        if old is not None:
            self._state_counts[old] = self._state_counts.get(old, 0) - 1
        if new is not None:
            self._state_counts[new] = self._state_counts.get(new, 0) + 1

    def all_jobs(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(d) for d in self.jobs_table.all()]

    def job_state_counts(self) -> dict[str, int]:
        with self._lock:
            if self._state_counts is None:
                self._state_counts = {}
                for doc in self.jobs_table.raw_documents():  # type: ignore[attr-defined]
                    self._state_counts[doc["state"]] = self._state_counts.get(doc["state"], 0) + 1
            return {k: v for k, v in self._state_counts.items() if v}

    def finished_jobs_summary(self) -> list[tuple[str, str, float]]:
        """``(job_id, state, finished-or-updated time)`` of every job, cheaply, for pruning."""
        with self._lock:
            return [(d["job_id"], d["state"], d.get("finished") or d.get("updated") or 0)
                    for d in self.jobs_table.raw_documents()]  # type: ignore[attr-defined]

    def job_count(self) -> int:
        with self._lock:
            return len(self.jobs_table)

    def remove_jobs(self, job_ids: list[str]) -> None:
        with self._lock:
            for job_id in job_ids:
                old = self.jobs_table.get(doc_id=job_id)  # type: ignore[arg-type]
                self._count(old["state"] if old else None, None)
            self.jobs_table.remove(doc_ids=job_ids)  # type: ignore[arg-type]
            for job_id in job_ids:
                path = self.results_dir / f"{job_id}.jsonl"
                self._unsynced_results.discard(path)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    # -- node metadata ------------------------------------------------------------------------------------

    def meta_get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            doc = self.meta_table.get(doc_id=key)  # type: ignore[arg-type]
            return doc["value"] if doc is not None else default

    def meta_set(self, key: str, value: Any) -> None:
        with self._lock:
            self.meta_table.upsert(Document({"value": value}, doc_id=key))  # type: ignore[arg-type]

    # -- outbox -------------------------------------------------------------------------------------------

    def outbox_add(self, entry: dict[str, Any]) -> int:
        with self._lock:
            entry_id = self._outbox_next_id
            self._outbox_next_id += 1
            self.outbox_table.insert(Document(entry, doc_id=entry_id))
            return entry_id

    def outbox_after(self, after_id: int, limit: int = 1000) -> list[tuple[int, dict[str, Any]]]:
        """Entries with an id above ``after_id``, oldest first."""
        with self._lock:
            out: list[tuple[int, dict[str, Any]]] = []
            # Ids only grow and the table keeps insertion order, so the first `limit` matches are the oldest.
            for key, doc in self.outbox_table._read_table().items():
                if int(key) > after_id:
                    out.append((int(key), dict(doc)))
                    if len(out) >= limit:
                        break
            return out

    def outbox_remove(self, ids: list[int]) -> None:
        with self._lock:
            self.outbox_table.remove(doc_ids=ids)

    def outbox_len(self) -> int:
        with self._lock:
            return len(self.outbox_table)

    # -- results ------------------------------------------------------------------------------------------

    def append_result(self, job_id: str, message: dict[str, Any]) -> None:
        """Append one result message to the job's result log; call inside the transaction that counts it.

        The committer fsyncs the log before it writes that transaction, so many results share one fsync."""
        self.results_dir.mkdir(exist_ok=True)
        path = self.results_dir / f"{job_id}.jsonl"
        with open(path, "ab") as f:
            f.write(json.dumps(message, separators=(",", ":"), default=str).encode() + b"\n")
        with self._lock:
            self._unsynced_results.add(path)

    def read_results(self, job_id: str, upto_seq: Optional[int] = None) -> list[dict[str, Any]]:
        """The job's result messages in seq order. A chunk redone after a crash is kept once (the last copy)."""
        path = self.results_dir / f"{job_id}.jsonl"
        by_seq: dict[int, dict[str, Any]] = {}
        try:
            lines = path.read_bytes().splitlines()
        except FileNotFoundError:
            return []
        for line in lines:
            try:
                msg = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash; its chunk was redone after the restart
            seq = msg.get("seq")
            if isinstance(seq, int) and (upto_seq is None or seq <= upto_seq):
                by_seq[seq] = msg
        return [by_seq[s] for s in sorted(by_seq)]
