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
                   (:func:`~factory.pipeline.config.finetune_stage_recipe`), the resolved precision, data id
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from factory.core.learngene import Learngene
from factory.core.shapes import DescendantShape
from factory.errors import FactoryError
from factory.io import sha256_file
from factory.pipeline.cache import STAGE_SECONDS, Entry
from factory.pipeline.config import (
    finetune_stage_recipe,
)
from factory.pipeline.context import BuildContext, ExportItem, ModelItem  # noqa: F401  # re-exported
from factory.pipeline.finetune_facts import (
    confusion_matrix,
    evaluation_seconds,
    round_seconds,
    step_seconds,
    training_curve,
)
from factory.pipeline.learngene_stage import (  # noqa: F401  # re-exported: the dry run and tests read them here
    LEARNGENE_STAGE,
    LearngeneSource,
    estimate_learngene,
    learngene_inputs,
    learngene_source,
    run_learngene,
    shipped_learngene,
)


@dataclass(frozen=True)
class StageSpec:
    name: str
    scope: Literal["fleet", "device", "shape"]
    inputs: Callable[[BuildContext, Any], Mapping[str, Any]]  # exactly what ``run`` consumes: hashed into the key
    run: Callable[[BuildContext, Any, Path, Path], dict[str, Any]]  # (ctx, item, tmp, work) -> the seal's info
    estimate_s: Callable[[BuildContext, Any], float]  # the dry run's time, for an item not cached
    what: Callable[[Any], str]  # how the log names the stage for an item
    hit: str = "{what}: cached ({key})"  # the log line of a cache hit ("" for none)


# -- init (--init auto) ------------------------------------------------------------------------------------


def probe_images(ctx: BuildContext) -> int:
    from factory.core.transfer import images_for

    return images_for(ctx.cfg.init_probe, ctx.cfg.finetune_steps, ctx.cfg.batch_size, ctx.ancestry.arch)


def _init_inputs(ctx: BuildContext, shape: DescendantShape) -> dict[str, Any]:
    return {
        "probe": dataclasses.asdict(ctx.cfg.init_probe),
        "images": probe_images(ctx),
        "ancestry": ctx.ancestry.sha256,
        "learngene": ctx.learngene.sha256 if ctx.learngene else None,
        "shape": shape.to_dict(),
        "seed": ctx.cfg.seed,
        "data": ctx.data.identity,
        "trained_from": ctx.cfg.expand_min_steps,
    }


def _run_init(ctx: BuildContext, shape: DescendantShape, tmp: Path, work: Path) -> dict[str, Any]:
    from factory.core.transfer import decide_init
    from factory.data import spread_sample

    sample = spread_sample(ctx.data.train, probe_images(ctx))
    check = ctx.transfer_check  # its scores of the learngene-free starts, where it scored this shape on these images
    decision = decide_init(
        shape,
        sample.images,
        sample.labels,
        ancestry=ctx.ancestry,
        learngene=ctx.learngene,
        seed=ctx.cfg.seed,
        probe=ctx.cfg.init_probe,
        known=check.known_at(shape, min(len(sample), ctx.cfg.init_probe.images), ctx.cfg.seed) if check else None,
        trained_from=ctx.cfg.expand_min_steps,
    )
    return decision.to_dict()


def _estimate_init(ctx: BuildContext, shape: DescendantShape) -> float:
    """A forward is about a third of a training step: the candidates' forwards over the probe's images."""
    if ctx.cfg.init != "auto":
        return 0.0
    return (
        len(ctx.cfg.init_probe.candidates)
        * probe_images(ctx)
        / ctx.cfg.batch_size
        * step_seconds(ctx, shape, ctx.cfg.batch_size)
        / 3
    )


def _decision(entry: Entry) -> dict[str, Any]:
    """The decision an ``init`` entry was sealed with (:meth:`~factory.core.transfer.InitDecision.to_dict`)."""
    return {k: v for k, v in entry.info().items() if k not in ("files", STAGE_SECONDS)}


def decide(ctx: BuildContext, shape: DescendantShape) -> str:
    """The initialisation ``shape`` is fine-tuned from: ``--init``, or for ``auto`` the ``init`` stage's
    decision (run now unless cached; kept in ``ctx.inits`` for the finetune key and the manifest)."""
    if ctx.cfg.init != "auto":
        return ctx.cfg.init
    if shape.label() in ctx.inits:  # decided in this build (a joint choice, or an earlier call)
        return ctx.inits[shape.label()]["chosen"]
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

    recipe = finetune_stage_recipe(ctx.cfg, ctx.data)
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
        # a paced fine-tune (a time budget's) trains the steps that fit its allotment, not recipe.steps
        **({"paced": True} if shape.label() in ctx.finetune_s else {}),
    }


def _run_finetune(ctx: BuildContext, shape: DescendantShape, tmp: Path, work: Path) -> dict[str, Any]:
    from factory.core.baselines import init_descendant
    from factory.core.checkpoint import save_descendant
    from factory.pipeline.pacing import train_paced
    from factory.training.checkpoints import resume_or_restart
    from factory.training.train import evaluate

    c, anc, ds = ctx.cfg, ctx.ancestry, ctx.data
    init = decided_init(ctx, shape)
    model = init_descendant(init, shape, ancestry=anc, learngene=ctx.learngene, seed=c.seed)
    resume = resume_or_restart(work, f"finetune {shape.label()}", ctx.log)
    result, recipe, pace = train_paced(  # a time budget's fine-tune keeps to its allotted seconds
        model,
        ds.train,
        finetune_stage_recipe(c, ds),
        allotted_s=ctx.finetune_s.get(shape.label()),
        work=work,
        resume=resume,
        log=ctx.log,
        should_stop=ctx.should_stop,
        val_data=ds.val,
        progress=True,
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
            "steps": recipe.steps,
            "seed": c.seed,
        },
    )
    shutil.copyfile(work / "metrics.jsonl", tmp / "metrics.jsonl")
    kept = result.kept_step
    if kept is not None and kept < recipe.steps:  # keep_weights best-val (factory.training.best_weights)
        ctx.log(
            f"finetune {shape.label()}: kept the weights of step {kept} of {recipe.steps}, the best validation "
            f"accuracy of its evaluations ({result.val_accuracy:.4f})"
        )
    ctx.log(f"finetune {shape.label()}: test accuracy {test_acc:.4f} in {result.seconds:.1f}s ({result.precision})")
    return {
        "val_accuracy": result.val_accuracy,
        "test_accuracy": test_acc,
        "seconds": round(result.seconds, 2),
        "precision": result.precision,
        "init": init,
        "config": dataclasses.asdict(recipe),  # the TrainConfig that ran (recorded in the manifest)
        **({"pace": pace} if pace else {}),
        **({"kept_step": kept} if kept is not None else {}),  # the step whose weights shipped (best-val)
        "curve": training_curve(work / "metrics.jsonl"),
        "confusion": confusion,
    }


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


def _estimate_export(ctx: BuildContext, item: ExportItem) -> float:
    """The measure stage's reference round of the shape on this host times each format's registered cost."""
    from export.formats import format_spec, with_requirements

    formats = with_requirements(_export_formats(item), item.profile)
    return round_seconds(ctx, item.shape) * sum(format_spec(f).cost for f in formats)


LEARNGENE = StageSpec(
    LEARNGENE_STAGE, "fleet", learngene_inputs, run_learngene, estimate_learngene, lambda _: "learngene"
)
INIT = StageSpec("init", "shape", _init_inputs, _run_init, _estimate_init, lambda s: f"init {s.label()}", hit="")
FINETUNE = StageSpec(
    "finetune",
    "shape",
    _finetune_inputs,
    _run_finetune,
    lambda ctx, s: ctx.cfg.finetune_steps * step_seconds(ctx, s, ctx.cfg.batch_size) + evaluation_seconds(ctx, s),
    lambda s: f"finetune {s.label()}",
)
MEASURE = StageSpec(
    "measure",
    "shape",
    lambda ctx, m: {"model": sha256_file(m.path)},
    _run_measure,
    lambda ctx, m: round_seconds(ctx, m.shape),
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
    _estimate_export,
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
