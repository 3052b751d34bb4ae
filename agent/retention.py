"""Retention of what a node writes besides its state: result logs and outputs of finished jobs.

A finished job's record lives until ``jobs.retention_count`` / ``jobs.retention_days`` prune it (its tombstone
then lives ``jobs.tombstone_days``); its result log and outputs (annotated copies, masks, output files) go with
it, and earlier when they are older than ``storage.outputs_days`` or push their total past
``storage.results_max_mb`` / ``storage.outputs_max_mb`` (oldest first). Under disk pressure the oldest go first
whatever the budgets. A job whose results went keeps its record with ``results_pruned`` set, so ``job.result``
can say why nothing comes back.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from agent.state import StateStore

log = logging.getLogger("cv_worker.retention")

ACTIVE = ("QUEUED", "IN_PROGRESS")
MB = 1024 * 1024


@dataclass(frozen=True)
class RetentionLimits:
    results_max_bytes: int
    outputs_max_bytes: int
    outputs_max_age_s: float


@dataclass
class Holding:
    """One job's result log or outputs directory on disk."""

    job_id: str
    path: Path
    bytes: int
    finished: float  # when the job ended (0: unknown, oldest)


@dataclass
class RetentionFigures:
    results_files: int = 0
    results_bytes: int = 0
    outputs_jobs: int = 0
    outputs_bytes: int = 0
    removed_results: int = 0
    removed_outputs: int = 0
    freed_bytes: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


class Retention:
    def __init__(self, state: StateStore, outputs_dir: Path, limits: RetentionLimits):
        self.state = state
        self.outputs_dir = Path(outputs_dir)
        self.limits = limits
        self.figures = RetentionFigures()

    # -- what is there ------------------------------------------------------------------------------------

    def _finished(self) -> dict[str, dict[str, Any]]:
        return {j["job_id"]: j for j in self.state.all_jobs() if j["state"] not in ACTIVE}

    def _active(self) -> set[str]:
        return {jid for jid, st, _ in self.state.finished_jobs_summary() if st in ACTIVE}

    def results(self, jobs: Optional[dict[str, dict[str, Any]]] = None) -> list[Holding]:
        jobs = self._finished() if jobs is None else jobs
        out = []
        try:
            entries = list(os.scandir(self.state.results_dir))
        except FileNotFoundError:
            return []
        for e in entries:
            job_id = e.name[:-len(".jsonl")] if e.name.endswith(".jsonl") else None
            if job_id is None or job_id not in jobs:
                continue
            try:
                size = e.stat().st_size
            except OSError:
                continue
            job = jobs[job_id]
            out.append(Holding(job_id, Path(e.path), size, float(job.get("finished") or job.get("updated") or 0)))
        return out

    def outputs(self, jobs: Optional[dict[str, dict[str, Any]]] = None) -> list[Holding]:
        """Outputs directories of finished (or no longer known) jobs; running jobs' are never touched."""
        jobs = self._finished() if jobs is None else jobs
        active = self._active()
        out = []
        try:
            entries = [e for e in os.scandir(self.outputs_dir) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []
        for e in entries:
            if e.name in active:
                continue
            job = jobs.get(e.name)
            finished = float(job.get("finished") or job.get("updated") or 0) if job else 0.0
            if not finished:
                try:
                    finished = e.stat(follow_symlinks=False).st_mtime
                except OSError:
                    finished = 0.0
            out.append(Holding(e.name, Path(e.path), _tree_bytes(Path(e.path)), finished))
        return out

    # -- removing -----------------------------------------------------------------------------------------

    def remove_results(self, job_id: str, reason: str) -> int:
        freed = self.state.remove_results(job_id)
        if freed:
            with self.state.transaction():
                if self.state.get_job(job_id) is not None:
                    self.state.update_job(job_id, {"results_pruned": reason})
            self._count("results", reason, freed)
        return freed

    def remove_outputs(self, job_id: str, reason: str) -> int:
        path = self.outputs_dir / job_id
        if not path.is_dir() or path.is_symlink():
            return 0
        size = _tree_bytes(path)
        shutil.rmtree(path, ignore_errors=True)
        self._count("outputs", reason, size)
        return size

    def _count(self, what: str, reason: str, size: int) -> None:
        if what == "results":
            self.figures.removed_results += 1
        else:
            self.figures.removed_outputs += 1
        self.figures.freed_bytes += size
        key = f"{what}:{reason}"
        self.figures.by_reason[key] = self.figures.by_reason.get(key, 0) + 1

    def enforce(self, now: Optional[float] = None) -> int:
        """Apply the age and byte budgets; the bytes freed."""
        now = time.time() if now is None else now
        jobs = self._finished()
        freed = 0
        outputs = sorted(self.outputs(jobs), key=lambda h: h.finished)
        keep = []
        for h in outputs:
            if h.job_id not in jobs and self.state.get_job(h.job_id) is None:
                freed += self.remove_outputs(h.job_id, "job pruned")
            elif h.finished and now - h.finished > self.limits.outputs_max_age_s:
                freed += self.remove_outputs(h.job_id, "age")
            else:
                keep.append(h)
        total = sum(h.bytes for h in keep)
        for h in keep:
            if total <= self.limits.outputs_max_bytes:
                break
            freed += self.remove_outputs(h.job_id, "bytes")
            total -= h.bytes
        results = sorted(self.results(jobs), key=lambda h: h.finished)
        total = sum(h.bytes for h in results)
        for h in results:
            if total <= self.limits.results_max_bytes:
                break
            freed += self.remove_results(h.job_id, "bytes")
            total -= h.bytes
        if freed:
            log.info("retention freed %.1f MB of outputs and result logs", freed / MB)
        return freed

    def free(self, want: int) -> int:
        """Disk pressure: delete the oldest outputs, then the oldest result logs, of finished jobs until ``want``
        bytes are freed (or nothing is left to delete)."""
        jobs = self._finished()
        freed = 0
        for kind, holdings in (("outputs", self.outputs(jobs)), ("results", self.results(jobs))):
            for h in sorted(holdings, key=lambda h: h.finished):
                if freed >= want:
                    return freed
                if kind == "outputs":
                    freed += self.remove_outputs(h.job_id, "disk pressure")
                else:
                    freed += self.remove_results(h.job_id, "disk pressure")
        return freed

    def snapshot(self) -> RetentionFigures:
        jobs = self._finished()
        results, outputs = self.results(jobs), self.outputs(jobs)
        f = self.figures
        return RetentionFigures(
            results_files=len(results), results_bytes=sum(h.bytes for h in results), outputs_jobs=len(outputs),
            outputs_bytes=sum(h.bytes for h in outputs), removed_results=f.removed_results,
            removed_outputs=f.removed_outputs, freed_bytes=f.freed_bytes, by_reason=dict(f.by_reason))
