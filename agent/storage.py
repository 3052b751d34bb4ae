"""A crash-safe TinyDB storage.

TinyDB's own JSONStorage rewrites its file in place: a crash mid-write leaves it torn. This storage keeps the
database in memory and writes it with the classic atomic-replace dance (temp file, fsync, ``os.replace``, fsync
of the directory), so the file on disk is always a complete old or a complete new version. ``write()`` only
marks the data dirty; ``commit()`` puts it on disk, which lets the caller group many changes into one fsync.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

from tinydb.storages import Storage

log = logging.getLogger(__name__)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash at any moment leaves the old or the new content."""
    # The pid keeps two processes (the CLI and the agent) from sharing a temp file.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class DurableJSONStorage(Storage):
    """In-memory TinyDB storage persisted atomically by ``commit()``.

    Each commit writes the whole file, but only re-encodes the documents changed since the last one: the others'
    JSON is cached. Finished jobs keep their params (an ``infer`` job's list of thousands of images), and encoding
    them all again on every commit cost a batch more CPU, under the GIL, than its result messages. The table class
    (``agent.state._InPlaceTable``) reports every document it hands to a writer through ``touch()``; code must not
    change a stored document behind the table's back (readers get copies).
    """

    def __init__(self, path: str | Path, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        self._data: Optional[dict[str, Any]] = None
        self.dirty = False
        self._encoded: dict[str, dict[str, str]] = {}  # table -> document id -> its JSON
        # Tests set CV_WORKER_STATE_VERIFY=1 to compare every snapshot with a full encoding (finds missed touches).
        self._verify = os.environ.get("CV_WORKER_STATE_VERIFY") == "1"
        self._load()

    def _load(self) -> None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            self._data = None
            return
        try:
            data = json.loads(raw) if raw.strip() else None
            if data is not None and not isinstance(data, dict):
                raise ValueError("top level is not an object")
            self._data = data
        except ValueError as e:
            if self.read_only:
                raise
            # Atomic replace makes this near impossible (disk fault, hand edit); keep the evidence and go on
            # with an empty database rather than refusing to start a node that a fleet depends on.
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            os.replace(self.path, aside)
            log.error("state file %s is unreadable (%s); moved it to %s and started empty", self.path, e, aside)
            self._data = None

    def read(self) -> Optional[dict[str, Any]]:
        return self._data

    def write(self, data: dict[str, Any]) -> None:
        if self.read_only:
            raise PermissionError(f"{self.path} is opened read-only")
        if data is not self._data:
            self._encoded.clear()  # a new database object: nothing cached can be trusted
        self._data = data
        self.dirty = True

    def touch(self, table: str, doc_id: str) -> None:
        """The document ``doc_id`` of ``table`` is being changed (or removed): encode it again at the next commit."""
        cached = self._encoded.get(table)
        if cached is not None:
            cached.pop(doc_id, None)

    def snapshot(self) -> bytes:
        """Serialise the current data; call under the owner's lock, write outside it."""
        self.dirty = False
        data = self._data or {}
        tables = []
        for name, docs in data.items():
            cached = self._encoded.setdefault(name, {})
            if len(cached) > 2 * len(docs) + 64:  # ids of removed documents that were never touched
                for gone in cached.keys() - docs.keys():
                    del cached[gone]
            parts = []
            for doc_id, doc in docs.items():
                enc = cached.get(doc_id)
                if enc is None:
                    enc = cached[doc_id] = _dumps(doc)
                parts.append(f"{_dumps(doc_id)}:{enc}")
            tables.append(f"{_dumps(name)}:{{{','.join(parts)}}}")
        blob = ("{" + ",".join(tables) + "}").encode()
        if self._verify:
            full = _dumps(data).encode()
            if json.loads(blob) != json.loads(full):
                log.critical("STATE SNAPSHOT MISMATCH in %s: a stored document changed without touch(); the "
                             "per-document cache is stale (writing the full encoding instead)", self.path)
                self._encoded.clear()
                return full
        return blob

    def commit_bytes(self, blob: bytes) -> None:
        atomic_write_bytes(self.path, blob)

    def close(self) -> None:
        pass
