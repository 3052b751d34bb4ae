"""Diagnostic job types, accepted only with ``jobs.enable_debug_jobs = true``.

``debug.sleep`` lets a fleet operator (and our tests) exercise the job machinery end to end without a model:
timeouts, cancellation, pool balancing, progress, and resuming from a checkpoint after a crash.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from agent.jobs.base import Effects, JobContext, JobError, JobHandler
from agent.jobs.registry import register


class SleepParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(1.0, ge=0, le=3600, description="Total time to take.")
    steps: int = Field(10, ge=1, le=10000, description="Progress updates and checkpoints along the way.")
    resumable: bool = Field(True, description="Checkpoint each step so a restart resumes; false behaves like a "
                            "job type that cannot resume (it fails with `interrupted`).")
    ignore_cancel: bool = Field(False, description="Do not check for cancellation (tests the watchdog).")
    fail: bool = Field(False, description="End FAILED with code `debug_failure` after the last step.")
    side_effect: bool = Field(False, description="Behave as a job with side effects that must never run twice "
                              "(effects `once`): before its first step it appends its job id to "
                              "`<state_dir>/debug-side-effects.log`, which fault-injection tests count. Such a job "
                              "does not resume: a crash while it runs ends it FAILED `interrupted`.")


def _record_side_effect(path: Path, job_id: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"{job_id}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)


@register
class DebugSleep(JobHandler):
    type = "debug.sleep"
    params_model = SleepParams
    description = "Sleep in steps with progress and checkpoints (diagnostics)."

    def resumable(self, params: SleepParams) -> bool:
        # A resumed run could not tell whether its effect happened just before the crash.
        return params.resumable and not params.side_effect

    def effects_of(self, params: SleepParams) -> Effects:
        return Effects.once if params.side_effect else Effects.none

    def run(self, ctx: JobContext) -> Optional[dict[str, Any]]:
        p: SleepParams = ctx.params
        start_step = int((ctx.checkpoint or {}).get("step", 0))
        if p.side_effect:
            _record_side_effect(ctx.node.config.state_dir / "debug-side-effects.log", ctx.job_id)
        step_s = p.seconds / p.steps
        for step in range(start_step, p.steps):
            deadline = time.monotonic() + step_s
            while time.monotonic() < deadline:
                if not p.ignore_cancel:
                    ctx.check()
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
            if p.resumable:
                ctx.save_checkpoint({"step": step + 1})
            ctx.progress((step + 1) / p.steps, step=step + 1, steps=p.steps)
        if p.fail:
            raise JobError("debug_failure", "failed on request (params.fail = true)")
        return {"slept_s": p.seconds, "steps": p.steps, "resumed_from_step": start_step}
