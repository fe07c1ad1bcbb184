"""The shape searcher: descendant shapes that fit a device profile, ranked.

**Space** (:class:`SearchSpace`, from the ancestry so every candidate can be expanded): depth
``1..max_depth`` (default ``2 * L_a``); width in multiples of ``snap`` up to the ancestry's;
heads such that the head dim divides the width, is a multiple of ``head_dim_multiple`` and is at
most the ancestry's head dim (expansion cannot grow it) and at least ``min_head_dim``; MLP ratios
from a list, keeping ``int(width * ratio)`` within the ancestry's hidden size; input sizes from a
list of multiples of the ancestry's patch size (default: the ancestry's input only).

**Objective.** Maximise a predicted-accuracy score subject to every budget. The default score is
the capacity proxy ``log(FLOPs) + 0.5 * log(params)``; :class:`FittedAccuracy` (least squares of
accuracy on ``log FLOPs``, ``log params``, ``log depth``, fitted to benchmark rows) replaces it
when measurements exist. Ties break towards lower predicted latency.

**Strategy.** The space is enumerated when it has at most ``enumerate_limit`` shapes; otherwise
a seeded evolutionary search (tournament selection, one-field mutation, uniform crossover)
evaluates up to ``evaluations`` shapes. Same space, profile and seed -> same result.

**Output** (:class:`SearchResult`): feasible candidates ranked, each with predicted latency,
memory, FLOPs, params and the relative margin to each budget (``(budget - value) / budget``,
negative = broken); the Pareto front (score vs latency); each rejected shape with the budgets it
broke. When nothing fits, :meth:`SearchResult.require_feasible` raises with the closest miss and
the budget to relax.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from factory.core.shapes import ArchConfig, DescendantShape, vit_flops, vit_params
from factory.device.latency import LatencyModel, Target
from factory.errors import FactoryError

DEFAULT_MLP_RATIOS = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)


@dataclass(frozen=True)
class SearchSpace:
    depths: tuple[int, ...]
    embed_dims: tuple[int, ...]
    mlp_ratios: tuple[float, ...]
    img_sizes: tuple[int, ...]
    patch_size: int
    num_classes: int
    max_head_dim: int
    min_head_dim: int = 16
    head_dim_multiple: int = 8
    max_hidden: int = 1 << 30

    @classmethod
    def from_arch(
        cls,
        arch: ArchConfig,
        *,
        max_depth: int | None = None,
        snap: int = 32,
        mlp_ratios: tuple[float, ...] = DEFAULT_MLP_RATIOS,
        img_sizes: tuple[int, ...] | None = None,
        num_classes: int | None = None,
        min_head_dim: int = 16,
        head_dim_multiple: int = 8,
    ) -> SearchSpace:
        if snap < 1:
            raise FactoryError(f"snap must be >= 1, got {snap}")
        dims = tuple(range(snap, arch.embed_dim + 1, snap)) or (arch.embed_dim,)
        sizes = img_sizes or (arch.img_size,)
        for size in sizes:
            if size % arch.patch_size:
                raise FactoryError(f"input size {size} is not a multiple of the patch size {arch.patch_size}")
        return cls(
            depths=tuple(range(1, (max_depth or 2 * arch.depth) + 1)),
            embed_dims=dims,
            mlp_ratios=tuple(mlp_ratios),
            img_sizes=tuple(sizes),
            patch_size=arch.patch_size,
            num_classes=arch.num_classes if num_classes is None else num_classes,
            max_head_dim=arch.head_dim,
            min_head_dim=min(min_head_dim, arch.head_dim),
            head_dim_multiple=head_dim_multiple,
            max_hidden=arch.mlp_hidden,
        )

    def heads_for(self, width: int) -> tuple[int, ...]:
        out = []
        for heads in range(1, width + 1):
            hd = width // heads
            if width % heads or hd > self.max_head_dim or hd < self.min_head_dim or hd % self.head_dim_multiple:
                continue
            out.append(heads)
        return tuple(out)

    @functools.cached_property
    def widths(self) -> list[tuple[int, tuple[int, ...], tuple[float, ...]]]:
        """``(width, valid heads, valid MLP ratios)`` for every width that has both."""
        rows = []
        for width in self.embed_dims:
            heads = self.heads_for(width)
            ratios = tuple(r for r in self.mlp_ratios if 1 <= int(width * r) <= self.max_hidden)
            if heads and ratios:
                rows.append((width, heads, ratios))
        return rows

    def size(self) -> int:
        per_depth = sum(len(h) * len(r) for _, h, r in self.widths)
        return per_depth * len(self.depths) * len(self.img_sizes)

    def shape(self, depth: int, width: int, heads: int, ratio: float, img: int) -> DescendantShape:
        return DescendantShape(depth, width, heads, ratio, img, self.patch_size, self.num_classes)

    def enumerate(self):
        widths = self.widths
        for img, depth in itertools.product(self.img_sizes, self.depths):
            for width, heads, ratios in widths:
                for h, r in itertools.product(heads, ratios):
                    yield self.shape(depth, width, h, r, img)

    def random_shape(self, rng: random.Random) -> DescendantShape:
        width, heads, ratios = rng.choice(self.widths)
        return self.shape(
            rng.choice(self.depths), width, rng.choice(heads), rng.choice(ratios), rng.choice(self.img_sizes)
        )

    def mutate(self, s: DescendantShape, rng: random.Random) -> DescendantShape:
        which = rng.randrange(4)
        depth, width, img = s.depth, s.embed_dim, s.img_size
        if which == 0:
            depth = rng.choice(self.depths)
        elif which == 1:
            width = rng.choice([w for w, _, _ in self.widths])
        elif which == 2:
            img = rng.choice(self.img_sizes)
        return self.repair(
            depth, width, s.num_heads if which != 3 else None, s.mlp_ratio if which != 3 else None, img, rng
        )

    def repair(self, depth, width, heads, ratio, img, rng: random.Random) -> DescendantShape:
        valid = {w: (h, r) for w, h, r in self.widths}
        hs, rs = valid[width]
        return self.shape(
            depth, width, heads if heads in hs else rng.choice(hs), ratio if ratio in rs else rng.choice(rs), img
        )


class AccuracyPredictor(Protocol):
    """A per-shape accuracy score: higher is better (the capacity proxy, :class:`FittedAccuracy`)."""

    def __call__(self, shape: DescendantShape) -> float: ...


def capacity_proxy(arch: ArchConfig) -> Callable[[DescendantShape], float]:
    """``log(FLOPs) + 0.5 * log(params)``: more compute and capacity, higher predicted accuracy."""

    def score(shape: DescendantShape) -> float:
        return math.log(vit_flops(shape, arch)) + 0.5 * math.log(vit_params(shape, arch))

    return score


@dataclass(frozen=True)
class FittedAccuracy:
    """Accuracy ~ w . [1, log FLOPs, log params, log depth], fitted by least squares to rows."""

    weights: tuple[float, ...]
    arch: ArchConfig

    @classmethod
    def fit(cls, rows: list[tuple[DescendantShape, float]], arch: ArchConfig) -> FittedAccuracy:
        import numpy as np

        if len(rows) < 4:
            raise FactoryError(f"an accuracy predictor needs at least 4 measured shapes, got {len(rows)}")
        x = np.array([cls._features(s, arch) for s, _ in rows])
        y = np.array([acc for _, acc in rows])
        w, *_ = np.linalg.lstsq(x, y, rcond=None)
        return cls(tuple(float(v) for v in w), arch)

    @staticmethod
    def _features(s: DescendantShape, arch: ArchConfig) -> list[float]:
        return [1.0, math.log(vit_flops(s, arch)), math.log(vit_params(s, arch)), math.log(s.depth)]

    def __call__(self, shape: DescendantShape) -> float:
        return sum(w * f for w, f in zip(self.weights, self._features(shape, self.arch)))


@dataclass(frozen=True)
class Candidate:
    shape: DescendantShape
    score: float
    latency_ms: float
    memory_mb: float
    flops_g: float
    params_m: float
    margins: dict[str, float]

    @property
    def feasible(self) -> bool:
        return all(m >= 0 for m in self.margins.values())

    @property
    def broken(self) -> list[str]:
        return [k for k, m in self.margins.items() if m < 0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape.to_dict(),
            "label": self.shape.label(),
            "score": round(self.score, 4),
            "latency_ms": round(self.latency_ms, 4),
            "memory_mb": round(self.memory_mb, 3),
            "flops_g": round(self.flops_g, 4),
            "params_m": round(self.params_m, 4),
            "margins": {k: round(v, 4) for k, v in self.margins.items()},
            "broken": self.broken,
        }


def evaluate_shape(shape: DescendantShape, profile: Target, cost: LatencyModel, score: AccuracyPredictor) -> Candidate:
    values = {
        "latency_ms": cost.latency_ms(shape),
        "memory_mb": cost.memory_mb(shape),
        "flops_g": vit_flops(shape, cost.arch) / 1e9,  # per image (the schema says so), whatever the batch
        "params_m": vit_params(shape, cost.arch) / 1e6,
    }
    limits = (
        profile.limits() if hasattr(profile, "limits") else profile.budgets.items()
    )  # memory: capped by the device's
    margins = {k: (budget - values[k]) / budget for k, budget in limits}
    return Candidate(
        shape, score(shape), values["latency_ms"], values["memory_mb"], values["flops_g"], values["params_m"], margins
    )


@dataclass
class SearchResult:
    profile: str
    strategy: str
    evaluated: int
    space_size: int
    feasible: list[Candidate]
    rejected: list[Candidate]
    pareto: list[Candidate] = field(default_factory=list)

    def top(self, k: int) -> list[Candidate]:
        """The ``k`` best feasible shapes that differ in more than their head count: of one depth, width, MLP
        ratio and input, only the best-ranked head count is listed (heads are the tie-break, not a new entry)."""
        out, seen = [], set()
        for c in self.feasible:
            s = c.shape
            key = (s.depth, s.embed_dim, s.mlp_ratio, s.img_size, s.patch_size)
            if key not in seen:
                seen.add(key)
                out.append(c)
                if len(out) == k:
                    break
        return out

    def closest_miss(self) -> Candidate | None:
        """The rejected shape whose worst broken budget is the least broken."""
        return max(self.rejected, key=lambda c: min(c.margins.values()), default=None)

    def require_feasible(self) -> Candidate:
        if self.feasible:
            return self.feasible[0]
        miss = self.closest_miss()
        if miss is None:
            raise FactoryError(f"profile {self.profile}: the search space is empty; widen it")
        worst = min(miss.margins, key=miss.margins.get)
        value = getattr(miss, worst)
        which = f"budgets.{worst}" + (" (or hardware.memory_mb, which caps it)" if worst == "memory_mb" else "")
        raise FactoryError(
            f"profile {self.profile}: no shape fits the budgets; the closest, {miss.shape.label()}, needs "
            f"{worst} = {value:.4g} ({-miss.margins[worst]:.0%} over budget); relax {which} to at least {value:.4g}"
        )

    def to_dict(self, top: int = 10, rejected: int = 20) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "strategy": self.strategy,
            "evaluated": self.evaluated,
            "space_size": self.space_size,
            "feasible_count": len(self.feasible),
            "rejected_count": len(self.rejected),
            "top": [c.to_dict() for c in self.top(top)],
            "pareto": [c.to_dict() for c in self.pareto],
            "rejected": [c.to_dict() for c in self.rejected[:rejected]],
        }


def pareto_front(cands: list[Candidate]) -> list[Candidate]:
    """Candidates no other beats on both score (higher) and latency (lower), by latency."""
    front, best = [], -math.inf
    for c in sorted(cands, key=lambda c: (c.latency_ms, -c.score)):
        if c.score > best:
            front.append(c)
            best = c.score
    return front


def search(
    profile: Target,
    space: SearchSpace,
    cost: LatencyModel,
    *,
    score: AccuracyPredictor | None = None,
    seed: int = 0,
    enumerate_limit: int = 50_000,
    evaluations: int = 10_000,
) -> SearchResult:
    """Search ``space`` for shapes within ``profile``'s budgets (see module docstring).

    ``profile`` is any :class:`~factory.device.latency.Target` (a :class:`~factory.device.profile.Profile`),
    ``cost`` any :class:`~factory.device.latency.LatencyModel`
    (:func:`factory.device.resolve.latency_model_for` gives a profile's), ``score`` an
    :class:`AccuracyPredictor` (default: :func:`capacity_proxy` of ``cost.arch``)."""
    score = score or capacity_proxy(cost.arch)
    size = space.size()
    if size == 0:
        raise FactoryError("the search space is empty: no width admits a valid head count and MLP ratio")
    seen: dict[DescendantShape, Candidate] = {}
    if size <= enumerate_limit:
        strategy = "enumerate"
        for shape in space.enumerate():
            seen[shape] = evaluate_shape(shape, profile, cost, score)
    else:
        strategy = "evolutionary"
        rng = random.Random(seed)

        def fitness(c: Candidate) -> tuple[float, float]:
            worst = min(c.margins.values())
            return (c.score, -c.latency_ms) if worst >= 0 else (-1e9 + worst, 0.0)

        def visit(shape: DescendantShape) -> tuple[tuple[float, float], Candidate] | None:
            if shape in seen:
                return None
            cand = seen[shape] = evaluate_shape(shape, profile, cost, score)
            return fitness(cand), cand

        population = [p for p in (visit(space.random_shape(rng)) for _ in range(64)) if p is not None]
        stale = 0
        while len(seen) < evaluations and stale < 500:
            if stale and stale % 20 == 0:  # stuck in a visited region: a random immigrant
                child = space.random_shape(rng)
            else:
                a, b = (
                    max(rng.sample(population, min(3, len(population))), key=lambda e: e[0])[1].shape for _ in range(2)
                )
                child = space.repair(
                    rng.choice((a.depth, b.depth)),
                    rng.choice((a.embed_dim, b.embed_dim)),
                    rng.choice((a.num_heads, b.num_heads)),
                    rng.choice((a.mlp_ratio, b.mlp_ratio)),
                    rng.choice((a.img_size, b.img_size)),
                    rng,
                )
                child = space.mutate(child, rng)
            entry = visit(child)
            if entry is None:
                stale += 1
                continue
            stale = 0
            worst = min(range(len(population)), key=lambda i: population[i][0])
            if len(population) < 64:
                population.append(entry)
            elif entry[0] > population[worst][0]:
                population[worst] = entry
    cands = list(seen.values())

    def rank(c: Candidate):  # ties: faster, then head dim nearest the ancestry's (its heads inherit whole)
        return (-c.score, c.latency_ms, abs(c.shape.head_dim - space.max_head_dim), c.shape.label())

    feasible = sorted((c for c in cands if c.feasible), key=rank)
    rejected = sorted((c for c in cands if not c.feasible), key=lambda c: -min(c.margins.values()))
    return SearchResult(profile.name, strategy, len(cands), size, feasible, rejected, pareto_front(feasible))
