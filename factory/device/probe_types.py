"""The successive-halving estimator's settings (:class:`EstimatorConfig`: rungs, validation images, the anchored
variant, equal time) and one probe's result (:class:`Probe`), as :mod:`factory.device.accuracy` documents them;
plain data, so that the choice between probes (:mod:`factory.device.accuracy_choice`) can name them too."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from factory.core.shapes import DescendantShape

SCORES = ("calibrated", "raw")


@dataclass(frozen=True)
class EstimatorConfig:
    candidates: int = 8
    rung_fractions: tuple[float, ...] = (0.03, 0.06, 0.12)
    warmup_steps: int = 2
    val_images: int = 512
    tie_nll: float = 1e-3
    cooldown: bool = True  # the last rung anneals: cosine from the build's lr to min_lr over its steps
    anchor: bool = False  # the capacity choice always reaches the last rung and is replaced only on evidence
    z: float = 2.0  # the evidence (anchored): a paired per-image NLL gain of more than z standard errors
    score: str = "calibrated"  # "calibrated": NLL at the best temperature (temperature_scaled_nll); "raw": plain NLL
    equal_time: bool = False  # rungs at equal time (a time budget's fine-tunes), not equal steps: module docstring
    max_horizon_ratio: float = 16.0  # equal time: a shape's horizon is N times at most this, at least N over it
    flops_slack: float = 1.25  # equal time: s_ref / s_c at most this times the FLOPs ratio (module docstring)

    def __post_init__(self) -> None:
        from factory.errors import FactoryError

        if self.score not in SCORES:
            raise FactoryError(f"estimator score must be one of {', '.join(SCORES)}, got {self.score!r}")

    def rungs_for(self, budget: int, first: int | None = None) -> tuple[int, ...]:
        """Cumulative probe steps per rung for a fine-tune of ``budget`` steps, strictly increasing; ``first``
        fixes rung 0 (equal time: the steps every shape was timed over) and the fractions go on from rung 1."""
        out: list[int] = [] if first is None else [first]
        for f in self.rung_fractions[len(out) :]:
            out.append(max(round(f * budget), out[-1] + 1 if out else 1))
        return tuple(out)

    def probe_steps(self, count: int, budget: int) -> int:
        """Training steps successive halving spends on ``count`` candidates (the formula above)."""
        total, alive, done = 0, count, 0
        for t in self.rungs_for(budget):
            total += alive * (t - done)
            alive, done = self.survivors(alive, self.anchor), t
        return total

    @staticmethod
    def survivors(alive: int, anchored: bool) -> int:
        """How many of ``alive`` candidates go on to the next rung: half, rounded up; anchored, at
        least 2 (the incumbent and a challenger) while there are 2."""
        return max(min(alive, 2) if anchored else 1, math.ceil(alive / 2))


@dataclass(frozen=True)
class Probe:
    """One candidate's probe: validation accuracy and NLL after ``steps`` probe steps."""

    shape: DescendantShape
    steps: int
    accuracy: float
    nll: float
    per_image: tuple[float, ...] = ()  # the NLL of each validation image, for paired comparisons
    cached: bool = False
    rung: int = 0  # the rung it reached (equal time: shapes at one rung have trained different step counts)
    step_s: float = field(default=0.0, compare=False)  # seconds per training step seen in this probe (0: unknown)
    horizon: int = 0  # the fine-tune steps its rungs are fractions of
