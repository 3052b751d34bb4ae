"""Fixtures for discovery tests: unique node ids, helper processes, and a pair of network namespaces."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
# Only the loopback interface: tests must not talk mDNS on the machine's real network.
LO = ["127.0.0.1"]


@pytest.fixture
def node_id() -> str:
    # Unique per test so that nodes of other tests (or other runs on this machine) never match.
    return f"t-{uuid.uuid4().hex[:10]}"


def subprocess_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")


class Proc:
    """A helper process whose stdout is JSON lines; ``expect`` waits for a matching one."""

    def __init__(self, cmd: list[str], name: str):
        env = subprocess_env()
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, cwd=REPO)
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                self.lines.put({"event": "text", "line": line.rstrip()})

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def expect(self, pred: Callable[[dict[str, Any]], bool], timeout: float, what: str = "") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"{self.name}: no {what or 'matching line'} within {timeout}s; saw {self.seen}; "
                    f"stderr: {''.join(self.stderr)[-2000:]}"
                )
            try:
                item = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(item)
            if pred(item):
                return item

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def close(self, timeout: float = 3.0) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # A browser in --watch mode does not read stdin; stop it the way Ctrl-C/systemd would.
                self.proc.terminate()
                try:
                    self.proc.wait(2)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)


def advertise_cmd(node_id: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tests.discovery._advertise", "--node-id", node_id, *extra]


def discover_cmd(*extra: str) -> list[str]:
    return [sys.executable, "-m", "agent.discovery_cli", "discover", *extra]


class NetnsPair:
    """Two network namespaces joined by a veth pair: two 'hosts' on one private link."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}{uuid.uuid4().hex[:3]}"
        self.a, self.b = f"cvwd-a-{tag}", f"cvwd-b-{tag}"
        self.veth_a, self.veth_b = f"cva{tag}"[:15], f"cvb{tag}"[:15]
        octet = 100 + (os.getpid() % 100)
        self.addr_a, self.addr_b = f"10.231.{octet}.1", f"10.231.{octet}.2"
        self.procs: list[Proc] = []
        self.created: list[str] = []

    def _ip(self, *args: str) -> None:
        r = subprocess.run(["ip", *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)} failed: {r.stderr.strip()}")

    def setup(self) -> None:
        for ns in (self.a, self.b):
            self._ip("netns", "add", ns)
            self.created.append(ns)
        self._ip("link", "add", self.veth_a, "netns", self.a, "type", "veth", "peer", "name", self.veth_b,
                 "netns", self.b)
        for ns, dev, addr in ((self.a, self.veth_a, self.addr_a), (self.b, self.veth_b, self.addr_b)):
            self._ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            self._ip("-n", ns, "link", "set", dev, "up")
            self._ip("-n", ns, "link", "set", "lo", "up")

    def spawn(self, ns: str, cmd: list[str], name: str) -> Proc:
        proc = Proc(["ip", "netns", "exec", ns, *cmd], name)
        self.procs.append(proc)
        return proc

    def teardown(self) -> None:
        for proc in self.procs:
            proc.close()
        for ns in self.created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture(scope="module")
def netns() -> Iterator[NetnsPair]:
    if os.geteuid() != 0:
        reason = "network namespace tests need root (ip netns add); run the suite as root to cross a real link"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    if not shutil.which("ip"):
        pytest.fail("the `ip` command (iproute2) is missing: apt-get install iproute2")
    pair = NetnsPair()
    try:
        pair.setup()
        yield pair
    finally:
        pair.teardown()


def wait_for(pred: Callable[[], Optional[Any]], timeout: float, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    return pred()
