"""Accuracy-aware shape choice: rank candidates by a few-step probe of the build's fine-tune.

The capacity proxy (:func:`factory.device.search.capacity_proxy`) prefers the largest shape that fits; with a
short fine-tune a smaller descendant can be more accurate, and any shape expands in under a second, so the
factory *tries* the candidates on the task.

**Estimator** (:class:`SuccessiveHalving`). Every candidate is initialised exactly as the build will
(``init`` from the learngene or ancestry, seed) and trained with the build's recipe (learning rate,
batch, augmentation, data order), except that the learning rate is held constant after a
``warmup_steps`` warm-up, so a probe can be *continued*. Rung ``i`` trains the survivors to
``t_i = round(f_i * N)`` steps in all (``N``: the build's fine-tuning steps; ``f = (0.03, 0.06,
0.12)``, so 3, 6 and 12 of 100 steps) and scores each on the validation split (up to
``val_images``) by its mean negative log-likelihood (NLL) **at the best temperature**
(``score="calibrated"``, :func:`temperature_scaled_nll`: the logits are scaled by the one factor
that minimises the NLL before scoring, so a probe is scored on what its logits rank, not on how
confident a few steps at a high learning rate happened to make it; ``score="raw"`` is the plain
NLL); the better half (rounded up) goes on.
**The last rung anneals** (``cooldown``): from the constant-lr state of the previous rung, its steps
follow a cosine from the build's lr to its ``min_lr`` -- the warm-up/stable/decay idea: a short
decay from a constant-lr run lands close to what a full decayed schedule reaches, and the build's
fine-tune *is* a decayed schedule, while a constant-lr snapshot is still bouncing. The lowest-NLL
finalist wins (ties within ``tie_nll`` to higher capacity). Ranking: rung reached, then NLL -- the
successive-halving (Hyperband) ordering.

**Anchored variant** (``anchor``, off by default). The capacity choice goes on at every rung
whatever its NLL and is replaced only if the best challenger's per-image NLL on the same validation
images is lower by more than ``z`` (2) standard errors of the paired difference; the output then
says which and why. It departs from the capacity choice less often and measured worse (below).

Why this estimator, by measurement (``bench/estimator_study.py`` and ``bench/search_quality.py``,
RESULTS.md): scoring by NLL on the whole validation split instead of accuracy on 256 images, and
spending the steps on the survivors, both cut the estimator's error at the same cost; the annealed
last rung beat constant-lr rungs. The temperature-scaled score fixed the raw NLL's one bad failure:
on a task unlike the ancestry's (``textures``), every shape that has learned something is
over-confident on the shifted validation crops after a few steps, so a 1-layer, 32-wide shape that
has learned nothing (NLL ~ ln K) had the lowest raw NLL and won, ending at chance (0.09 after the
full fine-tune, against 0.60 for the capacity choice). Calibrated, that shape scores ``ln K``, last.
``predicted_accuracy``: the probe's validation accuracy at its last rung, a ranking aid, not a forecast.

**Cost.** ``sum_i n_i (t_i - t_{i-1})`` training steps (``n_0`` = candidates, ``n_{i+1}`` = half of
``n_i`` rounded up, at least 2 when anchored; :meth:`EstimatorConfig.probe_steps`; the annealed rung costs the
same steps): 8 candidates, N = 100 -> 8*3 + 4*3 + 2*6 = 48 steps, plus one validation pass per probe -- about
half of one fine-tune of the capacity choice, most candidates being smaller. ``seconds``: what it took.

**Equal time** (``equal_time``: a build under ``--time-budget``). A fixed ``--steps`` gives every shape ``N``
steps; a time budget gives the fine-tune a time, so a shape whose step takes ``s_c`` seconds gets ``N_c = N *
s_ref / s_c`` steps (``N``: the plan's steps at the capacity choice's step time ``s_ref``). Ranking a 1-layer
shape at fractions of ``N`` when it will train 7x longer favours what learns fast first (RESULTS, "Run 10":
rungs of 24-97 steps for fine-tunes of 6,060). So rung 0 trains every candidate the same ``t_0`` steps and
times them (median seconds per step after each run's first); from rung 1 on, shape ``c``'s rung ``i`` is
``round(f_i * N_c)``: every survivor has had the same *time*, the same fraction of its own fine-tune. A
budget shares a fleet's fine-tuning time equally between its shapes, so ``N_c = N * g * s_ref / s_c``, ``g``
the time share of the device's capacity choice (``time_shares``:
:meth:`factory.pipeline.time_budget.BudgetPlan.time_share`). ``N_c / N`` is clipped to ``[1 / max_horizon_ratio,
max_horizon_ratio]``, ``s_ref / s_c`` to ``flops_slack`` times the shapes' FLOPs ratio: a smaller shape is no
faster per FLOP, so more means ``s_ref`` was timed on a busy machine (RESULTS, Run 14). Per device it costs at
most the equal-steps probes at ``g`` times ``N`` priced at ``s_ref`` a step; over a fleet, about what the
budget's planner reserves, the equal-steps probes at ``N`` (:mod:`factory.pipeline.budget_costs`).

**In a fleet** a shape another device already chose is a candidate too, carried while within noise, and taken
over the device's own best within ``share_z`` paired SE, so two devices share one fine-tune
(:mod:`factory.device.accuracy_choice`); it costs the carried shape's later rungs, only while it is within noise.

**Cache.** Each probe result (shape, steps reached) is cached by content -- learngene (or ancestry)
hash, data identity, shape, init, recipe and estimator settings -- as a small JSON file in
``cache_dir`` (a build uses ``OUT/.cache/estimate``), so a fleet and later builds re-use them. A shape
whose earlier rung came from the cache and must go on is retrained from its initialisation.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from factory.core.shapes import DescendantShape, vit_flops
from factory.data import spread
from factory.device.accuracy_choice import (  # noqa: F401  # re-exported: one import for callers
    JointEstimator,
    candidates,
    choose_by_accuracy,
    describe_decision,
    not_shared,
    paired_gap,
    shared_choice,
    smaller,
    within_noise,
)
from factory.device.calibrated_nll import temperature_scaled_nll  # noqa: F401  # re-exported
from factory.device.probe_types import SCORES, EstimatorConfig, Probe
from factory.io import atomic_write_bytes


@dataclass
class SuccessiveHalving:
    """Few-step probes of the candidates, halved per rung (see module docstring)."""

    ancestry: Any
    learngene: Any
    data: Any  # factory.data.Dataset
    recipe: Any  # factory.training.train.TrainConfig: the build's fine-tuning recipe (factory.pipeline.build.finetune_recipe)
    init: str = "peg"
    config: EstimatorConfig = field(default_factory=EstimatorConfig)
    cache_dir: Path | None = None
    progress: bool = False  # a progress bar (with ETA) over the probe steps of each ranking
    seconds: float = 0.0
    computed: int = 0
    reused: int = 0
    horizons: dict[DescendantShape, int] = field(default_factory=dict)  # equal time: each shape's N_c, from rung 1
    time_shares: dict[str, float] = field(default_factory=dict)  # equal time: incumbent label -> g (docstring)

    @property
    def rungs(self) -> tuple[int, ...]:
        """The rungs at equal steps: fractions of the build's ``N``."""
        return self.config.rungs_for(self.recipe.steps)

    def rungs_of(self, shape: DescendantShape) -> tuple[int, ...]:
        """``shape``'s rungs: :attr:`rungs`, or at equal time rung 0's ``t_0`` and then fractions of its horizon."""
        horizon = self.horizons.get(shape)
        return self.rungs if horizon is None else self.config.rungs_for(horizon, first=self.rungs[0])

    def set_horizons(self, probes: dict[DescendantShape, Probe], incumbent: DescendantShape | None) -> None:
        """Equal time: each shape's horizon ``N_c = N * g * s_ref / s_c`` from rung 0's seconds per step (``s_ref``:
        the incumbent's, else the slowest shape's), ``s_ref / s_c`` clipped to ``flops_slack``, ``N_c / N`` to
        ``max_horizon_ratio``; ``g``: the incumbent's :attr:`time_shares` entry (1 without one)."""
        known = {s: p.step_s for s, p in probes.items() if p.step_s > 0}
        if not known:
            return
        ref_shape = incumbent if known.get(incumbent) else max(known, key=known.get)
        ref, cap, arch = known[ref_shape], self.config.max_horizon_ratio, self.ancestry.arch
        share = self.time_shares.get(ref_shape.label(), 1.0) if ref_shape == incumbent else 1.0
        for s, step in known.items():
            ratio = share * min(ref / step, self.config.flops_slack * vit_flops(ref_shape, arch) / vit_flops(s, arch))
            self.horizons[s] = max(1, round(self.recipe.steps * min(cap, max(1 / cap, ratio))))

    def probe_recipe(self, steps: int, cool_from: int | None = None):
        """The build's recipe with a constant learning rate after the warm-up, stopped at ``steps``;
        with ``cool_from``, the steps from ``cool_from`` on anneal instead (cosine from the build's lr
        to its ``min_lr`` at ``steps``: :func:`~factory.training.train.lr_at` with the warm-up set to
        ``cool_from``, which a continued run has passed)."""
        if cool_from is not None:
            return replace(self.recipe, steps=steps, warmup_steps=cool_from, ckpt_every=0, eval_every=0)
        return replace(
            self.recipe,
            steps=steps,
            warmup_steps=min(self.config.warmup_steps, self.rungs[0]),
            min_lr=self.recipe.lr,
            ckpt_every=0,
            eval_every=0,
        )

    def cool_from(self, steps: int, shape: DescendantShape | None = None) -> int | None:
        """The step the annealing starts at when probing ``shape`` to ``steps`` (its last rung, with ``cooldown``)."""
        rungs = self.rungs if shape is None else self.rungs_of(shape)
        return rungs[-2] if self.config.cooldown and len(rungs) > 1 and steps == rungs[-1] else None

    def describe(self) -> dict[str, Any]:
        return {
            "method": "successive-halving",
            "score": {"calibrated": "validation NLL at the best temperature"}.get(self.config.score, "validation NLL"),
            "rungs": list(self.rungs),
            "horizon": "equal time: rung 0 at equal steps, then fractions of the steps the fine-tune time buys "
            "each shape (N x the capacity choice's step time / its own)"
            if self.config.equal_time
            else "equal steps: fractions of the build's fine-tuning steps",
            "last_rung": "annealed (cosine to min_lr)" if self.cool_from(self.rungs[-1]) else "constant lr",
            "anchored": self.config.anchor,
            "budget_steps": self.recipe.steps,
            "val_images": min(self.config.val_images, len(self.data.val)),
            "candidates": self.config.candidates,
            "init": self.init,
            "seed": self.recipe.seed,
        }

    def key(self, shape: DescendantShape, steps: int) -> str:
        recipe = {k: v for k, v in asdict(self.recipe).items() if k not in ("device", "ckpt_every", "eval_every")}
        parts = [
            self.learngene.sha256 if self.init == "peg" else self.ancestry.sha256,
            self.data.identity,
            shape.to_dict(),
            self.init,
            recipe,
            asdict(self.config),
            steps,
            self.cool_from(steps, shape),  # an annealed rung depends on where its anneal starts
        ]
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]

    def _cached(self, shape: DescendantShape, steps: int) -> Probe | None:
        path = self.cache_dir / f"{self.key(shape, steps)}.json" if self.cache_dir is not None else None
        if path is None or not path.is_file():
            return None
        try:
            d = json.loads(path.read_text())
            per_image = tuple(map(float, d["per_image"]))
            step_s = float(d.get("step_s", 0.0))
            return Probe(shape, steps, float(d["accuracy"]), float(d["nll"]), per_image, cached=True, step_s=step_s)
        except (ValueError, KeyError, OSError):
            return None  # a damaged entry is recomputed

    def _probe(self, shape: DescendantShape, steps: int, state: dict[str, Any]) -> Probe:
        """Train ``shape`` to ``steps`` probe steps, continuing in memory from ``state`` (the model
        and the optimizer state of its previous rung; empty: from its initialisation)."""
        from factory.core.baselines import init_descendant
        from factory.training.train import predict_logits, score_logits, train

        t0 = time.perf_counter()
        if "model" not in state:
            state["model"] = init_descendant(
                self.init, shape, ancestry=self.ancestry, learngene=self.learngene, seed=self.recipe.seed
            )
        model = state["model"]
        cool = self.cool_from(steps, shape)
        runs = []
        if (
            cool is not None and state.get("step", 0) < cool
        ):  # the constant-lr part first (its rung came from the cache)
            runs.append(train(model, self.data.train, self.probe_recipe(cool), progress=False, carry=state))
        runs.append(train(model, self.data.train, self.probe_recipe(steps, cool), progress=False, carry=state))
        timed = [h["seconds"] for run in runs for h in run.history[1:]]  # each run's first step waits for its loader
        step_s = statistics.median(timed) if timed else 0.0
        val = spread(self.data.val, self.config.val_images)  # every class, not the first files
        logits = predict_logits(model.cpu(), val)
        acc, per_image = score_logits(logits, val.labels)
        if self.config.score == "calibrated":
            per_image = temperature_scaled_nll(logits, val.labels)[1]
        nll = float(per_image.mean())
        self.seconds += time.perf_counter() - t0
        self.computed += 1
        if self.cache_dir is not None:
            atomic_write_bytes(
                self.cache_dir / f"{self.key(shape, steps)}.json",
                json.dumps(
                    {
                        "accuracy": acc,
                        "nll": nll,
                        "steps": steps,
                        "step_s": step_s,
                        "shape": shape.label(),
                        **self.describe(),
                        "per_image": per_image.tolist(),
                    }
                ).encode(),
            )
        return Probe(shape, steps, acc, nll, tuple(per_image.tolist()), step_s=step_s)

    def rank(
        self,
        shapes: list[DescendantShape],
        incumbent: DescendantShape | None = None,
        prefer: Sequence[DescendantShape] = (),
        share_z: float = 0.0,
    ) -> list[Probe]:
        """Successive halving over ``shapes`` (ordered by preference on ties: first wins); returns each
        shape's last probe, best first (rung reached, then NLL). With ``config.anchor``, ``incumbent``
        (the capacity choice) goes on at every rung and the better half of the others fills the rest. A shape of
        ``prefer`` (another device's choice) that the halving drops goes on beside the survivors while its NLL is
        within ``share_z`` paired SE of the rung's best (:func:`within_noise`) and it is not :func:`smaller` than
        that best (a smaller one would not be taken), so the last rung can compare it."""
        from tqdm.auto import tqdm

        last: dict[DescendantShape, Probe] = {}
        alive = list(dict.fromkeys(shapes))
        self.horizons = {}  # each ranking times its own shapes against its own incumbent (a fleet: per device)
        states: dict[DescendantShape, dict[str, Any]] = {s: {} for s in alive}  # model + optimizer state in memory
        bar = tqdm(
            total=self.config.probe_steps(len(alive), self.recipe.steps),
            desc=f"probes ({len(alive)} shapes)",
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        done: dict[DescendantShape, int] = dict.fromkeys(alive, 0)
        carried: list[DescendantShape] = []  # alive by the sharing rule, not by the halving
        for r in range(len(self.rungs)):
            for s in alive:
                steps = self.rungs_of(s)[r]
                hit = self._cached(s, steps)
                if hit is not None and (hit.step_s > 0 or r > 0 or not self.config.equal_time):
                    self.reused += 1
                    probe = hit
                else:  # (equal time: a rung-0 entry without its step time is measured again)
                    probe = self._probe(s, steps, states[s])
                last[s] = replace(probe, rung=r, horizon=self.horizons.get(s, self.recipe.steps))
                bar.update(steps - done[s])
                done[s] = steps
            if r + 1 < len(self.rungs):
                anchored = incumbent if self.config.anchor and incumbent in alive else None
                keep = self.config.survivors(len(alive) - len(carried), anchored is not None)
                order = sorted((s for s in alive if s != anchored), key=lambda s: (last[s].nll, shapes.index(s)))
                best = last[min(alive, key=lambda s: (last[s].nll, shapes.index(s)))]  # the rung's, anchored or not
                before, alive = alive, [anchored, *order[: keep - 1]] if anchored is not None else order[:keep]
                carried = [  # another device's shape that could still be taken: within noise, not smaller
                    s
                    for s in prefer
                    if s in before
                    and s not in alive
                    and not smaller(s, best.shape)
                    and within_noise(last[s], best, share_z)
                ]
                alive += carried  # another device's choice, still within noise: compared at the last rung
                for s in set(states) - set(alive):
                    states.pop(s)  # eliminated: free its model
                if r == 0 and self.config.equal_time:  # from rung 1 on: equal time, each shape's own horizon
                    self.set_horizons(last, incumbent)
                    bar.total = bar.n + self._steps_left(alive, r + 1)
        bar.close()
        return sorted(last.values(), key=lambda p: (-p.rung, p.nll, shapes.index(p.shape)))

    def _steps_left(self, alive: list[DescendantShape], rung: int) -> int:
        """The probe steps from ``rung`` on if ``alive`` go on and halve as planned (for the progress bar)."""
        total, count = 0, len(alive)
        for r in range(rung, len(self.rungs)):
            mean = sum(self.rungs_of(s)[r] - self.rungs_of(s)[r - 1] for s in alive) / max(1, len(alive))
            total += round(count * mean)
            count = self.config.survivors(count, self.config.anchor)
        return total

    def decide(
        self,
        probes: list[Probe],
        incumbent: DescendantShape | None = None,
        prefer: Sequence[DescendantShape] = (),
        share_z: float = 0.0,
    ) -> tuple[DescendantShape, dict[str, Any]]:
        """The chosen shape and the evidence for it.

        Anchored (``config.anchor`` and an ``incumbent``): the lowest-NLL other finalist replaces the
        incumbent only if the mean of the paired per-image differences ``d_i = nll_inc,i - nll_ch,i``
        exceeds ``z * sd(d) / sqrt(n)`` -- a one-sided paired z-test on the same validation images,
        so a probe's noise does not trade a large model for a small one. Otherwise: the lowest-NLL
        finalist, ties within ``tie_nll`` to the earliest in ``probes``' shape order. Then a finalist of
        ``prefer`` within ``share_z`` paired SE of that choice takes its place (:func:`shared_choice`).
        """
        top = max(p.rung for p in probes)
        finalists = [p for p in probes if p.rung == top]
        by_shape = {p.shape: p for p in finalists}
        if self.config.anchor and incumbent in by_shape and len(finalists) > 1:
            inc = by_shape[incumbent]
            rival = min((p for p in finalists if p.shape != incumbent), key=lambda p: p.nll)
            mean, se = paired_gap(inc.per_image, rival.per_image)
            switch = mean > self.config.z * se
            chosen = rival.shape if switch else incumbent
            decision = {
                "rule": f"paired NLL gain > {self.config.z:g} SE",
                "incumbent": incumbent.label(),
                "challenger": rival.shape.label(),
                "nll_gain": round(mean, 5),
                "se": round(se, 5),
                "switched": switch,
            }
        else:
            best = min(p.nll for p in finalists)
            chosen = next(p for p in finalists if p.nll <= best + self.config.tie_nll).shape
            decision = {"rule": f"lowest NLL (ties within {self.config.tie_nll:g})"}
        shared = shared_choice(finalists, by_shape[chosen], prefer, share_z)
        if shared:
            return shared[0], {**decision, "shared": shared[1]}
        if share_z > 0 and prefer and chosen not in prefer:  # the evidence against sharing
            decision["not_shared"] = not_shared(probes, by_shape[chosen], prefer, share_z)
        return chosen, decision


__all__ = [
    "SCORES",
    "EstimatorConfig",
    "JointEstimator",
    "Probe",
    "SuccessiveHalving",
    "candidates",
    "choose_by_accuracy",
    "describe_decision",
    "temperature_scaled_nll",
]
