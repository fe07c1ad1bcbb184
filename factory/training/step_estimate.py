"""An expanding-phase step's seconds from shallow passes: what the dry run and the time budget plan with,
measured without holding the sandwich's deepest shape in memory.

A step costs ``fixed + sum(pass(s) for s in picks_at(step))``: *fixed* is the teacher's forward, expanding the
learngene, clipping and the optimizer; *pass* is one shape's expansion, forward and backward over its
micro-batches and the backward through its expansion. Every block of a ViT shape does the same work, so at one
*block type* ``tau`` (width, heads, MLP ratio, everything but depth) a pass is affine in depth:

    pass(tau @ d) = pass(tau @ 1) + (d - 1) * (pass(tau @ D) - pass(tau @ 1)) / (D - 1)

:func:`estimate_step_seconds` runs every block type of the sandwich at depths 1 and ``D`` (``probe_depth``),
each cut into the micro-batches the type's deepest shape uses in the build, for ``steps`` steps after a warm-up;
takes the median of each pass and of *fixed*; and returns the mean
step over the seeded picks of the phase's first :data:`HORIZON` steps (:func:`factory.core.expanding_phase.picks_at`:
the smallest, the largest every ``largest_every``-th step, the random draws), the figure the phase's step count
multiplies. The deepest pass held is ``D`` blocks, not the sandwich's twice-the-ancestry depth: a 224-px
DeiT-Small sandwich is timed at d6-w384 instead of d24-w384 (its weights, gradients and activations a quarter).

Where: only where the real step holds too much. A sandwich whose largest shape has at most
:data:`PROBE_ABOVE_PARAMS` parameters is measured whole (:func:`factory.training.expanding_loop.measure_step_seconds`:
DeiT-Tiny's d24-w192, 10.7M, held 1.38-1.44 GB in the dry run, under its 1.5-GB target); above it (DeiT-Small's
d24-w384, 42.5M: 2.2-2.4 GB) and deeper than ``D`` the probe times it. The probe is the noisier figure: in one
process after other work it read a DeiT-Tiny step at 0.84-1.07x of the real one, against 1.05-1.08x for the real
step at the dry run's 192-MB cap (``bench/step_estimate.py``; RESULTS).

Choices, configurable: ``D`` = :data:`PROBE_DEPTH` (6: a slope over five blocks, so a d24 figure carries about
4.6x the slope's timing noise; a larger ``D`` is more exact and holds more). The probe returns the freed heap to the
OS after a pass whose shape stands for a pass of a second or more (scaled by depth to its type's deepest shape), as
the phase does after each such pass, so that the pass faults its pages in again as the real one does; at 28 px
(tens of milliseconds a pass) it trims nothing, as the phase trims nothing. Not modelled: a micro-batch's size
moving the time per image (shallow shapes run whole batches, deep ones are cut finer; at 224 px whole batches ran
0.94x the speed of 12-image micro-batches; probing both cuts held as much memory as the real step), and the depth
maps of depths the probe does not run (a few hundred parameters each).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable

from factory.core.expanding_phase import ExpandingConfig, picks_at
from factory.core.shapes import DescendantShape, vit_flops, vit_params
from factory.training.update_timing import adamw_extra_seconds, stateless_optimizer

#: the deeper of the two probe depths (the other is 1)
PROBE_DEPTH = 6
#: the real step is measured where the sandwich's largest shape has at most this many parameters (module docstring)
PROBE_ABOVE_PARAMS = 20_000_000
#: the seeded steps whose picks the estimate averages over (the random draws' long run; a whole cycle of any
#: ``largest_every`` up to it)
HORIZON = 240


def block_type(shape: DescendantShape) -> DescendantShape:
    """``shape`` at depth 1: what every one of its blocks computes (the key its depth is extrapolated by)."""
    return dataclasses.replace(shape, depth=1)


def holds_too_much(shape: DescendantShape, probe_depth: int = PROBE_DEPTH, above_params: float | None = None) -> bool:
    """True for a shape timed from shallow runs rather than whole: deeper than ``probe_depth`` and of more than
    ``above_params`` (default :data:`PROBE_ABOVE_PARAMS`) parameters, so that its weights (with their gradients
    and AdamW state, or their ONNX copies) would set the dry run's peak."""
    limit = PROBE_ABOVE_PARAMS if above_params is None else above_params
    return shape.depth > probe_depth and vit_params(shape) > limit


def extrapolates(
    shapes: list[DescendantShape], probe_depth: int | None = PROBE_DEPTH, above_params: float | None = None
) -> bool:
    """True where :func:`estimate_step_seconds` times ``shapes`` from shallow passes (a shape of the sandwich
    :func:`holds_too_much`); False where the real step is measured."""
    if probe_depth is None or probe_depth < 2:
        return False
    return any(holds_too_much(s, probe_depth, above_params) for s in shapes)


def in_depth(shape: DescendantShape, measure: Callable[[DescendantShape], float]) -> float:
    """``measure(shape)``, or for a shape that :func:`holds_too_much`, :func:`affine_in_depth` between ``measure``
    at depths 1 and :data:`PROBE_DEPTH` of the same width (every block the same work; what is not a block -- data
    loading, stem, head -- in both)."""
    if not holds_too_much(shape):
        return measure(shape)
    one, deeper = (measure(dataclasses.replace(shape, depth=d)) for d in (1, PROBE_DEPTH))
    return affine_in_depth(shape.depth, one, (PROBE_DEPTH, deeper))


def probe_plan(
    shapes: list[DescendantShape], probe_depth: int
) -> tuple[list[DescendantShape], dict[DescendantShape, DescendantShape]]:
    """The probe's shapes (each block type at depth 1 and ``min(probe_depth, deepest)``) and for each the
    sandwich shape whose micro-batches it is cut into (its type's deepest)."""
    deepest: dict[DescendantShape, DescendantShape] = {}
    for s in shapes:
        key = block_type(s)
        if key not in deepest or s.depth > deepest[key].depth:
            deepest[key] = s
    probes, sized_as = [], {}
    for key, deep in deepest.items():
        for d in sorted({1, min(probe_depth, deep.depth)}):
            probe = dataclasses.replace(key, depth=d)
            probes.append(probe)
            sized_as[probe] = deep
    return probes, sized_as


def affine_in_depth(depth: int, at_one: float, at_deeper: tuple[int, float]) -> float:
    """``at_one + (depth - 1) * slope`` with ``slope = (t - at_one) / (d - 1)`` for ``at_deeper = (d, t)``, never
    negative (a deeper run measured faster is noise: a flat line)."""
    d, t = at_deeper
    return at_one + (depth - 1) * max((t - at_one) / (d - 1), 0.0)


def pass_seconds(shape: DescendantShape, probe: dict[DescendantShape, float], probe_depth: int) -> float:
    """A pass of ``shape`` from its type's probe passes at depths 1 and ``D``, affine in depth (module docstring,
    :func:`affine_in_depth`); a type with one probe (no shape deeper than 1) is that probe."""
    key = block_type(shape)
    deep = [p for p in probe if block_type(p) == key and p.depth > 1]
    return affine_in_depth(shape.depth, probe[key], (deep[0].depth, probe[deep[0]])) if deep else probe[key]


@dataclasses.dataclass(frozen=True)
class StepModel:
    """A step's seconds as the probe measured them: ``fixed``, each sandwich shape's pass (extrapolated) and the
    first step's ``one_off`` costs."""

    fixed: float
    passes: dict[DescendantShape, float]
    one_off: float

    def step(self, step: int, by_cost: list[DescendantShape], cfg: ExpandingConfig) -> float:
        """Seconds of ``step``: ``fixed`` plus the passes of the shapes :func:`picks_at` trains at it."""
        return self.fixed + sum(self.passes[s] for s in picks_at(step, by_cost, cfg))

    def mean(self, cfg: ExpandingConfig, steps: range = range(1, HORIZON + 1)) -> float:
        """The mean step over ``steps`` (by default the first :data:`HORIZON` after step 0, which has its own
        one-off costs)."""
        by_cost = sorted(self.passes, key=lambda s: (vit_flops(s), s.label()))
        return sum(self.step(i, by_cost, cfg) for i in steps) / len(steps)


def probe_step(
    lg,
    ancestry,
    shapes: list[DescendantShape],
    cfg: ExpandingConfig,
    *,
    steps: int = 3,
    probe_depth: int = PROBE_DEPTH,
    own: bool = False,
) -> StepModel:
    """Run the probe (:func:`probe_plan`) for ``steps`` steps after a warm-up on random images of the ancestry's
    size and return the :class:`StepModel` of ``shapes``: medians of each probe pass and of ``fixed``, the passes
    extrapolated (:func:`pass_seconds`), the one-off costs the probe's first step less a typical one. The probe
    updates with :func:`~factory.training.update_timing.stateless_optimizer` and ``fixed`` adds
    :func:`~factory.training.update_timing.adamw_extra_seconds`; with ``own`` it trains
    ``lg``'s own tensors (the caller drops ``lg``: one learngene less in memory)."""
    from factory.training.expanding_loop import random_batch, train_learngene

    probes, sized_as = probe_plan(shapes, probe_depth)
    data = random_batch(lg.arch, cfg.batch_size)
    run = dataclasses.replace(cfg, steps=max(2, steps + 1))
    _, report = train_learngene(
        lg,
        ancestry,
        data,
        probes,
        run,
        progress=False,
        picks=lambda _: probes,
        sized_as=sized_as,
        own=own,
        optimizer=stateless_optimizer,
    )
    history = report["history"][1:]
    probe = {p: statistics.median(h["shape_seconds"][p.label()] for h in history) for p in probes}
    fixed = statistics.median(h["seconds"] - sum(h["shape_seconds"].values()) for h in history)
    fixed += adamw_extra_seconds(report["trainable_numel"], device=report["device"])
    one_off = max(0.0, report["history"][0]["seconds"] - statistics.median(h["seconds"] for h in history))
    return StepModel(fixed, {s: pass_seconds(s, probe, probe_depth) for s in shapes}, one_off)


def estimate_step_seconds(
    lg,
    ancestry,
    shapes: list[DescendantShape],
    cfg: ExpandingConfig,
    *,
    steps: int = 3,
    probe_depth: int = PROBE_DEPTH,
    own: bool = False,
) -> tuple[float, float]:
    """``(first step, each further step)`` seconds of the expanding phase ``cfg`` over ``shapes`` on this machine
    (module docstring): the mean step of the :class:`StepModel` over the first :data:`HORIZON` steps, and the
    first one that plus its one-off costs (``own``: :func:`probe_step`)."""
    model = probe_step(lg, ancestry, shapes, cfg, steps=steps, probe_depth=probe_depth, own=own)
    per_step = model.mean(cfg)
    return per_step + model.one_off, per_step
