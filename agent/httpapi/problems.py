"""Errors as RFC 9457 problem details (``application/problem+json``), with the MQTT protocol's error codes.

Every error answer has ``code`` (the same machine-readable code a job status or ``N/errors`` would carry), ``detail``
(what went wrong and what to do), ``status`` and ``title``. Only two codes exist on HTTP alone: ``unauthorized``
(no or wrong bearer token) and ``not_ready`` (e.g. a stream that has not processed a frame yet).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

PROBLEM_MEDIA_TYPE = "application/problem+json"

# HTTP status of each code; a code not listed (a job type's own failure code) answers 422.
STATUS_OF_CODE: dict[str, int] = {
    "invalid_json": 400,
    "invalid_request": 422,
    "invalid_params": 422,
    "unknown_job_type": 422,
    "payload_too_large": 413,
    "invalid_job_id": 422,
    "job_id_mismatch": 422,
    "not_found": 404,
    "not_cancelable": 409,
    "canceled": 409,
    "timed_out": 504,
    "interrupted": 409,
    "unsupported": 501,
    "internal_error": 500,
    "disk_full": 507,  # Insufficient Storage: the node takes work again once space is freed
    "queue_full": 429,
    "unauthorized": 401,
    "not_ready": 503,
    # Failure codes of `infer` items and jobs that say more than 422 does.
    "model_not_found": 404,
    "too_large": 413,
    "image_too_large": 413,
}


class Problem(BaseModel):
    """An error answer (RFC 9457 problem details)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="`urn:cv-worker:problem:<code>`.")
    title: str = Field(description="The HTTP status phrase.")
    status: int
    code: str = Field(description="Machine-readable reason: an error code of the MQTT protocol, `unauthorized` or "
                      "`not_ready`, or the failure code of the job (e.g. `model_not_found`, `not_an_image`).")
    detail: str = Field(description="What went wrong and what to do about it, for a person.")
    instance: Optional[str] = Field(None, description="The request path.")


class ProblemError(Exception):
    """Raise in an endpoint to answer with a problem."""

    def __init__(self, code: str, detail: str, status: Optional[int] = None, **extra: Any):
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.status = status or STATUS_OF_CODE.get(code, 422)
        self.extra = extra


def problem_body(code: str, detail: str, status: int, instance: Optional[str] = None, **extra: Any) -> dict[str, Any]:
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body: dict[str, Any] = {"type": f"urn:cv-worker:problem:{code}", "title": title, "status": status, "code": code,
                            "detail": detail}
    if instance is not None:
        body["instance"] = instance
    body.update(extra)
    return body


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these error statuses."""
    return {s: {"model": Problem, "description": HTTPStatus(s).phrase,
                "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
            for s in statuses}
