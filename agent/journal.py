"""The files of the node's state: a snapshot and an append-only journal. One fsynced append is one commit.

``state.json`` holds every table as of one journal sequence number; ``journal/<first seq>.log`` segments hold
the commits after it, one record per line::

    <crc32 of the body, 8 hex digits> <body: {"s": seq, "c": [[table, doc_id, document or null], ...]}>\\n

A commit is durable once its line and an ``fdatasync`` are done, so what a commit changes (a job's new state,
the status messages it queues, its result counter) reaches disk together or not at all. A crash can leave only
the last line torn; loading stops there and, when writing, cuts it off. Compaction writes a new snapshot (temp
file, fsync, rename) from a copy taken at a commit boundary and then deletes the segments it covers; replaying
skips records the snapshot already holds, so a crash at any step of it loses nothing.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

FORMAT = 2
SNAPSHOT = "state.json"
JOURNAL_DIR = "journal"
_SEGMENT_SUFFIX = ".log"


class JournalGap(Exception):
    """Records are missing between the snapshot and the journal (a reader raced a compaction, or damage)."""


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some filesystems (vfat boot partitions, some FUSE mounts) cannot fsync a directory; nothing better exists.
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def frame(body: bytes) -> bytes:
    """One journal line for ``body`` (JSON text without newlines)."""
    return b"%08x " % zlib.crc32(body) + body + b"\n"


def unframe(line: bytes) -> Optional[dict[str, Any]]:
    """The record of one complete line, or None when the line is torn or damaged."""
    if len(line) < 10 or line[8:9] != b" " or not line.endswith(b"\n"):
        return None
    body = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        record = json.loads(body)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("s"), int) or not isinstance(record.get("c"), list):
        return None
    return record


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{_SEGMENT_SUFFIX}"


@dataclass
class Segment:
    path: Path
    first_seq: int


@dataclass
class Loaded:
    """What ``Journal.load`` found: the tables as of ``seq`` and how recovery went."""

    tables: dict[str, dict[str, Any]]
    seq: int = 0
    snapshot_seq: int = 0
    snapshot_bytes: int = 0
    journal_bytes: int = 0
    records: int = 0
    found: bool = False  # a snapshot or a journal existed
    problems: list[str] = field(default_factory=list)


def apply_record(tables: dict[str, dict[str, Any]], record: dict[str, Any]) -> None:
    for table, doc_id, doc in record["c"]:
        docs = tables.setdefault(table, {})
        if doc is None:
            docs.pop(str(doc_id), None)
        else:
            docs[str(doc_id)] = doc


class Journal:
    """The snapshot file and the journal segments of one state directory."""

    def __init__(self, directory: Path, read_only: bool = False):
        self.dir = Path(directory)
        self.read_only = read_only
        self.snapshot_path = self.dir / SNAPSHOT
        self.journal_dir = self.dir / JOURNAL_DIR
        self._fd: Optional[int] = None
        self._segment: Optional[Segment] = None  # where the next append goes
        self._offset = 0
        self._next_first_seq: Optional[int] = None  # set by rotate(): the next append opens a new segment

    # -- reading ------------------------------------------------------------------------------------------

    def exists(self) -> bool:
        return self.snapshot_path.exists() or bool(self.segments())

    def segments(self) -> list[Segment]:
        try:
            names = os.listdir(self.journal_dir)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            stem = name[: -len(_SEGMENT_SUFFIX)]
            if name.endswith(_SEGMENT_SUFFIX) and stem.isdigit():
                out.append(Segment(self.journal_dir / name, int(stem)))
        return sorted(out, key=lambda s: s.first_seq)

    def load(self, attempts: int = 5) -> Loaded:
        """The tables as of the last complete commit. A reader (read_only) that races a compaction tries again."""
        for attempt in range(attempts):
            try:
                return self._load_once()
            except (JournalGap, FileNotFoundError) as e:
                if not self.read_only or attempt == attempts - 1:
                    raise
                log.debug("state changed while reading it (%s); reading again", e)
                time.sleep(0.05)
        raise AssertionError("unreachable")

    def _load_once(self) -> Loaded:
        loaded = Loaded(tables={})
        try:
            raw = self.snapshot_path.read_bytes()
        except FileNotFoundError:
            raw = None
        if raw is not None:
            loaded.found = True
            snap = json.loads(raw)  # atomically replaced: complete or absent, never torn
            if not isinstance(snap, dict) or snap.get("format") != FORMAT:
                raise ValueError(f"{self.snapshot_path} is not a cv-worker state snapshot of format {FORMAT}")
            loaded.tables = {name: dict(docs) for name, docs in snap["tables"].items()}
            loaded.seq = loaded.snapshot_seq = int(snap["seq"])
            loaded.snapshot_bytes = len(raw)
        segments = self.segments()
        for i, seg in enumerate(segments):
            loaded.found = True
            last = i == len(segments) - 1
            data = seg.path.read_bytes()
            pos = 0
            while pos < len(data):
                end = data.find(b"\n", pos)
                line = data[pos:] if end < 0 else data[pos:end + 1]
                record = unframe(line)
                if record is None:
                    self._cut(seg, pos, len(data), last, loaded)
                    if not last:
                        # Later segments continue a history whose link is lost: applying them would be wrong.
                        for later in segments[i + 1:]:
                            self._set_aside(later, loaded)
                    return loaded
                seq = record["s"]
                if seq > loaded.seq:
                    if seq != loaded.seq + 1:
                        raise JournalGap(f"{seg.path.name}: record {seq} follows {loaded.seq}")
                    apply_record(loaded.tables, record)
                    loaded.seq = seq
                    loaded.records += 1
                    loaded.journal_bytes += len(line)
                pos += len(line)
            if last and not self.read_only:
                self._segment, self._offset = seg, len(data)
        return loaded

    def _cut(self, seg: Segment, pos: int, size: int, last: bool, loaded: Loaded) -> None:
        what = "a torn last record (a crash during a commit that never completed)" if last else "a damaged record"
        loaded.problems.append(f"{seg.path.name}: {what} at byte {pos} of {size}; "
                               f"{'cut off' if not self.read_only else 'ignored'}")
        if self.read_only:
            return
        # Cutting a file shorter needs no free space, so this works on a full disk too.
        fd = os.open(seg.path, os.O_WRONLY)
        try:
            os.ftruncate(fd, pos)
            os.fsync(fd)
        finally:
            os.close(fd)
        if last:
            self._segment, self._offset = seg, pos

    def _set_aside(self, seg: Segment, loaded: Loaded) -> None:
        loaded.problems.append(f"{seg.path.name}: follows a damaged record; not applied")
        if not self.read_only:
            os.replace(seg.path, seg.path.with_name(f"{seg.path.name}.corrupt-{int(time.time())}"))

    # -- writing ------------------------------------------------------------------------------------------

    def rotate(self, next_seq: int) -> None:
        """Close the current segment; the record ``next_seq`` and later go to a new one."""
        self._close_fd()
        self._segment = None
        self._next_first_seq = next_seq

    def append(self, seq: int, line: bytes) -> None:
        """Append one framed record and make it durable. On failure nothing of it stays in the file."""
        if self._fd is None:
            self._open_for(seq)
        assert self._fd is not None
        start = self._offset
        try:
            view = memoryview(line)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            os.fdatasync(self._fd)
        except OSError:
            # A half-written record (disk full mid-write) would make every later record unreachable.
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                log.exception("cannot cut a failed journal append back; the next start cuts it")
            raise
        self._offset = start + len(line)

    def _open_for(self, seq: int) -> None:
        first = self._next_first_seq if self._next_first_seq is not None else seq
        if self._segment is None:
            self.journal_dir.mkdir(exist_ok=True)
            self._segment = Segment(self.journal_dir / segment_name(first), first)
            created = not self._segment.path.exists()
            self._fd = os.open(self._segment.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._offset = os.fstat(self._fd).st_size
            if created:
                fsync_dir(self.journal_dir)
        else:
            self._fd = os.open(self._segment.path, os.O_WRONLY | os.O_APPEND)
        self._next_first_seq = None

    def write_snapshot(self, seq: int, parts: list[str]) -> int:
        """Replace the snapshot with the tables as of ``seq`` (pieces of JSON text of ``{"name": {docs}, ...}``
        without the outer braces), then delete the segments it covers. The journal must have been rotated at
        ``seq`` (the record after it opens a new segment). Safe to run beside ``append``. Returns the size."""
        tmp = self.dir / f".{SNAPSHOT}.tmp{os.getpid()}"
        head = f'{{"format":{FORMAT},"seq":{seq},"tables":{{'.encode()
        try:
            with open(tmp, "wb") as f:
                f.write(head)
                size = len(head)
                for piece in parts:
                    b = piece.encode()
                    f.write(b)
                    size += len(b)
                f.write(b"}}")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.snapshot_path)
        except BaseException:
            # A full disk must not also keep a large half-written temp file around.
            try:
                tmp.unlink()
            except OSError:
                pass
            raise
        fsync_dir(self.dir)
        # The caller rotated at ``seq``: every segment that starts at or before it holds only covered records.
        for seg in self.segments():
            if seg.first_seq <= seq:
                try:
                    seg.path.unlink()
                except FileNotFoundError:
                    pass
        return size + 2

    def remove_stale_temp_files(self) -> list[str]:
        """Temp files left by a crash during an earlier compaction (they can be large)."""
        gone = []
        for p in self.dir.glob(f".{SNAPSHOT}.tmp*"):
            try:
                p.unlink()
                gone.append(p.name)
            except OSError:
                pass
        return gone

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        self._close_fd()
