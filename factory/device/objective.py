"""Which selection objective a build runs: probe the candidates for accuracy, or take the largest that fits."""

from __future__ import annotations

from factory.errors import FactoryError

OBJECTIVES = ("auto", "accuracy", "capacity")


def resolve_objective(objective: str, *, init: str, trained_learngene: bool) -> tuple[str, str]:
    """``(objective, reason)``: ``"accuracy"`` or ``"capacity"`` for a build's setting.

    ``"auto"`` (the default) is ``capacity`` for descendants of a PEG learngene trained by the
    expanding phase and ``accuracy`` for everything else (an untrained learngene, ``scratch``,
    ``tleg``, ``weight_selection``). Why, by measurement (``bench/search_quality.py``, RESULTS.md):
    the expanding phase distils the ancestry into every depth x width, so a larger expansion starts
    better and, after the build's fine-tune, the largest shape that fits is within noise of the most
    accurate (0.3 points from the best shape, seed-averaged) -- probes can only add noise there; with
    any other initialisation nothing makes the larger expansion start better, the capacity proxy often picks
    the wrong end of the front, and the probes gain on it (untrained learngene +4.2 points, scratch +9.7,
    TLEG +0.5, weight selection +1.1, on average over the bench's cases). An explicit objective is kept.
    """
    if objective not in OBJECTIVES:
        raise FactoryError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if objective != "auto":
        return objective, f"--objective {objective}"
    if init == "peg" and trained_learngene:
        return "capacity", (
            "auto: descendants of a trained learngene, where the largest shape that fits is measured "
            "within noise of the most accurate (--objective accuracy to probe anyway)"
        )
    what = "an untrained learngene" if init == "peg" else f"--init {init}"
    return "accuracy", f"auto: {what}, where the largest shape is often not the most accurate: probed"
