"""The trainer plugin API and plugin discovery (entry point group ``cv_worker.trainer_plugins``).

A plugin is a class with a ``name``, an ``options_model`` (pydantic; the job's ``options`` are validated against
it) and ``train(data, options, ctx) -> PackageResult``. It gets the parsed, checked annotations
(``agent.trainer.annotations.Dataset``), trains, and writes a model package (manifest with sha256s, see
docs/models.md) into ``ctx.package_dir``. The peer verifies the package, archives it and delivers it.

Register one in your package's metadata::

    [project.entry-points."cv_worker.trainer_plugins"]
    my-detector = "my_pkg.trainer:DetectorPlugin"
"""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

from pydantic import BaseModel, ConfigDict, ValidationError

from agent.jobs.base import JobError

if TYPE_CHECKING:
    from agent.trainer.annotations import Dataset

ENTRY_POINT_GROUP = "cv_worker.trainer_plugins"

log = logging.getLogger("cv_worker.trainer")


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class PackageResult:
    """What ``train`` returns: the package directory (it holds the manifest) and what to report about it."""

    package_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    skipped_formats: dict[str, str] = field(default_factory=dict)


@dataclass
class EpochMetrics:
    """Validation metrics at the end of an epoch (all optional; reported as ``val_<name>``)."""

    loss: Optional[float] = None
    accuracy: Optional[float] = None
    extra: dict[str, float] = field(default_factory=dict)


class TrainContext:
    """What a plugin sees of its job: settings, a package directory, progress reporting and cancellation."""

    def __init__(self, *, job_id: str, name: str, version: str, epochs: int, batch_size: int, seed: int,
                 validation_split: float, device: str, device_name: str, package_dir: Path, threads: int,
                 check: Callable[[], None], report: Callable[..., None]):
        self.job_id = job_id
        self.name = name
        self.version = version
        self.epochs = epochs
        self.batch_size = batch_size
        self.seed = seed
        self.validation_split = validation_split
        self.device = device  # "cpu" or "cuda:0": pass to torch.device()
        self.device_name = device_name
        self.package_dir = package_dir
        self.threads = threads
        self.log = log
        self._check = check
        self._report = report

    def check(self) -> None:
        """Raises when the job was canceled or timed out; call it every step."""
        self._check()

    def report(self, epoch: int, step: int, steps: int, loss: Optional[float] = None,
               val: Optional[EpochMetrics] = None) -> None:
        """Training progress: 1-based ``epoch`` and ``step`` of ``steps`` per epoch, the mean training loss so far
        in this epoch; ``val`` at the end of an epoch. Cheap to call every step (rate-limited)."""
        self._report(epoch=epoch, step=step, steps=steps, loss=loss, val=val)

    def phase(self, phase: str) -> None:
        """Announce a phase after training (``exporting``)."""
        self._report(phase=phase)


class TrainerPlugin(ABC):
    name: ClassVar[str]
    description: ClassVar[str] = ""
    options_model: ClassVar[type[BaseModel]] = NoOptions

    @abstractmethod
    def train(self, data: "Dataset", options: Any, ctx: TrainContext) -> PackageResult:
        """Train on ``data`` and write a package (model files + model.json) into ``ctx.package_dir``."""


def available() -> dict[str, metadata.EntryPoint]:
    """Installed plugins by name."""
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def load_plugin(name: str, peer: str = "this build peer") -> TrainerPlugin:
    eps = available()
    ep = eps.get(name)
    if ep is None:
        have = ", ".join(sorted(eps)) or "none (install cv-worker with the train extra: pip install 'cv-worker[train]')"
        raise JobError("unknown_plugin", f"no trainer plugin {name!r} on {peer}; installed: {have} "
                       f"(entry point group {ENTRY_POINT_GROUP})")
    try:
        cls = ep.load()
        plugin = cls()
    except Exception as e:  # a broken third-party plugin must fail its job, not the peer
        raise JobError("plugin_unavailable", f"trainer plugin {name!r} ({ep.value}) cannot be loaded: "
                       f"{type(e).__name__}: {e}") from None
    if not isinstance(plugin, TrainerPlugin):
        raise JobError("plugin_unavailable", f"trainer plugin {name!r} ({ep.value}) is not a TrainerPlugin")
    return plugin


def parse_options(plugin: TrainerPlugin, options: dict[str, Any]) -> Any:
    try:
        return plugin.options_model.model_validate(options)
    except ValidationError as e:
        from agent.intake import describe_validation_error

        known = ", ".join(plugin.options_model.model_fields) or "none"
        raise JobError("invalid_options", describe_validation_error(e, f"options for plugin {plugin.name}")
                       + f" (its options: {known})") from None


# -- helpers for writing packages -------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_ref(package_dir: Path, rel: str) -> dict[str, Any]:
    """A manifest file entry (path, sha256, size) for a file already written into the package."""
    p = package_dir / rel
    return {"path": rel, "sha256": sha256_of(p), "size": p.stat().st_size}


def write_manifest(package_dir: Path, manifest: dict[str, Any]) -> Path:
    """Validate ``manifest`` as a ModelManifest and write it as model.json."""
    from models.manifest import parse_manifest

    parse_manifest(manifest, f"{package_dir}/model.json")
    path = package_dir / "model.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path
