#!/usr/bin/env python3
"""Benchmark cv-worker's inference backends against raw runtime loops, on BlazeFace (short range).

For each backend: model load time, single-image latency (p50/p99) and batch throughput, measured through the
cv-worker backend contract (``Backend.load`` / ``LoadedModel.infer`` / ``infer_batch``) and through a raw loop that
calls the runtime directly with no cv-worker code, in the same process and run. Rounds alternate cv-worker/raw
so that CPU frequency and noisy neighbours hit both alike. The ratio cv-worker/raw should stay within 5%.

    PYTHONPATH=. python bench/bench_backends.py [--iterations 300] [--batch 64] [--backends litert,openvino]

The raw loops do the same work as the cv-worker path: LiteRT set_tensor/invoke/get_tensor of both outputs;
OpenVINO one InferRequest (copying outputs out of the request, as results must outlive the next call) and, for
batches, an AsyncInferQueue on a THROUGHPUT-compiled model; OpenCV DNN setInput/forward on NCHW input that was
transposed once, outside the loop (cv-worker transposes NHWC per call: that cost is included against it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerators.litert_backend import LiteRTBackend, LiteRTConfig  # noqa: E402
from accelerators.opencv_backend import OpenCVBackend  # noqa: E402
from accelerators.openvino_backend import OpenVINOBackend, OpenVINOConfig  # noqa: E402
from models.catalog import locate  # noqa: E402
from models.manifest import InputSpec  # noqa: E402
from models.preprocess import prepare  # noqa: E402

THREADS = os.cpu_count() or 1


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000.0


def clock(fn: Callable[[Any], Any], arg: Any) -> float:
    t0 = time.perf_counter()
    fn(arg)
    return (time.perf_counter() - t0) * 1000.0


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# --- raw loops: the runtimes called directly -------------------------------------------------------------------


def raw_litert(path: Path) -> dict[str, Any]:
    from ai_edge_litert.interpreter import Interpreter

    box: dict[str, Any] = {}

    def load() -> None:
        it = Interpreter(model_path=str(path), num_threads=THREADS)
        it.allocate_tensors()
        box["it"] = it

    def infer(x: np.ndarray) -> Any:
        it = box["it"]
        it.set_tensor(box["in"], x)
        it.invoke()
        return [it.get_tensor(i) for i in box["out"]]

    def after_load() -> None:
        box["in"] = box["it"].get_input_details()[0]["index"]
        box["out"] = [d["index"] for d in box["it"].get_output_details()]

    return {"load": load, "after_load": after_load, "infer": infer, "batch": lambda xs: [infer(x) for x in xs]}


def raw_openvino(path: Path, nreq: int) -> dict[str, Any]:
    from accelerators.openvino_backend import block_openvino_telemetry

    block_openvino_telemetry()
    import openvino as ov

    core = ov.Core()
    box: dict[str, Any] = {}

    def load() -> None:
        box["cm"] = core.compile_model(core.read_model(str(path)), "CPU",
                                       {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})

    def after_load() -> None:
        box["req"] = box["cm"].create_infer_request()
        box["n"] = len(box["cm"].outputs)
        tp = core.compile_model(core.read_model(str(path)), "CPU",
                                {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": "f32"})
        box["queue"] = ov.AsyncInferQueue(tp, nreq)

    def infer(x: np.ndarray) -> Any:
        req = box["req"]
        req.infer({0: x})
        return [req.get_output_tensor(i).data.copy() for i in range(box["n"])]

    def batch(xs: list[np.ndarray]) -> Any:
        out: list[Any] = [None] * len(xs)
        n = box["n"]

        def cb(req: Any, i: int) -> None:
            out[i] = [req.get_output_tensor(k).data.copy() for k in range(n)]

        q = box["queue"]
        q.set_callback(cb)
        for i, x in enumerate(xs):
            q.start_async({0: x}, i)
        q.wait_all()
        return out

    return {"load": load, "after_load": after_load, "infer": infer, "batch": batch}


def raw_opencv(path: Path) -> dict[str, Any]:
    import cv2

    box: dict[str, Any] = {}

    def load() -> None:
        box["net"] = cv2.dnn.readNet(str(path), "", "", cv2.dnn.ENGINE_CLASSIC)

    def after_load() -> None:
        box["names"] = box["net"].getUnconnectedOutLayersNames()

    def infer(x_nchw: np.ndarray) -> Any:
        box["net"].setInput(x_nchw)
        return box["net"].forward(box["names"])

    return {"load": load, "after_load": after_load, "infer": infer, "batch": lambda xs: [infer(x) for x in xs],
            "nchw": True}


# --- measurement -------------------------------------------------------------------------------------------------


def bench_backend(name: str, path: Path, frames: list[np.ndarray], iters: int, batch: int, rounds: int) -> dict:
    nreq = 2
    if name == "litert":
        backend: Any = LiteRTBackend(LiteRTConfig(num_threads=THREADS))
        raw = raw_litert(path)
    elif name == "openvino":
        backend = OpenVINOBackend(OpenVINOConfig(num_requests=nreq))
        raw = raw_openvino(path, nreq)
    else:
        backend = OpenCVBackend()
        raw = raw_opencv(path)
    raw_frames = [np.ascontiguousarray(f.transpose(0, 3, 1, 2)) for f in frames] if raw.get("nchw") else frames

    # Load time: median of 3 loads each.
    cvw_loads, raw_loads = [], []
    model = None
    for _ in range(3):
        t0 = time.perf_counter()
        model = backend.load(path)
        cvw_loads.append((time.perf_counter() - t0) * 1000)
        raw_loads.append(timed(raw["load"]))
    raw["after_load"]()
    assert model is not None
    if name == "openvino":
        # Throughput path: compiled with the THROUGHPUT hint, as the raw queue is.
        tp_model = OpenVINOBackend(OpenVINOConfig(performance_hint="THROUGHPUT", num_requests=nreq)).load(path)
    else:
        tp_model = model

    # Correctness guard: both paths compute the same thing.
    a = model.infer(frames[0]).outputs
    b = raw["infer"](raw_frames[0])
    assert all(np.allclose(x, y, atol=1e-4) for x, y in zip(a.values(), b)), f"{name}: raw and cv-worker disagree"

    for i in range(20):  # warm-up both
        model.infer(frames[i % len(frames)])
        raw["infer"](raw_frames[i % len(frames)])

    cvw_lat: list[float] = []
    raw_lat: list[float] = []
    cvw_tp: list[float] = []
    raw_tp: list[float] = []
    bx = [frames[i % len(frames)] for i in range(batch)]
    rbx = [raw_frames[i % len(frames)] for i in range(batch)]
    infer, raw_infer = model.infer, raw["infer"]
    # Single images: alternate call by call (and who goes first), so that both paths see the same machine load.
    for i in range(iters):
        x, rx = frames[i % len(frames)], raw_frames[i % len(frames)]
        if i % 2:
            cvw_lat.append(clock(infer, x))
            raw_lat.append(clock(raw_infer, rx))
        else:
            raw_lat.append(clock(raw_infer, rx))
            cvw_lat.append(clock(infer, x))
    for r in range(rounds):
        order = [("cvw", "raw"), ("raw", "cvw")][r % 2]  # alternate who goes first
        for who in order:
            if who == "cvw":
                cvw_tp.append(batch / (timed(lambda: tp_model.infer_batch(bx)) / 1000))
            else:
                raw_tp.append(batch / (timed(lambda: raw["batch"](rbx)) / 1000))

    res = {
        "backend": name,
        "runtime": backend.status().runtime,
        "load_ms": {"cvw": statistics.median(cvw_loads), "raw": statistics.median(raw_loads)},
        "latency_ms": {
            "cvw": {"p50": pct(cvw_lat, 50), "p99": pct(cvw_lat, 99)},
            "raw": {"p50": pct(raw_lat, 50), "p99": pct(raw_lat, 99)},
        },
        "throughput_ips": {"cvw": statistics.median(cvw_tp), "raw": statistics.median(raw_tp)},
    }
    res["ratio"] = {
        "latency_p50": res["latency_ms"]["cvw"]["p50"] / res["latency_ms"]["raw"]["p50"],
        "throughput": res["throughput_ips"]["raw"] / res["throughput_ips"]["cvw"],  # >1: cv-worker slower
    }
    return res


def pipeline_latency(frames_rgb: list[np.ndarray], iters: int) -> dict[str, float]:
    """Whole cv-worker path (preprocess + infer + decode) on the preferred backend, for context."""
    import tempfile

    from models.runtime import ModelManager
    from models.store import ModelStore

    with tempfile.TemporaryDirectory() as d:
        mm = ModelManager(ModelStore(Path(d)))
        mm.deploy("blazeface")
        mm.load("blazeface")
        for i in range(10):
            mm.predict("blazeface", frames_rgb[i % len(frames_rgb)])
        ts = [timed(lambda i=i: mm.predict("blazeface", frames_rgb[i % len(frames_rgb)])) for i in range(iters)]
        mm.close()
    return {"p50": pct(ts, 50), "p99": pct(ts, 99)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=800, help="single-image inferences per path (default 800)")
    ap.add_argument("--batch", type=int, default=64, help="images per batch for throughput (default 64)")
    ap.add_argument("--rounds", type=int, default=16, help="alternating cv-worker/raw rounds (default 16)")
    ap.add_argument("--backends", default="litert,openvino,opencv")
    ap.add_argument("--json", action="store_true", help="print JSON only")
    args = ap.parse_args()

    from skimage import data

    path = locate("blazeface")
    spec = InputSpec(width=128, height=128, mean=[127.5], std=[127.5])
    images = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    frames = [prepare(img, spec)[0] for img in images]

    results = []
    for name in args.backends.split(","):
        results.append(bench_backend(name.strip(), path, frames, args.iterations, args.batch, args.rounds))
    pipe = pipeline_latency(images, max(50, args.iterations // 4))
    if args.json:
        print(json.dumps({"threads": THREADS, "results": results, "pipeline_ms": pipe}, indent=2))
        return 0

    print(f"BlazeFace short range, 128x128, {THREADS} threads, {args.iterations} single + {args.rounds} batches "
          f"of {args.batch} per path")
    hdr = f"{'backend':9} {'path':4} {'load ms':>8} {'p50 ms':>8} {'p99 ms':>8} {'img/s':>8}"
    print(hdr)
    print("-" * len(hdr))
    worst = 0.0
    for r in results:
        for who in ("raw", "cvw"):
            lat = r["latency_ms"][who]
            print(f"{r['backend']:9} {who:4} {r['load_ms'][who]:8.1f} {lat['p50']:8.3f} {lat['p99']:8.3f} "
                  f"{r['throughput_ips'][who]:8.1f}")
        lr, tr = r["ratio"]["latency_p50"], r["ratio"]["throughput"]
        worst = max(worst, lr, tr)
        print(f"{'':9} cv-worker/raw: latency p50 x{lr:.3f}, batch time x{tr:.3f}")
    print(f"full pipeline (preprocess+infer+decode, 512x512 RGB in): p50 {pipe['p50']:.2f} ms, "
          f"p99 {pipe['p99']:.2f} ms")
    verdict = "within" if worst <= 1.05 else "OVER"
    print(f"worst cv-worker/raw ratio: {worst:.3f} ({verdict} the 5% target)")
    load = os.getloadavg()[0]
    if load > THREADS:
        print(f"note: load average {load:.1f} on {THREADS} CPUs: other processes competed, ratios are noisy; "
              "rerun on an idle machine")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
