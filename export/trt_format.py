"""The ``trt`` format's export step: a TensorRT engine built here, or the on-device build kit
(:mod:`export.trt_kit`), from the typed ONNX model of the profile's precision.

An engine is built here only when TensorRT and a GPU are present *and* the target is this machine (no
profile, or a ``measure: true`` profile such as ``host``); otherwise the kit is written and one line says
so. ``require_engine`` turns that case into an error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.context import ExportRun
from factory.errors import FactoryError


def export_trt(run: ExportRun) -> dict[str, dict]:
    """Engine or kit, from the typed ONNX of the profile's precision (INT8: ``onnx-int8``'s Q/DQ model, made
    first by the registry's ``requires``; FP16 is made here when ``onnx-fp16`` was not asked for)."""
    from .quantize import to_fp16

    precision = run.profile.precision if run.profile is not None else "fp16"
    int8 = run.artifacts.get("onnx-int8")
    typed = {"fp32": run.onnx_path, "int8": run.tmp / int8["file"] if int8 else None}.get(precision)
    scratch = None
    if precision == "int8" and run.calib is None:
        raise FactoryError(
            "a TensorRT INT8 build needs a Q/DQ model calibrated on task images: pass an ImageFolder or a built-in "
            "set of the model's classes",
            param="data",
        )
    if precision == "fp16":
        typed = run.tmp / "model.fp16.onnx"  # the onnx-fp16 artifact when it was asked for, else made for the kit only
        if not typed.is_file():
            typed = scratch = run.tmp / ".kit.fp16.onnx"
            to_fp16(run.onnx_path, typed)
    try:
        return {"trt": _engine_or_kit(run, typed, precision)}
    finally:
        if scratch is not None:
            scratch.unlink(missing_ok=True)


def _engine_or_kit(run: ExportRun, typed: Path, precision: str) -> dict:
    from export.runtime import ort_logits

    from .tensorrt_build import tensorrt_available
    from .trt_kit import TYPED_MODEL, write_kit

    arch, profile, batch, log = run.arch, run.profile, run.batch, run.log
    available, why = tensorrt_available()
    here = profile is None or profile.hardware.measure
    if available and here:
        from .tensorrt_build import build_engine, run_engine

        engine = build_engine(
            typed,
            run.tmp / f"model.{precision}.engine",
            batch=(1, batch, batch),
            input_shape=(arch.in_chans, arch.img_size, arch.img_size),
            timing_cache=run.tmp / "timing.cache",
        )
        x = np.random.default_rng(3).standard_normal(
            (batch, arch.in_chans, arch.img_size, arch.img_size), dtype=np.float32
        )
        diff = float(np.abs(run_engine(engine, x) - ort_logits(run.fp32, x)).max())
        log(
            f"trt: built {engine.name} here, strongly typed from {TYPED_MODEL[precision]} "
            f"(max abs diff vs onnxruntime {diff:.3g})"
        )
        return {
            "kind": "engine",
            "file": engine.name,
            "precision": precision,
            "strongly_typed": True,
            "max_abs_diff_vs_onnxruntime": diff,
        }
    reason = (
        why
        if not available
        else f"the target {profile.name} is not this machine (engines only run where they were built)"
    )
    if run.require_engine:
        raise FactoryError(f"no TensorRT engine can be built here: {reason}", param="require_engine")
    refs_in, refs_out = {}, {}
    for b in sorted({1, batch}):  # batch 1 and the opt batch of the engine's profile
        refs_in[b] = np.random.default_rng(10 + b).standard_normal(
            (b, arch.in_chans, arch.img_size, arch.img_size), dtype=np.float32
        )
        refs_out[b] = ort_logits(run.fp32, refs_in[b])
    typed_check = _typed_check(typed, refs_in[batch], run) if precision != "fp32" else {}
    write_kit(
        run.tmp / "trt_kit",
        onnx_fp32=run.onnx_path,
        precision=precision,
        in_chans=arch.in_chans,
        img_size=arch.img_size,
        batch=batch,
        reference_inputs=refs_in,
        reference_outputs=refs_out,
        onnx_typed=typed,
        target=profile.name if profile is not None else "",
    )
    log(
        f"trt: wrote an on-device build kit (trt_kit/build_engine.sh, strongly typed from {TYPED_MODEL[precision]}), "
        f"no engine built here: {reason}"
    )
    return {
        "kind": "kit",
        "dir": "trt_kit",
        "precision": precision,
        "typed_model": TYPED_MODEL[precision],
        "reason": reason,
        **typed_check,
    }


def _typed_check(typed: Path, x: np.ndarray, run: ExportRun) -> dict:
    """The kit's typed model checked here with onnxruntime: logits against FP32's, and the accuracy
    delta on the task's validation images when there are any."""
    from export.runtime import ort_accuracy, ort_logits, ort_session

    sess = ort_session(typed)
    check = {"typed_max_abs_diff_vs_fp32": round(float(np.abs(ort_logits(sess, x) - ort_logits(run.fp32, x)).max()), 5)}
    if run.ds is not None:
        typed_acc, fp32_acc = ort_accuracy(sess, *run.val), ort_accuracy(run.fp32, *run.val)
        check.update(typed_val_accuracy=round(typed_acc, 4), typed_accuracy_drop_vs_fp32=round(fp32_acc - typed_acc, 4))
    return check
