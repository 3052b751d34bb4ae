"""A TCP relay on loopback whose uplink is slow: what a node behind a congested cellular or satellite link sees.

Bytes from the client to the server are held for ``uplink_delay_s`` (in order); bytes back are relayed at once.
The tests use it to widen, deterministically, windows that a loaded machine opens only now and then: between a
node sending a packet and the broker acting on it.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from typing import Optional


class SlowUplink:
    def __init__(self, target_host: str, target_port: int, uplink_delay_s: float):
        self.target = (target_host, target_port)
        self.delay = uplink_delay_s
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self.host, self.port = self._listener.getsockname()
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> "SlowUplink":
        threading.Thread(target=self._accept, name="slowlink-accept", daemon=True).start()
        return self

    def __enter__(self) -> "SlowUplink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            for s in self._socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._socks += [client, server]
            held: "queue.Queue[Optional[tuple[float, bytes]]]" = queue.Queue()
            threading.Thread(target=self._read_uplink, args=(client, held), daemon=True).start()
            threading.Thread(target=self._write_uplink, args=(held, server), daemon=True).start()
            threading.Thread(target=self._downlink, args=(server, client), daemon=True).start()

    def _read_uplink(self, src: socket.socket, held: "queue.Queue[Optional[tuple[float, bytes]]]") -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                held.put((time.monotonic() + self.delay, data))
        except OSError:
            pass
        held.put(None)

    def _write_uplink(self, held: "queue.Queue[Optional[tuple[float, bytes]]]", dst: socket.socket) -> None:
        try:
            while (item := held.get()) is not None:
                due, data = item
                # The emulated latency itself: each chunk leaves when its delay has passed.
                if self._stop.wait(max(0.0, due - time.monotonic())):
                    return
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _downlink(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
