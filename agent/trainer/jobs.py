"""Job types of a build peer (realm ``trainer``): ``train`` does the training; ``job.cancel``, ``job.result`` and
``node.info`` are the node's own handlers, registered here too so the queue can be administered the same way."""

from __future__ import annotations

import logging
import shutil
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Optional

from agent.jobs.base import Effects, JobCanceled, JobContext, JobError, JobHandler, JobTimedOut
from agent.jobs.infer_jobs import JobResult
from agent.jobs.node_jobs import JobCancel, NodeInfo
from agent.jobs.registry import TRAINER, register_in
from agent.trainer.messages import TrainedModel, TrainProgress, TrainRequest

if TYPE_CHECKING:
    from agent.trainer.peer import TrainerPeer
    from agent.trainer.plugins import EpochMetrics
    from agent.trainer.status_post import StatusPoster

log = logging.getLogger("cv_worker.trainer")

for _shared in (JobCancel, JobResult, NodeInfo):
    register_in(TRAINER)(_shared)

# Shares of the job's progress: reading the data, training, exporting and delivering the package.
LOAD_SHARE, TRAIN_SHARE = 0.05, 0.85


@register_in(TRAINER)
class Train(JobHandler):
    type = "train"
    effects = Effects.once
    params_model = TrainRequest
    description = ("Train a model on annotated images with a trainer plugin (default `classifier`), report "
                   "epoch/step/loss progress, and deliver the model package (artifact server or PUT to `model`).")

    def run(self, ctx: JobContext) -> Optional[dict[str, Any]]:
        return TrainingRun(ctx).run()


class TrainingRun:
    def __init__(self, ctx: JobContext):
        self.ctx = ctx
        self.p: TrainRequest = ctx.params
        self.peer: "TrainerPeer" = ctx.node  # type: ignore[assignment]
        self.cfg = self.peer.config.trainer
        self.fields = TrainProgress(job_id=ctx.job_id, state="IN_PROGRESS", phase="loading", progress=0.0,
                                    epoch_total=self.p.epochs)
        self.poster: Optional["StatusPoster"] = None
        self.t0 = time.monotonic()

    # -- progress -------------------------------------------------------------------------------------------

    def emit(self, force: bool = False, **changes: Any) -> None:
        self.fields = self.fields.model_copy(update=changes)
        d = self.fields.model_dump(exclude_none=True)
        details = {k: v for k, v in d.items() if k not in ("job_id", "state", "progress")}
        self.ctx.progress(self.fields.progress, force=force, **details)
        if self.poster is not None:
            self.poster.post(d, force=force)

    def on_report(self, epoch: Optional[int] = None, step: Optional[int] = None, steps: Optional[int] = None,
                  loss: Optional[float] = None, val: Optional["EpochMetrics"] = None,
                  phase: Optional[str] = None) -> None:
        if phase is not None:
            self.emit(force=True, phase=phase, progress=LOAD_SHARE + TRAIN_SHARE)
            return
        assert epoch is not None and step is not None and steps is not None
        done = ((epoch - 1) * steps + step) / (self.p.epochs * steps)
        changes: dict[str, Any] = {"phase": "training", "progress": round(LOAD_SHARE + TRAIN_SHARE * done, 4),
                                   "epoch_current": epoch, "step_current": step, "step_total": steps}
        if loss is not None:
            changes["classification_loss"] = round(loss, 5)
        end_of_epoch = val is not None or step == steps
        if val is not None:
            changes.update(val_loss=None if val.loss is None else round(val.loss, 5),
                           val_accuracy=None if val.accuracy is None else round(val.accuracy, 5),
                           **{f"val_{k}": round(v, 5) for k, v in val.extra.items()})
        self.emit(force=end_of_epoch, **changes)

    # -- the job --------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        from agent.trainer.status_post import StatusPoster

        if self.p.status:
            self.poster = StatusPoster(self.p.status, self.cfg.status_timeout_s, self.cfg.status_interval_s)
        final_state, error = "FAILED", None
        try:
            result = self._run()
            final_state = "SUCCEEDED"
            return result
        except JobError as e:
            error = {"code": e.code, "message": e.message}
            raise
        except JobCanceled:
            final_state, error = "CANCELED", {"code": "canceled", "message": "canceled by a job.cancel request"}
            raise
        except JobTimedOut:
            final_state, error = "TIMED_OUT", {"code": "timed_out", "message": "the job ran past its timeout_s"}
            raise
        except BaseException as e:
            if not self.ctx.cancel_event.is_set():
                error = {"code": "internal_error", "message": f"{type(e).__name__}: {e}"}
            raise
        finally:
            if self.poster is not None and (error is not None or final_state == "SUCCEEDED"):
                last = self.fields.model_copy(update={"state": final_state, "error": error}).model_dump(
                    exclude_none=True)
                if final_state != "SUCCEEDED":
                    last["phase"] = "failed"
                self.poster.close(last)
            shutil.rmtree(self.cfg.resolve_work_dir(self.peer.config.state_dir) / self.ctx.job_id,
                          ignore_errors=True)

    def _run(self) -> dict[str, Any]:
        from agent.trainer import annotations, artifacts
        from agent.trainer.plugins import TrainContext, load_plugin, parse_options

        p, ctx, peer = self.p, self.ctx, self.peer
        plugin = load_plugin(p.plugin, f"build peer {peer.node_id}")
        options = parse_options(plugin, p.options)
        device, device_name = peer.device()
        self.emit(force=True, phase="loading", device=device, device_name=device_name)
        data = annotations.load(
            p.annotations, self.cfg, ctx.check,
            progress=lambda n, total: self.emit(progress=round(LOAD_SHARE * n / max(1, total), 4)))
        log.info("job %s: %d samples of %d classes from %s; training %s on %s", ctx.job_id, len(data.samples),
                 len(data.labels), p.annotations, p.plugin, device)
        version = p.version or datetime.now(timezone.utc).strftime("%Y%m%d.%H%M%S")
        work = self.cfg.resolve_work_dir(peer.config.state_dir) / ctx.job_id
        shutil.rmtree(work, ignore_errors=True)
        pkg = work / "package"
        pkg.mkdir(parents=True)
        tctx = TrainContext(job_id=ctx.job_id, name=p.name, version=version, epochs=p.epochs,
                            batch_size=p.batch_size, seed=p.seed, validation_split=p.validation_split, device=device,
                            device_name=device_name, package_dir=pkg, threads=self.cfg.threads, check=ctx.check,
                            report=self.on_report)
        self.emit(force=True, phase="training", epoch_current=0)
        try:
            result = plugin.train(data, options, tctx)
        except (JobError, JobCanceled, JobTimedOut):
            raise
        except Exception as e:
            if ctx.cancel_event.is_set():
                raise  # the agent is stopping: the engine handles it
            log.exception("job %s: plugin %s failed", ctx.job_id, p.plugin)
            raise JobError("training_failed", f"plugin {p.plugin} failed: {type(e).__name__}: {e}") from None
        manifest = self._verify(result.package_dir)
        fname = f"{manifest.name}-{manifest.version}.tar.gz"
        dest = peer.artifacts.path_for(ctx.job_id, fname)
        sha, size = artifacts.archive(result.package_dir, dest)
        artifacts.prune(peer.artifacts.root, self.cfg.keep_artifacts)
        artifact_url = peer.artifacts.url_for(ctx.job_id, fname)
        url = artifact_url
        if p.model:
            self.emit(force=True, phase="uploading", progress=0.97)
            try:
                artifacts.put(p.model, dest, self.cfg.upload_timeout_s)
            except OSError as e:
                raise JobError("upload_failed", f"the model was trained but could not be delivered: {e}; it is "
                               f"still on the artifact server: {artifact_url}") from None
            url = p.model
        model = TrainedModel(name=manifest.name, version=manifest.version, url=url, sha256=sha, size=size,
                             formats=sorted(manifest.files), skipped_formats=result.skipped_formats,
                             labels=list(manifest.labels or []), artifact_url=artifact_url)
        self.emit(force=True, phase="done", progress=1.0, model=model.model_dump())
        out: dict[str, Any] = {"model": model.model_dump(), "metrics": result.metrics, "plugin": p.plugin,
                               "device": device, "device_name": device_name, "samples": len(data.samples),
                               "classes": data.labels, "elapsed_s": round(time.monotonic() - self.t0, 2)}
        if self.poster is not None:
            out["status_posts"] = {"failed": self.poster.errors, "last_error": self.poster.last_error}
        return out

    def _verify(self, package_dir: Any) -> Any:
        """The plugin's package must be one a node will install: valid manifest, every sha256 right."""
        from models.fsutil import UnsafePackage, check_tree
        from models.manifest import ManifestError, load_manifest
        from models.store import StoreError, verify_package

        try:
            check_tree(package_dir)
            manifest = load_manifest(package_dir)
            verify_package(package_dir, manifest)
        except (ManifestError, StoreError, UnsafePackage) as e:
            raise JobError("bad_package", f"plugin {self.p.plugin} produced an invalid package: {e}") from None
        return manifest
