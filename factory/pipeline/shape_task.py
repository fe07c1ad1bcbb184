"""One shape task: fine-tune a distinct shape once, then measure, export and assemble it for every
device that chose it. What an executor runs (:mod:`factory.pipeline.executor`); small and picklable.

A task carries specs and paths, never models or data: the ancestry and data set are loaded by
spec once per process (:func:`ancestry_and_data`), the learngene from its cache entry by path,
checked against its sha256.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from factory.core.assets import ancestry_fingerprint
from factory.core.checkpoint import write_timm_config
from factory.core.shapes import DescendantShape
from factory.device.deploy import shipped_memory
from factory.device.measure import host_facts
from factory.errors import FactoryError
from factory.io import confined, owned_directory, sha256_file
from factory.pipeline import manifest, model_card
from factory.pipeline.cache import STAGE_SECONDS, Cache, Entry
from factory.pipeline.config import BuildConfig
from factory.pipeline.device_result import DeviceResult
from factory.pipeline.executor import TaskEnv
from factory.pipeline.perf_card import perf_card
from factory.pipeline.stages import EXPORT, FINETUNE, MEASURE, BuildContext, ExportItem, ModelItem, decide, run_stage


@dataclass(frozen=True)
class DeviceTask:
    """A device that chose the task's shape: its profile and its result so far (search, selection)."""

    profile: Any  # factory.device.profile.Profile
    result: DeviceResult


@dataclass(frozen=True)
class ShapeTask:
    out: str
    cfg: BuildConfig
    learngene_dir: str
    learngene_sha256: str
    shape: DescendantShape
    devices: tuple[DeviceTask, ...]
    head: dict[str, Any]  # the manifest's build-wide part (ancestry, learngene, recipe): model cards need it
    identity: tuple[str, str] | None = None  # (ancestry fingerprint, data identity), computed once by the build
    init_decision: dict[str, Any] | None = None  # the joint choice's (factory.pipeline.joint_choice); None: decide here
    finetune_s: float | None = None  # a time budget's allotment to the fine-tune, which keeps to it (pacing)

    @property
    def names(self) -> list[str]:
        return [d.result.name for d in self.devices]

    def failed(self, reason: str) -> list[DeviceResult]:
        """Every device of the task failed with ``reason``."""
        return [d.result.failed(reason) for d in self.devices]


@functools.lru_cache(maxsize=2)
def _load(ancestry: str, fingerprint: str, data: str, cache_mb: int = 0):
    import dataclasses

    from factory.core.ancestry import load_ancestry
    from factory.data import load_dataset

    anc = load_ancestry(ancestry)
    ds = load_dataset(data, img_size=anc.arch.img_size, in_chans=anc.arch.in_chans, min_side=anc.arch.patch_size)
    if cache_mb and hasattr(ds.train, "cached"):  # a streamed folder: decode its training split once if it fits
        train = ds.train.cached(cache_mb << 20)
        if train.cache is not None:  # the crops now come from the cached squares: another input to every key
            ds = dataclasses.replace(ds, train=train, identity=f"{ds.identity}:uint8-cache")
    return anc, ds


def ancestry_and_data(cfg: BuildConfig, identity: tuple[str, str | None] | None = None):
    """``(ancestry, dataset)`` of a build, loaded once per process (a Ray worker, or the driver and its
    threads) and reloaded when the ancestry's weights or the data's identity changed.

    ``identity`` is ``(ancestry fingerprint, data identity)`` as the build computed them once (a shape task
    carries them): then nothing is hashed or stat-ed again here; what it lacks (None) is computed now."""
    from factory.data import dataset_identity

    fingerprint = identity[0] if identity else ancestry_fingerprint(cfg.ancestry)
    anc, ds = _load(cfg.ancestry, fingerprint, cfg.data, cfg.data_cache_mb)
    data_id = (
        identity[1] if identity and identity[1] else dataset_identity(cfg.data, anc.arch.img_size, anc.arch.in_chans)
    )
    if ds.identity.removesuffix(":uint8-cache") != data_id:
        _load.cache_clear()
        anc, ds = _load(cfg.ancestry, fingerprint, cfg.data, cfg.data_cache_mb)
    return anc, ds


def run_shape_task(task: ShapeTask, env: TaskEnv) -> list[DeviceResult]:
    """Fine-tune ``task.shape`` once (``env.threads`` intra-op threads), then measure, export and
    assemble it for each device; a :class:`FactoryError` fails the devices it concerns, not the build.

    ``env.serial`` serialises measuring and exporting: ``torch.onnx.export`` and fvcore's tracing
    keep process-global state and fail when two threads run them at once. Fine-tuning stays parallel.
    """
    from factory.core.learngene import Learngene
    from factory.training.precision import intra_op_threads

    anc, ds = ancestry_and_data(task.cfg, task.identity)
    lg = Learngene.load(task.learngene_dir)
    if lg.sha256 != task.learngene_sha256:
        raise FactoryError(
            f"the learngene at {task.learngene_dir} is not the one the build made "
            f"({task.learngene_sha256[:12]}); is --out shared?"
        )
    out = Path(task.out)
    ctx = BuildContext(out, task.cfg, Cache(out / ".cache", env.log), env.log, anc, ds, lg, env.should_stop)
    try:
        with intra_op_threads(env.threads):
            if task.init_decision is not None:
                ctx.inits[task.shape.label()] = task.init_decision
            if task.finetune_s is not None:
                ctx.finetune_s[task.shape.label()] = task.finetune_s
            decide(ctx, task.shape)
            tuned = run_stage(ctx, FINETUNE, task.shape)
    except FactoryError as exc:
        env.log(f"finetune {task.shape.label()}: failed: {exc}")
        return task.failed(str(exc))
    results = []
    for device in task.devices:
        try:
            with env.serial if env.serial is not None else contextlib.nullcontext():
                results.append(finish_device(ctx, task, device, tuned))
        except FactoryError as exc:
            results.append(device.result.failed(str(exc)))
            env.log(f"{device.result.name}: failed: {exc}")
    return results


def finish_device(ctx: BuildContext, task: ShapeTask, device: DeviceTask, tuned: Entry) -> DeviceResult:
    """Measure and export one device's model, then write ``OUT/<device>/`` (model, export, model card);
    the device's result, built."""
    prof, entry = device.profile, device.result
    model_file = tuned.path / "model.safetensors"
    measure_entry = run_stage(ctx, MEASURE, ModelItem(task.shape, model_file))
    measured = measure_entry.info()
    facts = {"flops": measured["flops_fvcore"], "params": measured["params"]}  # counted once, by the measure stage
    exported = run_stage(ctx, EXPORT, ExportItem(prof.name, prof, entry["profile_sha256"], model_file, facts))
    export_record = json.loads((exported.path / "export" / "export.json").read_text())
    update = manifest.device_record(
        entry,
        finetune=tuned.info(),
        finetune_key=tuned.key,
        measured=measured,
        export_record=export_record,
        model_sha256=sha256_file(model_file),
        cfg=ctx.cfg,
        learngene_sha256=ctx.learngene.sha256,
        init_decision=ctx.inits.get(task.shape.label()),
        shipped_memory=shipped_memory(prof, ctx.ancestry.arch, task.shape, export_record.get("deploy") or {}),
    )
    # each stage's wall time when its entry was made (this run or the one that cached it), with the entry's key
    update["stage_seconds"] = {
        e.stage: [e.key, e.info().get(STAGE_SECONDS, 0.0)] for e in (tuned, measure_entry, exported)
    }
    device_dir = confined(ctx.out, prof.name, "profile name")
    with owned_directory(device_dir, "--out (its device folders)", writer="build") as tmp:
        shutil.copyfile(model_file, tmp / "model.safetensors")
        shutil.copytree(exported.path / "export", tmp / "export")
        try:
            write_timm_config(
                tmp,
                ctx.ancestry.arch.with_shape(task.shape),
                mean=ctx.data.mean,
                std=ctx.data.std,
                label_names=ctx.data.train.classes,
                **ctx.data.test.eval_config,  # the view the manifest's test accuracy was measured on
                license=task.head.get("license", "other"),
            )
            update["artifacts"]["timm_config"] = {
                "path": f"{prof.name}/config.json",
                "sha256": sha256_file(tmp / "config.json"),
            }
        except FactoryError as exc:
            ctx.log(f"{prof.name}: no timm config.json: {exc}")
        built = entry.built({**update, "perf_card": f"{prof.name}/perf.yaml"})
        card = perf_card(task.head, built.to_manifest(), tmp, host_facts())
        (tmp / "perf.yaml").write_text(yaml.safe_dump(card, sort_keys=False, width=120))
        (tmp / "MODEL_CARD.md").write_text(model_card.render(task.head, built.to_manifest()))
    return built
