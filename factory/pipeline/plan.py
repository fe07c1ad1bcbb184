"""The dry run: per device the chosen shape, and per stage of :data:`factory.pipeline.stages.STAGES` --
walked in the table's order and scope, the one the build runs -- whether it is cached or will run, with
its time estimate (:attr:`StageSpec.estimate_s`) and the total. A shape that several devices share is
fine-tuned (and counted) once."""

from __future__ import annotations

from typing import Any

from factory.core.shapes import DescendantShape
from factory.pipeline.stages import (
    EXPORT,
    FINETUNE,
    INIT,
    LEARNGENE,
    MEASURE,
    STAGES,
    BuildContext,
    ExportItem,
    ModelItem,
    decided_init,
    entry_for,
    learngene_source,
    step_seconds,
)


def plan(
    ctx: BuildContext, devices: list[dict[str, Any]], profiles, objective: str, setup_s: float = 0.0
) -> dict[str, Any]:
    """What a build would do (nothing is written); the returned dict is the dry run's ``--json``. ``setup_s``:
    what this dry run took to load the ancestry and data, search and check -- work the build does again,
    counted in the total as measured, with the devices' assembly (folder, card, report:
    :data:`~factory.pipeline.budget_costs.ASSEMBLE_S_PER_DEVICE` each)."""
    from factory.device.accuracy import EstimatorConfig
    from factory.pipeline.budget_costs import ASSEMBLE_S_PER_DEVICE
    from factory.pipeline.config import untrained_why
    from factory.pipeline.joint_choice import starts_first

    log, cfg = ctx.log, ctx.cfg
    source = learngene_source(ctx)
    first_start = starts_first(ctx, objective)  # the start decided before the probes, one shape search
    seconds: dict[tuple[str, str], float] = {}  # (stage, item) -> the estimate of what will run; absent: cached
    if source.learngene is not None:
        ctx.learngene = source.learngene
        log(f"learngene: {source.describe(cfg)}{', no expanding phase' if source.kind == 'given' else ''}")
    else:
        seconds["learngene", "learngene"] = estimate = LEARNGENE.estimate_s(ctx, None)
        steps = f" and trained for {source.steps} expanding-phase steps (~{estimate:.0f}s)" if source.steps else ""
        log(f"learngene: will be sampled{steps}")
    by_name = {p.name: p for p in profiles}
    rows = []
    for device in devices:
        entry = device.to_manifest()
        if device.is_failed:
            log(f"{entry['name']}: FAILS at search: {entry['error']}")
            rows.append(entry)
            continue
        shape = DescendantShape.from_dict(entry["shape"])
        label = shape.label()
        init = decided_init(ctx, shape)
        ft = entry_for(ctx, FINETUNE, shape) if ctx.learngene is not None and init is not None else None
        finetune_s = FINETUNE.estimate_s(ctx, shape)
        extra: dict[str, Any] = {"init": init or "auto (decided before fine-tuning)"}
        if cfg.init == "auto" and init is None:
            extra["init_estimate_s"] = INIT.estimate_s(ctx, shape)  # unrounded: a tiny shape takes well under 0.1 s
            seconds["init", label] = extra["init_estimate_s"]
            log(
                f"{entry['name']}: --init auto will probe {', '.join(cfg.init_probe.candidates)} at {shape.label()} "
                f"(~{extra['init_estimate_s']:.1f}s) before fine-tuning"
            )
        elif cfg.init == "auto":
            log(f"{entry['name']}: --init auto chose {init} at {shape.label()} (cached)")
        # successive-halving probes of the Pareto candidates: what the accuracy objective and a joint re-search cost
        est = EstimatorConfig(candidates=cfg.candidates)
        steps = est.probe_steps(est.candidates, cfg.finetune_steps)
        probes_s = round(steps * step_seconds(ctx, shape, cfg.batch_size), 1)
        if first_start:  # one shape search, for the start decided (or cached) at the capacity shape: no "again"
            start = "the start" if init is None else f"the start ({init}, cached)"
            log(
                f"{entry['name']}: the learngene is untrained ({untrained_why(cfg, ctx.ancestry)}), so --init auto "
                f"decides {start} at "
                f"{shape.label()} first and the shape is searched once, for that start"
            )
        elif cfg.init == "auto" and cfg.joint_choice and cfg.objective != "capacity" and init != "peg":
            extra["joint_estimate_s"] = probes_s
            again = "it prefers" if init else "it prefers another start than peg"
            log(
                f"{entry['name']}: if {again}{f' {init}' if init else ''}, the shape is searched again for that start: "
                f"up to {est.candidates} Pareto candidates probed from it, {shape.label()} among them "
                f"({steps} probe steps, ~{extra['joint_estimate_s']:.0f}s; not in the total unless it happens)"
            )
        if objective == "accuracy":
            extra["estimator_estimate_s"] = probes_s
            seconds["probes", entry["name"]] = probes_s
            log(
                f"{entry['name']}: accuracy estimate of up to {est.candidates} Pareto candidates by successive halving "
                f"(rungs {'/'.join(map(str, est.rungs_for(cfg.finetune_steps)))} steps, {steps} steps in all"
                f"{'; at equal time: a faster shape probes more steps in the same time' if cfg.time_budget_s else ''}) "
                f"will run unless cached (<= ~{extra['estimator_estimate_s']:.0f}s); the capacity choice is {shape.label()}"
            )
        cached = ft is not None and ft.cached
        prof = by_name[entry["name"]]
        model = ft.path / "model.safetensors" if cached else None
        measure_done = cached and entry_for(ctx, MEASURE, ModelItem(shape, model)).cached
        export_done = (
            cached and entry_for(ctx, EXPORT, ExportItem(prof.name, prof, entry["profile_sha256"], model)).cached
        )
        if not cached:
            seconds["finetune", label] = finetune_s
        if not measure_done:
            seconds["measure", label] = MEASURE.estimate_s(ctx, ModelItem(shape, None))
        if not export_done:
            seconds["export", entry["name"]] = EXPORT.estimate_s(
                ctx, ExportItem(prof.name, prof, "", model, shape=shape)
            )
        run_after = seconds.get(("measure", label), 0) + seconds.get(("export", entry["name"]), 0)
        after = (
            "measure + export cached"
            if measure_done and export_done
            else f"measure + export will run (~{run_after:.0f}s)"
        )
        log(
            f"{entry['name']}: shape {label}; finetune {'cached' if cached else f'will run (~{finetune_s:.0f}s)'}; {after}"
        )
        rows.append({**entry, "finetune_cached": cached, "finetune_estimate_s": round(finetune_s, 1), **extra})
    ok = sum(not d.is_failed for d in devices)
    if objective == "accuracy" and ok > 1 and cfg.share_within > 0:
        log(
            "fleet: devices are probed most constrained first; each takes a shape an earlier one chose from the same "
            f"start where its probe is within {cfg.share_within:g} paired SE of its own best, one fine-tune for both "
            "(--share-within 0: each its own)"
        )
    stages = [
        {"stage": "setup", "scope": "fleet", "items": 1, "will_run": 1, "estimate_s": round(setup_s, 1)},
        *stage_summary(seconds, devices),
        {"stage": "assemble", "scope": "device", "items": ok, "will_run": ok, "estimate_s": ASSEMBLE_S_PER_DEVICE * ok},
    ]
    total = sum(row["estimate_s"] for row in stages)
    for row in stages:
        when = f" (~{row['estimate_s']:.0f}s)" if row["will_run"] else ""
        log(f"plan: {row['stage']} ({row['scope']}): {row['will_run']} of {row['items']} will run{when}")
    log(f"plan: total ~{total:.0f}s of work on this machine (a shape shared by devices is fine-tuned once)")
    return {
        "dry_run": True,
        "devices": rows,
        "learngene_cached": source.kind == "cached",
        "learngene_source": source.kind,
        "stages": stages,
        "total_estimate_s": round(total, 1),
    }


def stage_summary(seconds: dict[tuple[str, str], float], devices) -> list[dict[str, Any]]:
    """One row per stage of :data:`STAGES` in its order (plus the accuracy probes, which run between the
    learngene and the shape tasks): its scope, how many items it has (one for the fleet, the distinct
    shapes, the devices), how many will run and their estimated seconds (``seconds``: what will run)."""
    ok = [d for d in devices if not d.is_failed]
    counts = {"fleet": 1, "shape": len({_label(d) for d in ok}), "device": len(ok)}
    rows = []
    for spec in STAGES:
        runs = [v for (stage, _), v in seconds.items() if stage == spec.name]
        rows.append(
            {
                "stage": spec.name,
                "scope": spec.scope,
                "items": counts[spec.scope],
                "will_run": len(runs),
                "estimate_s": round(sum(runs), 1),
            }
        )
        if spec is LEARNGENE:
            probes = [v for (stage, _), v in seconds.items() if stage == "probes"]
            if probes:
                rows.append(
                    {
                        "stage": "probes",
                        "scope": "device",
                        "items": counts["device"],
                        "will_run": len(probes),
                        "estimate_s": round(sum(probes), 1),
                    }
                )
    return rows


def _label(device) -> str:
    return DescendantShape.from_dict(device.to_manifest()["shape"]).label()
