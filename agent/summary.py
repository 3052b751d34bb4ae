"""What a finished job keeps of its params: a small summary, so state does not grow with what requests carry.

A finished job never runs again, so its params only serve people reading it later (``cv-worker job ID``, the
HTTP job view). Inline image data, long lists (thousands of image references) and long strings are replaced by
markers that say what was there; the result fits in a fixed budget whatever the request carried.
"""

from __future__ import annotations

import json
from typing import Any

MAX_STRING = 256
MAX_LIST = 20


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


def _shrink(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            return {"omitted": "string", "chars": len(value)}
        return value
    if isinstance(value, list):
        if depth > 4:
            return {"omitted": "list", "items": len(value)}
        head = [_shrink(v, depth + 1) for v in value[:MAX_LIST]]
        if len(value) > MAX_LIST:
            head.append({"omitted": "list items", "items": len(value) - MAX_LIST})
        return head
    if isinstance(value, dict):
        if depth > 4:
            return {"omitted": "object", "keys": len(value)}
        return {str(k): _shrink(v, depth + 1) for k, v in value.items()}
    return value


def summarize(params: Any, max_bytes: int) -> Any:
    """``params`` as kept by a finished job: at most ``max_bytes`` of JSON."""
    if len(_dumps(params)) <= max_bytes:
        return params
    small = _shrink(params)
    if len(_dumps(small)) <= max_bytes:
        return small
    if isinstance(small, dict):
        # Keep the scalar fields (the model, thresholds...) that say what the job was.
        scalars = {k: v for k, v in small.items() if isinstance(v, (str, int, float, bool)) or v is None}
        scalars["omitted"] = sorted(k for k in small if k not in scalars)
        if len(_dumps(scalars)) <= max_bytes:
            return scalars
    return {"omitted": "params", "bytes": len(_dumps(params))}
