"""Give memory freed by large messages back to the system.

glibc's malloc raises its mmap threshold after a large block is freed (up to 32 MB), so after a few multi-megabyte
requests later ones land on the heap, and a heap that has grown is not shrunk when they are freed: a node that
took forty 7 MB requests kept their 280 MB resident although nothing referenced them. ``malloc_trim`` returns the
free pages. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Any, Optional

log = logging.getLogger(__name__)

_libc: Optional[Any] = None
_tried = False


def release_free_memory() -> None:
    global _libc, _tried
    if not _tried:
        _tried = True
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            lib.malloc_trim.argtypes = [ctypes.c_size_t]
            _libc = lib
        except (OSError, AttributeError):
            _libc = None
    if _libc is not None:
        _libc.malloc_trim(0)
