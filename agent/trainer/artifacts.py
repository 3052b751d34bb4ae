"""Finished model packages: archived as .tar.gz, kept under the artifacts directory and served read-only over
HTTP, one URL per package (``{public_url}/artifacts/{job_id}/{name}-{version}.tar.gz``), or PUT to a URL."""

from __future__ import annotations

import http.server
import logging
import os
import shutil
import tarfile
import threading
from pathlib import Path
from typing import Any, Optional
from urllib.parse import unquote, urlparse

from agent.trainer.plugins import sha256_of

log = logging.getLogger("cv_worker.trainer.artifacts")


def archive(package_dir: Path, dest: Path) -> tuple[str, int]:
    """``package_dir``'s files at the top level of a .tar.gz at ``dest`` (written atomically); sha256 and size."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for p in sorted(package_dir.iterdir()):
            if p.is_file() and not p.is_symlink():
                tar.add(p, arcname=p.name, recursive=False)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)
    return sha256_of(dest), dest.stat().st_size


def put(url: str, path: Path, timeout_s: float) -> None:
    """PUT the file to ``url``; OSError with the server's answer when it is not a 2xx."""
    import requests

    try:
        with open(path, "rb") as f:
            r = requests.put(url, data=f, timeout=(min(10.0, timeout_s), timeout_s),
                             headers={"Content-Type": "application/gzip",
                                      "Content-Length": str(path.stat().st_size)})
    except requests.RequestException as e:
        raise OSError(f"PUT to {url} failed: {e}") from None
    if not 200 <= r.status_code < 300:
        raise OSError(f"PUT to {url} answered HTTP {r.status_code}: {r.text[:200]}")


def prune(root: Path, keep: int) -> None:
    """Keep the ``keep`` most recent job directories."""
    if not root.is_dir():
        return
    dirs = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                  key=lambda d: d.stat().st_mtime, reverse=True)
    for d in dirs[keep:]:
        shutil.rmtree(d, ignore_errors=True)


class _Handler(http.server.BaseHTTPRequestHandler):
    root: Path
    server_version = "cv-worker-artifacts"

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), fmt % args)

    def _file(self) -> Optional[Path]:
        parts = [unquote(p) for p in urlparse(self.path).path.split("/") if p]
        if len(parts) != 3 or parts[0] != "artifacts" or any(p.startswith(".") or "\\" in p for p in parts[1:]):
            return None
        p = (self.root / parts[1] / parts[2]).resolve()
        if self.root.resolve() not in p.parents or not p.is_file():
            return None
        return p

    def _head(self) -> Optional[Path]:
        p = self._file()
        if p is None:
            self.send_error(404, "no such artifact")
            return None
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(p.stat().st_size))
        self.end_headers()
        return p

    def do_HEAD(self) -> None:  # noqa: N802 - http.server naming
        self._head()

    def do_GET(self) -> None:  # noqa: N802
        p = self._head()
        if p is not None:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, self.wfile, 1 << 16)

    def _read_only(self) -> None:
        self.send_error(405, "the artifact server is read-only")

    do_PUT = do_POST = do_DELETE = do_PATCH = _read_only  # noqa: N815


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("artifact download by %s ended early", client_address)


class ArtifactServer:
    def __init__(self, root: Path, host: str, port: int, public_url: Optional[str] = None,
                 interfaces: Optional[list[str]] = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        handler = type("ArtifactHandler", (_Handler,), {"root": self.root})
        self._srv = _Server((host, port), handler)
        self.port = int(self._srv.server_address[1])
        if public_url:
            self.base_url = public_url.rstrip("/")
        else:
            self.base_url = f"http://{_advertised_host(host, interfaces)}:{self.port}"
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "ArtifactServer":
        self._thread = threading.Thread(target=self._srv.serve_forever, name="artifacts", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._srv.shutdown()
        self._srv.server_close()

    def path_for(self, job_id: str, filename: str) -> Path:
        return self.root / job_id / filename

    def url_for(self, job_id: str, filename: str) -> str:
        return f"{self.base_url}/artifacts/{job_id}/{filename}"


def _advertised_host(host: str, interfaces: Optional[list[str]]) -> str:
    if host not in ("", "0.0.0.0", "::"):
        return f"[{host}]" if ":" in host else host
    from agent.discovery import local_addresses

    v4 = [a for a in local_addresses(interfaces) if ":" not in a]
    return v4[0] if v4 else "127.0.0.1"
