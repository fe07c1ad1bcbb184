"""Choosing a device's shape among its probed candidates: which Pareto-front shapes are probed
(:func:`candidates`), the choice by predicted accuracy with the capacity proxy as the tie-break
(:func:`choose_by_accuracy`), and the decision in words (:func:`describe_decision`). The estimators that
probe them are :mod:`factory.device.accuracy`'s.

**A shape another device chose** (``prefer``, ``share_z``; a fleet's build, :mod:`factory.pipeline.device_choice`).
Two devices of one shape and one start share one fine-tune, so under a time budget (equal time per fine-tune)
every fine-tune of the fleet gets more time, and without one the build is shorter. The probes choose per device
and do not see that; measured, which strategy happened to share decided a fleet's accuracy more than the probes
did (bench/RESULTS.md, Run 23b: two devices on one shape got 196 s of fine-tuning each against 124 s for three
shapes). So a shape another device of the fleet already chose, where it fits this device, is among this device's
candidates (:func:`candidates`), stays in the running while it is within noise of the rung's best
(:func:`within_noise`), and at the last rung is taken over the device's own best when its validation NLL is
higher by at most ``share_z`` paired standard errors (:func:`shared_choice`; ``share_z = 0``: never). The paired
standard error is that of the per-image NLL differences on the same validation images (:func:`paired_gap`), the
test the anchored variant uses.

**Never a smaller shape.** A device takes another device's shape only where it is at least as large (FLOPs) as
its own best. Short probes favour shapes that learn fast first (bench/RESULTS.md, "Probes at 400 fine-tuning
steps"), so "within noise" of a smaller shape is the probes' bias, not evidence: measured (Run 24c, textures, 10
minutes), without this rule the Jetson Orin Nano took the Raspberry Pi's d1-w160 over its own d2-w160 (1.6 SE) and
the fleet's one fine-tune shipped 0.7800 on every device, against 0.8050-0.8175 without sharing in the same run.
Since the devices are probed most constrained first, a later (larger) device can still take a larger shape an
earlier one chose, the direction the probes' bias cannot explain.

Why 2 SE by default (``--share-within``): it is the anchored variant's rule turned round -- the device's own best
replaces a shape the fleet already fine-tunes only on the evidence that would replace an incumbent -- and measured
(bench/RESULTS.md, Runs 23b and 24: seven builds of the demo fleet, mnist-unseen, 10 minutes, seed 3), the three
whose devices ended on two distinct shapes had fleet means of 0.9543-0.9610, the four on three shapes 0.9502-0.9520,
while the paired SE between two shapes' probes was ~0.025 NLL: at 1 SE the devices shared only where their probes
happened to agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from factory.core.shapes import DescendantShape, vit_flops
from factory.device.probe_types import Probe
from factory.device.search import AccuracyPredictor


@runtime_checkable
class JointEstimator(Protocol):
    """An estimator that ranks candidates together (probes them side by side), as
    :class:`SuccessiveHalving` does, and then decides between them."""

    def rank(
        self,
        shapes: list[DescendantShape],
        incumbent: DescendantShape | None = None,
        prefer: Sequence[DescendantShape] = (),
        share_z: float = 0.0,
    ) -> list[Probe]: ...

    def decide(
        self,
        probes: list[Probe],
        incumbent: DescendantShape | None = None,
        prefer: Sequence[DescendantShape] = (),
        share_z: float = 0.0,
    ) -> tuple[DescendantShape, dict[str, Any]]: ...


def candidates(result, count: int, span: float = 32.0, prefer: Sequence[DescendantShape] = ()) -> list:
    """Up to ``count`` feasible candidates from the capacity Pareto front, spread evenly in
    log-latency over ``[L_max / span, L_max]`` (``L_max``: the capacity choice's latency), nearest
    front point to each target, always including the capacity choice (``result.feasible[0]``).

    Shapes more than ``span`` times faster than the budget-filling one are not tried: where a front
    spans that much, that end is the 1-layer, 32-64-wide corner, which inherits too little to win.

    Each shape of ``prefer`` (other devices' choices) that this search found feasible is a candidate too, on or
    off the front and whatever its latency; where the list is full it replaces the pick nearest to it in
    log-latency (never the capacity choice), so the probes cost the same.
    """
    best = result.feasible[0]
    top = max(best.latency_ms, 1e-12)
    front = [c for c in (result.pareto or [best]) if c.latency_ms >= top / span] or [best]
    if len(front) <= count:
        picked = list(front)
    else:
        lo, hi = math.log(front[0].latency_ms), math.log(front[-1].latency_ms)
        targets = [lo + (hi - lo) * i / max(1, count - 1) for i in range(count)]
        picked = [min(front, key=lambda c: abs(math.log(c.latency_ms) - t)) for t in targets]
    picked.append(best)
    unique = {c.shape: c for c in picked}
    for c in (c for c in result.feasible if c.shape in prefer and c.shape not in unique):
        others = [o for o in unique.values() if o.shape != best.shape and o.shape not in prefer]
        if len(unique) >= count and others:
            nearest = min(others, key=lambda o: abs(math.log(o.latency_ms / max(c.latency_ms, 1e-12))))
            del unique[nearest.shape]
        unique[c.shape] = c
    return sorted(unique.values(), key=lambda c: c.latency_ms)


def choose_by_accuracy(
    result,
    predictor: JointEstimator | AccuracyPredictor,
    count: int,
    prefer: Sequence[DescendantShape] = (),
    share_z: float = 0.0,
) -> tuple[Any, list[dict[str, Any]]]:
    """Estimate the candidates' accuracy and return ``(chosen candidate, rows)``.

    ``predictor`` is a :class:`JointEstimator` (e.g. :class:`SuccessiveHalving`: ranks the candidates together) or any per-shape
    :class:`~factory.device.search.AccuracyPredictor` (highest score wins; ties within 1e-9 go to
    higher capacity). ``rows`` (one per candidate, best first) carry the shape label, predicted
    accuracy, predicted latency and capacity score, and for successive halving the probe steps the
    shape reached and its validation NLL. ``prefer`` and ``share_z``: shapes other devices chose, taken within
    ``share_z`` paired SE of the best (module docstring; a joint estimator only).
    """
    cands = sorted(candidates(result, count, prefer=prefer), key=lambda c: -c.score)  # by capacity: ties to the first
    by_shape = {c.shape: c for c in cands}
    decision: dict[str, Any] = {}
    if isinstance(predictor, JointEstimator):
        incumbent = result.feasible[0].shape  # the capacity choice; candidates() always includes it
        shared = [s for s in prefer if s in by_shape]  # the other devices' choices that fit this one
        probes = predictor.rank([c.shape for c in cands], incumbent, shared, share_z)
        by_capacity = sorted(probes, key=lambda p: -by_shape[p.shape].score)
        shape, decision = predictor.decide(by_capacity, incumbent, shared, share_z)
        cap = next(p for p in probes if p.shape == incumbent)
        decision = {
            **decision,
            "capacity_choice": incumbent.label(),
            "capacity_probe_steps": cap.steps,
            "capacity_val_nll": round(cap.nll, 4),
        }
        chosen = by_shape[shape]
        scored = [
            (p.accuracy, by_shape[p.shape], {"probe_steps": p.steps, "val_nll": round(p.nll, 4), **_timing(p)})
            for p in probes
        ]
    else:
        raw = [(float(predictor(c.shape)), c, {}) for c in cands]
        best = max(a for a, _, _ in raw)
        chosen = max((c for a, c, _ in raw if a >= best - 1e-9), key=lambda c: c.score)
        scored = sorted(raw, key=lambda t: (-t[0], -t[1].score))
    rows = [
        {
            "label": c.shape.label(),
            "shape": c.shape.to_dict(),
            "predicted_accuracy": round(a, 4),
            "latency_ms": round(c.latency_ms, 4),
            "capacity_score": round(c.score, 4),
            **extra,
            "chosen": c is chosen,
            **({"decision": decision} if c is chosen and decision else {}),
        }
        for a, c, extra in scored
    ]
    return chosen, rows


def _timing(probe: Probe) -> dict[str, Any]:
    """A probe's horizon (the fine-tune steps its rungs are fractions of) and its measured seconds per step."""
    out = {"horizon_steps": probe.horizon} if getattr(probe, "horizon", 0) else {}
    step_s = getattr(probe, "step_s", 0.0)
    return {**out, "step_s": round(step_s, 5)} if step_s else out


def paired_gap(worse: Sequence[float], better: Sequence[float]) -> tuple[float, float]:
    """``(mean d, SE)`` of the paired differences ``d_i = worse_i - better_i`` (per-image NLLs on the same
    images): ``SE = sd(d) / sqrt(n)``, ``sd`` with ``n - 1``."""
    d = [a - b for a, b in zip(worse, better, strict=True)]
    if not d:
        raise ValueError("paired_gap needs at least one pair")
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / max(1, len(d) - 1))
    return mean, sd / math.sqrt(len(d))


def probe_gap(probe: Probe, best: Probe) -> tuple[float, float] | None:
    """:func:`paired_gap` of two probes' per-image NLLs; None where they were not scored on the same images."""
    if not probe.per_image or len(probe.per_image) != len(best.per_image):
        return None
    return paired_gap(probe.per_image, best.per_image)


def within_noise(probe: Probe, best: Probe, z: float) -> tuple[float, float] | None:
    """``(gap, SE)`` (:func:`probe_gap`) where ``probe``'s validation NLL is higher than ``best``'s by at most ``z``
    paired SE (``z > 0``); None otherwise -- so a caller that needs the gap has it without computing it again."""
    gap = probe_gap(probe, best) if z > 0 else None
    return gap if gap is not None and gap[0] <= z * gap[1] else None


def smaller(shape: DescendantShape, than: DescendantShape) -> bool:
    """Whether ``shape`` costs fewer multiply-adds than ``than`` (:func:`~factory.core.shapes.vit_flops`): a shape
    a device does not trade its own best for (module docstring, "never a smaller shape")."""
    return vit_flops(shape) < vit_flops(than)


def shared_choice(
    finalists: list[Probe], best: Probe, prefer: Sequence[DescendantShape], z: float
) -> tuple[DescendantShape, dict[str, Any]] | None:
    """The finalist another device chose to take over ``best``, the device's own lowest-NLL finalist, and the
    evidence: the one of ``prefer`` whose paired NLL gap to ``best`` is smallest, where it is within ``z`` SE
    (:func:`within_noise`) and not :func:`smaller` than ``best``. None where ``best`` is already another device's
    choice or none is within noise."""
    if best.shape in prefer:
        return None
    gaps = {
        p.shape: gap
        for p in finalists
        if p.shape in prefer and not smaller(p.shape, best.shape) and (gap := within_noise(p, best, z))
    }
    if not gaps:
        return None
    shape = min(gaps, key=lambda s: (gaps[s][0], s.label()))
    gap, se = gaps[shape]
    return shape, {
        "rule": f"another device's choice within {z:g} paired SE of the best: one fine-tune for both",
        "best": best.shape.label(),
        "shared": shape.label(),
        "nll_gap": round(gap, 5),
        "se": round(se, 5),
        "within_se": z,
    }


def not_shared(probes: list[Probe], best: Probe, prefer: Sequence[DescendantShape], z: float) -> dict[str, Any]:
    """Why no other device's shape took ``best``'s place: each shape of ``prefer`` this device probed, the rung it
    reached (one below the last: dropped, outside the noise of its rung's best) and, at the last rung, its paired
    NLL gap to ``best`` in SE."""
    rows = []
    for p in sorted((p for p in probes if p.shape in prefer and p.shape != best.shape), key=lambda p: -p.rung):
        row: dict[str, Any] = {"shape": p.shape.label(), "rung": p.rung, "smaller": smaller(p.shape, best.shape)}
        gap = probe_gap(p, best) if p.rung == best.rung else None
        if gap is not None:
            row |= {"nll_gap": round(gap[0], 5), "se": round(gap[1], 5)}
        rows.append(row)
    return {"within_se": z, "last_rung": best.rung, "considered": rows}


def describe_decision(decision: dict[str, Any]) -> str:
    """One line saying why the estimator chose what it chose (the chosen row's ``decision``)."""
    line = _describe_choice(decision)
    if decision.get("not_shared", {}).get("considered"):
        record = decision["not_shared"]
        parts = [
            f"{r['shape']} smaller than its own best"
            if r.get("smaller")
            else f"{r['shape']} {r['nll_gap']:.4f} higher (SE {r['se']:.4f})"
            if "nll_gap" in r
            else f"{r['shape']} dropped at rung {r['rung']}"
            for r in record["considered"]
        ]
        line += f"; other devices' shapes not taken (within {record['within_se']:g} paired SE and no smaller): "
        line += ", ".join(parts)
    shared = decision.get("shared")
    if shared:
        line += (
            f"; took {shared['shared']}, another device's choice, over its own best {shared['best']}: validation NLL "
            f"{shared['nll_gap']:.4f} higher, within {shared['within_se']:g} paired SE ({shared['se']:.4f})"
        )
    return line


def _describe_choice(decision: dict[str, Any]) -> str:
    if "incumbent" not in decision:
        line = f"chosen by {decision.get('rule', 'the highest score')}"
        if "capacity_choice" in decision:
            line += (
                f"; the capacity choice {decision['capacity_choice']} reached {decision['capacity_probe_steps']} "
                f"probe steps with validation NLL {decision['capacity_val_nll']:.4f}"
            )
        return line
    gain, se = decision["nll_gain"], decision["se"]
    diff = (
        f"{decision['challenger']}'s validation NLL is {abs(gain):.4f} {'lower' if gain > 0 else 'higher'} "
        f"(paired SE {se:.4f}; rule: {decision['rule']})"
    )
    if decision["switched"]:
        return f"switched from the capacity choice {decision['incumbent']} to {decision['challenger']}: {diff}"
    return f"kept the capacity choice {decision['incumbent']}: the best challenger {diff}"
