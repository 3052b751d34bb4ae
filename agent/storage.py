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
from typing import Any, Optional, Union

from tinydb.storages import Storage

log = logging.getLogger(__name__)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


# A document's cached JSON: one string, or (up to its params, the params, after them) to be joined at a commit.
_Encoded = Union[str, tuple[str, str, str]]
_PARAMS = "params"


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
    change a stored document behind the table's back (readers get shallow copies).

    A running job's document is touched on every result chunk and progress update, so its own params would still
    be encoded again at each commit: time proportional to the batch, under the state lock. The ``params`` value
    of a document therefore has a cache of its own, kept while the document holds the very same object, and
    spliced into the document's JSON. So params must never be changed in place once stored: a writer replaces
    the whole value (``update_job(id, {"params": {...}})``), which a new object makes visible. Verification mode
    (``CV_WORKER_STATE_VERIFY=1``) catches a value changed in place like any other missed change.
    """

    def __init__(self, path: str | Path, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        self._data: Optional[dict[str, Any]] = None
        self.dirty = False
        # table -> document id -> its `"id":{...}` JSON, whole or as the pieces around its cached params JSON
        self._encoded: dict[str, dict[str, _Encoded]] = {}
        # table -> document id -> (its params object, that object's JSON). The object is kept so that the
        # identity test in _encode_doc can never match a new object that happens to get a freed one's id.
        self._params: dict[str, dict[str, tuple[Any, str]]] = {}
        # Tests set CV_WORKER_STATE_VERIFY=1 to compare every snapshot with a full encoding: it finds missed touches,
        # and params changed in place.
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
            self._forget()  # a new database object: nothing cached can be trusted
        self._data = data
        self.dirty = True

    def touch(self, table: str, doc_id: str) -> None:
        """The document ``doc_id`` of ``table`` is being changed (or removed): encode it again at the next commit.

        Its params' JSON stays cached: it is reused only while the document holds the same params object."""
        cached = self._encoded.get(table)
        if cached is not None:
            cached.pop(doc_id, None)

    def _forget(self) -> None:
        self._encoded.clear()
        self._params.clear()

    def _encode_doc(self, params_cache: dict[str, tuple[Any, str]], doc_id: str, doc: Any) -> _Encoded:
        key = f"{_dumps(doc_id)}:"
        params = doc.get(_PARAMS) if isinstance(doc, dict) else None
        if not isinstance(params, (dict, list)):
            params_cache.pop(doc_id, None)
            return key + _dumps(doc)
        hit = params_cache.get(doc_id)
        if hit is not None and hit[0] is params:
            params_json = hit[1]
        else:
            params_json = _dumps(params)
            params_cache[doc_id] = (params, params_json)
        before: dict[str, Any] = {}
        after: dict[str, Any] = {}
        side = before
        for k, v in doc.items():
            if k == _PARAMS:
                side = after
            else:
                side[k] = v
        # Cut from the encodings of the keys on either side, so the document's bytes are exactly _dumps(doc)'s.
        head = _dumps(before)[:-1] + ("," if before else "") + f"{_dumps(_PARAMS)}:"
        tail = ("," if after else "") + _dumps(after)[1:]
        return key + head, params_json, tail

    def snapshot(self) -> bytes:
        """Serialise the current data; call under the owner's lock, write outside it."""
        return self.join(self.snapshot_parts())

    @staticmethod
    def join(parts: list[str]) -> bytes:
        """The file's bytes from ``snapshot_parts()``."""
        return "".join(parts).encode()

    def snapshot_parts(self) -> list[str]:
        """The current data as pieces of JSON text; call under the owner's lock, and ``join`` them outside it.

        The pieces are immutable strings, so later changes cannot reach them; joining them outside the lock
        keeps the copy of a file of megabytes (jobs' params) from holding up the writers."""
        self.dirty = False
        data = self._data or {}
        out = ["{"]
        for name, docs in data.items():
            if len(out) > 1:
                out.append(",")
            out.append(f"{_dumps(name)}:{{")
            cached = self._encoded.setdefault(name, {})
            params_cache = self._params.setdefault(name, {})
            if len(cached) > 2 * len(docs) + 64:  # ids of removed documents that were never touched
                for gone in cached.keys() - docs.keys():
                    del cached[gone]
            split = 0
            first = True
            for doc_id, doc in docs.items():
                enc = cached.get(doc_id)
                if enc is None:
                    enc = cached[doc_id] = self._encode_doc(params_cache, doc_id, doc)
                if not first:
                    out.append(",")
                first = False
                if isinstance(enc, str):
                    out.append(enc)
                else:
                    out.extend(enc)
                    split += 1
            out.append("}")
            # Every split document has its params cached; more entries belong to removed documents, and each
            # holds a whole params object and its JSON, so they go at once.
            if len(params_cache) > split:
                for gone in params_cache.keys() - docs.keys():
                    del params_cache[gone]
        out.append("}")
        if self._verify:
            full = _dumps(data)
            try:
                same = json.loads(self.join(out)) == json.loads(full)
            except ValueError:  # pieces that do not even join into JSON: a splicing bug
                same = False
            if not same:
                log.critical("STATE SNAPSHOT MISMATCH in %s: a stored document changed without touch(), or its "
                             "params in place; the cache is stale (writing the full encoding instead)", self.path)
                self._forget()
                return [full]
        return out

    def commit_bytes(self, blob: bytes) -> None:
        atomic_write_bytes(self.path, blob)

    def close(self) -> None:
        pass
