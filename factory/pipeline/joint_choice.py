"""One decision, not two: with ``--init auto`` each device gets the pair (shape, initialisation).

The searcher picks a shape for the learngene's descendants (``S_peg``: the largest that fits, or the
probes' choice); the ``init`` stage's transfer probe (:mod:`factory.core.transfer`) then says which start
fine-tunes best *at that shape*. When it keeps ``peg`` the pair is ``(S_peg, peg)``. When it prefers another
start ``X`` (scratch, weight selection, TLEG), ``S_peg`` was searched for someone else: the shape is searched
again for ``X`` exactly as ``--init X`` searches (successive-halving probes of the device's Pareto-front
candidates fine-tuned from ``X``, :func:`factory.pipeline.device_choice.choose_by_probes`), and the finalists
-- ``S_peg`` (always among the candidates) and the others -- are compared on the same footing: the same
probe steps from the same start. The pair ``(S_X, X)`` is fine-tuned.

With an explicit ``--objective capacity`` the shape stays the largest that fits whatever the start (no probes).

**The start first, where the learngene is untrained** (:func:`starts_first`: ``--init auto``, the accuracy
objective, and no expanding phase trained the learngene -- a time budget or the transfer check dropped it, or
``--expand-steps 0`` -- or one of fewer than ``--expand-min-steps``, which do not pay). Probing shapes for PEG's
descendants first would spend a full round of probes on a start the transfer probe then almost never keeps (at a
shape the phase never trained it prefers weight selection, :func:`factory.core.transfer.choose_init`). So the start
is decided first, at the largest shape that fits (the shape the transfer check scores too), and the shape is
searched once, for that start. Measured on the demo fleet at a 10-minute budget (``bench/time_budget.py``, RESULTS
"Run 6"): the default's probes took 167 -> 105 s on mnist-unseen and 97 -> 38 s on textures, what a fixed
``--init`` of the chosen start spends; the fine-tunes get the time back.

Why not also probe ``(S_peg, peg)`` against ``(S_X, X)``: the transfer probe prefers another start only when
inherited features are worse than the alternative *before training* (e.g. random features separate the
classes better than inherited ones), a case where short fine-tuning probes mislead -- scratch starts slower
and overtakes late (bench/RESULTS.md, "Choosing the initialisation"). The start is the probe's decision; the
shape for that start is the probes'.

Recorded per device (``selection.joint`` in the manifest; the log, report and model card say it): the pairs
compared, their figures (k-NN scores at ``S_peg``, the probes' validation NLL and accuracy per shape) and
why the winner won.
"""

from __future__ import annotations

from typing import Any

from factory.core.shapes import DescendantShape
from factory.pipeline.context import BuildContext
from factory.pipeline.device_choice import FleetChoices, choose_by_probes, fleet_order
from factory.pipeline.device_result import DeviceResult


def choose_jointly(
    ctx: BuildContext, devices: list[DeviceResult], results: dict[str, Any], fleet: FleetChoices | None = None
) -> list[DeviceResult]:
    """Each device with its (shape, initialisation) pair (module docstring); unchanged for a fixed ``--init``.
    ``fleet``: the shapes chosen so far, which a shape searched again for another start may share."""
    from factory.pipeline.stages import decide

    if ctx.cfg.init != "auto" or not ctx.cfg.joint_choice:
        return devices
    out = []
    for device in devices:
        if device.is_failed:
            out.append(device)
            continue
        first = DescendantShape.from_dict(device["shape"])
        start = decide(ctx, first)  # the init stage at the searched shape (cached across builds)
        decision = ctx.inits[first.label()]
        if (
            start != "peg" and ctx.cfg.objective == "capacity"
        ):  # asked for: the largest shape that fits, whatever the start
            joint = {
                "init": start,
                "shape": first.label(),
                "pairs": [_pair(first, "peg", decision), _pair(first, start, decision)],
                "why": f"at {first.label()} the transfer probe prefers {start} ({decision['reason']}); --objective "
                "capacity keeps the largest shape that fits, so the shape is not searched again",
                "decision": decision,
            }
            out.append(device.chose(joint=joint))
            continue
        if start == "peg":
            joint = {
                "init": "peg",
                "shape": first.label(),
                "pairs": [_pair(first, "peg", decision)],
                "why": f"the transfer probe keeps the learngene's descendant at {first.label()}, the shape searched for it",
                "decision": decision,
            }
            out.append(device.chose(joint=joint))
            continue
        ctx.log(
            f"{device.name}: --init auto prefers {start} at {first.label()}; searching the shape again for {start} "
            f"(as --init {start} searches)"
        )
        out.append(_search_for_start(ctx, device, results, first, start, again=True, fleet=fleet))
    return out


def starts_first(ctx: BuildContext, objective: str) -> bool:
    """Whether ``--init auto`` decides the start before it probes shapes: the accuracy objective with a
    learngene no expanding phase trained (module docstring)."""
    from factory.pipeline.config import learngene_trained

    cfg = ctx.cfg
    return (
        cfg.init == "auto" and cfg.joint_choice and objective == "accuracy" and not learngene_trained(cfg, ctx.ancestry)
    )


def choose_pairs(
    ctx: BuildContext, devices: list[DeviceResult], results: dict[str, Any], objective: str, why: str
) -> list[DeviceResult]:
    """The build's shape (and, for ``--init auto``, initialisation) per device: the start first and one shape
    search for it where :func:`starts_first`; otherwise the probes' shape (accuracy objective) or the capacity
    shape, then :func:`choose_jointly`. The devices are probed most constrained first
    (:func:`~factory.pipeline.device_choice.fleet_order`), each free to share a shape an earlier one chose from
    the same start (:class:`~factory.pipeline.device_choice.FleetChoices`); the list comes back in its order."""
    order = fleet_order(devices)
    ordered = [devices[i] for i in order]
    fleet = FleetChoices(ctx.cfg.share_within)
    if starts_first(ctx, objective):
        chosen = [d if d.is_failed else _start_first(ctx, d, results, fleet) for d in ordered]
    else:
        if objective == "accuracy":
            ordered = choose_by_probes(ctx, ordered, results, reason=why, fleet=fleet)
        chosen = choose_jointly(ctx, ordered, results, fleet)
    back: list[DeviceResult] = list(devices)
    for i, device in zip(order, chosen, strict=True):
        back[i] = device
    return back


def _start_first(ctx: BuildContext, device: DeviceResult, results: dict[str, Any], fleet: FleetChoices) -> DeviceResult:
    from factory.pipeline.stages import decide

    first = DescendantShape.from_dict(device["shape"])  # the largest shape that fits: the capacity choice
    start = decide(ctx, first)
    from factory.pipeline.config import untrained_why

    ctx.log(
        f"{device.name}: the learngene is untrained ({untrained_why(ctx.cfg, ctx.ancestry)}), so --init auto decides "
        "the start first: "
        f"{start} at {first.label()}, the largest shape that fits; the shape is searched once, for {start}"
    )
    return _search_for_start(ctx, device, results, first, start, again=False, fleet=fleet)


def _search_for_start(
    ctx: BuildContext,
    device: DeviceResult,
    results: dict[str, Any],
    first: DescendantShape,
    start: str,
    *,
    again: bool,
    fleet: FleetChoices | None,
) -> DeviceResult:
    """``device`` with the shape the probes choose among its Pareto candidates fine-tuned from ``start``, and the
    joint record: ``again`` -- the start was decided at ``first``, the shape searched (and probed) for PEG's
    descendants; otherwise at ``first``, the capacity choice, before any probe."""
    decision = ctx.inits[first.label()]
    where = f"at {first.label()}" if again else f"at {first.label()} (the largest shape that fits; untrained learngene)"
    [found] = choose_by_probes(
        ctx,
        [device],
        results,
        reason=f"--init auto chose {start} {where}: shape searched for it",
        init=start,
        fleet=fleet,
    )
    rows = found["selection"]["candidates"]
    chosen = DescendantShape.from_dict(found["shape"])
    pairs = [_pair(first, "peg", decision)] + ([_pair(first, start, decision)] if start != "peg" else [])
    pairs += [
        {
            "shape": r["label"],
            "init": start,
            "probe_steps": r.get("probe_steps"),
            "val_nll": r.get("val_nll"),
            "val_accuracy": r.get("predicted_accuracy"),
            "chosen": r["chosen"],
        }
        for r in rows
    ]
    best = next(r for r in rows if r["chosen"])
    prefers = "prefers" if start != "peg" else "keeps"
    shared = (best.get("decision") or {}).get("shared")
    ranked = (
        f"within {shared['within_se']:g} paired SE of {shared['best']}, the best of {len(rows)} shapes, and shared "
        f"with {', '.join(found['selection']['shares_fine_tune_with'])}"
        if shared
        else f"probed best of {len(rows)} shapes"
    )
    why = (
        f"{where} the transfer probe {prefers} {start} ({decision['reason']}); fine-tuned from {start}, "
        f"{chosen.label()} {ranked} (validation NLL {best.get('val_nll', float('nan')):.3f}, "
        f"accuracy {best['predicted_accuracy']:.3f} after {best.get('probe_steps', '?')} steps)"
    )
    joint = {
        "init": start,
        "shape": chosen.label(),
        ("searched_for_peg" if again else "start_decided_at"): first.label(),
        "pairs": pairs,
        "why": why,
        "decision": {**decision, "chosen": start, "reason": why},  # what the fine-tune records as init_decision
    }
    ctx.log(f"{device.name}: chose ({chosen.label()}, {start}): {why}")
    return found.chose(joint=joint)


def joint_decision(device: DeviceResult) -> dict[str, Any] | None:
    """The initialisation decision the joint choice fixed for ``device`` (None: none was made; the shape task
    decides at its shape)."""
    return (device.get("joint") or {}).get("decision")


def _pair(shape: DescendantShape, init: str, decision: dict[str, Any]) -> dict[str, Any]:
    return {"shape": shape.label(), "init": init, "knn_accuracy": (decision.get("knn_accuracy") or {}).get(init)}


def expanding_phase_check(ctx: BuildContext, devices: list[DeviceResult]):
    """Before an expanding phase runs for ``--init auto``: does the ancestry transfer to the task at all?
    (:func:`factory.core.transfer.check_transfer` at the largest searched shape, on the same images the init
    probe scores.) None when no phase would run (a given, cached or shipped learngene, ``--expand-steps 0``),
    for a fixed ``--init`` (``--init peg`` forces the phase), or when no device has a shape."""
    from factory.core.transfer import check_transfer
    from factory.data import spread_sample
    from factory.pipeline.learngene_stage import learngene_source
    from factory.pipeline.stages import probe_images

    if ctx.cfg.init != "auto" or not ctx.cfg.joint_choice or not learngene_source(ctx).runs_expanding_phase:
        return None
    shapes = [DescendantShape.from_dict(d["shape"]) for d in devices if not d.is_failed]
    if not shapes:
        return None
    shape = max(shapes, key=lambda s: (s.depth * s.embed_dim**2, s.label()))
    sample = spread_sample(ctx.data.train, probe_images(ctx))
    return check_transfer(
        shape, sample.images, sample.labels, ancestry=ctx.ancestry, seed=ctx.cfg.seed, probe=ctx.cfg.init_probe
    )
