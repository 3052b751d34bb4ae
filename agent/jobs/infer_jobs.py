"""Job types ``infer`` (batch inference, see agent/inference/) and ``job.result`` (read a job's results again).

Heavy imports (numpy, cv2, the runtimes) happen inside ``run``, so the agent starts without them.
"""

from __future__ import annotations

from typing import Any, Optional

from agent.inference.params import InferParams, ItemResult, JobResultParams
from agent.jobs.base import JobContext, JobError, JobHandler
from agent.jobs.registry import register

# Fields the engine adds to every result message; a re-published message gets fresh ones.
_ENVELOPE = ("job_id", "node_id", "seq", "final", "ts")


@register
class Infer(JobHandler):
    type = "infer"
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
            raise JobError("not_found", f"no job {p.job_id!r} on node {ctx.node.node_id} (it may have been pruned: "
                           "see jobs.retention_count / retention_days)")
        sent = 0
        final_payload: dict[str, Any] = {}
        for msg in state.read_results(p.job_id):
            if msg.get("seq", 0) < p.from_seq:
                continue
            ctx.check()
            body = {k: v for k, v in msg.items() if k not in _ENVELOPE}
            body.update(of_job=p.job_id, of_seq=msg.get("seq"))
            if msg.get("final"):
                final_payload = body  # becomes this job's own final message below
                continue
            ctx.publish_result(body)
            sent += 1
        # The earlier job's final message (totals) is this job's final message; without one (the job is still
        # running, or failed) the final message just says how many chunks were sent.
        return {**final_payload, "of_job": p.job_id, "of_state": job["state"], "republished": sent}
