"""Retention of what a node writes besides its state: result logs and outputs of finished jobs.

A finished job's record lives until ``jobs.retention_count`` / ``jobs.retention_days`` prune it (its tombstone
then lives ``jobs.tombstone_days``, within ``jobs.tombstone_max_kb``); its result log and outputs (annotated copies,
masks, output files) go with it, and earlier when they are older than ``storage.outputs_days`` or push their total
past ``storage.results_max_mb`` / ``storage.outputs_max_mb`` (oldest first). Under disk pressure the oldest go first
whatever the budgets. A job whose results went keeps its record with ``results_pruned`` set, so ``job.result``
can say why nothing comes back. Running jobs' files are never touched.

What was removed, and why, is counted for ``node.stats`` (since the agent started).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from agent.state import StateStore

log = logging.getLogger("cv_worker.retention")

ACTIVE = ("QUEUED", "IN_PROGRESS")
MB = 1024 * 1024

What = Literal["jobs", "tombstones", "results", "outputs"]


@dataclass(frozen=True)
class RetentionLimits:
    results_max_bytes: int
    outputs_max_bytes: int
    outputs_max_age_s: float


@dataclass(frozen=True)
class Holding:
    """One job's result log or outputs directory on disk."""

    job_id: str
    path: Path
    bytes: int
    files: int
    finished: float  # when the job ended (0: unknown, oldest)


@dataclass
class Removed:
    """What retention deleted since the agent started: per kind, the count by reason, and the bytes freed."""

    jobs: dict[str, int] = field(default_factory=dict)
    tombstones: dict[str, int] = field(default_factory=dict)
    results: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, int] = field(default_factory=dict)
    freed_bytes: int = 0

    def count(self, what: What, reason: str, n: int = 1, size: int = 0) -> None:
        counts: dict[str, int] = getattr(self, what)
        counts[reason] = counts.get(reason, 0) + n
        self.freed_bytes += size

    def copy(self) -> "Removed":
        return Removed(dict(self.jobs), dict(self.tombstones), dict(self.results), dict(self.outputs),
                       self.freed_bytes)


@dataclass(frozen=True)
class RetentionFigures:
    """What finished jobs keep on disk now, and what retention removed."""

    result_logs: int
    results_bytes: int
    outputs_jobs: int
    outputs_files: int
    outputs_bytes: int
    removed: Removed


def _tree_size(path: Path) -> tuple[int, int]:
    """Bytes and files under ``path``."""
    total = files = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
                files += 1
            except OSError:
                pass
    return total, files


def _over_budget(holdings: list[Holding], budget: int) -> list[Holding]:
    """The first of ``holdings`` (oldest first) that must go for the rest to fit in ``budget`` bytes."""
    total = sum(h.bytes for h in holdings)
    out = []
    for h in holdings:
        if total <= budget:
            break
        out.append(h)
        total -= h.bytes
    return out


class Retention:
    def __init__(self, state: StateStore, outputs_dir: Path, limits: RetentionLimits):
        self.state = state
        self.outputs_dir = Path(outputs_dir)
        self.limits = limits
        self.removed = Removed()
        # The enforcer, the disk guard and the stats all come here; one at a time keeps the counts exact.
        self._lock = threading.Lock()
        # A finished job's outputs never change, so their size is measured once (walking thousands of annotated
        # copies every 30 s for the stats would cost a Pi real time): job id -> (finished, bytes, files).
        self._sizes: dict[str, tuple[float, int, int]] = {}

    # -- what is there ------------------------------------------------------------------------------------

    def _jobs(self) -> dict[str, tuple[str, float]]:
        """Every job: id -> (state, finished-or-updated time)."""
        return {jid: (st, float(t)) for jid, st, t in self.state.finished_jobs_summary()}

    def results(self, jobs: Optional[dict[str, tuple[str, float]]] = None) -> list[Holding]:
        """Result logs of finished jobs."""
        jobs = self._jobs() if jobs is None else jobs
        out = []
        try:
            entries = list(os.scandir(self.state.results_dir))
        except FileNotFoundError:
            return []
        for e in entries:
            job_id = e.name[:-len(".jsonl")] if e.name.endswith(".jsonl") else None
            job = jobs.get(job_id) if job_id is not None else None
            if job_id is None or job is None or job[0] in ACTIVE:
                continue
            try:
                size = e.stat().st_size
            except OSError:
                continue
            out.append(Holding(job_id, Path(e.path), size, 1, job[1]))
        return out

    def outputs(self, jobs: Optional[dict[str, tuple[str, float]]] = None) -> list[Holding]:
        """Outputs directories of finished (or no longer known) jobs; running jobs' are never touched."""
        jobs = self._jobs() if jobs is None else jobs
        out = []
        try:
            entries = [e for e in os.scandir(self.outputs_dir) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []
        for e in entries:
            job = jobs.get(e.name)
            if job is not None and job[0] in ACTIVE:
                continue
            finished = job[1] if job is not None else 0.0
            if not finished:
                try:
                    finished = e.stat(follow_symlinks=False).st_mtime
                except OSError:
                    finished = 0.0
            cached = self._sizes.get(e.name)
            if cached is not None and cached[0] == finished:
                size, files = cached[1], cached[2]
            else:
                size, files = _tree_size(Path(e.path))
                self._sizes[e.name] = (finished, size, files)
            out.append(Holding(e.name, Path(e.path), size, files, finished))
        present = {h.job_id for h in out}
        for gone in [j for j in self._sizes if j not in present]:
            del self._sizes[gone]
        return out

    # -- removing -----------------------------------------------------------------------------------------

    def _remove_results(self, job_id: str, reason: str) -> int:
        freed = self.state.remove_results(job_id)
        if freed:
            with self.state.transaction():
                if self.state.get_job(job_id) is not None:
                    self.state.update_job(job_id, {"results_pruned": reason})
            self.removed.count("results", reason, size=freed)
        return freed

    def _remove_outputs(self, job_id: str, reason: str) -> int:
        path = self.outputs_dir / job_id
        if not path.is_dir() or path.is_symlink():
            return 0
        job = self.state.get_job(job_id)
        if job is not None and job["state"] in ACTIVE:
            return 0  # a job accepted and started since the listing was taken
        size, _ = _tree_size(path)
        shutil.rmtree(path, ignore_errors=True)
        self._sizes.pop(job_id, None)
        self.removed.count("outputs", reason, size=size)
        return size

    def jobs_pruned(self, job_ids: list[str], reasons: dict[str, str], results: tuple[int, int]) -> None:
        """The engine pruned these finished jobs (``reasons``: job id -> `count` or `age`); their result logs
        (``results``: how many, their bytes) went with their records, their outputs go now."""
        with self._lock:
            for job_id in job_ids:
                self.removed.count("jobs", reasons.get(job_id, "count"))
                self._remove_outputs(job_id, "job pruned")
            if results[0]:
                self.removed.count("results", "job pruned", *results)

    def tombstones_forgotten(self, reasons: dict[str, int]) -> None:
        """The engine forgot tombstones: reason (`age`, `bytes`) -> how many."""
        with self._lock:
            for reason, n in reasons.items():
                self.removed.count("tombstones", reason, n)

    def enforce(self, now: Optional[float] = None) -> int:
        """Apply the age and byte budgets; the bytes freed."""
        now = time.time() if now is None else now
        with self._lock:
            jobs = self._jobs()
            freed = 0
            keep = []
            for h in sorted(self.outputs(jobs), key=lambda h: h.finished):
                if h.job_id not in jobs:
                    freed += self._remove_outputs(h.job_id, "job pruned")
                elif h.finished and now - h.finished > self.limits.outputs_max_age_s:
                    freed += self._remove_outputs(h.job_id, "age")
                else:
                    keep.append(h)
            for h in _over_budget(keep, self.limits.outputs_max_bytes):
                freed += self._remove_outputs(h.job_id, "bytes")
            results = sorted(self.results(jobs), key=lambda h: h.finished)
            for h in _over_budget(results, self.limits.results_max_bytes):
                freed += self._remove_results(h.job_id, "bytes")
        if freed:
            log.info("retention freed %.1f MB of outputs and result logs (storage.outputs_days / outputs_max_mb / "
                     "results_max_mb)", freed / MB)
        return freed

    def free(self, want: int) -> int:
        """Disk pressure: delete the oldest outputs, then the oldest result logs, of finished jobs until ``want``
        bytes are freed (or nothing is left to delete)."""
        with self._lock:
            jobs = self._jobs()
            freed = 0
            for kind, holdings in (("outputs", self.outputs(jobs)), ("results", self.results(jobs))):
                for h in sorted(holdings, key=lambda h: h.finished):
                    if freed >= want:
                        return freed
                    if kind == "outputs":
                        freed += self._remove_outputs(h.job_id, "disk pressure")
                    else:
                        freed += self._remove_results(h.job_id, "disk pressure")
            return freed

    def snapshot(self) -> RetentionFigures:
        with self._lock:
            jobs = self._jobs()
            results, outputs = self.results(jobs), self.outputs(jobs)
            return RetentionFigures(
                result_logs=len(results), results_bytes=sum(h.bytes for h in results), outputs_jobs=len(outputs),
                outputs_files=sum(h.files for h in outputs), outputs_bytes=sum(h.bytes for h in outputs),
                removed=self.removed.copy())
