"""The inference building blocks on their own: fast preprocessing equals the reference, the prefetch stage keeps
order and its bound, image headers, path confinement."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent.inference.config import InferenceConfig
from agent.inference.pipeline import Prefetch, Relay
from agent.inference.predict import _header_size, to_tensor_fast
from agent.inference.sources import ItemFailure, confine
from models.manifest import InputSpec
from models.preprocess import prepare


@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
@pytest.mark.parametrize("picture", ["astronaut", "rocket", "camera"])
def test_fast_preprocessing_equals_the_reference(resize: str, picture: str):
    from skimage import data

    img = getattr(data, picture)()
    bgr = np.ascontiguousarray(np.repeat(img[:, :, None], 3, 2) if img.ndim == 2 else img[:, :, ::-1])
    spec = InputSpec(width=128, height=96, layout="NHWC", dtype="float32", color="RGB", mean=[127.5], std=[127.5],
                     resize=resize)
    ref, ref_tf = prepare(bgr, spec, "BGR")
    fast, fast_tf = to_tensor_fast(bgr, spec)
    assert np.array_equal(ref, fast)
    for a, b in zip(ref_tf.__dict__.values(), fast_tf.__dict__.values()):
        assert a == pytest.approx(b, rel=1e-9)


def _reference_tensor(image: np.ndarray, spec: InputSpec, image_color: str) -> np.ndarray:
    """The preprocessing contract written the plain way: reverse the channels first, resize, then compute every
    value with numpy's per-pixel float32 arithmetic (what models.preprocess did before its table lookup)."""
    import cv2

    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    image = image[:, :, :3]
    if image_color != spec.color:
        image = image[:, :, ::-1]
    image = np.ascontiguousarray(image)
    oh, ow = image.shape[:2]

    def resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
        if (img.shape[1], img.shape[0]) == (w, h):
            return img
        shrink = w < img.shape[1] or h < img.shape[0]
        return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)

    if spec.resize == "stretch":
        out = resize(image, spec.width, spec.height)
    else:
        r = min(spec.width / ow, spec.height / oh)
        nw, nh = max(1, round(ow * r)), max(1, round(oh * r))
        px, py = (spec.width - nw) // 2, (spec.height - nh) // 2
        out = np.full((spec.height, spec.width, 3), spec.pad_value, dtype=np.uint8)
        out[py:py + nh, px:px + nw] = resize(image, nw, nh)
    if spec.dtype == "float32":
        x = (out.astype(np.float32) - np.asarray(spec.mean, np.float32)) * (1.0 / np.asarray(spec.std, np.float32))
    elif spec.dtype == "uint8":
        x = out
    else:
        x = (out.astype(np.int16) - 128).astype(np.int8)
    if spec.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x[None])


def test_preprocessing_is_bit_identical_to_the_per_pixel_formula():
    rng = np.random.default_rng(7)
    specs = [InputSpec(width=128, height=128, mean=[127.5], std=[127.5]),
             InputSpec(width=224, height=224, layout="NCHW", mean=[123.675, 116.28, 103.53],
                       std=[58.395, 57.12, 57.375]),
             InputSpec(width=96, height=64, dtype="uint8", color="BGR", resize="letterbox"),
             InputSpec(width=80, height=120, dtype="int8", layout="NCHW", resize="letterbox")]
    specs += [InputSpec(width=int(rng.integers(32, 320)), height=int(rng.integers(32, 320)), resize=resize,
                        color=color, mean=[float(v) for v in rng.uniform(0, 255, 3)],
                        std=[float(v) for v in rng.uniform(1, 100, 3)])
              for resize in ("stretch", "letterbox") for color in ("RGB", "BGR")]
    checked = 0
    for spec in specs:
        for _ in range(8):
            h, w = int(rng.integers(20, 700)), int(rng.integers(20, 700))
            shape = (h, w) if rng.random() < 0.2 else (h, w, int(rng.choice([3, 4])))
            img = rng.integers(0, 256, shape, dtype=np.uint8)
            for color in ("RGB", "BGR"):
                got, _ = prepare(img, spec, color)
                want = _reference_tensor(img, spec, color)
                assert got.shape == want.shape and got.dtype == want.dtype
                assert got.flags.c_contiguous
                assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), (spec, shape, color)
                checked += 1
    assert checked == len(specs) * 16


def test_prefetch_keeps_order_bounds_work_in_flight_and_passes_errors():
    started: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.001 * (i % 3))  # out-of-order completion
        if i == 5:
            raise ValueError("bad five")
        return i * 10

    seen = []
    for i, res in Prefetch(work, range(40), workers=3, depth=4):
        # never more than depth + the one being consumed submitted ahead of the consumer
        assert len(started) <= i + 1 + 4
        seen.append((i, res if not isinstance(res, BaseException) else str(res)))
    assert seen == [(i, "bad five" if i == 5 else i * 10) for i in range(40)]


def test_relay_keeps_order_passes_errors_and_stops_early():
    def decode(i: int) -> int:
        if i == 3:
            raise ValueError("undecodable three")
        return i

    def begin(v: int) -> int:
        if v == 7:
            raise RuntimeError("runtime refused seven")
        return v

    def end(v: int) -> int:
        if v == 9:
            raise RuntimeError("runtime failed on nine")
        return v * 10

    seen = []
    for item, value, out in Relay(begin, end, Prefetch(decode, range(30), workers=2, depth=4), depth=2):
        seen.append((item, str(value) if isinstance(value, BaseException) else value,
                     str(out) if isinstance(out, BaseException) else out))
    expected = [(i, i, i * 10) for i in range(30)]
    expected[3] = (3, "undecodable three", None)
    expected[7] = (7, 7, "runtime refused seven")
    expected[9] = (9, 9, "runtime failed on nine")
    assert seen == expected
    # leaving early stops the relay thread and the decode workers
    before = threading.active_count()
    relay = Relay(begin, end, Prefetch(decode, range(10_000), workers=2, depth=4), depth=2)
    for item, _, _ in relay:
        if item == 5:
            break
    assert threading.active_count() <= before


def test_image_header_sizes(tmp_path: Path):
    import cv2

    img = np.zeros((37, 53, 3), np.uint8)
    for ext in (".jpg", ".png"):
        ok, buf = cv2.imencode(ext, img)
        assert _header_size(buf.tobytes()) == (53, 37)
    assert _header_size(b"GIF89a....") is None


def test_confinement(tmp_path: Path):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.jpg").write_bytes(b"x")
    (tmp_path / "secret.jpg").write_bytes(b"x")
    (root / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    cfg = InferenceConfig(input_dirs=[root])
    assert confine("sub/a.jpg", cfg.input_dirs) == (root / "sub" / "a.jpg").resolve()
    assert confine(str(root / "sub" / ".." / "sub" / "a.jpg"), cfg.input_dirs).name == "a.jpg"
    for bad in ("../secret.jpg", str(tmp_path / "secret.jpg"), "link.jpg", "../nothing-here.jpg"):
        with pytest.raises(ItemFailure) as e:
            confine(bad, cfg.input_dirs)
        assert e.value.code == "path_not_allowed", bad
    with pytest.raises(ItemFailure) as e:
        confine("a.jpg", [])
    assert "inference.input_dirs is empty" in e.value.message
