"""The ``infer`` job loop: load (or share) the model, stream the batch through the prefetch pipeline, publish
results in chunks, each chunk with its resume checkpoint in the same durable transaction.

Exactly-once on resume: a chunk's items, its ``seq`` and the checkpoint "next image = N" become durable together
(``ctx.publish_result(..., checkpoint=...)``), so after a crash the job restarts at the first image whose chunk was
not stored: nothing reported twice, nothing lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

from agent.inference import formats
from agent.inference.annotate import draw, encode_jpeg
from agent.inference.config import RUNTIME_START_IMAGES, InferenceConfig
from agent.inference.decodeproc import RuntimeFailure
from agent.inference.params import InferParams, ItemError, ItemResult
from agent.inference.pipeline import Prefetch, Relay
from agent.inference.predict import Predictor, Prepared, mask_png, prepare
from agent.inference.runproc import RuntimeKey
from agent.inference.sources import ItemFailure
from agent.inference.upload import UploadError, put
from agent.jobs.base import JobContext, JobError
from agent.storage import atomic_write_bytes, is_disk_full

if TYPE_CHECKING:
    from agent.node import Node
    from models.runtime import Pipeline

log = logging.getLogger("cv_worker.infer")

T = TypeVar("T")

# Inferred images waiting for this thread at most; a few absorb its jitter (a chunk flush, a progress message).
RELAY_DEPTH = 4

# Loading is serialised so that two jobs arriving together for the same model load it once and share it.
_load_lock = threading.Lock()


@contextmanager
def shared_model(node: "Node", name: str, version: Optional[str]) -> Iterator["Pipeline"]:
    """The serving pipeline of ``name`` (loaded on first use, shared by every job), pinned for the block.

    A version other than the serving one is opened privately for this job and closed after it, so one job
    asking for an old version does not switch what every other job gets."""
    from models.runtime import ModelLoadError
    from models.store import StoreError

    mgr = node.model_manager
    private = None
    try:
        with _load_lock:
            serving = mgr.loaded().get(name)
            if version is None or version == serving or (serving is None and version == mgr.store.active_version(name)):
                mgr.load(name)
            else:
                private = mgr.open(name, version)
        if private is not None:
            try:
                yield private
            finally:
                private.close()
            return
        with mgr.acquire(name) as p:
            yield p
    except StoreError as e:
        code = "model_not_found" if e.code in ("not_found", "not_loaded") else f"model_{e.code}"
        raise JobError(code, f"{e} — deploy it first (model.deploy) or check the name") from None
    except ModelLoadError as e:
        raise JobError("model_load_failed", str(e)) from None


def runtime_key(node: "Node", pipeline: "Pipeline") -> Optional[RuntimeKey]:
    """What an inference process would load to run ``pipeline``'s model; None for a device the agent must keep
    to itself (EdgeTPU, Movidius, GPU)."""
    model = pipeline.model
    backend = node.model_manager.backends.get(model.backend)
    if backend is None or model.device.upper() != "CPU":
        return None
    return RuntimeKey(model.backend, model.device, str(model.path), backend.config)


class Stats:
    """Counters that survive a resume (they travel in the checkpoint)."""

    FIELDS = ("next", "ok", "errors", "detections", "infer_ms", "chunks", "annotate_errors", "masks", "mask_errors")

    def __init__(self, cp: Optional[dict[str, Any]]):
        cp = cp or {}
        self.next = int(cp.get("next", 0))
        self.ok = int(cp.get("ok", 0))
        self.errors = int(cp.get("errors", 0))
        self.detections = int(cp.get("detections", 0))
        self.infer_ms = float(cp.get("infer_ms", 0.0))
        self.chunks = int(cp.get("chunks", 0))
        self.annotate_errors = int(cp.get("annotate_errors", 0))
        self.masks = int(cp.get("masks", 0))
        self.mask_errors = int(cp.get("mask_errors", 0))
        self.error_codes: dict[str, int] = dict(cp.get("error_codes", {}))

    def checkpoint(self) -> dict[str, Any]:
        return {**{f: getattr(self, f) for f in self.FIELDS}, "error_codes": dict(self.error_codes)}

    def count(self, r: ItemResult) -> None:
        if r.ok:
            self.ok += 1
            self.detections += len(r.detections or [])
            self.infer_ms += r.inference_ms or 0.0
        else:
            self.errors += 1
            assert r.error is not None
            self.error_codes[r.error.code] = self.error_codes.get(r.error.code, 0) + 1
        if r.annotate_error:
            self.annotate_errors += 1
        if r.mask_png:
            self.masks += 1
        if r.mask_png_error:
            self.mask_errors += 1


def _error_item(item_id: str, exc: BaseException) -> ItemResult:
    if isinstance(exc, ItemFailure):
        err = ItemError(code=exc.code, message=exc.message)
    else:
        err = ItemError(code="decode_failed", message=f"{type(exc).__name__}: {exc}")
    return ItemResult(id=item_id, ok=False, error=err)


class BatchRun:
    def __init__(self, ctx: JobContext):
        self.ctx = ctx
        self.p: InferParams = ctx.params
        self.cfg: InferenceConfig = ctx.node.config.inference
        self.stats = Stats(ctx.checkpoint)
        self.resumed_from = self.stats.next
        self.out_dir = self.cfg.resolve_outputs_dir(ctx.node.config.state_dir) / ctx.job_id
        self._t0 = time.monotonic()
        self._done_here = 0
        self._last_progress = 0.0
        self._unsynced_gen: Optional[int] = None
        self._inference_process = False

    # -- the loop -------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        p, ctx = self.p, self.ctx
        total = len(p.images)
        ctx.progress(self.stats.next / total, force=True, processed=self.stats.next, total=total,
                     phase="loading model")
        with shared_model(ctx.node, p.model, p.version) as pipeline:
            predictor = Predictor(pipeline, p)
            keep = p.annotate

            def work(item: Any) -> Prepared:
                return prepare(item, pipeline, self.cfg, keep)

            chunk: list[dict[str, Any]] = []
            rows: list[list[Any]] = []
            chunk_t = time.monotonic()
            # Three stages: decode workers -> the runtime (in its own process, or on its own thread) -> this
            # thread (outputs, results).
            todo = p.images[self.stats.next:]
            decoded: Any = None
            stream: Any = None
            if self.cfg.use_processes() and not keep:  # a drawn copy needs the full image: threads keep it
                mode = self.cfg.runtime_mode
                lease = ctx.node.decode_pool().try_stream(
                    pipeline, todo, self.cfg.pipeline_depth,
                    runtime=runtime_key(ctx.node, pipeline) if mode != "thread" else None,
                    wait=mode == "process", start=len(todo) >= RUNTIME_START_IMAGES)
                if lease is not None and lease.inferred:
                    # Decode workers and the inference process are fed from this thread, between results: one
                    # thread fewer taking turns at the GIL (a feeder thread cost 0.15 ms of CPU per image more).
                    stream = lease
                    self._inference_process = True
                else:
                    decoded = lease
            if stream is None:
                if decoded is None:
                    decoded = Prefetch(work, todo, self.cfg.workers(), self.cfg.pipeline_depth)
                stream = Relay(predictor.begin, predictor.end, decoded, depth=RELAY_DEPTH)
            with stream:
                for item, got, out in stream:
                    ctx.check()
                    res = self._one(predictor, item.id, got, out)
                    self.stats.count(res)
                    d = res.dump()
                    chunk.append(d)
                    if p.output == "vott-csv":
                        rows += formats.csv_rows(item.source, d)
                    self._done_here += 1
                    if len(chunk) >= self.cfg.chunk_size or time.monotonic() - chunk_t >= self.cfg.chunk_max_s:
                        self._flush(chunk, rows)
                        chunk, rows, chunk_t = [], [], time.monotonic()
                    self._progress(total)
            if chunk:
                self._flush(chunk, rows)
            backend, device = pipeline.model.backend, pipeline.model.device
            version, task = pipeline.version, pipeline.manifest.task
        return self._finish(total, backend, device, version, task)

    def _one(self, predictor: Predictor, item_id: str, got: Any, out: Any) -> ItemResult:
        if isinstance(got, BaseException):
            return _error_item(item_id, got)
        try:
            if isinstance(out, BaseException):
                raise out
            res, dec = predictor.finish(got, out)
        except Exception as e:  # one bad image must not end the batch
            log.warning("inference failed on %s: %s", item_id, e)
            msg = str(e) if isinstance(e, RuntimeFailure) else f"{type(e).__name__}: {e}"
            return ItemResult(id=item_id, ok=False, error=ItemError(code="inference_failed", message=msg))
        if self.p.annotate and got.image is not None:
            try:
                res.annotated = self._save(f"annotated/{item_id}.jpg", encode_jpeg(draw(got.image, dec)), "image/jpeg")
            except (OSError, UploadError, ValueError) as e:
                res.annotate_error = str(e)
        if self.p.mask_png and dec.mask_map is not None:
            try:
                png = mask_png(dec, got.width, got.height)
                if png is not None:
                    res.mask_png = self._save(f"masks/{item_id}.png", png, "image/png")
            except (OSError, UploadError, ValueError) as e:
                res.mask_png_error = str(e)
        return res

    def _save(self, name: str, body: bytes, content_type: str) -> str:
        """An output file of one image: PUT under ``upload_url``, else written under the job's outputs directory."""
        if self.p.upload_url:
            return put(self.p.upload_url, name, body, content_type, self.cfg)
        path = self.out_dir / name

        def write() -> str:
            path.parent.mkdir(parents=True, exist_ok=True)
            # No fsync: after a crash the job resumes at its last checkpoint and writes these files again.
            atomic_write_bytes(path, body, durable=False)
            return str(path)

        return self._until_written(write)

    def _until_written(self, write: Callable[[], T]) -> T:
        """Run ``write``; while it fails for lack of space, the job pauses (``paused: disk_full``) until the disk
        has room and tries again. A full disk is the node's condition, not this image's or this job's error."""
        while True:
            try:
                return write()
            except OSError as e:
                if not is_disk_full(e):
                    raise
                self.ctx.wait_for_disk(e)

    def _flush(self, chunk: list[dict[str, Any]], rows: list[list[Any]]) -> None:
        first = self.stats.next
        self.stats.next += len(chunk)
        self.stats.chunks += 1
        payload: dict[str, Any] = {"chunk": self.stats.chunks - 1, "first_index": first, "items": chunk}
        if self.p.output == "vott-csv":
            payload["csv"] = formats.csv_text(rows)
        # The chunk and its checkpoint reach disk together whenever that happens, and the outbox sends the chunk only
        # then, so exactly-once needs no wait here; waiting for each fsync stalled the whole pipeline (10-17 % of
        # a batch's time). One chunk may be on its way to disk while the next is worked on, no more.
        if self._unsynced_gen is not None:
            self.ctx.wait_durable(self._unsynced_gen)
        self._unsynced_gen = self.ctx.publish_result(payload, checkpoint=self.stats.checkpoint(), wait=False)

    def _rate(self) -> float:
        dt = time.monotonic() - self._t0
        return self._done_here / dt if dt > 0 else 0.0

    def _progress(self, total: int) -> None:
        t = time.monotonic()
        if t - self._last_progress < self.cfg.progress_interval_s:
            return
        self._last_progress = t
        done = self.resumed_from + self._done_here
        rate = self._rate()
        eta = (total - done) / rate if rate > 0 else None
        self.ctx.progress(done / total, phase="running", processed=done, total=total, errors=self.stats.errors,
                          images_per_s=round(rate, 1), eta_s=round(eta, 1) if eta is not None else None)

    # -- the end --------------------------------------------------------------------------------------------

    def _finish(self, total: int, backend: str, device: str, version: str, task: str) -> dict[str, Any]:
        s, p = self.stats, self.p
        elapsed = time.monotonic() - self._t0
        result: dict[str, Any] = {
            "model": p.model, "version": version, "task": task, "backend": backend, "device": device,
            "total": total, "succeeded": s.ok, "errors": s.errors, "error_codes": s.error_codes,
            "detections": s.detections, "chunks": s.chunks, "output": p.output,
            "mean_inference_ms": round(s.infer_ms / s.ok, 3) if s.ok else None,
            "images_per_s": round(self._rate(), 1), "elapsed_s": round(elapsed, 3),
            "inference_process": self._inference_process,
        }
        if self.resumed_from:
            result["resumed_from"] = self.resumed_from
        if p.annotate:
            result["annotate_errors"] = s.annotate_errors
        if s.masks or s.mask_errors:
            result["mask_pngs"] = s.masks
            result["mask_png_errors"] = s.mask_errors
        if s.ok == 0:
            raise JobError("no_images_processed",
                           f"none of the {total} images could be processed ({_codes(s.error_codes)}); "
                           "each image's error is in the result chunks", details={"result": result})
        if p.output == "vott-csv" or p.upload_url:
            result.update(self._write_outputs())
        self.ctx.progress(1.0, force=True, phase="done", processed=total, total=total, errors=s.errors,
                          images_per_s=result["images_per_s"], eta_s=0)
        return result

    def _write_outputs(self) -> dict[str, Any]:
        state = self.ctx.node.state
        path: Path = self._until_written(lambda: formats.write_outputs(
            (m for m in state.read_results(self.ctx.job_id) if "items" in m), self.out_dir, self.p.output))
        out: dict[str, Any] = {"output_file": str(path)}
        if self.p.upload_url:
            ctype = "text/csv" if path.suffix == ".csv" else "application/json"
            try:
                out["uploaded"] = put(self.p.upload_url, path.name, path, ctype, self.cfg)
            except UploadError as e:
                out["upload_error"] = str(e)
        return out


def _codes(codes: dict[str, int]) -> str:
    return ", ".join(f"{n} {c}" for c, n in sorted(codes.items(), key=lambda kv: -kv[1])) or "no details"
