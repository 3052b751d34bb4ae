"""Reads a training set: the annotations CSV (`image,x,y,width,height,class`) and the images it names.

Every problem is reported with the CSV line it comes from, so the owner can fix the file: a missing image, a box
that leaves its image, a column layout we do not know, an empty file. Local paths are confined to
``trainer.data_dirs`` (symlinks resolved first); URLs are fetched with size and time limits.
"""

from __future__ import annotations

import csv
import io
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional
from urllib.parse import urljoin

from agent.jobs.base import JobError

if TYPE_CHECKING:
    import numpy as np

    from agent.trainer.config import TrainerConfig

# Header names we understand, for each role; two layouts: x,y,width,height (ours, the `infer` vott-csv output)
# and xmin,ymin,xmax,ymax (VoTT's CSV export).
_ALIASES = {
    "image": {"image", "url", "path", "file", "filename", "image_path"},
    "x": {"x"}, "y": {"y"}, "width": {"width", "w"}, "height": {"height", "h"},
    "xmin": {"xmin", "x1"}, "ymin": {"ymin", "y1"}, "xmax": {"xmax", "x2"}, "ymax": {"ymax", "y2"},
    "class": {"class", "label", "category", "tag"},
}
_LAYOUTS = (("image", "x", "y", "width", "height", "class"), ("image", "xmin", "ymin", "xmax", "ymax", "class"))
EXPECTED = "image,x,y,width,height,class (or a header naming them; VoTT's image,xmin,ymin,xmax,ymax,label too)"
# Boxes may overhang their image by rounding only.
EDGE_TOLERANCE_PX = 0.5
MAX_REPORTED = 10


class AnnotationError(JobError):
    def __init__(self, source: str, problems: list[tuple[int, str]]):
        shown = "; ".join(f"line {n}: {msg}" for n, msg in problems[:MAX_REPORTED])
        more = f" (and {len(problems) - MAX_REPORTED} more)" if len(problems) > MAX_REPORTED else ""
        super().__init__("bad_annotations", f"{source}: {shown}{more}",
                         {"errors": [{"line": n, "message": m} for n, m in problems[:MAX_REPORTED]]})
        self.problems = problems


@dataclass(frozen=True)
class Sample:
    """One annotated box: the region of ``image`` that shows ``label``. Coordinates in image pixels."""

    image: str  # the resolved location: an absolute path or a URL
    line: int
    x: float
    y: float
    width: float
    height: float
    label: str


@dataclass
class Dataset:
    """What a plugin trains on: samples in CSV order, the sorted class labels, and image access."""

    source: str
    samples: list[Sample]
    labels: list[str]
    image_sizes: dict[str, tuple[int, int]]  # width, height per image
    _reader: "ImageReader" = field(repr=False)

    def read_image(self, image: str) -> "np.ndarray":
        """The image as BGR uint8 pixels (decoded once, a few kept in memory)."""
        return self._reader.read(image)

    def crop(self, s: Sample) -> "np.ndarray":
        """The sample's box cut out of its image (BGR), at least one pixel each way."""
        img = self.read_image(s.image)
        h, w = img.shape[:2]
        x1 = min(max(0, int(math.floor(s.x))), w - 1)
        y1 = min(max(0, int(math.floor(s.y))), h - 1)
        x2 = max(x1 + 1, min(w, int(math.ceil(s.x + s.width))))
        y2 = max(y1 + 1, min(h, int(math.ceil(s.y + s.height))))
        return img[y1:y2, x1:x2]

    def class_index(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}


class Locator:
    """Turns the CSV's location and the image names in it into readable locations, enforcing data_dirs."""

    def __init__(self, cfg: "TrainerConfig"):
        self.cfg = cfg
        self.roots = [Path(d).resolve() for d in cfg.data_dirs]

    def local(self, raw: str, base: Optional[Path] = None) -> Path:
        p = Path(raw).expanduser()
        if not p.is_absolute():
            if base is None:
                if not self.roots:
                    raise ValueError(self._no_dirs(raw))
                base = self.roots[0]
            p = base / p
        resolved = p.resolve()
        if not self.roots:
            raise ValueError(self._no_dirs(raw))
        if not any(resolved == r or r in resolved.parents for r in self.roots):
            raise ValueError(f"{raw!r} is outside the build peer's data directories "
                             f"({', '.join(map(str, self.roots))}; trainer.data_dirs)")
        return resolved

    @staticmethod
    def _no_dirs(raw: str) -> str:
        return (f"{raw!r} is a local path but this build peer reads none (set trainer.data_dirs on the peer, or "
                "give an http(s) URL)")

    def image(self, raw: str, csv_location: str) -> str:
        if raw.startswith(("http://", "https://")):
            return raw
        if csv_location.startswith(("http://", "https://")):
            return urljoin(csv_location, raw)
        return str(self.local(raw, Path(csv_location).parent))


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def fetch_bytes(location: str, limit: int, timeout_s: float, what: str,
                session: Optional["object"] = None) -> bytes:
    """The bytes at a URL or an (already checked) local path, at most ``limit`` of them; OSError/ValueError."""
    if not _is_url(location):
        p = Path(location)
        if not p.is_file():
            raise FileNotFoundError(f"{what} not found ({location})")
        size = p.stat().st_size
        if size > limit:
            raise ValueError(f"{what} is {size} bytes, over the {limit} byte limit")
        return p.read_bytes()
    import requests

    get = session.get if session is not None else requests.get  # type: ignore[attr-defined]
    try:
        with get(location, stream=True, timeout=(min(10.0, timeout_s), timeout_s)) as r:
            if r.status_code == 404:
                raise FileNotFoundError(f"{what} not found (HTTP 404 from {location})")
            if r.status_code != 200:
                raise OSError(f"{what}: HTTP {r.status_code} from {location}")
            buf = bytearray()
            for chunk in r.iter_content(65536):
                buf += chunk
                if len(buf) > limit:
                    raise ValueError(f"{what} is over the {limit} byte limit")
            return bytes(buf)
    except requests.RequestException as e:
        raise OSError(f"{what}: cannot download {location}: {e}") from None


class ImageReader:
    """Decodes images by location, keeping the most recent few (a detection set names an image many times)."""

    def __init__(self, cfg: "TrainerConfig", keep: int = 64):
        import requests

        self.cfg = cfg
        self.keep = keep
        self._cache: "OrderedDict[str, np.ndarray]" = OrderedDict()
        self._lock = threading.Lock()
        self._session = requests.Session()

    def read(self, location: str) -> "np.ndarray":
        with self._lock:
            if location in self._cache:
                self._cache.move_to_end(location)
                return self._cache[location]
        import cv2
        import numpy as np

        raw = fetch_bytes(location, self.cfg.max_image_bytes, self.cfg.download_timeout_s, "image", self._session)
        img = cv2.imdecode(np.frombuffer(raw, dtype=np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError("not an image OpenCV can decode (PNG, JPEG, BMP, WebP, TIFF...)")
        with self._lock:
            self._cache[location] = img
            while len(self._cache) > self.keep:
                self._cache.popitem(last=False)
        return img


def _header_roles(cells: list[str]) -> Optional[dict[str, int]]:
    """Column index per role when ``cells`` is a header of a known layout, else None."""
    names = [c.strip().lower() for c in cells]
    found: dict[str, int] = {}
    for i, n in enumerate(names):
        for role, aliases in _ALIASES.items():
            if n in aliases and role not in found:
                found[role] = i
    for layout in _LAYOUTS:
        if all(r in found for r in layout):
            return {r: found[r] for r in layout}
    return None


def _number(cells: list[str], idx: int, name: str) -> float:
    raw = cells[idx].strip()
    try:
        v = float(raw)
    except ValueError:
        raise ValueError(f"{name} is {raw!r}, not a number") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} is {raw!r}, not a finite number")
    return v


def _label_key(label: str) -> tuple[int, float, str]:
    # "2" before "10": numeric labels sort as numbers, the rest alphabetically after them.
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def parse_csv(text: str, source: str) -> list[tuple[int, str, float, float, float, float, str]]:
    """Rows as (line, image, x, y, width, height, class); raises AnnotationError naming the lines at fault."""
    reader = csv.reader(io.StringIO(text))
    rows: list[tuple[int, list[str]]] = []
    try:
        for cells in reader:
            if cells and any(c.strip() for c in cells):
                rows.append((reader.line_num, cells))
    except csv.Error as e:
        raise AnnotationError(source, [(reader.line_num, f"not valid CSV: {e}")]) from None
    if not rows:
        raise AnnotationError(source, [(1, f"the file is empty: no annotation rows (expected {EXPECTED})")])
    first_line, first = rows[0]
    roles = _header_roles(first)
    if roles is not None:
        rows = rows[1:]
        if not rows:
            raise AnnotationError(source, [(first_line + 1, "no annotation rows after the header")])
    else:
        shown = ",".join(c.strip() for c in first)[:200]
        if len(first) != 6:
            hint = next((f" (is the file separated by {d!r}? use commas)" for d in (";", "\t", "|")
                         if len(first) == 1 and d in first[0]), "")
            raise AnnotationError(source, [(first_line, f"unknown column layout: {len(first)} columns ({shown})"
                                            f"{hint}; expected {EXPECTED}")])
        try:
            float(first[1])
        except ValueError:
            raise AnnotationError(source, [(first_line, f"unknown column layout: header {shown!r}; "
                                            f"expected {EXPECTED}")]) from None
        roles = dict(zip(_LAYOUTS[0], range(6)))
    ncols = max(roles.values()) + 1
    corners = "xmax" in roles
    out = []
    problems: list[tuple[int, str]] = []
    for line, cells in rows:
        try:
            if len(cells) < ncols:
                raise ValueError(f"{len(cells)} columns where the layout has {ncols} (expected {EXPECTED})")
            image = cells[roles["image"]].strip()
            label = cells[roles["class"]].strip()
            if not image:
                raise ValueError("the image column is empty")
            if not label:
                raise ValueError("the class column is empty")
            if corners:
                x1, y1 = _number(cells, roles["xmin"], "xmin"), _number(cells, roles["ymin"], "ymin")
                x2, y2 = _number(cells, roles["xmax"], "xmax"), _number(cells, roles["ymax"], "ymax")
                x, y, w, h = x1, y1, x2 - x1, y2 - y1
            else:
                x, y = _number(cells, roles["x"], "x"), _number(cells, roles["y"], "y")
                w, h = _number(cells, roles["width"], "width"), _number(cells, roles["height"], "height")
            if w <= 0 or h <= 0:
                raise ValueError(f"the box has no area (width {w:g}, height {h:g}); width and height must be > 0")
            out.append((line, image, x, y, w, h, label))
        except ValueError as e:
            problems.append((line, str(e)))
            if len(problems) > MAX_REPORTED:
                break
    if problems:
        raise AnnotationError(source, problems)
    return out


def load(location: str, cfg: "TrainerConfig", check: Callable[[], None] = lambda: None,
         progress: Optional[Callable[[int, int], None]] = None) -> Dataset:
    """Read and check the CSV and every image it names (sizes and boxes); AnnotationError on any problem."""
    locator = Locator(cfg)
    name = location if _is_url(location) else Path(location).name
    try:
        csv_loc = location if _is_url(location) else str(locator.local(location))
        raw = fetch_bytes(csv_loc, cfg.max_csv_bytes, cfg.download_timeout_s, "annotations CSV")
    except (OSError, ValueError) as e:
        raise JobError("annotations_unavailable", f"cannot read the annotations {location!r}: {e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise AnnotationError(name, [(line, "not UTF-8 text (save the CSV as UTF-8)")]) from None
    rows = parse_csv(text, name)
    if len(rows) > cfg.max_images:
        raise AnnotationError(name, [(rows[cfg.max_images][0], f"more than {cfg.max_images} annotation rows "
                                      "(trainer.max_images)")])
    reader = ImageReader(cfg)
    sizes: dict[str, tuple[int, int]] = {}
    bad: dict[str, str] = {}
    samples: list[Sample] = []
    problems: list[tuple[int, str]] = []
    for n, (line, image, x, y, w, h, label) in enumerate(rows):
        check()
        if progress is not None:
            progress(n, len(rows))
        try:
            loc = locator.image(image, csv_loc)
        except ValueError as e:
            problems.append((line, str(e)))
            continue
        if loc not in sizes and loc not in bad:
            try:
                img = reader.read(loc)
                sizes[loc] = (int(img.shape[1]), int(img.shape[0]))
            except FileNotFoundError:
                bad[loc] = f"image {image!r} not found" + ("" if _is_url(loc) else f" ({loc})")
            except (OSError, ValueError) as e:
                bad[loc] = f"image {image!r}: {e}"
        if loc in bad:
            problems.append((line, bad[loc]))
        else:
            iw, ih = sizes[loc]
            t = EDGE_TOLERANCE_PX
            if x < -t or y < -t or x + w > iw + t or y + h > ih + t:
                problems.append((line, f"the box x={x:g} y={y:g} width={w:g} height={h:g} lies outside image "
                                       f"{image!r}, which is {iw}x{ih} pixels"))
            else:
                samples.append(Sample(loc, line, max(0.0, x), max(0.0, y), min(w, iw - max(0.0, x)),
                                      min(h, ih - max(0.0, y)), label))
        if len(problems) > MAX_REPORTED:
            break
    if problems:
        raise AnnotationError(name, problems)
    labels = sorted({s.label for s in samples}, key=_label_key)
    return Dataset(location, samples, labels, sizes, reader)
