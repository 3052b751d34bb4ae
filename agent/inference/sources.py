"""The encoded bytes of one image, from a URL, a confined path or base64 data, never more than the size limit.

Every failure is an ``ItemFailure`` with a code and a message that says what to fix; the batch goes on.
"""

from __future__ import annotations

import base64
import binascii
import os
import time
from pathlib import Path

from agent.inference.config import InferenceConfig
from agent.inference.params import ImageItem


class ItemFailure(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


def fetch(item: ImageItem, cfg: InferenceConfig) -> bytes:
    if item.url is not None:
        return fetch_url(item.url, cfg)
    if item.path is not None:
        return read_path(item.path, cfg)
    assert item.data is not None
    return decode_data(item.data, cfg)


def decode_data(data: str, cfg: InferenceConfig) -> bytes:
    # base64 is 4/3 of the payload: refuse before decoding what would be too large anyway.
    if len(data) * 3 // 4 > cfg.max_image_bytes + 3:
        raise ItemFailure("too_large", f"data is about {_mib(len(data) * 3 // 4)}, above the "
                          f"{_mib(cfg.max_image_bytes)} limit (inference.max_image_bytes)")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ItemFailure("bad_data", f"data is not valid base64 ({e})") from None
    if len(raw) > cfg.max_image_bytes:
        raise ItemFailure("too_large", f"data is {_mib(len(raw))}, above the {_mib(cfg.max_image_bytes)} limit "
                          "(inference.max_image_bytes)")
    return raw


def confine(path: str, input_dirs: list[Path]) -> Path:
    """The real path of ``path`` if it lies under one of ``input_dirs`` (after resolving symlinks and ``..``)."""
    if not input_dirs:
        raise ItemFailure("path_not_allowed", f"{path}: this node reads no local files (inference.input_dirs is "
                          "empty); send the image as url or data, or configure input_dirs")
    p = Path(path)
    if not p.is_absolute():
        p = input_dirs[0] / p
    refused = ItemFailure("path_not_allowed", f"{path} is outside inference.input_dirs "
                          f"({', '.join(str(d) for d in input_dirs)}); only files under them can be read")
    roots = [Path(os.path.abspath(d)) for d in input_dirs]
    # First lexically (so "../" cannot even probe whether a file exists outside), then after resolving links.
    if not any(Path(os.path.normpath(p)).is_relative_to(r) for r in roots):
        raise refused
    try:
        real = p.resolve(strict=True)
    except FileNotFoundError:
        raise ItemFailure("not_found", f"{path}: no such file") from None
    except (OSError, RuntimeError) as e:
        raise ItemFailure("not_found", f"{path}: cannot resolve ({e})") from None
    if any(real.is_relative_to(r) for r in _resolved_roots(tuple(roots))):
        return real
    raise refused


_ROOTS_TTL_S = 5.0
_roots_cache: dict[tuple[Path, ...], tuple[float, list[Path]]] = {}


def _resolved_roots(roots: tuple[Path, ...]) -> list[Path]:
    """The input dirs with their links resolved, reused for a few seconds: a batch confines thousands of paths to
    the same few roots, and resolving them again for each one cost the decode stage about a tenth of its time."""
    now = time.monotonic()
    hit = _roots_cache.get(roots)
    if hit is not None and now - hit[0] < _ROOTS_TTL_S:
        return hit[1]
    resolved = []
    for r in roots:
        try:
            resolved.append(r.resolve(strict=True))
        except (OSError, RuntimeError):
            continue  # a missing root confines nothing
    if len(_roots_cache) > 32:
        _roots_cache.clear()
    _roots_cache[roots] = (now, resolved)
    return resolved


def read_path(path: str, cfg: InferenceConfig) -> bytes:
    real = confine(path, cfg.input_dirs)
    if not real.is_file():
        raise ItemFailure("not_a_file", f"{path} is not a regular file")
    try:
        with open(real, "rb") as f:
            # Read one byte past the limit rather than trusting stat: the file may grow meanwhile.
            raw = f.read(cfg.max_image_bytes + 1)
    except OSError as e:
        raise ItemFailure("unreadable", f"{path}: {e.strerror or e}") from None
    if len(raw) > cfg.max_image_bytes:
        raise ItemFailure("too_large", f"{path} is larger than the {_mib(cfg.max_image_bytes)} limit "
                          "(inference.max_image_bytes)")
    return raw


def fetch_url(url: str, cfg: InferenceConfig) -> bytes:
    import requests

    limit = cfg.max_image_bytes
    deadline = time.monotonic() + cfg.download_timeout_s
    try:
        with requests.get(url, stream=True, timeout=(cfg.connect_timeout_s, cfg.download_timeout_s)) as r:
            if r.status_code != 200:
                raise ItemFailure("http_error", f"{url} answered HTTP {r.status_code} {r.reason or ''}".rstrip())
            declared = r.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise ItemFailure("too_large", f"{url} is {_mib(int(declared))}, above the {_mib(limit)} limit "
                                  "(inference.max_image_bytes)")
            buf = bytearray()
            for part in r.iter_content(64 * 1024):
                buf += part
                if len(buf) > limit:
                    raise ItemFailure("too_large", f"{url} is larger than the {_mib(limit)} limit "
                                      "(inference.max_image_bytes)")
                if time.monotonic() > deadline:
                    raise ItemFailure("download_timeout", f"{url} took longer than {cfg.download_timeout_s:g} s "
                                      "(inference.download_timeout_s)")
            return bytes(buf)
    except requests.Timeout:
        raise ItemFailure("download_timeout", f"{url} did not answer within the timeout "
                          "(inference.connect_timeout_s / download_timeout_s)") from None
    except requests.ConnectionError as e:
        raise ItemFailure("url_unreachable", f"cannot reach {url}: {_reason(e)}") from None
    except requests.RequestException as e:
        raise ItemFailure("download_failed", f"{url}: {e}") from None


def _reason(e: Exception) -> str:
    # requests nests the socket error several levels deep; the innermost message is the useful one.
    inner: BaseException = e
    while inner.__context__ is not None or getattr(inner, "reason", None) is not None:
        nxt = getattr(inner, "reason", None) or inner.__context__
        if not isinstance(nxt, BaseException) or nxt is inner:
            break
        inner = nxt
    return str(inner) or type(inner).__name__
