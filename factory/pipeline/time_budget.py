"""A wall-clock budget for a build (``--time-budget 45m``): parsing it, and the arithmetic that turns this
host's measured costs into step counts. Pure functions; the measurements are
:mod:`factory.pipeline.budget_costs`'s.

The build's time as a function of the fine-tuning steps ``N`` and the expanding-phase steps ``E``::

    T(N, E) = F + [E > 0] * (e0 + (E - 1) * e) + C(N)

``F``: what no step count changes (sampling the learngene, measuring and exporting every device, the
search, the reports); ``e0``/``e``: the expanding phase's first step (its one-off costs) and each further
one; ``C(N)``: per fine-tune -- a distinct shape and start (:func:`~factory.pipeline.device_choice.
finetune_key`; one shape fine-tuned from two starts is two) -- ``N`` steps and its evaluations, plus the work
that grows with ``N`` (the init probe's images, the accuracy probes' rungs) -- non-decreasing in ``N``.

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
   against weight selection, crossing zero near 750). That bar was measured at a *fixed* fine-tune, the phase's
   time free. At equal time the phase must also repay its time (``head_start_steps``): its descendants reach in
   ``N`` fine-tuning steps what weight selection reaches in ``N + H``, the learngene's *head start*, and the
   phase's seconds are ``dN = N(E = 0) - N(E)`` fine-tuning steps of every shape that weight selection gets
   instead. The phase runs only where ``H(E) >= dN``, with

       H(E) = head_start_steps * min(1, (E - min_expand_steps) / (HEAD_START_PHASE_STEPS - min_expand_steps))

   (zero at the bar, the measured head start at the recipe's 1,500 steps, no more credit beyond: none was
   measured). ``H`` is a count of steps, not a share of ``N``: measured with the shipped learngene
   (bench/phase_payoff.py), the lead in accuracy fades as ``N`` grows while the steps it is worth stay in the
   tens to hundreds, so a long fine-tune does not make the phase pay; a large *fleet* does, since ``dN`` is the
   phase's time over the sum of every shape's step time (one learngene, many descendants). Where the phase
   does not run (``E = 0``) the whole budget fine-tunes; ``--init auto`` goes on with the best other start.
   ``--init peg`` passes ``min_expand_steps = 0`` and no head start: the user asked for PEG, so the phase gets
   its share however small;
3. ``N`` = the largest count with ``T(N, E) <= budget`` (bisection: ``C`` is monotone), at most
   :data:`MAX_FINETUNE_STEPS`.

**Equal time per shape** (``split = "time"``, the default; ``--budget-split``). ``C(N)`` prices ``N`` steps of
every distinct shape, ``N * sum(s_i)`` seconds; the plan splits that time *evenly* between the shapes
(:meth:`BudgetPlan.finetune_s`): shape ``i`` gets ``T / k = N * mean(s)`` seconds, ``N_i = T / (k s_i)`` steps
(:meth:`BudgetPlan.steps_for`), the same total. Why: with accuracy growing like ``a log N_i`` in each shape's
steps, the split of ``T`` that maximises the fleet's sum has ``d(a log N_i) / d(N_i s_i) = a / (N_i s_i)`` equal
for every shape, i.e. equal time. Equal *steps* (``split = "steps"``) give a slow shape most of the time: in
RESULTS Run 17 a fleet whose probes chose d12 and d10 for two devices trained the third device's d3 586 steps
(52 s) where the same pair, beside faster shapes, had 1,361 (99 s), and it scored 1.8 points lower. The first
plan's split also sets the time each device's accuracy probes compare shapes at (:meth:`BudgetPlan.time_share`,
:mod:`factory.device.accuracy`, "equal time"), so a shape is chosen for the time it will be given. Each fine-tune
keeps to its allotment, re-timing itself as it runs (:mod:`factory.pipeline.pacing`): the steps that ran may
differ from ``N_i``, the time should not.

The planner assumes the shape tasks run one after another here (``--jobs 1``, local): with ``--jobs`` or
Ray the build ends earlier than planned, never later.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from factory.errors import FactoryError

#: The fewest fine-tuning steps a budgeted build plans (fewer does not train a model worth exporting).
MIN_FINETUNE_STEPS = 10
#: The most fine-tuning steps a budget plans (a long budget on a tiny task stops here; what is left is unspent).
MAX_FINETUNE_STEPS = 1_000_000
#: A learngene of the shipped recipe's expanding phase (this many steps) was measured for its head start.
HEAD_START_PHASE_STEPS = 1500
#: The head start, in fine-tuning steps, of a learngene trained :data:`HEAD_START_PHASE_STEPS` steps
#: (bench/phase_payoff.py; the module docstring): the build's ``expand_head_start`` default.
HEAD_START_STEPS = 100
#: How a budget shares the fine-tuning time between the fleet's shapes (module docstring, "equal time per shape").
SPLITS = ("time", "steps")

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_UNITS = {
    "h": ("h", "hr", "hrs", "hour", "hours"),
    "m": ("m", "min", "mins", "minute", "minutes"),
    "s": ("s", "sec", "secs", "second", "seconds"),
}
_UNIT_OF = {spelling: unit for unit, spellings in _UNITS.items() for spelling in spellings}
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0}
_PART = re.compile(_NUMBER + r"\s*([a-z]+)", re.IGNORECASE)
_BARE = re.compile(r"^\s*" + _NUMBER + r"\s*$")


def _duration_seconds(text: str) -> float | None:
    """Seconds of ``text`` or None where it is not a duration: a bare number of seconds, or parts ``<number><unit>``
    with the units h, m, s (also spelled hr/hour(s), min/minute(s), sec/second(s)), largest first, each at most
    once: ``90``, ``45m``, ``1.5h``, ``1h30m``, ``1h 05m``, ``12m 30s`` -- what :func:`format_duration` writes."""
    bare = _BARE.match(text)
    if bare:
        return float(bare.group(1))
    parts, at, seen = [], 0, []
    for match in _PART.finditer(text):
        if text[at : match.start()].strip() or match.group(2).lower() not in _UNIT_OF:
            return None
        unit = _UNIT_OF[match.group(2).lower()]
        if seen and "hms".index(unit) <= "hms".index(seen[-1]):
            return None  # a repeated unit or one out of order ("30m 1h") is more likely a slip than a sum
        seen.append(unit)
        parts.append(float(match.group(1)) * _UNIT_SECONDS[unit])
        at = match.end()
    return sum(parts) if parts and not text[at:].strip() else None


def parse_duration(text: str | float | int) -> float:
    """Seconds of ``text``: a positive number of seconds, or one with units (:func:`_duration_seconds`: ``90s``,
    ``45m``, ``1.5h``, ``1h30m``, ``12m 30s``); anything else -- zero, a sign, another unit -- is one line saying
    what is accepted."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        seconds = _duration_seconds(str(text))
        if seconds is None:
            raise FactoryError(
                f"time budget {str(text)!r} is not a duration: give a positive number with s, m or h "
                "(90s, 45m, 1.5h, 1h 30m)",
                param="time_budget_s",
            )
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
    step_s: dict[str, float] = field(default_factory=dict)  # shape label -> its measured fine-tuning step

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
    expand_why: str | None = None  # why a planned phase runs or not (E = 0), in a few words
    step_s: dict[str, float] = field(default_factory=dict)  # shape label -> seconds a step, as planned
    split: str = "time"  # the fine-tuning time between the shapes: "time" (equal) or "steps" (module docstring)

    @property
    def total_s(self) -> float:
        return sum(self.planned_s.values())

    def finetune_s(self, label: str) -> float | None:
        """The seconds allotted to the fine-tune of shape ``label``: ``N`` times its measured step (``split =
        "steps"``) or the plan's fine-tuning time split evenly between its shapes, ``N * mean(step_s)`` (``split =
        "time"``; module docstring, "equal time per shape"); None: not planned (a plan recorded before step times
        were)."""
        step = self.step_s.get(label)
        if not step:
            return None
        if self.split == "steps":
            return self.finetune_steps * step
        return self.finetune_steps * sum(self.step_s.values()) / len(self.step_s)

    def time_share(self, label: str) -> float:
        """Shape ``label``'s fine-tuning time over ``N`` of its steps' (1: equal steps, or not planned)."""
        allotted = self.finetune_s(label)
        return allotted / (self.finetune_steps * self.step_s[label]) if allotted else 1.0

    def steps_for(self, label: str) -> int:
        """Shape ``label``'s planned fine-tuning steps: its allotment at its measured step (``N`` unplanned)."""
        allotted = self.finetune_s(label)
        if allotted is None:
            return self.finetune_steps
        return max(MIN_FINETUNE_STEPS, round(allotted / self.step_s[label]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget_s": round(self.budget_s, 1),
            "minimum_s": round(self.minimum_s, 1),
            "finetune_steps": self.finetune_steps,
            "expand_steps": self.expand_steps,
            "planned_s": {k: round(v, 1) for k, v in self.planned_s.items()},
            "planned_total_s": round(self.total_s, 1),
            **({"expand_why": self.expand_why} if self.expand_why else {}),
            **({"step_s": {k: round(v, 6) for k, v in self.step_s.items()}} if self.step_s else {}),
            "split": self.split,
        }


def expanding_seconds(costs: Costs, steps: int) -> float:
    """``[E > 0] (e0 + (E - 1) e)``."""
    return costs.expand_first_s + (steps - 1) * costs.expand_step_s if steps > 0 else 0.0


def head_start(steps: int, *, head_start_steps: float, min_steps: int) -> float:
    """``H(E)`` of the module docstring: the fine-tuning steps a learngene trained ``steps`` expanding-phase
    steps saves its descendants, 0 up to ``min_steps``, ``head_start_steps`` from :data:`HEAD_START_PHASE_STEPS`."""
    if steps <= min_steps:
        return 0.0
    ramp = (steps - min_steps) / max(1, HEAD_START_PHASE_STEPS - min_steps)
    return head_start_steps * min(1.0, ramp)


def _as_given(seconds: float) -> str:
    """A budget as the user gave it: ``0.5s``, ``14s`` (not rounded up, and rid of the float error that taking the
    spent time off and back on leaves), ``1m 30s`` from a minute."""
    given = max(round(seconds, 3), 0.0)
    return f"{given:g}s" if given < 60 else format_duration(given)


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
    head_start_steps: float | None = None,
    split: str = "time",
    step_share: float = 1.0,
    spent_s: float = 0.0,
) -> BudgetPlan:
    """The step counts that spend ``budget_s`` (module docstring); one line naming the least budget when
    ``budget_s`` cannot hold even :data:`MIN_FINETUNE_STEPS` fine-tuning steps. ``head_start_steps``: the
    learngene's measured head start, which the phase must repay at equal time (None: no such check, ``--init
    peg``). ``split``: how the fine-tuning time is shared between the shapes (:data:`SPLITS`). ``step_share``: what
    a phase step is worth in steps of the full sandwich (:func:`factory.pipeline.config.phase_share`), in which
    ``min_expand_steps`` and the head start count. ``spent_s``: what the build already spent of the user's budget
    (start-up, measuring) before ``budget_s`` was left; the error names the user's budget and the least to give,
    both with it."""
    if split not in SPLITS:
        raise FactoryError(f"budget split {split!r} must be one of {', '.join(SPLITS)}", param="budget_split")
    if not 0 <= expand_share < 1:
        raise FactoryError(f"expand share {expand_share} must be in [0, 1)", param="expand_share")
    minimum = least_budget(costs)
    if budget_s < minimum:
        least = format_duration(minimum + spent_s)
        spent = f"{format_duration(spent_s)} of start-up and measuring, " if spent_s > 0 else ""
        raise FactoryError(
            f"time budget {_as_given(budget_s + spent_s)} is below the least this build can do on this "
            f"machine, {least} ({spent}fixed work {format_duration(costs.fixed_s)} and {MIN_FINETUNE_STEPS} "
            f"fine-tuning steps per shape): give at least {least}, or fewer devices",
            param="time_budget_s",
        )
    rest = budget_s - costs.fixed_s  # for the expanding phase and the fine-tunes
    expand, why, steps = None, None, None  # steps: N, where the head-start check already found it
    if costs.expanding_planned and costs.expand_step_s > 0:
        spare = (budget_s - minimum) * expand_share
        expand = 0
        if spare >= costs.expand_first_s:
            expand = min(max_expand_steps, 1 + int((spare - costs.expand_first_s) / costs.expand_step_s))
        worth = round(expand * step_share)  # in steps of the full sandwich
        if worth < min_expand_steps:  # too little to pay (module docstring): the fine-tunes get it all
            counted = f" (worth {worth} of the full sandwich)" if worth != expand else ""
            expand, why = 0, f"its share buys {expand} steps{counted}, fewer than the {min_expand_steps} that pay"
        elif expand and head_start_steps is not None:  # it must repay its time at equal time
            without, with_phase = _most_steps(costs, rest), _most_steps(costs, rest - expanding_seconds(costs, expand))
            cost = without - with_phase
            gain = head_start(worth, head_start_steps=head_start_steps, min_steps=min_expand_steps)
            spent = f"its {expanding_seconds(costs, expand):.0f}s ({expand} steps) cost every shape {cost} fine-tuning steps"
            if gain < cost:
                expand, steps = 0, without
                why = f"{spent}, more than the ~{gain:.0f} steps of head start it gives (--expand-head-start)"
            else:
                steps = with_phase
                why = f"{spent}, repaid by the ~{gain:.0f} steps of head start it gives (--expand-head-start)"
    lo = steps if steps is not None else _most_steps(costs, rest - expanding_seconds(costs, expand or 0))
    planned = dict(costs.fixed)
    if expand:
        planned["learngene"] = planned.get("learngene", 0.0) + expanding_seconds(costs, expand)
    for stage, seconds in costs.per_steps(lo).items():
        planned[stage] = planned.get(stage, 0.0) + seconds
    return BudgetPlan(budget_s, lo, expand, planned, minimum, why, dict(costs.step_s), split)


def _most_steps(costs: Costs, rest: float) -> int:
    """The largest ``N`` in [MIN_FINETUNE_STEPS, MAX_FINETUNE_STEPS] with ``C(N) <= rest`` (bisection: ``C`` is
    monotone); MIN_FINETUNE_STEPS where even that does not fit."""
    lo, hi = MIN_FINETUNE_STEPS, MAX_FINETUNE_STEPS
    if costs.steps_s(hi) <= rest:
        return hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if costs.steps_s(mid) <= rest:
            lo = mid
        else:
            hi = mid - 1
    return lo
