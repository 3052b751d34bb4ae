"""TinyDB kept in memory and persisted through a journal (agent/journal.py), plus the file helpers of the state.

TinyDB gives the state its tables and document API; this storage keeps the data in memory and, instead of
rewriting a file on every change, records which documents changed. At a commit the owner takes those changes
(``take_changes``: each changed document encoded once) and appends them to the journal as one record, so the
cost of a commit depends on what changed, not on how much the state holds. Compaction writes a snapshot from
the per-document encodings cached here (``snapshot_parts``).

The table class (``agent.state._InPlaceTable``) reports every document it hands to a writer through
``touch()``. Code must not change a stored document behind the table's back (readers get shallow copies);
verification mode (``CV_WORKER_STATE_VERIFY=1``, on in the tests) compares every clean document with a fresh
encoding at each commit and logs ``STATE SNAPSHOT MISMATCH`` when one changed unseen.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

from tinydb.storages import Storage

from agent.journal import fsync_dir

__all__ = ["JournaledStorage", "atomic_write_bytes", "dumps", "fsync_dir", "is_disk_full"]

log = logging.getLogger(__name__)


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that a reader never sees half of it, and (``durable``) a crash at any
    moment leaves the old or the new content. A failed write (a full disk) leaves no temporary file behind."""
    # The pid keeps two processes (the CLI and the agent) from sharing a temp file.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()  # a full disk must not also keep the half-written copy
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(path.parent)


Change = tuple[str, str, Optional[str]]  # table, document id, the document's JSON (None: removed)


class JournaledStorage(Storage):
    """In-memory TinyDB storage that reports what changed since the last ``take_changes``."""

    def __init__(self, tables: dict[str, dict[str, Any]], encode_now: bool = True):
        self._data: dict[str, dict[str, Any]] = tables
        self._dirty: set[tuple[str, str]] = set()
        # table -> document id -> that document's JSON as last taken: the snapshot is assembled from these.
        self._enc: dict[str, dict[str, str]] = {}
        self._verify = os.environ.get("CV_WORKER_STATE_VERIFY") == "1"
        if encode_now:
            self._enc = {name: {k: dumps(v) for k, v in docs.items()} for name, docs in tables.items()}
        else:  # a reader never writes a snapshot; nothing to cache
            self._enc = {}

    # -- TinyDB's Storage interface ----------------------------------------------------------------------

    def read(self) -> Optional[dict[str, Any]]:
        return self._data

    def write(self, data: dict[str, Any]) -> None:
        if data is not self._data:
            # A whole new database object: every document, present or gone, must be written again.
            old_keys = {(t, k) for t, docs in self._enc.items() for k in docs}
            self._data = data
            self._dirty |= old_keys | {(t, k) for t, docs in data.items() for k in docs}

    def close(self) -> None:
        pass

    # -- change tracking ----------------------------------------------------------------------------------

    def touch(self, table: str, doc_id: str) -> None:
        """The document ``doc_id`` of ``table`` is being changed (or removed): write it at the next commit."""
        self._dirty.add((table, doc_id))

    def mark_all_dirty(self) -> None:
        self._dirty |= {(t, k) for t, docs in self._data.items() for k in docs}

    def has_changes(self) -> bool:
        return bool(self._dirty) or self._verify

    def take_changes(self) -> list[Change]:
        """Every document changed since the last call, encoded; call under the owner's lock."""
        if self._verify:
            self._find_unseen_changes()
        dirty, self._dirty = self._dirty, set()
        out: list[Change] = []
        for table, doc_id in sorted(dirty):
            docs = self._data.get(table, {})
            cache = self._enc.setdefault(table, {})
            if doc_id in docs:
                enc = cache[doc_id] = dumps(docs[doc_id])
            else:
                if cache.pop(doc_id, None) is None:
                    continue  # created and removed between two commits: the disk never saw it
                enc = None
            out.append((table, doc_id, enc))
        return out

    def retake(self, changes: list[Change]) -> None:
        """A commit of ``changes`` failed: write them again at the next one."""
        for table, doc_id, _ in changes:
            self._dirty.add((table, doc_id))
            if _ is None:
                # Keep a marker so that take_changes writes the removal again.
                self._enc.setdefault(table, {})[doc_id] = ""

    def _find_unseen_changes(self) -> None:
        for table, docs in self._data.items():
            cache = self._enc.get(table, {})
            for doc_id, doc in docs.items():
                if (table, doc_id) in self._dirty:
                    continue
                if cache.get(doc_id) != dumps(doc):
                    log.critical("STATE SNAPSHOT MISMATCH: document %s/%s changed without touch(); writing it now",
                                 table, doc_id)
                    self._dirty.add((table, doc_id))

    def snapshot_parts(self) -> list[str]:
        """The whole data as pieces of JSON text (tables without the outer braces), from the encodings taken at
        the last ``take_changes``; call under the owner's lock right after it. The pieces are immutable strings,
        so they can be joined and written outside the lock."""
        out: list[str] = []
        for name, docs in self._data.items():
            cache = self._enc.setdefault(name, {})
            if out:
                out.append(",")
            out.append(f"{dumps(name)}:{{")
            first = True
            for doc_id in docs:
                if not first:
                    out.append(",")
                first = False
                enc = cache.get(doc_id)
                if enc is None:  # only when verification is off and a change went unseen: never write stale data
                    enc = cache[doc_id] = dumps(docs[doc_id])
                out.append(f"{dumps(doc_id)}:")
                out.append(enc)
            out.append("}")
        return out

    def encoded_bytes(self, table: str) -> int:
        """Bytes the documents of ``table`` take in a snapshot (from the cached encodings)."""
        return sum(len(v) for v in self._enc.get(table, {}).values())
