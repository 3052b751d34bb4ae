"""Fixtures of the fault-injection suite (`make test-chaos`): the seed, real pictures, brokers and agents."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from agent.devbroker import Mosquitto
from tests.agent_proc import AgentProc

# Agent settings every scenario shares: enough workers for a 50 jobs/s stream beside a batch, nothing pruned (the
# checks read every job's retained status at the end), chunks small enough that a batch has many checkpoints.
CHAOS_JOBS = {"enable_debug_jobs": True, "workers": 8, "retention_count": 100_000, "max_queued": 100_000,
              "progress_interval_s": 0.5}


@pytest.fixture
def seed() -> int:
    """The seed of every random choice of a scenario; CHAOS_SEED=N replays one."""
    value = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    print(f"chaos seed {value} (replay with CHAOS_SEED={value})")
    return value


@pytest.fixture(scope="session")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The input directory and 12 real JPEGs in it (4 scikit-image pictures at 3 sizes, up to 1024 px)."""
    import cv2
    from skimage import data

    from tests.infer.conftest import write_jpeg

    d = tmp_path_factory.mktemp("chaos-images")
    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        img = getattr(data, name)()
        for scale in (0.5, 1.0, 2.0):
            resized = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            out.append(write_jpeg(d / f"{name}-{scale}.jpg", resized).name)
    return d, out


@pytest.fixture
def quiet_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A broker that is never killed, so it saves at its own pace: saving on every change rewrites every retained
    status per message (6,000 retained messages took 37 s instead of 0.5 s here)."""
    b = Mosquitto(tmp_path_factory.mktemp("mosquitto"), save_every_change=False).start()
    yield b
    b.close()


@pytest.fixture
def chaos_agent(pictures: tuple[Path, list[str]]) -> Iterator[Callable[..., AgentProc]]:
    """Factory of agents (not started) with the chaos settings and BlazeFace installed from the offline catalog.
    At the end each is stopped, or killed with whatever traced it."""
    made: list[AgentProc] = []

    def make(workdir: Path, broker: Mosquitto, node_id: str, model: bool = True, **overrides: Any) -> AgentProc:
        image_dir = pictures[0]
        sections: dict[str, Any] = {
            "jobs": dict(CHAOS_JOBS),
            "inference": {"input_dirs": [str(image_dir)], "chunk_size": 8, "progress_interval_s": 0.5},
        }
        for key, value in overrides.items():
            if isinstance(value, dict):
                sections.setdefault(key, {}).update(value)
            else:
                sections[key] = value
        a = AgentProc(workdir, broker, node_id, **sections)
        if model:
            r = a.cli("models", "install", "blazeface", timeout=120)
            assert r.returncode == 0, r.stdout + r.stderr
        made.append(a)
        return a

    yield make
    for a in made:
        if a.wrapped:
            a.kill()  # a traced agent: its faults are what the scenario is about, not its shutdown
        try:
            a.stop()
        except AssertionError as e:
            print(e)
        if "Traceback" in a.log():
            print(f"--- {a.node_id} log ---\n{a.log()[-3000:]}")
