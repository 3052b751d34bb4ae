"""Disk pressure: watch the free space of the state directory and keep the node serving when it runs out.

Levels: ``ok``; ``low`` (free space under ``storage.free_low_mb``): new work is refused with ``disk_full``,
running jobs pause at their next checkpoint, and the oldest outputs and result logs of finished jobs are deleted
until ``storage.free_resume_mb`` is free again; ``full`` (a write failed with ENOSPC): as ``low``, and the
reserve file (``storage.reserve_mb``, kept in the state directory while there is room) is deleted at once, so
status messages and control jobs can still be written while space is freed. Above ``free_resume_mb`` the node
takes work again and paused jobs go on by themselves.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

from agent.storage import is_disk_full

log = logging.getLogger("cv_worker.disk")

Level = Literal["ok", "low", "full"]
RESERVE_FILE = "reserve"
MB = 1024 * 1024
PRESSURE_CHECK_S = 1.0


@dataclass(frozen=True)
class DiskLimits:
    free_low_bytes: int
    free_resume_bytes: int
    reserve_bytes: int
    check_interval_s: float


@dataclass(frozen=True)
class DiskReading:
    level: Level
    free_bytes: Optional[int]
    reserve_bytes: int


def free_bytes(path: Path) -> Optional[int]:
    """Bytes an unprivileged writer can still use on the filesystem of ``path``."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class DiskGuard:
    """The state disk's level, with hysteresis; ``free_space(n)`` is asked to free ``n`` bytes under pressure."""

    def __init__(self, path: Path, limits: DiskLimits, free_space: Callable[[int], int],
                 on_change: Callable[[DiskReading], None]):
        self.path = Path(path)
        self.limits = limits
        self._free_space = free_space
        self._on_change = on_change
        self._cond = threading.Condition()
        self._level: Level = "ok"
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.reserve_path = self.path / RESERVE_FILE

    # -- reading --------------------------------------------------------------------------------------------

    @property
    def level(self) -> Level:
        with self._cond:
            return self._level

    def refusing(self) -> bool:
        """New work is refused and running jobs pause."""
        return self.level != "ok"

    def reading(self) -> DiskReading:
        try:
            reserve = self.reserve_path.stat().st_size
        except OSError:
            reserve = 0
        return DiskReading(level=self.level, free_bytes=free_bytes(self.path), reserve_bytes=reserve)

    def wait_change(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait(timeout)

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Check once now (without writing: a node on a full disk must still start), then in the background."""
        self.check()
        self._thread = threading.Thread(target=self._loop, name="disk-guard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._kick.set()
        if self._thread is not None:
            self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            # Under pressure, look every second whatever the interval: paused jobs should go on soon after an
            # operator (or retention) makes room, and statvfs is cheap.
            interval = self.limits.check_interval_s
            if self.refusing():
                interval = min(interval, PRESSURE_CHECK_S)
            self._kick.wait(interval)
            self._kick.clear()
            if self._stop.is_set():
                return
            try:
                self.check()
            except Exception:  # the guard must outlive a vanished disk
                log.exception("disk check failed")

    # -- events -------------------------------------------------------------------------------------------

    def report(self, error: Optional[BaseException]) -> None:
        """A write failed (``error``); when it was for lack of space here, act at once instead of at the next
        check."""
        if error is None or not is_disk_full(error) or self._has_room():
            return
        release = False
        with self._cond:
            if self._level != "full":
                self._level = "full"
                release = True
                self._cond.notify_all()
        if release:
            freed = self._release_reserve()
            log.error("state disk %s is full (%s); released the %.0f MB reserve, refusing new work and pausing "
                      "jobs until %.0f MB are free", self.path, error, freed / MB,
                      self.limits.free_resume_bytes / MB)
            self._notify()
        self._kick.set()

    def _has_room(self) -> bool:
        """Whether this filesystem has room after all: then a write that failed for lack of space was on another
        one (``inference.outputs_dir`` elsewhere), or space was freed since, and the reserve must stay."""
        try:
            st = os.statvfs(self.path)
        except OSError:
            return False
        inodes = st.f_files == 0 or st.f_favail > 0  # some filesystems have no inode limit and say 0
        return inodes and st.f_bavail * st.f_frsize >= max(self.limits.free_low_bytes, MB)

    def check(self) -> DiskReading:
        free = free_bytes(self.path)
        if free is None:
            return self.reading()
        lim = self.limits
        changed = False
        with self._cond:
            old = self._level
            if old == "ok" and free < lim.free_low_bytes:
                self._level = "low"
            elif old != "ok" and free >= lim.free_resume_bytes:
                self._level = "ok"
            elif old == "full" and free >= lim.free_low_bytes:
                self._level = "low"
            changed = self._level != old
            if changed:
                self._cond.notify_all()
        if changed and old == "ok":
            log.warning("state disk %s has %.1f MB free, under storage.free_low_mb = %.0f: refusing new work "
                        "(disk_full), pausing jobs at their next checkpoint, freeing space", self.path, free / MB,
                        lim.free_low_bytes / MB)
        if self.level != "ok":
            want = lim.free_resume_bytes - free
            if want > 0:
                freed = self._free_space(want)
                if freed:
                    log.warning("freed %.1f MB of old outputs and result logs under disk pressure", freed / MB)
                    now_free = free_bytes(self.path)
                    free = free if now_free is None else now_free
                    with self._cond:
                        if free >= lim.free_resume_bytes and self._level != "ok":
                            self._level, changed = "ok", True
                            self._cond.notify_all()
        if self.level == "ok":
            if changed:
                log.warning("state disk %s has %.1f MB free again: taking new work, paused jobs go on", self.path,
                            free / MB)
            self._ensure_reserve(free)
        if changed:
            self._notify()
        return self.reading()

    def _notify(self) -> None:
        try:
            self._on_change(self.reading())
        except Exception:
            log.exception("disk level listener failed")

    # -- the reserve --------------------------------------------------------------------------------------

    def _release_reserve(self) -> int:
        try:
            size = self.reserve_path.stat().st_size
            self.reserve_path.unlink()
            return size
        except OSError:
            return 0

    def _ensure_reserve(self, free: int) -> None:
        want = self.limits.reserve_bytes
        if want <= 0:
            return
        try:
            if self.reserve_path.stat().st_size >= want:
                return
        except FileNotFoundError:
            pass
        if free - want < self.limits.free_low_bytes:
            return  # taking it now would push the disk under the low-water mark
        try:
            fd = os.open(self.reserve_path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, want)
            finally:
                os.close(fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                self.reserve_path.unlink()
            log.warning("cannot create the disk reserve %s: %s", self.reserve_path, e)
