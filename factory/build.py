"""``peg-factory build``: profiles -> searched, expanded, fine-tuned, measured, exported models.

Stages, for a fleet of profiles sharing one ancestry, learngene and data set:

1. ``learngene`` -- sampled (and, with ``expand_steps > 0``, trained by the expanding phase) once
   for the whole fleet.
2. ``search`` -- per profile, the best shape within its budgets (:mod:`factory.search`).
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

Scaling out: profile builds are independent given the learngene, so a fleet can be split across
machines by running ``peg-factory build`` with a subset of ``--profile`` flags per machine (a
batch scheduler such as Slurm, or Ray, launches them) against a shared ``--out``; the
content-addressed cache makes the shared learngene and shared shapes compute once.
Multi-GPU fine-tuning of one model uses ``torchrun`` (:mod:`factory.train`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .artifacts import atomic_directory, atomic_write_bytes, sha256_file
from .errors import FactoryError
from .fingerprint import ancestry_fingerprint, dataset_identity
from .profile import Profile
from .shapes import DescendantShape

STAGES = ("learngene", "search", "finetune", "measure", "export")


@dataclass(frozen=True)
class BuildConfig:
    ancestry: str = "demo"
    data: str = "digits"
    gene_layers: int | None = None
    gene_heads: int | None = None
    gene_seed: int = 0
    expand_steps: int = 0
    init: str = "peg"
    finetune_steps: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    jobs: int = 1
    device: str = "auto"


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
        return (self.path / "done.json").is_file()


class Builder:
    """One build directory; methods are the stages (see the module docstring)."""

    def __init__(self, out: Path, cfg: BuildConfig, log: Callable[[str], None] = print):
        self.out, self.cfg, self.log = Path(out), cfg, log
        self.cache = self.out / ".cache"

    def stage(self, name: str, key: str) -> Stage:
        return Stage(name, key, self.cache / name / key)

    # -- stage 1 -------------------------------------------------------------------------------
    def learngene_stage(self, anc, ds) -> Stage:
        c = self.cfg
        return self.stage("learngene", _key(anc.sha256, c.gene_layers, c.gene_heads, c.gene_seed, c.expand_steps, ds.identity))

    def learngene(self, anc, ds):
        from .expanding import ExpandingConfig, default_shapes, train_learngene
        from .learngene import Learngene, sample_learngene

        st = self.learngene_stage(anc, ds)
        if st.cached:
            self.log(f"learngene: cached ({st.key})")
            return Learngene.load(st.path / "learngene"), st
        t0 = time.perf_counter()
        c = self.cfg
        lg = sample_learngene(anc, c.gene_layers or max(1, anc.arch.depth // 2), c.gene_heads, seed=c.gene_seed)
        if c.expand_steps:
            lg, _ = train_learngene(lg, anc, ds.train, default_shapes(lg), ExpandingConfig(steps=c.expand_steps, seed=c.gene_seed),
                                    progress=False)
        with atomic_directory(st.path) as tmp:
            lg.save(tmp / "learngene")
            (tmp / "done.json").write_text(json.dumps({"seconds": round(time.perf_counter() - t0, 2)}))
        self.log(f"learngene: sampled {lg.num_layers} layers x {lg.num_heads} heads in {time.perf_counter() - t0:.1f}s")
        return Learngene.load(st.path / "learngene"), st

    # -- stage 3 -------------------------------------------------------------------------------
    def finetune_stage(self, lg_sha: str, shape, ds) -> Stage:
        c = self.cfg
        recipe = dict(init=c.init, steps=c.finetune_steps, batch=c.batch_size, lr=c.lr, seed=c.seed)
        return self.stage("finetune", _key(lg_sha, shape.to_dict(), recipe, ds.identity))

    def finetune(self, anc, lg, shape, ds) -> Stage:
        from .baselines import init_descendant
        from .checkpoint import save_descendant
        from .train import TrainConfig, evaluate, train

        st = self.finetune_stage(lg.sha256, shape, ds)
        if st.cached:
            self.log(f"finetune {shape.label()}: cached ({st.key})")
            return st
        c = self.cfg
        work = st.path.with_name(st.key + ".partial")  # checkpoints survive a killed build
        model = init_descendant(c.init, shape, ancestry=anc, learngene=lg, seed=c.seed)
        cfg = TrainConfig(steps=c.finetune_steps, batch_size=c.batch_size, lr=c.lr, seed=c.seed, device=c.device,
                          warmup_steps=max(1, c.finetune_steps // 10), ckpt_every=max(1, c.finetune_steps // 5))
        resume = (work / "checkpoint" / "state.json").is_file()
        if resume:
            self.log(f"finetune {shape.label()}: resuming from its last checkpoint")
        result = train(model, ds.train, cfg, val_data=ds.val, out_dir=work, resume=resume, progress=False)
        model = model.cpu().eval()
        test_acc = evaluate(model, ds.test)
        with atomic_directory(st.path) as tmp:
            save_descendant(model, anc.arch.with_shape(shape), tmp / "model.safetensors",
                            {"method": c.init, "learngene_sha256": lg.sha256, "shape": shape.to_dict(), "data": ds.identity,
                             "steps": c.finetune_steps, "seed": c.seed})
            shutil.copyfile(work / "metrics.jsonl", tmp / "metrics.jsonl")
            (tmp / "done.json").write_text(json.dumps({"val_accuracy": result.val_accuracy, "test_accuracy": test_acc,
                                                       "seconds": round(result.seconds, 2)}))
        shutil.rmtree(work, ignore_errors=True)
        self.log(f"finetune {shape.label()}: test accuracy {test_acc:.4f} in {result.seconds:.1f}s")
        return st


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
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or, with ``dry_run``, plan) the build; returns the manifest dict."""
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
    from .ancestry import load_ancestry  # the heavy imports (torch, timm) start here
    from .cost import CostModel
    from .data import load_dataset
    from .search import SearchSpace, search

    anc = load_ancestry(cfg.ancestry)
    ds = load_dataset(cfg.data, img_size=anc.arch.img_size, in_chans=anc.arch.in_chans)
    space = SearchSpace.from_arch(anc.arch, num_classes=ds.num_classes)

    devices: list[dict[str, Any]] = []
    searches = {}
    for prof in profiles:
        entry: dict[str, Any] = {"name": prof.name, "profile": str(prof.path), "profile_sha256": _profile_hash(prof)}
        try:
            cost = CostModel.for_profile(prof, arch=anc.arch)
            result = search(prof, space, cost, seed=cfg.seed)
            best = result.require_feasible()
            searches[prof.name] = (result, best, cost)
            entry.update(shape=best.shape.to_dict(), predicted=best.to_dict())
        except FactoryError as exc:
            entry.update(status="failed", error=str(exc))
        devices.append(entry)

    lg_stage = builder.learngene_stage(anc, ds)
    if dry_run:
        return _plan(builder, devices, lg_stage, anc, ds, log)

    lg, _ = builder.learngene(anc, ds)
    shapes = {}
    for entry in devices:
        if "shape" in entry:
            shapes.setdefault(DescendantShape.from_dict(entry["shape"]), []).append(entry["name"])
    ft_stages = {}
    with ThreadPoolExecutor(max_workers=max(1, cfg.jobs)) as pool:
        futures = {shape: pool.submit(builder.finetune, anc, lg, shape, ds) for shape in shapes}
        for shape, fut in futures.items():
            try:
                ft_stages[shape] = fut.result()
            except FactoryError as exc:
                ft_stages[shape] = exc

    for entry, prof in zip(devices, profiles):
        if entry.get("status") == "failed":
            continue
        shape = DescendantShape.from_dict(entry["shape"])
        st = ft_stages[shape]
        if isinstance(st, Exception):
            entry.update(status="failed", error=str(st))
            continue
        try:
            entry.update(_finish_device(builder, prof, st, entry, searches[prof.name], lg, anc, ds))
            entry["status"] = "ok"
        except FactoryError as exc:
            entry.update(status="failed", error=str(exc))
            log(f"{prof.name}: failed: {exc}")

    manifest = {
        "format_version": 1,
        "build_key": build_key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "ancestry": anc.identity(),
        "ancestry_arch": anc.arch.to_dict(),
        "learngene": {"sha256": lg.sha256, "layers": lg.num_layers, "heads": lg.num_heads, "seed": cfg.gene_seed,
                      "expand_steps": cfg.expand_steps, "cache_key": lg_stage.key, "sampled_once_for": names},
        "data": {"spec": cfg.data, "identity": ds.identity, "classes": ds.train.classes,
                 "identity_key": dataset_identity(cfg.data, anc.arch.img_size, anc.arch.in_chans)},
        "recipe": dataclasses.asdict(cfg),
        "tools": tool_versions(),
        "seconds": round(time.perf_counter() - t_start, 2),
        "devices": devices,
    }
    from .report import write_reports

    write_reports(out, manifest, searches)
    atomic_write_bytes(out / "manifest.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    atomic_write_bytes(out / "manifest.schema.json", (json.dumps(MANIFEST_SCHEMA, indent=2) + "\n").encode())
    return manifest


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

    from .checkpoint import load_descendant
    from .cost import measure_onnxruntime_latency
    from .flops import count_flops, count_params

    result, best, cost = searched
    model_sha = sha256_file(st.path / "model.safetensors")
    done = json.loads((st.path / "done.json").read_text())
    m_stage = builder.stage("measure", _key(model_sha))
    if not m_stage.cached:
        model = load_descendant(st.path / "model.safetensors")
        shape = best.shape
        measured = {"flops_fvcore": count_flops(model), "params": count_params(model),
                    "host_latency_ms_onnxruntime": round(measure_onnxruntime_latency(shape, 1, arch=anc.arch), 4)}
        with atomic_directory(m_stage.path) as tmp:
            (tmp / "done.json").write_text(json.dumps(measured))
    measured = json.loads((m_stage.path / "done.json").read_text())
    formats = parse_formats("all", prof)
    e_stage = builder.stage("export", _key(model_sha, formats, entry["profile_sha256"]))
    if not e_stage.cached:
        with atomic_directory(e_stage.path) as tmp:
            export_model(st.path / "model.safetensors", formats, tmp / "export", profile=prof, data=builder.cfg.data,
                         log=lambda line: builder.log(f"{prof.name}: {line}"))
            (tmp / "done.json").write_text("{}")
    else:
        builder.log(f"{prof.name}: export cached ({e_stage.key})")
    device_dir = builder.out / prof.name
    with atomic_directory(device_dir) as tmp:
        shutil.copyfile(st.path / "model.safetensors", tmp / "model.safetensors")
        shutil.copytree(e_stage.path / "export", tmp / "export")
        (tmp / "MODEL_CARD.md").write_text(_model_card(prof, best, done, measured, lg, anc, builder.cfg))
    export_record = json.loads((device_dir / "export" / "export.json").read_text())
    artifacts = {"model": {"path": f"{prof.name}/model.safetensors", "sha256": model_sha}}
    for fmt, art in export_record["artifacts"].items():
        item = {"path": f"{prof.name}/export/{art.get('file') or art.get('dir')}"}
        item.update({k: v for k, v in art.items() if k in ("sha256", "files", "kind", "mode", "val_accuracy")})
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
        "model_card": f"{prof.name}/MODEL_CARD.md",
    }


def _model_card(prof: Profile, best, done, measured, lg, anc, cfg: BuildConfig) -> str:
    s = best.shape
    return f"""# {prof.name}: {s.label()}

**What it is.** A timm `VisionTransformer` (depth {s.depth}, width {s.embed_dim}, {s.num_heads} heads, MLP ratio
{s.mlp_ratio:g}, {s.img_size}x{s.img_size} input, patch {s.patch_size}, {s.num_classes} classes) for
{prof.description or prof.name}.

**How it was made.** Initialised by `{cfg.init}` from learngene `{(lg.sha256 or '')[:12]}` ({lg.num_layers} gene layers,
{lg.num_heads} heads) of ancestry `{anc.spec}` (`{anc.sha256[:12]}`, weights: {anc.weights}); fine-tuned
{cfg.finetune_steps} steps on `{cfg.data}` (seed {cfg.seed}). Chosen by the searcher as the highest-capacity shape within
the budgets {dict(prof.budgets.items())}.

**Numbers.** Test accuracy {done['test_accuracy']:.4f}; {measured['flops_fvcore'] / 1e9:.4f} GFLOPs (fvcore);
{measured['params'] / 1e6:.3f} M parameters; predicted {best.latency_ms:.4f} ms and {best.memory_mb:.1f} MB on the target
({prof.precision}, batch {prof.batch}); {measured['host_latency_ms_onnxruntime']:.4f} ms with onnxruntime on the build host.

**How to run it.**
```python
import onnxruntime as ort, numpy as np
sess = ort.InferenceSession("export/model.onnx")
logits = sess.run(None, {{"images": np.zeros((1, {anc.arch.in_chans}, {s.img_size}, {s.img_size}), np.float32)}})[0]
```
or in PyTorch: `factory.checkpoint.load_descendant("model.safetensors")`. Preprocessing (size, mean, std) and class
names are in the ONNX metadata. For TensorRT see `export/export.json` (engine, or `trt_kit/build_engine.sh` on the device).
"""


def _plan(builder: Builder, devices, lg_stage: Stage, anc, ds, log) -> dict[str, Any]:
    """Dry run: per profile the chosen shape and whether each stage is cached, with time estimates."""
    from .cost import CostModel, Device, Efficiency, measure_host
    host = measure_host(0.2)
    dev = Device(host.peak_flops, host.bandwidth, "onnxruntime", 1e9, False)
    est_model = CostModel(dev, "fp32", builder.cfg.batch_size, Efficiency(), anc.arch)
    log(f"learngene: {'cached' if lg_stage.cached else 'will run (~seconds)'}")
    plan = []
    for entry in devices:
        if entry.get("status") == "failed":
            log(f"{entry['name']}: FAILS at search: {entry['error']}")
            plan.append(entry)
            continue
        shape = DescendantShape.from_dict(entry["shape"])
        ft = builder.finetune_stage(lg_stage.key if not lg_stage.cached else _cached_lg_sha(lg_stage), shape, ds)
        seconds = 3 * est_model.latency_ms(shape) / 1e3 * builder.cfg.finetune_steps  # fwd + bwd ~ 3x fwd
        log(f"{entry['name']}: shape {shape.label()}; finetune {'cached' if ft.cached else f'will run (~{seconds:.0f}s)'}; "
            f"measure + export will run unless cached (~10s)")
        plan.append({**entry, "finetune_cached": ft.cached, "finetune_estimate_s": round(seconds, 1)})
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
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise FactoryError(f"fleet {path}: cannot read it ({exc}); check the file") from exc
    if not isinstance(data, dict) or not isinstance(data.get("profiles"), list) or not data["profiles"]:
        raise FactoryError(f"fleet {path}: expected 'profiles: [profile.yaml, ...]'")
    return [str((path.parent / p).resolve()) if not Path(p).is_absolute() else p for p in data["profiles"]]

