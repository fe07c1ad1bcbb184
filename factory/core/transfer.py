"""Does the ancestry's knowledge transfer to this data? The math of ``--init auto``'s decision.

Every candidate initialisation (the learngene's descendant ``peg``, ``weight_selection``, ``tleg``
and ``scratch``) is built at the chosen shape and scored, *before any training*, by how well its
features already separate the task's classes:

    score(m) = leave-one-out k-NN accuracy of f_m(x_1..x_n) against y_1..y_n

with ``f_m`` the model's pooled pre-logit features (timm's ``forward_head(..., pre_logits=True)``),
centred on their mean and L2-normalised (cosine similarity), ``k`` neighbours voting, on ``n``
training images in the evaluation transform. k-NN rather than a linear probe: the random features
of a 192-wide model are already close to linearly separable, so a ridge probe rated ``scratch``
0.88-0.92 on digits, near PEG's 0.95, where scratch fine-tunes 45 points worse; k-NN (0.45-0.54
against 0.90) measures the geometry fine-tuning starts from (bench/RESULTS.md, "Choosing the
initialisation").

The decision (:func:`choose_init`), in order:

1. ``scratch`` wins when its score beats the best inherited score by more than
   ``scratch_margin``: the inherited features are worse than random ones for this data, so
   inheriting only has to be unlearned (short fine-tuning probes would miss this: scratch starts
   slower and overtakes late).
2. Otherwise the *preferred* inherited start is kept unless another beats its score by more than
   ``inherit_margin`` (default 1: never -- among inherited starts the k-NN score did not predict the
   fine-tune: the sweep in RESULTS.md loses 3 of 22 cells with any smaller margin). The preferred start is
   ``peg`` at shapes whose attention the learngene's expanding phase trained (:func:`trained_by`: a
   trained shape with the same head count, depth within the trained depths) and
   ``untrained_shape_init`` (``weight_selection``) elsewhere: re-heading (e.g. 2 heads cut from a
   3-head learngene) gives every head another dimension than the distillation trained, and k-NN on
   untrained features cannot see how that fine-tunes (measured at d6-w96-h2-r2: its features score
   above weight selection's while its fine-tune ends 1-3 points below). The MLP ratio is not part
   of the rule: a cut MLP (d3-w192-h3-r2) still fine-tunes best from PEG (measured).

Both margins are fractions of accuracy, chosen by ``bench/init_study.py`` and configurable
(:class:`TransferProbe`): with scratch margins 0 to 0.05, inherit margin 1 and weight selection
preferred at untrained shapes, auto was within one binomial SE of the best fixed choice in 22 of 22
(task, shape, budget) cells; 0.03 is the middle of that range.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from factory.errors import FactoryError
from factory.io import release_freed_memory

#: Expanding-phase steps (of the full sandwich, :func:`expanding_steps`) from which a learngene counts as trained
#: (:func:`trained_by`): a phase of fewer steps starts its descendants *below* weight selection, which costs
#: nothing (bench/RESULTS.md, the learngene study: 150 steps -12.7 points, 250 steps -4.7, 430 steps -1.1, 750
#: steps +3.3, 860 +3.0, 1,500 steps +3.0 against weight selection: the first measured count that pays). The
#: build's ``expand_min_steps`` (default this) is the bar it applies, with a time budget and without.
PHASE_PAYS_FROM_STEPS = 750

#: The inherited initialisations, in order of preference on a tie (``scratch`` is the alternative to all of them).
INHERITED = ("peg", "weight_selection", "tleg")
#: The starts built without the learngene (from the ancestry, or random): their scores at a shape do not change
#: when the learngene does, so the transfer check's scores of them can stand in the init decision.
LEARNGENE_FREE = ("weight_selection", "scratch")


@dataclass(frozen=True)
class TransferProbe:
    """How ``--init auto`` scores and chooses (the module docstring gives the rule)."""

    images: int = 512  # at most this many training images are scored (evenly spaced over the split)
    max_fraction: float = 0.25  # ... and at most as many as cost this fraction of the fine-tune (images_for)
    min_images: int = 100  # ... but never fewer than this (k-NN on fewer is noise), however short the fine-tune
    max_mb: int = 160  # ... and no more than fit this many MB decoded (fp32): 278 images at 224 px (min_images wins)
    k: int = 10  # neighbours voting in the k-NN
    scratch_margin: float = 0.03  # scratch must beat the best inherited score by more than this
    inherit_margin: float = (
        1.0  # another inherited start must beat the preferred one's score by more than this (1: never)
    )
    candidates: tuple[str, ...] = ("peg", "weight_selection", "tleg", "scratch")
    untrained_shape_init: str = (
        "weight_selection"  # preferred at shapes the expanding phase never trained ("peg": no rule)
    )

    def __post_init__(self) -> None:
        bad = [
            n
            for n, ok in (
                ("images", self.images >= 2 and self.min_images >= 2),
                ("k", self.k >= 1),
                ("max fraction", 0 < self.max_fraction <= 1),
                ("margins", 0 <= self.scratch_margin < 1 and 0 <= self.inherit_margin <= 1),
                ("candidates", bool(self.candidates) and set(self.candidates) <= {*INHERITED, "scratch"}),
                ("untrained shape init", self.untrained_shape_init in INHERITED),
            )
            if not ok
        ]
        if bad:
            raise FactoryError(
                f"invalid transfer probe: {', '.join(bad)} (images >= 2, k >= 1, scratch margin in [0, 1), inherit margin in [0, 1], "
                f"candidates among {', '.join((*INHERITED, 'scratch'))})"
            )


def images_for(probe: TransferProbe, steps: int, batch_size: int, arch=None) -> int:
    """Images to score so the decision costs at most ``max_fraction`` of the fine-tune it precedes.

    A forward pass costs about a third of a training step per image, so scoring ``c`` candidates on
    ``n`` images costs ``c * n / 3`` image-steps against the fine-tune's ``steps * batch_size``:
    ``n = floor(3 * max_fraction * steps * batch_size / c)``, clamped to ``[min_images, images]``
    (``images`` wins when it is the smaller). With the ancestry's ``arch``, also at most as many as
    fit ``max_mb`` decoded (fp32 at its input size), so the sample's memory does not grow with the input
    size or the data set (``min_images`` wins over that)."""
    budget = int(3 * probe.max_fraction * steps * batch_size / max(1, len(probe.candidates)))
    most = probe.images
    if arch is not None:
        most = min(most, max(probe.min_images, (probe.max_mb << 20) // (4 * arch.in_chans * arch.img_size**2)))
    return min(most, max(probe.min_images, budget))


@torch.no_grad()
def pooled_features(model: torch.nn.Module, images: torch.Tensor, batch_bytes: int = 32 << 20) -> torch.Tensor:
    """``(N, D)`` pre-logit features of a timm ViT (its pooled token after the final norm), in eval mode, fp32,
    in batches of at most ``batch_bytes`` of input (55 images at 224 px, 256 at the demo's 28 px): the
    activations of a batch, not of the sample, are what the probe holds."""
    model.eval()
    batch = max(1, min(256, batch_bytes // max(1, images[0].numel() * images.element_size()))) if len(images) else 1
    out = [
        model.forward_head(model.forward_features(images[i : i + batch]), pre_logits=True).float()
        for i in range(0, len(images), batch)
    ]
    features = torch.cat(out) if out else torch.zeros(0, 0)
    release_freed_memory()  # the batches' activations (factory.io.memory)
    return features


def knn_loo_predict(features: torch.Tensor, labels: torch.Tensor, k: int = 10, queries: torch.Tensor | None = None):
    """Leave-one-out k-NN predictions: row ``i`` of ``queries`` (default: ``features`` itself) is classified by the
    majority label of its ``k`` most cosine-similar rows of ``features`` other than row ``i`` (both centred on the
    mean of ``features`` first); ties go to the lower label. ``queries`` must pair row for row with
    ``features`` -- e.g. the same images mirrored (:mod:`factory.core.mirror`)."""
    n = int(features.shape[0])
    mean = features.mean(0)
    x = torch.nn.functional.normalize((features - mean).double(), dim=1)
    q = x if queries is None else torch.nn.functional.normalize((queries - mean).double(), dim=1)
    sim = q @ x.T
    sim.fill_diagonal_(-float("inf"))
    idx = sim.topk(min(k, n - 1), dim=1).indices
    num_classes = int(labels.max()) + 1
    votes = torch.nn.functional.one_hot(labels[idx], num_classes).sum(1)
    return votes.argmax(1)


def knn_loo_accuracy(features: torch.Tensor, labels: torch.Tensor, k: int = 10) -> float:
    """Leave-one-out k-NN accuracy (:func:`knn_loo_predict`); ``nan`` for fewer than two rows."""
    if int(features.shape[0]) < 2:
        return float("nan")
    return float((knn_loo_predict(features, labels, k) == labels).double().mean())


def expanding_steps(learngene) -> int:
    """The steps of the expanding phase that made ``learngene`` (``meta["expanding_phase"]["config"]["steps"]``),
    counted in steps of the full sandwich (:func:`factory.core.expanding_phase.full_sandwich_steps`: a phase that
    trained the largest shape every 3rd step counts ~0.56 of its steps; logs from before ``largest_every`` mean
    every step); 0 for one sampled only."""
    from factory.core.expanding_phase import full_sandwich_steps
    from factory.core.shapes import DescendantShape

    phase = (getattr(learngene, "meta", None) or {}).get("expanding_phase") or {}
    config = phase.get("config") or {}
    steps = int(config.get("steps") or 0) if phase.get("shapes") else 0
    every, draws = int(config.get("largest_every", 1)), int(config.get("random_per_step", 1))
    if steps and (every, draws) != (1, 1):
        shapes = [DescendantShape.from_label(label) for label in phase["shapes"]]
        return full_sandwich_steps(steps, shapes, learngene.arch.shape(), every, draws)
    return steps


def short_phase_why(steps: int, min_steps: int) -> str | None:
    """Why a phase of ``steps`` (in steps of the full sandwich, :func:`expanding_steps`) does not count
    (:func:`trained_by`), in a few words; None where it is absent (``steps <= 0``) or long enough."""
    return f"{steps} expanding-phase steps, fewer than the {min_steps} that pay" if 0 < steps < min_steps else None


def trained_by(shape, learngene, min_steps: int = PHASE_PAYS_FROM_STEPS) -> bool:
    """Whether the learngene's expanding phase trained ``shape``'s attention: the phase ran at least
    ``min_steps`` steps (:data:`PHASE_PAYS_FROM_STEPS`), one of its trained shapes
    (``meta["expanding_phase"]["shapes"]``) has the same head count, and ``shape`` is no deeper than the
    deepest trained. A learngene without an expanding phase (sampled only: a build whose budget or transfer
    check skipped the phase) trained none of them: False, so weight selection is preferred -- an untrained
    learngene's descendants start below it (bench/RESULTS.md, the learngene study: -7.5 to -22 points), and at
    equal wall time on mnist-unseen preferring them shipped 0.690 against weight selection's 0.864
    ("A wall-clock budget"). One trained for fewer than ``min_steps`` counts as untrained: counted as trained, a
    30-step learngene's d12 descendant (k-NN 0.393 against weight selection's 0.826 on mnist-unseen) was kept and
    shipped at 0.7615 against weight selection's 0.9525 (RESULTS, "A learngene trained too little")."""
    from factory.core.shapes import DescendantShape

    if expanding_steps(learngene) < max(1, min_steps):
        return False
    labels = learngene.meta["expanding_phase"]["shapes"]
    trained = [DescendantShape.from_label(label) for label in labels]
    return shape.depth <= max(t.depth for t in trained) and any(t.num_heads == shape.num_heads for t in trained)


def choose_init(
    scores: Mapping[str, float],
    probe: TransferProbe = TransferProbe(),
    *,
    trained: bool = True,
    untrained_why: str = "the learngene's expanding phase never trained this shape",
) -> tuple[str, str]:
    """``(chosen initialisation, why)`` from the candidates' scores by the module docstring's rule;
    ``trained``: whether the learngene's expanding phase trained the shape (:func:`trained_by`), and
    ``untrained_why`` the reason given where it did not."""
    inherited = [m for m in INHERITED if m in scores]
    figures = ", ".join(f"{m} {scores[m]:.3f}" for m in (*inherited, "scratch") if m in scores)
    if not inherited:
        return "scratch", f"no inherited candidate (k-NN {figures})"
    best = max(inherited, key=lambda m: (scores[m], -inherited.index(m)))
    if "scratch" in scores and scores["scratch"] > scores[best] + probe.scratch_margin:
        return "scratch", (
            f"random features separate the classes better than inherited ones (k-NN {figures}; "
            f"scratch beats {best} by {scores['scratch'] - scores[best]:.3f} > {probe.scratch_margin:g})"
        )
    prefer = "peg" if trained else probe.untrained_shape_init
    keep = prefer if prefer in scores else inherited[0]
    why = "" if trained or keep != probe.untrained_shape_init else f"; {untrained_why}"
    if best != keep and scores[best] > scores[keep] + probe.inherit_margin:
        return best, (
            f"{best}'s features separate the classes best (k-NN {figures}; beats {keep} by more than "
            f"{probe.inherit_margin:g}{why})"
        )
    return keep, f"inherited features transfer (k-NN {figures}; none beats {keep} by more than the margins{why})"


@dataclass(frozen=True)
class InitDecision:
    """What ``--init auto`` chose at one shape, and the measured figures it chose by."""

    chosen: str
    reason: str
    scores: dict[str, float]  # k-NN accuracy of each candidate's features
    images: int  # images the scores were computed on
    seconds: float  # the whole decision: building every candidate and scoring it
    shape_trained: bool = True  # whether the learngene's expanding phase trained the shape (trained_by)
    reused: tuple[str, ...] = ()  # candidates whose scores the transfer check had measured (not scored again)

    def to_dict(self) -> dict:
        return {
            "chosen": self.chosen,
            "reason": self.reason,
            "knn_accuracy": {m: round(v, 4) for m, v in self.scores.items()},
            "images": self.images,
            "seconds": round(self.seconds, 3),
            "shape_trained": self.shape_trained,
            "method": "leave-one-out k-NN on pooled features",
            **({"reused_from_transfer_check": list(self.reused)} if self.reused else {}),
        }


def decide_init(
    shape,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    ancestry,
    learngene,
    seed: int,
    probe: TransferProbe = TransferProbe(),
    known: Mapping[str, float] | None = None,
    trained_from: int = PHASE_PAYS_FROM_STEPS,
) -> InitDecision:
    """Build each of ``probe.candidates`` at ``shape`` (as the fine-tune would: same ``seed``), score its
    features on the first ``probe.images`` of ``images``/``labels`` (:func:`knn_loo_accuracy`; the
    build passes :func:`images_for` of them) and choose (:func:`choose_init`).

    ``known``: scores already measured *at this shape, seed and on these images* by a start that does not
    depend on the learngene (:meth:`TransferCheck.known_at`: weight selection and scratch); those candidates
    are not built and scored again (``reused`` in the decision). ``trained_from``: the expanding-phase steps from
    which the learngene counts as trained (:func:`trained_by`)."""
    import time

    from factory.core.baselines import init_descendant

    t0 = time.perf_counter()
    x, y = images[: probe.images], labels[: probe.images]
    reused = {m: float(v) for m, v in (known or {}).items() if m in probe.candidates and m in LEARNGENE_FREE}
    scores = {}
    for method in probe.candidates:
        if method in reused:
            scores[method] = reused[method]
            continue
        model = init_descendant(method, shape, ancestry=ancestry, learngene=learngene, seed=seed)
        scores[method] = knn_loo_accuracy(pooled_features(model, x), y, probe.k)
    trained = trained_by(shape, learngene, trained_from)
    short = short_phase_why(expanding_steps(learngene), trained_from)
    untrained_why = (
        f"the learngene had {short}" if short else "the learngene's expanding phase never trained this shape"
    )
    chosen, why = choose_init(scores, probe, trained=trained, untrained_why=untrained_why)
    return InitDecision(chosen, why, scores, int(len(y)), time.perf_counter() - t0, trained, tuple(reused))


@dataclass(frozen=True)
class TransferCheck:
    """Whether the ancestry's features transfer to the task at all, measured before any learngene is trained:
    the k-NN score of the ancestry's own layers (``weight_selection``) against random ones (``scratch``) at
    one shape. ``transfers`` is false when scratch beats weight selection by more than ``scratch_margin`` --
    the rule :func:`choose_init` applies to every inherited start -- and then an expanding phase (distilling
    that ancestry into the learngene) cannot pay on this task."""

    shape: str
    scores: dict[str, float]
    images: int
    seconds: float
    margin: float

    seed: int = 0

    @property
    def transfers(self) -> bool:
        return self.scores["scratch"] <= self.scores["weight_selection"] + self.margin

    def known_at(self, shape, images: int, seed: int) -> dict[str, float]:
        """The scores :func:`decide_init` may reuse at ``shape`` on ``images`` images with ``seed``: this check's,
        when it scored that shape on that many images (the same spread sample) with that seed; else none."""
        same = self.shape == shape.label() and self.images == images and self.seed == seed
        return dict(self.scores) if same else {}

    def to_dict(self) -> dict:
        return {
            "shape": self.shape,
            "knn_accuracy": {m: round(v, 4) for m, v in self.scores.items()},
            "images": self.images,
            "seconds": round(self.seconds, 3),
            "transfers": self.transfers,
            "rule": f"scratch must not beat weight_selection by more than {self.margin:g}",
        }


def check_transfer(
    shape, images: torch.Tensor, labels: torch.Tensor, *, ancestry, seed: int, probe: TransferProbe = TransferProbe()
) -> TransferCheck:
    """:class:`TransferCheck` at ``shape`` on ``images``/``labels`` (no learngene needed)."""
    import time

    from factory.core.baselines import init_descendant

    t0 = time.perf_counter()
    x, y = images[: probe.images], labels[: probe.images]
    scores = {}
    for method in ("weight_selection", "scratch"):
        model = init_descendant(method, shape, ancestry=ancestry, seed=seed)
        scores[method] = knn_loo_accuracy(pooled_features(model, x), y, probe.k)
    return TransferCheck(shape.label(), scores, int(len(y)), time.perf_counter() - t0, probe.scratch_margin, seed)
