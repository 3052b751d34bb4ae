"""Job types ``infer`` (batch inference, see agent/inference/) and ``job.result`` (read a job's results again).

Heavy imports (numpy, cv2, the runtimes) happen inside ``run``, so the agent starts without them.
"""

from __future__ import annotations

from typing import Any, Optional

from agent.inference.params import InferParams, ItemResult, JobResultParams
from agent.jobs.base import Effects, JobContext, JobError, JobHandler
from agent.jobs.registry import register

# Fields the engine adds to every result message; a re-published message gets fresh ones.
_ENVELOPE = ("job_id", "node_id", "seq", "final", "ts")


@register
class Infer(JobHandler):
    type = "infer"
    # A chunk redone after a crash writes the same output files and uploads (PUT) the same objects again.
    effects = Effects.idempotent
    params_model = InferParams
    result_item_model = ItemResult
    description = ("Run a batch of images (url, path under inference.input_dirs, or base64 data) through an "
                   "installed model; results stream in chunks, resumable after a crash.")

    def resumable(self, params: Any) -> bool:
        return True

    def run(self, ctx: JobContext) -> Optional[dict[str, Any]]:
        from agent.inference.batch import BatchRun

        return BatchRun(ctx).run()


@register
class JobResult(JobHandler):
    type = "job.result"
    params_model = JobResultParams
    description = ("Publish the stored result messages of an earlier job again (as this job's results, each with "
                   "`of_job` and `of_seq`), like a prediction service's 'read prediction by request id'.")

    def run(self, ctx: JobContext) -> Optional[dict[str, Any]]:
        p: JobResultParams = ctx.params
        state = ctx.node.state
        job = state.get_job(p.job_id)
        if job is None:
            tomb = state.get_tombstone(p.job_id)
            if tomb is not None:
                raise JobError("not_found", f"job {p.job_id!r} ended {tomb['state']} and was pruned from node "
                               f"{ctx.node.node_id} with its results (jobs.retention_count / retention_days)",
                               {"of_state": tomb["state"], "pruned": True})
            raise JobError("not_found", f"no job {p.job_id!r} on node {ctx.node.node_id} (it may have been pruned: "
                           "see jobs.retention_count / retention_days)")
        if job.get("results_pruned"):
            raise JobError("results_pruned", f"the results of job {p.job_id!r} were deleted "
                           f"({job['results_pruned']}: storage.results_max_mb, or the disk ran short of space)",
                           {"of_state": job["state"]})
        sent = 0
        next_seq: Optional[int] = None
        final_payload: dict[str, Any] = {}
        for msg in state.read_results(p.job_id, upto_seq=int(job.get("result_seq") or 0) - 1):
            if msg.get("seq", 0) < p.from_seq:
                continue
            ctx.check()
            body = {k: v for k, v in msg.items() if k not in _ENVELOPE}
            body.update(of_job=p.job_id, of_seq=msg.get("seq"))
            if msg.get("final"):
                # The earlier job's own final message: its totals become this job's final message below.
                final_payload = {k: v for k, v in body.items() if k not in ("chunks", "complete")}
                final_payload.update(of_chunks=msg.get("chunks"), of_complete=msg.get("complete"))
                continue
            if p.max_chunks is not None and sent >= p.max_chunks:
                next_seq = msg.get("seq")
                break
            ctx.publish_result(body)
            sent += 1
        # Without a final message of its own (the job is still running) the final message says how many were sent.
        return {**final_payload, "of_job": p.job_id, "of_state": job["state"], "republished": sent,
                "next_seq": next_seq}
