"""Loaded models: selection of backend/device, the image -> Prediction pipeline, and hot-swapping versions.

Hot-swap protocol: the new version is loaded and must pass a smoke inference while the old one keeps serving;
then the pointer is switched under a lock; requests already running on the old version finish on it, and the old
version is closed when the last of them returns. If the new version fails to load or to run, nothing switches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import numpy as np
from pydantic import BaseModel

from accelerators.base import Backend, BackendError, LoadedModel
from accelerators.config import AcceleratorsConfig
from accelerators.detect import HardwareReport
from accelerators.selection import Selection, select
from models.decoders import decode
from models.manifest import ModelManifest, read_labels
from models.preprocess import prepare
from models.results import Prediction
from models.store import ModelStore, Progress, StoreError

log = logging.getLogger(__name__)


class ModelLoadError(Exception):
    def __init__(self, message: str, selection: Optional[Selection] = None):
        super().__init__(message)
        self.selection = selection


class Pipeline:
    """One loaded version of one model: preprocess -> backend inference -> decoder."""

    def __init__(self, manifest: ModelManifest, package_dir: Path, model: LoadedModel, selection: Optional[Selection]):
        self.manifest = manifest
        self.package_dir = package_dir
        self.model = model
        self.selection = selection
        self.labels = read_labels(manifest, package_dir)
        self.inflight = 0
        self.retired = False
        self.closed = False

    @property
    def version(self) -> str:
        return self.manifest.version

    def run(self, image: np.ndarray, image_color: str = "RGB") -> Prediction:
        t0 = time.perf_counter()
        x, tf = prepare(image, self.manifest.input, image_color)
        t1 = time.perf_counter()
        name = self.manifest.input.name
        res = self.model.infer({name: x} if name else x)
        t2 = time.perf_counter()
        dec = decode(self.manifest.decoder, res.outputs, tf, self.labels)
        t3 = time.perf_counter()
        return Prediction(
            model=self.manifest.name,
            version=self.manifest.version,
            task=self.manifest.task,
            backend=res.backend,
            device=res.device,
            image_size=(int(image.shape[1]), int(image.shape[0])),
            detections=dec.detections,
            classes=dec.classes,
            mask=dec.mask,
            timing_ms={
                "preprocess": (t1 - t0) * 1000,
                "infer": res.infer_ms,
                "decode": (t3 - t2) * 1000,
                "total": (t3 - t0) * 1000,
            },
        )

    def smoke_test(self) -> None:
        """One inference on a synthetic image; raises if the runtime fails or returns non-finite numbers."""
        spec = self.manifest.input
        rng = np.random.default_rng(0)
        img = rng.integers(0, 256, size=(spec.height, spec.width, 3), dtype=np.uint8)
        x, tf = prepare(img, spec)
        res = self.model.infer({spec.name: x} if spec.name else x)
        for k, v in res.outputs.items():
            if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v)):
                raise ModelLoadError(f"smoke inference of {self.manifest.name} {self.version}: output {k} not finite")
        decode(self.manifest.decoder, res.outputs, tf, self.labels)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.model.close()


class SwapResult(BaseModel):
    name: str
    version: str
    previous: Optional[str]
    backend: str
    device: str
    load_ms: float


class ModelManager:
    """Loaded models by name. Thread-safe: ``predict`` may run from many job workers while a swap happens."""

    def __init__(
        self,
        store: ModelStore,
        accelerators: Optional[AcceleratorsConfig] = None,
        backends: Optional[dict[str, Backend]] = None,
        report: Optional[HardwareReport] = None,
    ):
        from accelerators.registry import create_backends

        self.store = store
        self.accel_config = accelerators or AcceleratorsConfig()
        self.backends = backends if backends is not None else create_backends(self.accel_config)
        self._report = report
        self._current: dict[str, Pipeline] = {}
        self._lock = threading.Lock()
        self._swap_locks: dict[str, threading.Lock] = {}

    @property
    def report(self) -> HardwareReport:
        if self._report is None:
            from accelerators.detect import detect

            self._report = detect(self.accel_config, self.backends)
        return self._report

    def selection(self, manifest: ModelManifest) -> Selection:
        return select(
            manifest.name, list(manifest.files), manifest.preferred_backends, self.backends, self.report,
            self.accel_config,
        )

    # --- loading -----------------------------------------------------------------------------------------------
    def open(self, name: str, version: Optional[str] = None, backend: Optional[str] = None,
             device: Optional[str] = None) -> Pipeline:
        """Load a version into a new Pipeline (not yet serving). ``backend``/``device`` override the selection."""
        pkg = self.store.package_dir(name, version)
        manifest = self.store.manifest(name, version)
        if backend is not None:
            b = self.backends.get(backend)
            if b is None:
                raise ModelLoadError(f"unknown backend {backend!r} (known: {', '.join(sorted(self.backends))})")
            dev = device or "CPU"
            fmt = next((f for f in b.formats_for(dev) if f in manifest.files), None)
            if fmt is None:
                raise ModelLoadError(f"{name} has no file that {backend}:{dev} reads ({', '.join(b.formats_for(dev))})")
            sel = None
        else:
            sel = self.selection(manifest)
            if sel.chosen is None:
                raise ModelLoadError(
                    f"no backend on this node can run {name} {manifest.version}:\n{sel.explain()}", sel
                )
            b, dev, fmt = self.backends[sel.chosen.backend], sel.chosen.device, sel.chosen.format
        assert fmt is not None
        try:
            model = b.load(pkg / manifest.files[fmt].path, dev)  # type: ignore[index]
        except BackendError as e:
            raise ModelLoadError(f"{name} {manifest.version} failed to load on {b.name}:{dev}: {e}", sel) from e
        return Pipeline(manifest, pkg, model, sel)

    def load(self, name: str, version: Optional[str] = None, **kw: Any) -> Pipeline:
        """Make ``name`` serve (the active version by default); a no-op when that version already serves."""
        cur = self._current.get(name)
        if cur is not None and (version is None or cur.version == version) and not kw:
            return cur
        self.swap(name, version or self.store.active_version(name) or "", **kw)
        return self._current[name]

    # --- serving -----------------------------------------------------------------------------------------------
    @contextmanager
    def acquire(self, name: str) -> Iterator[Pipeline]:
        """The serving pipeline, pinned: a swap during the ``with`` block waits for it before closing this one."""
        with self._lock:
            p = self._current.get(name)
            if p is None:
                raise StoreError(f"model {name!r} is not loaded", "not_loaded")
            p.inflight += 1
        try:
            yield p
        finally:
            with self._lock:
                p.inflight -= 1
                close = p.retired and p.inflight == 0
            if close:
                p.close()

    def predict(self, name: str, image: np.ndarray, image_color: str = "RGB") -> Prediction:
        if name not in self._current:
            self.load(name)
        with self.acquire(name) as p:
            return p.run(image, image_color)

    def loaded(self) -> dict[str, str]:
        with self._lock:
            return {n: p.version for n, p in self._current.items()}

    # --- swapping ----------------------------------------------------------------------------------------------
    def swap(self, name: str, version: str, smoke: bool = True, **kw: Any) -> SwapResult:
        """Load ``version`` next to the serving one, smoke-test it, then switch; the old one drains and closes."""
        with self._lock:
            swap_lock = self._swap_locks.setdefault(name, threading.Lock())
        with swap_lock:  # one swap per model at a time; predictions continue meanwhile
            new = self.open(name, version or None, **kw)
            try:
                if smoke:
                    new.smoke_test()
            except Exception as e:
                new.close()
                if isinstance(e, ModelLoadError):
                    raise
                raise ModelLoadError(f"{name} {new.version} failed its smoke inference: {e}") from e
            with self._lock:
                old = self._current.get(name)
                self._current[name] = new
                close_old = False
                if old is not None:
                    old.retired = True
                    close_old = old.inflight == 0
            if close_old and old is not None:
                old.close()
            log.info("model %s now serves version %s on %s:%s", name, new.version, new.model.backend, new.model.device)
            return SwapResult(
                name=name, version=new.version, previous=old.version if old else None, backend=new.model.backend,
                device=new.model.device, load_ms=new.model.load_ms,
            )

    def unload(self, name: str) -> None:
        with self._lock:
            p = self._current.pop(name, None)
            if p is None:
                return
            p.retired = True
            close = p.inflight == 0
        if close:
            p.close()

    def deploy(
        self,
        source: str,
        progress: Optional[Progress] = None,
        sha256: Optional[str] = None,
        smoke: Optional[bool] = None,
    ) -> dict[str, Any]:
        """Install ``source`` and make it active; a loaded model is hot-swapped. Any failure leaves the old state.

        The new version is committed to the store *inactive*, loaded and smoke-tested (also when the model is not
        loaded, so a broken package is caught now rather than at the next start); only then is it activated.
        """
        smoke = self.store.config.smoke_test if smoke is None else smoke
        staged = self.store.stage(source, progress, sha256)
        name, version = staged.manifest.name, staged.manifest.version
        existed = version in self.store.versions(name)
        result = self.store.commit(staged, activate=False)
        if progress:
            progress("install", 1, 1)
        try:
            if name in self._current:
                swap = self.swap(name, version, smoke=smoke)
                info: dict[str, Any] = {"hot_swapped": True, "backend": swap.backend, "device": swap.device}
            else:
                trial = self.open(name, version)
                try:
                    if smoke:
                        trial.smoke_test()
                finally:
                    trial.close()
                info = {"hot_swapped": False, "backend": trial.model.backend, "device": trial.model.device}
        except Exception:
            if not existed:
                self.store.discard(name, version)  # roll back: the failed version never becomes visible as active
            raise
        previous = self.store.activate(name, version)
        with self.store.locked():
            self.store._prune(name)
        return {"name": name, "version": version, "previous": previous, "already_installed": result.already_installed,
                **info}

    def close(self) -> None:
        for name in list(self._current):
            self.unload(name)
