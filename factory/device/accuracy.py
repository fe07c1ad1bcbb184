"""Accuracy-aware shape choice: estimate what each candidate reaches after the build's fine-tune.

The capacity proxy (:func:`factory.device.search.capacity_proxy`) always prefers the largest shape that
fits, but with a short fine-tuning budget a shallower or narrower descendant of the learngene is
often more accurate. Because any shape expands from the learngene in well under a second, the
factory can *try* the candidates on the task instead of guessing.

**Estimator** (:class:`ProxyFinetune`, an :class:`~factory.device.search.AccuracyPredictor`). For a shape
``s``: initialise it exactly as the build will (``init`` from the learngene or ancestry, seed),
fine-tune it for ``k = max(min_steps, round(fraction * N))`` steps of the build's recipe with the
schedule compressed to ``k`` steps (same learning rate, batch size and warm-up fraction, cosine to
the end), and measure top-1 accuracy on the first ``val_images`` images of the validation split.
That accuracy is the prediction -- a ranking score, not a calibrated estimate of the final accuracy
(after 6 of 100 steps it is typically 0.2-0.3 below it): a few-step learning-curve probe, the
low-fidelity rung of successive halving / Hyperband. It captures both what the inherited weights already know about the
task and how fast the shape trains, which is what decides accuracy after a short fine-tune.

**Candidates** (:func:`candidates`): up to ``count`` shapes of the feasible Pareto front of the
capacity search (capacity vs latency), spread evenly in log-latency over the 32x range below the
capacity choice, which is always included. The chosen shape is the one with the highest predicted accuracy; ties within one
validation image go to the higher-capacity shape.

**Cost.** ``count * k`` training steps of candidates plus ``count`` evaluations of ``val_images``
images; with the defaults (8 candidates, ``fraction = 1/16``) about half of one fine-tune of the
average candidate. ``ProxyFinetune.seconds`` records what it really took.

**Cache.** Estimates are cached by content -- learngene hash, data identity, shape, init, recipe
and estimator settings -- as small JSON files in ``cache_dir`` (a build uses ``OUT/.cache/estimate``),
so a fleet and later builds re-use them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from factory.pipeline.artifacts import atomic_write_bytes
from factory.core.shapes import DescendantShape

OBJECTIVES = ("accuracy", "capacity")


@dataclass(frozen=True)
class EstimatorConfig:
    candidates: int = 8
    fraction: float = 1 / 16
    min_steps: int = 4
    val_images: int = 256

    def steps_for(self, budget: int) -> int:
        return max(self.min_steps, round(self.fraction * budget))


@dataclass
class ProxyFinetune:
    """Predicted accuracy of a shape after the build's fine-tune (see module docstring)."""

    ancestry: Any
    learngene: Any
    data: Any  # factory.training.data.Dataset
    recipe: Any  # factory.training.train.TrainConfig: the build's fine-tuning recipe (factory.pipeline.build.finetune_recipe)
    init: str = "peg"
    config: EstimatorConfig = field(default_factory=EstimatorConfig)
    cache_dir: Path | None = None
    seconds: float = 0.0
    computed: int = 0
    reused: int = 0

    def proxy_recipe(self):
        """The build's recipe compressed to the proxy's length: same lr, batch, seed and warm-up
        fraction, cosine over ``k`` steps, no checkpoints or evaluations."""
        full = self.recipe
        k = self.config.steps_for(full.steps)
        warmup = max(1, round(full.warmup_steps * k / max(1, full.steps)))
        return replace(full, steps=k, warmup_steps=warmup, ckpt_every=0, eval_every=0)

    def describe(self) -> dict[str, Any]:
        return {"method": "proxy-finetune", "steps": self.proxy_recipe().steps, "budget_steps": self.recipe.steps,
                "val_images": min(self.config.val_images, len(self.data.val)), "candidates": self.config.candidates,
                "init": self.init, "seed": self.recipe.seed}

    def key(self, shape: DescendantShape) -> str:
        recipe = {k: v for k, v in asdict(self.recipe).items() if k not in ("device", "ckpt_every", "eval_every")}
        parts = [self.learngene.sha256 if self.init == "peg" else self.ancestry.sha256, self.data.identity, shape.to_dict(),
                 self.init, recipe, asdict(self.config)]
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]

    def __call__(self, shape: DescendantShape) -> float:
        path = self.cache_dir / f"{self.key(shape)}.json" if self.cache_dir is not None else None
        if path is not None and path.is_file():
            try:
                acc = float(json.loads(path.read_text())["accuracy"])
                self.reused += 1
                return acc
            except (ValueError, KeyError, OSError):
                pass  # a damaged entry is recomputed
        from factory.core.baselines import init_descendant
        from factory.training.train import evaluate, train

        t0 = time.perf_counter()
        model = init_descendant(self.init, shape, ancestry=self.ancestry, learngene=self.learngene, seed=self.recipe.seed)
        train(model, self.data.train, self.proxy_recipe(), progress=False)
        acc = evaluate(model.cpu(), self.data.val.subset(0, self.config.val_images))
        self.seconds += time.perf_counter() - t0
        self.computed += 1
        if path is not None:
            atomic_write_bytes(path, json.dumps({"accuracy": acc, "shape": shape.label(), **self.describe()}).encode())
        return acc


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


def choose_by_accuracy(result, predictor, count: int) -> tuple[Any, list[dict[str, Any]]]:
    """Estimate the candidates' accuracy and return ``(chosen candidate, rows)``.

    ``rows`` (one per estimated candidate, best first) carry the shape label, predicted accuracy,
    predicted latency and capacity score. Ties within ``1 / val_images`` go to higher capacity.
    """
    cands = candidates(result, count)
    scored = [(predictor(c.shape), c) for c in cands]
    tie = 1.0 / max(1, getattr(getattr(predictor, "config", None), "val_images", 1000))
    best_acc = max(a for a, _ in scored)
    chosen = max((c for a, c in scored if a >= best_acc - tie / 2), key=lambda c: c.score)
    rows = [{"label": c.shape.label(), "shape": c.shape.to_dict(), "predicted_accuracy": round(a, 4),
             "latency_ms": round(c.latency_ms, 4), "capacity_score": round(c.score, 4), "chosen": c is chosen}
            for a, c in sorted(scored, key=lambda ac: (-ac[0], -ac[1].score))]
    return chosen, rows
