"""The one place job types are registered and looked up.

Job types live in *realms*: ``node`` (what an edge node accepts on its request topics) and ``trainer`` (what a
build-system peer, ``cv-worker trainer``, accepts on the training queue). Both run on the same job engine; the
realm only decides which handler a job type names, so ``train`` can mean "offload" on a node and "train here" on
a build peer.
"""

from __future__ import annotations

import importlib
from typing import Callable, TypeVar

from agent.jobs.base import JobHandler

NODE = "node"
TRAINER = "trainer"

# Modules that define built-in job types; importing one registers its handlers.
BUILTIN_MODULES = [
    "agent.jobs.node_jobs",
    "agent.jobs.debug_jobs",
    "models.jobs",
    "agent.jobs.stream_jobs",
    "agent.jobs.infer_jobs",
    "agent.trainer.offload",
]
TRAINER_MODULES = ["agent.trainer.jobs"]

_HANDLERS: dict[str, dict[str, type[JobHandler]]] = {NODE: {}, TRAINER: {}}
H = TypeVar("H", bound=type[JobHandler])


def register_in(realm: str) -> Callable[[H], H]:
    """Decorator registering a handler in ``realm`` (the same class may serve several realms)."""

    def deco(cls: H) -> H:
        handlers = _HANDLERS.setdefault(realm, {})
        if cls.type in handlers and handlers[cls.type] is not cls:
            raise RuntimeError(f"job type {cls.type!r} registered twice in realm {realm!r}")
        handlers[cls.type] = cls
        return cls

    return deco


def register(cls: H) -> H:
    """Register a node job type."""
    return register_in(NODE)(cls)


def load_builtin() -> None:
    for mod in BUILTIN_MODULES:
        importlib.import_module(mod)


def load_trainer() -> None:
    for mod in TRAINER_MODULES:
        importlib.import_module(mod)


def handlers(realm: str = NODE) -> dict[str, type[JobHandler]]:
    return dict(_HANDLERS.get(realm, {}))


def get(job_type: str, realm: str = NODE) -> type[JobHandler] | None:
    return _HANDLERS.get(realm, {}).get(job_type)
