"""What a time budget plans with: this host's measured costs of the build's remaining work
(:class:`factory.pipeline.time_budget.Costs`), and the two points where the build plans against its budget.

Measured, never assumed: a fine-tuning step of every chosen shape (:func:`~factory.pipeline.finetune_facts.
step_seconds`: real steps of the build's recipe and data), the measure stage's reference round of every shape
(:func:`~factory.pipeline.finetune_facts.round_seconds`; export is that times each format's registered cost)
and, when a learngene must be trained, its sampling and expanding-phase steps
(:func:`~factory.pipeline.learngene_stage.expanding_costs`).

The build plans twice (:func:`plan_time`): before the learngene stage (``E`` and ``N``), and again before the
shape tasks with the time actually left (``N`` alone: the learngene, the probes and the joint choice have run,
and whatever they took more or less than planned is made up in the fine-tunes). Both plans are kept in
``OUT/.cache/time_budget/<build key>.json``: a killed build resumes with the same step counts (its cached
stages stay valid) instead of planning anew on a machine that is busier or quieter now.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from factory.core.shapes import DescendantShape
from factory.errors import FactoryError
from factory.pipeline.context import BuildContext, ExportItem, ModelItem
from factory.pipeline.time_budget import MIN_FINETUNE_STEPS, SPLITS, BudgetPlan, Costs, fit_budget, format_duration

#: Seconds per device for writing its folder, model card and its part of the report (measured: ~0.3-1 s).
ASSEMBLE_S_PER_DEVICE = 1.0


def _distinct(shapes) -> list[DescendantShape]:
    """One of each architecture (what is measured and exported once, whatever start it fine-tunes from)."""
    return list({shape.label(): shape for shape in shapes}.values())


def build_costs(ctx: BuildContext, devices, profiles, *, objective: str, expanding: bool, probed: bool) -> Costs:
    """The remaining work of the build whose chosen shapes are ``devices``' (failed ones cost nothing):
    ``expanding`` -- a learngene is still to be trained (its phase is planned); ``probed`` -- the accuracy
    probes and the joint choice have run."""
    from factory.core.transfer import images_for
    from factory.device.accuracy import EstimatorConfig
    from factory.pipeline.device_choice import fine_tune_of, fine_tunes, finetune_key
    from factory.pipeline.finetune_facts import evaluation_seconds, step_seconds
    from factory.pipeline.learngene_stage import expanding_costs
    from factory.pipeline.stages import EXPORT, MEASURE

    cfg = ctx.cfg
    shapes = fine_tunes(devices)  # one per (shape, start): a shape fine-tuned from two starts costs twice
    by_name = {p.name: p for p in profiles}
    ok = [d for d in devices if not d.is_failed]
    step = {label: step_seconds(ctx, shape, cfg.batch_size) for label, shape in shapes.items()}
    fixed = {
        "measure": sum(MEASURE.estimate_s(ctx, ModelItem(shape, None)) for shape in _distinct(shapes.values())),
        "export": sum(
            EXPORT.estimate_s(
                ctx,
                ExportItem(d.name, by_name[d.name], "", None, shape=DescendantShape.from_dict(d["shape"])),
            )
            for d in ok
        ),
        "assemble": ASSEMBLE_S_PER_DEVICE * len(ok),
    }
    first = each = 0.0
    if expanding:
        fixed["learngene"], first, each = expanding_costs(ctx)
    est = EstimatorConfig(candidates=cfg.candidates)
    probed_keys = [finetune_key(*fine_tune_of(d)) for d in ok]
    evals = sum(evaluation_seconds(ctx, shape) for shape in shapes.values())
    # a start is still to decide at a shape no joint choice fixed one for (a key without "+init")
    undecided = [k for k, shape in shapes.items() if cfg.init == "auto" and k == shape.label() and k not in ctx.inits]

    def per_steps(n: int) -> dict[str, float]:
        out = {"finetune": n * sum(step.values()) + evals}
        if undecided:  # the candidates' forwards over the init probe's images, a third of a step per image
            images = images_for(cfg.init_probe, n, cfg.batch_size, ctx.ancestry.arch)
            out["init"] = sum(len(cfg.init_probe.candidates) * images / cfg.batch_size * step[s] / 3 for s in undecided)
        if objective == "accuracy" and not probed:  # equal-time probes: at most their equal-steps cost at the
            probe = est.probe_steps(est.candidates, n)  # device's shape's step time (factory.device.accuracy)
            out["probes"] = sum(probe * step[key] for key in probed_keys)
        return out

    return Costs(fixed, per_steps, first, each, expanding and each > 0, step)


def plan_file(ctx: BuildContext, key: str) -> Path:
    return ctx.out / ".cache" / "time_budget" / f"{key}.json"


def plan_time(
    ctx: BuildContext,
    devices,
    profiles,
    *,
    key: str,
    elapsed_s: float,
    objective: str,
    expanding: bool,
    probed: bool,
    dry_run: bool = False,
    replan: str | bool = False,
) -> BudgetPlan:
    """The plan of the build's remaining work in ``budget - elapsed_s`` (the first, ``probed=False``, or the
    second); a plan this build recorded before (a resumed build) is returned as it was. ``replan``: the first plan
    dropped the expanding phase, which changed what the build does (an untrained learngene is probed), so it is
    planned again, with ``E = 0``, and recorded over, marked ``replanned`` (a resumed build finds that one); a
    string is why the first plan dropped it, which the new plan keeps (``expand_why``). The
    second plan never fails: when less is left than its least work, it plans :data:`MIN_FINETUNE_STEPS` and says
    so."""
    from factory.pipeline.config import expanding_config, phase_share

    cfg = ctx.cfg
    stage = "second" if probed else "first"
    path = plan_file(ctx, key)
    recorded = _recorded(path)
    plan = _from_dict(recorded.get(stage)) if not dry_run else None
    if plan is not None and (not replan or recorded[stage].get("replanned")):
        ctx.log(f"time budget: the {stage} plan as this build recorded it ({path.name}): {describe(plan)}")
        return plan
    if probed:  # the machine now, not as it was before the learngene stage: fine-tuning steps measured again
        ctx.step_times.clear()
    start = time.perf_counter()
    costs = build_costs(ctx, devices, profiles, objective=objective, expanding=expanding, probed=probed)
    spent = elapsed_s + time.perf_counter() - start  # the measuring is spent too
    left = cfg.time_budget_s - spent
    cap = cfg.expand_steps if cfg.expand_steps is not None else expanding_config(cfg).steps
    try:
        plan = fit_budget(
            left,
            costs,
            expand_share=cfg.expand_share,
            max_expand_steps=cap,
            min_expand_steps=cfg.expand_min_steps if cfg.init == "auto" else 0,  # --init peg: its share, however small
            head_start_steps=cfg.expand_head_start if cfg.init == "auto" else None,  # ... and need not repay its time
            split=cfg.budget_split,
            step_share=phase_share(cfg, ctx.ancestry),
            spent_s=spent,
        )
    except FactoryError:
        if not probed:
            raise
        least = costs.fixed_s + costs.steps_s(MIN_FINETUNE_STEPS)
        ctx.log(
            f"time budget: {format_duration(max(left, 0))} left, below the {format_duration(least)} the rest needs at "
            f"least; fine-tuning {MIN_FINETUNE_STEPS} steps (the build will run over its budget)"
        )
        plan = BudgetPlan(
            left, MIN_FINETUNE_STEPS, None, {"fixed": costs.fixed_s}, least, None, dict(costs.step_s), cfg.budget_split
        )
    if replan:  # the phase the first plan dropped stays dropped, on a resumed build too
        why = plan.expand_why or (replan if isinstance(replan, str) else None)
        plan = dataclasses.replace(plan, expand_steps=0, expand_why=why)
    ctx.log(f"time budget: {stage} plan, {format_duration(left)} left: {describe(plan)}")
    if plan.expand_steps == 0 and costs.expanding_planned:
        why = plan.expand_why or "the first plan dropped it"
        ctx.log(f"time budget: no expanding phase: {why}; the fine-tunes get the time")
    elif plan.expand_steps and plan.expand_why:
        ctx.log(f"time budget: the expanding phase pays: {plan.expand_why}")
    if not dry_run:
        _record(path, {**recorded, stage: {**plan.to_dict(), **({"replanned": True} if replan else {})}})
    return plan


def describe(plan: BudgetPlan) -> str:
    expand = "" if plan.expand_steps is None else f"{plan.expand_steps} expanding-phase steps, "
    parts = ", ".join(f"{k} {v:.0f}s" for k, v in plan.planned_s.items() if v >= 0.5)
    if plan.split == "time" and len(plan.step_s) > 1:  # equal time: N is the steps of the mean shape
        each = plan.finetune_s(next(iter(plan.step_s))) or 0.0
        tune = f"~{each:.0f}s of fine-tuning per shape (~{plan.finetune_steps} steps at the mean shape's step)"
    else:
        tune = f"{plan.finetune_steps} fine-tuning steps per shape"
    return f"{expand}{tune} (~{plan.total_s:.0f}s: {parts})"


def _recorded(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _record(path: Path, data: dict[str, Any]) -> None:
    from factory.io import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def _from_dict(d: Any) -> BudgetPlan | None:
    """A recorded plan, or None when there is none or it is malformed (then the build plans anew)."""
    try:
        expand, split = d.get("expand_steps"), str(d.get("split", "steps"))  # recorded before the split: equal steps
        if split not in SPLITS:
            raise ValueError(split)
        return BudgetPlan(
            float(d["budget_s"]),
            int(d["finetune_steps"]),
            None if expand is None else int(expand),
            {str(k): float(v) for k, v in d["planned_s"].items()},
            float(d["minimum_s"]),
            d.get("expand_why") or None,
            {str(k): float(v) for k, v in (d.get("step_s") or {}).items()},
            split,
        )
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
