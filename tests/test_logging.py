"""Structured log records: job fields on every job line, syslog priorities under systemd."""

from __future__ import annotations

import logging

from agent.engine import job_log_extra
from agent.logs import FieldsFormatter


def _record(level=logging.INFO, **extra):
    rec = logging.LogRecord("cv_worker.jobs", level, __file__, 1, "job %s started", ("j1",), None)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_job_fields_in_text_logs():
    extra = job_log_extra({"job_id": "j1", "type": "node.info", "state": "QUEUED"})
    line = FieldsFormatter().format(_record(**extra))
    assert line.endswith("job j1 started [id=j1 type=node.info state=QUEUED]")
    assert extra == {"CVW_JOB_ID": "j1", "CVW_JOB_TYPE": "node.info", "CVW_JOB_STATE": "QUEUED"}


def test_syslog_priority_prefix_under_systemd():
    assert FieldsFormatter(syslog_prefix=True).format(_record(logging.WARNING)).startswith("<4>job j1 started")
    assert FieldsFormatter(syslog_prefix=True).format(_record(logging.ERROR)).startswith("<3>")
