"""Logging: structured records to the systemd journal when we can, readable lines on stderr otherwise.

Job code logs with ``extra={"CVW_JOB_ID": ..., "CVW_JOB_TYPE": ...}``; the journal keeps those as fields so a
technician can run ``journalctl -u cv-worker CVW_JOB_ID=abc`` and read one job's whole story.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

CVW_FIELDS = ("CVW_JOB_ID", "CVW_JOB_TYPE", "CVW_JOB_STATE", "CVW_MODEL", "CVW_STREAM")

# syslog priorities for the "<N>" line prefix journald understands on a service's stderr.
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class FieldsFormatter(logging.Formatter):
    """Appends the CVW_* fields of a record, e.g. ``[job=abc type=node.info state=QUEUED]``."""

    def __init__(self, syslog_prefix: bool = False):
        fmt = "%(message)s" if syslog_prefix else "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
        super().__init__(fmt)
        self.syslog_prefix = syslog_prefix

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [f"{k[4:].lower().replace('job_', '')}={getattr(record, k)}" for k in CVW_FIELDS
                  if getattr(record, k, None) is not None]
        if fields:
            line += " [" + " ".join(fields) + "]"
        if self.syslog_prefix:
            line = f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>" + line.replace("\n", "\n ")
        return line


def under_systemd() -> bool:
    return bool(os.environ.get("INVOCATION_ID") or os.environ.get("JOURNAL_STREAM"))


def journal_handler() -> Optional[logging.Handler]:
    try:
        from systemd.journal import JournalHandler  # type: ignore[import-not-found]
    except ImportError:
        return None
    return JournalHandler(SYSLOG_IDENTIFIER="cv-worker")


def setup_logging(level: str = "INFO", journal: Optional[bool] = None) -> str:
    """Configure the root logger; returns where logs go ("journal" or "stderr")."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(level.upper())
    target = "stderr"
    handler: Optional[logging.Handler] = None
    if journal is None:
        journal = under_systemd()
    if journal:
        handler = journal_handler()
        if handler is not None:
            target = "journal"
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(FieldsFormatter(syslog_prefix=under_systemd()))
    root.addHandler(handler)
    # paho and zeroconf are chatty at DEBUG; keep them at WARNING unless the whole agent runs at DEBUG.
    for noisy in ("paho", "zeroconf", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING if level.upper() != "DEBUG" else logging.DEBUG)
    return target
