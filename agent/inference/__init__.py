"""Batch inference: images in (url, path or base64 data), detections out, fast, resumable, bounded in memory.

Modules, one job each: ``config`` (the ``[inference]`` section), ``params`` (the ``infer`` request and result
models), ``sources`` (bytes of one image, with limits and ``input_dirs`` confinement), ``pipeline`` (ordered,
bounded decode/preprocess in worker threads ahead of inference), ``predict`` (one prepared image through the
model, with the request's filters), ``formats`` (json / vott-csv outputs), ``annotate`` (draw results on a copy),
``upload`` (HTTP PUT of outputs), ``batch`` (the chunked, checkpointed job loop).

This package is imported by the agent at start-up (for the config section): only ``batch`` and below import
numpy/cv2, and only when a job runs.
"""
