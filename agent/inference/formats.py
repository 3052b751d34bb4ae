"""Output formats: ``json`` (the items themselves) and ``vott-csv`` (pre-annotation rows).

The CSV is the ``url,x,y,width,height,class`` layout that annotation tools import as pre-annotations: one row per
detection, x/y the top-left corner and width/height in pixels of the original image. An image without detections
gets no row (annotation tools treat a missing image as "not annotated yet", which is what a pre-annotation is).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CSV_HEADER = ["url", "x", "y", "width", "height", "class"]


def csv_rows(source: str, item: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for d in item.get("detections") or []:
        x1, y1, x2, y2 = d["box"]
        rows.append([source, round(x1, 1), round(y1, 1), round(x2 - x1, 1), round(y2 - y1, 1), d["label"]])
    return rows


def csv_text(rows: Iterable[list[Any]], header: bool = False) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow(CSV_HEADER)
    w.writerows(rows)
    return buf.getvalue()


def write_outputs(chunks: Iterable[dict[str, Any]], out_dir: Path, output: str) -> Path:
    """The whole batch as one file, built from the stored result chunks (so a resumed job's file is complete).

    Written to a temporary name and renamed, so a reader never sees half a file; a failed write (a full disk)
    removes it and raises. Streams chunk by chunk."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "results.csv" if output == "vott-csv" else "results.json"
    tmp = out_dir / f".{name}.tmp"
    try:
        with open(tmp, "w", newline="") as f:
            if output == "vott-csv":
                f.write(csv_text([], header=True))
                for chunk in chunks:
                    f.write(chunk.get("csv") or "")
            else:
                # One JSON document, written incrementally so 100,000 items never sit in memory as one list.
                f.write('{"items": [')
                first = True
                for chunk in chunks:
                    for item in chunk.get("items") or []:
                        f.write(("" if first else ",\n") + json.dumps(item, separators=(",", ":")))
                        first = False
                f.write("]}\n")
        final = out_dir / name
        tmp.replace(final)
    except BaseException:
        # A full disk must not keep megabytes of a half-written file that nothing will ever finish or delete.
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return final
