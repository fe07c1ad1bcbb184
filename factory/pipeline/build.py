"""``peg-factory build``: profiles -> searched, expanded, fine-tuned, measured, exported models.

Stages, for a fleet of profiles sharing one ancestry, learngene and data set:

1. ``learngene`` -- sampled and trained by the expanding phase (:mod:`factory.core.expanding`, with a
   progress bar, checkpointed and resumed like a fine-tune) once for the whole fleet, keyed by its
   recipe (:func:`learngene_recipe`: ancestry hash, sampling knobs, expanding-phase config, shapes
   and data). When the recipe is exactly the one the shipped demo learngene was made with
   (``factory/assets/demo_learngene``), that learngene is used instead of training it again. The
   expanding phase distils on the ancestry's own training images when they are known (``mnist``
   for the demo ancestry) and on the build's data otherwise (labels are not used).
2. ``search`` -- per profile, the shapes within its budgets (:mod:`factory.device.search`); with
   the ``"accuracy"`` objective up to ``candidates`` of them along the Pareto front are probed on the
   build's data and the one predicted most accurate after ``finetune_steps`` is chosen
   (:mod:`factory.device.accuracy`, cached in ``OUT/.cache/estimate``); with ``"capacity"`` the
   largest shape that fits. ``"auto"`` (the default) is one of the two by the initialisation
   (:meth:`Builder.objective`).
3. ``finetune`` -- per *distinct* shape: expand from the learngene (or another ``init``) and
   fine-tune on the task's training split; profiles that pick the same shape share the model.
4. ``measure`` -- fvcore FLOPs, parameters, test accuracy, host onnxruntime latency, predicted
   target latency and memory with the margin to each budget.
5. ``export`` -- the formats each profile asks for (:func:`export.api.export_model`).

Caching. Every stage's result lives in ``OUT/.cache/<stage>/<key>`` where ``key`` is the sha256 of
the stage's inputs (profile content, learngene hash, shape, recipe, data identity, code version),
written atomically. A rerun with the same inputs reuses everything; a build killed mid-way
resumes at the first unfinished stage, and a killed fine-tune resumes from its last checkpoint.

Failures. A profile that fails (nothing fits, export error) is recorded with its reason; the
others finish. ``OUT/manifest.json`` (schema: :data:`MANIFEST_SCHEMA`), ``OUT/report.md``,
``OUT/report.html`` and one ``OUT/<profile>/MODEL_CARD.md`` per device describe the result.

Scaling out: after the learngene, the work is one job per distinct shape (fine-tune, then measure
and export for each profile that chose it), run by an executor (:mod:`factory.pipeline.executor`): threads
here (``--jobs``), or Ray tasks on a cluster (``--executor ray``) that share ``--out`` as the
cache. Without Ray, a fleet can also be split by hand: a subset of ``--profile`` flags per machine
against a shared ``--out`` (one at a time: a build locks ``--out``).
Multi-GPU fine-tuning of one model uses ``torchrun`` (:mod:`factory.training.train`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from factory import __version__
from factory.pipeline.artifacts import atomic_directory, atomic_write_bytes, confined, directory_lock, seal, seal_state, sha256_file
from factory.errors import FactoryError
from factory.pipeline.fingerprint import ancestry_fingerprint, dataset_identity
from factory.device.profile import MAX_PROFILE_BYTES, Profile
from factory.core.shapes import DescendantShape

STAGES = ("learngene", "search", "finetune", "measure", "export")


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
    init: str = "peg"
    finetune_steps: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    jobs: int = 1
    device: str = "auto"
    # accuracy: successive-halving probes of the Pareto front on the build's data (factory.device.accuracy) pick the shape;
    # capacity: the largest shape that fits, no probes; auto: capacity for a trained PEG learngene, else accuracy
    # (factory.device.accuracy.resolve_objective; bench/RESULTS.md, "Accuracy-aware search", measures both)
    objective: str = "auto"
    candidates: int = 8

    def __post_init__(self) -> None:
        import math

        checks = {
            "gene layers": self.gene_layers is None or self.gene_layers >= 1,
            "gene heads": self.gene_heads is None or self.gene_heads >= 1,
            "expand steps": self.expand_steps is None or self.expand_steps >= 0,
            "fine-tuning steps": self.finetune_steps >= 1,
            "batch size": self.batch_size >= 1,
            "learning rate": math.isfinite(self.lr) and self.lr > 0,
            "gene tau": math.isfinite(self.gene_tau) and self.gene_tau > 0,
            "jobs": self.jobs >= 1,
            "candidates": self.candidates >= 1,
            "objective": self.objective in ("auto", "accuracy", "capacity"),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise FactoryError(f"invalid build setting: {', '.join(bad)} (counts must be >= 1, steps >= 0, lr and tau finite "
                               "and > 0); fix the flag")


def _key(*parts: Any) -> str:
    text = json.dumps([__version__, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass
class Stage:
    name: str
    key: str
    path: Path

    @property
    def cached(self) -> bool:
        """Sealed and intact (:func:`factory.pipeline.artifacts.seal_state`): a damaged entry is not cached."""
        return seal_state(self.path) == "done"


class Builder:
    """One build directory; methods are the stages (see the module docstring)."""

    def __init__(self, out: Path, cfg: BuildConfig, log: Callable[[str], None] = print):
        self.out, self.cfg, self.log = Path(out), cfg, log
        self.cache = self.out / ".cache"

    def stage(self, name: str, key: str) -> Stage:
        return Stage(name, key, self.cache / name / key)

    def resumable(self, work: Path, what: str) -> bool:
        """:func:`factory.training.train.resume_or_restart`, logging to the build's log."""
        from factory.training.train import resume_or_restart

        return resume_or_restart(work, what, self.log)

    def reusable(self, st: Stage) -> bool:
        """Whether ``st`` is cached and intact; a damaged entry is reported and will be rebuilt."""
        state = seal_state(st.path)
        if state == "damaged":
            self.log(f"{st.name} cache entry {st.key} is damaged (a file is missing or changed); rebuilding it")
        return state == "done"

    # -- stage 1 -------------------------------------------------------------------------------
    def expanding_data(self, anc) -> str:
        c = self.cfg
        if c.expand_data:
            return c.expand_data
        return "mnist" if anc.spec == "demo" and anc.weights == "trained-demo" else c.data

    def learngene_recipe(self, anc) -> dict[str, Any]:
        from factory.core.expanding import ExpandingConfig
        from factory.pipeline.fingerprint import dataset_identity

        c = self.cfg
        exp = ExpandingConfig() if c.expand_steps is None else ExpandingConfig(steps=c.expand_steps)
        exp = dataclasses.replace(exp, seed=c.gene_seed)
        return learngene_recipe(anc.sha256, c.gene_layers or max(1, anc.arch.depth // 2), c.gene_heads or anc.arch.num_heads,
                                seed=c.gene_seed, tau=c.gene_tau, rescale=c.gene_rescale, head_mixing=c.gene_head_mixing,
                                expanding=dataclasses.asdict(exp) if exp.steps else None,
                                data=dataset_identity(self.expanding_data(anc), anc.arch.img_size, anc.arch.in_chans) if exp.steps else None)

    def objective(self, anc) -> tuple[str, str]:
        """The objective this build runs and why (:func:`factory.device.accuracy.resolve_objective`)."""
        from factory.device.accuracy import resolve_objective

        trained = self.cfg.init == "peg" and self.learngene_recipe(anc)["expanding"] is not None
        return resolve_objective(self.cfg.objective, init=self.cfg.init, trained_learngene=trained)

    def learngene_stage(self, anc, recipe: dict[str, Any] | None = None) -> Stage:
        return self.stage("learngene", _key(recipe or self.learngene_recipe(anc)))

    def shipped_learngene(self, anc, recipe: dict[str, Any] | None = None):
        """The packaged demo learngene if it was made with exactly this build's recipe (computed
        when not given; it hashes the expanding-phase data)."""
        from factory.pipeline.demo import PACKAGED_LEARNGENE
        from factory.core.learngene import Learngene

        if not (PACKAGED_LEARNGENE / "learngene.json").is_file():
            return None
        shipped = Learngene.load(PACKAGED_LEARNGENE)
        return shipped if recipe_of(shipped) == (recipe or self.learngene_recipe(anc)) else None

    def learngene(self, anc):
        from factory.training.data import load_dataset
        from factory.core.expanding import ExpandingConfig, default_shapes, train_learngene
        from factory.core.learngene import Learngene, sample_learngene

        recipe = self.learngene_recipe(anc)
        st = self.learngene_stage(anc, recipe)
        if self.reusable(st):
            self.log(f"learngene: cached ({st.key})")
            return Learngene.load(st.path / "learngene"), st
        t0 = time.perf_counter()
        shipped = self.shipped_learngene(anc, recipe)
        if shipped is not None:
            lg, how = shipped, "the shipped demo learngene (same recipe, not retrained)"
        else:
            lg = sample_learngene(anc, recipe["layers"], recipe["heads"], seed=recipe["seed"], tau=recipe["tau"],
                                  rescale=recipe["rescale"], head_mixing=recipe["head_mixing"])
            how = f"sampled {lg.num_layers} layers x {lg.num_heads} heads"
            if recipe["expanding"]:
                ds = load_dataset(self.expanding_data(anc), img_size=anc.arch.img_size, in_chans=anc.arch.in_chans)
                work = st.path.with_name(st.key + ".partial")
                resume = self.resumable(work, "learngene expanding phase")
                lg, _ = train_learngene(lg, anc, ds.train, default_shapes(lg), ExpandingConfig(**recipe["expanding"]),
                                        out_dir=work, resume=resume, ckpt_every=max(1, recipe["expanding"]["steps"] // 10),
                                        progress=True)
                lg.meta["expanding_phase"]["data"] = ds.identity
                how += f", trained {recipe['expanding']['steps']} expanding-phase steps on {self.expanding_data(anc)}"
        with atomic_directory(st.path) as tmp:
            lg.save(tmp / "learngene")
            seal(tmp, {"seconds": round(time.perf_counter() - t0, 2), "how": how})
        shutil.rmtree(st.path.with_name(st.key + ".partial"), ignore_errors=True)
        self.log(f"learngene: {how} in {time.perf_counter() - t0:.1f}s")
        return Learngene.load(st.path / "learngene"), st

    # -- stage 3 -------------------------------------------------------------------------------
    def finetune_stage(self, lg_sha: str, shape, ds) -> Stage:
        c = self.cfg
        recipe = dict(init=c.init, steps=c.finetune_steps, batch=c.batch_size, lr=c.lr, seed=c.seed)
        return self.stage("finetune", _key(lg_sha, shape.to_dict(), recipe, ds.identity))

    def finetune(self, anc, lg, shape, ds, should_stop: Callable[[], bool] | None = None) -> Stage:
        from factory.core.baselines import init_descendant
        from factory.core.checkpoint import save_descendant
        from factory.training.train import evaluate, train

        st = self.finetune_stage(lg.sha256, shape, ds)
        if self.reusable(st):
            self.log(f"finetune {shape.label()}: cached ({st.key})")
            return st
        c = self.cfg
        work = st.path.with_name(st.key + ".partial")  # checkpoints survive a killed build
        model = init_descendant(c.init, shape, ancestry=anc, learngene=lg, seed=c.seed)
        cfg = finetune_recipe(c)
        resume = self.resumable(work, f"finetune {shape.label()}")
        result = train(model, ds.train, cfg, val_data=ds.val, out_dir=work, resume=resume, progress=False, should_stop=should_stop)
        model = model.cpu().eval()
        test_acc = evaluate(model, ds.test)
        with atomic_directory(st.path) as tmp:
            save_descendant(model, anc.arch.with_shape(shape), tmp / "model.safetensors",
                            {"method": c.init, "learngene_sha256": lg.sha256, "shape": shape.to_dict(), "data": ds.identity,
                             "steps": c.finetune_steps, "seed": c.seed})
            shutil.copyfile(work / "metrics.jsonl", tmp / "metrics.jsonl")
            seal(tmp, {"val_accuracy": result.val_accuracy, "test_accuracy": test_acc, "seconds": round(result.seconds, 2)})
        shutil.rmtree(work, ignore_errors=True)
        self.log(f"finetune {shape.label()}: test accuracy {test_acc:.4f} in {result.seconds:.1f}s")
        return st


def finetune_recipe(cfg: BuildConfig):
    """The fine-tuning recipe of a build (also what the accuracy estimator compresses and benches reproduce)."""
    from factory.training.train import TrainConfig

    return TrainConfig(steps=cfg.finetune_steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, device=cfg.device,
                       warmup_steps=max(1, cfg.finetune_steps // 10), ckpt_every=max(1, cfg.finetune_steps // 5))


def learngene_recipe(ancestry_sha256: str, layers: int, heads: int, *, seed: int, tau: float, rescale: str,
                     head_mixing: bool, expanding: dict[str, Any] | None, data: str | None) -> dict[str, Any]:
    """Everything that determines a learngene's tensors: the build caches learngenes by it."""
    return {"ancestry": ancestry_sha256, "layers": layers, "heads": heads, "seed": seed, "tau": float(tau), "mixing": "softmax",
            "rescale": rescale, "head_mixing": head_mixing, "expanding": expanding, "data": data}


def recipe_of(lg) -> dict[str, Any] | None:
    """The :func:`learngene_recipe` a saved learngene was made with, read from its metadata
    (``None`` when it was not made by the default sampler + expanding phase)."""
    from factory.core.expanding import ExpandingConfig, default_shapes

    m = lg.meta
    exp = m.get("expanding_phase")
    if m.get("mixing") != "softmax" or "ancestry" not in m:
        return None
    if exp and exp.get("shapes") != [s.label() for s in default_shapes(lg)]:
        return None
    expanding = None
    if exp:  # only the fields that shape the tensors (older logs may carry others, e.g. checkpoint cadence)
        fields = set(dataclasses.asdict(ExpandingConfig()))
        if not fields <= set(exp["config"]):
            return None
        expanding = {k: exp["config"][k] for k in sorted(fields)}
    return learngene_recipe(m["ancestry"]["sha256"], lg.num_layers, lg.num_heads, seed=m.get("seed"), tau=m.get("tau"),
                            rescale=m.get("rescale", "none"), head_mixing=m.get("heads_mixed", _heads_mixed(lg)), expanding=expanding,
                            data=exp.get("data") if exp else None)


def _heads_mixed(lg) -> bool:
    """Whether the learngene's head matrices blend heads (not all one-hot)."""
    q = lg.head_mixing
    return not bool(((q == 0) | (q == 1)).all())


def _profile_hash(profile: Profile) -> str:
    return hashlib.sha256(Path(profile.path).read_bytes()).hexdigest() if profile.path else _key(profile.model_dump())


def tool_versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {"peg-factory": __version__}
    for name in ("torch", "timm", "onnx", "onnxruntime", "fvcore", "tensorrt"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def build(profiles: list[Profile], out: str | Path, cfg: BuildConfig = BuildConfig(), *, dry_run: bool = False,
          log: Callable[[str], None] = print, wait_lock: bool = False, executor=None) -> dict[str, Any]:
    """Run (or, with ``dry_run``, plan) the build; returns the manifest dict.

    ``executor`` runs the per-shape jobs (:mod:`factory.pipeline.executor`): ``None`` means
    ``LocalExecutor(cfg.jobs)``; a ``RayExecutor`` spreads them over a Ray cluster. It is not part of
    the build's identity: the manifest is the same whichever ran it.

    A build holds an exclusive lock on ``out`` (:func:`factory.pipeline.artifacts.directory_lock`): a second
    build into the same directory fails at once with a one-line error, or waits with ``wait_lock``.
    """
    if dry_run:
        return _build(profiles, out, cfg, dry_run=True, log=log)
    with directory_lock(out, wait=wait_lock, log=log):
        return _build(profiles, out, cfg, dry_run=False, log=log, executor=executor)


def _build(profiles: list[Profile], out: str | Path, cfg: BuildConfig, *, dry_run: bool, log: Callable[[str], None],
           executor=None) -> dict[str, Any]:
    if not profiles:
        raise FactoryError("no profile given: pass --profile PATH (repeatable) or --fleet FILE")
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise FactoryError(f"profile names must be unique in a fleet, got {names}")
    out = Path(out)
    builder = Builder(out, cfg, log)
    t_start = time.perf_counter()
    # decide "nothing to do" from fingerprints alone, before loading torch, models or data
    build_key = _key([_profile_hash(p) for p in profiles], dataclasses.asdict(cfg), ancestry_fingerprint(cfg.ancestry))
    previous = _up_to_date(out, build_key)
    if previous is not None and not dry_run and previous.get("data", {}).get("identity_key") == _data_key(previous, cfg):
        log(f"build is up to date ({build_key}): nothing to do")
        return previous
    from factory.core.ancestry import load_ancestry  # the heavy imports (torch, timm) start here
    from factory.device.cost import CostModel
    from factory.training.data import load_dataset
    from factory.device.search import SearchSpace, search

    anc = load_ancestry(cfg.ancestry)
    ds = load_dataset(cfg.data, img_size=anc.arch.img_size, in_chans=anc.arch.in_chans)
    space = SearchSpace.from_arch(anc.arch, num_classes=ds.num_classes)
    objective, why = builder.objective(anc)
    log(f"objective: {objective} ({why})")

    devices: list[dict[str, Any]] = []
    searches = {}
    for prof in profiles:
        entry: dict[str, Any] = {"name": prof.name, "profile": str(prof.path), "profile_sha256": _profile_hash(prof)}
        try:
            cost = CostModel.for_profile(prof, arch=anc.arch)
            result = search(prof, space, cost, seed=cfg.seed)
            best = result.require_feasible()
            searches[prof.name] = (result, best, cost)
            entry.update(shape=best.shape.to_dict(), predicted={**best.to_dict(), "latency_method": cost.method},
                         selection={"objective": "capacity", "reason": f"{why}: the largest shape that fits, not probed"}
                         if objective == "capacity" else {"objective": "capacity", "reason": "pending accuracy estimate"})
        except FactoryError as exc:
            entry.update(status="failed", error=str(exc))
        devices.append(entry)

    lg_stage = builder.learngene_stage(anc)
    if dry_run:
        return _plan(builder, devices, lg_stage, anc, ds, log, objective)

    lg, _ = builder.learngene(anc)
    if objective == "accuracy":
        choose_for_devices(builder, devices, searches, anc, lg, ds, reason=why)
    from factory.pipeline.executor import LocalExecutor, ShapeJob

    by_shape: dict[DescendantShape, list] = {}
    for entry, prof in zip(devices, profiles):
        if entry.get("status") != "failed":
            by_shape.setdefault(DescendantShape.from_dict(entry["shape"]), []).append((prof, entry, searches[prof.name]))
    jobs = [ShapeJob(shape, group) for shape, group in by_shape.items()]
    executor = executor or LocalExecutor(cfg.jobs)
    results = executor.run(builder, anc, lg, lg_stage.path / "learngene", ds, jobs)
    updates = {name: update for result in results for name, update in result}
    for entry in devices:
        entry.update(updates.get(entry["name"], {}))

    manifest = {
        "format_version": 1,
        "build_key": build_key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "ancestry": anc.identity(),
        "ancestry_arch": anc.arch.to_dict(),
        "learngene": {"sha256": lg.sha256, "layers": lg.num_layers, "heads": lg.num_heads, "seed": cfg.gene_seed,
                      "recipe": builder.learngene_recipe(anc), "cache_key": lg_stage.key, "sampled_once_for": names},
        "data": {"spec": cfg.data, "identity": ds.identity, "classes": ds.train.classes,
                 "identity_key": dataset_identity(cfg.data, anc.arch.img_size, anc.arch.in_chans)},
        "recipe": dataclasses.asdict(cfg),
        "tools": tool_versions(),
        "executor": executor.describe(),  # where the shape jobs ran (not part of the build's identity)
        "seconds": round(time.perf_counter() - t_start, 2),
        "devices": devices,
    }
    from factory.pipeline.report import write_reports

    write_reports(out, manifest, searches)
    atomic_write_bytes(out / "manifest.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    atomic_write_bytes(out / "manifest.schema.json", (json.dumps(MANIFEST_SCHEMA, indent=2) + "\n").encode())
    return manifest


def build_shape(builder: Builder, anc, lg, ds, job, should_stop: Callable[[], bool] | None = None,
                threads: int | None = None, serial=None) -> list[tuple[str, dict[str, Any]]]:
    """One shape job (:class:`factory.pipeline.executor.ShapeJob`): fine-tune the shape once (with ``threads``
    intra-op threads, :func:`factory.training.train.intra_op_threads`), then measure and export it for each
    device that chose it. Returns ``[(device name, manifest entry update)]``; a
    :class:`FactoryError` fails the devices it concerns, not the build.

    ``serial`` (a lock shared by the jobs of one process) serialises measuring and exporting:
    ``torch.onnx.export`` and fvcore's tracing keep process-global state and fail when two threads
    run them at once. Fine-tuning, the long part, stays parallel.
    """
    import contextlib

    from factory.training.train import intra_op_threads

    try:
        with intra_op_threads(threads):
            st = builder.finetune(anc, lg, job.shape, ds, should_stop)
    except FactoryError as exc:
        builder.log(f"finetune {job.shape.label()}: failed: {exc}")
        return job.failed(str(exc))
    out = []
    for prof, entry, searched in job.devices:
        try:
            with serial if serial is not None else contextlib.nullcontext():
                update = {**_finish_device(builder, prof, st, entry, searched, lg, anc, ds), "status": "ok"}
        except FactoryError as exc:
            update = {"status": "failed", "error": str(exc)}
            builder.log(f"{prof.name}: failed: {exc}")
        out.append((prof.name, update))
    return out


def choose_for_devices(builder: Builder, devices, searches, anc, lg, ds, reason: str = "--objective accuracy") -> None:
    """Replace each device's capacity choice by the candidate with the best predicted accuracy;
    ``reason`` (why the build probes) goes into each device's ``selection``."""
    from factory.device.accuracy import EstimatorConfig, SuccessiveHalving, choose_by_accuracy, describe_decision

    c = builder.cfg
    predictor = SuccessiveHalving(anc, lg, ds, finetune_recipe(c), init=c.init, config=EstimatorConfig(candidates=c.candidates),
                              cache_dir=builder.cache / "estimate")
    for entry in devices:
        if entry.get("status") == "failed":
            continue
        result, best, cost = searches[entry["name"]]
        spent = predictor.seconds
        chosen, rows = choose_by_accuracy(result, predictor, c.candidates)
        searches[entry["name"]] = (result, chosen, cost)
        entry.update(shape=chosen.shape.to_dict(), predicted={**chosen.to_dict(), "accuracy": next(r["predicted_accuracy"] for r in rows if r["chosen"])})
        entry["selection"] = {"objective": "accuracy", "reason": reason, "estimator": predictor.describe(), "candidates": rows,
                              "chosen": chosen.shape.label(), "capacity_choice": best.shape.label(),
                              "seconds": round(predictor.seconds - spent, 2)}
        row = next(r for r in rows if r["chosen"])
        builder.log(f"{entry['name']}: chose {chosen.shape.label()} from {len(rows)} probed candidates in "
                    f"{predictor.seconds - spent:.1f}s; {describe_decision(row.get('decision', {}))}")


def _data_key(previous: dict[str, Any], cfg: BuildConfig) -> str | None:
    """The data fingerprint now, at the input size/channels of the previous build's ancestry."""
    arch = previous.get("ancestry_arch") or {}
    try:
        return dataset_identity(cfg.data, arch.get("img_size", 28), arch.get("in_chans", 1))
    except FactoryError:
        return None


def _up_to_date(out: Path, build_key: str) -> dict[str, Any] | None:
    """The previous manifest if it was made from the same inputs and its artifacts are intact."""
    path = out / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("build_key") != build_key:
        return None
    for dev in manifest.get("devices", []):
        for art in dev.get("artifacts", {}).values():
            target = out / art["path"]
            if not target.exists() or ("sha256" in art and target.is_file() and sha256_file(target) != art["sha256"]):
                return None
    return manifest


def _finish_device(builder: Builder, prof: Profile, st: Stage, entry, searched, lg, anc, ds) -> dict[str, Any]:
    """Measure and export one device from its fine-tuned model; copy results under OUT/<name>."""
    from export.api import export_model, parse_formats

    from factory.core.checkpoint import load_descendant
    from factory.device.cost import measure_onnxruntime_latency
    from factory.core.flops import count_flops, count_params

    result, best, cost = searched
    model_sha = sha256_file(st.path / "model.safetensors")
    done = json.loads((st.path / "done.json").read_text())
    m_stage = builder.stage("measure", _key(model_sha))
    if not builder.reusable(m_stage):
        model = load_descendant(st.path / "model.safetensors")
        shape = best.shape
        measured = {"flops_fvcore": count_flops(model), "params": count_params(model),
                    "host_latency_ms_onnxruntime": round(measure_onnxruntime_latency(shape, 1, arch=anc.arch), 4)}
        with atomic_directory(m_stage.path) as tmp:
            seal(tmp, measured)
    measured = json.loads((m_stage.path / "done.json").read_text())
    formats = parse_formats("all", prof)
    e_stage = builder.stage("export", _key(model_sha, formats, entry["profile_sha256"]))
    if not builder.reusable(e_stage):
        with atomic_directory(e_stage.path) as tmp:
            export_model(st.path / "model.safetensors", formats, tmp / "export", profile=prof, data=builder.cfg.data,
                         log=lambda line: builder.log(f"{prof.name}: {line}"))
            seal(tmp, {})
    else:
        builder.log(f"{prof.name}: export cached ({e_stage.key})")
    device_dir = confined(builder.out, prof.name, "profile name")
    with atomic_directory(device_dir) as tmp:
        shutil.copyfile(st.path / "model.safetensors", tmp / "model.safetensors")
        shutil.copytree(e_stage.path / "export", tmp / "export")
        deploy = json.loads((e_stage.path / "export" / "export.json").read_text()).get("deploy", {})
        (tmp / "MODEL_CARD.md").write_text(_model_card(prof, best, done, measured, lg, anc, builder.cfg, entry.get("selection", {}),
                                                       deploy))
    export_record = json.loads((device_dir / "export" / "export.json").read_text())
    artifacts = {"model": {"path": f"{prof.name}/model.safetensors", "sha256": model_sha}}
    for fmt, art in export_record["artifacts"].items():
        item = {"path": f"{prof.name}/export/{art.get('file') or art.get('dir')}"}
        item.update({k: v for k, v in art.items()
                     if k in ("sha256", "files", "kind", "mode", "val_accuracy", "test_accuracy", "weights_sha256",
                              "execution_precision")})
        artifacts[fmt] = item
    budgets = dict(prof.budgets.items())
    return {
        "init": builder.cfg.init,
        "learngene_sha256": lg.sha256,
        "finetune": {"steps": builder.cfg.finetune_steps, "seed": builder.cfg.seed, "cache_key": st.key,
                     "seconds": done["seconds"]},
        "accuracy": {"val": done["val_accuracy"], "test": done["test_accuracy"]},
        "flops": {"fvcore": measured["flops_fvcore"], "closed_form_g": best.flops_g},
        "params": measured["params"],
        "latency_ms": {"predicted_target": best.latency_ms, "host_onnxruntime": measured["host_latency_ms_onnxruntime"]},
        "memory_mb": {"predicted_target": best.memory_mb},
        "budgets": budgets,
        "margins": best.margins,
        "search": {"evaluated": result.evaluated, "feasible": len(result.feasible), "rejected": len(result.rejected)},
        "artifacts": artifacts,
        "deploy": export_record.get("deploy"),
        "model_card": f"{prof.name}/MODEL_CARD.md",
    }


def _selection_text(sel: dict[str, Any]) -> str:
    from factory.device.accuracy import describe_decision

    if sel.get("objective") != "accuracy":
        return "Chosen by the searcher as the highest-capacity shape (log FLOPs + 0.5 log params)"
    est = sel["estimator"]
    best = next(r for r in sel["candidates"] if r["chosen"])
    return (f"Chosen by a successive-halving probe (validation NLL {best.get('val_nll', float('nan')):.3f}, accuracy "
            f"{best['predicted_accuracy']:.3f} after {best.get('probe_steps', '?')} of the {est['budget_steps']} steps; rungs "
            f"{'/'.join(map(str, est['rungs']))}, {est['val_images']} validation images) among {len(sel['candidates'])} "
            f"Pareto-front candidates; {describe_decision(best.get('decision', {}))}")


def _model_card(prof: Profile, best, done, measured, lg, anc, cfg: BuildConfig, selection: dict[str, Any],
                deploy: dict[str, Any]) -> str:
    s = best.shape
    return f"""# {prof.name}: {s.label()}

**What it is.** A timm `VisionTransformer` (depth {s.depth}, width {s.embed_dim}, {s.num_heads} heads, MLP ratio
{s.mlp_ratio:g}, {s.img_size}x{s.img_size} input, patch {s.patch_size}, {s.num_classes} classes) for
{prof.description or prof.name}.

**How it was made.** Initialised by `{cfg.init}` from learngene `{(lg.sha256 or '')[:12]}` ({lg.num_layers} gene layers,
{lg.num_heads} heads) of ancestry `{anc.spec}` (`{anc.sha256[:12]}`, weights: {anc.weights}); fine-tuned
{cfg.finetune_steps} steps on `{cfg.data}` (seed {cfg.seed}). {_selection_text(selection)}, within the budgets
{dict(prof.budgets.items())}.

**Numbers.** Test accuracy {done['test_accuracy']:.4f}; {measured['flops_fvcore'] / 1e9:.4f} GFLOPs (fvcore);
{measured['params'] / 1e6:.3f} M parameters; predicted {best.latency_ms:.4f} ms and {best.memory_mb:.1f} MB on the target
({prof.precision}, batch {prof.batch}); {measured['host_latency_ms_onnxruntime']:.4f} ms with onnxruntime on the build host.
Deploy with **{deploy.get('format', 'onnx')}** ({deploy.get('reason', 'the only artifact')}; see `export/export.json`).

**How to run it.**
```python
import onnxruntime as ort, numpy as np
sess = ort.InferenceSession("export/model.onnx")
logits = sess.run(None, {{"images": np.zeros((1, {anc.arch.in_chans}, {s.img_size}, {s.img_size}), np.float32)}})[0]
```
or in PyTorch: `factory.core.checkpoint.load_descendant("model.safetensors")`. Preprocessing (size, mean, std) and class
names are in the ONNX metadata. For TensorRT see `export/export.json` (engine, or `trt_kit/build_engine.sh` on the device).
"""


def _plan(builder: Builder, devices, lg_stage: Stage, anc, ds, log, objective: str) -> dict[str, Any]:
    """Dry run: per profile the chosen shape and whether each stage is cached, with time estimates."""
    from factory.device.cost import CostModel, Device, Efficiency, measure_host
    host = measure_host(0.2)
    dev = Device(host.peak_flops, host.bandwidth, "onnxruntime", 1e9, False)
    est_model = CostModel(dev, "fp32", builder.cfg.batch_size, Efficiency(), anc.arch)
    if lg_stage.cached:
        log("learngene: cached")
    elif builder.shipped_learngene(anc) is not None:
        log("learngene: the shipped demo learngene (same recipe)")
    else:
        steps = (builder.learngene_recipe(anc)["expanding"] or {}).get("steps", 0)
        log(f"learngene: will be sampled{f' and trained for {steps} expanding-phase steps' if steps else ''}")
    plan = []
    for entry in devices:
        if entry.get("status") == "failed":
            log(f"{entry['name']}: FAILS at search: {entry['error']}")
            plan.append(entry)
            continue
        shape = DescendantShape.from_dict(entry["shape"])
        ft = builder.finetune_stage(lg_stage.key if not lg_stage.cached else _cached_lg_sha(lg_stage), shape, ds)
        step_s = 3 * est_model.latency_ms(shape) / 1e3  # fwd + bwd ~ 3x fwd, at the capacity choice's size
        seconds = step_s * builder.cfg.finetune_steps
        extra: dict[str, Any] = {}
        if objective == "accuracy":
            from factory.device.accuracy import EstimatorConfig

            est = EstimatorConfig(candidates=builder.cfg.candidates)
            probe_steps = est.probe_steps(est.candidates, builder.cfg.finetune_steps)
            extra["estimator_estimate_s"] = round(probe_steps * step_s, 1)
            log(f"{entry['name']}: accuracy estimate of up to {est.candidates} Pareto candidates by successive halving "
                f"(rungs {'/'.join(map(str, est.rungs_for(builder.cfg.finetune_steps)))} steps, {probe_steps} steps in all) "
                f"will run unless cached (<= ~{extra['estimator_estimate_s']:.0f}s); "
                f"the capacity choice is {shape.label()}")
        log(f"{entry['name']}: shape {shape.label()}; finetune {'cached' if ft.cached else f'will run (~{seconds:.0f}s)'}; "
            f"measure + export will run unless cached (~10s)")
        plan.append({**entry, "finetune_cached": ft.cached, "finetune_estimate_s": round(seconds, 1), **extra})
    return {"dry_run": True, "devices": plan, "learngene_cached": lg_stage.cached}


def _cached_lg_sha(stage: Stage) -> str:
    meta = json.loads((stage.path / "learngene" / "learngene.json").read_text())
    return meta["tensors_sha256"]


MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "peg-factory build manifest",
    "type": "object",
    "required": ["format_version", "ancestry", "learngene", "data", "recipe", "tools", "devices"],
    "properties": {
        "format_version": {"const": 1},
        "ancestry": {"type": "object", "required": ["spec", "sha256", "weights"]},
        "learngene": {"type": "object", "required": ["sha256", "layers", "heads", "sampled_once_for"]},
        "data": {"type": "object", "required": ["spec", "identity"]},
        "recipe": {"type": "object"},
        "tools": {"type": "object", "required": ["torch", "timm", "onnx", "onnxruntime"]},
        "devices": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "profile", "profile_sha256", "status"],
                "properties": {
                    "status": {"enum": ["ok", "failed"]},
                    "error": {"type": "string"},
                    "shape": {"type": "object", "required": ["depth", "embed_dim", "num_heads", "mlp_ratio", "img_size",
                                                              "patch_size", "num_classes"]},
                    "accuracy": {"type": "object", "required": ["val", "test"]},
                    "latency_ms": {"type": "object", "required": ["predicted_target", "host_onnxruntime"]},
                    "margins": {"type": "object", "additionalProperties": {"type": "number"}},
                    "artifacts": {"type": "object", "additionalProperties": {
                        "type": "object", "required": ["path"]}},
                },
                "if": {"properties": {"status": {"const": "ok"}}},
                "then": {"required": ["shape", "init", "learngene_sha256", "finetune", "accuracy", "flops", "params",
                                      "latency_ms", "memory_mb", "margins", "artifacts", "model_card"]},
                "else": {"required": ["error"]},
            },
        },
    },
}


def load_fleet(path: str | Path) -> list[str]:
    """Profile paths listed by a fleet file (``profiles: [a.yaml, b.yaml]``, relative to the file)."""
    import yaml

    path = Path(path)
    try:
        if path.stat().st_size > MAX_PROFILE_BYTES:
            raise FactoryError(f"fleet {path}: larger than a fleet file needs ({MAX_PROFILE_BYTES} bytes); check the file")
        data = yaml.safe_load(path.read_text())
    except RecursionError as exc:
        raise FactoryError(f"fleet {path}: nested too deeply to be a fleet file; fix the YAML") from exc
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise FactoryError(f"fleet {path}: cannot read it ({' '.join(str(exc).split())[:200]}); check the file") from exc
    if (not isinstance(data, dict) or not isinstance(data.get("profiles"), list) or not data["profiles"]
            or not all(isinstance(p, str) and p for p in data["profiles"])):
        raise FactoryError(f"fleet {path}: expected 'profiles: [profile.yaml, ...]' (a list of paths)")
    return [str((path.parent / p).resolve()) if not Path(p).is_absolute() else p for p in data["profiles"]]

