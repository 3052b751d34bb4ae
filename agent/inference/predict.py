"""One image through a loaded model, split in three parts so that they run on different threads:
``prepare`` (bytes -> decoded image -> input tensor staged for the runtime; in the decode workers),
``Predictor.run`` (the runtime alone; on the pipeline's inference thread) and ``Predictor.finish`` (output decoder
and the request's filters; on the job's thread)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from agent.inference.config import InferenceConfig
from agent.inference.params import ImageItem, InferParams, ItemResult
from agent.inference.sources import ItemFailure, fetch
from agent.stats import MODEL_METRICS

if TYPE_CHECKING:
    import numpy as np

    from accelerators.base import InferenceResult, Inputs
    from models.preprocess import Transform
    from models.runtime import Pipeline


@dataclass
class Prepared:
    item: ImageItem
    width: int
    height: int
    tensor: Optional["Inputs"]  # the feed, staged for the runtime (LoadedModel.stage); dropped once inferred
    transform: "Transform"
    image: Optional["np.ndarray"]  # the decoded BGR image, kept only when the results are drawn on it
    fetch_ms: float
    decode_ms: float


def decode_image(raw: bytes, cfg: InferenceConfig, name: str,
                 min_size: Optional[tuple[int, int]] = None) -> tuple["np.ndarray", tuple[int, int]]:
    """BGR pixels and the image's original (width, height).

    With ``min_size`` (the model's input size), a JPEG at least twice as large is decoded at 1/2, 1/4 or 1/8 scale
    by libjpeg itself (DCT scaling), never below ``min_size``: most of the decoding and resizing work is skipped
    and the model still gets at least its input resolution to shrink from."""
    import cv2
    import numpy as np

    buf = np.frombuffer(raw, dtype=np.uint8)
    if buf.size == 0:
        raise ItemFailure("not_an_image", f"{name}: empty file")
    # Check the header's dimensions before decoding the pixels, so a small file that decodes to a huge image
    # (a decompression bomb) is refused without allocating it.
    size = _header_size(raw)
    if size is not None and size[0] * size[1] > cfg.max_image_pixels:
        raise ItemFailure("image_too_large", f"{name}: {size[0]}x{size[1]} pixels is above the "
                          f"{cfg.max_image_pixels} limit (inference.max_image_pixels)")
    if min_size is not None and size is not None and raw[:2] == b"\xff\xd8":
        w, h = size
        for f, flag in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                        (2, cv2.IMREAD_REDUCED_COLOR_2)):
            if w // f >= min_size[0] and h // f >= min_size[1]:
                img = cv2.imdecode(buf, flag)
                if img is None:
                    break
                rw, rh = -(-w // f), -(-h // f)
                # EXIF orientation is applied while decoding: the header's width may be the image's height.
                if img.shape[:2] == (rh, rw):
                    return img, (w, h)
                if img.shape[:2] == (rw, rh):
                    return img, (h, w)
                break  # an unexpected size: decode in full rather than guess the scale
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if img is None:
        raise ItemFailure("not_an_image", f"{name}: not an image OpenCV can decode (JPEG, PNG, BMP, WebP, TIFF...)")
    if size is None and img.shape[0] * img.shape[1] > cfg.max_image_pixels:
        raise ItemFailure("image_too_large", f"{name}: {img.shape[1]}x{img.shape[0]} pixels is above the "
                          f"{cfg.max_image_pixels} limit (inference.max_image_pixels)")
    return img, (int(img.shape[1]), int(img.shape[0]))


def _header_size(raw: bytes) -> Optional[tuple[int, int]]:
    """Width and height from a PNG or JPEG header, without decoding; None for other formats."""
    if raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) >= 24:
        return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
    if raw[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 < len(raw):
        if raw[i] != 0xFF:
            return None
        marker = raw[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        seg = int.from_bytes(raw[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn: frame header
            return int.from_bytes(raw[i + 7:i + 9], "big"), int.from_bytes(raw[i + 5:i + 7], "big")
        i += 2 + seg
    return None


def to_tensor_fast(img: "np.ndarray", spec: Any) -> tuple["np.ndarray", "Transform"]:
    """``models.preprocess.prepare`` on a BGR image, same numbers, about twice as fast on large images.

    ``prepare`` reorders the channels of the full-size image first (a strided copy of megapixels); shrinking to
    the model's size first and reordering the small image gives identical pixels (resizing treats each channel
    alone) at a fraction of the cost. The transform is then composed back to the original image."""
    import cv2

    from models.preprocess import Transform
    from models.preprocess import prepare as to_tensor

    oh, ow = img.shape[:2]
    if spec.resize == "stretch":
        nw, nh = spec.width, spec.height
    else:
        r = min(spec.width / ow, spec.height / oh)
        nw, nh = max(1, round(ow * r)), max(1, round(oh * r))
    if nw >= ow or nh >= oh:  # not a pure shrink: leave it all to prepare()
        return to_tensor(img, spec, "BGR")
    small = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    x, t = to_tensor(small, spec, "BGR")
    return x, Transform(t.scale_x * nw / ow, t.scale_y * nh / oh, t.pad_x, t.pad_y, ow, oh, t.in_w, t.in_h)


def prepare(item: ImageItem, pipeline: "Pipeline", cfg: InferenceConfig, keep_image: bool) -> Prepared:
    from models.preprocess import Transform

    spec = pipeline.manifest.input
    t0 = time.perf_counter()
    raw = fetch(item, cfg)
    t1 = time.perf_counter()
    name = item.source if item.data is None else f"image {item.id}"
    # A drawn copy needs the full resolution; inference alone does not.
    img, (ow, oh) = decode_image(raw, cfg, name, None if keep_image else (spec.width, spec.height))
    del raw
    x, tf = to_tensor_fast(img, spec)
    rh, rw = img.shape[:2]
    if (rw, rh) != (ow, oh):  # decoded at reduced scale: map boxes back to the original size
        tf = Transform(tf.scale_x * rw / ow, tf.scale_y * rh / oh, tf.pad_x, tf.pad_y, ow, oh, tf.in_w, tf.in_h)
    # The runtime's own layout conversion (OpenCV wants NCHW...) happens here too, not on the inference thread.
    feed = pipeline.model.stage({spec.name: x} if spec.name else x)
    t2 = time.perf_counter()
    return Prepared(item, ow, oh, feed, tf, img if keep_image else None, (t1 - t0) * 1000, (t2 - t1) * 1000)


class Predictor:
    """Runs prepared images through one loaded pipeline with a request's threshold and filters."""

    def __init__(self, pipeline: "Pipeline", params: InferParams):
        from models.decoders import decoder_for

        self.pipeline = pipeline
        self.params = params
        spec = pipeline.manifest.decoder
        # A lower threshold than the model's must reach the decoder, or those detections are already gone.
        if params.threshold is not None and hasattr(spec, "score_threshold"):
            spec = spec.model_copy(update={"score_threshold": params.threshold})
        # Likewise a top_k above the model's default: the softmax decoder already cut its list to its own top_k.
        if params.top_k is not None and hasattr(spec, "top_k"):
            spec = spec.model_copy(update={"top_k": params.top_k})
        self.decoder_spec = spec
        self.classes = set(params.classes) if params.classes else None
        # What ``finish`` needs for every image, looked up once: it runs on the job's thread, per image.
        self._decode = decoder_for(spec.type)
        self._model_name = pipeline.manifest.name
        self._labels = pipeline.labels
        self._task = pipeline.manifest.task
        self._filtered = self.classes is not None or params.threshold is not None

    def infer(self, prep: Prepared) -> tuple[ItemResult, Any]:
        """The item's result, and the decoded result (for drawing)."""
        return self.finish(prep, self.run(prep))

    def run(self, prep: Prepared) -> "InferenceResult":
        """The runtime alone: all the inference thread does, so that it hardly ever waits for the GIL."""
        return self.end(self.begin(prep))

    def begin(self, prep: Prepared) -> Any:
        """``run`` in two halves (``LoadedModel.begin``/``end``); the feed is released as soon as it is handed over."""
        assert prep.tensor is not None, "prepared image already inferred"
        pending = self.pipeline.model.begin(prep.tensor)
        prep.tensor = None  # not needed any more: free it while the result waits for the job's thread
        return pending

    def end(self, pending: Any) -> "InferenceResult":
        return self.pipeline.model.end(pending)

    def finish(self, prep: Prepared, res: "InferenceResult") -> tuple[ItemResult, Any]:
        """Output decoder and the request's filters on the runtime's outputs: the item's result, and the decoded
        result (for drawing)."""
        MODEL_METRICS.record(self._model_name, res.infer_ms, backend=res.backend)
        dec = self._decode(self.decoder_spec, res.outputs, prep.transform, self._labels)
        p = self.params
        dets = self._best(dec.detections, p.max_detections)
        classes = self._best(dec.classes, p.top_k)
        task = self._task
        out = ItemResult(
            id=prep.item.id, ok=True, width=prep.width, height=prep.height,
            detections=[_detection(d) for d in dets] if (task == "detection" or dets) else None,
            classes=[{"label": c.label, "score": round(c.score, 5)} for c in classes] if task == "classification"
            else None,
            mask=_mask(dec),
            inference_ms=round(res.infer_ms, 3),
        )
        dec.detections = dets
        return out, dec

    def _best(self, found: list[Any], limit: Optional[int]) -> list[Any]:
        """Detections or classes the request's filters keep, best first, at most ``limit``."""
        if not found:
            return found
        kept = [x for x in found if self._keep(x.label, x.score)] if self._filtered else list(found)
        kept.sort(key=_score, reverse=True)
        return kept[:limit] if limit is not None else kept

    def _keep(self, label: str, score: float) -> bool:
        if self.classes is not None and label not in self.classes:
            return False
        return self.params.threshold is None or score >= self.params.threshold


def _score(d: Any) -> float:
    return d.score


def _mask(dec: Any) -> Optional[dict[str, Any]]:
    if dec.mask is None:
        return None
    out = dec.mask.model_dump()
    if dec.mask_map is not None:
        out["png_kind"] = dec.mask_map.kind
    return out


def mask_png(dec: Any, width: int, height: int) -> Optional[bytes]:
    """The decoded mask as an 8-bit PNG of the original image's size; None when the model gives no mask map."""
    import cv2

    m = dec.mask_map
    if m is None:
        return None
    interp = cv2.INTER_NEAREST if m.kind == "class_ids" else cv2.INTER_LINEAR
    pixels = cv2.resize(m.pixels, (width, height), interpolation=interp)
    ok, buf = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def _detection(d: Any) -> dict[str, Any]:
    # Python's round on Python floats, always: np.round differs from it on some values (it scales, rounds to
    # an integer and scales back), and these figures must not change from one release to the next.
    x1, y1, x2, y2 = d.box
    out: dict[str, Any] = {"label": d.label, "score": round(float(d.score), 5),
                           "box": [round(float(x1), 1), round(float(y1), 1), round(float(x2), 1), round(float(y2), 1)]}
    if d.keypoints:
        out["keypoints"] = [[round(float(x), 1), round(float(y), 1)] for x, y in d.keypoints]
    return out
