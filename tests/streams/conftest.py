"""Fixtures of the stream tests: real videos, a BlazeFace model store, agents with streams, a controller."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from agent.client import Controller
from agent.devbroker import Mosquitto
from tests.agent_proc import AgentProc, controller
from tests.streams import media

FAKES = Path(__file__).resolve().parent / "fakes"


@pytest.fixture(scope="session")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    return {
        # 1 s of background, 2 s with the astronaut, 3 s of background: one event that starts and ends.
        "enter_leave": media.face_video(d / "enter_leave.avi", 1.0, 2.0, 3.0),
        # The face all along, looped: a stream that always sees one face.
        "face": media.face_video(d / "face.avi", 0.0, 1.0, 0.0),
    }


@pytest.fixture(scope="session")
def scene_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import cv2

    p = tmp_path_factory.mktemp("scene") / "astronaut_scene.png"
    cv2.imwrite(str(p), media.with_face(media.background()))
    return p


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BlazeFace from the offline catalog, installed once; each agent gets a copy in its state directory."""
    from models.store import ModelStore

    root = tmp_path_factory.mktemp("models")
    ModelStore(root).install("blazeface")
    return root


def streams_toml(streams: list[dict[str, Any]]) -> str:
    out = []
    for s in streams:
        out.append("[[streams]]")
        nested = {k: v for k, v in s.items() if isinstance(v, dict)}
        out += [f"{k} = {json.dumps(v)}" for k, v in s.items() if not isinstance(v, dict)]
        for name, sec in nested.items():
            out.append(f"[streams.{name}]")
            out += [f"{k} = {json.dumps(v)}" for k, v in sec.items()]
    return "\n".join(out) + "\n"


@pytest.fixture
def stream_agent(agents: Callable[..., AgentProc], model_store: Path) -> Callable[..., AgentProc]:
    """An agent with BlazeFace installed and optional `[[streams]]` in its config file."""

    def make(node_id: str = "cam-1", streams: list[dict[str, Any]] | None = None, start: bool = True,
             **overrides: Any) -> AgentProc:
        overrides.setdefault("stats", {"interval_s": 30.0})
        a = agents(node_id, start=False, **overrides)
        shutil.copytree(model_store, a.state_dir / "models", dirs_exist_ok=True)
        if streams:
            with open(a.config_path, "a") as f:
                f.write(streams_toml(streams))
        return a.start() if start else a

    return make


@pytest.fixture
def ctl(mosquitto: Mosquitto) -> Iterator[Controller]:
    c = controller(mosquitto)
    yield c
    c.close()


@pytest.fixture
def fake_picamera2(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, scene_png: Path) -> dict[str, Path]:
    """Agents started after this import the fake picamera2 (PYTHONPATH), showing the astronaut scene."""
    log, unplugged = tmp_path / "picamera2.log", tmp_path / "unplugged"
    monkeypatch.setenv("PYTHONPATH", str(FAKES))
    monkeypatch.setenv("FAKE_PICAMERA2_IMAGE", str(scene_png))
    monkeypatch.setenv("FAKE_PICAMERA2_LOG", str(log))
    monkeypatch.setenv("FAKE_PICAMERA2_UNPLUGGED", str(unplugged))
    return {"log": log, "unplugged": unplugged}


def run_job(ctl: Controller, node: str, job_type: str, params: dict[str, Any] | None = None,
            timeout: float = 30.0) -> dict[str, Any]:
    """Submit, wait, and return the final result; fails the test with the error when the job did not succeed."""
    out = ctl.wait(ctl.submit(job_type, params or {}, node=node), timeout=timeout)
    assert out.state == "SUCCEEDED", out.last
    return out.results[-1]


def stream_list(ctl: Controller, node: str) -> dict[str, dict[str, Any]]:
    return {s["stream_id"]: s for s in run_job(ctl, node, "stream.list")["streams"]}
