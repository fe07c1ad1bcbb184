"""Choosing each device's shape: the search within its budgets, then the capacity choice or the
accuracy probes (:mod:`factory.device.accuracy`), recorded in the device's manifest entry.

``search_devices`` runs before the learngene exists (the dry run needs only it);
``choose_by_probes`` runs after, replacing capacity choices by the probes' on the build's data. In a fleet the
devices are probed most constrained first (:func:`fleet_order`), and each one may take a shape an earlier device
of the same start chose (:class:`FleetChoices`), so that the two share one fine-tune.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


def estimator(ctx: BuildContext, init: str | None = None) -> SuccessiveHalving:
    """The accuracy estimator of a build: successive halving of the build's own fine-tuning recipe, from
    ``init`` (default: the initialisation the build searches for, :func:`search_init`)."""
    c = ctx.cfg
    return SuccessiveHalving(
        ctx.ancestry,
        ctx.learngene,
        ctx.data,
        finetune_recipe(c),
        init=init or search_init(c),
        # a time budget gives the fine-tune a time, not a step count: the probes compare shapes at equal time
        config=EstimatorConfig(candidates=c.candidates, equal_time=c.time_budget_s is not None),
        time_shares=dict(ctx.time_shares),
        cache_dir=ctx.cache.root / "estimate",
        progress=True,
    )


@dataclass
class FleetChoices:
    """The shapes a fleet's devices chose so far, per start, and which devices chose each: what a later device's
    probes may take, so that two devices share one fine-tune (:mod:`factory.device.accuracy_choice`, "a shape
    another device chose"). ``share_z``: within how many paired SE of the device's own best validation NLL
    (:attr:`~factory.pipeline.config.BuildConfig.share_within`; 0: never)."""

    share_z: float
    chosen: dict[str, dict[DescendantShape, list[str]]] = field(default_factory=dict)

    def prefer(self, init: str) -> list[DescendantShape]:
        """The shapes chosen so far with ``init``, first chosen first."""
        return list(self.chosen.get(init, {})) if self.share_z > 0 else []

    def devices(self, init: str, shape: DescendantShape) -> list[str]:
        return list(self.chosen.get(init, {}).get(shape, []))

    def add(self, init: str, shape: DescendantShape, device: str) -> None:
        self.chosen.setdefault(init, {}).setdefault(shape, []).append(device)


def fleet_order(devices: list[DeviceResult]) -> list[int]:
    """The order a fleet's devices are probed in: most constrained first -- the smallest capacity choice (the
    largest shape that fits, by FLOPs), then by name; failed devices last. A small device's choice usually fits
    the larger ones, not the other way round, so the shapes a later device may share are the ones it can run."""

    def key(i: int) -> tuple[float, str]:
        device = devices[i]
        return (float("inf"), device.name) if device.is_failed else (float(device["predicted"]["flops_g"]), device.name)

    return sorted(range(len(devices)), key=key)


def choose_by_probes(
    ctx: BuildContext,
    devices: list[DeviceResult],
    results: dict[str, SearchResult],
    reason: str = "the accuracy objective",
    init: str | None = None,
    fleet: FleetChoices | None = None,
) -> list[DeviceResult]:
    """Each device with its capacity choice replaced by the candidate of the best predicted accuracy when
    fine-tuned from ``init`` (default: the build's, :func:`search_init`); ``reason`` (why the build probes)
    goes into each device's ``selection``. With ``fleet``, each device may take a shape a device before it chose
    from the same start, and adds its own choice (``selection.shares_fine_tune_with`` names the devices)."""
    predictor = estimator(ctx, init)
    start = init or search_init(ctx.cfg)
    out = []
    for device in devices:
        if device.is_failed:
            out.append(device)
            continue
        result = results[device.name]
        best, spent = result.feasible[0], predictor.seconds
        prefer, share_z = (fleet.prefer(start), fleet.share_z) if fleet else ((), 0.0)
        chosen, rows = choose_by_accuracy(result, predictor, ctx.cfg.candidates, prefer, share_z)
        row = next(r for r in rows if r["chosen"])
        partners = fleet.devices(start, chosen.shape) if fleet else []
        selection = {
            "objective": "accuracy",
            "reason": reason,
            "estimator": predictor.describe(),
            "candidates": rows,
            "chosen": chosen.shape.label(),
            "capacity_choice": best.shape.label(),
            "seconds": round(predictor.seconds - spent, 2),
            **({"shares_fine_tune_with": partners} if partners else {}),
        }
        if fleet is not None:
            fleet.add(start, chosen.shape, device.name)
        out.append(
            device.chose(
                shape=chosen.shape.to_dict(),
                predicted={**chosen.to_dict(), "accuracy": row["predicted_accuracy"]},
                search={**device["search"], "chosen": [round(chosen.latency_ms, 5), round(chosen.score, 4)]},
                selection=selection,
            )
        )
        sharing = f"; one fine-tune with {', '.join(partners)}" if partners else ""
        ctx.log(
            f"{device.name}: chose {chosen.shape.label()} from {len(rows)} probed candidates in "
            f"{predictor.seconds - spent:.1f}s; {describe_decision(row.get('decision', {}))}{sharing}"
        )
    return out


def finetune_key(shape: DescendantShape, init: str | None) -> str:
    """What names one fine-tune of a build: the shape's label, and the start a joint choice fixed for it
    (``d5-w160-r1+weight_selection``). Two devices of one shape and one start share a fine-tune; two starts
    of one shape are two fine-tunes, each planned and timed by a time budget (:mod:`factory.pipeline.budget_costs`)."""
    return shape.label() if init is None else f"{shape.label()}+{init}"


def fine_tune_of(device: DeviceResult) -> tuple[DescendantShape, str | None]:
    """The fine-tune a device ships from: its chosen shape and the start a joint choice fixed for it (None:
    decided at the shape) -- the key of :func:`shape_groups` and, named, of :func:`fine_tunes`."""
    return DescendantShape.from_dict(device["shape"]), (device.get("joint") or {}).get("init")


def fine_tunes(devices: list[DeviceResult]) -> dict[str, DescendantShape]:
    """The build's fine-tunes, ``finetune_key -> shape``: one per group of :func:`shape_groups`."""
    out: dict[str, DescendantShape] = {}
    for device in devices:
        if not device.is_failed:
            shape, init = fine_tune_of(device)
            out[finetune_key(shape, init)] = shape
    return out


def shape_groups(devices: list[DeviceResult], profiles) -> dict[tuple[DescendantShape, str | None], list]:
    """The devices that did not fail, grouped by the shape they chose and the initialisation a joint choice
    fixed for it (None: decided at the shape): ``(shape, init) -> [(profile, device)]``."""
    by_name = {p.name: p for p in profiles}
    groups: dict[tuple[DescendantShape, str | None], list] = {}
    for device in devices:
        if not device.is_failed:
            groups.setdefault(fine_tune_of(device), []).append((by_name[device.name], device))
    return groups
