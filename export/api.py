"""``export_model``: a descendant -> deployable artifacts, verified, with an ``export.json``.

Formats: ``onnx`` (FP32, always produced: the others derive from it), ``onnx-fp16``,
``onnx-int8`` (static QDQ calibrated on the task's training images; dynamic if none), ``openvino``
(FP32 IR; also measured with BF16 execution where the CPU has it, as ``openvino-bf16``),
``openvino-int8`` (NNCF post-training quantisation; :mod:`export.openvino_export`) and ``trt``.

Deployment choice. For CPU runtimes ``export.json``'s ``deploy`` names the fastest *verified*
artifact at the profile's batch on this host (for a TensorRT profile it is the engine or kit): FP32 artifacts verified against PyTorch (max abs diff <= 1e-4), reduced
precisions only if their test accuracy is within ``MAX_ACCURACY_DROP`` of FP32's.
For ``trt`` an engine is built here only when TensorRT and a GPU are present *and* the target is
this machine (no profile, or a ``measure: true`` profile such as ``host``); otherwise an
on-device build kit is written (:mod:`export.kit`) and one line says so. ``require_engine`` turns
that case into an error.

Every artifact is written into a temporary sibling directory that replaces ``out_dir`` only when
all formats succeeded; ``export.json`` lists each artifact with its sha256, the verification
diffs, and for reduced precisions the validation accuracy and host latency against FP32.
"""

from __future__ import annotations

import json
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from export.formats import FORMATS, OPENVINO_FORMATS
from factory.core.ancestry import load_ancestry, read_checkpoint
from factory.io import owned_directory, sha256_file
from factory.core.checkpoint import INFO_METADATA_KEY
from factory.errors import FactoryError
from factory.core.flops import count_flops, count_params

from .onnx_export import OPSET, export_onnx

MAX_ACCURACY_DROP = 0.01


def resolve_model_path(model: str | Path) -> Path:
    """A run directory (``RUN/model.safetensors``) or a descendant ``.safetensors`` file."""
    path = Path(model)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FactoryError(f"model {model} not found: pass a run directory holding model.safetensors or a .safetensors file")
    return path


def parse_formats(text: str | list[str], profile=None) -> list[str]:
    """Format names; ``all`` is every format, or the profile's ``export`` list when one is given."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for item in items:
        item = item.strip()
        if item == "all":
            out.extend(["onnx", *profile.export] if profile is not None else FORMATS)
        elif item in FORMATS:
            out.append(item)
        else:
            raise FactoryError(f"unknown export format {item!r}; choose from {', '.join(FORMATS)} or all")
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class ExportRun:
    """What every format's export step shares: the verified FP32 ONNX, its session, the task's data
    and the reference inputs (batch 1 and 32)."""

    tmp: Path  # the export directory being written
    onnx_path: Path
    net: Any  # the PyTorch model (eval mode)
    arch: Any  # its factory.core.shapes.ArchConfig
    ds: Any  # factory.data.Dataset, or None when the task has no data
    calib: np.ndarray | None  # calibration images for INT8
    x1: np.ndarray
    x32: np.ndarray
    fp32: Any  # onnxruntime session of the FP32 model
    profile: Any  # factory.device.profile.Profile, or None
    batch: int
    log: Callable[[str], None]


def _data_for(arch, data: str | None, calibration_images: int = 256):
    """Validation/calibration images for accuracy and INT8 (None when the task has no data); a streamed
    folder's splits decoded up to :data:`factory.data.tensors.CHECK_BYTES` each (:func:`factory.data.in_memory`)."""
    from factory.data import in_memory, load_dataset

    spec = data or ("digits" if arch.in_chans == 1 and arch.num_classes == 10 else None)
    if spec is None:
        return None
    ds = load_dataset(spec, img_size=arch.img_size, in_chans=arch.in_chans)
    if ds.num_classes != arch.num_classes:
        raise FactoryError(f"data {spec!r} has {ds.num_classes} classes but the model predicts {arch.num_classes}")
    return in_memory(ds, train_images=calibration_images)


def export_model(
    model: str | Path,
    formats: list[str],
    out_dir: str | Path,
    *,
    profile=None,
    data: str | None = None,
    require_engine: bool = False,
    calibration_images: int = 256,
    log=print,
    choose: Callable[[dict[str, dict[str, Any]], Any], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Export ``model`` to ``formats`` under ``out_dir`` (see the module docstring).

    ``choose(artifacts, arch)`` (``arch``: the model's own ArchConfig) replaces the host-timed :func:`choose_deployment` for a CPU runtime:
    the build and the CLI pass :func:`factory.device.deploy.chooser` for a profile that is not this machine,
    whose choice then comes from the profile's cost model (host timings do not transfer)."""
    from export.runtime import ort_accuracy, ort_latency_ms, ort_logits, ort_session

    path = resolve_model_path(model)
    if profile is not None and "trt" in formats and profile.hardware.runtime != "tensorrt":
        raise FactoryError(f"profile {profile.name} runs {profile.hardware.runtime}, not TensorRT; drop trt from --format "
                           f"(its formats: {', '.join(profile.export)})")
    anc = load_ancestry(path)
    net, arch = anc.model.eval(), anc.arch
    _, meta = read_checkpoint(path)
    info = json.loads(meta.get(INFO_METADATA_KEY, "{}"))
    if set(OPENVINO_FORMATS) & set(formats):
        from .openvino_export import require_openvino

        require_openvino()  # refuse before any work when the extra is missing
    ds = _data_for(arch, data, calibration_images) if {"onnx-int8", "onnx-fp16", "trt", *OPENVINO_FORMATS} & set(formats) or data else None
    batch = profile.batch if profile is not None else 1
    metadata = {
        "peg_factory.shape": arch.shape().to_dict(),
        "peg_factory.arch": arch.to_dict(),
        "peg_factory.learngene_sha256": info.get("learngene_sha256") or "",
        "peg_factory.init": info.get("method") or "",
        "peg_factory.profile": profile.name if profile is not None else "",
        "peg_factory.flops": count_flops(net),
        "peg_factory.params": count_params(net),
        "peg_factory.preprocessing": {
            "size": arch.img_size, "channels": arch.in_chans,
            "mean": list(ds.mean) if ds is not None else None, "std": list(ds.std) if ds is not None else None,
        },
        "peg_factory.class_names": ds.train.classes if ds is not None else [str(i) for i in range(arch.num_classes)],
    }
    record: dict[str, Any] = {"model": str(path), "model_sha256": sha256_file(path), "opset": OPSET,
                              "profile": profile.name if profile is not None else None, "artifacts": {}}
    out_dir = Path(out_dir)
    with owned_directory(out_dir, writer="export") as tmp:
        onnx_path = tmp / "model.onnx"
        check = export_onnx(net, onnx_path, img_size=arch.img_size, in_chans=arch.in_chans, metadata=metadata,
                            verify_batch=max(2, batch))
        record["artifacts"]["onnx"] = {"file": "model.onnx", "max_abs_diff": check["max_abs_diff"], "nodes": check["nodes"]}
        slim = (f", {check['nodes']['exported']} -> {check['nodes']['simplified']} nodes (onnxslim)"
                if "simplified" in check["nodes"] else "")
        log(f"onnx: model.onnx verified against PyTorch (max abs diff {max(check['max_abs_diff'].values()):.2e}){slim}")
        fp32 = ort_session(onnx_path)
        x1 = np.random.default_rng(1).standard_normal((1, arch.in_chans, arch.img_size, arch.img_size), dtype=np.float32)
        x32 = np.random.default_rng(2).standard_normal((32, arch.in_chans, arch.img_size, arch.img_size), dtype=np.float32)
        val_x = ds.val.images.numpy() if ds is not None else None
        val_y = ds.val.labels.numpy() if ds is not None else None
        fp32_stats = {"latency_ms_b1": ort_latency_ms(fp32, x1), "latency_ms_b32": ort_latency_ms(fp32, x32, repeats=10)}
        if ds is not None:
            fp32_stats["val_accuracy"] = ort_accuracy(fp32, val_x, val_y)
        record["artifacts"]["onnx"].update({k: round(v, 4) for k, v in fp32_stats.items()})
        calib = ds.train.images[:calibration_images].numpy() if ds is not None else None

        if "onnx-fp16" in formats:
            from .quantize import to_fp16

            to_fp16(onnx_path, tmp / "model.fp16.onnx")
            sess = ort_session(tmp / "model.fp16.onnx")
            diff = float(np.abs(ort_logits(sess, x32) - ort_logits(fp32, x32)).max())
            entry = {"file": "model.fp16.onnx", "max_abs_diff_vs_fp32": round(diff, 5),
                     "latency_ms_b1": round(ort_latency_ms(sess, x1), 4)}
            if ds is not None:
                entry["val_accuracy"] = round(ort_accuracy(sess, val_x, val_y), 4)
            record["artifacts"]["onnx-fp16"] = entry
            log(f"onnx-fp16: model.fp16.onnx (max abs diff vs fp32 {diff:.3g})")

        int8_path = None
        if "onnx-int8" in formats or ("trt" in formats and profile is not None and profile.precision == "int8"):
            from .quantize import to_int8

            int8_path, mode = to_int8(onnx_path, tmp / "model.int8.onnx", calib)
            sess = ort_session(int8_path)
            entry = {"file": "model.int8.onnx", "mode": mode, "calibration_images": 0 if calib is None else len(calib),
                     "latency_ms_b1": round(ort_latency_ms(sess, x1), 4),
                     "latency_ms_b32": round(ort_latency_ms(sess, x32, repeats=10), 4)}
            if ds is not None:
                entry["val_accuracy"] = round(ort_accuracy(sess, val_x, val_y), 4)
                entry["accuracy_drop_vs_fp32"] = round(fp32_stats["val_accuracy"] - entry["val_accuracy"], 4)
            record["artifacts"]["onnx-int8"] = entry
            fp32_acc = round(fp32_stats["val_accuracy"], 4) if "val_accuracy" in fp32_stats else "n/a"
            log(f"onnx-int8: model.int8.onnx ({mode}), accuracy {entry.get('val_accuracy', 'n/a')} vs fp32 {fp32_acc}, "
                f"b1 {entry['latency_ms_b1']:.3f} ms vs {fp32_stats['latency_ms_b1']:.3f} ms")

        run = ExportRun(tmp, onnx_path, net, arch, ds, calib, x1, x32, fp32, profile, batch, log)
        if set(OPENVINO_FORMATS) & set(formats):
            record["artifacts"].update(_openvino(run, int8="openvino-int8" in formats))

        if "trt" in formats:
            record["artifacts"]["trt"] = _trt(run, int8_path, require_engine=require_engine)

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
        if profile is not None and profile.hardware.runtime == "tensorrt":
            record["deploy"] = {"format": "trt" if "trt" in record["artifacts"] else "onnx",
                                "reason": "the profile's runtime is TensorRT: an engine (or trt_kit/ on the device) from the "
                                          "verified ONNX; host timings do not transfer"}
        elif choose is not None:
            record["deploy"] = choose(record["artifacts"], arch)
        else:
            record["deploy"] = choose_deployment(record["artifacts"], batch)
        if len(record["artifacts"]) > 1:
            log(f"deploy: {record['deploy']['format']} ({record['deploy']['reason']})")
        (tmp / "export.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def verified_formats(artifacts: dict[str, dict[str, Any]]) -> list[str]:
    """The artifacts a deployment may use: FP32 ones (verified against PyTorch, or they would not exist) and
    reduced-precision ones whose recorded accuracy is within :data:`MAX_ACCURACY_DROP` of FP32's."""
    fp32_acc = artifacts.get("onnx", {}).get("test_accuracy", artifacts.get("onnx", {}).get("val_accuracy"))
    out = []
    for fmt, art in artifacts.items():
        acc = art.get("test_accuracy", art.get("val_accuracy"))
        exact = fmt in ("onnx", "openvino")
        if exact or (acc is not None and fp32_acc is not None and fp32_acc - acc <= MAX_ACCURACY_DROP):
            out.append(fmt)
    return out


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
    return {"format": best, "latency_ms": timed[best], "batch": 1 if key.endswith("b1") else 32,
            "reason": f"fastest verified at batch {1 if key.endswith('b1') else 32}: {timed[best]:.3f} ms{speed}",
            "candidates_ms": timed}


def _openvino(run: ExportRun, *, int8: bool) -> dict[str, dict]:
    """FP32 IR (+ BF16 execution where supported) and, with ``int8``, the NNCF INT8 IR, each verified and timed."""
    import torch

    from export.runtime import ort_accuracy

    from .openvino_export import (benchmark_app_command, cpu_supports_bf16, inference_precision, ov_accuracy, ov_compile,
                                  ov_latency_stats, ov_logits, to_openvino, to_openvino_int8)

    tmp, ds, x1, x32, log = run.tmp, run.ds, run.x1, run.x32, run.log
    out: dict[str, dict] = {}
    test_x = ds.test.images.numpy() if ds is not None else None
    test_y = ds.test.labels.numpy() if ds is not None else None
    fp32_test = ort_accuracy(run.fp32, test_x, test_y) if ds is not None else None
    with torch.no_grad():
        reference = run.net(torch.from_numpy(x32)).numpy()
    xml = to_openvino(run.onnx_path, tmp / "model.xml")

    def measure(fmt: str, compiled, entry: dict) -> dict:
        """Latency (median, p90, the host's load while timing) and accuracy at the precision that runs."""
        import os

        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        b1, b32 = ov_latency_stats(compiled, x1), ov_latency_stats(compiled, x32, repeats=10)
        running = inference_precision(compiled)
        entry.update(latency_ms_b1=round(b1["median"], 4), latency_ms_b1_p90=round(b1["p90"], 4),
                     latency_ms_b32=round(b32["median"], 4), latency_ms_b32_p90=round(b32["p90"], 4),
                     host_load_1min=round(load, 2) if load is not None else None, inference_precision=running,
                     benchmark_app=" ".join(benchmark_app_command(entry["file"], (run.batch, *x1.shape[1:]), running)))
        if ds is not None:
            entry["test_accuracy"] = round(ov_accuracy(compiled, test_x, test_y), 4)
            entry["accuracy_drop_vs_fp32"] = round(fp32_test - entry["test_accuracy"], 4)
        log(f"{fmt}: {entry['file']} ({running}) b1 {entry['latency_ms_b1']:.3f} ms (p90 {entry['latency_ms_b1_p90']:.3f}), "
            f"accuracy {entry.get('test_accuracy', 'n/a')} (fp32 {round(fp32_test, 4) if fp32_test is not None else 'n/a'})")
        return entry

    compiled = ov_compile(xml, precision="f32")
    diff = float(np.abs(ov_logits(compiled, x32) - reference).max())
    if diff > 1e-4:
        raise FactoryError(f"OpenVINO FP32 output differs from PyTorch by {diff:.3g} (> 1e-4); not exported")
    out["openvino"] = measure("openvino", compiled, {"file": "model.xml", "weights": "model.bin", "max_abs_diff_vs_pytorch": diff})
    if cpu_supports_bf16():
        bf16 = ov_compile(xml, precision="bf16")
        entry = {"file": "model.xml", "weights": "model.bin", "execution_precision": "bf16",
                 "max_abs_diff_vs_pytorch": round(float(np.abs(ov_logits(bf16, x32) - reference).max()), 5)}
        out["openvino-bf16"] = measure("openvino-bf16", bf16, entry)
    else:
        log("openvino-bf16: this CPU has no BF16 support; FP32 execution only")
    if int8:
        to_openvino_int8(xml, tmp / "model.int8.xml", run.calib)
        entry = {"file": "model.int8.xml", "weights": "model.int8.bin", "calibration_images": len(run.calib)}
        out["openvino-int8"] = measure("openvino-int8", ov_compile(tmp / "model.int8.xml"), entry)
    if fp32_test is not None:
        out["openvino"]["fp32_onnxruntime_test_accuracy"] = round(fp32_test, 4)
    return out


def _trt(run: ExportRun, int8_path: Path | None, *, require_engine: bool) -> dict:
    """Build an engine here, or write the on-device kit, from the typed ONNX of the profile's precision
    (``int8_path``: the Q/DQ model, for INT8 profiles; FP16 is made here)."""
    from .quantize import to_fp16

    tmp, onnx_path, profile = run.tmp, run.onnx_path, run.profile
    precision = profile.precision if profile is not None else "fp16"
    typed = {"fp32": onnx_path, "int8": int8_path}.get(precision)
    scratch = None
    if precision == "int8" and run.calib is None:
        raise FactoryError("a TensorRT INT8 build needs a Q/DQ model calibrated on task images: pass --data (an ImageFolder "
                           "or a built-in set of the model's classes)")
    if precision == "fp16":
        typed = tmp / "model.fp16.onnx"  # the onnx-fp16 artifact when it was asked for, else made for the kit only
        if not typed.is_file():
            typed = scratch = tmp / ".kit.fp16.onnx"
            to_fp16(onnx_path, typed)
    try:
        return _trt_engine_or_kit(run, typed, precision, require_engine=require_engine)
    finally:
        if scratch is not None:
            scratch.unlink(missing_ok=True)


def _trt_engine_or_kit(run: ExportRun, typed: Path, precision: str, *, require_engine: bool) -> dict:
    from export.runtime import ort_logits

    from .kit import TYPED_MODEL, write_kit
    from .tensorrt_build import tensorrt_available

    tmp, onnx_path, fp32, arch, profile, batch, log = run.tmp, run.onnx_path, run.fp32, run.arch, run.profile, run.batch, run.log
    available, why = tensorrt_available()
    here = profile is None or profile.hardware.measure
    if available and here:
        from .tensorrt_build import build_engine, run_engine

        engine = build_engine(typed, tmp / f"model.{precision}.engine", batch=(1, batch, batch),
                              input_shape=(arch.in_chans, arch.img_size, arch.img_size), timing_cache=tmp / "timing.cache")
        x = np.random.default_rng(3).standard_normal((batch, arch.in_chans, arch.img_size, arch.img_size), dtype=np.float32)
        diff = float(np.abs(run_engine(engine, x) - ort_logits(fp32, x)).max())
        log(f"trt: built {engine.name} here, strongly typed from {TYPED_MODEL[precision]} "
            f"(max abs diff vs onnxruntime {diff:.3g})")
        return {"kind": "engine", "file": engine.name, "precision": precision, "strongly_typed": True,
                "max_abs_diff_vs_onnxruntime": diff}
    reason = why if not available else f"the target {profile.name} is not this machine (engines only run where they were built)"
    if require_engine:
        raise FactoryError(f"--require-engine: no TensorRT engine can be built here: {reason}")
    refs_in, refs_out = {}, {}
    for b in sorted({1, batch}):  # batch 1 and the opt batch of the engine's profile
        refs_in[b] = np.random.default_rng(10 + b).standard_normal((b, arch.in_chans, arch.img_size, arch.img_size), dtype=np.float32)
        refs_out[b] = ort_logits(fp32, refs_in[b])
    typed_check = _typed_check(typed, fp32, refs_in[batch], run) if precision != "fp32" else {}
    write_kit(tmp / "trt_kit", onnx_fp32=onnx_path, precision=precision, in_chans=arch.in_chans, img_size=arch.img_size,
              batch=batch, reference_inputs=refs_in, reference_outputs=refs_out, onnx_typed=typed,
              target=profile.name if profile is not None else "")
    log(f"trt: wrote an on-device build kit (trt_kit/build_engine.sh, strongly typed from {TYPED_MODEL[precision]}), "
        f"no engine built here: {reason}")
    return {"kind": "kit", "dir": "trt_kit", "precision": precision, "typed_model": TYPED_MODEL[precision],
            "reason": reason, **typed_check}


def _typed_check(typed: Path, fp32, x: np.ndarray, run: ExportRun) -> dict:
    """The kit's typed model checked here with onnxruntime: logits against FP32's, and the accuracy
    delta on the task's validation images when there are any."""
    from export.runtime import ort_accuracy, ort_logits, ort_session

    sess = ort_session(typed)
    check = {"typed_max_abs_diff_vs_fp32": round(float(np.abs(ort_logits(sess, x) - ort_logits(fp32, x)).max()), 5)}
    if run.ds is not None:
        val_x, val_y = run.ds.val.images.numpy(), run.ds.val.labels.numpy()
        typed_acc, fp32_acc = ort_accuracy(sess, val_x, val_y), ort_accuracy(fp32, val_x, val_y)
        check.update(typed_val_accuracy=round(typed_acc, 4), typed_accuracy_drop_vs_fp32=round(fp32_acc - typed_acc, 4))
    return check
