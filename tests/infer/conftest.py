"""Fixtures for the batch inference tests: one real broker and one real agent per module (starting an agent
costs seconds), real JPEG/PNG files made from the scikit-image pictures, a real http.server for `url` sources
and `upload_url` PUTs, and the BlazeFace model installed from the offline catalog."""

from __future__ import annotations

import base64
import http.server
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.client import Controller
from agent.devbroker import Mosquitto
from tests.agent_proc import AgentProc, controller

# BlazeFace short range on skimage.data.astronaut() (see /work/shared/ASSETS.md).
ASTRONAUT_FACE = (178.0, 81.0, 272.0, 175.0)
ASTRONAUT_SCORE = 0.92
MAX_IMAGE_BYTES = 1024 * 1024  # small, so that "too large" needs no huge files


def box_close(a: Any, b: Any, tol: float) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def write_jpeg(path: Path, rgb: Any, quality: int = 92) -> Path:
    import cv2

    img = rgb if rgb.ndim == 2 else rgb[:, :, ::-1]
    cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return path


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """input_dirs root: astronaut (JPEG and PNG), cat, coffee, a fake image, a too-large file, a symlink out."""
    import cv2
    from skimage import data

    d = tmp_path_factory.mktemp("images")
    write_jpeg(d / "astronaut.jpg", data.astronaut())
    cv2.imwrite(str(d / "astronaut.png"), data.astronaut()[:, :, ::-1])
    big = data.astronaut().repeat(2, axis=0).repeat(2, axis=1)  # 1024x1024: decoded at reduced scale
    write_jpeg(d / "astronaut-2x.jpg", big)
    write_jpeg(d / "chelsea.jpg", data.chelsea())
    write_jpeg(d / "coffee.jpg", data.coffee())
    write_jpeg(d / "camera.jpg", data.camera())
    (d / "notes.jpg").write_text("this is text, not a JPEG\n")
    (d / "huge.jpg").write_bytes(os.urandom(MAX_IMAGE_BYTES + 10))
    (d / "sub").mkdir()
    write_jpeg(d / "sub" / "rocket.jpg", data.rocket())
    outside = tmp_path_factory.mktemp("outside")
    write_jpeg(outside / "secret.jpg", data.astronaut())
    (d / "escape.jpg").symlink_to(outside / "secret.jpg")
    return d


@pytest.fixture(scope="session")
def astronaut_b64(image_dir: Path) -> str:
    return base64.b64encode((image_dir / "astronaut.jpg").read_bytes()).decode()


class _Handler(http.server.SimpleHTTPRequestHandler):
    """GET serves the image directory; PUT stores the body under the server's upload directory."""

    upload_dir: Path

    def log_message(self, *args: object) -> None:
        pass

    def do_PUT(self) -> None:  # noqa: N802 - http.server naming
        if self.path.startswith("/refuse/"):
            self.send_response(403)
            self.end_headers()
            return
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n)
        dest = self.upload_dir / self.path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(body)
        self.server.puts.append((self.path, self.headers.get("Content-Type"), len(body)))  # type: ignore[attr-defined]
        self.send_response(201)
        self.end_headers()


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the agent hangs up on purpose mid-download (too large); not a test failure


class HttpServer:
    def __init__(self, root: Path, upload: Path):
        handler_cls = type("H", (_Handler,), {"upload_dir": upload})
        self.upload = upload

        def handler(*a: Any, **kw: Any) -> _Handler:
            return handler_cls(*a, directory=str(root), **kw)

        self.srv = _QuietServer(("127.0.0.1", 0), handler)
        self.srv.puts = []  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    @property
    def puts(self) -> list[tuple[str, str, int]]:
        return self.srv.puts  # type: ignore[attr-defined]

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture(scope="module")
def http_server(image_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    s = HttpServer(image_dir, tmp_path_factory.mktemp("uploads"))
    yield s
    s.close()



def make_agent(workdir: Path, broker: Mosquitto, image_dir: Path, node_id: str = "infer-node",
               **inference: Any) -> AgentProc:
    """An agent with BlazeFace installed (from the offline catalog, through the real CLI) and image_dir readable."""
    a = AgentProc(workdir, broker, node_id,
                  inference={"input_dirs": [str(image_dir)], "max_image_bytes": MAX_IMAGE_BYTES,
                             "progress_interval_s": 0.1, **inference})
    r = a.cli("models", "install", "blazeface", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return a


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, broker: Mosquitto, image_dir: Path) -> Iterator[AgentProc]:
    a = make_agent(tmp_path_factory.mktemp("agent"), broker, image_dir, chunk_size=4).start()
    yield a
    a.stop()
    if "Traceback" in a.log():
        print(a.log()[-4000:])


@pytest.fixture(scope="module")
def ctl(broker: Mosquitto) -> Iterator[Controller]:
    c = controller(broker)
    yield c
    c.close()


def items_of(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [item for r in results for item in r.get("items", [])]


def run_job(ctl: Controller, node: str, params: dict[str, Any], timeout: float = 60, **kw: Any) -> Any:
    jid = ctl.submit("infer", params, node=node, **kw)
    t0 = time.monotonic()
    out = ctl.wait(jid, timeout=timeout)
    out.elapsed = time.monotonic() - t0  # type: ignore[attr-defined]
    return out


@pytest.fixture(scope="module")
def pictures(image_dir: Path) -> list[str]:
    """15 JPEGs (5 scikit-image pictures at 3 scales) under image_dir, as paths relative to it."""
    import cv2
    from skimage import data

    d = image_dir / "procs"
    d.mkdir(exist_ok=True)
    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera"):
        img = getattr(data, name)()
        for scale in (0.5, 1.0, 2.2):
            resized = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            out.append(str(write_jpeg(d / f"{name}-{scale}.jpg", resized).relative_to(image_dir)))
    return out


def worker_pids(agent_pid: int, comm: str) -> list[int]:
    """The agent's worker processes named ``comm`` (cvw-decode, cvw-infer): children of its forkserver."""
    procs: dict[int, tuple[int, str, str]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            name = (p / "comm").read_text().strip()
        except (OSError, IndexError, ValueError):
            continue
        procs[int(p.name)] = (ppid, cmd, name)
    servers = [pid for pid, (ppid, cmd, _) in procs.items() if ppid == agent_pid and "forkserver" in cmd]
    return sorted(pid for pid, (ppid, _, name) in procs.items() if ppid in servers and name == comm)


def blazeface_on(backend: str) -> tuple[Any, Any]:
    """BlazeFace loaded on ``backend`` as a pipeline the decode pool takes, and the RuntimeKey of an inference
    process for it."""
    from types import SimpleNamespace

    from accelerators.registry import create_backends
    from agent.inference.runproc import RuntimeKey
    from models.catalog import BLAZEFACE_INPUT, locate
    from models.manifest import InputSpec

    b = create_backends()[backend]
    model = b.load(locate("blazeface"))
    pipeline = SimpleNamespace(manifest=SimpleNamespace(input=InputSpec(**BLAZEFACE_INPUT)), model=model)
    return pipeline, RuntimeKey(backend, "CPU", str(locate("blazeface")), b.config)
