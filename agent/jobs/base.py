"""The contract between the job engine and the code that does a job's work.

A job type is a ``JobHandler`` subclass registered with ``@register``: it names its type, the pydantic model its
``params`` must satisfy, whether it can resume from a checkpoint, and a ``run`` method. ``run`` talks to the
engine only through ``JobContext``: report progress, save a checkpoint, stream result messages, and call
``check()`` often enough that cancellation and timeouts take effect.
"""

from __future__ import annotations

import enum
import threading
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Protocol

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from agent.node import Node


class NoParams(BaseModel):
    """Jobs that take no parameters still refuse unknown ones, so a typo is caught."""

    model_config = ConfigDict(extra="forbid")


class Effects(str, enum.Enum):
    """What running a job type changes, which decides what a crash may do to it (docs/protocol.md)."""

    none = "none"  # reads and reports only: a second run after a crash changes nothing
    idempotent = "idempotent"  # changes the node, but running it again leaves the same outcome
    once = "once"  # must never run twice: it starts only once its IN_PROGRESS status is on disk

    @property
    def meaning(self) -> str:
        return {
            Effects.none: "reads and reports only; if the agent crashes before its IN_PROGRESS status is on disk "
                          "it runs again after the restart, which changes nothing",
            Effects.idempotent: "changes the node, but a second run leaves the same outcome, so a run repeated "
                                "after a crash is harmless",
            Effects.once: "has side effects that must not happen twice: it starts only once its IN_PROGRESS status "
                          "is on disk, so after a crash it either never started (and runs) or ends FAILED "
                          "`interrupted` — check the node before submitting it again",
        }[self]


class JobError(Exception):
    """A job failed for a reason the controller should read.

    ``code`` is machine-readable; ``message`` says what happened and what to do."""

    def __init__(self, code: str, message: str, details: Optional[dict[str, Any]] = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}


class JobCanceled(Exception):
    """Raised by ``JobContext.check()`` when the job was canceled."""


class JobTimedOut(Exception):
    """Raised by ``JobContext.check()`` when the job ran past its ``timeout_s``."""


class JobContext(Protocol):
    job_id: str
    job_type: str
    params: Any
    checkpoint: Optional[dict[str, Any]]
    node: "Node"
    cancel_event: threading.Event

    def progress(self, fraction: Optional[float], force: bool = False, **details: Any) -> None:
        """Report progress (0..1, or None when unknown) with free-form details; rate-limited by the engine."""

    def save_checkpoint(self, data: dict[str, Any]) -> None:
        """Durably record how far the job got; after a crash ``run`` gets it back as ``ctx.checkpoint``."""

    def publish_result(self, payload: dict[str, Any], final: bool = False,
                       checkpoint: Optional[dict[str, Any]] = None, wait: bool = True) -> int:
        """Queue one result message (durable, in order); the engine adds ``job_id``, ``seq`` and ``final``.

        With ``checkpoint``, the message and the checkpoint reach disk in one transaction. ``wait`` false: return
        before that, with a generation for ``wait_durable`` (a job overlaps its next work with the disk write)."""

    def wait_durable(self, generation: int) -> None:
        """Block until what ``publish_result(..., wait=False)`` stored is on disk."""

    def check(self) -> None:
        """Raise JobCanceled or JobTimedOut when the job must stop; cheap, call it between units of work."""

    def wait_for_disk(self, error: Optional[BaseException] = None) -> None:
        """A write of the job's own (an output file) failed with ``error`` (ENOSPC): pause while the node is short of
        disk space (the job's status shows ``paused: disk_full``), then return so the job writes again. Raises
        JobCanceled/JobTimedOut meanwhile."""

    def remaining_s(self) -> Optional[float]:
        """Seconds left before the timeout, or None without one."""


class JobHandler(ABC):
    """Base of every job type. Subclasses set the class attributes and implement ``run``."""

    type: ClassVar[str]
    params_model: ClassVar[type[BaseModel]] = NoParams
    # The model of one entry of a result chunk's `items`, for job types that stream items (documented by `make docs`).
    result_item_model: ClassVar[Optional[type[BaseModel]]] = None
    description: ClassVar[str] = ""
    # Control jobs (info, cancel, config) run on their own lane so they answer while workers are busy.
    control: ClassVar[bool] = False
    effects: ClassVar[Effects] = Effects.none

    def resumable(self, params: Any) -> bool:
        """Whether an interrupted run of these params can continue from its last checkpoint."""
        return False

    def effects_of(self, params: Any) -> Effects:
        """What a run of these params changes (default: the class's ``effects``)."""
        return self.effects

    @abstractmethod
    def run(self, ctx: JobContext) -> Optional[dict[str, Any]]:
        """Do the work. The returned dict (if any) is published as the final result message."""
