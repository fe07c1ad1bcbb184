"""The build's cached stages, as data: one :class:`StageSpec` each, in :data:`STAGES`.

=========  ======  ====================================================  ==================================
stage      scope   key inputs (hashed: the objects that run)             writes
=========  ======  ====================================================  ==================================
learngene  fleet   learngene recipe: ancestry sha256, sampling knobs,    ``learngene/`` (sampled, trained by
                   ``ExpandingConfig`` less its ``SPEED_FIELDS`` (amp,   the expanding phase, or the shipped one)
                   device), expanding-phase data id
init       shape   (``--init auto`` only) the probe's settings, ancestry   nothing: the decision and its figures
                   and learngene sha256, shape, seed, data id            in the seal (:mod:`factory.core.transfer`)
finetune   shape   init (the decided one), learngene sha256, shape,      ``model.safetensors``, ``metrics.jsonl``
                   ``asdict(TrainConfig)``
                   (:func:`~factory.pipeline.config.finetune_recipe`), the resolved precision, data id
measure    shape   the fine-tuned model's sha256                         fvcore FLOPs, params, host latency
export     device  model sha256, formats, profile sha256, data id        ``export/`` (:func:`export.api.export_model`)
=========  ======  ====================================================  ==================================

Between them, uncached because they are cheap or cache themselves: the search per device
(:mod:`factory.pipeline.device_choice`; its accuracy probes keep their own content-keyed cache in
``OUT/.cache/estimate``), and the device folder ``OUT/<device>/`` assembled from the entries
(:mod:`factory.pipeline.shape_task`). One mechanism (:class:`factory.pipeline.cache.Cache`) keys,
resumes, seals and rebuilds every entry; the dry run (:mod:`factory.pipeline.plan`) reads the same
table for what is cached and how long the rest will take.

When the learngene recipe is exactly the one the shipped demo learngene was made with
(``factory/assets/demo_learngene``), that learngene is used instead of training it again.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from factory.core.assets import PACKAGED_LEARNGENE
from factory.core.learngene import Learngene
from factory.core.shapes import DescendantShape
from factory.errors import FactoryError
from factory.io import sha256_file
from factory.pipeline.cache import Cache, Entry
from factory.pipeline.config import (
    BuildConfig,
    build_learngene_recipe,
    expanding_data,
    finetune_recipe,
    given_learngene,
    recipe_of,
)


@dataclass
class BuildContext:
    """What the stages of one build share: where, with what settings, and what is loaded."""

    out: Path
    cfg: BuildConfig
    cache: Cache
    log: Callable[[str], None]
    ancestry: Any  # factory.core.ancestry.Ancestry
    data: Any  # factory.data.Dataset
    learngene: Learngene | None = None  # set once the learngene stage has run
    should_stop: Callable[[], bool] | None = None  # polled by fine-tunes between steps (Ctrl-C)
    inits: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # shape label -> --init auto's decision
    host: Any = None  # factory.device.roofline.HostFacts, measured once for the dry run's estimates


@dataclass(frozen=True)
class ModelItem:
    """A fine-tuned model: the measure stage's item."""

    shape: DescendantShape
    path: Path


@dataclass(frozen=True)
class ExportItem:
    """A model exported for one device: the export stage's item."""

    name: str
    profile: Any  # factory.device.profile.Profile
    profile_sha256: str
    model: Path
    facts: Mapping[str, int] | None = None  # the measure stage's FLOPs and params (not recounted by export)


@dataclass(frozen=True)
class StageSpec:
    name: str
    scope: Literal["fleet", "device", "shape"]
    inputs: Callable[[BuildContext, Any], Mapping[str, Any]]  # exactly what ``run`` consumes: hashed into the key
    run: Callable[[BuildContext, Any, Path, Path], dict[str, Any]]  # (ctx, item, tmp, work) -> the seal's info
    estimate_s: Callable[[BuildContext, Any], float]  # the dry run's time, for an item not cached
    what: Callable[[Any], str]  # how the log names the stage for an item
    hit: str = "{what}: cached ({key})"  # the log line of a cache hit ("" for none)


def shipped_learngene(recipe: Mapping[str, Any]) -> Learngene | None:
    """The packaged demo learngene if it was made with exactly ``recipe``."""
    if not (PACKAGED_LEARNGENE / "learngene.json").is_file():
        return None
    shipped = Learngene.load(PACKAGED_LEARNGENE)
    return shipped if recipe_of(shipped) == recipe else None


# -- learngene ---------------------------------------------------------------------------------------------


def _learngene_inputs(ctx: BuildContext, _: None) -> dict[str, Any]:
    return build_learngene_recipe(ctx.cfg, ctx.ancestry)


@dataclass(frozen=True)
class LearngeneSource:
    """Where a build's learngene comes from -- the one answer the run, the estimate and the dry run read.

    ``kind``: ``given`` (``--learngene DIR``), ``cached`` (this build's cache holds it), ``shipped`` (the
    packaged demo learngene, made with exactly this recipe), ``sampled`` (sampled now, no expanding phase)
    or ``expanded`` (sampled now, then trained by ``steps`` expanding-phase steps). ``learngene`` is set
    when it is to hand without running anything."""

    kind: Literal["given", "cached", "shipped", "sampled", "expanded"]
    learngene: Learngene | None = None
    steps: int = 0

    @property
    def runs_expanding_phase(self) -> bool:
        return self.kind == "expanded"

    def describe(self, cfg: BuildConfig) -> str:
        return {
            "given": f"the given learngene {cfg.learngene}",
            "cached": "cached",
            "shipped": "the shipped demo learngene (same recipe, not retrained)",
            "sampled": "sampled, no expanding phase",
            "expanded": f"sampled and trained for {self.steps} expanding-phase steps",
        }[self.kind]


def learngene_source(ctx: BuildContext, *, cache: bool = True) -> LearngeneSource:
    """Where the learngene comes from (:class:`LearngeneSource`); ``cache=False`` ignores this build's cache
    (the stage itself, which runs only when the entry is not cached)."""
    recipe = _learngene_inputs(ctx, None)
    given = given_learngene(ctx.cfg, ctx.ancestry)
    if given is not None:
        return LearngeneSource("given", given)
    if cache:
        entry = ctx.cache.entry(LEARNGENE.name, recipe)
        if entry.cached:
            return LearngeneSource("cached", Learngene.load(entry.path / "learngene"))
    shipped = shipped_learngene(recipe)
    if shipped is not None:
        return LearngeneSource("shipped", shipped)
    steps = (recipe["expanding"] or {}).get("steps", 0)
    return LearngeneSource("expanded" if steps else "sampled", None, steps)


def _sample(ctx: BuildContext, recipe: Mapping[str, Any]) -> Learngene:
    from factory.core.learngene import sample_learngene

    return sample_learngene(
        ctx.ancestry,
        recipe["layers"],
        recipe["heads"],
        seed=recipe["seed"],
        tau=recipe["tau"],
        rescale=recipe["rescale"],
        head_mixing=recipe["head_mixing"],
    )


def _run_learngene(ctx: BuildContext, _: None, tmp: Path, work: Path) -> dict[str, Any]:
    from factory.core.expanding_phase import ExpandingConfig, default_shapes
    from factory.data import load_dataset
    from factory.training.expanding_loop import run_expanding_phase

    anc, t0 = ctx.ancestry, time.perf_counter()
    recipe = _learngene_inputs(ctx, None)
    source = learngene_source(ctx, cache=False)
    how = source.describe(ctx.cfg)
    lg = source.learngene
    if lg is None:
        lg = _sample(ctx, recipe)
        how = f"sampled {lg.num_layers} layers x {lg.num_heads} heads"
        if source.runs_expanding_phase:
            data = expanding_data(ctx.cfg, anc)
            ds = load_dataset(
                data, img_size=anc.arch.img_size, in_chans=anc.arch.in_chans, min_side=anc.arch.patch_size
            )
            exp = ExpandingConfig(**recipe["expanding"], amp=ctx.cfg.amp)
            lg, _ = run_expanding_phase(
                lg, anc, ds, default_shapes(lg), exp, work=work, log=ctx.log, what="learngene expanding phase"
            )
            how += f", trained {source.steps} expanding-phase steps on {data}"
    lg.save(tmp / "learngene")
    ctx.log(f"learngene: {how} in {time.perf_counter() - t0:.1f}s")
    return {"seconds": round(time.perf_counter() - t0, 2), "how": how, "source": source.kind}


def _estimate_learngene(ctx: BuildContext, _: None) -> float:
    """The learngene stage's time, measured here: sampling it, then the expanding phase's first step (its
    one-off costs) plus ``steps - 1`` times a step (:func:`factory.training.expanding_loop.measure_step_seconds`:
    three real steps of the configured batch, input size and precision, seconds at 224 px); 0 when it
    will not run."""
    from factory.core.expanding_phase import ExpandingConfig, default_shapes
    from factory.training.expanding_loop import measure_step_seconds

    recipe = _learngene_inputs(ctx, None)
    if not learngene_source(ctx, cache=False).runs_expanding_phase:
        return 0.0
    exp = ExpandingConfig(**recipe["expanding"], amp=ctx.cfg.amp)
    t0 = time.perf_counter()
    lg = _sample(ctx, recipe)
    sampling = time.perf_counter() - t0
    first, per_step = measure_step_seconds(lg, ctx.ancestry, default_shapes(lg), exp, first=True)
    ctx.log(
        f"learngene: one expanding-phase step measured at {per_step:.2f}s (batch {exp.batch_size}, "
        f"{exp.distill_img_size or ctx.ancestry.arch.img_size} px; the first {first:.2f}s, sampling {sampling:.2f}s)"
    )
    return sampling + first + max(0, exp.steps - 1) * per_step


# -- init (--init auto) ------------------------------------------------------------------------------------


def _probe_images(ctx: BuildContext) -> int:
    from factory.core.transfer import images_for

    return images_for(ctx.cfg.init_probe, ctx.cfg.finetune_steps, ctx.cfg.batch_size)


def _init_inputs(ctx: BuildContext, shape: DescendantShape) -> dict[str, Any]:
    return {
        "probe": dataclasses.asdict(ctx.cfg.init_probe),
        "images": _probe_images(ctx),
        "ancestry": ctx.ancestry.sha256,
        "learngene": ctx.learngene.sha256 if ctx.learngene else None,
        "shape": shape.to_dict(),
        "seed": ctx.cfg.seed,
        "data": ctx.data.identity,
    }


def _run_init(ctx: BuildContext, shape: DescendantShape, tmp: Path, work: Path) -> dict[str, Any]:
    from factory.core.transfer import decide_init
    from factory.data import spread_sample

    sample = spread_sample(ctx.data.train, _probe_images(ctx))
    decision = decide_init(
        shape,
        sample.images,
        sample.labels,
        ancestry=ctx.ancestry,
        learngene=ctx.learngene,
        seed=ctx.cfg.seed,
        probe=ctx.cfg.init_probe,
    )
    return decision.to_dict()


def _estimate_init(ctx: BuildContext, shape: DescendantShape) -> float:
    """A forward is about a third of a training step: the candidates' forwards over the probe's images."""
    if ctx.cfg.init != "auto":
        return 0.0
    return (
        len(ctx.cfg.init_probe.candidates)
        * _probe_images(ctx)
        / ctx.cfg.batch_size
        * step_seconds(ctx, shape, ctx.cfg.batch_size)
        / 3
    )


def _decision(entry: Entry) -> dict[str, Any]:
    """The decision an ``init`` entry was sealed with (:meth:`~factory.core.transfer.InitDecision.to_dict`)."""
    return {k: v for k, v in entry.info().items() if k != "files"}


def decide(ctx: BuildContext, shape: DescendantShape) -> str:
    """The initialisation ``shape`` is fine-tuned from: ``--init``, or for ``auto`` the ``init`` stage's
    decision (run now unless cached; kept in ``ctx.inits`` for the finetune key and the manifest)."""
    if ctx.cfg.init != "auto":
        return ctx.cfg.init
    info = _decision(run_stage(ctx, INIT, shape))
    ctx.inits[shape.label()] = info
    ctx.log(f"init {shape.label()}: auto -> {info['chosen']}: {info['reason']} ({info['seconds']:.1f}s)")
    return info["chosen"]


def decided_init(ctx: BuildContext, shape: DescendantShape) -> str | None:
    """The initialisation of ``shape`` if known without running anything (a fixed ``--init``, a decision
    made in this build or cached); None otherwise (the dry run's question)."""
    if ctx.cfg.init != "auto":
        return ctx.cfg.init
    if shape.label() not in ctx.inits:
        entry = entry_for(ctx, INIT, shape)
        if not entry.cached:
            return None
        ctx.inits[shape.label()] = _decision(entry)
    return ctx.inits[shape.label()]["chosen"]


# -- finetune ----------------------------------------------------------------------------------------------


def _finetune_inputs(ctx: BuildContext, shape: DescendantShape) -> dict[str, Any]:
    from factory.training.precision import pick_device, precision_for

    recipe = finetune_recipe(ctx.cfg)
    init = decided_init(ctx, shape)
    if init is None:
        raise FactoryError(
            f"internal: the initialisation of {shape.label()} is not decided yet (run the init stage first)"
        )
    return {
        "init": init,
        "learngene": ctx.learngene.sha256 if ctx.learngene else None,
        "shape": shape.to_dict(),
        "recipe": dataclasses.asdict(recipe),
        "precision": precision_for(pick_device(recipe.device), recipe.amp),
        "data": ctx.data.identity,
    }


def _run_finetune(ctx: BuildContext, shape: DescendantShape, tmp: Path, work: Path) -> dict[str, Any]:
    from factory.core.baselines import init_descendant
    from factory.core.checkpoint import save_descendant
    from factory.training.train import evaluate, resume_or_restart, train

    c, anc, ds = ctx.cfg, ctx.ancestry, ctx.data
    init = decided_init(ctx, shape)
    model = init_descendant(init, shape, ancestry=anc, learngene=ctx.learngene, seed=c.seed)
    resume = resume_or_restart(work, f"finetune {shape.label()}", ctx.log)
    result = train(
        model,
        ds.train,
        finetune_recipe(c),
        val_data=ds.val,
        out_dir=work,
        resume=resume,
        progress=True,
        should_stop=ctx.should_stop,
        desc=f"finetune {shape.label()}",
    )
    model = model.cpu().eval()
    test_acc = evaluate(model, ds.test)
    confusion = confusion_matrix(model, ds.test)
    save_descendant(
        model,
        anc.arch.with_shape(shape),
        tmp / "model.safetensors",
        {
            "method": init,
            "learngene_sha256": ctx.learngene.sha256,
            "shape": shape.to_dict(),
            "data": ds.identity,
            "steps": c.finetune_steps,
            "seed": c.seed,
        },
    )
    shutil.copyfile(work / "metrics.jsonl", tmp / "metrics.jsonl")
    ctx.log(f"finetune {shape.label()}: test accuracy {test_acc:.4f} in {result.seconds:.1f}s ({result.precision})")
    return {
        "val_accuracy": result.val_accuracy,
        "test_accuracy": test_acc,
        "seconds": round(result.seconds, 2),
        "precision": result.precision,
        "init": init,
        "config": dataclasses.asdict(finetune_recipe(c)),  # the TrainConfig that ran (recorded in the manifest)
        "curve": training_curve(work / "metrics.jsonl"),
        "confusion": confusion,
    }


#: Confusion matrices are kept for tasks of at most this many classes (the report draws them).
MAX_CONFUSION_CLASSES = 50
#: The training curve kept in the manifest has at most this many points.
CURVE_POINTS = 200


def confusion_matrix(model, data) -> list[list[int]] | None:
    """``m[true][predicted]`` counts on ``data`` (None past :data:`MAX_CONFUSION_CLASSES` classes)."""
    import torch

    from factory.training.train import predict_logits

    k = data.num_classes
    if not 1 < k <= MAX_CONFUSION_CLASSES or len(data) == 0:
        return None
    pred = predict_logits(model, data).argmax(-1)
    counts = torch.bincount(data.labels * k + pred, minlength=k * k).reshape(k, k)
    return counts.tolist()


def training_curve(metrics: Path) -> list[list[float]]:
    """``[[step, loss, batch accuracy], ...]`` from a fine-tune's ``metrics.jsonl``, at most :data:`CURVE_POINTS`
    evenly spaced rows (the last one always kept)."""
    import json

    rows = []
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            r = json.loads(line)
            rows.append([int(r["step"]), round(float(r["loss"]), 4), round(float(r.get("acc", float("nan"))), 4)])
        except (ValueError, KeyError, TypeError):
            continue
    if len(rows) > CURVE_POINTS:
        stride = len(rows) / CURVE_POINTS
        rows = [rows[int(i * stride)] for i in range(CURVE_POINTS - 1)] + [rows[-1]]
    return rows


def step_seconds(ctx: BuildContext, shape: DescendantShape, batch: int) -> float:
    """Seconds of one training step (forward + backward ~ 3 forwards) on this host, by the roofline
    with this host's measured GEMM rate and bandwidth (measured once per context)."""
    from factory.device.measure import measure_host
    from factory.device.roofline import CostModel, Device, Efficiency

    if ctx.host is None:
        ctx.host = measure_host(0.2)
    model = CostModel(
        Device(ctx.host.peak_flops, ctx.host.bandwidth, "onnxruntime", 1e9, False),
        "fp32",
        batch,
        Efficiency(),
        ctx.ancestry.arch,
    )
    return 3 * model.latency_ms(shape) / 1e3


# -- measure, export ---------------------------------------------------------------------------------------


def _run_measure(ctx: BuildContext, item: ModelItem, tmp: Path, work: Path) -> dict[str, Any]:
    from factory.core.checkpoint import load_descendant
    from factory.core.flops import count_flops, count_params
    from factory.device.measure import measure_onnxruntime_latency

    model = load_descendant(item.path)
    return {
        "flops_fvcore": count_flops(model),
        "params": count_params(model),
        "host_latency_ms_onnxruntime": round(measure_onnxruntime_latency(item.shape, 1, arch=ctx.ancestry.arch), 4),
    }


def _export_formats(item: ExportItem) -> list[str]:
    from export.api import parse_formats

    return parse_formats("all", item.profile)


def _run_export(ctx: BuildContext, item: ExportItem, tmp: Path, work: Path) -> dict[str, Any]:
    from export.api import export_model
    from factory.device.deploy import chooser

    export_model(
        item.model,
        _export_formats(item),
        tmp / "export",
        profile=item.profile,
        data=ctx.cfg.data,
        # loaded once per build, not again per export (a uint8-cached training split crops differently: not reused)
        dataset=None if ctx.data.identity.endswith(":uint8-cache") else ctx.data,
        facts=item.facts,
        log=lambda line: ctx.log(f"{item.name}: {line}"),
        choose=chooser(item.profile),
    )
    return {}


LEARNGENE = StageSpec(
    "learngene", "fleet", _learngene_inputs, _run_learngene, _estimate_learngene, lambda _: "learngene"
)
INIT = StageSpec("init", "shape", _init_inputs, _run_init, _estimate_init, lambda s: f"init {s.label()}", hit="")
FINETUNE = StageSpec(
    "finetune",
    "shape",
    _finetune_inputs,
    _run_finetune,
    lambda ctx, s: ctx.cfg.finetune_steps * step_seconds(ctx, s, ctx.cfg.batch_size),
    lambda s: f"finetune {s.label()}",
)
MEASURE = StageSpec(
    "measure",
    "shape",
    lambda ctx, m: {"model": sha256_file(m.path)},
    _run_measure,
    lambda ctx, m: 5.0,
    lambda m: f"measure {m.shape.label()}",
    hit="",
)
EXPORT = StageSpec(
    "export",
    "device",
    lambda ctx, e: {
        "model": sha256_file(e.model),
        "formats": _export_formats(e),
        "profile": e.profile_sha256,
        "data": ctx.data.identity,
    },
    _run_export,
    lambda ctx, e: 5.0 * len(_export_formats(e)),
    lambda e: f"{e.name}: export",
    hit="{what} cached ({key})",
)
STAGES: tuple[StageSpec, ...] = (LEARNGENE, INIT, FINETUNE, MEASURE, EXPORT)


def entry_for(ctx: BuildContext, spec: StageSpec, item: Any = None) -> Entry:
    """The cache entry ``spec`` has for ``item`` (cached or not)."""
    return ctx.cache.entry(spec.name, spec.inputs(ctx, item))


def run_stage(ctx: BuildContext, spec: StageSpec, item: Any = None) -> Entry:
    """``spec`` for ``item`` through the cache: the entry, made now unless cached and intact."""
    entry = entry_for(ctx, spec, item)
    what = spec.what(item)
    return ctx.cache.get_or_run(
        entry, lambda tmp, work: spec.run(ctx, item, tmp, work), what, hit=spec.hit.format(what=what, key=entry.key)
    )


def make_learngene(ctx: BuildContext) -> Entry:
    """The ``learngene`` stage, its result loaded into ``ctx.learngene``; the entry (its key names it in the manifest)."""
    entry = run_stage(ctx, LEARNGENE)
    ctx.learngene = Learngene.load(entry.path / "learngene")
    return entry
