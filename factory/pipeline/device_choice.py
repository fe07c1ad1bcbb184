"""Choosing each device's shape: the search within its budgets, then the capacity choice or the
accuracy probes (:mod:`factory.device.accuracy`), recorded in the device's manifest entry.

``search_devices`` runs before the learngene exists (the dry run needs only it);
``choose_by_probes`` runs after, replacing capacity choices by the probes' on the build's data.
"""

from __future__ import annotations

from typing import Any

from factory.core.shapes import DescendantShape
from factory.device.accuracy import EstimatorConfig, SuccessiveHalving, choose_by_accuracy, describe_decision
from factory.device.resolve import latency_model_for
from factory.device.search import SearchResult, search
from factory.errors import FactoryError
from factory.pipeline import manifest
from factory.pipeline.config import finetune_recipe, search_init
from factory.pipeline.device_result import DeviceResult
from factory.pipeline.stages import BuildContext


def search_devices(
    profiles, space, anc, cfg, objective: str, why: str, log=None
) -> tuple[list[DeviceResult], dict[str, SearchResult]]:
    """Per profile, its :class:`DeviceResult` with the capacity choice (or failed, and why), and the search
    results by device name (what the accuracy probes choose among; a device whose search found nothing that
    fits has its result too, for the closest miss). A profile whose budgets are sized for another input
    size than the ancestry's is searched at the ancestry's, and ``log`` says so (``input_size_note``)."""
    devices, results = [], {}
    for prof in profiles:
        device = DeviceResult.for_profile(prof)
        if prof.input_size and prof.input_size != anc.arch.img_size:
            note = (
                f"budgets sized for {prof.input_size} px ({prof.use or 'no use stated'}); searched at "
                f"the ancestry's {anc.arch.img_size} px"
            )
            device = device.chose(input_size_note=note)
            if log:
                log(f"{prof.name}: {note}")
        try:
            cost = latency_model_for(prof, arch=anc.arch)
            device = device.chose(latency_method=cost.method, latency_band=cost.band)
            result = results[prof.name] = search(prof, space, cost, seed=cfg.seed)
            best = result.require_feasible()
            device = device.chose(
                shape=best.shape.to_dict(),
                predicted=best.to_dict(),
                search=manifest.search_summary(result, best),
                selection={"objective": "capacity", "reason": f"{why}: the largest shape that fits, not probed"}
                if objective == "capacity"
                else {"objective": "capacity", "reason": "pending accuracy estimate"},
            )
        except FactoryError as exc:
            device = device.failed(str(exc))
        devices.append(device)
    return devices, results


def estimator(ctx: BuildContext) -> SuccessiveHalving:
    """The accuracy estimator of a build: successive halving of the build's own fine-tuning recipe."""
    c = ctx.cfg
    return SuccessiveHalving(
        ctx.ancestry,
        ctx.learngene,
        ctx.data,
        finetune_recipe(c),
        init=search_init(c),
        config=EstimatorConfig(candidates=c.candidates),
        cache_dir=ctx.cache.root / "estimate",
        progress=True,
    )


def choose_by_probes(
    ctx: BuildContext,
    devices: list[DeviceResult],
    results: dict[str, SearchResult],
    reason: str = "the accuracy objective",
) -> list[DeviceResult]:
    """Each device with its capacity choice replaced by the candidate of the best predicted accuracy;
    ``reason`` (why the build probes) goes into each device's ``selection``."""
    predictor = estimator(ctx)
    out = []
    for device in devices:
        if device.is_failed:
            out.append(device)
            continue
        result = results[device.name]
        best, spent = result.feasible[0], predictor.seconds
        chosen, rows = choose_by_accuracy(result, predictor, ctx.cfg.candidates)
        row = next(r for r in rows if r["chosen"])
        selection = {
            "objective": "accuracy",
            "reason": reason,
            "estimator": predictor.describe(),
            "candidates": rows,
            "chosen": chosen.shape.label(),
            "capacity_choice": best.shape.label(),
            "seconds": round(predictor.seconds - spent, 2),
        }
        out.append(
            device.chose(
                shape=chosen.shape.to_dict(),
                predicted={**chosen.to_dict(), "accuracy": row["predicted_accuracy"]},
                search={**device["search"], "chosen": [round(chosen.latency_ms, 5), round(chosen.score, 4)]},
                selection=selection,
            )
        )
        ctx.log(
            f"{device.name}: chose {chosen.shape.label()} from {len(rows)} probed candidates in "
            f"{predictor.seconds - spent:.1f}s; {describe_decision(row.get('decision', {}))}"
        )
    return out


def shape_groups(devices: list[DeviceResult], profiles) -> dict[DescendantShape, list[tuple[Any, DeviceResult]]]:
    """The devices that did not fail, grouped by the shape they chose: ``shape -> [(profile, device)]``."""
    by_name = {p.name: p for p in profiles}
    groups: dict[DescendantShape, list] = {}
    for device in devices:
        if not device.is_failed:
            groups.setdefault(DescendantShape.from_dict(device["shape"]), []).append((by_name[device.name], device))
    return groups
