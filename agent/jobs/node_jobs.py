"""Administration job types: node.info, node.rebirth, config.get and job.cancel."""

from __future__ import annotations

from typing import Any, Optional

from agent.jobs.base import Effects, JobContext, JobHandler
from agent.jobs.registry import register
from agent.protocol import CancelParams


@register
class NodeInfo(JobHandler):
    type = "node.info"
    description = "Identity, versions, accelerators, models, capabilities, job counts and connection state."
    control = True

    def run(self, ctx: JobContext) -> Optional[dict[str, Any]]:
        return {"info": ctx.node.info()}


@register
class NodeRebirth(JobHandler):
    type = "node.rebirth"
    effects = Effects.idempotent
    description = "Publish the retained birth message again (e.g. after the controller lost retained state)."
    control = True

    def run(self, ctx: JobContext) -> Optional[dict[str, Any]]:
        ctx.node.publish_birth()
        return {"birth": ctx.node.node_status("online").model_dump(mode="json")}


@register
class ConfigGet(JobHandler):
    type = "config.get"
    description = "The node's effective configuration, secrets masked."
    control = True

    def run(self, ctx: JobContext) -> Optional[dict[str, Any]]:
        return {"config": ctx.node.config.masked(), "source": ctx.node.config.source}


@register
class JobCancel(JobHandler):
    type = "job.cancel"
    effects = Effects.idempotent
    params_model = CancelParams
    description = "Cancel a queued or running job on this node (params: job_id)."
    control = True

    def run(self, ctx: JobContext) -> Optional[dict[str, Any]]:
        job = ctx.node.engine.cancel(ctx.params.job_id)
        return {"canceled": ctx.params.job_id, "state": job["state"]}
