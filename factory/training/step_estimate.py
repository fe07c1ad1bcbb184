"""An expanding-phase step's seconds from shallow passes: what the dry run and the time budget plan with,
measured without holding the sandwich's deepest shape in memory.

A step costs ``fixed + sum(pass(s) for s in picks_at(step))``: *fixed* is the teacher's forward, expanding the
learngene, clipping and the optimizer; *pass* is one shape's expansion, forward and backward over its
micro-batches and the backward through its expansion. Every block of a ViT shape does the same work, so at one
*block type* ``tau`` (width, heads, MLP ratio, everything but depth) and one micro-batch size a pass is affine in
depth:

    pass_m(tau @ d) = pass_m(tau @ 1) + (d - 1) * (pass_m(tau @ D) - pass_m(tau @ 1)) / (D - 1)

The micro-batch size ``m`` is not the same for every depth (:mod:`factory.training.micro_batch`: a deep shape is
cut finer), and a CPU's time per image moves with it (DeiT-Tiny at 224 px: whole batches 0.94x the speed of
12-image micro-batches, 6-image ones 0.90x; RESULTS). So each block type is probed at depths 1 and ``D``
(``probe_depth``) in the micro-batches of its deepest shape (``m_lo`` images), and again in those of its
shallowest (``m_hi``; at depths 1 and the deepest cut that way, so no probe exceeds the build's activation
budget), and a shape cut into micro-batches of ``m = batch / pieces`` images is interpolated between the two in
``log m``:

    pass(s) = pass_lo(d) + lam * (pass_hi(d) - pass_lo(d)),   lam = log(m / m_lo) / log(m_hi / m_lo)

:func:`probe_step` runs both probes for ``steps`` steps after a warm-up, takes medians (of each pass, and of
*fixed* in the run whose teacher is cut as the build's), and :meth:`StepModel.mean` is the mean step over the
seeded picks of the phase's first :data:`HORIZON` steps (:func:`factory.core.expanding_phase.picks_at`: the
smallest, the largest every ``largest_every``-th step, the random draws), the figure the phase's step count
multiplies. The deepest pass held is ``D`` blocks, not the sandwich's twice-the-ancestry depth: a 224-px DeiT-Small
sandwich is timed at d6-w384 instead of d24-w384.

Choices, configurable: ``D`` = :data:`PROBE_DEPTH` (6: a slope over five blocks, so a d24 figure carries about 4.6x
the slope's timing noise; a larger ``D`` is more exact and holds more). A sandwich no deeper than ``D`` is measured
directly (:func:`factory.training.expanding_loop.measure_step_seconds`). Not modelled: the heap trims after passes
of a second or more (2-4% of a 224-px step) and the depth maps of depths the probe does not run (a few hundred
parameters each); ``bench/step_estimate.py`` measures the estimate against the real step.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable

import torch

from factory.core.expanding_phase import ExpandingConfig, picks_at
from factory.core.shapes import DescendantShape, vit_flops
from factory.training.micro_batch import activation_mb_per_image, micro_batch_size, spans

#: the deeper of the two probe depths (the other is 1)
PROBE_DEPTH = 6
#: the seeded steps whose picks the estimate averages over (the random draws' long run; a whole cycle of any
#: ``largest_every`` up to it)
HORIZON = 240


def block_type(shape: DescendantShape) -> DescendantShape:
    """``shape`` at depth 1: what every one of its blocks computes (the key its depth is extrapolated by)."""
    return dataclasses.replace(shape, depth=1)


def extrapolates(shapes: list[DescendantShape], probe_depth: int | None = PROBE_DEPTH) -> bool:
    """True where :func:`estimate_step_seconds` times ``shapes`` from shallow passes (a shape deeper than the
    probe depth), False where the real step is measured."""
    return probe_depth is not None and probe_depth >= 2 and max((s.depth for s in shapes), default=0) > probe_depth


def probe_plan(
    shapes: list[DescendantShape], probe_depth: int, per_piece: Callable[[DescendantShape], float] | None = None
) -> tuple[list[DescendantShape], dict[DescendantShape, DescendantShape]]:
    """The probe's shapes and for each the sandwich shape whose micro-batches it is cut into. Without
    ``per_piece``: each block type at depths 1 and ``min(probe_depth, deepest)`` in its deepest shape's
    micro-batches. With ``per_piece`` (a shape's images per micro-batch): in the micro-batches of its shallowest,
    at depths 1 and the deepest shape cut as the shallowest is (at most ``probe_depth``), so no probe holds more
    activations than the build's budget allows."""
    by_type: dict[DescendantShape, list[DescendantShape]] = {}
    for s in sorted(shapes, key=lambda s: s.depth):
        by_type.setdefault(block_type(s), []).append(s)
    probes, sized_as = [], {}
    for key, same in by_type.items():
        ref = same[-1] if per_piece is None else [s for s in same if per_piece(s) == per_piece(same[0])][-1]
        for d in sorted({1, min(probe_depth, ref.depth)}):
            probe = dataclasses.replace(key, depth=d)
            probes.append(probe)
            sized_as[probe] = ref
    return probes, sized_as


def affine_pass(shape: DescendantShape, probe: dict[DescendantShape, float]) -> float:
    """A pass of ``shape`` from its type's probe passes at depths 1 and ``D`` (one micro-batch size), affine in
    depth (module docstring); a type probed at one depth is that probe. A deeper probe measured faster (noise)
    gives a flat line, never a falling one."""
    key = block_type(shape)
    one = probe[key]
    deep = [p for p in probe if p.depth > 1 and block_type(p) == key]
    if not deep:
        return one
    slope = (probe[deep[0]] - one) / (deep[0].depth - 1)
    return one + (shape.depth - 1) * max(slope, 0.0)


def between(at: float, lo: tuple[float, float], hi: tuple[float, float]) -> float:
    """``lo[1] + lam * (hi[1] - lo[1])`` with ``lam = log(at / lo[0]) / log(hi[0] / lo[0])`` clamped to ``[0, 1]``:
    a pass at micro-batches of ``at`` images from the passes at ``lo[0]`` and ``hi[0]`` images."""
    if hi[0] == lo[0]:
        return lo[1]
    lam = min(1.0, max(0.0, math.log(at / lo[0]) / math.log(hi[0] / lo[0])))
    return lo[1] + lam * (hi[1] - lo[1])


@dataclasses.dataclass(frozen=True)
class StepModel:
    """A step's seconds as the probe measured them: ``fixed``, each sandwich shape's pass and the first step's
    ``one_off`` costs."""

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


def _run_probe(lg, ancestry, shapes, cfg, steps, probe_depth, per_piece=None):
    """One probe run (:func:`probe_plan`): ``(median pass per probe, median fixed, first step's one-off seconds,
    the run's report)``."""
    from factory.data import ImageTensors
    from factory.training.expanding_loop import train_learngene

    arch = lg.arch
    probes, sized_as = probe_plan(shapes, probe_depth, per_piece)
    images = torch.randn(cfg.batch_size, arch.in_chans, arch.img_size, arch.img_size)
    data = ImageTensors(images, torch.zeros(cfg.batch_size, dtype=torch.int64), ["x"])
    run = dataclasses.replace(cfg, steps=max(2, steps + 1))
    _, report = train_learngene(
        lg, ancestry, data, probes, run, progress=False, picks=lambda _: probes, sized_as=sized_as
    )
    history = report["history"][1:]
    probe = {p: statistics.median(h["shape_seconds"][p.label()] for h in history) for p in probes}
    fixed = statistics.median(h["seconds"] - sum(h["shape_seconds"].values()) for h in history)
    one_off = max(0.0, report["history"][0]["seconds"] - statistics.median(h["seconds"] for h in history))
    return probe, fixed, one_off, report


def probe_step(
    lg, ancestry, shapes: list[DescendantShape], cfg: ExpandingConfig, *, steps: int = 3, probe_depth: int = PROBE_DEPTH
) -> StepModel:
    """Probe ``shapes``' sandwich for ``steps`` steps after a warm-up on random images of the ancestry's size, in
    its deepest shapes' micro-batches and, where any type's shallowest is cut otherwise, in theirs; return the
    :class:`StepModel` (module docstring)."""
    from factory.training.expanding_loop import prefix_tokens

    lo, fixed, one_off, report = _run_probe(lg, ancestry, shapes, cfg, steps, probe_depth)
    size, batch = report["distill_img_size"], cfg.batch_size
    tokens = (size // lg.arch.patch_size) ** 2 + prefix_tokens(ancestry.model)

    def images_per_piece(s: DescendantShape) -> float:
        per = activation_mb_per_image(s.depth, tokens, s.embed_dim, s.mlp_hidden, report["precision"])
        return batch / len(spans(batch, micro_batch_size(batch, per, report["memory_mb"])))

    by_type: dict[DescendantShape, list[float]] = {}
    for s in shapes:
        by_type.setdefault(block_type(s), []).append(images_per_piece(s))
    m_lo = {k: min(v) for k, v in by_type.items()}
    m_hi = {k: max(v) for k, v in by_type.items()}
    hi = lo
    if m_lo != m_hi:
        hi, _, _, _ = _run_probe(lg, ancestry, shapes, cfg, steps, probe_depth, images_per_piece)
    passes = {}
    for s in shapes:
        key = block_type(s)
        low, high = (m_lo[key], affine_pass(s, lo)), (m_hi[key], affine_pass(s, hi))
        passes[s] = between(images_per_piece(s), low, high)
    return StepModel(fixed, passes, one_off)


def estimate_step_seconds(
    lg, ancestry, shapes: list[DescendantShape], cfg: ExpandingConfig, *, steps: int = 3, probe_depth: int = PROBE_DEPTH
) -> tuple[float, float]:
    """``(first step, each further step)`` seconds of the expanding phase ``cfg`` over ``shapes`` on this machine
    (module docstring): the mean step of the :class:`StepModel` over the first :data:`HORIZON` steps, and the
    first one that plus its one-off costs."""
    model = probe_step(lg, ancestry, shapes, cfg, steps=steps, probe_depth=probe_depth)
    per_step = model.mean(cfg)
    return per_step + model.one_off, per_step
