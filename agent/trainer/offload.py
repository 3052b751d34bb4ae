"""Job type ``train`` on a node: hand the training to a build peer, mirror its progress, deploy the result.

The node finds a peer (``params.peer``, else ``train.build_peer``, else mDNS ``role=build``), sends the request to
it on the training queue with a job id derived from its own, and follows the peer's job status and the peer's
birth/will. A peer that is gone longer than the grace period fails the job; one that comes back with the job
still running is followed again. When training succeeds the package is installed exactly as ``model.deploy``
installs one (``models.jobs.deploy_model``). The job resumes after a node restart: the peer job id is in the
checkpoint and sending the request again only makes the peer re-publish its status.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
import uuid
from typing import TYPE_CHECKING, Any, Optional

from agent.jobs.base import Effects, JobCanceled, JobContext, JobError, JobHandler, JobTimedOut
from agent.jobs.registry import register
from agent.trainer.messages import TrainParams

if TYPE_CHECKING:
    from agent.trainer.client import TrainerClient

log = logging.getLogger("cv_worker.train")

TERMINAL = ("SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELED", "REJECTED")
# Share of the node's progress taken by training when the model is deployed after it.
TRAIN_SHARE_WITH_DEPLOY = 0.9
# Fields of the peer's progress copied onto the node's job status.
MIRRORED = ("phase", "epoch_current", "epoch_total", "step_current", "step_total", "classification_loss",
            "val_loss", "val_accuracy", "device", "device_name")


def peer_job_id(node_id: str, job_id: str) -> str:
    """The id of the peer's job: the node's id and job id (so nodes never collide), hashed when too long."""
    jid = f"{node_id}.{job_id}"
    if len(jid) <= 128:
        return jid
    return f"{node_id[:60]}.{hashlib.sha256(job_id.encode()).hexdigest()[:32]}"


@register
class Train(JobHandler):
    type = "train"
    # The build peer's job id derives from this job's id, so a second run reattaches to the same training.
    effects = Effects.idempotent
    params_model = TrainParams
    description = ("Train a model on a build-system peer (`cv-worker trainer`, found by `train.build_peer` or "
                   "mDNS `role=build`), mirror its epoch/step/loss progress here, then install the result as "
                   "`model.deploy` does (unless `deploy: false`). Resumes after a restart.")

    def resumable(self, params: Any) -> bool:
        return True

    def run(self, ctx: JobContext) -> Optional[dict[str, Any]]:
        return Offload(ctx).run()


class Offload:
    def __init__(self, ctx: JobContext):
        self.ctx = ctx
        self.p: TrainParams = ctx.params
        self.node = ctx.node
        self.cfg = ctx.node.config.train
        self.prefix = ctx.node.config.mqtt.topic_prefix
        self.grace = self.p.grace_period_s or self.cfg.grace_period_s
        self.share = TRAIN_SHARE_WITH_DEPLOY if self.p.deploy else 1.0
        cp = ctx.checkpoint or {}
        self.peer_job: str = cp.get("peer_job") or peer_job_id(self.node.node_id, ctx.job_id)
        self.target: Optional[str] = cp.get("target")
        self.trained: Optional[dict[str, Any]] = cp.get("trained")
        self.peer: Optional[str] = cp.get("peer")

    def _checkpoint(self) -> None:
        self.ctx.save_checkpoint({"peer_job": self.peer_job, "target": self.target, "peer": self.peer,
                                  "trained": self.trained})

    # -- the job --------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        if self.trained is None:  # else training finished before a restart: only the deploy is left
            client = self._connect()
            try:
                if self.target is None:
                    self.target = self._choose_peer(client)
                self._checkpoint()
                client.watch_job(self.peer_job)
                self._send(client)
                self.trained = self._follow(client)
                self._checkpoint()
            finally:
                client.close()
        model = self.trained["model"]
        result: dict[str, Any] = {"model": model, "trained_on": self.peer, "peer_job_id": self.peer_job,
                                  "metrics": self.trained.get("metrics"), "device": self.trained.get("device")}
        if self.p.deploy:
            from models.jobs import deploy_model

            result["deployed"] = deploy_model(self.ctx, model["url"], sha256=model["sha256"], smoke=self.p.smoke_test,
                                              span=(self.share, 1.0), phase_prefix="deploy.")
            self.node.announce_change()  # birth message and mDNS list the new model
        return result

    def _connect(self) -> "TrainerClient":
        """A connection to the node's broker for following the peer; retried for the grace period."""
        from agent.client import ControllerError
        from agent.trainer.client import TrainerClient

        link = self.node.link
        deadline = time.monotonic() + self.grace
        while True:
            client = TrainerClient(self.node.config.mqtt, link.host, link.port,
                                   client_id=f"cvw-{self.node.node_id}-train-{uuid.uuid4().hex[:8]}")
            try:
                return client.connect()
            except ControllerError as e:
                if time.monotonic() > deadline:
                    raise JobError("broker_unreachable", f"cannot follow the training: {e}") from None
            self.ctx.check()
            time.sleep(1.0)

    def _choose_peer(self, client: "TrainerClient") -> str:
        chosen = self.p.peer or self.cfg.build_peer
        if chosen:
            return chosen
        disc = self.node.config.discovery
        if not disc.enabled:
            raise JobError("no_build_peer", "no build peer to train on: set [train] build_peer (a peer id, or '*' "
                           "for the shared training queue) or the job's `peer`; mDNS discovery of `role=build` "
                           "peers is off on this node (discovery.enabled = false)")
        from agent.discovery import find_build_peers

        self.ctx.progress(0.0, force=True, phase="finding build peer")
        found = [n for n in find_build_peers(self.cfg.discovery_timeout_s, interfaces=disc.interfaces,
                                             exclude_node_id=self.node.node_id)
                 if (not n.prefix or n.prefix == self.prefix) and (not n.caps or "train" in n.caps)]
        if not found:
            raise JobError("no_build_peer", f"no build peer advertised `role=build` with prefix {self.prefix!r} "
                           f"over mDNS within {self.cfg.discovery_timeout_s:g} s (train.discovery_timeout_s): start "
                           "`cv-worker trainer` on a machine of this network, or set [train] build_peer")
        online = set(client.online_peers())
        pick = [n for n in found if n.node_id in online] or found
        peer = random.choice(pick).node_id  # several peers: spread the nodes' jobs over them
        log.info("train job %s: build peer %s found over mDNS (of %s)", self.ctx.job_id, peer,
                 ", ".join(n.node_id for n in found), extra={"CVW_JOB_ID": self.ctx.job_id})
        return peer

    def _send(self, client: "TrainerClient") -> None:
        from agent.trainer.topics import queue_request_topic

        body = self.p.request().model_dump(exclude_none=True)
        client.submit("train", body, job_id=self.peer_job, timeout_s=None,
                      topic=queue_request_topic(self.prefix, self.peer_job, self.target))
        self.ctx.progress(0.0, force=True, phase="sent to build peer", peer=self.target, peer_job_id=self.peer_job)

    # -- following the peer ---------------------------------------------------------------------------------

    def _follow(self, client: "TrainerClient") -> dict[str, Any]:
        ctx = self.ctx
        # One timer: "down" while the peer (any peer, for the shared queue) is not online, "silent" while it is
        # online but has not answered the request yet. Either one running past the grace period fails the job.
        timer: Optional[tuple[str, float]] = None
        seen_online = False
        last_version = -1
        while True:
            try:
                ctx.check()
            except (JobCanceled, JobTimedOut):
                self._cancel_remote(client)
                raise
            outcome = client.outcome(self.peer_job)
            last = outcome.last
            if last is not None:
                self.peer = last.get("node_id") or self.peer
                if last["version"] != last_version:
                    last_version = last["version"]
                    self._mirror(last)
                if last["state"] in TERMINAL:
                    done = self._ended(outcome, last)
                    if done is not None:
                        return done
            peer = self.peer or (self.target if self.target != "*" else None)
            state = client.peer_state(peer) if peer else ("online" if client.online_peers() else None)
            kind = None if state == "online" and last is not None else "silent" if state == "online" else "down"
            t = time.monotonic()
            if kind is None:
                if timer is not None and timer[0] == "down":
                    log.info("train job %s: build peer %s is back; following its job again", ctx.job_id, peer,
                             extra={"CVW_JOB_ID": ctx.job_id})
                    self._progress_of(last, force=True, peer_state="online", reattached=True)
                timer = None
                seen_online = True
            elif timer is None or timer[0] != kind:
                timer = (kind, t)
                if kind == "down" and seen_online:
                    log.warning("train job %s: build peer %s is %s; waiting up to %g s for it to come back",
                                ctx.job_id, peer, state or "gone", self.grace, extra={"CVW_JOB_ID": ctx.job_id})
                    self._progress_of(last, force=True, peer_state=state or "unknown")
            elif t - timer[1] > self.grace:
                if kind == "silent":
                    raise JobError("build_peer_silent", f"build peer {peer or '(shared queue)'} is online but did "
                                   f"not take job {self.peer_job} within {self.grace:g} s (train.grace_period_s); "
                                   "is it a cv-worker trainer with this node's topic prefix and group?")
                raise self._lost(peer, state, last)
            client.wait_change(0.5)

    def _progress_of(self, last: Optional[dict[str, Any]], force: bool, **details: Any) -> None:
        frac = None if last is None or last.get("progress") is None else last["progress"] * self.share
        self.ctx.progress(frac, force=force, **details)

    def _mirror(self, status: dict[str, Any]) -> None:
        details = status.get("details") or {}
        mirrored = {k: details[k] for k in MIRRORED if k in details}
        state = status["state"]
        if state == "QUEUED":
            mirrored["phase"] = "queued on build peer"
        frac = status.get("progress")
        force = state != "IN_PROGRESS" or details.get("step_current") == details.get("step_total")
        self.ctx.progress(None if frac is None else frac * self.share, force=force, peer=status.get("node_id"),
                          peer_job_id=self.peer_job, peer_state="online", **mirrored)

    def _ended(self, outcome: Any, last: dict[str, Any]) -> Optional[dict[str, Any]]:
        """The training's outcome once the peer's job ended; None while its final result is still on its way."""
        if last["state"] != "SUCCEEDED":
            err = last.get("error") or {}
            code = err.get("code") or last["state"].lower()
            raise JobError(code, f"training on build peer {last.get('node_id')} (job {self.peer_job}) ended "
                           f"{last['state']}: {err.get('message') or 'no reason given'}",
                           {"peer": last.get("node_id"), "peer_job_id": self.peer_job,
                            "peer_error": err or None})
        final = next((r for r in outcome.results if r.get("final")), None)
        if final is not None and final.get("model"):
            return {k: v for k, v in final.items() if k not in ("job_id", "node_id", "seq", "final", "ts")}
        model = (last.get("details") or {}).get("model")
        if model:  # the retained status carries the package too (a result missed during a reconnect)
            return {"model": model, "device": (last.get("details") or {}).get("device")}
        return None

    def _lost(self, peer: Optional[str], state: Optional[str], last: Optional[dict[str, Any]]) -> JobError:
        details = (last or {}).get("details") or {}
        where = ""
        if details.get("epoch_current"):
            where = f" at epoch {details['epoch_current']}/{details.get('epoch_total')}"
        if peer is None:
            msg = (f"no build peer was online for the shared training queue within {self.grace:g} s "
                   "(train.grace_period_s)")
        elif last is None:
            msg = (f"build peer {peer} is {state or 'not online (it never published a birth message)'} and did not "
                   f"take job {self.peer_job} within {self.grace:g} s (train.grace_period_s)")
        else:
            msg = (f"build peer {peer} went {state or 'away'} during training{where} and did not come back within "
                   f"{self.grace:g} s (train.grace_period_s); its job {self.peer_job} is abandoned")
        return JobError("build_peer_lost", msg, {"peer": peer, "peer_job_id": self.peer_job})

    def _cancel_remote(self, client: "TrainerClient") -> None:
        """Best effort: ask the peer running the job to stop it too."""
        from agent.trainer.topics import queue_request_topic

        peer = self.peer or (self.target if self.target != "*" else None)
        if peer is None:
            return
        try:
            client.submit("job.cancel", {"job_id": self.peer_job}, job_id=f"{self.peer_job[:100]}.cancel",
                          topic=queue_request_topic(self.prefix, f"{self.peer_job[:100]}.cancel", peer))
        except Exception as e:  # the node's own cancel must still succeed
            log.warning("could not ask build peer %s to cancel %s: %s", peer, self.peer_job, e)
