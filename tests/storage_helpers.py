"""What the storage tests (tests/test_retention.py, tests/test_disk.py) share: pictures to run `infer` batches on
(the `picture_dir` fixture in tests/conftest.py), an agent with BlazeFace installed, and the `storage` section of
its `node.stats`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.client import Controller
from agent.devbroker import Mosquitto
from tests.agent_proc import AgentProc
from tests.infer.conftest import write_jpeg

PICTURES = ("astronaut", "chelsea", "coffee", "rocket", "camera")


def write_pictures(d: Path) -> Path:
    """The scikit-image pictures as JPEGs in ``d`` (annotated copies of them are 35-72 KB)."""
    from skimage import data

    for name in PICTURES:
        write_jpeg(d / f"{name}.jpg", getattr(data, name)())
    return d


def images(n: int, prefix: str = "i") -> list[dict[str, str]]:
    """``n`` images of a batch, ids ``{prefix}0`` ..., going round the pictures."""
    return [{"id": f"{prefix}{k}", "path": f"{PICTURES[k % len(PICTURES)]}.jpg"} for k in range(n)]


def infer_agent(workdir: Path, broker: Mosquitto, picture_dir: Path, node_id: str, model: bool = True,
                **overrides: Any) -> AgentProc:
    """An agent (not started) that reads ``picture_dir``, with BlazeFace installed in its state directory
    (``workdir/state``, which the caller may have mounted)."""
    a = AgentProc(workdir, broker, node_id, inference={"input_dirs": [str(picture_dir)], "chunk_size": 8,
                                                       "progress_interval_s": 0.1}, **overrides)
    if model:
        r = a.cli("models", "install", "blazeface", timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
    return a


def storage_of(ctl: Controller, node: str) -> dict[str, Any]:
    """The `storage` section of the node's `node.stats`."""
    out = ctl.wait(ctl.submit("node.stats", {"publish": False}, node=node), timeout=30)
    assert out.state == "SUCCEEDED", out.last
    return out.results[-1]["stats"]["storage"]
