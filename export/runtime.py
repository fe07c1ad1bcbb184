"""onnxruntime helpers shared by verification, benchmarks and the latency model."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np


def ort_session(model: str | Path | bytes, providers=("CPUExecutionProvider",), threads: int | None = None):
    """An onnxruntime session (default graph optimisations, warnings silenced) for a model file or
    serialised model bytes; ``threads`` sets the intra-op thread count (default: onnxruntime's, all cores)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts, providers=list(providers))


LATENCY_STATS = ("median", "min")


def summarise_times(times: list[float], stat: str = "median") -> float:
    """One latency from repeated timings. ``median``: the typical run, what a dedicated device
    reports. ``min``: the least-disturbed run -- on a shared host other tenants only ever add time,
    so the minimum is the most repeatable estimate of the uncontended latency (timeit's advice)."""
    if stat not in LATENCY_STATS:
        raise ValueError(f"latency statistic must be one of {LATENCY_STATS}, got {stat!r}")
    return min(times) if stat == "min" else statistics.median(times)


def ort_latency_ms(session, x: np.ndarray, *, repeats: int = 20, warmup: int = 3, stat: str = "median") -> float:
    """Wall time (ms) of ``session.run`` on ``x`` after ``warmup`` runs: the ``stat``
    (:func:`summarise_times`) of ``repeats`` runs."""
    feed = {session.get_inputs()[0].name: x}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return summarise_times(times, stat)


def ort_logits(session, images: np.ndarray, batch: int = 256) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i : i + batch]})[0] for i in range(0, len(images), batch)])


def ort_accuracy(session, images: np.ndarray, labels: np.ndarray) -> float:
    return float((ort_logits(session, images).argmax(-1) == labels).mean())
