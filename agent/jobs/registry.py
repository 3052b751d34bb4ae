"""The one place job types are registered and looked up."""

from __future__ import annotations

import importlib
from typing import TypeVar

from agent.jobs.base import JobHandler

# Modules that define built-in job types; importing one registers its handlers.
BUILTIN_MODULES = [
    "agent.jobs.node_jobs",
    "agent.jobs.debug_jobs",
    "models.jobs",
    "agent.jobs.stream_jobs",
    "agent.jobs.infer_jobs",
]

_HANDLERS: dict[str, type[JobHandler]] = {}
H = TypeVar("H", bound=type[JobHandler])


def register(cls: H) -> H:
    if cls.type in _HANDLERS and _HANDLERS[cls.type] is not cls:
        raise RuntimeError(f"job type {cls.type!r} registered twice")
    _HANDLERS[cls.type] = cls
    return cls


def load_builtin() -> None:
    for mod in BUILTIN_MODULES:
        importlib.import_module(mod)


def handlers() -> dict[str, type[JobHandler]]:
    return dict(_HANDLERS)


def get(job_type: str) -> type[JobHandler] | None:
    return _HANDLERS.get(job_type)
