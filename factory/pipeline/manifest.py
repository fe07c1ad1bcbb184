"""The build manifest, assembled: its build-wide head, one entry per device, and how it is written.

Schema: :data:`factory.pipeline.manifest_schema.MANIFEST_SCHEMA`. The report
(:mod:`factory.pipeline.report`) and the model cards (:mod:`factory.pipeline.model_card`) are
rendered from the manifest alone. A device's entry is its
:meth:`~factory.pipeline.device_result.DeviceResult.to_manifest`: the profile, the search and selection
(:mod:`factory.pipeline.device_choice`), then :func:`device_record` (fine-tune, measurements,
artifacts) from the shape task that built it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.formats import format_spec
from factory._version import __version__
from factory.errors import FactoryError
from factory.io import atomic_write_bytes, confined, content_key, sha256_file
from factory.pipeline.config import BuildConfig, build_learngene_recipe, identity, learngene_fingerprint
from factory.pipeline.device_result import profile_hash
from factory.pipeline.manifest_schema import MANIFEST_SCHEMA

#: At most this many rejected shapes are kept per device for the report's plot.
REJECTED_POINTS = 400


def tool_versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {"peg-factory": __version__}
    for name in ("torch", "timm", "onnx", "onnxruntime", "fvcore", "tensorrt"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def search_summary(result, chosen) -> dict[str, Any]:
    """What a device's manifest keeps of its search: counts, and the points the report plots
    (``[latency_ms, capacity score]`` of the Pareto front, a sample of the rejected, the chosen)."""
    point = lambda c: [round(c.latency_ms, 5), round(c.score, 4)]  # noqa: E731
    return {
        "evaluated": result.evaluated,
        "feasible": len(result.feasible),
        "rejected": len(result.rejected),
        "front": [point(c) for c in result.pareto],
        "rejected_points": [point(c) for c in result.rejected[:REJECTED_POINTS]],
        "chosen": point(chosen),
    }


def artifact_entries(name: str, export_record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A device's export artifacts as the manifest lists them: path, and the fields each format declares."""
    out = {}
    for fmt, art in export_record["artifacts"].items():
        keep = format_spec(fmt).manifest_fields  # each format declares the export.json fields the manifest keeps
        out[fmt] = {
            "path": f"{name}/export/{art.get('file') or art.get('dir') or art.get('package')}",
            **{k: v for k, v in art.items() if k in keep},
        }
    return out


def shipped_latency(deploy: dict[str, Any], predicted_ms: float, this_host: bool) -> dict[str, Any]:
    """The latency of the artifact that ships (``deploy``), which every latency verdict is about: its prediction
    on the target by the profile's cost model at that artifact's runtime and precision (a CPU target's deploy
    choice); on a target that is this machine, its measured time; else (a runtime-bound artifact such as a
    TensorRT engine, built at the profile's precision) the search's prediction at the profile's precision. The
    search's ``predicted_target`` is for the profile's precision, which need not be what ships (an INT8 that
    failed its accuracy check ships FP32)."""
    fmt = deploy.get("format", "onnx")
    if deploy.get("latency_ms_predicted") is not None:
        return {"ms": deploy["latency_ms_predicted"], "format": fmt, "basis": "predicted on the target for it"}
    if this_host and deploy.get("latency_ms") is not None:
        return {"ms": deploy["latency_ms"], "format": fmt, "basis": "measured on this machine, the target"}
    return {"ms": predicted_ms, "format": fmt, "basis": "predicted on the target at the profile's precision"}


def shipped_margins(
    margins: dict[str, float],
    budgets: dict[str, float],
    shipped: dict[str, Any],
    memory: dict[str, Any] | None = None,
) -> dict[str, float]:
    """The search's margins with the latency budget's re-read for the shipped artifact, ``(budget - ms) / budget``,
    and the memory one for its precision (``memory``: :func:`factory.device.deploy.shipped_memory`),
    ``(limit - mb) / limit``."""
    out = dict(margins)
    if budgets.get("latency_ms"):
        out["latency_ms"] = round((budgets["latency_ms"] - shipped["ms"]) / budgets["latency_ms"], 4)
    if memory and "memory_mb" in out and memory.get("limit_mb"):
        out["memory_mb"] = round((memory["limit_mb"] - memory["mb"]) / memory["limit_mb"], 4)
    return out


def device_record(
    entry,
    *,
    finetune: dict[str, Any],
    finetune_key: str,
    measured: dict[str, Any],
    export_record: dict[str, Any],
    model_sha256: str,
    cfg: BuildConfig,
    learngene_sha256: str,
    init_decision: dict[str, Any] | None = None,
    shipped_memory: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A built device's manifest fields, from its :class:`~factory.pipeline.device_result.DeviceResult` so far
    (``entry``: ``name``, ``predicted``), the
    fine-tune's and measure stage's sealed info, the export record and, for ``--init auto``, the
    decision (``init_decision``: chosen, reason, k-NN figures, seconds; with the decision's cost as a
    fraction of the fine-tune's)."""
    name, predicted = entry["name"], entry["predicted"]
    this_host = bool((entry.get("target") or {}).get("this_host"))
    shipped = shipped_latency(export_record.get("deploy") or {}, predicted["latency_ms"], this_host)
    artifacts = {
        "model": {"path": f"{name}/model.safetensors", "sha256": model_sha256},
        **artifact_entries(name, export_record),
    }
    return {
        "init": finetune.get("init", cfg.init),
        "init_requested": cfg.init,
        **(
            {
                "init_decision": {
                    **init_decision,
                    "fraction_of_finetune": round(init_decision["seconds"] / max(finetune["seconds"], 1e-9), 4),
                }
            }
            if init_decision
            else {}
        ),
        "learngene_sha256": learngene_sha256,
        "finetune": {
            "steps": (finetune.get("config") or {}).get("steps", cfg.finetune_steps),
            **({"config": finetune["config"]} if finetune.get("config") else {}),  # the TrainConfig that ran
            **({"pace": finetune["pace"]} if finetune.get("pace") else {}),  # a time budget's (factory.pipeline.pacing)
            # --keep-weights best-val: the step whose weights shipped (the best validation accuracy)
            **({"kept_step": finetune["kept_step"]} if finetune.get("kept_step") is not None else {}),
            "seed": cfg.seed,
            "cache_key": finetune_key,
            "seconds": finetune["seconds"],
            "precision": finetune.get("precision", "fp32"),
            "curve": finetune.get("curve", []),
        },
        "accuracy": {
            "val": finetune["val_accuracy"],
            "test": finetune["test_accuracy"],
            **({"confusion": finetune["confusion"]} if finetune.get("confusion") else {}),
        },
        "flops": {"fvcore": measured["flops_fvcore"], "closed_form_g": predicted["flops_g"]},
        "params": measured["params"],
        "latency_ms": {
            "predicted_target": predicted["latency_ms"],
            "host_onnxruntime": measured["host_latency_ms_onnxruntime"],
            "shipped": shipped,
        },
        "memory_mb": {
            "predicted_target": predicted["memory_mb"],
            **({"shipped": shipped_memory} if shipped_memory else {}),
        },
        "margins": shipped_margins(predicted["margins"], entry.get("budgets") or {}, shipped, shipped_memory),
        "artifacts": artifacts,
        "deploy": export_record.get("deploy"),
        # the profile's formats the export could not write (a missing extra, a converter that cannot lower an op)
        **({"formats_not_written": export_record["skipped"]} if export_record.get("skipped") else {}),
        "model_card": f"{name}/MODEL_CARD.md",
    }


def head(cfg: BuildConfig, anc, lg, ds, lg_key: str, names: list[str]) -> dict[str, Any]:
    """The build-wide part of the manifest: ancestry, learngene, data, recipe, tools."""
    from factory.data import dataset_identity

    return {
        "format_version": 1,
        "ancestry": {**anc.identity(), **({"base_model": anc.hub_id} if anc.hub_id else {})},
        "ancestry_arch": anc.arch.to_dict(),
        "learngene": {
            "sha256": lg.sha256,
            "layers": lg.num_layers,
            "heads": lg.num_heads,
            "seed": cfg.gene_seed,
            "recipe": build_learngene_recipe(cfg, anc),
            "cache_key": lg_key,
            "sampled_once_for": names,
        },
        "data": {
            "spec": cfg.data,
            "identity": ds.identity,
            "classes": ds.train.classes,
            "test_split": ds.test_from,
            "notes": list(ds.notes),
            "identity_key": dataset_identity(cfg.data, anc.arch.img_size, anc.arch.in_chans),
        },
        "recipe": identity(cfg),
        "tools": tool_versions(),
        # the demo ancestry is the project's own (Apache-2.0); a user's ancestry brings its own terms
        "license": "apache-2.0" if anc.spec == "demo" else "other",
    }


def build_key(profiles, cfg: BuildConfig, ancestry_fingerprint: str) -> str:
    """What decides "nothing to do": the profiles' bytes, the settings that make the models, the ancestry's
    weights, and a given learngene's tensors."""
    return content_key(
        [profile_hash(p) for p in profiles], identity(cfg), ancestry_fingerprint, learngene_fingerprint(cfg)
    )


def previous(out: Path, key: str) -> dict[str, Any] | None:
    """The manifest in ``out`` if it was made from the inputs ``key`` names and its artifacts are intact."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("build_key") != key:
        return None
    for dev in manifest.get("devices", []):
        for art in dev.get("artifacts", {}).values():
            target = out / art["path"]
            if not target.exists() or ("sha256" in art and target.is_file() and sha256_file(target) != art["sha256"]):
                return None
    return manifest


def assemble(
    head_part: dict[str, Any], *, key: str, devices: list[dict[str, Any]], executor: dict[str, Any], seconds: float
) -> dict[str, Any]:
    return {
        **head_part,
        "build_key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "executor": executor,  # where the shape tasks ran (not part of the build's identity)
        "seconds": round(seconds, 2),
        # the learngene's and the fine-tunes' own time from their cache entries: a resumed or partly cached build
        # spent it over several runs, of which ``seconds`` is the last
        "stage_seconds": round(stage_seconds(head_part, devices), 2),
        "devices": devices,
    }


def stage_seconds(head_part: dict[str, Any], devices: list[dict[str, Any]]) -> float:
    """The learngene stage's seconds plus each distinct fine-tune's (a shared shape counted once)."""
    finetunes = {
        d["finetune"]["cache_key"]: d["finetune"].get("seconds", 0.0)
        for d in devices
        if d.get("status") == "ok" and isinstance(d.get("finetune"), dict)
    }
    return float((head_part.get("learngene") or {}).get("seconds") or 0.0) + sum(finetunes.values())


def write(out: Path, manifest: dict[str, Any]) -> None:
    """``manifest.json`` and ``manifest.schema.json``, each atomically."""
    atomic_write_bytes(out / "manifest.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    atomic_write_bytes(out / "manifest.schema.json", (json.dumps(MANIFEST_SCHEMA, indent=2) + "\n").encode())


@dataclass(frozen=True)
class BuiltDevice:
    """A device of a finished build, as ``peg-factory export`` needs it: checked against the manifest."""

    name: str
    error: str | None  # why its build failed (then nothing else is set)
    model: Path | None = None
    profile: object | None = None  # factory.device.profile.Profile


def built_devices(path: Path, *, check_models: bool = True) -> list[BuiltDevice]:
    """The devices of the build whose manifest is ``path``, each model confined to the build folder and
    (``check_models``) its sha256 compared with the manifest's; the profile from the manifest itself, so
    it does not matter where the command runs. Anything malformed or changed is one line."""
    from factory.device.profile import Profile, load_profile

    base = path.parent
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FactoryError(
            f"{path} is not a peg-factory build manifest ({' '.join(str(exc).split())[:120]}); pass --model"
        ) from exc
    devices = data.get("devices") if isinstance(data, dict) else None
    if not isinstance(devices, list):
        raise FactoryError(f"{path} is not a peg-factory build manifest (no devices list); pass --model")
    out = []
    for i, dev in enumerate(devices):
        where = f"{path}: devices[{i}]"
        if not isinstance(dev, dict) or not isinstance(dev.get("name"), str):
            raise FactoryError(f"{where} is not a device entry (an object with a name); rebuild, or pass --model")
        if dev.get("status") != "ok":
            out.append(BuiltDevice(dev["name"], str(dev.get("error") or "its build failed")))
            continue
        model = (dev.get("artifacts") or {}).get("model") if isinstance(dev.get("artifacts"), dict) else None
        if not isinstance(model, dict) or not isinstance(model.get("path"), str):
            raise FactoryError(f"{where} ({dev['name']}) names no model artifact with a path; rebuild, or pass --model")
        file = confined(base, model["path"], f"{where}: model path")
        if not isinstance(model.get("sha256"), str):
            raise FactoryError(
                f"{where} ({dev['name']}): its model has no sha256 to check it by; rebuild, or pass --model"
            )
        if not file.is_file():
            raise FactoryError(f"{where} ({dev['name']}): its model {file} is missing; rebuild, or pass --model")
        if check_models and sha256_file(file) != model["sha256"]:
            raise FactoryError(
                f"{file} is not the model the build made (its sha256 differs from the manifest's: changed or "
                "swapped since); rebuild, or pass --model to export that file anyway"
            )
        try:
            profile = (
                Profile.model_validate(dev["profile_data"])
                if isinstance(dev.get("profile_data"), dict)
                else load_profile(str(dev.get("profile")))
            )
        except (ValueError, TypeError) as exc:
            raise FactoryError(
                f"{where} ({dev['name']}): its profile cannot be read back ({' '.join(str(exc).split())[:160]}); "
                "rebuild, or pass --profile"
            ) from exc
        out.append(BuiltDevice(dev["name"], None, file, profile))
    return out


def build_data(path: Path) -> str | None:
    """The data spec the build whose manifest is ``path`` was made with (None when it does not say)."""
    try:
        data = json.loads(path.read_text()).get("recipe", {}).get("data")
    except (OSError, ValueError, AttributeError):
        return None
    return data if isinstance(data, str) else None


def refresh_export(path: Path, device: str, export_record: dict[str, Any]) -> None:
    """After ``peg-factory export`` rewrote ``device``'s ``export/`` folder in the build whose manifest is
    ``path``: its artifacts and deploy choice in the manifest, so the listed hashes stay true."""
    manifest = json.loads(path.read_text())
    for dev in manifest.get("devices", []):
        if dev.get("name") == device and isinstance(dev.get("artifacts"), dict):
            prefix = f"{device}/export/"
            kept = {k: v for k, v in dev["artifacts"].items() if not str(v.get("path", "")).startswith(prefix)}
            dev["artifacts"] = {**kept, **artifact_entries(device, export_record)}
            dev["deploy"] = export_record.get("deploy")
    write(path.parent, manifest)
