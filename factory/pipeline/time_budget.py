"""A wall-clock budget for a build (``--time-budget 45m``): parsing it, and the arithmetic that turns this
host's measured costs into step counts. Pure functions; the measurements are
:mod:`factory.pipeline.budget_costs`'s.

The build's time as a function of the fine-tuning steps ``N`` and the expanding-phase steps ``E``::

    T(N, E) = F + [E > 0] * (e0 + (E - 1) * e) + C(N)

``F``: what no step count changes (sampling the learngene, measuring and exporting every device, the
search, the reports); ``e0``/``e``: the expanding phase's first step (its one-off costs) and each further
one; ``C(N)``: per distinct shape ``N`` fine-tuning steps and its evaluations, plus the work that grows
with ``N`` (the init probe's images, the accuracy probes' rungs) -- non-decreasing in ``N``.

The plan (:func:`fit_budget`):

1. the least the build can do is ``T(MIN_FINETUNE_STEPS, 0)``; a smaller budget is refused naming it;
2. when a learngene must be trained (no given, cached or shipped one) and the ancestry transfers to the
   task (the expanding-phase check), the phase gets ``expand_share`` of what the budget leaves above that
   least, at most ``max_expand_steps``. Why a share: with accuracy growing like ``a log E + b log N`` in
   each phase's steps (diminishing returns in both), the best split of a time between them spends the
   fraction ``a / (a + b)`` on the phase; with no measurement of ``a`` and ``b`` on the user's task the
   default weighs them equally (0.5), configurable (:attr:`~factory.pipeline.config.BuildConfig.expand_share`).
   A share that buys fewer than ``min_expand_steps`` steps does not pay: a learngene trained that little
   starts its descendants *below* weight selection, which costs nothing (bench/RESULTS.md, "the expanding
   phase is what carries the ancestry's knowledge": 150 steps -12.7 points, 250 steps -4.7, 1,500 steps +3.0
   against weight selection, crossing zero near 750 steps). Then the phase does not run (``E = 0``) and the
   whole budget fine-tunes; ``--init auto`` goes on with the best other start. ``--init peg`` passes 0: the
   user asked for PEG, so the phase gets its share however small. That threshold was measured at a *fixed*
   fine-tune, the phase's time free; at equal time it is a lower bound only: with a 30-minute budget on the
   demo fleet (RESULTS, Run 13) 1,400 steps did not pay against the 2,458 fine-tuning steps their time buys
   weight selection. A payoff measured at equal time is open work; ``expand_min_steps`` sets the bar;
3. ``N`` = the largest count with ``T(N, E) <= budget`` (bisection: ``C`` is monotone), at most
   :data:`MAX_FINETUNE_STEPS`.

The planner assumes the shape tasks run one after another here (``--jobs 1``, local): with ``--jobs`` or
Ray the build ends earlier than planned, never later.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from factory.errors import FactoryError

#: The fewest fine-tuning steps a budgeted build plans (fewer does not train a model worth exporting).
MIN_FINETUNE_STEPS = 10
#: The most fine-tuning steps a budget plans (a long budget on a tiny task stops here; what is left is unspent).
MAX_FINETUNE_STEPS = 1_000_000

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | float | int) -> float:
    """Seconds of ``text``: a positive number with an optional unit, ``s``, ``m`` or ``h`` (``90``, ``90s``,
    ``45m``, ``1.5h``); anything else -- zero, a sign, another unit -- is one line saying what is accepted."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = _DURATION.match(str(text))
        if match is None:
            raise FactoryError(
                f"time budget {str(text)!r} is not a duration: give a positive number with s, m or h (90s, 45m, 1.5h)",
                param="time_budget_s",
            )
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]
    if not math.isfinite(seconds) or seconds <= 0:
        raise FactoryError(
            f"time budget {text!r} must be above zero: give a positive duration (90s, 45m, 1.5h)", param="time_budget_s"
        )
    return seconds


def format_duration(seconds: float) -> str:
    """``seconds`` as a budget would be written (``45s``, ``12m 30s``, ``1h 05m``), rounded up."""
    s = math.ceil(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {(s % 3600 + 59) // 60:02d}m"


@dataclass(frozen=True)
class Costs:
    """This host's measured costs of one build (the module docstring's terms, seconds), by stage."""

    fixed: dict[str, float]  # F, by stage (learngene sampling, measure, export, reports)
    per_steps: Callable[[int], dict[str, float]]  # C(N) by stage (init, probes, finetune), each non-decreasing
    expand_first_s: float = 0.0  # e0
    expand_step_s: float = 0.0  # e
    expanding_planned: bool = False  # a learngene must be trained and the phase may pay: plan E

    @property
    def fixed_s(self) -> float:
        return sum(self.fixed.values())

    def steps_s(self, steps: int) -> float:
        return sum(self.per_steps(steps).values())


@dataclass(frozen=True)
class BudgetPlan:
    """What :func:`fit_budget` chose: the step counts, and the time each stage is planned to take."""

    budget_s: float
    finetune_steps: int
    expand_steps: int | None  # None: not planned (the learngene costs nothing, or it is made already)
    planned_s: dict[str, float]  # stage -> seconds on this host
    minimum_s: float

    @property
    def total_s(self) -> float:
        return sum(self.planned_s.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget_s": round(self.budget_s, 1),
            "minimum_s": round(self.minimum_s, 1),
            "finetune_steps": self.finetune_steps,
            "expand_steps": self.expand_steps,
            "planned_s": {k: round(v, 1) for k, v in self.planned_s.items()},
            "planned_total_s": round(self.total_s, 1),
        }


def expanding_seconds(costs: Costs, steps: int) -> float:
    """``[E > 0] (e0 + (E - 1) e)``."""
    return costs.expand_first_s + (steps - 1) * costs.expand_step_s if steps > 0 else 0.0


def least_budget(costs: Costs) -> float:
    """``T(MIN_FINETUNE_STEPS, 0)``: the least budget the build can be planned in."""
    return costs.fixed_s + costs.steps_s(MIN_FINETUNE_STEPS)


def fit_budget(
    budget_s: float,
    costs: Costs,
    *,
    expand_share: float = 0.5,
    max_expand_steps: int = 1500,
    min_expand_steps: int = 0,
) -> BudgetPlan:
    """The step counts that spend ``budget_s`` (module docstring); one line naming the least budget when
    ``budget_s`` cannot hold even :data:`MIN_FINETUNE_STEPS` fine-tuning steps."""
    if not 0 <= expand_share < 1:
        raise FactoryError(f"expand share {expand_share} must be in [0, 1)", param="expand_share")
    minimum = least_budget(costs)
    if budget_s < minimum:
        raise FactoryError(
            f"time budget {format_duration(budget_s)} is below the least this build can do on this machine, "
            f"{format_duration(minimum)} (fixed work {format_duration(costs.fixed_s)} and {MIN_FINETUNE_STEPS} "
            f"fine-tuning steps per shape): give at least {format_duration(minimum)}, or fewer devices",
            param="time_budget_s",
        )
    expand = None
    if costs.expanding_planned and costs.expand_step_s > 0:
        spare = (budget_s - minimum) * expand_share
        expand = 0
        if spare >= costs.expand_first_s:
            expand = min(max_expand_steps, 1 + int((spare - costs.expand_first_s) / costs.expand_step_s))
        if expand < min_expand_steps:  # too little to pay (module docstring): the fine-tunes get it all
            expand = 0
    rest = budget_s - costs.fixed_s - expanding_seconds(costs, expand or 0)
    lo, hi = MIN_FINETUNE_STEPS, MAX_FINETUNE_STEPS  # the largest N with C(N) <= rest; C(lo) <= rest holds
    if costs.steps_s(hi) <= rest:
        lo = hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if costs.steps_s(mid) <= rest:
            lo = mid
        else:
            hi = mid - 1
    planned = dict(costs.fixed)
    if expand:
        planned["learngene"] = planned.get("learngene", 0.0) + expanding_seconds(costs, expand)
    for stage, seconds in costs.per_steps(lo).items():
        planned[stage] = planned.get(stage, 0.0) + seconds
    return BudgetPlan(budget_s, lo, expand, planned, minimum)
