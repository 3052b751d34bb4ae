"""The HTTP API (FastAPI): jobs, predictions, node, models, streams, health and metrics, and the web console.

Jobs go through the same intake as MQTT requests (``Intake.submit_local``): the same validation and error codes,
the same durable state, and the same status/result messages on the node's MQTT topics. This module only
translates between HTTP and those calls. See docs/http.md.
"""

import asyncio
import base64
import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path as FsPath
from typing import TYPE_CHECKING, Annotated, Any, AsyncIterator, Optional

from fastapi import Depends, FastAPI, File, Header, Path, Query, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.routing import APIRouter
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent import __version__
from agent.httpapi.history import MAX_JOBS, MAX_STATUSES, VERSIONS_PER_JOB, encode_status
from agent.httpapi.metrics import NodeMetrics
from agent.httpapi.problems import (
    PROBLEM_MEDIA_TYPE,
    STATUS_OF_CODE,
    Problem,
    ProblemError,
    problem_body,
    problem_responses,
)
from agent.intake import RequestRefused
from agent.jobs.base import JobError
from agent.protocol import TERMINAL_STATES, JobRequest, JobState, is_safe_job_id

if TYPE_CHECKING:
    from agent.httpapi.service import HttpService
    from agent.node import Node

log = logging.getLogger("cv_worker.http")

STATIC = FsPath(__file__).resolve().parent / "static"
MULTIPART_SLACK = 64 * 1024
KEEPALIVE_S = 15.0
DRAIN_MAX_BYTES = 16 * 2**20  # an oversized chunked body is read to its end (and dropped) up to this much
TERMINAL = {s.value for s in TERMINAL_STATES}
_ITEM_ID_BAD = re.compile(r"[^A-Za-z0-9._-]+")
_VERSION = re.compile(r"[0-9]{1,18}")
EVENTS_DESCRIPTION = (
    "Every version of the job's status once, in version order: `event: status`, `id:` the version, data the "
    "JobStatus exactly as on MQTT. First the versions after the `Last-Event-ID` header (from version 1 without it), "
    "then each new version as the job changes. Versions are replayed from memory (the last "
    f"{VERSIONS_PER_JOB} of each of the {MAX_JOBS:,} most recently changed jobs, {MAX_STATUSES:,} in all); in place "
    "of versions that are not there any more (or never were: from before the agent restarted) comes an "
    '`event: gap` (no id) with data `{"from": first_missing, "to": last_missing}`, so a client never misses a '
    "change without knowing; the current version is always sent. After the status of a terminal state, `event: end` "
    'with data `{"state": ...}`, then the stream closes; `{"state": null, "reason": "pruned"}` when the job was '
    f"pruned meanwhile. A comment line every {KEEPALIVE_S:.0f} s keeps a quiet stream open. See docs/http.md."
)


# -- response models (what the OpenAPI spec promises) ----------------------------------------------------------


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class JobLinks(BaseModel):
    self: str = Field(description="This job (poll it).")
    result: str = Field(description="Its stored result messages.")
    events: str = Field(description="Server-sent events of its status changes.")


class JobView(_Open):
    """A job as the node keeps it (``params`` only on ``GET /v1/jobs/{id}``, long strings shortened)."""

    job_id: str
    type: str
    state: JobState
    version: int
    progress: Optional[float] = None
    details: dict[str, Any] = Field(default_factory=dict)
    error: Optional[dict[str, Any]] = None
    created: Optional[float] = None
    started: Optional[float] = None
    finished: Optional[float] = None
    updated: Optional[float] = None
    source: Optional[str] = Field(None, description="`mqtt` or `http`: where the request came from.")
    links: JobLinks


class JobList(BaseModel):
    jobs: list[JobView] = Field(description="Newest first.")
    total: int = Field(description="Jobs matching the filters (the list may be cut at `limit`).")
    by_state: dict[str, int] = Field(description="All jobs in local state, by state.")


class JobResults(BaseModel):
    job_id: str
    state: JobState
    complete: bool = Field(description="True when the job ended and every result message is here.")
    results: list[dict[str, Any]] = Field(description="The result messages in `seq` order, as sent on MQTT.")


class Prediction(_Open):
    """``POST /v1/predict/{model}?wait=true`` when the job succeeded."""

    job_id: str
    state: JobState
    model: Optional[str] = None
    version: Optional[str] = None
    task: Optional[str] = None
    backend: Optional[str] = None
    device: Optional[str] = None
    image: dict[str, Any] = Field(description="The image's result item: width, height, detections (box = x1, y1, "
                                  "x2, y2 in image pixels), classes or mask, inference_ms.")
    links: JobLinks


class Health(BaseModel):
    status: str = Field(description="`ok`, or `failing` (then the answer is 503).")
    node_id: str
    version: str
    uptime_s: float
    mqtt_connected: bool


# -- helpers -----------------------------------------------------------------------------------------------------


def links(job_id: str) -> dict[str, str]:
    base = f"/v1/jobs/{job_id}"
    return {"self": base, "result": f"{base}/result", "events": f"{base}/events"}


def _trim(value: Any, limit: int = 1024) -> Any:
    """Params as shown over HTTP: an inline image (base64) would make a job listing megabytes long."""
    if isinstance(value, str) and len(value) > limit:
        return f"<{len(value)} characters not shown>"
    if isinstance(value, dict):
        return {k: _trim(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return [_trim(v, limit) for v in value]
    return value


def job_view(job: dict[str, Any], params: Optional[Any] = None) -> dict[str, Any]:
    keys = ("job_id", "type", "state", "version", "progress", "details", "error", "created", "started", "finished",
            "updated", "source", "pool", "priority", "timeout_s")
    out = {k: job.get(k) for k in keys}
    out["details"] = out["details"] or {}
    out["links"] = links(job["job_id"])
    if params is not None:
        out["params"] = _trim(params)
    return out


def status_frame(version: int, data: str) -> str:
    return f"id: {version}\nevent: status\ndata: {data}\n\n"


def gap_frame(first: int, last: int) -> str:
    return f"event: gap\ndata: {json.dumps({'from': first, 'to': last})}\n\n"


def new_job_id() -> str:
    return uuid.uuid4().hex


def job_id_of(body: bytes) -> str:
    """The request's own ``job_id`` (a client-chosen id makes a retried POST idempotent), else a new one."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return new_job_id()  # the intake answers invalid_json
    jid = data.get("job_id") if isinstance(data, dict) else None
    if jid is None:
        return new_job_id()
    if not isinstance(jid, str) or not is_safe_job_id(jid):
        raise ProblemError("invalid_job_id", "job_id must be 1-128 characters of letters, digits, '.', '_' or '-' and "
                           "start with a letter or digit")
    return jid


def item_id_of(filename: Optional[str]) -> str:
    stem = FsPath(filename or "").name
    clean = _ITEM_ID_BAD.sub("_", stem).strip("._-")[:128]
    return clean if clean and clean[0].isalnum() else "image"


class BodyLimit:
    """Refuses request bodies above the limit with 413 ``payload_too_large``, by Content-Length and by counting
    what arrives (a chunked upload has no length), before any of it is parsed."""

    def __init__(self, app: ASGIApp, limit_for: Any):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit: int = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            # Nothing is parsed; a moderately oversized body is still read and dropped, so that the client reads
            # the 413 rather than a reset connection (closing a socket with unread data resets it).
            if int(declared) <= DRAIN_MAX_BYTES:
                await _drain(receive, True)
            await self._refuse(scope, send, limit, int(declared))
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > limit:
                    await _drain(receive, msg.get("more_body", False))  # as above, for a chunked body
                    raise StarletteHTTPException(413, detail=_too_large(limit, None))
            return msg

        await self.app(scope, counted, send)

    async def _refuse(self, scope: Scope, send: Send, limit: int, size: int) -> None:
        body = json.dumps(problem_body("payload_too_large", _too_large(limit, size), 413, scope["path"])).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", PROBLEM_MEDIA_TYPE.encode()),
                                (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


async def _drain(receive: Receive, more: bool) -> None:
    """Read and drop the rest of a request body, at most ``DRAIN_MAX_BYTES``."""
    drained = 0
    while more and drained < DRAIN_MAX_BYTES:
        msg = await receive()
        if msg["type"] != "http.request":
            return
        drained += len(msg.get("body", b""))
        more = msg.get("more_body", False)


def _too_large(limit: int, size: Optional[int]) -> str:
    got = f"the body is {size} bytes; " if size is not None else "the body is too large; "
    return (got + f"this endpoint accepts at most {limit} bytes ([http] max_body_bytes, or inference.max_image_bytes "
            "for image uploads)")


# -- the app -------------------------------------------------------------------------------------------------------


def create_app(node: "Node", service: "HttpService") -> FastAPI:
    cfg = service.cfg
    state = node.state
    metrics = NodeMetrics(node)
    body_limit = cfg.max_body_bytes or node.config.jobs.max_payload_bytes
    upload_limit = node.config.inference.max_image_bytes + MULTIPART_SLACK

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.on_loop_started(asyncio.get_running_loop())
        yield
        metrics.close()

    app = FastAPI(
        title="cv-worker node API", version=__version__, lifespan=lifespan,
        openapi_url=None, docs_url=None, redoc_url=None,  # /openapi.json is served below, behind the token
        description="Local HTTP interface of one cv-worker node: submit and follow jobs (the same jobs as on MQTT), "
        "run a model on an uploaded image, watch streams. Send `Authorization: Bearer <token>` (the token is in the "
        "node's `[http] token_file`, default `<state_dir>/http-token`). Errors are RFC 9457 problem details whose "
        "`code` is the MQTT protocol's error code. See docs/http.md.",
    )
    app.add_middleware(BodyLimit, limit_for=lambda path: upload_limit if path.startswith("/v1/predict/")
                       else body_limit)

    # -- errors -------------------------------------------------------------------------------------------------

    def problem(request: Request, code: str, detail: str, status: int, headers: Optional[dict[str, str]] = None,
                **extra: Any) -> JSONResponse:
        return JSONResponse(problem_body(code, detail, status, request.url.path, **extra), status_code=status,
                            media_type=PROBLEM_MEDIA_TYPE, headers=headers)

    @app.exception_handler(ProblemError)
    async def _problem(request: Request, e: ProblemError) -> JSONResponse:
        headers = {"WWW-Authenticate": 'Bearer realm="cv-worker"'} if e.status == 401 else None
        return problem(request, e.code, e.detail, e.status, headers, **e.extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        code = "invalid_json" if any(err.get("type") == "json_invalid" for err in errors) else "invalid_request"
        parts = []
        for err in errors[:10]:
            loc = ".".join(str(p) for p in err.get("loc", ())) or "(request)"
            parts.append(f"{loc}: {err.get('msg')}")
        return problem(request, code, "invalid request: " + "; ".join(parts), STATUS_OF_CODE[code])

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {401: "unauthorized", 404: "not_found", 413: "payload_too_large"}.get(e.status_code, "invalid_request")
        if e.status_code >= 500:
            code = "internal_error"
        detail = e.detail if isinstance(e.detail, str) and e.status_code != 404 else \
            f"no such endpoint: {request.method} {request.url.path} (see /openapi.json)"
        if e.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path} (see /openapi.json)"
        return problem(request, code, detail, e.status_code, dict(e.headers or {}) or None)

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        log.exception("HTTP %s %s failed", request.method, request.url.path)
        return problem(request, "internal_error", f"{type(e).__name__}: {e}", 500)

    # -- auth ---------------------------------------------------------------------------------------------------

    bearer = HTTPBearer(auto_error=False, description="The token from the node's `[http] token_file`. GET requests "
                        "may pass it as `?access_token=` instead (<img> and EventSource cannot set headers).")

    def require_token(request: Request, creds: Annotated[Optional[HTTPAuthorizationCredentials], Depends(bearer)]
                      ) -> None:
        given = creds.credentials if creds is not None else None
        if given is None and request.method in ("GET", "HEAD"):
            given = request.query_params.get("access_token")
        if not service.check_token(given):
            raise ProblemError("unauthorized", "a valid bearer token is required: send `Authorization: Bearer "
                               f"<token>` with the token in the node's {service.token_path.name} file "
                               "([http] token_file)" if given is None else "the bearer token is not valid")

    auth = [Depends(require_token)]
    api = APIRouter(prefix="/v1", dependencies=auth, responses=problem_responses(401, 413, 422, 500))

    # -- jobs ---------------------------------------------------------------------------------------------------

    async def submit(job_id: str, body: bytes) -> tuple[dict[str, Any], bool]:
        try:
            return await run_in_threadpool(node.intake.submit_local, job_id, body, "http")
        except RequestRefused as e:
            raise ProblemError(e.code.value, e.message) from None

    async def wait_for_end(job_id: str, timeout: float) -> Optional[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            ev = service.notifier.event()
            job = state.get_job(job_id)
            if job is None or job["state"] in TERMINAL:
                await run_in_threadpool(state.wait_durable)  # answer only what a restart would also show
                return job
            remaining = deadline - loop.time()
            if remaining <= 0 or service.closing.is_set():
                return job
            try:
                await asyncio.wait_for(ev.wait(), min(remaining, 1.0))
            except asyncio.TimeoutError:
                pass

    def get_job_or_404(job_id: str) -> dict[str, Any]:
        job = state.get_job(job_id)
        if job is None:
            raise ProblemError("not_found", f"no job {job_id[:128]!r} on node {node.node_id} (finished jobs are pruned "
                               "after jobs.retention_count / retention_days)")
        return job

    @api.post(
        "/jobs", status_code=202, response_model=JobView, summary="Submit a job",
        responses={200: {"model": JobView, "description": "A job with this `job_id` exists already; it is returned "
                         "as it is (a retried POST does not run a job twice)."},
                   **problem_responses(400)},
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": JobRequest.model_json_schema(ref_template="#/components/schemas/{model}")}}}},
    )
    async def submit_job(request: Request, response: Response) -> Any:
        """A job request exactly as on MQTT (`type`, `params`, optional `job_id`, `timeout_s`, `priority`). It is
        validated like an MQTT request and its status goes out on `N/jobs/{job_id}/status` too. Without `job_id`
        the node picks one. Answers 202 with the job and its URLs."""
        body = await request.body()
        job_id = job_id_of(body)
        job, new = await submit(job_id, body)
        response.status_code = 202 if new else 200
        response.headers["Location"] = links(job_id)["self"]
        return job_view(job)

    @api.get("/jobs", response_model=JobList, summary="List jobs")
    def list_jobs(
        state_: Annotated[Optional[JobState], Query(alias="state", description="Only jobs in this state.")] = None,
        type_: Annotated[Optional[str], Query(alias="type", max_length=64, description="Only this job type.")] = None,
        source: Annotated[Optional[str], Query(max_length=16, description="`mqtt` or `http`.")] = None,
        limit: Annotated[int, Query(ge=1, le=1000, description="At most this many, newest first.")] = 50,
    ) -> Any:
        jobs = [j for j in state.all_jobs()
                if (state_ is None or j["state"] == state_.value) and (type_ is None or j["type"] == type_)
                and (source is None or j.get("source") == source)]
        jobs.sort(key=lambda j: j.get("created") or 0, reverse=True)
        return {"jobs": [job_view(j) for j in jobs[:limit]], "total": len(jobs), "by_state": state.job_state_counts()}

    JobId = Annotated[str, Path(description="The job id.", max_length=128)]

    @api.get("/jobs/{job_id}", response_model=JobView, responses=problem_responses(404), summary="One job")
    def get_job(job_id: JobId) -> Any:
        """The job's current status (poll this), with its params (long strings such as inline images shortened)."""
        return job_view(get_job_or_404(job_id), params=state.get_params(job_id) or {})

    @api.get("/jobs/{job_id}/result", response_model=JobResults, responses=problem_responses(404),
             summary="A job's results")
    def get_result(job_id: JobId,
                   from_seq: Annotated[int, Query(ge=0, description="Only result messages with this seq or later.")]
                   = 0) -> Any:
        job = get_job_or_404(job_id)
        results = [r for r in state.read_results(job_id) if r.get("seq", 0) >= from_seq]
        ended = job["state"] in TERMINAL
        complete = ended and (job["state"] != JobState.SUCCEEDED.value or any(r.get("final") for r in results)
                              or from_seq > 0)
        return {"job_id": job_id, "state": job["state"], "complete": complete, "results": results}

    @api.delete("/jobs/{job_id}", response_model=JobView, responses=problem_responses(404, 409), summary="Cancel")
    def cancel_job(job_id: JobId) -> Any:
        """Cancel a queued or running job (like `job.cancel`). 409 `not_cancelable` when it already ended."""
        try:
            return job_view(node.engine.cancel(job_id))
        except JobError as e:
            raise ProblemError(e.code, e.message) from None

    @api.get("/jobs/{job_id}/events", summary="Follow a job (server-sent events)", description=EVENTS_DESCRIPTION,
             responses={200: {"description": "`text/event-stream`: `status` events (id: the version), `gap` events "
                              "for versions no longer known, then `end`.",
                              "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                        **problem_responses(404)})
    async def job_events(
        job_id: JobId,
        last_event_id: Annotated[Optional[str], Header(
            alias="Last-Event-ID", description="The last version the client has (EventSource sends it when it "
            "reconnects): only later versions are sent.")] = None,
    ) -> StreamingResponse:
        get_job_or_404(job_id)
        given = (last_event_id or "").strip()
        last = int(given) if _VERSION.fullmatch(given) else 0

        def catch_up(after: int, job: Optional[dict[str, Any]]) -> tuple[bytes, int]:
            """Frames for every version after ``after`` up to the job's current one (when the job was pruned, up to
            the last one recorded), with a gap for each run of versions no longer known; and the last version sent.
            Nothing newer than the state's own version: a recorded status of a transaction still open is not sent."""
            upto = job["version"] if job is not None else None
            out: list[str] = []
            expected = after + 1
            for event in service.history.after(job_id, after, upto):
                if event.version > expected:
                    out.append(gap_frame(expected, event.version - 1))
                out.append(status_frame(event.version, event.data))
                expected = event.version + 1
            if job is not None and expected <= job["version"]:
                # The current version is always known, from the state, even when it predates this agent's start.
                if expected < job["version"]:
                    out.append(gap_frame(expected, job["version"] - 1))
                status = encode_status(node.engine.status_of(job).model_dump(mode="json"))
                out.append(status_frame(job["version"], status))
                expected = job["version"] + 1
            return "".join(out).encode(), expected - 1

        async def events() -> AsyncIterator[bytes]:
            sent = last
            loop = asyncio.get_running_loop()
            quiet_since = loop.time()
            while not service.closing.is_set():
                ev = service.notifier.event()
                job = state.get_job(job_id)
                if job is None or job["version"] > sent:
                    frames, sent = catch_up(sent, job)
                    if frames:
                        yield frames
                        quiet_since = loop.time()
                if job is None:
                    yield b'event: end\ndata: {"state":null,"reason":"pruned"}\n\n'
                    return
                if job["state"] in TERMINAL:
                    yield f"event: end\ndata: {json.dumps({'state': job['state']})}\n\n".encode()
                    return
                try:
                    await asyncio.wait_for(ev.wait(), 1.0)
                except asyncio.TimeoutError:
                    if loop.time() - quiet_since >= KEEPALIVE_S:
                        quiet_since = loop.time()
                        yield b": keepalive\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- predict ------------------------------------------------------------------------------------------------

    @api.post(
        "/predict/{model}", summary="Run a model on one uploaded image",
        responses={200: {"model": Prediction, "description": "`?wait=true` and the job succeeded."},
                   202: {"model": JobView, "description": "The `infer` job was queued (or `wait` ran out first)."},
                   **problem_responses(404, 409, 504)},
    )
    async def predict(
        model: Annotated[str, Path(description="Installed model name, e.g. `blazeface`.", max_length=64)],
        image: Annotated[UploadFile, File(description="The image (JPEG, PNG, BMP, WebP, TIFF...).")],
        wait: Annotated[bool, Query(description="Answer with the result (up to `[http] wait_max_s`).")] = False,
        threshold: Annotated[Optional[float], Query(description="Least score kept; default the model's own.")] = None,
        top_k: Annotated[Optional[int], Query(description="Classifiers: the k best classes.")] = None,
        max_detections: Annotated[Optional[int], Query(description="Keep at most this many detections.")] = None,
        classes: Annotated[Optional[list[str]], Query(description="Keep only these labels (repeatable).")] = None,
        timeout_s: Annotated[Optional[float], Query(description="Job timeout, seconds.")] = None,
    ) -> Any:
        """Creates an ordinary `infer` job with the image as inline `data`: same limits (inference.max_image_bytes,
        max_image_pixels) and error codes as over MQTT, and the job shows on the node's MQTT status topic."""
        limit = node.config.inference.max_image_bytes
        raw = await image.read(limit + 1)
        if len(raw) > limit:
            raise ProblemError("too_large", f"the image is larger than the {limit / 2**20:.1f} MiB limit "
                               "(inference.max_image_bytes)")
        params: dict[str, Any] = {"model": model, "images": [{"id": item_id_of(image.filename),
                                                               "data": base64.b64encode(raw).decode()}]}
        for k, v in (("threshold", threshold), ("top_k", top_k), ("max_detections", max_detections),
                     ("classes", classes)):
            if v is not None:
                params[k] = v
        req: dict[str, Any] = {"type": "infer", "params": params}
        if timeout_s is not None:
            req["timeout_s"] = timeout_s
        job_id = new_job_id()
        del raw
        job, _ = await submit(job_id, json.dumps(req).encode())
        if wait:
            job = await wait_for_end(job_id, cfg.wait_max_s) or job
        if not wait or job["state"] not in TERMINAL:
            return JSONResponse(job_view(job), status_code=202, headers={"Location": links(job_id)["self"]})
        return await run_in_threadpool(prediction_of, job)

    def prediction_of(job: dict[str, Any]) -> dict[str, Any]:
        job_id = job["job_id"]
        results = state.read_results(job_id)
        items = [i for r in results for i in r.get("items", [])]
        final = next((r for r in reversed(results) if r.get("final")), {})
        if job["state"] == JobState.SUCCEEDED.value and items and items[0].get("ok"):
            return {"job_id": job_id, "state": job["state"], "model": final.get("model"),
                    "version": final.get("version"), "task": final.get("task"), "backend": final.get("backend"),
                    "device": final.get("device"), "image": items[0], "links": links(job_id)}
        err = job.get("error") or {}
        bad = next((i for i in items if not i.get("ok") and i.get("error")), None)
        if bad is not None:  # the image's own error says more than the job's "no images processed"
            raise ProblemError(bad["error"]["code"], bad["error"]["message"], job_id=job_id, job_state=job["state"])
        raise ProblemError(err.get("code") or "internal_error", err.get("message") or f"the job ended {job['state']}",
                           job_id=job_id, job_state=job["state"])

    # -- node, models, streams ----------------------------------------------------------------------------------

    @api.get("/node", summary="This node", response_model=_Open)
    def get_node() -> Any:
        """What the birth message says (identity, accelerators, models, capabilities, pools) and live figures:
        uptime, MQTT connection, job counts, outbox."""
        return node.info()

    @api.get("/models", summary="Installed models", response_model=_Open)
    def get_models() -> Any:
        from agent.stats import MODEL_METRICS

        figures = MODEL_METRICS.snapshot()
        mm = getattr(node, "_model_manager", None)
        loaded = mm.loaded() if mm is not None else {}
        out = []
        for m in node.models():
            name = m.get("name")
            entry = {**m, "serving": loaded.get(name), "inference": figures.get(name)}
            if name in loaded and mm is not None:
                try:
                    with mm.acquire(name) as p:
                        entry.update(backend=p.model.backend, device=p.model.device, task=p.manifest.task,
                                     labels=list(p.labels or [])[:1000])
                except Exception:
                    pass
            out.append(entry)
        return {"models": out}

    @api.get("/streams", summary="Running streams", response_model=_Open)
    def get_streams() -> Any:
        return {"streams": node.streams.list()}

    def stream_or_404(stream_id: str) -> Any:
        s = node.streams.get(stream_id)
        if s is None:
            raise ProblemError("not_found", f"no stream {stream_id[:128]!r} on node {node.node_id} "
                               "(GET /v1/streams lists them)")
        return s

    StreamId = Annotated[str, Path(description="The stream id.", max_length=128)]

    def render(latest: Any, width: int, quality: int) -> bytes:
        from agent.streams.snapshot import render_jpeg

        frame, dets, _, _ = latest
        return render_jpeg(frame, dets, quality, width)

    @api.get("/streams/{stream_id}/snapshot.jpg", summary="The stream's latest frame, boxes drawn",
             responses={200: {"content": {"image/jpeg": {}}, "description": "JPEG"}, **problem_responses(404, 503)},
             response_class=Response)
    async def snapshot(stream_id: StreamId,
                       width: Annotated[int, Query(ge=32, le=4096, description="Largest width.")] = 1280,
                       quality: Annotated[int, Query(ge=10, le=95)] = 80) -> Response:
        s = stream_or_404(stream_id)
        latest = s.latest()
        if latest is None:
            raise ProblemError("not_ready", f"stream {stream_id} has not processed a frame yet (state: {s.state}); "
                               "try again in a moment")
        jpeg = await run_in_threadpool(render, latest, width, quality)
        # The boxes drawn, as data too (like the MQTT snapshot's `detections` user property).
        return Response(jpeg, media_type="image/jpeg", headers={
            "Cache-Control": "no-store", "X-Frame": str(latest[2]),
            "X-Detections": json.dumps(latest[1], separators=(",", ":"))})

    @api.get("/streams/{stream_id}/mjpeg", summary="Live annotated view (MJPEG)",
             responses={200: {"content": {"multipart/x-mixed-replace": {}}, "description": "One JPEG part per "
                              "processed frame, boxes drawn; open it in an <img> or a browser tab."},
                        **problem_responses(404)},
             response_class=StreamingResponse)
    async def mjpeg(stream_id: StreamId,
                    fps: Annotated[float, Query(gt=0, le=60, description="Frames per second at most (capped by "
                                       "[http] mjpeg_max_fps).")] = 5.0,
                    width: Annotated[int, Query(ge=32, le=4096)] = 640,
                    quality: Annotated[int, Query(ge=10, le=95)] = 70) -> Any:
        stream_or_404(stream_id)
        interval = 1.0 / min(fps, cfg.mjpeg_max_fps)

        async def parts() -> AsyncIterator[bytes]:
            last_frame = -1
            while not service.closing.is_set():
                s = node.streams.get(stream_id)
                if s is None:
                    return  # stopped: the browser shows the last frame
                latest = s.latest()
                if latest is not None and latest[2] != last_frame:
                    last_frame = latest[2]
                    jpeg = await run_in_threadpool(render, latest, width, quality)
                    yield (b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: " + str(len(jpeg)).encode()
                           + b"\r\n\r\n" + jpeg + b"\r\n")
                await asyncio.sleep(interval)

        return StreamingResponse(parts(), media_type="multipart/x-mixed-replace; boundary=frame",
                                 headers={"Cache-Control": "no-store"})

    app.include_router(api)

    # -- open endpoints -----------------------------------------------------------------------------------------

    @app.get("/healthz", response_model=Health, summary="Liveness (no token)", responses=problem_responses(503))
    def healthz() -> Any:
        """200 while the agent's loops run; 503 when one died (a supervisor should restart the agent). A broker
        that is down does not make the node unhealthy: restarting would not bring it back."""
        alive = {t.name: t.is_alive() for t in node.engine._threads}
        intake = node.intake._thread
        ok = bool(alive.get("job-control") and alive.get("job-watch") and intake is not None and intake.is_alive()
                  and any(v for k, v in alive.items() if k.startswith("job-worker")))
        body = {"status": "ok" if ok else "failing", "node_id": node.node_id, "version": __version__,
                "uptime_s": round(time.time() - node.started_at, 1),
                "mqtt_connected": bool(node.link is not None and node.link.connected.is_set())}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics (no token)",
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format 0.0.4"}},
             response_class=Response)
    def prometheus() -> Response:
        data, ctype = metrics.render()
        return Response(data, media_type=ctype)

    @app.get("/openapi.json", include_in_schema=False, dependencies=auth)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    # -- the console --------------------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def console() -> FileResponse:
        """The page holds no node data (it asks for the token and calls the API), so it loads without one."""
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/console", StaticFiles(directory=STATIC), name="console")

    # The Problem schema is referenced by every error response.
    original_openapi = app.openapi

    def openapi_with_problem() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = original_openapi()
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(JobRequest.model_json_schema(ref_template="#/components/schemas/{model}").get("$defs", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi_with_problem  # type: ignore[method-assign]
    return app
