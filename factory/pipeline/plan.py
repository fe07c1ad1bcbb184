"""The dry run: per device the chosen shape, and per stage of :data:`factory.pipeline.stages.STAGES`
whether it is cached or will run, with a time estimate (:attr:`StageSpec.estimate_s`)."""

from __future__ import annotations

from typing import Any

from factory.core.learngene import Learngene
from factory.core.shapes import DescendantShape
from factory.pipeline.config import given_learngene
from factory.pipeline.stages import (
    EXPORT,
    FINETUNE,
    INIT,
    LEARNGENE,
    MEASURE,
    BuildContext,
    ExportItem,
    ModelItem,
    decided_init,
    entry_for,
    shipped_learngene,
    step_seconds,
)


def plan(ctx: BuildContext, devices: list[dict[str, Any]], profiles, objective: str) -> dict[str, Any]:
    """What a build would do (nothing is written); the returned dict is the dry run's ``--json``."""
    from factory.device.accuracy import EstimatorConfig

    log, cfg = ctx.log, ctx.cfg
    recipe = LEARNGENE.inputs(ctx, None)  # the stage's key inputs, computed once
    lg_entry = ctx.cache.entry(LEARNGENE.name, recipe)
    given = given_learngene(cfg, ctx.ancestry) if "given" in recipe else None
    shipped = shipped_learngene(recipe) if given is None else None
    if given is not None:
        ctx.learngene = given
        log(f"learngene: the given one ({cfg.learngene}), no expanding phase")
    elif lg_entry.cached:
        ctx.learngene = Learngene.load(lg_entry.path / "learngene")
        log("learngene: cached")
    elif shipped is not None:
        ctx.learngene = shipped
        log("learngene: the shipped demo learngene (same recipe)")
    else:
        steps = (recipe["expanding"] or {}).get("steps", 0)
        estimate = LEARNGENE.estimate_s(ctx, None)
        log(
            f"learngene: will be sampled{f' and trained for {steps} expanding-phase steps (~{estimate:.0f}s)' if steps else ''}"
        )
    by_name = {p.name: p for p in profiles}
    rows = []
    for device in devices:
        entry = device.to_manifest()
        if device.is_failed:
            log(f"{entry['name']}: FAILS at search: {entry['error']}")
            rows.append(entry)
            continue
        shape = DescendantShape.from_dict(entry["shape"])
        init = decided_init(ctx, shape)
        ft = entry_for(ctx, FINETUNE, shape) if ctx.learngene is not None and init is not None else None
        seconds = FINETUNE.estimate_s(ctx, shape)
        extra: dict[str, Any] = {"init": init or "auto (decided before fine-tuning)"}
        if cfg.init == "auto" and init is None:
            extra["init_estimate_s"] = INIT.estimate_s(ctx, shape)  # unrounded: a tiny shape takes well under 0.1 s
            log(
                f"{entry['name']}: --init auto will probe {', '.join(cfg.init_probe.candidates)} at {shape.label()} "
                f"(~{extra['init_estimate_s']:.1f}s) before fine-tuning"
            )
        elif cfg.init == "auto":
            log(f"{entry['name']}: --init auto chose {init} at {shape.label()} (cached)")
        if objective == "accuracy":
            est = EstimatorConfig(candidates=cfg.candidates)
            probe_steps = est.probe_steps(est.candidates, cfg.finetune_steps)
            extra["estimator_estimate_s"] = round(probe_steps * step_seconds(ctx, shape, cfg.batch_size), 1)
            log(
                f"{entry['name']}: accuracy estimate of up to {est.candidates} Pareto candidates by successive halving "
                f"(rungs {'/'.join(map(str, est.rungs_for(cfg.finetune_steps)))} steps, {probe_steps} steps in all) "
                f"will run unless cached (<= ~{extra['estimator_estimate_s']:.0f}s); the capacity choice is {shape.label()}"
            )
        cached = ft is not None and ft.cached
        after = "measure + export will run unless cached (~10s)"
        if cached:
            model = ft.path / "model.safetensors"
            prof = by_name[entry["name"]]
            done = [
                entry_for(ctx, MEASURE, ModelItem(shape, model)).cached,
                entry_for(ctx, EXPORT, ExportItem(prof.name, prof, entry["profile_sha256"], model)).cached,
            ]
            after = "measure + export cached" if all(done) else after
        log(
            f"{entry['name']}: shape {shape.label()}; finetune {'cached' if cached else f'will run (~{seconds:.0f}s)'}; {after}"
        )
        rows.append({**entry, "finetune_cached": cached, "finetune_estimate_s": round(seconds, 1), **extra})
    return {"dry_run": True, "devices": rows, "learngene_cached": lg_entry.cached}
