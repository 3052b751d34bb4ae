"""HTTP PUT of outputs to the job's ``upload_url`` (an object store's pre-signed URL prefix, a WebDAV share...)."""

from __future__ import annotations

from pathlib import Path
from typing import Union

from agent.inference.config import InferenceConfig


class UploadError(Exception):
    pass


def target(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def put(base: str, name: str, body: Union[bytes, Path], content_type: str, cfg: InferenceConfig) -> str:
    """PUT ``body`` (bytes, or a file streamed from disk) to ``{base}/{name}``; returns the URL. Raises UploadError."""
    import requests

    url = target(base, name)
    try:
        if isinstance(body, Path):
            with open(body, "rb") as f:
                r = requests.put(url, data=f, headers={"Content-Type": content_type},
                                 timeout=(cfg.connect_timeout_s, cfg.upload_timeout_s))
        else:
            r = requests.put(url, data=body, headers={"Content-Type": content_type},
                             timeout=(cfg.connect_timeout_s, cfg.upload_timeout_s))
    except requests.RequestException as e:
        raise UploadError(f"PUT {url} failed: {type(e).__name__}: {e}") from None
    if not 200 <= r.status_code < 300:
        raise UploadError(f"PUT {url} answered HTTP {r.status_code} {r.reason or ''}".rstrip())
    return url
