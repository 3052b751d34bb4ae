"""Fixtures for the training tests: the scikit-learn digits written as PNG files with annotation CSVs, a real
mosquitto, real `cv-worker trainer` and `cv-worker run` processes, and a local HTTP server that receives the
progress POSTs and the model PUTs (and serves the data over GET).

Everything runs on a topic prefix of its own and advertises over mDNS on loopback only, so trainers of other
test runs on this machine are never picked up."""

from __future__ import annotations

import csv
import http.server
import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.client import Controller
from agent.devbroker import Mosquitto
from tests.agent_proc import AgentProc, controller

PREFIX = f"t{uuid.uuid4().hex[:8]}/v1"
LO = ["127.0.0.1"]
HELD_OUT = 297  # the last digits are never trained on; the node classifies them after deployment


@dataclass
class Digits:
    root: Path  # the data directory (trainer.data_dirs and inference.input_dirs)
    train_csv: Path
    small_csv: Path
    held_out: list[tuple[str, str]]  # (path relative to root, true label)


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    """1,797 8x8 digits as PNG files; each is one full-image box labelled with its class."""
    import cv2
    import numpy as np
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("data")
    (root / "digits").mkdir()
    d = load_digits()
    rows = []
    for i, (img, target) in enumerate(zip(d.images, d.target)):
        name = f"digits/{i:04d}.png"
        cv2.imwrite(str(root / name), (img * 16).clip(0, 255).astype(np.uint8))
        rows.append((name, int(target)))
    train, held = rows[:-HELD_OUT], rows[-HELD_OUT:]

    def write(path: Path, items: list[tuple[str, int]], header: bool = True) -> Path:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            if header:
                w.writerow(["image", "x", "y", "width", "height", "class"])
            # Paths are relative to the CSV, which lives in the data root.
            w.writerows([(name, 0, 0, 8, 8, label) for name, label in items])
        return path

    return Digits(root, write(root / "annotations.csv", train), write(root / "small.csv", train[:300], header=False),
                  [(name, str(label)) for name, label in held])


class _Handler(http.server.BaseHTTPRequestHandler):
    """POST /status/<key>: a progress message, recorded. PUT: stored. GET: stored PUTs, else the data files."""

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        srv: Any = self.server
        with srv.lock:
            srv.posts.setdefault(self.path, []).append((self.headers.get("Content-Type"), json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def do_PUT(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        srv: Any = self.server
        srv.stored[self.path] = body
        self.send_response(201)
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        srv: Any = self.server
        body = srv.stored.get(self.path)
        if body is None:
            p = (srv.data_root / self.path.lstrip("/")).resolve()
            body = p.read_bytes() if p.is_file() and srv.data_root in p.parents else None
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class HttpServer:
    def __init__(self, data_root: Path):
        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.srv.posts = {}  # type: ignore[attr-defined]
        self.srv.stored = {}  # type: ignore[attr-defined]
        self.srv.lock = threading.Lock()  # type: ignore[attr-defined]
        self.srv.data_root = data_root.resolve()  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def posts(self, key: str) -> list[dict[str, Any]]:
        with self.srv.lock:  # type: ignore[attr-defined]
            return [body for _, body in self.srv.posts.get(f"/status/{key}", [])]  # type: ignore[attr-defined]

    def stored(self, path: str) -> bytes | None:
        return self.srv.stored.get(path)  # type: ignore[attr-defined]

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture(scope="module")
def http_server(digits: Digits) -> Iterator[HttpServer]:
    s = HttpServer(digits.root)
    yield s
    s.close()



class TrainerProc(AgentProc):
    command = "trainer"


def make_trainer(workdir: Path, broker: Mosquitto, peer_id: str, data: Path, **overrides: Any) -> TrainerProc:
    """A `cv-worker trainer` with a short keepalive and no will delay, so a vanished peer is noticed quickly."""
    cfg: dict[str, Any] = {
        "mqtt": {"topic_prefix": PREFIX, "keepalive": 5, "will_delay_s": 0},
        "trainer": {"peer_id": peer_id, "state_dir": str(workdir / "state"), "data_dirs": [str(data)],
                    "http_host": "127.0.0.1", "http_port": 0, "status_interval_s": 0.2,
                    # One thread: on 2 shared cores a 2-thread training was once seen to take 46 s instead of 5.
                    "threads": 1},
        "discovery": {"enabled": True, "interfaces": LO},
    }
    for k, v in overrides.items():
        cfg.setdefault(k, {}).update(v)
    return TrainerProc(workdir, broker, f"{peer_id}-host", **cfg)


def make_node(workdir: Path, broker: Mosquitto, node_id: str, data: Path, **overrides: Any) -> AgentProc:
    cfg: dict[str, Any] = {"mqtt": {"topic_prefix": PREFIX}, "inference": {"input_dirs": [str(data)]}}
    for k, v in overrides.items():
        cfg.setdefault(k, {}).update(v)
    return AgentProc(workdir, broker, node_id, **cfg)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory, broker: Mosquitto, digits: Digits) -> Iterator[TrainerProc]:
    t = make_trainer(tmp_path_factory.mktemp("trainer"), broker, "build-1", digits.root).start()
    yield t
    t.stop()
    if "Traceback" in t.log():
        print(t.log()[-4000:])


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, broker: Mosquitto, digits: Digits,
         trainer: TrainerProc) -> Iterator[AgentProc]:
    """A node configured with its build peer by name."""
    a = make_node(tmp_path_factory.mktemp("node"), broker, "edge-1", digits.root,
                  train={"build_peer": "build-1", "grace_period_s": 30}).start()
    yield a
    a.stop()
    if "Traceback" in a.log():
        print(a.log()[-4000:])


@pytest.fixture(scope="module")
def ctl(broker: Mosquitto) -> Iterator[Controller]:
    c = controller(broker, topic_prefix=PREFIX)
    yield c
    c.close()
