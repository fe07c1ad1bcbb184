"""``export_model``: a descendant -> deployable artifacts, verified, with an ``export.json``.

Formats: ``onnx`` (FP32, always produced: the others derive from it), ``onnx-fp16``,
``onnx-int8`` (static QDQ calibrated on the task's training images; dynamic if none), ``openvino``
(FP32 IR; also measured with BF16 execution where the CPU has it, as ``openvino-bf16``),
``openvino-int8`` (NNCF post-training quantisation; :mod:`export.openvino_export`) and ``trt``.

Deployment choice. For CPU runtimes ``export.json``'s ``deploy`` names the fastest *verified*
artifact at the profile's batch on this host (for a TensorRT profile it is the engine or kit): FP32
artifacts verified against PyTorch (max abs diff <= 1e-4), reduced
precisions only if their test accuracy is within ``MAX_ACCURACY_DROP`` of FP32's.
For ``trt`` an engine is built here only when TensorRT and a GPU are present *and* the target is
this machine (no profile, or a ``measure: true`` profile such as ``host``); otherwise an
on-device build kit is written (:mod:`export.trt_kit`) and one line says so. ``require_engine`` turns
that case into an error.

Every artifact is written into a temporary sibling directory that replaces ``out_dir`` only when
all formats succeeded; ``export.json`` lists each artifact with its sha256, the verification
diffs, and for reduced precisions the validation accuracy and host latency against FP32.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from export.context import MAX_ACCURACY_DROP, ExportRun, verified_formats
from export.formats import FORMAT_NAMES, format_spec, with_requirements
from factory.core.ancestry import load_ancestry, read_checkpoint
from factory.core.checkpoint import INFO_METADATA_KEY
from factory.core.flops import count_flops, count_params
from factory.errors import FactoryError
from factory.io import MODEL_FILE, owned_directory, sha256_file
from factory.io.atomic import require_regular_file

from .onnx_export import OPSET, export_onnx

__all__ = [
    "MAX_ACCURACY_DROP",
    "ExportRun",
    "choose_deployment",
    "runtime_bound_deployment",
    "export_model",
    "installed_only",
    "parse_formats",
    "resolve_model_path",
    "verified_formats",
]


def resolve_model_path(model: str | Path) -> Path:
    """A run directory (``RUN/model.safetensors``) or a descendant ``.safetensors`` file."""
    path = Path(model)
    path = path / MODEL_FILE if path.is_dir() else path  # a run folder's model; 'not found' below when it has none
    if path.exists():  # a FIFO is named as one, not as "not found"
        require_regular_file(path, "model")
    if not path.is_file():
        raise FactoryError(
            f"model {model} not found: pass a run directory holding model.safetensors or a .safetensors file"
        )
    return path


def parse_formats(text: str | list[str], profile=None) -> list[str]:
    """Format names (:data:`export.formats.FORMAT_NAMES`); ``all`` is every format, or the profile's ``export``
    list when one is given (:func:`installed_only` drops, for ``all`` without a profile, those not installed). Empty
    items of a comma list (``onnx,trt,``) are ignored; no name at all is one line."""
    items = [item.strip() for item in (text.split(",") if isinstance(text, str) else list(text))]
    if not any(items):
        raise FactoryError(f"no export format given; choose from {', '.join(FORMAT_NAMES)} or all")
    out: list[str] = []
    for item in filter(None, items):
        if item == "all":
            out.extend(["onnx", *profile.export] if profile is not None else FORMAT_NAMES)
        elif item in FORMAT_NAMES:
            out.append(item)
        else:
            raise FactoryError(f"unknown export format {item!r}; choose from {', '.join(FORMAT_NAMES)} or all")
    return list(dict.fromkeys(out))


def _data_for(arch, data: str | None, calibration_images: int = 256, dataset=None, trained_on: str | None = None):
    """Validation/calibration images for accuracy and INT8 (None when the task has no data); a streamed
    folder's splits decoded up to :data:`factory.data.tensors.CHECK_BYTES` each (:func:`factory.data.in_memory`).
    ``dataset``: the task's data already loaded (a build's), used instead of loading ``data`` again. Without
    either, a 1-channel 10-class model is checked on ``digits`` only when it records no training data or was
    trained on it (``trained_on``: the data identity its checkpoint records); a model trained on anything else
    is not scored on data it never saw."""
    from factory.data import in_memory, load_dataset

    implicit = (
        arch.in_chans == 1 and arch.num_classes == 10 and (not trained_on or trained_on.startswith("sklearn-digits"))
    )
    spec = data or ("digits" if implicit else None)
    if spec is None and dataset is None:
        return None
    ds = dataset if dataset is not None else load_dataset(spec, img_size=arch.img_size, in_chans=arch.in_chans)
    if ds.num_classes != arch.num_classes:
        raise FactoryError(
            f"data {spec!r} has {ds.num_classes} classes but the model predicts {arch.num_classes}; pass --data the "
            "images the model was fine-tuned on (an ImageFolder of its classes)",
            param="data",
        )
    return in_memory(ds, train_images=calibration_images)


def export_model(
    model: str | Path,
    formats: list[str],
    out_dir: str | Path,
    *,
    profile=None,
    data: str | None = None,
    dataset=None,
    facts: dict[str, int] | None = None,
    require_engine: bool = False,
    calibration_images: int = 256,
    log=print,
    choose: Callable[[dict[str, dict[str, Any]], Any], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Export ``model`` to ``formats`` under ``out_dir`` (see the module docstring).

    ``choose(artifacts, arch)`` (``arch``: the model's own ArchConfig) replaces the host-timed
    :func:`choose_deployment` for a CPU runtime:
    the build and the CLI pass :func:`factory.device.deploy.chooser` for a profile that is not this machine,
    whose choice then comes from the profile's cost model (host timings do not transfer).

    ``dataset`` is ``data`` already loaded (a build passes its own, so the export does not load it again);
    ``facts`` the model's ``flops`` and ``params`` already counted (the build's measure stage), else counted here."""
    from export.runtime import ort_accuracy, ort_latency_ms, ort_session

    path = resolve_model_path(model)
    wanted = set(formats)
    specs = [format_spec(name) for name in with_requirements(formats, profile)]
    for spec in specs:
        if profile is not None and spec.runtime_only and spec.runtime != profile.hardware.runtime:
            raise FactoryError(
                f"profile {profile.name} runs {profile.hardware.runtime}, not {spec.runtime}; drop {spec.name} "
                f"from the formats (its formats: {', '.join(profile.export)})"
            )
    skipped = _unavailable(specs)  # a missing extra: the other formats are still written, the caller says so
    specs = [spec for spec in specs if spec.name not in skipped]
    for name, reason in skipped.items():
        log(f"{name}: not written: {reason}")
    anc = load_ancestry(path)
    net, arch = anc.model.eval(), anc.arch
    _, meta = read_checkpoint(path)
    info = json.loads(meta.get(INFO_METADATA_KEY, "{}"))
    wants_data = any(s.needs_data for s in specs) or data or dataset is not None
    ds = _data_for(arch, data, calibration_images, dataset, info.get("data")) if wants_data else None
    if ds is None and any(s.needs_data for s in specs):
        log(
            f"no task data: accuracy checks and INT8 calibration need it (the model was trained on "
            f"{info.get('data') or 'unrecorded data'}); pass data to check them"
        )
    batch = profile.batch if profile is not None else 1
    metadata = {
        "peg_factory.shape": arch.shape().to_dict(),
        "peg_factory.arch": arch.to_dict(),
        "peg_factory.learngene_sha256": info.get("learngene_sha256") or "",
        "peg_factory.init": info.get("method") or "",
        "peg_factory.profile": profile.name if profile is not None else "",
        "peg_factory.flops": facts["flops"] if facts else count_flops(net),
        "peg_factory.params": facts["params"] if facts else count_params(net),
        "peg_factory.preprocessing": {
            "size": arch.img_size,
            "channels": arch.in_chans,
            "mean": list(ds.mean) if ds is not None else None,
            "std": list(ds.std) if ds is not None else None,
        },
        "peg_factory.class_names": ds.train.classes if ds is not None else [str(i) for i in range(arch.num_classes)],
    }
    record: dict[str, Any] = {
        "model": str(path),
        "model_sha256": sha256_file(path),
        "opset": OPSET,
        "profile": profile.name if profile is not None else None,
        "artifacts": {},
    }
    out_dir = Path(out_dir)
    with owned_directory(out_dir, writer="export") as tmp:
        onnx_path = tmp / "model.onnx"
        check = export_onnx(
            net,
            onnx_path,
            img_size=arch.img_size,
            in_chans=arch.in_chans,
            metadata=metadata,
            verify_batch=max(2, batch),
        )
        record["artifacts"]["onnx"] = {
            "file": "model.onnx",
            "max_abs_diff": check["max_abs_diff"],
            "nodes": check["nodes"],
        }
        slim = (
            f", {check['nodes']['exported']} -> {check['nodes']['simplified']} nodes (onnxslim)"
            if "simplified" in check["nodes"]
            else ""
        )
        log(f"onnx: model.onnx verified against PyTorch (max abs diff {max(check['max_abs_diff'].values()):.2e}){slim}")
        fp32 = ort_session(onnx_path)
        x1 = np.random.default_rng(1).standard_normal(
            (1, arch.in_chans, arch.img_size, arch.img_size), dtype=np.float32
        )
        x32 = np.random.default_rng(2).standard_normal(
            (32, arch.in_chans, arch.img_size, arch.img_size), dtype=np.float32
        )
        fp32_stats = {
            "latency_ms_b1": ort_latency_ms(fp32, x1),
            "latency_ms_b32": ort_latency_ms(fp32, x32, repeats=10),
        }
        if ds is not None:
            fp32_stats["val_accuracy"] = ort_accuracy(fp32, ds.val.images.numpy(), ds.val.labels.numpy())
        record["artifacts"]["onnx"].update({k: round(v, 4) for k, v in fp32_stats.items()})
        calib = ds.train.images[:calibration_images].numpy() if ds is not None else None
        run = ExportRun(
            tmp,
            onnx_path,
            net,
            arch,
            ds,
            calib,
            x1,
            x32,
            fp32,
            dict(fp32_stats),
            profile,
            batch,
            log,
            require_engine=require_engine,
            artifacts=record["artifacts"],
        )
        for spec in specs:
            if spec.step is None:
                continue
            if any(need in skipped for need in spec.requires(profile)):
                skipped[spec.name] = (
                    f"needs {', '.join(n for n in spec.requires(profile) if n in skipped)}, not written"
                )
                continue
            try:
                record["artifacts"].update(spec.run(run))
            except FactoryError as exc:  # a converter that cannot lower an op, a check it fails: the rest go on
                if spec.name in wanted:  # requested: said, and the other formats still written
                    skipped[spec.name] = exc.message
                    if exc.param:  # the argument at fault, for the caller's one line (the CLI names its flag)
                        record.setdefault("skipped_params", {})[spec.name] = exc.param
                    log(f"{spec.name}: not written: {exc}")
                else:
                    raise
        if skipped:
            record["skipped"] = skipped

        for entry in record["artifacts"].values():
            for key in ("file", "dir"):
                if key in entry:
                    target = tmp / entry[key]
                    if target.is_file():
                        entry["sha256"] = sha256_file(target)
                    elif target.is_dir():
                        entry["files"] = {p.name: sha256_file(p) for p in sorted(target.iterdir())}
            if "weights" in entry:
                entry["weights_sha256"] = sha256_file(tmp / entry["weights"])
        record["deploy"] = runtime_bound_deployment(record["artifacts"], profile) or (
            choose(record["artifacts"], arch) if choose is not None else choose_deployment(record["artifacts"], batch)
        )
        if len(record["artifacts"]) > 1:
            log(f"deploy: {record['deploy']['format']} ({record['deploy']['reason']})")
        (tmp / "export.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def installed_only(formats: list[str]) -> tuple[list[str], dict[str, str]]:
    """``(formats whose tools are installed here, {left-out format: the one line naming its extra})``: what ``all``
    without a profile exports -- every format this environment can write (the LiteRT and ExecuTorch extras cannot
    share a venv, so no one environment writes every format); a profile's formats are its own and each is
    required."""
    missing = _unavailable([format_spec(name) for name in formats])
    return [name for name in formats if name not in missing], missing


def _unavailable(specs) -> dict[str, str]:
    """``{format: the one line naming its missing extra}`` of the formats whose tools are not installed."""
    missing = {}
    for spec in specs:
        try:
            spec.check_available()
        except FactoryError as exc:
            missing[spec.name] = str(exc)
    return missing


def skipped_error(record: dict[str, Any], where: str) -> FactoryError | None:
    """The one-line error for the formats an export could not write (``record["skipped"]``), None when all were;
    ``where`` names the folder that holds the ones it did write."""
    skipped = record.get("skipped") or {}
    if not skipped:
        return None
    first, reason = next(iter(skipped.items()))
    more = f" (and {', '.join(list(skipped)[1:])})" if len(skipped) > 1 else ""
    return FactoryError(
        f"{first}{more} not written: {reason}; the other formats ({', '.join(record['artifacts'])}) are in {where}",
        param=(record.get("skipped_params") or {}).get(first),
    )


def runtime_bound_deployment(artifacts: dict[str, dict[str, Any]], profile) -> dict[str, Any] | None:
    """For a profile whose runtime has its own artifact kind (:attr:`FormatSpec.runtime_only`: a TensorRT engine
    or its kit), that artifact (FP32 ONNX when it was not made): host timings say nothing of it. None otherwise."""
    from export.formats import FORMATS

    if profile is None:
        return None
    own = [name for name, spec in FORMATS.items() if spec.runtime_only and spec.runtime == profile.hardware.runtime]
    if not own:
        return None
    made = next((name for name in own if name in artifacts), "onnx")
    what = "; ".join(FORMATS[name].summary for name in own)
    return {
        "format": made,
        "reason": f"the profile's runtime is {profile.hardware.runtime}: {what}, from the verified ONNX; "
        "host timings do not transfer",
    }


def choose_deployment(artifacts: dict[str, dict[str, Any]], batch: int = 1) -> dict[str, Any]:
    """The fastest verified artifact at ``batch`` (1 or 32, the measured ones; nearest used).

    Verified: FP32 artifacts passed the PyTorch comparison (they would not exist otherwise);
    reduced-precision ones need a recorded accuracy within :data:`MAX_ACCURACY_DROP` of FP32's.
    """
    key = "latency_ms_b1" if batch < 8 else "latency_ms_b32"
    timed = {}
    for fmt in verified_formats(artifacts):
        lat = artifacts[fmt].get(key, artifacts[fmt].get("latency_ms_b1"))
        if lat is not None:
            timed[fmt] = lat
    if not timed:
        return {"format": "onnx", "reason": "no artifact was timed"}
    best = min(timed, key=timed.get)
    base = timed.get("onnx")
    speed = f", {base / timed[best]:.2f}x onnxruntime FP32" if base and best != "onnx" else ""
    return {
        "format": best,
        "latency_ms": timed[best],
        "batch": 1 if key.endswith("b1") else 32,
        "reason": f"fastest verified at batch {1 if key.endswith('b1') else 32}: {timed[best]:.3f} ms{speed}",
        "candidates_ms": timed,
    }
