"""Image -> input tensor, and the transform that maps model-input coordinates back to the original image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.manifest import InputSpec


@dataclass(frozen=True)
class Transform:
    """x_original = (x_input - pad_x) / scale_x (same for y); sizes of both images kept for clipping."""

    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float
    orig_w: int
    orig_h: int
    in_w: int
    in_h: int

    def boxes_to_original(self, boxes: np.ndarray) -> np.ndarray:
        """(N,4) x1,y1,x2,y2 in input pixels -> original pixels, clipped to the image."""
        out = np.empty_like(boxes, dtype=np.float64)
        out[:, [0, 2]] = (boxes[:, [0, 2]] - self.pad_x) / self.scale_x
        out[:, [1, 3]] = (boxes[:, [1, 3]] - self.pad_y) / self.scale_y
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, self.orig_w)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, self.orig_h)
        return out

    def points_to_original(self, pts: np.ndarray) -> np.ndarray:
        """(..., 2) x,y in input pixels -> original pixels (not clipped: landmarks may lie just outside)."""
        out = np.empty_like(pts, dtype=np.float64)
        out[..., 0] = (pts[..., 0] - self.pad_x) / self.scale_x
        out[..., 1] = (pts[..., 1] - self.pad_y) / self.scale_y
        return out


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    import cv2

    if img.shape[1] == w and img.shape[0] == h:
        return img
    # INTER_AREA avoids aliasing when shrinking (the usual case: camera frames are larger than model inputs).
    shrink = w < img.shape[1] or h < img.shape[0]
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


_TABLES: dict[tuple[tuple[float, ...], tuple[float, ...]], np.ndarray] = {}


def _normalise_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(1, 256, 3) float32: entry [0, v, c] = (v - mean[c]) / std[c], in float32 as the per-pixel formula."""
    table = _TABLES.get((mean, std))
    if table is None:
        m = np.asarray(mean, dtype=np.float32)
        inv_std = 1.0 / np.asarray(std, dtype=np.float32)
        table = np.ascontiguousarray(((np.arange(256, dtype=np.float32)[:, None] - m) * inv_std).reshape(1, 256, 3))
        _TABLES[(mean, std)] = table
    return table


def prepare(image: np.ndarray, spec: InputSpec, image_color: str = "RGB") -> tuple[np.ndarray, Transform]:
    """HxWx3 uint8 image (``image_color`` order) -> batched tensor in the model's layout, dtype and scaling."""
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    image = image[:, :, :3]
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {image.dtype}")
    oh, ow = image.shape[:2]
    if spec.resize == "stretch":
        resized = _resize(image, spec.width, spec.height)
        tf = Transform(spec.width / ow, spec.height / oh, 0.0, 0.0, ow, oh, spec.width, spec.height)
    else:
        r = min(spec.width / ow, spec.height / oh)
        nw, nh = max(1, round(ow * r)), max(1, round(oh * r))
        px, py = (spec.width - nw) // 2, (spec.height - nh) // 2
        resized = np.full((spec.height, spec.width, 3), spec.pad_value, dtype=np.uint8)
        resized[py : py + nh, px : px + nw] = _resize(image, nw, nh)
        tf = Transform(nw / ow, nh / oh, float(px), float(py), ow, oh, spec.width, spec.height)
    if image_color.upper() != spec.color:
        # Swapped after resizing: resizing treats each channel alone (same pixels) and the small image is cheap to
        # swap, where a reversed view of a large one made every later step read it strided (5x slower).
        import cv2

        resized = cv2.cvtColor(np.ascontiguousarray(resized), cv2.COLOR_BGR2RGB)
    if spec.dtype == "float32":
        import cv2

        # A table lookup per pixel: the same float32 values as computing (pixel - mean) * inv_std per pixel (the
        # table is computed that way, for the 256 possible values), 6-17x faster: numpy broadcasting a
        # per-channel mean runs its inner loop 3 elements at a time.
        x = cv2.LUT(np.ascontiguousarray(resized), _normalise_table(tuple(spec.mean), tuple(spec.std)))
    elif spec.dtype == "uint8":
        x = np.ascontiguousarray(resized)
    else:
        x = (resized.astype(np.int16) - 128).astype(np.int8)
    if spec.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x[None]), tf
