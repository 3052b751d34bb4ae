"""Durable local state: jobs and their params, the MQTT outbox, node metadata, tombstones and job results.

All changes go through ``transaction()``. A background committer takes whatever changed since its last commit
and appends it to the journal as one record with one fsync (group commit, agent/journal.py): hundreds of changes
per second cost a few fsyncs, and a job's new state, the messages it queued and its result counter reach disk
together or not at all. Code that must not go on before a change is on disk (acknowledging a request, publishing
a status, starting a job with side effects) waits with ``wait_durable(gen)`` for the generation its transaction
returned.

Tables (TinyDB, kept in memory): ``jobs`` (one small document per job, by job id), ``params`` (a job's request
params, apart from its document so that the many updates of a running job never rewrite them; params larger
than ``spool_min_bytes`` live in ``spool/<job>.json``), ``outbox``, ``meta`` and ``tombstones`` (finished jobs
pruned from ``jobs``: id -> final state and version, so a re-sent id is never run again).

Result messages are appended to ``results/<job>.jsonl``; the committer fsyncs them before the record that counts
them, and the job's ``result_bytes`` says how much of the file is committed, so a crash or a full disk never
leaves half a line or an uncounted chunk that a reader would take for a result.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from tinydb.table import Table

from agent.journal import Journal, JournalGap, Loaded, frame
from agent.storage import Change, JournaledStorage, dumps, fsync_dir, is_disk_full

log = logging.getLogger(__name__)

JOBS, PARAMS, OUTBOX, META, TOMBSTONES = "jobs", "params", "outbox", "meta", "tombstones"
_LEGACY_FILES = ("jobs.json", "outbox.json")


class DiskFull(OSError):
    """A state write failed for lack of space (ENOSPC/EDQUOT); nothing of it was kept."""


def _classify(e: OSError) -> OSError:
    return DiskFull(e.errno, e.strerror) if is_disk_full(e) else e


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
    can work on the table in place, and the storage learns exactly which documents changed.
    """

    def _update_table(self, updater: Callable[[dict[int, Mapping[str, Any]]], None]) -> None:
        storage: JournaledStorage = self._storage  # type: ignore[assignment]
        # The storage's own dict, also when it is empty: `read() or {}` handed an empty state a throwaway dict, and
        # every write after a start from an empty journal vanished (acknowledged requests never ran).
        tables = storage.read()
        assert tables is not None
        raw = tables.setdefault(self.name, {})

        def touch(doc_id: str) -> None:
            storage.touch(self.name, doc_id)

        updater(_KeyView(raw, self.document_id_class, touch))  # type: ignore[arg-type]
        self.clear_cache()

    def replace(self, doc_id: Any, doc: dict[str, Any]) -> None:
        """Store ``doc`` as the whole document ``doc_id`` (TinyDB's upsert would merge it into the old one)."""

        def updater(table: MutableMapping[Any, Any]) -> None:
            table[doc_id] = doc

        self._update_table(updater)  # type: ignore[arg-type]

    def raw(self) -> dict[str, Any]:
        """The stored documents themselves by id (read-only use), without building Document objects."""
        return self._read_table()  # type: ignore[return-value]


class _StrIdTable(_InPlaceTable):
    # Jobs are addressed by their job id; a string doc id gives O(1) lookups without a query scan.
    document_id_class = str  # type: ignore[assignment]


@dataclass
class StorageFigures:
    """What the state takes on disk, for ``node.stats`` and the retention logic."""

    snapshot_bytes: int = 0
    journal_bytes: int = 0
    spool_bytes: int = 0
    spool_files: int = 0
    jobs: int = 0
    jobs_bytes: int = 0  # documents and params of the jobs kept, as in a snapshot
    tombstones: int = 0
    tombstone_bytes: int = 0
    commits: int = 0
    compactions: int = 0
    commit_cpu_s: float = 0.0  # the committer's CPU time (encoding, appending), all commits
    commit_wall_s: float = 0.0  # the same in wall-clock time (fsyncs included)
    compact_cpu_s: float = 0.0
    compact_wall_s: float = 0.0
    last_write_error: Optional[str] = None


@dataclass
class RecoveryReport:
    """What the start-up check found and repaired."""

    problems: list[str] = field(default_factory=list)
    reannounce: list[str] = field(default_factory=list)  # jobs whose latest status must be queued again


class StateStore:
    """The node's state directory. ``read_only=True`` is for the CLI reading a running agent's state."""

    def __init__(self, state_dir: Path, read_only: bool = False, min_commit_interval_s: float = 0.005,
                 spool_min_bytes: int = 64 * 1024, compact_min_bytes: int = 4 * 1024 * 1024):
        self.dir = Path(state_dir)
        self.read_only = read_only
        if not read_only:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.results_dir = self.dir / "results"
        self.spool_dir = self.dir / "spool"
        self.spool_min_bytes = spool_min_bytes
        self.compact_min_bytes = compact_min_bytes
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._gen = 0
        self._durable_gen = 0
        self._min_interval = min_commit_interval_s
        self._stopping = False
        self._listeners: list[Callable[[int], None]] = []
        self._error_listeners: list[Callable[[Optional[OSError]], None]] = []
        self._unsynced: set[Path] = set()  # result and spool files written since the last commit
        self._state_counts: Optional[dict[str, int]] = None
        self._last_commit_cpu_s = 0.0
        self.figures = StorageFigures()
        self.journal = Journal(self.dir, read_only=read_only)
        self._legacy: list[Path] = []
        loaded = self._load()
        outbox = loaded.tables.get(OUTBOX)
        if outbox:
            # outbox_after relies on the table's order being the id order. A journal record lists its changes
            # sorted as text ("10" before "9"), so replaying it inserts entries out of order: put them back.
            loaded.tables[OUTBOX] = dict(sorted(outbox.items(), key=lambda kv: int(kv[0])))
        self._seq = loaded.seq
        self.load_problems = loaded.problems
        for p in loaded.problems:
            log.error("state recovery: %s", p)
        self.figures.snapshot_bytes = loaded.snapshot_bytes
        self.figures.journal_bytes = loaded.journal_bytes
        self._storage = JournaledStorage(loaded.tables, encode_now=not read_only)
        if self._legacy:
            self._storage.mark_all_dirty()  # the first commit writes the whole old state into the journal
        self.jobs_table = _StrIdTable(self._storage, JOBS, cache_size=0)
        self.params_table = _StrIdTable(self._storage, PARAMS, cache_size=0)
        self.meta_table = _StrIdTable(self._storage, META, cache_size=0)
        self.tombstones_table = _StrIdTable(self._storage, TOMBSTONES, cache_size=0)
        self.outbox_table = _InPlaceTable(self._storage, OUTBOX, cache_size=0)
        # Our own id counter, not TinyDB's: the outbox publisher relies on ids only growing while the process lives.
        self._outbox_next_id = max((int(k) for k in self.outbox_table.raw()), default=0) + 1
        self._committer: Optional[threading.Thread] = None
        self._compact_q: list[tuple[int, list[str]]] = []
        self._compacting = False
        if not read_only:
            for name in self.journal.remove_stale_temp_files():
                log.info("removed %s left by an interrupted compaction", name)
            self._committer = threading.Thread(target=self._commit_loop, name="state-commit", daemon=True)
            self._committer.start()

    # -- loading ------------------------------------------------------------------------------------------

    def _load(self) -> Loaded:
        try:
            if self.journal.exists():
                loaded = self.journal.load()
                if not self.read_only:
                    # The first commit after reading an earlier version's files held all of them; a crash before
                    # they were deleted leaves them behind.
                    for name in _LEGACY_FILES:
                        with contextlib.suppress(FileNotFoundError):
                            (self.dir / name).unlink()
                return loaded
        except JournalGap as e:
            if self.read_only:
                raise
            aside = self.journal.journal_dir.with_name(f"journal.corrupt-{int(time.time())}")
            os.replace(self.journal.journal_dir, aside)
            log.critical("state journal is damaged (%s); moved it to %s and went on from the snapshot", e, aside)
            return self.journal.load()
        except ValueError as e:
            if self.read_only:
                raise
            # Atomic replace makes this near impossible (disk fault, hand edit); keep the evidence and go on
            # with an empty state rather than refusing to start a node that a fleet depends on.
            stamp = int(time.time())
            for p in (self.journal.snapshot_path, self.journal.journal_dir):
                if p.exists():
                    os.replace(p, p.with_name(f"{p.name}.corrupt-{stamp}"))
            log.error("state in %s is unreadable (%s); moved it aside (*.corrupt-%d) and started empty",
                      self.dir, e, stamp)
            return Loaded(tables={})
        return self._load_legacy()

    def _load_legacy(self) -> Loaded:
        """cv-worker before the journal kept ``jobs.json`` (jobs and meta) and ``outbox.json``, each replaced
        atomically but separately. They are read once, written into the journal by the first commit, then
        deleted."""
        loaded = Loaded(tables={})
        for name in _LEGACY_FILES:
            path = self.dir / name
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                continue
            try:
                data = json.loads(raw) if raw.strip() else {}
                if not isinstance(data, dict):
                    raise ValueError("top level is not an object")
            except ValueError as e:
                if self.read_only:
                    raise
                aside = path.with_name(f"{name}.corrupt-{int(time.time())}")
                os.replace(path, aside)
                log.error("state file %s is unreadable (%s); moved it to %s", path, e, aside)
                continue
            loaded.found = True
            self._legacy.append(path)
            for table, docs in data.items():
                loaded.tables.setdefault(table, {}).update(docs)
        jobs = loaded.tables.get(JOBS, {})
        params = loaded.tables.setdefault(PARAMS, {})
        for job_id, job in jobs.items():
            if isinstance(job, dict) and "params" in job:
                params[job_id] = {"v": job.pop("params")}
        if self._legacy:
            log.info("reading state of an earlier cv-worker version (%s); it moves into the journal",
                     ", ".join(p.name for p in self._legacy))
        return loaded

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

    def wait_durable(self, gen: Optional[int] = None, timeout: Optional[float] = None,
                     give_up_on_error: bool = False) -> bool:
        """Block until every change up to ``gen`` (default: all so far) is on disk. ``give_up_on_error``: return
        False as soon as commits are failing (a full disk) instead of waiting for them to work again."""
        with self._cond:
            target = self._gen if gen is None else gen
            done = self._cond.wait_for(
                lambda: self._durable_gen >= target or self._stopping
                or (give_up_on_error and self.figures.last_write_error is not None), timeout)
            return bool(done) and self._durable_gen >= target

    def add_commit_listener(self, fn: Callable[[int], None]) -> None:
        """``fn(durable_generation)`` runs after each commit, on the committer thread; keep it short."""
        self._listeners.append(fn)

    def add_write_error_listener(self, fn: Callable[[Optional[OSError]], None]) -> None:
        """``fn(error)`` when commits start failing (the disk is full, or read-only), and ``fn(None)`` when they
        succeed again; on the committer thread."""
        self._error_listeners.append(fn)

    @property
    def write_error(self) -> Optional[str]:
        return self.figures.last_write_error

    def _commit_loop(self) -> None:
        failing: Optional[OSError] = None
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._gen > self._durable_gen or self._stopping)
                if self._stopping and self._gen == self._durable_gen:
                    return
            t0 = time.monotonic()
            c0 = time.thread_time()
            try:
                # Let a burst of changes pile up so one fsync covers them all. Waiting as long as the last commit
                # used the CPU keeps the committer (whose JSON encoding holds the GIL) under half the CPU under load;
                # its wall time would also count fsyncs of spooled params, and make the next commit wait for them.
                time.sleep(max(self._min_interval, self._last_commit_cpu_s))
                t0 = time.monotonic()
                c0 = time.thread_time()
                self._commit_once()
            except OSError as e:
                # Disk full or read-only: the changes stay pending and are retried, loudly, never lost.
                if failing is None or failing.errno != e.errno:
                    log.error("cannot write state to %s: %s; retrying every second", self.dir, e)
                failing = e
                with self._cond:
                    self.figures.last_write_error = str(e)
                    self._cond.notify_all()
                self._tell_error(e)
                with self._cond:
                    self._cond.wait_for(lambda: self._stopping, 1.0)
                    if self._stopping:
                        return
                continue
            except Exception:
                # The committer must outlive any bug: without it nothing reaches disk and every waiter hangs.
                log.exception("state commit failed; retrying in 1 s")
                with self._cond:
                    self._cond.wait_for(lambda: self._stopping, 1.0)
                continue
            if failing is not None:
                log.warning("state writes to %s work again", self.dir)
                failing = None
                self.figures.last_write_error = None
                self._tell_error(None)
            self._last_commit_cpu_s = time.thread_time() - c0
            self.figures.commit_wall_s += time.monotonic() - t0
            self.figures.commit_cpu_s += self._last_commit_cpu_s

    def _tell_error(self, e: Optional[OSError]) -> None:
        for fn in self._error_listeners:
            try:
                fn(e)
            except Exception:
                log.exception("state write error listener failed")

    def _commit_once(self) -> None:
        compact: Optional[tuple[int, list[str]]] = None
        with self._cond:
            gen = self._gen
            changes: list[Change] = self._storage.take_changes() if self._storage.has_changes() else []
            files, self._unsynced = self._unsynced, set()
            seq = self._seq + 1
            if changes and not self._compacting and self.figures.journal_bytes > max(
                    self.compact_min_bytes, self.figures.snapshot_bytes):
                compact = (seq, self._storage.snapshot_parts())
                self._compacting = True
        try:
            self._sync_files(files)
            if changes:
                body = ('{"s":%d,"c":[' % seq + ",".join(
                    f"[{dumps(t)},{dumps(i)},{enc if enc is not None else 'null'}]" for t, i, enc in changes)
                    + "]}").encode()
                line = frame(body)
                self.journal.append(seq, line)
        except OSError as e:
            with self._cond:
                self._storage.retake(changes)
                self._unsynced |= files
                self._compacting = False
            raise _classify(e) from e
        if self._legacy:
            self._drop_legacy()
        if changes:
            self._seq = seq
            self.figures.commits += 1
            self.figures.journal_bytes += len(line)
            if compact is not None:
                self.journal.rotate(seq + 1)
                self.figures.journal_bytes = 0
                threading.Thread(target=self._compact, args=compact, name="state-compact", daemon=True).start()
        with self._cond:
            self._durable_gen = max(self._durable_gen, gen)
            self._cond.notify_all()
        for fn in self._listeners:
            try:
                fn(gen)
            except Exception:  # a listener bug must not stop commits
                log.exception("state commit listener failed")

    def _sync_files(self, files: set[Path]) -> None:
        # Result lines and spooled params first: a commit that counts them must never reach disk before them.
        dirs = set()
        for path in files:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # pruned meanwhile
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            dirs.add(path.parent)
        for d in dirs:
            fsync_dir(d)

    def _compact(self, seq: int, parts: list[str]) -> None:
        t0, c0 = time.monotonic(), time.thread_time()
        try:
            size = self.journal.write_snapshot(seq, parts)
        except OSError as e:
            log.error("cannot write a state snapshot (%s); the journal keeps everything and compaction is retried "
                      "later", e)
        else:
            self.figures.snapshot_bytes = size
            self.figures.compactions += 1
            log.debug("state snapshot at record %d: %d bytes", seq, size)
        finally:
            self.figures.compact_wall_s += time.monotonic() - t0
            self.figures.compact_cpu_s += time.thread_time() - c0
            with self._cond:
                self._compacting = False
                self._cond.notify_all()

    def _drop_legacy(self) -> None:
        for path in self._legacy:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        log.info("state of the earlier version is now in the journal; removed %s",
                 ", ".join(p.name for p in self._legacy))
        self._legacy = []

    def close(self) -> None:
        """Commit everything still pending and stop the committer."""
        if self.read_only or self._committer is None:
            return
        with self._cond:
            pending = self._gen > self._durable_gen
        if pending:
            try:
                self._commit_once()
            except OSError as e:
                log.error("state changes not written at shutdown (%s); the journal holds the last commit", e)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._compacting, 10)
        self._committer.join(5)
        self.journal.close()

    # -- jobs ---------------------------------------------------------------------------------------------

    def get_job(self, job_id: str) -> Optional[dict[str, Any]]:
        """A shallow copy of the job's document (its params: ``get_params``)."""
        with self._lock:
            doc = self.jobs_table.raw().get(job_id)
            return dict(doc) if doc is not None else None

    def put_job(self, job: dict[str, Any]) -> None:
        assert "params" not in job, "params are stored with put_params"
        with self._lock:
            old = self.jobs_table.raw().get(job["job_id"])
            self._count(old["state"] if old else None, job["state"])
            self.jobs_table.replace(job["job_id"], job)

    def update_job(self, job_id: str, fields: dict[str, Any]) -> None:
        assert "params" not in fields, "params are stored with put_params"
        with self._lock:
            if "state" in fields:
                old = self.jobs_table.raw().get(job_id)
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
            return [dict(d) for d in self.jobs_table.raw().values()]

    def job_state_counts(self) -> dict[str, int]:
        with self._lock:
            if self._state_counts is None:
                self._state_counts = {}
                for doc in self.jobs_table.raw().values():
                    self._state_counts[doc["state"]] = self._state_counts.get(doc["state"], 0) + 1
            return {k: v for k, v in self._state_counts.items() if v}

    def finished_jobs_summary(self) -> list[tuple[str, str, float]]:
        """``(job_id, state, finished-or-updated time)`` of every job, cheaply, for pruning."""
        with self._lock:
            return [(d["job_id"], d["state"], d.get("finished") or d.get("updated") or 0)
                    for d in self.jobs_table.raw().values()]

    def job_count(self) -> int:
        with self._lock:
            return len(self.jobs_table.raw())

    def remove_jobs(self, job_ids: list[str]) -> tuple[int, int]:
        """Forget jobs: their documents, params, spooled params and result logs. Returns how many result logs were
        deleted and their bytes."""
        logs = freed = 0
        with self._lock:
            raw = self.jobs_table.raw()
            present = [j for j in job_ids if j in raw]
            for job_id in present:
                self._count(raw[job_id]["state"], None)
            self.jobs_table.remove(doc_ids=present)  # type: ignore[arg-type]
            self.params_table.remove(doc_ids=[j for j in job_ids if j in self.params_table.raw()])  # type: ignore[arg-type]
            for job_id in job_ids:
                self._drop_spool(job_id)
                size = self.remove_results(job_id)
                logs += size > 0
                freed += size
        return logs, freed

    # -- params -------------------------------------------------------------------------------------------

    def _spool_path(self, job_id: str) -> Path:
        return self.spool_dir / f"{job_id}.json"

    def put_params(self, job_id: str, params: Any) -> None:
        """Store a job's params (inside a transaction). Large ones go to a spool file that the next commit
        fsyncs first, so the journal and the memory of the agent never hold megabytes of inline images.
        Raises DiskFull when the spool file cannot be written."""
        text = dumps(params)
        if len(text) >= self.spool_min_bytes:
            path = self._spool_path(job_id)
            self.spool_dir.mkdir(exist_ok=True)
            try:
                with open(path, "wb") as f:
                    f.write(text.encode())
            except OSError as e:
                with contextlib.suppress(OSError):
                    path.unlink()
                raise _classify(e) from e
            with self._lock:
                self._unsynced.add(path)
                self.params_table.replace(job_id, {"spool": path.name, "bytes": len(text)})
            return
        with self._lock:
            if "spool" in (self.params_table.raw().get(job_id) or {}):
                self._drop_spool(job_id)
            self.params_table.replace(job_id, {"v": params})

    def get_params(self, job_id: str) -> Any:
        """The job's params (read from its spool file when spooled); None when the job has none stored."""
        with self._lock:
            doc = self.params_table.raw().get(job_id)
        if doc is None:
            return None
        if "spool" in doc:
            try:
                return json.loads(self._spool_path(job_id).read_bytes())
            except (OSError, ValueError) as e:
                log.error("spooled params of job %s are unreadable: %s", job_id, e)
                return None
        return doc.get("v")

    def params_size(self, job_id: str) -> int:
        with self._lock:
            doc = self.params_table.raw().get(job_id)
            if doc is None:
                return 0
            return int(doc["bytes"]) if "spool" in doc else len(dumps(doc.get("v")))

    def replace_params(self, job_id: str, summary: Any) -> None:
        """A finished job keeps only ``summary`` of its params (inside a transaction); its spool file goes."""
        with self._lock:
            if "spool" in (self.params_table.raw().get(job_id) or {}):
                self._drop_spool(job_id)
            self.params_table.replace(job_id, {"v": summary})

    def _drop_spool(self, job_id: str) -> None:
        path = self._spool_path(job_id)
        self._unsynced.discard(path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    # -- node metadata ------------------------------------------------------------------------------------

    def meta_get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            doc = self.meta_table.raw().get(key)
            return doc["value"] if doc is not None else default

    def meta_set(self, key: str, value: Any) -> None:
        with self._lock:
            self.meta_table.replace(key, {"value": value})

    # -- tombstones ---------------------------------------------------------------------------------------

    def get_tombstone(self, job_id: str) -> Optional[dict[str, Any]]:
        with self._lock:
            doc = self.tombstones_table.raw().get(job_id)
            return dict(doc) if doc is not None else None

    def put_tombstone(self, job_id: str, doc: dict[str, Any]) -> None:
        with self._lock:
            self.tombstones_table.replace(job_id, doc)

    def tombstones(self) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            return [(k, dict(v)) for k, v in self.tombstones_table.raw().items()]

    def remove_tombstones(self, job_ids: list[str]) -> None:
        with self._lock:
            self.tombstones_table.remove(doc_ids=job_ids)  # type: ignore[arg-type]

    # -- outbox -------------------------------------------------------------------------------------------

    def outbox_add(self, entry: dict[str, Any]) -> int:
        with self._lock:
            entry_id = self._outbox_next_id
            self._outbox_next_id += 1
            self.outbox_table.replace(entry_id, entry)
            return entry_id

    def outbox_get(self, entry_id: int) -> Optional[dict[str, Any]]:
        with self._lock:
            doc = self.outbox_table.raw().get(str(entry_id))
            return dict(doc) if doc is not None else None

    def outbox_after(self, after_id: int, limit: int = 1000) -> list[tuple[int, dict[str, Any]]]:
        """Entries with an id above ``after_id``, oldest first."""
        with self._lock:
            out: list[tuple[int, dict[str, Any]]] = []
            # Ids only grow and the table keeps insertion order, so the first `limit` matches are the oldest.
            for key, doc in self.outbox_table.raw().items():
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
            return len(self.outbox_table.raw())

    # -- results ------------------------------------------------------------------------------------------

    def result_path(self, job_id: str) -> Path:
        return self.results_dir / f"{job_id}.jsonl"

    def append_result(self, job_id: str, message: dict[str, Any]) -> int:
        """Append one result message to the job's result log; call inside the transaction that counts it, and
        store the returned size as the job's ``result_bytes`` in it. The committer fsyncs the log before it
        writes that transaction, so many results share one fsync. Raises DiskFull (nothing appended) when the
        disk is full."""
        self.results_dir.mkdir(exist_ok=True)
        path = self.result_path(job_id)
        line = json.dumps(message, separators=(",", ":"), default=str).encode() + b"\n"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            start = os.fstat(fd).st_size
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)  # never leave half a line behind
                raise _classify(e) from e
        finally:
            os.close(fd)
        with self._lock:
            self._unsynced.add(path)
        return start + len(line)

    def truncate_results(self, job_id: str, size: int) -> bool:
        """Cut the job's result log to its committed ``size``; True when there was more."""
        path = self.result_path(job_id)
        try:
            if path.stat().st_size <= size:
                return False
            fd = os.open(path, os.O_WRONLY)
        except FileNotFoundError:
            return False
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def remove_results(self, job_id: str) -> int:
        """Delete a job's result log (the job stays); the bytes freed."""
        path = self.result_path(job_id)
        with self._lock:
            self._unsynced.discard(path)
        try:
            size = path.stat().st_size
            path.unlink()
            return size
        except FileNotFoundError:
            return 0

    def read_results(self, job_id: str, upto_seq: Optional[int] = None) -> list[dict[str, Any]]:
        """The job's result messages in seq order. A chunk redone after a crash is kept once (the last copy)."""
        path = self.result_path(job_id)
        by_seq: dict[int, dict[str, Any]] = {}
        try:
            lines = path.read_bytes().splitlines()
        except FileNotFoundError:
            return []
        for line in lines:
            try:
                msg = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash of an earlier version; its chunk was redone after the restart
            seq = msg.get("seq")
            if isinstance(seq, int) and (upto_seq is None or seq <= upto_seq):
                by_seq[seq] = msg
        return [by_seq[s] for s in sorted(by_seq)]

    # -- start-up check -----------------------------------------------------------------------------------

    def check(self) -> RecoveryReport:
        """At start, before any job runs: find what a torn commit (of an earlier version's two files) or a
        crash between writing results and committing them left, and repair it. Call on the agent's state only.

        - a job whose newest version has no queued status while older ones are still queued: the newer status
          was lost (``reannounce`` lists them; the engine queues their status again);
        - an outbox status newer than its job: the job's change was lost (the status is dropped);
        - result lines beyond a job's committed ``result_bytes``: cut off (they are redone or were never
          counted); fewer result lines than the job counts: reported;
        - spool files of no job: deleted.
        """
        report = RecoveryReport(problems=list(self.load_problems))
        with self._lock:
            jobs = self.jobs_table.raw()
            queued: dict[str, list[tuple[int, int]]] = {}
            for entry_id, entry in self.outbox_table.raw().items():
                if entry.get("k") == "status" and entry.get("j") is not None and entry.get("r"):
                    queued.setdefault(entry["j"], []).append((int(entry.get("v") or 0), int(entry_id)))
            stale: list[int] = []
            for job_id, versions in queued.items():
                job = jobs.get(job_id)
                newest = max(v for v, _ in versions)
                if job is None:
                    continue
                if newest > job["version"]:
                    stale += [i for v, i in versions if v > job["version"]]
                    report.problems.append(f"job {job_id}: queued status v{newest} is newer than the job "
                                           f"(v{job['version']}); the job's change was lost, status dropped")
                elif newest < job["version"]:
                    report.reannounce.append(job_id)
                    report.problems.append(f"job {job_id}: at v{job['version']} but only v{newest} is queued; "
                                           "its newer status is queued again")
            if stale:
                self.outbox_table.remove(doc_ids=stale)
            jobs_list = list(jobs.values())
        for job in jobs_list:
            size = job.get("result_bytes")
            if isinstance(size, int) and self.truncate_results(job["job_id"], size):
                report.problems.append(f"job {job['job_id']}: result lines written after its last commit cut off")
            # Reading a log is only worth it for jobs that will go on writing it; finished ones can be large.
            if job.get("result_seq") and not job.get("results_pruned") and job["state"] in ("QUEUED", "IN_PROGRESS"):
                have = {m.get("seq") for m in self.read_results(job["job_id"])}
                missing = [s for s in range(int(job["result_seq"])) if s not in have]
                if missing:
                    report.problems.append(f"job {job['job_id']}: result messages {missing[:10]} are counted but "
                                           "missing from its result log")
        known = {j["job_id"] for j in jobs_list}
        if self.results_dir.exists():
            for p in self.results_dir.iterdir():
                if p.name.endswith(".jsonl") and p.name[:-len(".jsonl")] not in known:
                    # Appended by a job whose first commit never happened (or left by an earlier version).
                    with contextlib.suppress(OSError):
                        p.unlink()
        if self.spool_dir.exists():
            with self._lock:
                wanted = {d.get("spool") for d in self.params_table.raw().values()}
            for p in self.spool_dir.iterdir():
                if p.name not in wanted:
                    with contextlib.suppress(OSError):
                        p.unlink()
        for p in report.problems:
            if p not in self.load_problems:
                log.error("state recovery: %s", p)
        return report

    # -- figures ------------------------------------------------------------------------------------------

    def storage_figures(self) -> StorageFigures:
        with self._lock:
            self.figures.jobs = len(self.jobs_table.raw())
            self.figures.tombstones = len(self.tombstones_table.raw())
            self.figures.tombstone_bytes = self._storage.encoded_bytes(TOMBSTONES)
            self.figures.jobs_bytes = self._storage.encoded_bytes(JOBS) + self._storage.encoded_bytes(PARAMS)
            spooled = [int(d.get("bytes", 0)) for d in self.params_table.raw().values() if "spool" in d]
            self.figures.spool_bytes = sum(spooled)
            self.figures.spool_files = len(spooled)
        return StorageFigures(**vars(self.figures))
