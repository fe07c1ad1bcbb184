"""Build settings: the recipe whose objects form the cache keys, and the run options that do not.

:class:`BuildConfig` is what a user sets. The stages never hash it by hand: each stage's key is
built from the config objects that actually run, derived here -- :func:`finetune_recipe` (a
:class:`~factory.training.train.TrainConfig`), :func:`expanding_config` (an
:class:`~factory.core.expanding_phase.ExpandingConfig`) and :func:`build_learngene_recipe` -- so a changed
trainer default changes the keys it should. :data:`RUN_OPTIONS` (how many jobs run at once) change
where and how fast a build runs, never what it makes: they are not part of any key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from factory.core.baselines import METHODS
from factory.core.expanding_phase import (
    LATER_FIELDS,
    ExpandingConfig,
    default_shapes,
    full_sandwich_share,
    recipe_fields,
    sandwich_grid,
)
from factory.core.mirror import MirrorProbe
from factory.core.transfer import PHASE_PAYS_FROM_STEPS, TransferProbe, expanding_steps, short_phase_why
from factory.data import dataset_identity
from factory.device.objective import OBJECTIVES, resolve_objective
from factory.errors import FactoryError
from factory.pipeline.time_budget import HEAD_START_STEPS, SPLITS
from factory.training.train import TrainConfig

#: What ``--init`` accepts: ``auto`` (decided per shape by a transfer probe, :mod:`factory.core.transfer`) or a fixed method.
INIT_CHOICES: tuple[str, ...] = ("auto", *METHODS)

#: What ``--keep-weights`` accepts (:attr:`BuildConfig.keep_weights`).
KEEP_WEIGHTS = ("best-val", "last")

#: BuildConfig fields that are not part of the build's identity (the executor is not either).
RUN_OPTIONS = ("jobs",)


@dataclass(frozen=True)
class BuildConfig:
    ancestry: str = "demo"
    data: str = "digits"
    gene_layers: int | None = None
    gene_heads: int | None = None
    gene_seed: int = 0
    gene_tau: float = 1.0
    gene_rescale: str = "std"
    gene_head_mixing: bool = True
    expand_steps: int | None = None  # None: ExpandingConfig's default
    expand_data: str | None = None  # None: the ancestry's own data if known, else ``data``
    expand_batch_size: int | None = None  # None: ExpandingConfig's default
    expand_img_size: int | None = (
        None  # distil at this input size (None: the ancestry's); ExpandingConfig.distill_img_size
    )
    expand_largest_every: int | None = None  # None: ExpandingConfig's default; its largest_every
    learngene: str | None = None  # a learngene directory to use as it is (e.g. made by `learngene train`)
    # auto: per chosen shape, a k-NN probe of every candidate's untrained features decides (factory.core.transfer,
    # bench/RESULTS.md "Choosing the initialisation"); peg, tleg, weight_selection, scratch: that one, always
    init: str = "auto"
    init_probe: TransferProbe = TransferProbe()  # how auto scores and chooses (its margins, images, candidates)
    # auto only: choose the pair (shape, init) -- search the shape again for a start other than peg, and skip an
    # expanding phase where the ancestry does not transfer (factory.pipeline.joint_choice); False: decide the init
    # at the shape searched for peg, as before
    joint_choice: bool = True
    finetune_steps: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    # an ImageFolder's training views (TrainConfig: why not timm's 0.5 and 0.08). hflip "auto": the build measures
    # whether a mirror keeps the label on the task (factory.core.mirror, with mirror_probe) and sets 0 or 0.5
    hflip: float | str = "auto"
    mirror_probe: MirrorProbe = MirrorProbe()
    crop_scale: float = TrainConfig.crop_scale
    seed: int = 0
    jobs: int = 1
    device: str = "auto"
    amp: str = "auto"  # precision of fine-tuning and the expanding phase (factory.training.precision.precision_for)
    data_cache_mb: int = 0  # decode a folder's training split once into uint8 if it fits this many MiB (0: stream)
    # MB of saved activations per forward/backward (factory.training.micro_batch): batches beyond it run in
    # micro-batches, gradients accumulated; 0: the whole batch at once; None (auto): 512 on the CPU, half the
    # GPU's free memory on CUDA (micro_batch.resolve_memory_mb)
    train_memory_mb: int | None = None
    # accuracy: successive-halving probes of the Pareto front on the build's data (factory.device.accuracy) pick the shape;
    # capacity: the largest shape that fits, no probes; auto: capacity for a trained PEG learngene, else accuracy
    # (factory.device.objective.resolve_objective; bench/RESULTS.md, "Accuracy-aware search", measures both)
    objective: str = "auto"
    candidates: int = 8
    # in a fleet: a device takes a shape another device of one start chose (one fine-tune for both) where its probe's
    # validation NLL is within this many paired SE of the device's own best; 0: each device its own best
    # (factory.device.accuracy_choice, "a shape another device chose": why 2)
    share_within: float = 2.0
    # a wall-clock budget in seconds (None: none): the fine-tuning and expanding-phase steps are planned to fit it
    # on this machine (factory.pipeline.time_budget); finetune_steps is then replaced by the plan, expand_steps
    # is the most the phase may take
    time_budget_s: float | None = None
    expand_share: float = 0.5  # with a budget: the share of the spare time the expanding phase gets (time_budget)
    # fewer expanding-phase steps than this do not pay (a learngene trained less starts below weight selection:
    # factory.core.transfer.PHASE_PAYS_FROM_STEPS): such a learngene counts as untrained for --init auto and
    # --objective auto, and with a budget and --init auto none run and the fine-tunes get the time
    expand_min_steps: int = PHASE_PAYS_FROM_STEPS
    # with a budget and --init auto: the fine-tuning steps a learngene of the recipe's 1,500 phase steps saves its
    # descendants (its head start, measured: bench/phase_payoff.py); the phase runs only where that repays the
    # fine-tuning steps its time costs every shape (factory.pipeline.time_budget)
    expand_head_start: int = HEAD_START_STEPS
    # with a budget: how the fleet's fine-tuning time is shared between its shapes -- "time": equal seconds each
    # (a fast shape trains more steps), "steps": equal steps (factory.pipeline.time_budget, "equal time per shape")
    budget_split: str = "time"
    # the fine-tuned weights a device ships: "best-val" -- those of the evaluation (up to 10, spread over the steps,
    # the last included, costing at most a tenth of the training) with the best validation accuracy, where the
    # data has its own test split; "last": the last step's (finetune_stage_recipe; factory.training.best_weights)
    keep_weights: str = "best-val"

    def __post_init__(self) -> None:
        import math

        finite = math.isfinite
        budget, number = self.time_budget_s, (int, float)
        budget_ok = budget is None or (isinstance(budget, number) and finite(budget) and budget > 0)
        # name: (holds, field, the rule) -- the first that fails is named with its value and its rule
        checks = {
            "init": (self.init in INIT_CHOICES, "init", f"one of {', '.join(INIT_CHOICES)}"),
            "gene layers": (self.gene_layers is None or self.gene_layers >= 1, "gene_layers", ">= 1"),
            "gene heads": (self.gene_heads is None or self.gene_heads >= 1, "gene_heads", ">= 1"),
            "expand steps": (self.expand_steps is None or self.expand_steps >= 0, "expand_steps", ">= 0"),
            "expand batch size": (
                self.expand_batch_size is None or self.expand_batch_size >= 1,
                "expand_batch_size",
                ">= 1",
            ),
            "expand img size": (self.expand_img_size is None or self.expand_img_size >= 1, "expand_img_size", ">= 1"),
            "expand largest every": (
                self.expand_largest_every is None or self.expand_largest_every >= 0,
                "expand_largest_every",
                ">= 0",
            ),
            "amp": (self.amp in ("auto", "bf16", "fp16", "off"), "amp", "auto, bf16, fp16 or off"),
            "data cache": (self.data_cache_mb >= 0, "data_cache_mb", ">= 0"),
            "train memory": (self.train_memory_mb is None or self.train_memory_mb >= 0, "train_memory_mb", ">= 0"),
            "fine-tuning steps": (self.finetune_steps >= 1, "finetune_steps", ">= 1"),
            "batch size": (self.batch_size >= 1, "batch_size", ">= 1"),
            "learning rate": (finite(self.lr) and self.lr > 0, "lr", "a finite number > 0, e.g. 1e-3"),
            "hflip": (
                self.hflip == "auto"
                or (isinstance(self.hflip, (int, float)) and not isinstance(self.hflip, bool) and 0 <= self.hflip <= 1),
                "hflip",
                "auto or a probability in [0, 1]",
            ),
            "crop scale": (0 < self.crop_scale <= 1, "crop_scale", "in (0, 1]"),
            "gene tau": (finite(self.gene_tau) and self.gene_tau > 0, "gene_tau", "a finite number > 0"),
            "jobs": (self.jobs >= 1, "jobs", ">= 1"),
            "candidates": (self.candidates >= 1, "candidates", ">= 1"),
            "share within": (finite(self.share_within) and self.share_within >= 0, "share_within", "finite and >= 0"),
            "objective": (self.objective in OBJECTIVES, "objective", f"one of {', '.join(OBJECTIVES)}"),
            "time budget": (budget_ok, "time_budget_s", "a finite number of seconds > 0"),
            "expand share": (finite(self.expand_share) and 0 <= self.expand_share < 1, "expand_share", "in [0, 1)"),
            "expand min steps": (self.expand_min_steps >= 0, "expand_min_steps", ">= 0"),
            "expand head start": (self.expand_head_start >= 0, "expand_head_start", ">= 0"),
            "budget split": (self.budget_split in SPLITS, "budget_split", f"one of {', '.join(SPLITS)}"),
            "keep weights": (self.keep_weights in KEEP_WEIGHTS, "keep_weights", f"one of {', '.join(KEEP_WEIGHTS)}"),
        }
        for name, (ok, field, rule) in checks.items():
            if not ok:
                raise FactoryError(
                    f"invalid build setting: {name} {getattr(self, field)!r}: it must be {rule}", param=field
                )


def identity(cfg: BuildConfig) -> dict[str, Any]:
    """The build's settings that determine what it makes (all but :data:`RUN_OPTIONS`), as JSON reads them back."""
    import json

    return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_OPTIONS}))


def finetune_recipe(cfg: BuildConfig) -> TrainConfig:
    """The fine-tuning recipe of a build (also what the accuracy estimator compresses and benches reproduce)."""
    return TrainConfig(
        steps=cfg.finetune_steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        hflip=resolved_hflip(cfg),
        crop_scale=cfg.crop_scale,
        seed=cfg.seed,
        device=cfg.device,
        amp=cfg.amp,
        warmup_steps=max(1, cfg.finetune_steps // 10),
        ckpt_every=max(1, cfg.finetune_steps // 5),
        memory_mb=cfg.train_memory_mb,
    )


def finetune_stage_recipe(cfg: BuildConfig, data) -> TrainConfig:
    """The recipe of a build's fine-tune stage: :func:`finetune_recipe`, and with ``keep_weights`` "best-val"
    on ``data`` that has its own test split, the best of its evaluations of the validation split
    (:func:`factory.training.best_weights.evaluations`: up to 10, at most a tenth of the training's work).
    Where the test accuracy is read from the validation split (``data.test_from``), choosing on it would inflate
    that figure, and where fewer than 2 evaluations fit there is nothing to choose: the last step's weights."""
    return keep_best_recipe(finetune_recipe(cfg), cfg.keep_weights == "best-val", data)


def keep_best_recipe(recipe: TrainConfig, best_val: bool, data) -> TrainConfig:
    """``recipe`` keeping its best validation evaluation's weights where ``best_val`` asks for it and ``data``
    allows it (:func:`finetune_stage_recipe`'s rule; ``peg-factory train`` applies the same)."""
    from factory.training.best_weights import evaluations

    n = evaluations(recipe.steps, recipe.batch_size, len(data.val))
    if not best_val or data.test_from != "test" or n < 2:
        return recipe
    return dataclasses.replace(recipe, keep_best=True, eval_every=max(1, recipe.steps // n))


def resolved_hflip(cfg: BuildConfig) -> float:
    """The flip probability a fine-tune draws: ``cfg.hflip``; ``auto`` before the build decided it
    (:func:`factory.pipeline.view_choice.decide_hflip` replaces it in the build's config) or on data kept in
    memory, which draws no flipped views: ``TrainConfig``'s no flip."""
    return TrainConfig.hflip if cfg.hflip == "auto" else float(cfg.hflip)


def expanding_config(cfg: BuildConfig) -> ExpandingConfig:
    """The expanding phase the build runs (``steps == 0``: none, the learngene stays as sampled)."""
    exp = ExpandingConfig() if cfg.expand_steps is None else ExpandingConfig(steps=cfg.expand_steps)
    if cfg.expand_batch_size is not None:
        exp = dataclasses.replace(exp, batch_size=cfg.expand_batch_size)
    if cfg.expand_largest_every is not None:
        exp = dataclasses.replace(exp, largest_every=cfg.expand_largest_every)
    return dataclasses.replace(
        exp, seed=cfg.gene_seed, amp=cfg.amp, distill_img_size=cfg.expand_img_size, memory_mb=cfg.train_memory_mb
    )


def given_learngene(cfg: BuildConfig, anc):
    """The learngene ``cfg.learngene`` names (hash-checked on load), refused in one line when it was
    sampled from another ancestry than ``anc``; None when the build makes its own."""
    from factory.core.learngene import Learngene

    if cfg.learngene is None:
        return None
    lg = Learngene.load(cfg.learngene)
    made_from = (lg.meta.get("ancestry") or {}).get("sha256")
    if made_from != anc.sha256:
        raise FactoryError(
            f"{cfg.learngene} was made from another ancestry ({str(made_from)[:12]}) than "
            f"{anc.spec!r} ({anc.sha256[:12]}); pass the ancestry it was sampled from, or make one with "
            "`peg-factory learngene` and `peg-factory learngene train`",
            param="learngene",
        )
    return lg


def learngene_fingerprint(cfg: BuildConfig) -> str | None:
    """The given learngene's tensor hash from its ``learngene.json``, without loading it (for the build key)."""
    import json
    from pathlib import Path

    if cfg.learngene is None:
        return None
    try:
        return json.loads((Path(cfg.learngene) / "learngene.json").read_text()).get("tensors_sha256")
    except (OSError, ValueError, AttributeError):
        return "unreadable"


def expanding_data(cfg: BuildConfig, anc) -> str:
    """Images the expanding phase distils on: ``expand_data``, else the ancestry's own training
    images when known (``mnist`` for the trained demo ancestry), else the build's data."""
    if cfg.expand_data:
        return cfg.expand_data
    return "mnist" if anc.spec == "demo" and anc.weights == "trained-demo" else cfg.data


def build_learngene_recipe(cfg: BuildConfig, anc) -> dict[str, Any]:
    """:func:`learngene_recipe` of the learngene this build makes from ``anc`` (for a given one: its hash)."""
    given = given_learngene(cfg, anc)
    if given is not None:
        return {"given": given.sha256, "ancestry": anc.sha256}
    exp = expanding_config(cfg)
    return learngene_recipe(
        anc.sha256,
        cfg.gene_layers or max(1, anc.arch.depth // 2),
        cfg.gene_heads or anc.arch.num_heads,
        seed=cfg.gene_seed,
        tau=cfg.gene_tau,
        rescale=cfg.gene_rescale,
        head_mixing=cfg.gene_head_mixing,
        expanding=recipe_fields(exp) if exp.steps else None,
        data=dataset_identity(expanding_data(cfg, anc), anc.arch.img_size, anc.arch.in_chans) if exp.steps else None,
    )


def search_init(cfg: BuildConfig) -> str:
    """The initialisation shapes are searched and probed for: ``cfg.init``, or ``peg`` for ``auto``
    (the shape is chosen for the learngene's descendants; ``auto`` then decides at that shape)."""
    return "peg" if cfg.init == "auto" else cfg.init


def learngene_trained(cfg: BuildConfig, anc) -> bool:
    """Whether the build's learngene has been through an expanding phase of at least ``cfg.expand_min_steps``
    steps (fewer do not pay: :data:`~factory.core.transfer.PHASE_PAYS_FROM_STEPS`): a given one by its
    metadata, the build's own (shipped, cached or trained now) by the phase's configured steps (0: sampled only
    -- a time budget or the transfer check dropped the phase, or ``--expand-steps 0``)."""
    return learngene_steps(cfg, anc) >= max(1, cfg.expand_min_steps)


def learngene_steps(cfg: BuildConfig, anc) -> int:
    """The expanding-phase steps of the build's learngene in steps of the full sandwich: a given one's recorded
    steps (:func:`~factory.core.transfer.expanding_steps`), else the configured times :func:`phase_share`."""
    given = given_learngene(cfg, anc)
    return expanding_steps(given) if given is not None else round(expanding_config(cfg).steps * phase_share(cfg, anc))


def phase_share(cfg: BuildConfig, anc) -> float:
    """What one step of the build's own expanding phase is worth in steps of the full sandwich
    (:func:`~factory.core.expanding_phase.full_sandwich_share` of its sandwich): 1.0 for the default recipe;
    ~0.56 with ``--expand-largest-every 3``."""
    exp = expanding_config(cfg)
    if (exp.largest_every, exp.random_per_step) == (1, 1):
        return 1.0
    shapes = sandwich_grid(anc.arch, anc.arch.num_heads)  # the heads do not change a shape's FLOPs
    return full_sandwich_share(shapes, anc.arch.shape(), exp.largest_every, exp.random_per_step)


def untrained_why(cfg: BuildConfig, anc) -> str:
    """Why :func:`learngene_trained` is false, in a few words: no phase, or fewer steps than pay
    (:func:`~factory.core.transfer.short_phase_why`)."""
    return short_phase_why(learngene_steps(cfg, anc), cfg.expand_min_steps) or "no expanding phase"


def objective_for(cfg: BuildConfig, anc) -> tuple[str, str]:
    """The objective this build runs and why (:func:`factory.device.objective.resolve_objective`)."""
    init = search_init(cfg)
    trained = learngene_trained(cfg, anc) and init == "peg"  # a given learngene is checked whatever the init
    return resolve_objective(cfg.objective, init=init, trained_learngene=trained)


def learngene_recipe(
    ancestry_sha256: str,
    layers: int,
    heads: int,
    *,
    seed: int,
    tau: float,
    rescale: str,
    head_mixing: bool,
    expanding: dict[str, Any] | None,
    data: str | None,
) -> dict[str, Any]:
    """Everything that determines a learngene's tensors: the build caches learngenes by it."""
    return {
        "ancestry": ancestry_sha256,
        "layers": layers,
        "heads": heads,
        "seed": seed,
        "tau": float(tau),
        "mixing": "softmax",
        "rescale": rescale,
        "head_mixing": head_mixing,
        "expanding": expanding,
        "data": data,
    }


def recipe_of(lg) -> dict[str, Any] | None:
    """The :func:`learngene_recipe` a saved learngene was made with, read from its metadata
    (``None`` when it was not made by the default sampler + expanding phase)."""
    m = lg.meta
    exp = m.get("expanding_phase")
    if m.get("mixing") != "softmax" or "ancestry" not in m:
        return None
    if exp and exp.get("shapes") != [s.label() for s in default_shapes(lg)]:
        return None
    expanding = None
    if exp:  # only the fields that shape the tensors (older logs may carry others, e.g. checkpoint cadence)
        config = {**LATER_FIELDS, **exp["config"]}
        fields = set(recipe_fields(ExpandingConfig()))
        if not fields <= set(config):
            return None
        expanding = {k: config[k] for k in sorted(fields)}
    return learngene_recipe(
        m["ancestry"]["sha256"],
        lg.num_layers,
        lg.num_heads,
        seed=m.get("seed"),
        tau=m.get("tau"),
        rescale=m.get("rescale", "none"),
        head_mixing=m.get("heads_mixed", heads_mixed(lg)),
        expanding=expanding,
        data=exp.get("data") if exp else None,
    )


def heads_mixed(lg) -> bool:
    """Whether the learngene's head matrices blend heads (not all one-hot)."""
    q = lg.head_mixing
    return not bool(((q == 0) | (q == 1)).all())
