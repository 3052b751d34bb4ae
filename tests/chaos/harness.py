"""What every fault-injection scenario shares: a controller that streams seeded jobs and knows which requests the
broker acknowledged, a recorder of everything the node publishes (a persistent session, so a broker restart costs
it nothing), and the invariants of docs/protocol.md ("Job lifecycle") that must hold after any fault.

The invariants, for the jobs one scenario sent:

- every request the broker acknowledged (the controller's PUBACK) reaches a terminal state on the broker, one the
  job type allows after a crash (a job with effects ``once`` may end FAILED ``interrupted``, a resumable one may not);
- the versions of a job's statuses first appear in strictly increasing order; a version seen again is a redelivered
  copy and must be identical (two different statuses with one version would be two updates the node numbered alike);
- a job's result messages: each ``seq`` identical in every copy, seqs 0..n without a gap, exactly one ``final``
  (the last, ``chunks`` = n, ``complete`` only for SUCCEEDED), received before the job's terminal status;
- an ``infer`` job's chunks partition its images: every image id in exactly one chunk, in request order;
- a side-effecting job never ran twice (its id at most once in ``debug-side-effects.log``) and never SUCCEEDED
  without having run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.devbroker import Mosquitto
from agent.state import StateStore
from tests.agent_proc import AgentProc, Recorder, child_pids, wait_until

PREFIX = "cvw/v1"
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELED", "REJECTED"})
SIDE_EFFECT_LOG = "debug-side-effects.log"
STRACE = shutil.which("strace")

# How a job may end after crashes (``STATE`` or ``STATE:error code``).
DONE = frozenset({"SUCCEEDED"})
DONE_OR_INTERRUPTED = frozenset({"SUCCEEDED", "FAILED:interrupted"})


def outcome_key(status: dict[str, Any]) -> str:
    if status["state"] == "SUCCEEDED":
        return "SUCCEEDED"
    return f"{status['state']}:{(status.get('error') or {}).get('code')}"


@dataclass
class Job:
    job_id: str
    type: str
    params: dict[str, Any]
    may_end: frozenset[str]
    priority: int = 0
    acked: bool = False  # the broker acknowledged the request (PUBACK): it must not be lost

    @property
    def side_effect(self) -> bool:
        return self.type == "debug.sleep" and bool(self.params.get("side_effect"))

    @property
    def image_ids(self) -> Optional[list[str]]:
        return [im["id"] for im in self.params["images"]] if self.type == "infer" else None


def small_job(rng: random.Random, job_id: str) -> Job:
    """One job of the small-job stream: node.info, a short debug.sleep, or a debug.sleep with a side effect."""
    r = rng.random()
    if r < 0.35:
        # A control job is not resumable: killed while IN_PROGRESS it ends FAILED interrupted.
        return Job(job_id, "node.info", {}, DONE_OR_INTERRUPTED)
    if r < 0.75:
        params = {"seconds": rng.choice([0.01, 0.02, 0.05]), "steps": rng.choice([1, 2])}
        return Job(job_id, "debug.sleep", params, DONE)
    return Job(job_id, "debug.sleep", {"seconds": rng.choice([0.02, 0.05]), "steps": 2, "side_effect": True},
               DONE_OR_INTERRUPTED)


def infer_job(job_id: str, pictures: list[str], n: int) -> Job:
    """A batch of ``n`` real pictures through BlazeFace, ahead of the queued small jobs (priority 1)."""
    images = [{"id": f"img-{i:04d}", "path": pictures[i % len(pictures)]} for i in range(n)]
    return Job(job_id, "infer", {"model": "blazeface", "images": images}, DONE, priority=1)


class JobController:
    """The controller side: publishes requests (QoS 1) to one node and records which ones the broker acknowledged.
    Reconnects by itself after a broker restart, in the same session, so a request in flight is sent again."""

    def __init__(self, broker: Mosquitto, node_id: str, client_id: str):
        self.node_id = node_id
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._by_mid: dict[int, Job] = {}
        self._early: set[int] = set()  # PUBACKs that came before publish() returned
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_publish = self._on_publish
        self.client.reconnect_delay_set(0.05, 0.5)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        wait_until(self.client.is_connected, 10, "controller connected")
        self._stream: Optional[threading.Thread] = None
        self._stop = threading.Event()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        # paho calls this holding its own lock: only our short lock here, never a call back into paho.
        with self._lock:
            job = self._by_mid.pop(mid, None)
            if job is None:
                self._early.add(mid)
            elif not getattr(reason_code, "is_failure", False):
                job.acked = True

    def submit(self, job: Job) -> bool:
        """Publish the job's request; False when there is no connection (not sent, not recorded)."""
        if not self.client.is_connected():
            return False
        body = json.dumps({"type": job.type, "params": job.params, "priority": job.priority}).encode()
        info = self.client.publish(f"{PREFIX}/nodes/{self.node_id}/jobs/{job.job_id}/request", body, qos=1)
        with self._lock:
            self.jobs[job.job_id] = job
            if info.mid in self._early:
                self._early.discard(info.mid)
                job.acked = True
            else:
                self._by_mid[info.mid] = job
        return True

    def acked(self) -> list[Job]:
        with self._lock:
            return [j for j in self.jobs.values() if j.acked]

    def all_jobs(self) -> list[Job]:
        with self._lock:
            return list(self.jobs.values())

    def start_stream(self, rng: random.Random, rate: float, prefix: str = "s") -> None:
        """Send small jobs at ``rate`` per second (paced on a clock, so a slow moment is caught up) until
        ``stop_stream``; nothing is sent while the broker is away."""
        self._stop.clear()
        first = sum(1 for j in self.jobs if j.startswith(f"{prefix}-"))

        def run() -> None:
            n = first
            t0 = time.monotonic() - n / rate
            while not self._stop.is_set():
                due = t0 + n / rate
                delay = due - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return
                if self.submit(small_job(rng, f"{prefix}-{n:05d}")):
                    n += 1
                else:
                    self._stop.wait(0.05)
                    t0 = time.monotonic() - n / rate  # no burst to catch up on an outage

        self._stream = threading.Thread(target=run, name="job-stream", daemon=True)
        self._stream.start()

    def stop_stream(self) -> int:
        """Stop sending and wait for the broker's answer to what is in flight (a PUBACK arriving after the checks
        began would make a job acknowledged whose statuses are still on their way); how many jobs were sent."""
        self._stop.set()
        if self._stream is not None:
            self._stream.join(10)
            self._stream = None

        def settled() -> bool:
            with self._lock:
                return not self._by_mid

        wait_until(settled, 30, "the broker acknowledged every request in flight")
        return len(self.jobs)

    def close(self) -> None:
        self.stop_stream()
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Seen:
    """What one job published, in the order received: (receipt index, payload)."""

    statuses: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    results: list[tuple[int, dict[str, Any]]] = field(default_factory=list)

    def latest(self) -> Optional[dict[str, Any]]:
        return max((s for _, s in self.statuses), key=lambda s: s["version"], default=None)


class JobRecorder(Recorder):
    """Every status and result of one node's jobs, indexed by job as it arrives. ``persistent``: a session the
    broker keeps (a restart of the broker or of this recorder's connection loses nothing)."""

    def __init__(self, broker: Mosquitto, node_id: str, persistent: bool = True, statuses_only: bool = False):
        self.node_id = node_id
        self.by_job: dict[str, Seen] = {}
        self._n = 0
        self._base = f"{PREFIX}/nodes/{node_id}/jobs/"
        filters = [self._base + "+/status"] + ([] if statuses_only else [self._base + "+/result"])
        kw: dict[str, Any] = {"session_expiry_s": 3600, "client_id": f"chaos-rec-{node_id}"} if persistent else {}
        super().__init__(broker, *filters, **kw)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        if not topic.startswith(self._base) or not msg.payload:
            return  # an empty retained message clears a pruned job's status
        job_id, _, kind = topic[len(self._base):].rpartition("/")
        payload = json.loads(msg.payload)
        with self._cond:
            seen = self.by_job.setdefault(job_id, Seen())
            (seen.statuses if kind == "status" else seen.results).append((self._n, payload))
            self._n += 1
            self._cond.notify_all()

    def latest(self, job_id: str) -> Optional[dict[str, Any]]:
        with self._cond:
            seen = self.by_job.get(job_id)
            return seen.latest() if seen else None

    def snapshot(self) -> dict[str, Seen]:
        with self._cond:
            return {j: Seen(list(s.statuses), list(s.results)) for j, s in self.by_job.items()}

    def wait_results(self, job_id: str, count: int, timeout: float) -> None:
        """Until ``count`` result messages of the job have arrived."""
        def enough() -> bool:
            with self._cond:
                return len(self.by_job.get(job_id, Seen()).results) >= count

        wait_until(enough, timeout, f"{count} results of {job_id}")

    def wait_terminal(self, job_ids: Iterable[str], timeout: float, why: str = "") -> None:
        """Until every job has a terminal status (polled: evaluating it per message would be quadratic)."""
        ids = list(job_ids)
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                missing = [j for j in ids if (self.by_job.get(j) is None
                                              or (self.by_job[j].latest() or {}).get("state") not in TERMINAL)]
                if not missing:
                    return
                if time.monotonic() > deadline:
                    states = {j: (self.by_job[j].latest() or {}).get("state") if j in self.by_job else None
                              for j in missing[:20]}
                    raise AssertionError(f"{len(missing)} of {len(ids)} jobs have no terminal status on the broker "
                                         f"after {timeout} s{why}: {states}")
                self._cond.wait(0.2)


def check_job(job: Job, seen: Optional[Seen], must_finish: bool) -> list[str]:
    """The invariants of one job (see the module docstring); a list of what is wrong."""
    bad: list[str] = []
    jid = job.job_id
    if seen is None or not seen.statuses:
        return [f"{jid}: acknowledged but no status ever reached the broker"] if must_finish else []
    by_version: dict[int, dict[str, Any]] = {}
    top = 0
    for _, st in seen.statuses:
        v = st["version"]
        if v in by_version:
            if by_version[v] != st:
                bad.append(f"{jid}: two different statuses with version {v}: {by_version[v]} / {st}")
        elif v <= top:
            bad.append(f"{jid}: version {v} first arrived after version {top}")
        else:
            by_version[v] = st
            top = v
    last = by_version[top]
    terminal = last["state"] in TERMINAL
    if must_finish and not terminal:
        bad.append(f"{jid}: acknowledged, but its latest status on the broker is {last['state']} v{top}")
    if terminal and outcome_key(last) not in job.may_end:
        bad.append(f"{jid} ({job.type} {json.dumps(job.params)[:80]}): ended {outcome_key(last)}, allowed "
                   f"{sorted(job.may_end)}: {last.get('error')}")
    for st in by_version.values():
        if st["state"] in TERMINAL and st["version"] != top:
            bad.append(f"{jid}: status v{top} ({last['state']}) after terminal v{st['version']} ({st['state']})")
    by_seq: dict[int, tuple[int, dict[str, Any]]] = {}
    for idx, msg in seen.results:
        s = msg["seq"]
        if s in by_seq and by_seq[s][1] != msg:
            bad.append(f"{jid}: result seq {s} reported twice with different content (not a redelivered copy)")
        by_seq.setdefault(s, (idx, msg))
    finals = sorted(s for s, (_, m) in by_seq.items() if m.get("final"))
    if not terminal:
        return bad + ([f"{jid}: a final result before the job ended"] if finals else [])
    if len(finals) != 1:
        return bad + [f"{jid}: ended {last['state']} with {len(finals)} distinct final results (seqs {finals})"]
    n = finals[0]
    final = by_seq[n][1]
    if sorted(by_seq) != list(range(n + 1)):
        bad.append(f"{jid}: result seqs {sorted(by_seq)[:20]}... are not 0..{n} with the final last")
    if final.get("chunks") != n:
        bad.append(f"{jid}: final result says chunks={final.get('chunks')}, {n} distinct chunks preceded it")
    if final.get("complete") is not (last["state"] == "SUCCEEDED"):
        bad.append(f"{jid}: final result complete={final.get('complete')} for a job that ended {last['state']}")
    first_terminal = min(idx for idx, st in seen.statuses if st["state"] in TERMINAL)
    if by_seq[n][0] > first_terminal:
        bad.append(f"{jid}: the terminal status arrived before the final result")
    ids = job.image_ids
    if ids is not None and last["state"] == "SUCCEEDED":
        reported = [it["id"] for s in range(n) for it in by_seq.get(s, (0, {}))[1].get("items", [])]
        if reported != ids:
            twice = sorted({i for i in reported if reported.count(i) > 1})[:10]
            lost = sorted(set(ids) - set(reported))[:10]
            bad.append(f"{jid}: {len(reported)} image reports for {len(ids)} images; reported twice {twice}, "
                       f"never {lost}, in order: {reported == sorted(reported, key=ids.index)}")
        if final.get("total") != len(ids) or final.get("succeeded", 0) + final.get("errors", 0) != len(ids):
            bad.append(f"{jid}: final totals {({k: final.get(k) for k in ('total', 'succeeded', 'errors')})}")
    return bad


def side_effect_violations(jobs: Iterable[Job], seen: dict[str, Seen], log_path: Path) -> list[str]:
    lines = log_path.read_text().split() if log_path.exists() else []
    counts: dict[str, int] = {}
    for line in lines:
        counts[line] = counts.get(line, 0) + 1
    bad = [f"side effect of {j} happened {c} times" for j, c in counts.items() if c > 1]
    for job in jobs:
        if not job.side_effect:
            continue
        latest = seen[job.job_id].latest() if job.job_id in seen else None
        if latest is not None and latest["state"] == "SUCCEEDED" and job.job_id not in counts:
            bad.append(f"{job.job_id} SUCCEEDED without its side effect")
    return bad


def assert_invariants(ctl: JobController, rec: JobRecorder, state_dir: Path, seed: int,
                      jobs: Optional[list[Job]] = None) -> dict[str, int]:
    """Check every invariant over ``jobs`` (default: all the controller sent); returns counts for the report."""
    jobs = ctl.all_jobs() if jobs is None else jobs
    seen = rec.snapshot()
    bad: list[str] = []
    for job in jobs:
        bad += check_job(job, seen.get(job.job_id), must_finish=job.acked)
    bad += side_effect_violations(jobs, seen, state_dir / SIDE_EFFECT_LOG)
    if bad:
        raise AssertionError(f"{len(bad)} invariant violations (chaos seed {seed}):\n" + "\n".join(bad[:40]))
    ends: dict[str, int] = {}
    for job in jobs:
        latest = seen[job.job_id].latest() if job.job_id in seen else None
        key = outcome_key(latest) if latest and latest["state"] in TERMINAL else "never arrived"
        ends[key] = ends.get(key, 0) + 1
    return ends


def assert_retained_terminal(broker: Mosquitto, rec: JobRecorder, jobs: list[Job], timeout: float = 60) -> None:
    """Read the retained statuses as a controller arriving now would: each job's is terminal and its latest."""
    fresh = JobRecorder(broker, rec.node_id, persistent=False, statuses_only=True)
    try:
        fresh.wait_terminal([j.job_id for j in jobs], timeout, " (retained statuses)")
        for job in jobs:
            retained, latest = fresh.latest(job.job_id), rec.latest(job.job_id)
            assert retained is not None and latest is not None
            assert retained["version"] == latest["version"], (job.job_id, retained, latest)
    finally:
        fresh.close()


def wait_outbox_empty(agent: AgentProc, timeout: float = 60) -> None:
    def empty() -> bool:
        store = StateStore(agent.state_dir, read_only=True)
        try:
            return store.outbox_len() == 0
        finally:
            store.close()

    wait_until(empty, timeout, "the node's outbox is empty", poll=0.3)


def strace_command(syscall: str, k: int, paths: Iterable[Path] = ()) -> tuple[str, ...]:
    """strace that SIGKILLs the traced process (every thread and child followed) at the ``k``-th call of
    ``syscall`` in one of its threads; with ``paths``, only calls on those files count."""
    assert STRACE is not None
    return (STRACE, "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}", *[f"-P{p}" for p in paths],
            f"--inject={syscall}:signal=KILL:when={k}")


def wait_killed_by_strace(agent: AgentProc, timeout: float) -> bool:
    """Wait for the traced agent to be killed by the injection; True when it was. When the injected call never
    comes, kill the agent itself (killing strace would leave it running, detached)."""
    proc = agent.proc
    assert proc is not None
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        agent.kill()
        return False
    agent.proc = None
    # strace exits as its tracee did: killed by the injected SIGKILL.
    if rc not in (-signal.SIGKILL, 128 + signal.SIGKILL):
        raise AssertionError(f"traced agent exited with {rc}, not by the injected SIGKILL:\n{agent.log()[-3000:]}")
    return True


Proc = tuple[int, int]  # (pid, start time in clock ticks): a pid alone may be reused once the process is gone


def _stat(pid: int) -> Optional[list[str]]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def descendants(pid: int) -> list[Proc]:
    """Every process below ``pid`` (decode workers, the inference process, multiprocessing's forkserver)."""
    out: list[Proc] = []
    todo = [pid]
    while todo:
        for child in child_pids(todo.pop()):
            stat = _stat(child)
            if stat is not None:
                out.append((child, int(stat[19])))
            todo.append(child)
    return out


def alive(proc: Proc) -> bool:
    stat = _stat(proc[0])
    return stat is not None and int(stat[19]) == proc[1] and stat[0] != "Z"


def kill_broker_between_loops(broker: Mosquitto, k: int = 1) -> None:
    """SIGKILL mosquitto as it enters the ``k``-th ``epoll_wait`` from now: at the top of its event loop, where
    everything it has acknowledged is in its persistence file. A broker stopped with SIGSTOP goes on once traced
    and dies at its next loop boundary, having read nothing more.

    mosquitto (2.0.11) sends a PUBACK as it handles the PUBLISH and saves, with ``autosave_on_changes``, only at the
    end of that loop iteration: a SIGKILL between the two loses a message it acknowledged (1 in 8 random kills at
    250 messages/s here), which no client can make up for. Killed at a loop boundary it loses nothing it
    acknowledged, which is what the node's guarantees build on."""
    assert broker.proc is not None
    pid = broker.proc.pid
    tracer = subprocess.Popen([*strace_command("epoll_wait", k), "-p", str(pid)])
    try:
        proc = broker.proc
        wait_until(lambda: proc.poll() is not None or _tracer_of(pid) != 0, 10, "strace attached to mosquitto")
        if proc.poll() is None:
            os.kill(pid, signal.SIGCONT)
        rc = broker.proc.wait(30)
    finally:
        tracer.wait(10)
    broker.proc = None
    assert rc == -signal.SIGKILL, f"mosquitto ended {rc}, not by the injected SIGKILL"


def _tracer_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    return 0


def settle_and_check(ctl: JobController, rec: JobRecorder, agent: AgentProc, broker: Mosquitto, jobs: list[Job],
                     seed: int, timeout: float = 120) -> dict[str, int]:
    """The end of a scenario: every job reaches a terminal state on the broker, every invariant holds, the retained
    statuses are the terminal ones, and the outbox drains. Returns the outcome counts for the report."""
    rec.wait_terminal([j.job_id for j in jobs], timeout=timeout, why=f" (seed {seed})")
    ends = assert_invariants(ctl, rec, agent.state_dir, seed)
    assert_retained_terminal(broker, rec, jobs)
    wait_outbox_empty(agent)
    return ends

