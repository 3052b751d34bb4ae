"""model.deploy / model.remove through the job-handler contract of agent/jobs/base.py."""

from __future__ import annotations

import threading
import types
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest

from accelerators.config import AcceleratorsConfig
from agent.jobs import registry
from agent.jobs.base import JobCanceled, JobError
from models.jobs import DeployParams, ModelDeploy, ModelRemove, RemoveParams
from models.runtime import ModelManager
from models.store import ModelStore
from tests.accelerators.conftest import make_tar
from tests.accelerators.helpers import catalog_package, sha


class Ctx:
    """A JobContext as the engine provides it (progress, check, cancel), recording what the handler reports."""

    def __init__(self, params: Any, node: Any, cancel_after: Optional[int] = None):
        self.job_id = "j1"
        self.job_type = "model.deploy"
        self.params = params
        self.checkpoint = None
        self.node = node
        self.cancel_event = threading.Event()
        self.progress_calls: list[tuple[Optional[float], dict]] = []
        self._cancel_after = cancel_after
        self._checks = 0

    def progress(self, fraction: Optional[float], force: bool = False, **details: Any) -> None:
        self.progress_calls.append((fraction, details))

    def save_checkpoint(self, data: dict) -> None:
        self.checkpoint = data

    def publish_result(self, payload: dict, final: bool = False) -> None:
        pass

    def check(self) -> None:
        self._checks += 1
        if self._cancel_after is not None and self._checks > self._cancel_after:
            self.cancel_event.set()
        if self.cancel_event.is_set():
            raise JobCanceled()

    def remaining_s(self) -> Optional[float]:
        return None


@pytest.fixture
def node(tmp_path: Path) -> Any:
    config = types.SimpleNamespace(accelerators=AcceleratorsConfig())
    return types.SimpleNamespace(config=config, model_store=ModelStore(tmp_path / "store"))


@pytest.fixture
def served(tmp_path: Path, blazeface_path: Path, http_root: tuple[Path, str]) -> tuple[str, str]:
    root, base = http_root
    pkg = catalog_package(tmp_path / "pkg", "blazeface", blazeface_path, name="faces", version="1.0")
    archive = make_tar(pkg, root / "faces.tar.gz")
    return f"{base}/faces.tar.gz", sha(archive)


def test_registered() -> None:
    assert registry.get("model.deploy") is ModelDeploy and registry.get("model.remove") is ModelRemove


def test_deploy_over_http_reports_download_progress(node: Any, served: tuple[str, str]) -> None:
    url, digest = served
    ctx = Ctx(DeployParams(source=url, sha256=digest), node)
    out = ModelDeploy().run(ctx)
    assert out["model"]["name"] == "faces" and out["model"]["version"] == "1.0"
    assert out["model"]["backend"] == "litert" and out["model"]["hot_swapped"] is False
    downloads = [d for f, d in ctx.progress_calls if d.get("phase") == "download"]
    assert downloads and downloads[-1]["bytes"] == downloads[-1]["total_bytes"] > 0
    fractions = [f for f, _ in ctx.progress_calls if f is not None]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert node.model_store.active_version("faces") == "1.0"


def test_deploy_hot_swaps_a_loaded_model(node: Any, tmp_path: Path, blazeface_full_path: Path,
                                        served: tuple[str, str], astronaut: np.ndarray) -> None:
    url, _ = served
    node.model_manager = ModelManager(node.model_store, node.config.accelerators)
    ModelDeploy().run(Ctx(DeployParams(source=url), node))
    node.model_manager.load("faces")
    v2 = catalog_package(tmp_path / "v2", "blazeface-full", blazeface_full_path, name="faces", version="2.0")
    out = ModelDeploy().run(Ctx(DeployParams(source=str(v2)), node))
    assert out["model"]["hot_swapped"] and out["model"]["previous"] == "1.0"
    assert node.model_manager.predict("faces", astronaut).version == "2.0"


def test_cancel_during_download_leaves_nothing(node: Any, served: tuple[str, str]) -> None:
    url, _ = served
    ctx = Ctx(DeployParams(source=url), node, cancel_after=1)
    with pytest.raises(JobCanceled):
        ModelDeploy().run(ctx)
    assert node.model_store.list() == []
    assert list((node.model_store.root / ".staging").iterdir()) == []


@pytest.mark.parametrize(
    ("source", "sha256", "code"),
    [
        ("nothing-here", None, "bad_source"),
        ("URL", "0" * 64, "checksum_mismatch"),
    ],
)
def test_deploy_errors_are_job_errors(node: Any, served: tuple[str, str], source: str, sha256: Optional[str],
                                      code: str) -> None:
    src = served[0] if source == "URL" else source
    with pytest.raises(JobError) as e:
        ModelDeploy().run(Ctx(DeployParams(source=src, sha256=sha256), node))
    assert e.value.code == code and e.value.message


def test_params_are_validated() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        DeployParams(source="x", sha256="nothex")
    with pytest.raises(ValidationError):
        DeployParams(source="x", unknown=1)


def test_remove(node: Any, served: tuple[str, str]) -> None:
    node.model_manager = ModelManager(node.model_store, node.config.accelerators)
    ModelDeploy().run(Ctx(DeployParams(source=served[0]), node))
    node.model_manager.load("faces")
    out = ModelRemove().run(Ctx(RemoveParams(name="faces"), node))
    assert out == {"name": "faces", "removed_versions": ["1.0"], "remaining": []}
    assert node.model_manager.loaded() == {}
    with pytest.raises(JobError) as e:
        ModelRemove().run(Ctx(RemoveParams(name="faces"), node))
    assert e.value.code == "not_found"
