from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from agent.devbroker import Mosquitto
from tests.agent_proc import AgentProc

# Every agent and StateStore in the tests checks each state snapshot against a full encoding: a stored document
# changed without the table noticing would make the per-document cache write stale data (agent/storage.py).
os.environ.setdefault("CV_WORKER_STATE_VERIFY", "1")


@pytest.fixture
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A real mosquitto on a free loopback port, with persistence, stopped after the test."""
    if not shutil.which("mosquitto") and not Path("/usr/sbin/mosquitto").exists():
        pytest.fail("mosquitto is not installed: run `make test` (it installs it) or apt-get install mosquitto")
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield broker
    broker.close()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One mosquitto for a whole test module (no per-change saves: the module's tests do not kill it)."""
    b = Mosquitto(tmp_path_factory.mktemp("mosquitto"), save_every_change=False).start()
    yield b
    b.close()


@pytest.fixture
def agents(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Callable[..., AgentProc]]:
    """Factory of real agent processes on the test broker; all are stopped (and their logs shown) at the end."""
    made: list[AgentProc] = []

    def make(node_id: str = "node-a", broker: Optional[Mosquitto] = None, start: bool = True,
             **overrides: Any) -> AgentProc:
        a = AgentProc(tmp_path / node_id, broker or mosquitto, node_id, **overrides)
        made.append(a)
        return a.start() if start else a

    yield make
    for a in made:
        try:
            a.stop()
        except AssertionError as e:
            print(e)
        if a.proc is None and "Traceback" in a.log():
            print(f"--- {a.node_id} log ---\n{a.log()[-3000:]}")


@pytest.fixture(scope="module")
def picture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The scikit-image pictures as JPEGs, for `infer` batches (tests/storage_helpers.py)."""
    from tests.storage_helpers import write_pictures

    return write_pictures(tmp_path_factory.mktemp("pictures"))
