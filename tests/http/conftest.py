"""Fixtures of the HTTP API tests: one real mosquitto and one real agent (HTTP on a free port, BlazeFace installed,
a looped video stream showing the astronaut) for the whole package, and a small client for its API."""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest
import requests

from agent.devbroker import Mosquitto
from tests.agent_proc import AgentProc
from tests.streams import media
from tests.streams.conftest import streams_toml

# BlazeFace short range on skimage.data.astronaut() (see /work/shared/ASSETS.md).
ASTRONAUT_FACE = (178.0, 81.0, 272.0, 175.0)
MAX_IMAGE_BYTES = 512 * 1024
MAX_BODY_BYTES = 128 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Api:
    """requests against one node, with its token (or another one)."""

    def __init__(self, base: str, token: Optional[str], verify: Any = True):
        self.base = base.rstrip("/")
        self.token = token
        self.verify = verify
        self.s = requests.Session()

    def headers(self, token: Optional[str] = "default") -> dict[str, str]:
        tok = self.token if token == "default" else token
        return {"Authorization": f"Bearer {tok}"} if tok else {}

    def request(self, method: str, path: str, token: Optional[str] = "default", **kw: Any) -> requests.Response:
        headers = {**self.headers(token), **kw.pop("headers", {})}
        kw.setdefault("timeout", 60)
        kw.setdefault("verify", self.verify)  # per request: REQUESTS_CA_BUNDLE would override a session's
        return self.s.request(method, self.base + path, headers=headers, **kw)

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> requests.Response:
        return self.request("POST", path, **kw)

    def delete(self, path: str, **kw: Any) -> requests.Response:
        return self.request("DELETE", path, **kw)

    def wait_job(self, job_id: str, timeout: float = 60) -> dict[str, Any]:
        """Poll until the job ended (what a polling REST client does)."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(f"/v1/jobs/{job_id}").json()
            if job["state"] not in ("QUEUED", "IN_PROGRESS"):
                return job
            assert time.monotonic() < deadline, f"job {job_id} still {job['state']} after {timeout}s"
            time.sleep(0.1)


@dataclass(frozen=True)
class SseEvent:
    event: str
    data: str
    id: Optional[str] = None


def sse_events(resp: requests.Response) -> Iterator[SseEvent]:
    """The events of a text/event-stream response as they arrive (comments skipped), up to and with `end`."""
    fields: dict[str, str] = {}
    for line in resp.iter_lines(decode_unicode=True):
        if line == "":
            if fields:
                ev = SseEvent(fields.get("event", "message"), fields.get("data", ""), fields.get("id"))
                yield ev
                if ev.event == "end":
                    return
            fields = {}
        elif not line.startswith(":"):
            k, _, v = line.partition(":")
            fields[k] = v[1:] if v.startswith(" ") else v


def wait_http(url: str, timeout: float = 30.0, verify: Any = True) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            requests.get(url + "/healthz", timeout=2, verify=verify)
            return
        except requests.ConnectionError:
            assert time.monotonic() < deadline, f"{url} does not answer after {timeout}s"
            time.sleep(0.1)


def problem_of(r: requests.Response, status: int, code: str) -> dict[str, Any]:
    """The response is an RFC 9457 problem with this status and code (and a detail a person can act on)."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body = r.json()
    assert body["code"] == code and body["status"] == status and body["type"].endswith(code), body
    assert len(body["detail"]) > 10 and "Traceback" not in body["detail"], body
    return body


@pytest.fixture(scope="session")
def astronaut_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import cv2
    from skimage import data

    p = tmp_path_factory.mktemp("img") / "astronaut.jpg"
    cv2.imwrite(str(p), data.astronaut()[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
    return p


@pytest.fixture(scope="session")
def blazeface_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.store import ModelStore

    root = tmp_path_factory.mktemp("models")
    ModelStore(root).install("blazeface")
    return root


@pytest.fixture(scope="package")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path_factory.mktemp("mosquitto"), save_every_change=False).start()
    yield b
    b.close()


def http_agent(workdir: Path, broker: Mosquitto, store: Path, node_id: str, streams: Optional[list[dict]] = None,
               jobs: Optional[dict[str, Any]] = None, **http: Any) -> AgentProc:
    """An agent (not started) with the HTTP API on a free loopback port and BlazeFace installed."""
    cfg = {"enabled": True, "bind": "127.0.0.1", "port": free_port(), **http}
    a = AgentProc(workdir, broker, node_id, http=cfg,
                  inference={"max_image_bytes": MAX_IMAGE_BYTES, "progress_interval_s": 0.1},
                  stats={"interval_s": 30.0}, jobs=jobs or {})
    shutil.copytree(store, a.state_dir / "models", dirs_exist_ok=True)
    if streams:
        with open(a.config_path, "a") as f:
            f.write(streams_toml(streams))
    return a


@pytest.fixture(scope="package")
def node(tmp_path_factory: pytest.TempPathFactory, broker: Mosquitto, blazeface_store: Path) -> Iterator[AgentProc]:
    video = media.face_video(tmp_path_factory.mktemp("video") / "face.avi", 0.0, 1.0, 0.0)
    a = http_agent(tmp_path_factory.mktemp("node"), broker, blazeface_store, "http-node",
                   streams=[{"stream_id": "lobby", "source": str(video), "model": "blazeface", "fps": 4.0,
                             "loop": True, "threshold": 0.6}],
                   max_body_bytes=MAX_BODY_BYTES).start()
    wait_http(f"http://127.0.0.1:{a.cfg['http']['port']}")
    yield a
    a.stop()
    if "Traceback" in a.log():
        print(a.log()[-4000:])


@pytest.fixture(scope="package")
def token(node: AgentProc) -> str:
    return (node.state_dir / "http-token").read_text().strip()


@pytest.fixture(scope="package")
def api(node: AgentProc, token: str) -> Api:
    return Api(f"http://127.0.0.1:{node.cfg['http']['port']}", token)
