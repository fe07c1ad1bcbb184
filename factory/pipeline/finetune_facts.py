"""What a fine-tune's entry keeps besides the model (its confusion matrix and training curve), and the
measurements on this host that the dry run's estimates and a time budget's plan are made of (a fine-tuning
step, a fine-tune's evaluations, the measure stage's reference round)."""

from __future__ import annotations

import math
from pathlib import Path

from factory.core.shapes import DescendantShape
from factory.pipeline.context import BuildContext, measured_memory_mb

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
    (shape, batch)): real steps of the build's recipe -- its device, precision and training data, so data
    loading is in it -- from scratch weights, the first (its one-off costs) left out, the mean of the rest.
    At least :data:`MEASURED_STEPS` steps and :data:`MEASURED_SECONDS` of them (at most
    :data:`MAX_MEASURED_STEPS`): a burst of a few fast steps ran 15-20% faster than the same shape's 3,000-step
    fine-tune on this machine (bench/RESULTS.md, "A wall-clock budget"). A roofline guess was 1.6x optimistic."""
    key = (shape.label(), batch)
    if key not in ctx.step_times:
        ctx.step_times[key] = _in_a_worker_thread(lambda: _measure_steps(ctx, shape, batch), ctx.cfg.jobs)
    return ctx.step_times[key]


def _in_a_worker_thread(fn, jobs: int):
    """``fn()`` run where the build's fine-tunes run -- a worker thread of :class:`~factory.pipeline.executor.
    LocalExecutor`, its intra-op threads -- since a step there was measured 10-20% slower than the same step in
    the main thread (its own OpenMP team)."""
    from concurrent.futures import ThreadPoolExecutor

    from factory.pipeline.executor import LocalExecutor
    from factory.training.precision import intra_op_threads

    def run():
        with intra_op_threads(LocalExecutor(jobs).threads):
            return fn()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(run).result()


def _measure_steps(ctx: BuildContext, shape: DescendantShape, batch: int) -> float:
    """The mean seconds of the measured steps (:func:`step_seconds`). The first step of *each* run of steps is
    left out: it waits for a new loader, whose worker processes start then (a streamed folder's).

    A shape whose weights, gradients and AdamW state would set the dry run's peak
    (:func:`factory.training.step_estimate.holds_too_much`) is timed at depths 1 and
    :data:`~factory.training.step_estimate.PROBE_DEPTH` instead, its step affine in depth between them
    (:func:`factory.training.step_estimate.in_depth`; a DeiT-Small-wide d21-w352 at 224 px, batch 32: 0.90-1.08x of
    its real step in two orders)."""
    from factory.training.step_estimate import in_depth

    return in_depth(shape, lambda at: _measure_whole(ctx, at, batch))


def _measure_whole(ctx: BuildContext, shape: DescendantShape, batch: int) -> float:
    """:func:`_measure_steps` of ``shape`` itself."""
    import dataclasses
    import math
    import statistics

    from factory.core.baselines import init_descendant
    from factory.pipeline.config import finetune_recipe
    from factory.training.train import train

    model = init_descendant("scratch", shape, ancestry=ctx.ancestry, learngene=None, seed=ctx.cfg.seed)
    build = finetune_recipe(ctx.cfg)
    memory = measured_memory_mb(ctx, build.memory_mb, build.device)
    recipe = dataclasses.replace(build, batch_size=batch, warmup_steps=1, ckpt_every=0, memory_mb=memory)
    carry: dict = {}
    steps = train(
        model, ctx.data.train, dataclasses.replace(recipe, steps=MEASURED_STEPS), progress=False, carry=carry
    ).history[1:]
    per_step = statistics.mean(h["seconds"] for h in steps)
    more = min(MAX_MEASURED_STEPS, math.ceil(MEASURED_SECONDS / max(per_step, 1e-6))) - MEASURED_STEPS
    if more > 0:  # short steps: enough of them to see the sustained pace
        longer = dataclasses.replace(recipe, steps=MEASURED_STEPS + more)
        steps += train(model, ctx.data.train, longer, progress=False, carry=carry).history[1:]
        per_step = statistics.mean(h["seconds"] for h in steps)
    return per_step


#: Real fine-tuning steps :func:`step_seconds` runs at least (the first is left out) ...
MEASURED_STEPS = 6
#: ... and enough for this many seconds of steps, at most :data:`MAX_MEASURED_STEPS`.
MEASURED_SECONDS = 3.0
MAX_MEASURED_STEPS = 60


def evaluation_seconds(ctx: BuildContext, shape: DescendantShape) -> float:
    """A fine-tune's evaluations (the validation split at its last step, and every ``eval_every`` steps where it
    keeps its best weights; then the test split and the confusion matrix's pass): their forwards, a third of a
    training step's work per image, at the fine-tune's batch."""
    from factory.pipeline.config import finetune_stage_recipe

    recipe = finetune_stage_recipe(ctx.cfg, ctx.data)
    evals = math.ceil(recipe.steps / recipe.eval_every) if recipe.keep_best else 1  # the last step's included
    images = evals * len(ctx.data.val) + 2 * len(ctx.data.test)
    return images / ctx.cfg.batch_size * step_seconds(ctx, shape, ctx.cfg.batch_size) / 3


def round_seconds(ctx: BuildContext, shape: DescendantShape) -> float:
    """Seconds of the measure stage's own work for ``shape`` on this host, measured once per context: the
    ONNX export, onnxruntime session and timed runs of :func:`factory.device.measure.measure_onnxruntime_latency`
    (FLOPs counting is a small part besides). The export estimate is this *reference round* times each
    format's :attr:`export.formats.FormatSpec.cost`. A large deep shape is timed at depths 1 and
    :data:`~factory.training.step_estimate.PROBE_DEPTH` and taken affine in depth
    (:func:`factory.training.step_estimate.in_depth`): the export and session of a DeiT-Small-wide d21 added 1.0 GB
    to the dry run (0.35 GB at d6), and its round took 9.2 s against 10.1 s extrapolated from 0.66 s (d1) and 3.0 s
    (d6)."""
    import time

    from factory.device.measure import measure_onnxruntime_latency
    from factory.training.step_estimate import in_depth

    def timed(at: DescendantShape) -> float:
        start = time.perf_counter()
        measure_onnxruntime_latency(at, 1, arch=ctx.ancestry.arch)
        return time.perf_counter() - start

    if shape.label() not in ctx.round_times:
        ctx.round_times[shape.label()] = in_depth(shape, timed)
    return ctx.round_times[shape.label()]
