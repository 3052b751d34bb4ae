"""systemd readiness and status notifications (``Type=notify``), without requiring systemd-python."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)


def sd_notify(message: str) -> bool:
    """Send one sd_notify(3) datagram; False when not run by systemd (no NOTIFY_SOCKET)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract socket namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError as e:
        log.warning("sd_notify to %s failed: %s", addr, e)
        return False


def watchdog_interval_s() -> Optional[float]:
    """How often to send WATCHDOG=1: half of ``WatchdogSec=`` (from $WATCHDOG_USEC), None when not requested.

    systemd sets WATCHDOG_PID to the main process; a child that inherited the environment must not ping."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        return max(int(usec) / 1e6 / 2, 0.1)
    except ValueError:
        return None


def notifier() -> Callable[..., None]:
    """``notify(ready=True, status="...", stopping=True, watchdog=True, extend_timeout_s=N)`` as sd_notify fields."""

    def notify(**kw: Any) -> None:
        parts = []
        if kw.get("ready"):
            parts.append("READY=1")
        if kw.get("stopping"):
            parts.append("STOPPING=1")
        if kw.get("watchdog"):
            parts.append("WATCHDOG=1")
        if kw.get("extend_timeout_s"):
            parts.append(f"EXTEND_TIMEOUT_USEC={int(kw['extend_timeout_s'] * 1e6)}")
        if kw.get("status"):
            parts.append(f"STATUS={kw['status']}")
        if parts:
            sd_notify("\n".join(parts))

    return notify
