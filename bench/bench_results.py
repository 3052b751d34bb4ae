#!/usr/bin/env python3
"""The job thread's per-image CPU in a batch `infer` job, before and after it was made cheaper.

In a batch job the job's thread turns each image's raw runtime outputs into the item of a result chunk:
``Predictor.finish`` (model metrics, the output decoder, the request's filters, the ``ItemResult``) and then
``res.dump()``. On a 2-core node that CPU is taken from the decode and inference stages. This script runs
BlazeFace (LiteRT, from the offline catalog) once on N real pictures (the scikit-image photos at varied sizes,
JPEG-encoded and prepared by the agent's own ``prepare``, plus a group of faces), records the raw outputs, and
then times only that per-image work, many times over the recorded outputs:

  old  — the path as it was (tests/infer/reference.py: the decoders with per-detection loops and row-by-row
         NMS, a validated ItemResult, its dump), plus MODEL_METRICS.record as the old finish did. This copy
         dispatches to the decoder without the import the old finish did per image: run at the commit before the
         change (git stash), the real old code measured about 5% slower than this "old", so the figure flatters it;
  new  — ``Predictor.finish`` + ``dump()`` as the agent runs them now.

Both are measured in the same run, alternating rounds, as CPU time of this thread (time.thread_time) and as wall
time, and printed in µs per image: for all pictures, the ones with faces and the ones without. Before timing,
every item dict of the new path is checked to be identical (repr: same keys in the same order, same types, same
rounded values) to the old path's, and the script stops if one differs.

    .venv/bin/python bench/bench_results.py [--images 240] [--rounds 40] [--threshold 0.5] [--model blazeface]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.inference.params import ImageItem, InferParams  # noqa: E402
from agent.inference.predict import Predictor  # noqa: E402
from agent.stats import MODEL_METRICS  # noqa: E402
from tests.infer import reference  # noqa: E402
from tests.infer.recorded import Recorded, load, pictures, record  # noqa: E402


def old_path(pipeline: Any, params: InferParams) -> Callable[[Recorded], dict[str, Any]]:
    spec = reference.decoder_spec(pipeline.manifest.decoder, params)  # once, as the old Predictor.__init__ did
    name, task, labels = pipeline.manifest.name, pipeline.manifest.task, pipeline.labels

    def one(r: Recorded) -> dict[str, Any]:
        MODEL_METRICS.record(name, r.res.infer_ms, backend=r.res.backend)
        p = r.prep
        return reference.item(spec, params, task, labels, p.item.id, p.width, p.height, r.res.outputs,
                              p.transform, r.res.infer_ms)

    return one


def new_path(pipeline: Any, params: InferParams) -> Callable[[Recorded], dict[str, Any]]:
    predictor = Predictor(pipeline, params)

    def one(r: Recorded) -> dict[str, Any]:
        return predictor.finish(r.prep, r.res)[0].dump()

    return one


def timed(fn: Callable[[Recorded], Any], recs: list[Recorded]) -> tuple[float, float]:
    """(thread CPU µs, wall µs) per image for one pass over ``recs``."""
    c0, w0 = time.thread_time(), time.perf_counter()
    for r in recs:
        fn(r)
    c1, w1 = time.thread_time(), time.perf_counter()
    return (c1 - c0) / len(recs) * 1e6, (w1 - w0) / len(recs) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--rounds", type=int, default=40, help="timed passes over all images, per path")
    ap.add_argument("--threshold", type=float, default=None, help="the request's threshold (default: the model's)")
    ap.add_argument("--model", default="blazeface", help="blazeface, blazeface-full, ppocr-det or ppocr-cls")
    a = ap.parse_args()

    pipeline = load(a.model)
    recs = record(pipeline, pictures(a.images))
    params = InferParams(model=a.model, images=[ImageItem(id="x", path="x")], threshold=a.threshold)
    old, new = old_path(pipeline, params), new_path(pipeline, params)

    for r in recs:
        want, got = old(r), new(r)
        if repr(got) != repr(want):
            sys.exit(f"{r.prep.item.id}: the new item differs from the old one\n  old {want!r}\n  new {got!r}")
    with_dets = [r for r in recs if old(r).get("detections") or old(r).get("classes")]
    without = [r for r in recs if r not in with_dets]
    n_dets = sum(len(old(r).get("detections") or old(r).get("classes") or []) for r in recs)
    print(f"{a.model} on {pipeline.model.backend}:{pipeline.model.device}, threshold "
          f"{a.threshold if a.threshold is not None else 'default'}: {len(recs)} pictures, {len(with_dets)} with "
          f"results ({n_dets} in all); items of both paths identical")

    groups = [("all", recs), ("with results", with_dets), ("without", without)]
    samples: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for fn in (old, new):  # warm-up
        timed(fn, recs)
    for _ in range(a.rounds):
        for label, fn in (("old", old), ("new", new)):
            for g, rs in groups:
                if rs:
                    samples.setdefault((label, g), []).append(timed(fn, rs))

    print(f"\nµs per image, median of {a.rounds} rounds (thread CPU / wall)")
    print(f"{'pictures':<14}{'n':>5}{'old CPU':>10}{'new CPU':>10}{'old wall':>10}{'new wall':>10}{'CPU new/old':>13}")
    for g, rs in groups:
        if not rs:
            continue
        oc, ow = (statistics.median(x[i] for x in samples[("old", g)]) for i in (0, 1))
        nc, nw = (statistics.median(x[i] for x in samples[("new", g)]) for i in (0, 1))
        print(f"{g:<14}{len(rs):>5}{oc:>10.1f}{nc:>10.1f}{ow:>10.1f}{nw:>10.1f}{nc / oc:>13.2f}")


if __name__ == "__main__":
    main()
