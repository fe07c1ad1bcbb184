"""What a fine-tune's entry keeps besides the model (its confusion matrix and training curve), and the
seconds of a training step on this host that the dry run's estimates are made of."""

from __future__ import annotations

from pathlib import Path

from factory.core.shapes import DescendantShape
from factory.pipeline.context import BuildContext

#: Confusion matrices are kept for tasks of at most this many classes (the report draws them).
MAX_CONFUSION_CLASSES = 50
#: The training curve kept in the manifest has at most this many points.
CURVE_POINTS = 200


def confusion_matrix(model, data) -> list[list[int]] | None:
    """``m[true][predicted]`` counts on ``data`` (None past :data:`MAX_CONFUSION_CLASSES` classes)."""
    import torch

    from factory.training.train import predict_logits

    k = data.num_classes
    if not 1 < k <= MAX_CONFUSION_CLASSES or len(data) == 0:
        return None
    pred = predict_logits(model, data).argmax(-1)
    counts = torch.bincount(data.labels * k + pred, minlength=k * k).reshape(k, k)
    return counts.tolist()


def training_curve(metrics: Path) -> list[list[float]]:
    """``[[step, loss, batch accuracy], ...]`` from a fine-tune's ``metrics.jsonl``, at most :data:`CURVE_POINTS`
    evenly spaced rows (the last one always kept)."""
    import json

    rows = []
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            r = json.loads(line)
            rows.append([int(r["step"]), round(float(r["loss"]), 4), round(float(r.get("acc", float("nan"))), 4)])
        except (ValueError, KeyError, TypeError):
            continue
    if len(rows) > CURVE_POINTS:
        stride = len(rows) / CURVE_POINTS
        rows = [rows[int(i * stride)] for i in range(CURVE_POINTS - 1)] + [rows[-1]]
    return rows


def step_seconds(ctx: BuildContext, shape: DescendantShape, batch: int) -> float:
    """Seconds of one training step (forward + backward ~ 3 forwards) on this host, by the roofline
    with this host's measured GEMM rate and bandwidth (measured once per context)."""
    from factory.device.measure import measure_host
    from factory.device.roofline import CostModel, Device, Efficiency

    if ctx.host is None:
        ctx.host = measure_host(0.2)
    model = CostModel(
        Device(ctx.host.peak_flops, ctx.host.bandwidth, "onnxruntime", 1e9, False),
        "fp32",
        batch,
        Efficiency(),
        ctx.ancestry.arch,
    )
    return 3 * model.latency_ms(shape) / 1e3
