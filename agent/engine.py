"""The job engine: the state machine of every job, its queue, its workers, timeouts, cancellation and recovery.

Every state change is one state transaction that updates the job and queues its status message in the outbox,
so what the controller sees is exactly what is on disk. Jobs run on a pool of worker threads; control jobs
(`node.info`, `job.cancel`, ...) have their own lane so they answer while the workers are busy.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from agent.jobs import registry
from agent.jobs.base import Effects, JobCanceled, JobError, JobHandler, JobTimedOut
from agent.protocol import ErrorCode, ErrorInfo, JobState, JobStatus, now
from agent.state import DiskFull
from agent.summary import summarize

if TYPE_CHECKING:
    from agent.node import Node

log = logging.getLogger("cv_worker.jobs")

ACTIVE = (JobState.QUEUED.value, JobState.IN_PROGRESS.value)
# Seconds after a job ends before the outputs and result-log budgets are applied again (see _maybe_prune).
ENFORCE_AFTER_END_S = 5.0


class _Shutdown(Exception):
    """Raised inside a job when the agent stops: the job stays IN_PROGRESS and is recovered at the next start."""


def job_log_extra(job: dict[str, Any], **more: Any) -> dict[str, Any]:
    """Structured fields for the journal (``journalctl CVW_JOB_ID=...``) and the text log."""
    extra = {"CVW_JOB_ID": job.get("job_id"), "CVW_JOB_TYPE": job.get("type"), "CVW_JOB_STATE": job.get("state")}
    extra.update(more)
    return extra


@dataclass
class _Run:
    job_id: str
    handler: JobHandler
    cancel_event: threading.Event = field(default_factory=threading.Event)
    stop_reason: Optional[str] = None  # "canceled", "timed_out", "shutdown"
    deadline: Optional[float] = None  # monotonic
    abandoned: bool = False
    last_progress: float = 0.0
    paused: bool = False  # waiting for disk space: the status shows `paused: disk_full`


class RunContext:
    """What a running handler sees (see ``agent.jobs.base.JobContext``)."""

    def __init__(self, engine: "JobEngine", run: _Run, job: dict[str, Any], params: Any):
        self._engine = engine
        self._run = run
        self.job_id: str = job["job_id"]
        self.job_type: str = job["type"]
        self.params = params
        self.checkpoint: Optional[dict[str, Any]] = job.get("checkpoint")
        self.node = engine.node
        self.cancel_event = run.cancel_event

    def check(self) -> None:
        self._engine._check_stop(self._run)

    def remaining_s(self) -> Optional[float]:
        if self._run.deadline is None:
            return None
        return max(0.0, self._run.deadline - time.monotonic())

    def progress(self, fraction: Optional[float], force: bool = False, **details: Any) -> None:
        t = time.monotonic()
        if not force and t - self._run.last_progress < self._engine.cfg.progress_interval_s:
            return
        self._run.last_progress = t
        if fraction is not None:
            fraction = min(1.0, max(0.0, float(fraction)))
        self._engine._update_running(self._run, progress=fraction, details=details)

    def save_checkpoint(self, data: dict[str, Any]) -> None:
        self._engine._save_checkpoint(self._run, data)

    def publish_result(
        self, payload: dict[str, Any], final: bool = False, checkpoint: Optional[dict[str, Any]] = None,
        wait: bool = True,
    ) -> int:
        """Store and queue one result message (with ``checkpoint`` in the same transaction). ``wait``: return once
        it is on disk; otherwise return at once with the state generation to pass to ``wait_durable``."""
        return self._engine._publish_result(self._run, payload, final=final, checkpoint=checkpoint, wait=wait)

    def wait_durable(self, generation: int) -> None:
        """Block until the state generation returned by ``publish_result(..., wait=False)`` is on disk."""
        self._engine._wait_durable(self._run, generation)

    def wait_for_disk(self, error: Optional[BaseException] = None) -> None:
        """A write of the job's own (an output file) failed with ``error``, or the job wants to know the disk has
        room: block while the state disk is short of space (the job shows ``paused: disk_full``), then return so
        the job can try again. Raises JobCanceled/JobTimedOut meanwhile."""
        self._engine._wait_for_disk(self._run, self, error)


class JobEngine:
    def __init__(self, node: "Node"):
        self.node = node
        self.cfg = node.config.jobs
        self.state = node.state
        self.realm: str = node.realm  # which job types this engine runs (see agent.jobs.registry)
        self._lock = threading.RLock()
        self._queue: "queue.PriorityQueue[tuple[int, int, str]]" = queue.PriorityQueue()
        self._control: "queue.Queue[Optional[str]]" = queue.Queue()
        self._order = itertools.count()
        self._running: dict[str, _Run] = {}
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._live_workers = 0
        self._status_listeners: list[Callable[[dict[str, Any]], None]] = []

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        self.recover()
        for _ in range(self.cfg.workers):
            self._spawn_worker()
        self._start_thread(self._control_loop, "job-control")
        self._start_thread(self._watch_loop, "job-watch")

    def _start_thread(self, target: Any, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _spawn_worker(self) -> None:
        with self._lock:
            self._live_workers += 1
            n = self._live_workers
        self._start_thread(self._worker_loop, f"job-worker-{n}")

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop taking jobs; ask running ones to stop; they stay IN_PROGRESS and are recovered at next start."""
        self._stopping.set()
        with self._lock:
            runs = list(self._running.values())
        for run in runs:
            run.stop_reason = "shutdown"
            run.cancel_event.set()
        for _ in range(self._live_workers):
            self._queue.put((-1000, -1, ""))
        self._control.put(None)
        deadline = time.monotonic() + grace_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def recover(self) -> None:
        """After a restart: repair what the start-up check finds, queue QUEUED jobs, resume or fail IN_PROGRESS
        ones, prune old ones."""
        report = self.state.check()
        if report.reannounce:
            with self.state.transaction():
                for job_id in report.reannounce:
                    job = self.state.get_job(job_id)
                    if job is not None:
                        self._queue_status(job)
        endings: list[tuple[str, ErrorInfo]] = []
        for job in sorted(self.state.all_jobs(), key=lambda j: j.get("created", 0)):
            if job["state"] == JobState.QUEUED.value:
                self._enqueue(job)
            elif job["state"] == JobState.IN_PROGRESS.value:
                handler_cls = registry.get(job["type"], self.realm)
                if handler_cls is None:
                    endings.append((job["job_id"], ErrorInfo(
                        code=ErrorCode.unsupported.value,
                        message=f"job type {job['type']!r} is no longer available on this node after its restart")))
                    continue
                params, invalid = self._parse_params(handler_cls, job)
                if invalid is not None:
                    endings.append((job["job_id"], invalid))
                    continue
                if handler_cls().resumable(params):
                    log.info("resuming job %s from its checkpoint", job["job_id"], extra=job_log_extra(job))
                    # Not paused any more: a run that was waiting for disk space waits again only if it must.
                    details = {k: v for k, v in (job.get("details") or {}).items() if k != "paused"}
                    with self.state.transaction():
                        self._emit(job["job_id"], details={**details, "resumed": True})
                    self._enqueue(job)
                else:
                    endings.append((job["job_id"], ErrorInfo(
                        code=ErrorCode.interrupted.value,
                        message="the agent stopped while this job ran and this job type cannot resume; "
                                "submit it again")))
        self._end_recovered(endings)
        self.prune()

    def _end_recovered(self, endings: list[tuple[str, ErrorInfo]]) -> None:
        """Interrupted jobs that cannot go on end FAILED. On a full disk their final results cannot be stored yet,
        and start-up must not wait for room (the node must connect and answer first): what is left ends on a thread
        of its own once there is room."""
        for i, (job_id, error) in enumerate(endings):
            try:
                self._finish_once(job_id, JobState.FAILED, error, None, None)
            except DiskFull as e:
                self.node.disk.report(e)
                rest = endings[i:]
                log.warning("%d interrupted jobs end once the state disk has room (%s)", len(rest), e)
                threading.Thread(target=self._end_when_room, args=(rest,), name="job-recover", daemon=True).start()
                return

    def _end_when_room(self, endings: list[tuple[str, ErrorInfo]]) -> None:
        for job_id, error in endings:
            self._finish(job_id, JobState.FAILED, error)

    # -- accepting and announcing -------------------------------------------------------------------------

    def status_of(self, job: dict[str, Any]) -> JobStatus:
        return JobStatus(
            job_id=job["job_id"], node_id=self.node.node_id, type=job["type"], state=JobState(job["state"]),
            version=job["version"], progress=job.get("progress"), details=job.get("details") or {},
            error=ErrorInfo(**job["error"]) if job.get("error") else None, ts=job["updated"],
        )

    def add_status_listener(self, fn: Callable[[dict[str, Any]], None]) -> None:
        """``fn(status)`` for every status the engine queues (a JobStatus as JSON data, a version may repeat when a
        duplicate request re-publishes it), inside the state transaction that queued it: keep it short and never
        call back into the state."""
        self._status_listeners.append(fn)

    def _queue_status(self, job: dict[str, Any], extra_response: Optional[tuple[str, Optional[str]]] = None) -> None:
        status = self.status_of(job).model_dump(mode="json")
        for fn in self._status_listeners:
            try:
                fn(status)
            except Exception:  # a listener bug must not stop a job's state machine
                log.exception("status listener failed")
        out = self.node.outbox
        out.add(self.node.topics.job_status(job["job_id"]), status, retain=True, expiry=self.cfg.status_expiry_s,
                job=(job["job_id"], job["version"]))
        responses = []
        if job.get("response_topic"):
            responses.append((job["response_topic"], job.get("correlation")))
        if extra_response and extra_response not in responses:
            responses.append(extra_response)
        for topic, corr in responses:
            out.add(topic, status, correlation=corr, kind="status")

    def _emit(self, job_id: str, **fields: Any) -> Optional[dict[str, Any]]:
        """Apply ``fields`` to a job, bump its version, queue its status. Call inside a state transaction."""
        job = self.state.get_job(job_id)
        if job is None:
            return None
        job.update(fields)
        job["version"] = job.get("version", 0) + 1
        job["updated"] = now()
        self.state.put_job(job)
        self._queue_status(job)
        return job

    def _new_version(self, job_id: str) -> int:
        """The version a new job document for ``job_id`` starts at: never below anything published for that id
        (a REJECTED id may be submitted again, also after it was pruned)."""
        prior = self.state.get_job(job_id)
        if prior is not None:
            return int(prior.get("version", 0)) + 1
        tomb = self.state.get_tombstone(job_id)
        return int(tomb["version"]) + 1 if tomb is not None else 1

    def _new_job(self, job_id: str, job_type: str, state: JobState, **fields: Any) -> dict[str, Any]:
        t = now()
        job = {
            "job_id": job_id, "type": job_type, "state": state.value, "version": self._new_version(job_id),
            "progress": None, "details": {}, "error": None, "created": t, "updated": t, "started": None,
            "finished": None, "timeout_s": None, "priority": 0, "pool": None, "source": "mqtt",
            "response_topic": None, "correlation": None, "checkpoint": None, "result_seq": 0, "result_bytes": 0,
        }
        job.update(fields)
        if self.state.get_job(job_id) is not None or self.state.get_tombstone(job_id) is not None:
            self.state.remove_results(job_id)  # an earlier, REJECTED attempt's final result
        return job

    def accept(self, job_id: str, req: Any, handler_cls: type[JobHandler], pool: Optional[str],
               response: Optional[tuple[str, Optional[str]]], source: str = "mqtt") -> dict[str, Any]:
        """Record a valid request as QUEUED (inside the caller's transaction) and return the job. Raises
        DiskFull (nothing recorded) when its params cannot be stored."""
        job = self._new_job(
            job_id, req.type, JobState.QUEUED, timeout_s=req.timeout_s or self.cfg.default_timeout_s,
            priority=req.priority, pool=pool, source=source, response_topic=response[0] if response else None,
            correlation=response[1] if response else None)
        self.state.put_params(job_id, req.params)
        self.state.put_job(job)
        self.state.remove_tombstones([job_id])
        self._queue_status(job)
        log.info("job %s (%s) queued%s", job_id, req.type, f" from pool {pool}" if pool else "",
                 extra=job_log_extra(job))
        return job

    def reject(self, job_id: str, job_type: str, error: ErrorInfo,
               response: Optional[tuple[str, Optional[str]]]) -> None:
        """Record and announce a request that cannot be accepted (inside the caller's transaction): its REJECTED
        status, after its final result (the completion rule holds for every terminal state)."""
        job = self._new_job(job_id, job_type, JobState.REJECTED, error=error.model_dump(), finished=now(),
                            response_topic=response[0] if response else None,
                            correlation=response[1] if response else None)
        self.state.put_params(job_id, {})
        self.state.put_job(job)
        self.state.remove_tombstones([job_id])
        try:
            self._queue_final(job, JobState.REJECTED, error, None)
        except DiskFull as e:
            # A refusal on a disk that filled up while the reserve was still there (typically one *for* a full
            # disk): give the reserve up, which is what it is for, and write the final result again (a failed
            # append leaves nothing behind).
            self.node.disk.report(e)
            try:
                self._queue_final(job, JobState.REJECTED, error, None)
            except DiskFull as e2:
                # The refusal itself must still be told: its status fits in the journal's reserve, its result not.
                log.warning("job %s: no room for the final result of its refusal (%s); status only", job_id, e2)
        self._queue_status(self.state.get_job(job_id) or job)
        log.warning("job %s rejected: %s: %s", job_id, error.code, error.message, extra=job_log_extra(job))

    def answer_tombstone(self, job_id: str, tomb: dict[str, Any],
                         response: Optional[tuple[str, Optional[str]]]) -> None:
        """A request for a job that ended and was pruned: its final status again, never a second run (inside the
        caller's transaction). Not retained: the retained status was cleared when the job was pruned."""
        error = tomb.get("error")
        status = JobStatus(
            job_id=job_id, node_id=self.node.node_id, type=tomb.get("type") or "unknown",
            state=JobState(tomb["state"]), version=int(tomb["version"]), progress=None,
            details={"pruned": True, "finished": tomb.get("finished")},
            error=ErrorInfo(code=error, message="(the job ended with this error code; its record was pruned)")
            if error else None, ts=now()).model_dump(mode="json")
        out = self.node.outbox
        out.add(self.node.topics.job_status(job_id), status, kind="status")
        if response is not None:
            out.add(response[0], status, correlation=response[1], kind="status")
        log.info("request for job %s, which ended %s and was pruned: answered with its final status, not run again",
                 job_id, tomb["state"], extra={"CVW_JOB_ID": job_id})

    def republish(self, job: dict[str, Any], response: Optional[tuple[str, Optional[str]]]) -> None:
        """A duplicate request: announce the job's latest status again (inside the caller's transaction)."""
        self._queue_status(job, extra_response=response)
        log.info("duplicate request for job %s (%s); re-published its status", job["job_id"], job["state"],
                 extra=job_log_extra(job))

    def dispatch(self, job: dict[str, Any]) -> None:
        """Hand an accepted job (already durable) to the workers."""
        self._enqueue(job)

    def _enqueue(self, job: dict[str, Any]) -> None:
        handler_cls = registry.get(job["type"], self.realm)
        if handler_cls is not None and handler_cls.control:
            self._control.put(job["job_id"])
        else:
            self._queue.put((-int(job.get("priority") or 0), next(self._order), job["job_id"]))

    # -- running ------------------------------------------------------------------------------------------

    def _worker_loop(self) -> None:
        while not self._stopping.is_set():
            _, _, job_id = self._queue.get()
            if not job_id:
                break
            if self._run_job(job_id):
                return  # this thread's job was abandoned; a replacement worker took its place

    def _control_loop(self) -> None:
        while not self._stopping.is_set():
            job_id = self._control.get()
            if job_id is None:
                break
            self._run_job(job_id)

    def _parse_params(self, handler_cls: type[JobHandler], job: dict[str, Any]) -> tuple[Any, Optional[ErrorInfo]]:
        """The job's params, or the error it must end with."""
        try:
            return handler_cls.params_model.model_validate(self.state.get_params(job["job_id"]) or {}), None
        except Exception as e:  # validated at intake; only a changed handler can get here
            return None, ErrorInfo(code=ErrorCode.invalid_params.value, message=str(e))

    def _run_job(self, job_id: str) -> bool:
        """Run one job to its end. Returns True when the job was abandoned (timed out or canceled while stuck)."""
        job = self.state.get_job(job_id)
        if job is None or job["state"] not in ACTIVE:
            return False  # canceled while queued, or pruned
        handler_cls = registry.get(job["type"], self.realm)
        if handler_cls is None:
            self._finish(job_id, JobState.FAILED, ErrorInfo(code=ErrorCode.unknown_job_type.value,
                                                           message=f"no handler for job type {job['type']!r}"))
            return False
        params, invalid = self._parse_params(handler_cls, job)
        if invalid is not None:
            self._finish(job_id, JobState.FAILED, invalid)
            return False
        run = _Run(job_id=job_id, handler=handler_cls())
        started = job.get("started") or now()
        if job.get("timeout_s"):
            # The timeout counts from the first start; a resumed job keeps its original deadline.
            run.deadline = time.monotonic() + float(job["timeout_s"]) - max(0.0, now() - started)
        with self._lock:
            if self._stopping.is_set():
                return False
            self._running[job_id] = run
        with self.state.transaction():
            job = self._emit(job_id, state=JobState.IN_PROGRESS.value, started=started) or job
        if run.handler.effects_of(params) == Effects.once:
            # After a crash a job whose IN_PROGRESS never reached disk runs again from QUEUED: one with side
            # effects must not have begun them.
            self.state.wait_durable()
        log.info("job %s (%s) started", job_id, job["type"], extra=job_log_extra(job))
        ctx = RunContext(self, run, job, params)
        try:
            if run.deadline is not None and run.deadline <= time.monotonic():
                raise JobTimedOut()
            result = run.handler.run(ctx)
            if run.stop_reason is None:
                self._finish(job_id, JobState.SUCCEEDED, None, result=result)
        except JobTimedOut:
            self._finish(job_id, JobState.TIMED_OUT, self._timeout_error(job))
        except JobCanceled:
            self._finish(job_id, JobState.CANCELED, ErrorInfo(code=ErrorCode.canceled.value,
                                                             message="canceled by a job.cancel request"))
        except _Shutdown:
            log.info("job %s interrupted by shutdown; it will be recovered at the next start", job_id,
                     extra=job_log_extra(job))
        except JobError as e:
            self._finish(job_id, JobState.FAILED, ErrorInfo(code=e.code, message=e.message), details=e.details)
        except Exception as e:
            log.exception("job %s crashed", job_id, extra=job_log_extra(job))
            self._finish(job_id, JobState.FAILED, ErrorInfo(
                code=ErrorCode.internal_error.value,
                message=f"{type(e).__name__}: {e} (a bug in cv-worker; the journal has the traceback)"))
        finally:
            with self._lock:
                self._running.pop(job_id, None)
        return run.abandoned

    def _timeout_error(self, job: dict[str, Any]) -> ErrorInfo:
        return ErrorInfo(code=ErrorCode.timed_out.value,
                         message=f"the job ran longer than its timeout_s={job.get('timeout_s')}")

    def _watch_loop(self) -> None:
        """Enforce timeouts: a handler that ignores ``check()`` is abandoned and its worker replaced."""
        while not self._stopping.wait(0.1):
            t = time.monotonic()
            with self._lock:
                expired = [r for r in self._running.values()
                           if r.deadline is not None and r.deadline <= t and r.stop_reason is None]
            for run in expired:
                self._stop_run(run, "timed_out")
            self._maybe_prune()

    def _stop_run(self, run: _Run, reason: str) -> None:
        run.stop_reason = reason
        run.cancel_event.set()
        job = self.state.get_job(run.job_id) or {"job_id": run.job_id}
        if reason == "timed_out":
            self._finish(run.job_id, JobState.TIMED_OUT, self._timeout_error(job))
        else:
            self._finish(run.job_id, JobState.CANCELED, ErrorInfo(code=ErrorCode.canceled.value,
                                                                  message="canceled by a job.cancel request"))
        # The controller has its answer now; if the handler does not notice within a few seconds its thread
        # keeps running detached and a fresh worker takes its place, so the pool never shrinks.
        threading.Thread(target=self._abandon_if_stuck, args=(run,), daemon=True).start()

    def _abandon_if_stuck(self, run: _Run) -> None:
        time.sleep(2.0)
        with self._lock:
            stuck = run.job_id in self._running and self._running[run.job_id] is run
            if stuck:
                run.abandoned = True
                del self._running[run.job_id]
        if stuck and not run.handler.control and not self._stopping.is_set():
            log.warning("job %s did not stop within 2 s; leaving its thread and starting a new worker", run.job_id)
            self._spawn_worker()

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued or running job; raises JobError when it cannot be."""
        job = self.state.get_job(job_id)
        if job is None:
            raise JobError(ErrorCode.not_found.value, f"no job {job_id!r} on node {self.node.node_id}")
        with self._lock:
            run = self._running.get(job_id)
        if run is not None and run.stop_reason is None:
            self._stop_run(run, "canceled")
        elif job["state"] == JobState.QUEUED.value:
            self._finish(job_id, JobState.CANCELED, ErrorInfo(code=ErrorCode.canceled.value,
                                                             message="canceled by a job.cancel request"))
        elif job["state"] != JobState.IN_PROGRESS.value:
            raise JobError(ErrorCode.not_cancelable.value, f"job {job_id!r} already ended {job['state']}")
        return self.state.get_job(job_id) or job

    # -- updates from a running job -----------------------------------------------------------------------

    def _live(self, run: _Run) -> bool:
        return run.stop_reason is None and not run.abandoned

    def _update_running(self, run: _Run, progress: Optional[float], details: dict[str, Any]) -> None:
        if not self._live(run):
            return
        with self.state.transaction():
            job = self.state.get_job(run.job_id)
            if job is None or job["state"] != JobState.IN_PROGRESS.value:
                return
            self._emit(run.job_id, progress=progress, details={**(job.get("details") or {}), **details})

    def _save_checkpoint(self, run: _Run, data: dict[str, Any]) -> None:
        if not self._live(run):
            return
        with self.state.transaction():
            self.state.update_job(run.job_id, {"checkpoint": data})
        self._wait_durable(run)
        self._pause_if_short_of_disk(run)

    def _wait_durable(self, run: _Run, gen: Optional[int] = None) -> None:
        """Wait for a commit; a full disk can hold commits up for long, and the job must still answer a cancel, its
        timeout and a shutdown meanwhile."""
        target = self.state.generation if gen is None else gen
        while not self.state.wait_durable(target, timeout=0.5):
            self._check_stop(run)
            if self._stopping.is_set():
                raise _Shutdown()

    def _pause_if_short_of_disk(self, run: _Run) -> None:
        """At a checkpoint: a job waits there while the disk is short of space instead of failing later."""
        if self.node.disk.refusing():
            self._wait_for_disk(run, None, None)
        elif run.paused:
            self._mark_paused(run, False)  # the output that did not fit elsewhere (see below) fitted since

    def _wait_for_disk(self, run: _Run, ctx: Optional["RunContext"], error: Optional[BaseException]) -> None:
        disk = self.node.disk
        disk.report(error)
        if not disk.refusing():
            if error is not None:
                # The state disk has room: the write failed on another filesystem (inference.outputs_dir), or room
                # was made meanwhile. The job tries again every second and shows paused until its next checkpoint.
                if not run.paused:
                    log.warning("job %s paused: %s; trying again every second", run.job_id, error,
                                extra={"CVW_JOB_ID": run.job_id})
                self._mark_paused(run, True)
                self._check_stop(run)
                disk.wait_change(1.0)
            return
        log.warning("job %s paused: the state disk is short of space; it goes on by itself once space is free",
                    run.job_id, extra={"CVW_JOB_ID": run.job_id})
        self._mark_paused(run, True)
        while disk.refusing():
            self._check_stop(run)
            disk.wait_change(0.5)
        self._mark_paused(run, False)
        log.info("job %s goes on: the state disk has room again", run.job_id, extra={"CVW_JOB_ID": run.job_id})

    def _check_stop(self, run: _Run) -> None:
        if run.cancel_event.is_set():
            if run.stop_reason == "timed_out":
                raise JobTimedOut()
            if run.stop_reason == "shutdown":
                raise _Shutdown()
            raise JobCanceled()

    def _mark_paused(self, run: _Run, paused: bool) -> None:
        if not self._live(run) or run.paused == paused:
            return
        run.paused = paused
        with self.state.transaction():
            job = self.state.get_job(run.job_id)
            if job is None or job["state"] != JobState.IN_PROGRESS.value:
                return
            details = {k: v for k, v in (job.get("details") or {}).items() if k != "paused"}
            if paused:
                details["paused"] = "disk_full"
            self._emit(run.job_id, details=details)

    def _result_message(self, job: dict[str, Any], payload: dict[str, Any], final: bool,
                        complete: bool = True) -> dict[str, Any]:
        seq = job.get("result_seq", 0)
        msg = {**payload, "job_id": job["job_id"], "node_id": self.node.node_id, "seq": seq, "final": final,
               "ts": now()}
        if final:
            msg.update(chunks=seq, complete=complete)
        return msg

    def _queue_result(self, job: dict[str, Any], msg: dict[str, Any]) -> None:
        """Store and queue one result message (inside a transaction); advances the job's result_seq. Raises
        DiskFull (nothing stored) when the result log cannot grow."""
        size = self.state.append_result(job["job_id"], msg)
        self.state.update_job(job["job_id"], {"result_seq": msg["seq"] + 1, "result_bytes": size})
        job["result_seq"], job["result_bytes"] = msg["seq"] + 1, size
        self.node.outbox.add(self.node.topics.job_result(job["job_id"]), msg, kind="result")
        if job.get("response_topic"):
            self.node.outbox.add(job["response_topic"], msg, correlation=job.get("correlation"), kind="result")

    def _publish_result(self, run: _Run, payload: dict[str, Any], final: bool,
                        checkpoint: Optional[dict[str, Any]], wait: bool = True) -> int:
        while True:
            if not self._live(run):
                return 0
            try:
                with self.state.transaction():
                    job = self.state.get_job(run.job_id)
                    if job is None:
                        return 0
                    self._queue_result(job, self._result_message(job, payload, final))
                    if checkpoint is not None:
                        self.state.update_job(run.job_id, {"checkpoint": checkpoint})
                    if final:
                        self.state.update_job(run.job_id, {"final_sent": True})
                break
            except DiskFull as e:
                # Nothing of the chunk was kept: wait for room, then store it again.
                self._wait_for_disk(run, None, e)
        gen = self.state.generation  # this transaction's, or a later one: committed together or after it
        if checkpoint is not None and wait:
            self._wait_durable(run, gen)
        if checkpoint is not None:
            self._pause_if_short_of_disk(run)
        return gen

    def _queue_final(self, job: dict[str, Any], state: JobState, error: Optional[ErrorInfo],
                     result: Optional[dict[str, Any]]) -> None:
        """The job's one final result (inside a transaction): how many result messages preceded it and whether the
        output is complete; a job that did not succeed carries its error."""
        if job.get("final_sent"):
            return
        payload = dict(result or {}) if state == JobState.SUCCEEDED else {"state": state.value}
        if error is not None:
            payload["error"] = error.model_dump()
        self._queue_result(job, self._result_message(job, payload, final=True,
                                                     complete=state == JobState.SUCCEEDED))
        self.state.update_job(job["job_id"], {"final_sent": True})
        job["final_sent"] = True

    def _finish(self, job_id: str, state: JobState, error: Optional[ErrorInfo], result: Optional[dict[str, Any]] = None,
                details: Optional[dict[str, Any]] = None) -> bool:
        """Move a job to a terminal state exactly once. The final result goes out before the final status."""
        while True:
            try:
                return self._finish_once(job_id, state, error, result, details)
            except DiskFull as e:
                # The final result could not be stored: the job ends once there is room for it, or, when the agent
                # stops first, is recovered at the next start like any job that was running.
                if self._stopping.is_set():
                    log.warning("job %s could not end before the agent stopped: %s", job_id, e)
                    return False
                log.warning("job %s cannot end yet: %s; waiting for disk space", job_id, e)
                self.node.disk.report(e)
                self.node.disk.wait_change(1.0)

    def _finish_once(self, job_id: str, state: JobState, error: Optional[ErrorInfo],
                     result: Optional[dict[str, Any]], details: Optional[dict[str, Any]]) -> bool:
        with self.state.transaction():
            job = self.state.get_job(job_id)
            if job is None or job["state"] not in ACTIVE:
                return False
            self._queue_final(job, state, error, result)
            fields: dict[str, Any] = {"state": state.value, "finished": now(), "checkpoint": None,
                                      "error": error.model_dump() if error else None}
            if state == JobState.SUCCEEDED:
                fields["progress"] = 1.0
            if details:
                fields["details"] = {**(job.get("details") or {}), **details}
            job = self._emit(job_id, **fields) or job
            # A finished job never runs again: it keeps a summary of its params, not megabytes of inline images.
            if self.state.params_size(job_id) > self.cfg.finished_params_max_bytes:
                self.state.replace_params(job_id, summarize(self.state.get_params(job_id),
                                                            self.cfg.finished_params_max_bytes))
        self._ended_since_enforce = True
        self.node.job_finished(job)
        level = logging.INFO if state == JobState.SUCCEEDED else logging.WARNING
        log.log(level, "job %s (%s) %s%s", job_id, job["type"], state.value,
                f": {error.code}: {error.message}" if error else "", extra=job_log_extra(job))
        return True

    # -- housekeeping -------------------------------------------------------------------------------------

    _last_prune = 0.0
    _last_enforce = 0.0
    _ended_since_enforce = False

    def _maybe_prune(self) -> None:
        # Every minute, or sooner under load: each state write costs time proportional to the jobs kept.
        overfull = self.state.job_count() > self.cfg.retention_count * 1.2 + 50
        if overfull or time.monotonic() - self._last_prune > 60:
            self.prune()
        elif self._ended_since_enforce and time.monotonic() - self._last_enforce > ENFORCE_AFTER_END_S:
            # A few large batches can write gigabytes of outputs within the minute: the byte budgets follow soon
            # after jobs end, not only at the next prune.
            self._enforce_retention()

    def _enforce_retention(self) -> None:
        self._last_enforce = time.monotonic()
        self._ended_since_enforce = False
        try:
            self.node.retention.enforce()
        except OSError as e:
            log.error("retention of outputs and result logs failed: %s", e)

    def prune(self) -> int:
        """Drop finished jobs beyond the retention count or older than the retention age. Each leaves a tombstone
        (so its id is never run again) and its retained status is cleared from the broker."""
        self._last_prune = time.monotonic()
        finished = sorted(((jid, t) for jid, st, t in self.state.finished_jobs_summary() if st not in ACTIVE),
                          key=lambda item: item[1], reverse=True)
        t_now = now()
        cutoff = t_now - self.cfg.retention_days * 86400
        reasons = {jid: "count" if i >= self.cfg.retention_count else "age"
                   for i, (jid, t) in enumerate(finished) if i >= self.cfg.retention_count or t < cutoff}
        drop = list(reasons)
        if drop:
            with self.state.transaction():
                for job_id in drop:
                    job = self.state.get_job(job_id)
                    if job is None:
                        continue
                    self.state.put_tombstone(job_id, {
                        "state": job["state"], "version": job["version"], "type": job["type"],
                        "finished": job.get("finished") or job.get("updated"), "pruned": t_now,
                        "error": (job.get("error") or {}).get("code")})
                    self.node.outbox.add(self.node.topics.job_status(job_id), None, retain=True, kind="clear")
                results = self.state.remove_jobs(drop)
            self.node.retention.jobs_pruned(drop, reasons, results)
            log.info("pruned %d finished jobs (tombstones keep their ids for %g days)", len(drop),
                     self.cfg.tombstone_days)
        self._prune_tombstones(t_now)
        self._enforce_retention()
        return len(drop)

    def _prune_tombstones(self, t_now: float) -> None:
        tombs = self.state.tombstones()
        if not tombs:
            return
        cutoff = t_now - self.cfg.tombstone_days * 86400
        tombs.sort(key=lambda item: item[1].get("pruned") or 0)
        budget = self.cfg.tombstone_max_kb * 1024
        total = sum(tombstone_bytes(job_id, doc) for job_id, doc in tombs)
        drop = []
        reasons: dict[str, int] = {}
        for job_id, doc in tombs:
            if (doc.get("pruned") or 0) < cutoff or total > budget:
                drop.append(job_id)
                reason = "age" if (doc.get("pruned") or 0) < cutoff else "bytes"
                reasons[reason] = reasons.get(reason, 0) + 1
                total -= tombstone_bytes(job_id, doc)
        if drop:
            with self.state.transaction():
                self.state.remove_tombstones(drop)
            self.node.retention.tombstones_forgotten(reasons)
            log.info("forgot %d tombstones of pruned jobs (jobs.tombstone_days / tombstone_max_kb)", len(drop))

    # -- views --------------------------------------------------------------------------------------------

    def running_ids(self) -> list[str]:
        with self._lock:
            return list(self._running)

    def queue_depth(self) -> int:
        return self._queue.qsize() + self._control.qsize()


def tombstone_bytes(job_id: str, doc: dict[str, Any]) -> int:
    """What a tombstone takes in the state (its id and document as JSON), for the byte budget."""
    return len(job_id) + len(json.dumps(doc, separators=(",", ":"))) + 6


def decode_correlation(corr: Optional[str]) -> Optional[bytes]:
    return base64.b64decode(corr) if corr else None


def encode_correlation(data: Optional[bytes]) -> Optional[str]:
    return base64.b64encode(data).decode() if data else None
