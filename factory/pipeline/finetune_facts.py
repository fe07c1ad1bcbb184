"""What a fine-tune's entry keeps besides the model (its confusion matrix and training curve), and the
measurements on this host that the dry run's estimates and a time budget's plan are made of (a fine-tuning
step, a fine-tune's evaluations, the measure stage's reference round)."""

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
    """Seconds of one fine-tuning step of ``shape`` at ``batch`` on this host, measured (once per context and
    (shape, batch)): :data:`MEASURED_STEPS` real steps of the build's recipe -- its device, precision and
    training data, so data loading is in it -- from scratch weights, the first (its one-off costs) left out,
    the median of the rest. A roofline guess was 1.6x optimistic here (bf16 on a CPU, small kernels)."""
    import dataclasses
    import statistics

    from factory.core.baselines import init_descendant
    from factory.pipeline.config import finetune_recipe
    from factory.training.train import train

    key = (shape.label(), batch)
    if key not in ctx.step_times:
        model = init_descendant("scratch", shape, ancestry=ctx.ancestry, learngene=None, seed=ctx.cfg.seed)
        recipe = dataclasses.replace(
            finetune_recipe(ctx.cfg), steps=MEASURED_STEPS, batch_size=batch, warmup_steps=1, ckpt_every=0
        )
        history = train(model, ctx.data.train, recipe, progress=False).history
        ctx.step_times[key] = statistics.mean(h["seconds"] for h in history[1:])
    return ctx.step_times[key]


#: Real fine-tuning steps :func:`step_seconds` runs (the first is left out).
MEASURED_STEPS = 6


def evaluation_seconds(ctx: BuildContext, shape: DescendantShape) -> float:
    """A fine-tune's evaluations after its steps (validation, test, the confusion matrix's pass): their
    forwards, a third of a training step's work per image, at the fine-tune's batch."""
    images = len(ctx.data.val) + 2 * len(ctx.data.test)
    return images / ctx.cfg.batch_size * step_seconds(ctx, shape, ctx.cfg.batch_size) / 3


def round_seconds(ctx: BuildContext, shape: DescendantShape) -> float:
    """Seconds of the measure stage's own work for ``shape`` on this host, measured once per context: the
    ONNX export, onnxruntime session and timed runs of :func:`factory.device.measure.measure_onnxruntime_latency`
    (FLOPs counting is a small part besides). The export estimate is this *reference round* times each
    format's :attr:`export.formats.FormatSpec.cost`."""
    import time

    from factory.device.measure import measure_onnxruntime_latency

    if shape.label() not in ctx.round_times:
        start = time.perf_counter()
        measure_onnxruntime_latency(shape, 1, arch=ctx.ancestry.arch)
        ctx.round_times[shape.label()] = time.perf_counter() - start
    return ctx.round_times[shape.label()]
