"""Turns request messages into accepted or rejected jobs, durably, before acknowledging them.

The MQTT network thread only queues messages here. The intake thread takes whatever has arrived, validates each
message, records the outcome of the whole batch in one state transaction, waits for it to be on disk, and only
then sends the PUBACKs (paho manual ack): a crash after a PUBACK can never lose a job, and one fsync covers many
requests. Every message gets an answer: a job status, or a message on ``N/errors`` when no job id can be read.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from typing import TYPE_CHECKING, Any, Optional

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from agent.engine import encode_correlation
from agent.jobs import registry
from agent.jobs.base import JobHandler
from agent.memtrim import release_free_memory
from agent.mqtt import valid_publish_topic
from agent.protocol import ErrorCode, ErrorInfo, JobRequest, JobState, NodeError, is_safe_job_id, now
from agent.state import DiskFull

if TYPE_CHECKING:
    from agent.node import Node

log = logging.getLogger("cv_worker.intake")

MAX_BATCH = 500
# Payload bytes one batch holds at most: what the intake keeps in memory at once besides what MQTT buffers.
MAX_BATCH_BYTES = 64 * 1024 * 1024
# After a batch this large, freed memory is handed back to the system (agent/memtrim.py).
LARGE_BATCH_BYTES = 16 * 1024 * 1024


def describe_validation_error(e: ValidationError, what: str) -> str:
    """One line per problem, with the field path: what a controller author needs to fix the request."""
    parts = []
    for err in e.errors()[:10]:
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"{loc}: {err['msg']}")
    more = f" (and {len(e.errors()) - 10} more)" if len(e.errors()) > 10 else ""
    return f"invalid {what}: " + "; ".join(parts) + more


def _type_of(payload: bytes) -> str:
    """The job type a refused payload names, when it can be read (for the REJECTED status)."""
    try:
        t = json.loads(payload).get("type")
    except (ValueError, AttributeError, RecursionError):
        return "unknown"
    return t if isinstance(t, str) and 0 < len(t) <= 64 else "unknown"


def _disk_full_message(node: "Node", what: str) -> str:
    st = node.config.storage
    return (f"node {node.node_id} is short of disk space in its state directory: {what}; it takes work again by "
            f"itself once {st.free_resume_mb:g} MB are free (storage.free_low_mb / free_resume_mb)")


def tombstone_view(job_id: str, tomb: dict[str, Any]) -> dict[str, Any]:
    """A pruned job as a job document with what its tombstone kept."""
    error = tomb.get("error")
    return {"job_id": job_id, "type": tomb.get("type"), "state": tomb["state"], "version": tomb["version"],
            "progress": None, "details": {"pruned": True}, "finished": tomb.get("finished"),
            "updated": tomb.get("finished"), "error": {"code": error, "message": "(its record was pruned)"}
            if error else None}


class RequestRefused(Exception):
    """A request that cannot become a job: ``code`` is the protocol's error code."""

    def __init__(self, code: ErrorCode, message: str, job_type: str = "unknown"):
        super().__init__(message)
        self.code = code
        self.message = message
        self.job_type = job_type


class Intake:
    def __init__(self, node: "Node"):
        self.node = node
        self._q: "queue.Queue[Optional[tuple[mqtt.MQTTMessage, int]]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self.accepted = 0
        self.rejected = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="intake", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._q.put(None)
        if self._thread:
            self._thread.join(5)

    def submit(self, msg: mqtt.MQTTMessage, epoch: int) -> None:
        """Called on the MQTT network thread: just queue."""
        self._q.put((msg, epoch))

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            payload_bytes = 0
            try:
                payload_bytes = self._process(batch)
            except Exception:
                log.exception("intake failed on a batch of %d messages", len(batch))
            del batch  # the payloads must be unreferenced before their memory can go back
            if payload_bytes >= LARGE_BATCH_BYTES:
                release_free_memory()

    def _take_batch(self) -> Optional[list[tuple[mqtt.MQTTMessage, int]]]:
        """Whatever has arrived, up to MAX_BATCH requests or MAX_BATCH_BYTES of payload; None when stopping."""
        first = self._q.get()
        if first is None:
            return None
        batch = [first]
        size = len(first[0].payload)
        while len(batch) < MAX_BATCH and size < MAX_BATCH_BYTES:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._q.put(None)
                break
            batch.append(item)
            size += len(item[0].payload)
        return batch

    def _process(self, batch: list[tuple[mqtt.MQTTMessage, int]]) -> int:
        """Record a batch of requests, durably, then acknowledge them. Returns the bytes of their payloads."""
        state = self.node.state
        to_dispatch: list[dict[str, Any]] = []
        with state.transaction():
            for msg, _ in batch:
                try:
                    job = self._handle(msg)
                except Exception as e:  # a bug must still give the sender an answer
                    log.exception("error on request %s", msg.topic)
                    self._node_error(msg.topic, ErrorCode.internal_error, f"{type(e).__name__}: {e}")
                    job = None
                if job is not None:
                    to_dispatch.append(job)
        state.wait_durable()
        log.debug("intake batch of %d requests durable, %d to run", len(batch), len(to_dispatch))
        payload_bytes = sum(len(msg.payload) for msg, _ in batch)
        for msg, epoch in batch:
            self.node.link.ack(msg.mid, msg.qos, epoch)
        for job in to_dispatch:
            self.node.engine.dispatch(job)
        return payload_bytes

    def _node_error(self, topic: str, code: ErrorCode, message: str) -> None:
        err = NodeError(node_id=self.node.node_id, topic=topic[:1024],
                        error=ErrorInfo(code=code.value, message=message), ts=now())
        self.node.outbox.add(self.node.topics.errors, err.model_dump(mode="json"), kind="error")
        self.rejected += 1
        log.warning("request on %r refused: %s: %s", topic[:200], code.value, message)

    def _handle(self, msg: mqtt.MQTTMessage) -> Optional[dict[str, Any]]:
        """Validate one request; record it (accepted or rejected). Returns the job when it must run."""
        engine = self.node.engine
        parsed = self.node.topics.parse_request_topic(msg.topic)
        if parsed is None:
            # Only the node's own request filters are subscribed, so only a broker bug can deliver this.
            self._node_error(msg.topic, ErrorCode.invalid_request, "not a request topic of this node")
            return None
        job_id, pool = parsed
        if not is_safe_job_id(job_id):
            self._node_error(msg.topic, ErrorCode.invalid_job_id,
                             "the job id in the topic must be 1-128 characters of letters, digits, '.', '_' or '-' "
                             "and start with a letter or digit")
            return None

        response: Optional[tuple[str, Optional[str]]] = None
        props = getattr(msg, "properties", None)
        rt = getattr(props, "ResponseTopic", None) if props is not None else None
        if rt is not None:
            if valid_publish_topic(rt):
                response = (rt, encode_correlation(getattr(props, "CorrelationData", None)))
            else:
                log.warning("ignoring invalid response topic %r on job %s", str(rt)[:200], job_id)

        existing = self.node.state.get_job(job_id)
        if existing is not None and existing["state"] != JobState.REJECTED.value:
            engine.republish(existing, response)
            return None
        tomb = self.node.state.get_tombstone(job_id)
        if tomb is not None and tomb["state"] != JobState.REJECTED.value:
            engine.answer_tombstone(job_id, tomb, response)
            return None
        if msg.retain:
            if not msg.payload:
                # Someone cleared a retained request: the broker passes the empty message on; nothing to do.
                log.info("retained request on %s cleared", msg.topic[:200])
                return None
            self.rejected += 1
            engine.reject(job_id, _type_of(msg.payload), ErrorInfo(
                code=ErrorCode.retained_request.value,
                message="requests must not be retained: a retained request is delivered again to every new "
                        "subscriber and after every new session, so it would run again; publish it with retain=false "
                        "(and clear this one with an empty retained message on its topic)"), response)
            return None

        try:
            req, handler_cls = self.check_request(job_id, msg.payload, "the topic",
                                                  self.node.config.jobs.max_payload_bytes)
            self.check_capacity(req.type, handler_cls)
        except RequestRefused as e:
            self.rejected += 1
            engine.reject(job_id, e.job_type, ErrorInfo(code=e.code.value, message=e.message), response)
            return None
        try:
            job = engine.accept(job_id, req, handler_cls, pool, response)
        except DiskFull as e:
            self.node.disk.report(e)
            self.rejected += 1
            engine.reject(job_id, req.type, ErrorInfo(code=ErrorCode.disk_full.value, message=_disk_full_message(
                self.node, f"its params could not be stored ({e.strerror})")), response)
            return None
        self.accepted += 1
        return job

    def check_capacity(self, job_type: str, handler_cls: type[JobHandler]) -> None:
        """Refuse work the node has no room for: a state disk short of space, a full queue. Control jobs (status,
        cancel) are always taken, so a node under pressure still answers."""
        if handler_cls.control:
            return
        node = self.node
        if node.disk.refusing():
            raise RequestRefused(ErrorCode.disk_full, _disk_full_message(node, "it takes no new work"), job_type)
        limit = node.config.jobs.max_queued
        if node.state.job_state_counts().get(JobState.QUEUED.value, 0) >= limit:
            raise RequestRefused(ErrorCode.queue_full, f"{limit} jobs are already queued on node {node.node_id} "
                                 "(jobs.max_queued); submit it again later or to another node of its pool", job_type)

    def check_request(self, job_id: str, payload: bytes, id_from: str,
                      limit: Optional[int]) -> tuple[JobRequest, type[JobHandler]]:
        """Validate one request payload for ``job_id`` (taken from ``id_from``: "the topic", "the request"...);
        raises RequestRefused with the protocol's error code. Shared by MQTT and the HTTP API, so both refuse alike.
        ``limit``: the largest payload (None: the caller limited it already)."""
        if limit is not None and len(payload) > limit:
            raise RequestRefused(ErrorCode.payload_too_large, f"payload is {len(payload)} bytes; this node accepts "
                                 f"at most {limit} (jobs.max_payload_bytes)")
        try:
            data = json.loads(payload)
        except (ValueError, RecursionError) as e:
            raise RequestRefused(ErrorCode.invalid_json, f"payload is not valid UTF-8 JSON: {str(e)[:200]}") from None
        if not isinstance(data, dict):
            raise RequestRefused(ErrorCode.invalid_request,
                                 f"payload must be a JSON object, got {type(data).__name__}")
        raw_type = data.get("type")
        job_type = raw_type if isinstance(raw_type, str) and 0 < len(raw_type) <= 64 else "unknown"
        try:
            req = JobRequest.model_validate(data)
        except ValidationError as e:
            raise RequestRefused(ErrorCode.invalid_request, describe_validation_error(e, "request"), job_type) from None
        if req.job_id is not None and req.job_id != job_id:
            raise RequestRefused(ErrorCode.job_id_mismatch, f"job_id {req.job_id[:200]!r} in the payload differs "
                                 f"from {job_id!r} in {id_from}", job_type)
        handler_cls = registry.get(req.type, self.node.realm) if self.node.accepts(req.type) else None
        if handler_cls is None:
            raise RequestRefused(ErrorCode.unknown_job_type, f"unknown job type {req.type[:64]!r}; this node "
                                 f"accepts: {', '.join(self.node.capabilities())}", job_type)
        try:
            # Strict, as JSON: "5" is not a number and `true` is not 1 (enums and the like still come as strings).
            handler_cls.params_model.model_validate_json(json.dumps(req.params), strict=True)
        except ValidationError as e:
            raise RequestRefused(ErrorCode.invalid_params, describe_validation_error(e, f"params for {req.type}"),
                                 job_type) from None
        return req, handler_cls

    def submit_local(self, job_id: str, payload: bytes, source: str) -> tuple[dict[str, Any], bool]:
        """A request that did not come over MQTT (the HTTP API): validated like an MQTT one, recorded and announced
        on the job's MQTT status topic in the same way, durable before this returns. Returns the job and whether
        it is new (False: a job with this id exists and is returned as it is, like a duplicate MQTT request).
        Raises RequestRefused; a refused local request is answered to its caller and not recorded."""
        state = self.node.state
        with state.transaction():
            existing = state.get_job(job_id)
            if existing is not None and existing["state"] != JobState.REJECTED.value:
                return existing, False
            tomb = state.get_tombstone(job_id)
            if tomb is not None and tomb["state"] != JobState.REJECTED.value:
                return tombstone_view(job_id, tomb), False
            try:
                # The HTTP server limits request bodies itself ([http] max_body_bytes, inference.max_image_bytes).
                req, handler_cls = self.check_request(job_id, payload, "the request", None)
                self.check_capacity(req.type, handler_cls)
                try:
                    job = self.node.engine.accept(job_id, req, handler_cls, None, None, source=source)
                except DiskFull as e:
                    self.node.disk.report(e)
                    raise RequestRefused(ErrorCode.disk_full, _disk_full_message(
                        self.node, f"its params could not be stored ({e.strerror})"), req.type) from None
            except RequestRefused as e:
                self.rejected += 1
                log.warning("%s request for job %s refused: %s: %s", source, job_id, e.code.value, e.message)
                raise
            self.accepted += 1
        state.wait_durable()
        self.node.engine.dispatch(job)
        return job, True
