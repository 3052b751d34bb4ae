"""The HTTP server's life inside the agent: token, TLS, listening socket, the uvicorn thread, and change wake-ups.

Everything that can fail because of the operator's setup (token file, certificate, port in use) is checked in
``start`` on the caller's thread, with a message that says what to fix; the agent then runs on without HTTP.
FastAPI and uvicorn are imported on the server thread, so they never delay the MQTT side.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import secrets
import socket
import ssl
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from agent.httpapi.history import StatusHistory

if TYPE_CHECKING:
    from agent.node import Node

log = logging.getLogger("cv_worker.http")


class HttpSetupError(Exception):
    pass


def _token_not_created(path: Path, e: OSError) -> HttpSetupError:
    return HttpSetupError(f"cannot create the HTTP token file {path}: {e.strerror or e}; the API starts with the "
                          "next start of the agent")


def load_or_create_token(path: Path, create: bool) -> str:
    """The token in ``path`` (first line); with ``create``, a new random one is written there (mode 0600) when the
    file does not exist yet."""
    if create and not path.exists():
        token = secrets.token_urlsafe(32)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it meanwhile: use theirs
            return load_or_create_token(path, create=False)
        except OSError as e:
            raise _token_not_created(path, e) from None
        try:
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            # A full disk: an empty token file left behind would keep the API off after the disk has room again.
            with contextlib.suppress(OSError):
                path.unlink()
            raise _token_not_created(path, e) from None
        log.info("created a new HTTP API token in %s (`cat` it to use the API or the console)", path)
        return token
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise HttpSetupError(f"cannot read the HTTP token file {path}: {e.strerror or e}") from None
    token = lines[0].strip() if lines else ""
    if len(token) < 16:
        raise HttpSetupError(f"the HTTP token in {path} is {'empty' if not token else 'shorter than 16 characters'}; "
                             "put a long random string on its first line (e.g. `openssl rand -hex 32`)")
    return token


def listen_socket(bind: str, port: int) -> socket.socket:
    """A listening TCP socket on ``bind:port`` (IPv4 or IPv6; ``::`` also takes IPv4 where the system allows)."""
    try:
        infos = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise HttpSetupError(f"cannot listen on {bind}:{port}: {e.strerror} ([http] bind)") from None
    family = infos[0][0]
    try:
        dual = family == socket.AF_INET6 and socket.has_dualstack_ipv6() and bind in ("::", "::0")
        return socket.create_server((bind, port), family=family, backlog=128, reuse_port=False, dualstack_ipv6=dual)
    except OSError as e:
        hint = " (another program uses it: choose another [http] port, or set [http] enabled = false)" \
            if e.errno == 98 else ""
        raise HttpSetupError(f"cannot listen on {bind}:{port}: {e.strerror or e}{hint}") from None


class ChangeNotifier:
    """Wakes async waiters (SSE streams, ``?wait=true``) after each durable state commit: a job's status can only
    have changed then. Waiters take ``event()`` *before* reading the state, so no change slips between."""

    def __init__(self) -> None:
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._event: Optional[asyncio.Event] = None

    def bind(self, loop: Optional[asyncio.AbstractEventLoop]) -> None:
        self._loop = loop
        self._event = asyncio.Event() if loop is not None else None

    def event(self) -> asyncio.Event:
        assert self._event is not None, "notifier used outside the server loop"
        return self._event

    def _fire(self) -> None:
        ev, self._event = self._event, asyncio.Event()
        if ev is not None:
            ev.set()

    def on_commit(self, _gen: int) -> None:  # on the state committer thread
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._fire)
        except RuntimeError:  # the loop closed during shutdown
            self._loop = None


class HttpService:
    def __init__(self, node: "Node"):
        self.node = node
        self.cfg = node.config.http
        self.token_path = self.cfg.resolve_token_file(node.config.state_dir)
        self.port: Optional[int] = None
        self.error: Optional[str] = None
        self.closing = threading.Event()
        self.notifier = ChangeNotifier()
        # Registered here, before the engine starts, so that the statuses of jobs resumed at start are kept too.
        self.history = StatusHistory()
        node.engine.add_status_listener(self._on_status)
        self._token: Optional[str] = None
        self._token_mtime: Optional[float] = None
        self._token_lock = threading.Lock()
        self._server: Any = None
        self._thread: Optional[threading.Thread] = None
        self._ssl: Optional[ssl.SSLContext] = None

    # -- setup ----------------------------------------------------------------------------------------------

    def start(self) -> Optional[int]:
        """Check the setup and start serving; returns the port, or None (the reason is logged and kept)."""
        cfg = self.cfg
        try:
            self._token = load_or_create_token(self.token_path, create=cfg.token_file is None)
            self._token_mtime = self.token_path.stat().st_mtime
            if cfg.tls_cert is not None:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                try:
                    ctx.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
                except (OSError, ssl.SSLError) as e:
                    raise HttpSetupError(f"cannot use the TLS certificate {cfg.tls_cert} with key {cfg.tls_key}: "
                                         f"{e} ([http] tls_cert / tls_key)") from None
                self._ssl = ctx
            sock = listen_socket(cfg.bind, cfg.port)
        except HttpSetupError as e:
            self.error = str(e)
            self.history.clear()
            log.error("HTTP API not started: %s", e)
            return None
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, args=(sock,), name="http", daemon=True)
        self._thread.start()
        log.info("HTTP API and web console on %s (bearer token in %s)", self.url, self.token_path)
        return self.port

    @property
    def url(self) -> str:
        host = self.cfg.bind
        if host in ("0.0.0.0", "::", "::0"):
            host = socket.gethostname()
        elif ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.cfg.tls else 'http'}://{host}:{self.port}/"

    def describe(self) -> dict[str, Any]:
        return {"enabled": True, "listening": self.port is not None and self.error is None, "port": self.port,
                "bind": self.cfg.bind, "tls": self.cfg.tls, "error": self.error}

    def _serve(self, sock: socket.socket) -> None:
        try:
            import uvicorn

            from agent.httpapi.app import create_app

            # uvicorn's own start/stop chatter adds nothing to the agent's log; its warnings and errors still show.
            logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
            app = create_app(self.node, self)
            config = uvicorn.Config(
                app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=3,
                ssl_certfile=str(self.cfg.tls_cert) if self.cfg.tls_cert else None,
                ssl_keyfile=str(self.cfg.tls_key) if self.cfg.tls_key else None,
                # Frame-level limits of h11 stay at their defaults; bodies are limited by the app's middleware.
                server_header=False, proxy_headers=False,
            )
            self._server = uvicorn.Server(config)
            if self.closing.is_set():
                return
            self._server.run(sockets=[sock])
        except Exception as e:  # the HTTP side must never take the agent down
            self.error = f"HTTP server failed: {type(e).__name__}: {e}"
            self.history.clear()
            log.exception("HTTP server failed")
        finally:
            self.notifier.bind(None)
            sock.close()

    def _on_status(self, status: dict[str, Any]) -> None:  # on an engine thread, inside a state transaction
        if self.error is None:  # no server, no readers: keep nothing
            self.history.record(status)

    def on_loop_started(self, loop: asyncio.AbstractEventLoop) -> None:
        self.notifier.bind(loop)
        if not getattr(self, "_listening_for_commits", False):
            self._listening_for_commits = True
            self.node.state.add_commit_listener(self.notifier.on_commit)

    def stop(self, timeout: float = 5.0) -> None:
        self.closing.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("HTTP server did not stop within %.0f s", timeout)

    # -- auth -----------------------------------------------------------------------------------------------

    def token(self) -> Optional[str]:
        """The current token; the file is read again when it changes, so a token can be rotated without restart."""
        with self._token_lock:
            try:
                mtime = self.token_path.stat().st_mtime
                if mtime != self._token_mtime:
                    self._token = load_or_create_token(self.token_path, create=False)
                    self._token_mtime = mtime
                    log.info("HTTP API token reloaded from %s", self.token_path)
            except (OSError, HttpSetupError) as e:
                log.warning("keeping the previous HTTP token: %s", e)
                self._token_mtime = None
            return self._token

    def check_token(self, given: Optional[str]) -> bool:
        expected = self.token()
        if not given or not expected:
            return False
        return hmac.compare_digest(given.encode(), expected.encode())

    # -- jobs -----------------------------------------------------------------------------------------------

