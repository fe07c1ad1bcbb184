"""onnxruntime helpers shared by verification, benchmarks and the latency model."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np


def ort_session(model: str | Path | bytes, providers=("CPUExecutionProvider",)):
    """An onnxruntime session (default graph optimisations and threads, warnings silenced) for a
    model file or serialised model bytes."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts, providers=list(providers))


def ort_latency_ms(session, x: np.ndarray, *, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time (ms) of ``session.run`` on ``x`` after ``warmup`` runs."""
    feed = {session.get_inputs()[0].name: x}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def ort_logits(session, images: np.ndarray, batch: int = 256) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i : i + batch]})[0] for i in range(0, len(images), batch)])


def ort_accuracy(session, images: np.ndarray, labels: np.ndarray) -> float:
    return float((ort_logits(session, images).argmax(-1) == labels).mean())
