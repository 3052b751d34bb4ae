"""Job types ``model.deploy`` and ``model.remove`` (the core MQTT job protocol, see agent/jobs/base.py).

Node attributes used: ``ctx.node.model_store`` (a ModelStore) and ``ctx.node.config`` (AgentConfig, for its
``accelerators`` section). When the node also has ``model_manager`` (a ModelManager serving requests), a deployed
model that is loaded there is hot-swapped; otherwise a temporary manager loads and smoke-tests the new version.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from agent.jobs.base import Effects, JobContext, JobError, JobHandler
from agent.jobs.registry import register
from models.catalog import CatalogError
from models.fsutil import UnsafePackage
from models.manifest import ManifestError
from models.runtime import ModelLoadError, ModelManager
from models.store import StoreError


class DeployParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="Catalog name (blazeface, blazeface-full, ppocr-det), http(s) URL of a .tar.gz, "
                        "or a path on the node.")
    sha256: Optional[str] = Field(None, pattern=r"^[0-9a-fA-F]{64}$", description="Expected sha256 of the archive.")
    smoke_test: Optional[bool] = Field(None, description="Run one inference before activating; default from config.")


class RemoveParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    version: Optional[str] = Field(None, description="Remove only this version; default: the whole model.")


def _manager(ctx: JobContext) -> ModelManager:
    mgr = getattr(ctx.node, "model_manager", None)
    if mgr is not None:
        return mgr
    accel = getattr(ctx.node.config, "accelerators", None)
    return ModelManager(ctx.node.model_store, accel)


def _job_error(e: Exception) -> JobError:
    if isinstance(e, StoreError):
        return JobError(e.code, str(e))
    if isinstance(e, ManifestError):
        return JobError("invalid_manifest", str(e), {"errors": [list(x) for x in e.errors]})
    if isinstance(e, UnsafePackage):
        return JobError("unsafe_package", str(e))
    if isinstance(e, CatalogError):
        return JobError("catalog_unavailable", str(e))
    if isinstance(e, ModelLoadError):
        details = {"selection": e.selection.model_dump()} if e.selection else {}
        return JobError("load_failed", str(e), details)
    return JobError("deploy_failed", f"{type(e).__name__}: {e}")


def deploy_model(ctx: JobContext, source: str, sha256: Optional[str] = None, smoke: Optional[bool] = None,
                 span: tuple[float, float] = (0.0, 1.0), phase_prefix: str = "") -> dict[str, Any]:
    """``model.deploy`` for any job: download, sha256 check, atomic install, hot swap; progress is reported in
    ``span`` of the job's progress with phases named ``{phase_prefix}{phase}``. Raises JobError on failure."""
    lo, hi = span

    def scaled(frac: Optional[float]) -> Optional[float]:
        return None if frac is None else lo + (hi - lo) * frac

    def progress(phase: str, done: int, total: Optional[int]) -> None:
        ctx.check()  # a cancel or timeout stops the download; the staging directory is removed
        frac = None
        if phase == "download" and total:
            frac = min(0.9, 0.9 * done / total)  # the last 10% are verify + load + smoke test
        elif phase in ("verify", "install"):
            frac = 0.9 if phase == "verify" else 0.95
        ctx.progress(scaled(frac), phase=phase_prefix + phase, bytes=done, total_bytes=total)

    ctx.progress(scaled(0.0), force=True, phase=phase_prefix + "start", source=source)
    try:
        result = _manager(ctx).deploy(source, progress=progress, sha256=sha256, smoke=smoke)
    except (StoreError, ManifestError, UnsafePackage, CatalogError, ModelLoadError) as e:
        raise _job_error(e) from None
    ctx.progress(scaled(1.0), force=True, phase=phase_prefix + "done")
    return result


@register
class ModelDeploy(JobHandler):
    type = "model.deploy"
    effects = Effects.once
    params_model = DeployParams
    description = ("Install a model (catalog name, URL or path), verify its sha256s, load and smoke-test it, then "
                   "activate it; a loaded model is hot-swapped. Progress while downloading.")

    def run(self, ctx: JobContext) -> Optional[dict[str, Any]]:
        p: DeployParams = ctx.params
        return {"model": deploy_model(ctx, p.source, sha256=p.sha256, smoke=p.smoke_test)}


@register
class ModelRemove(JobHandler):
    type = "model.remove"
    effects = Effects.once
    params_model = RemoveParams
    description = "Remove an installed model (or one version of it); a loaded model is unloaded first."

    def run(self, ctx: JobContext) -> Optional[dict[str, Any]]:
        p: RemoveParams = ctx.params
        store = ctx.node.model_store
        mgr = getattr(ctx.node, "model_manager", None)
        try:
            if mgr is not None and (p.version is None or mgr.loaded().get(p.name) == p.version):
                mgr.unload(p.name)
            removed = store.remove(p.name, p.version)
        except StoreError as e:
            raise _job_error(e) from None
        return {"name": p.name, "removed_versions": removed, "remaining": store.versions(p.name)}
