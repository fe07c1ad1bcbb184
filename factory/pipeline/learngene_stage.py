"""The build's ``learngene`` stage: where the learngene comes from (:func:`learngene_source`), its key inputs,
making it (sampling, then the expanding phase when the recipe asks for one) and the dry run's estimate of that.
The stage's entry in the table is :data:`factory.pipeline.stages.LEARNGENE`."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from factory.core.assets import PACKAGED_LEARNGENE
from factory.core.learngene import Learngene
from factory.pipeline.config import (
    BuildConfig,
    build_learngene_recipe,
    expanding_config,
    expanding_data,
    given_learngene,
    recipe_of,
)
from factory.pipeline.context import BuildContext, measured_memory_mb

#: The stage's name (its cache folder).
LEARNGENE_STAGE = "learngene"


def shipped_learngene(recipe: Mapping[str, Any]) -> Learngene | None:
    """The packaged demo learngene if it was made with exactly ``recipe``."""
    if not (PACKAGED_LEARNGENE / "learngene.json").is_file():
        return None
    shipped = Learngene.load(PACKAGED_LEARNGENE)
    return shipped if recipe_of(shipped) == recipe else None


def learngene_inputs(ctx: BuildContext, _: None) -> dict[str, Any]:
    return build_learngene_recipe(ctx.cfg, ctx.ancestry)


@dataclass(frozen=True)
class LearngeneSource:
    """Where a build's learngene comes from -- the one answer the run, the estimate and the dry run read.

    ``kind``: ``given`` (``--learngene DIR``), ``cached`` (this build's cache holds it), ``shipped`` (the
    packaged demo learngene, made with exactly this recipe), ``sampled`` (sampled now, no expanding phase)
    or ``expanded`` (sampled now, then trained by ``steps`` expanding-phase steps). ``learngene`` is set
    when it is to hand without running anything."""

    kind: Literal["given", "cached", "shipped", "sampled", "expanded"]
    learngene: Learngene | None = None
    steps: int = 0

    @property
    def runs_expanding_phase(self) -> bool:
        return self.kind == "expanded"

    def describe(self, cfg: BuildConfig) -> str:
        return {
            "given": f"the given learngene {cfg.learngene}",
            "cached": "cached",
            "shipped": "the shipped demo learngene (same recipe, not retrained)",
            "sampled": "sampled, no expanding phase",
            "expanded": f"sampled and trained for {self.steps} expanding-phase steps",
        }[self.kind]


def learngene_source(ctx: BuildContext, *, cache: bool = True) -> LearngeneSource:
    """Where the learngene comes from (:class:`LearngeneSource`); ``cache=False`` ignores this build's cache
    (the stage itself, which runs only when the entry is not cached)."""
    recipe = learngene_inputs(ctx, None)
    given = given_learngene(ctx.cfg, ctx.ancestry)
    if given is not None:
        return LearngeneSource("given", given)
    if cache:
        entry = ctx.cache.entry(LEARNGENE_STAGE, recipe)
        if entry.cached:
            return LearngeneSource("cached", Learngene.load(entry.path / "learngene"))
    shipped = shipped_learngene(recipe)
    if shipped is not None:
        return LearngeneSource("shipped", shipped)
    steps = (recipe["expanding"] or {}).get("steps", 0)
    return LearngeneSource("expanded" if steps else "sampled", None, steps)


def _sample(ctx: BuildContext, recipe: Mapping[str, Any]) -> Learngene:
    from factory.core.learngene import sample_learngene

    return sample_learngene(
        ctx.ancestry,
        recipe["layers"],
        recipe["heads"],
        seed=recipe["seed"],
        tau=recipe["tau"],
        rescale=recipe["rescale"],
        head_mixing=recipe["head_mixing"],
    )


def run_learngene(ctx: BuildContext, _: None, tmp: Path, work: Path) -> dict[str, Any]:
    from factory.core.expanding_phase import ExpandingConfig, default_shapes
    from factory.training.expanding_loop import run_expanding_phase

    anc, t0 = ctx.ancestry, time.perf_counter()
    recipe = learngene_inputs(ctx, None)
    source = learngene_source(ctx, cache=False)
    how = source.describe(ctx.cfg)
    lg = source.learngene
    if lg is None:
        lg = _sample(ctx, recipe)
        how = f"sampled {lg.num_layers} layers x {lg.num_heads} heads"
        if source.runs_expanding_phase:
            data, ds = expanding_dataset(ctx)
            exp = ExpandingConfig(**recipe["expanding"], amp=ctx.cfg.amp)
            lg, _ = run_expanding_phase(
                lg, anc, ds, default_shapes(lg), exp, work=work, log=ctx.log, what="learngene expanding phase"
            )
            how += f", trained {source.steps} expanding-phase steps on {data}"
    lg.save(tmp / "learngene")
    ctx.log(f"learngene: {how} in {time.perf_counter() - t0:.1f}s")
    return {"seconds": round(time.perf_counter() - t0, 2), "how": how, "source": source.kind}


def expanding_dataset(ctx: BuildContext):
    """``(spec, dataset)`` of the images the expanding phase distils on (:func:`expanding_data`): the build's
    own data where it is those, else loaded once per context (``ctx.expanding_data``: the batch check at set-up
    and the phase itself read the same loaded set)."""
    from factory.data import load_dataset

    anc, data = ctx.ancestry, expanding_data(ctx.cfg, ctx.ancestry)
    if data == ctx.cfg.data:
        return data, ctx.data
    if ctx.expanding_data is None or ctx.expanding_data[0] != data:
        loaded = load_dataset(
            data, img_size=anc.arch.img_size, in_chans=anc.arch.in_chans, min_side=anc.arch.patch_size
        )
        ctx.expanding_data = (data, loaded)
    return ctx.expanding_data


def fit_expanding_batch(ctx: BuildContext) -> None:
    """Cap the expanding batch at the training split of the images the phase distils on, and say so
    (:func:`factory.training.batches.fit_batch`): ``ctx.cfg.expand_batch_size`` set before any recipe is hashed."""
    from factory.training.batches import fit_batch

    data, ds = expanding_dataset(ctx)
    batch, note = fit_batch(expanding_config(ctx.cfg).batch_size, len(ds.train), split=f"the training split of {data}")
    if note:
        ctx.log(f"expanding phase: {note}")
        ctx.cfg = dataclasses.replace(ctx.cfg, expand_batch_size=batch)


def estimate_learngene(ctx: BuildContext, _: None) -> float:
    """The learngene stage's time, measured here (:func:`expanding_costs`): sampling it, then the expanding
    phase's first step (its one-off costs) plus ``steps - 1`` times a step; 0 when it will not run."""
    recipe = learngene_inputs(ctx, None)
    if not learngene_source(ctx, cache=False).runs_expanding_phase:
        return 0.0
    sampling, first, per_step = expanding_costs(ctx)
    return sampling + first + max(0, recipe["expanding"]["steps"] - 1) * per_step


def expanding_costs(ctx: BuildContext) -> tuple[float, float, float]:
    """``(sampling, first step, each further step)`` seconds of the learngene the build would train, measured
    on this host: the sampling itself, then three expanding-phase steps of the configured batch, input size and
    precision (:func:`factory.training.expanding_loop.measure_step_seconds`; a sandwich whose real step holds
    too much -- a largest shape above :data:`~factory.training.step_estimate.PROBE_ABOVE_PARAMS` parameters, e.g.
    DeiT-Small's d24 -- from its shallow passes in the build's own micro-batches, :mod:`factory.training.step_estimate`;
    others measured whole in micro-batches of at most the dry run's cap). Measured once per
    context (:attr:`BuildContext.expanding_times`): a budgeted dry run's first plan and its learngene estimate
    are the same figures -- two measurements in one run were 0.33 and 0.44 s a step apart -- and a 224-px step
    (about a GB and 15 s to measure) is not paid twice."""
    from factory.core.expanding_phase import default_shapes
    from factory.pipeline.config import expanding_config, phase_share
    from factory.training.expanding_loop import measure_step_seconds
    from factory.training.step_estimate import PROBE_DEPTH, estimate_step_seconds, extrapolates

    if ctx.expanding_times is not None:
        return ctx.expanding_times
    recipe = learngene_inputs(ctx, None)
    build = expanding_config(ctx.cfg)  # the step count aside, the phase the build runs
    t0 = time.perf_counter()
    lg = _sample(ctx, recipe)
    sampling = time.perf_counter() - t0
    shapes = default_shapes(lg)
    if extrapolates(shapes):  # shallow passes, in the build's own micro-batches: no cap needed
        exp, how = build, f"; depths over {PROBE_DEPTH} extrapolated from passes at d1 and d{PROBE_DEPTH}"
        first, per_step = estimate_step_seconds(lg, ctx.ancestry, shapes, exp, own=True)  # lg: ours, dropped
    else:
        exp = dataclasses.replace(build, memory_mb=measured_memory_mb(ctx, build.memory_mb, build.device))
        how = f"; micro-batches of at most {exp.memory_mb:.0f} MB, an upper bound" if exp != build else ""
        first, per_step = measure_step_seconds(lg, ctx.ancestry, shapes, exp, first=True, own=True)
    every = exp.largest_every
    sandwich = f"; the largest shape every {every} steps: a cycle's mean" if every > 1 else ""
    sandwich = "; the largest shape only when drawn" if every == 0 else sandwich
    if sandwich:  # what --expand-min-steps and the budget count it as (config.phase_share)
        sandwich += f", each step worth {phase_share(ctx.cfg, ctx.ancestry):.2f} of the full sandwich's"
    ctx.log(
        f"learngene: one expanding-phase step measured at {per_step:.2f}s (batch {exp.batch_size}, "
        f"{exp.distill_img_size or ctx.ancestry.arch.img_size} px; the first {first:.2f}s, sampling {sampling:.2f}s"
        f"{how}{sandwich})"
    )
    ctx.expanding_times = (sampling, first, per_step)
    return ctx.expanding_times
