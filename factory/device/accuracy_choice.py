"""Choosing a device's shape among its probed candidates: which Pareto-front shapes are probed
(:func:`candidates`), the choice by predicted accuracy with the capacity proxy as the tie-break
(:func:`choose_by_accuracy`), and the decision in words (:func:`describe_decision`). The estimators that
probe them are :mod:`factory.device.accuracy`'s."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from factory.core.shapes import DescendantShape
from factory.device.search import AccuracyPredictor

Probe = Any  # factory.device.accuracy.Probe (that module imports this one: named here, not imported)


@runtime_checkable
class JointEstimator(Protocol):
    """An estimator that ranks candidates together (probes them side by side), as
    :class:`SuccessiveHalving` does, and then decides between them."""

    def rank(self, shapes: list[DescendantShape], incumbent: DescendantShape | None = None) -> list[Probe]: ...

    def decide(
        self, probes: list[Probe], incumbent: DescendantShape | None = None
    ) -> tuple[DescendantShape, dict[str, Any]]: ...


def candidates(result, count: int, span: float = 32.0) -> list:
    """Up to ``count`` feasible candidates from the capacity Pareto front, spread evenly in
    log-latency over ``[L_max / span, L_max]`` (``L_max``: the capacity choice's latency), nearest
    front point to each target, always including the capacity choice (``result.feasible[0]``).

    Shapes more than ``span`` times faster than the budget-filling one are not tried: where a front
    spans that much, that end is the 1-layer, 32-64-wide corner, which inherits too little to win.
    """
    import math

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
    return sorted({c.shape: c for c in picked}.values(), key=lambda c: c.latency_ms)


def choose_by_accuracy(
    result, predictor: JointEstimator | AccuracyPredictor, count: int
) -> tuple[Any, list[dict[str, Any]]]:
    """Estimate the candidates' accuracy and return ``(chosen candidate, rows)``.

    ``predictor`` is a :class:`JointEstimator` (e.g. :class:`SuccessiveHalving`: ranks the candidates together) or any per-shape
    :class:`~factory.device.search.AccuracyPredictor` (highest score wins; ties within 1e-9 go to
    higher capacity). ``rows`` (one per candidate, best first) carry the shape label, predicted
    accuracy, predicted latency and capacity score, and for successive halving the probe steps the
    shape reached and its validation NLL.
    """
    cands = sorted(candidates(result, count), key=lambda c: -c.score)  # by capacity: ties go to the first
    by_shape = {c.shape: c for c in cands}
    decision: dict[str, Any] = {}
    if isinstance(predictor, JointEstimator):
        incumbent = result.feasible[0].shape  # the capacity choice; candidates() always includes it
        probes = predictor.rank([c.shape for c in cands], incumbent=incumbent)
        shape, decision = predictor.decide(sorted(probes, key=lambda p: -by_shape[p.shape].score), incumbent)
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


def describe_decision(decision: dict[str, Any]) -> str:
    """One line saying why the estimator chose what it chose (the chosen row's ``decision``)."""
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
