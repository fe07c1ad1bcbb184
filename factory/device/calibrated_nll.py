"""The probes' score: a classifier's validation NLL at its best temperature (:func:`temperature_scaled_nll`),
so a few-step probe is scored on what its logits rank, not on how confident it happens to be."""

from __future__ import annotations

import math
from typing import Any


def temperature_scaled_nll(logits, labels, *, iters: int = 40) -> tuple[float, Any]:
    """``(beta, per-image NLL)`` of ``softmax(beta * logits)`` at the inverse temperature ``beta``
    that minimises the mean NLL on ``(logits, labels)``.

    ``L(beta) = mean_i [logsumexp(beta z_i) - beta z_i,y_i]`` is convex in ``beta`` (a log-sum-exp of
    linear functions minus a linear one), so a golden-section search on ``[0, beta_max]`` finds its
    minimum; ``beta_max`` doubles from 16 until the minimum is inside the bracket. ``beta = 0`` is
    the uniform prediction, so the score is at most ``ln K`` (``K`` classes): a model that has learned
    nothing scores ``ln K`` however it is calibrated, and one that ranks the right class higher scores
    below it even if its raw confidence is far off -- which, a few steps into a fine-tune, it usually
    is, by an amount that depends on the shape's size and the learning rate rather than on what it
    has learned.
    """
    import torch

    z = logits.double()
    y = labels.long()

    def loss(beta: float) -> float:
        return float(torch.nn.functional.cross_entropy(beta * z, y))

    hi = 16.0
    while loss(hi) < loss(hi / 2) and hi < 1e4:  # still falling at the edge: widen the bracket
        hi *= 2
    lo, g = 0.0, (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(iters):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = loss(b)
    beta = (lo + hi) / 2
    return beta, torch.nn.functional.cross_entropy(beta * z, y, reduction="none").float()
