"""The reduced-precision ONNX formats' export steps: ``onnx-fp16`` and ``onnx-int8`` (registered in
:mod:`export.formats`), each checked against the FP32 model with onnxruntime."""

from __future__ import annotations

from typing import Any

import numpy as np

from export.context import ExportRun


def export_fp16(run: ExportRun) -> dict[str, dict[str, Any]]:
    """``model.fp16.onnx`` (:func:`export.quantize.to_fp16`): its max logit difference from FP32 at batch 32,
    batch-1 latency and validation accuracy."""
    from export.runtime import ort_accuracy, ort_latency_ms, ort_logits, ort_session

    from .quantize import to_fp16

    to_fp16(run.onnx_path, run.tmp / "model.fp16.onnx")
    sess = ort_session(run.tmp / "model.fp16.onnx")
    diff = float(np.abs(ort_logits(sess, run.x32) - ort_logits(run.fp32, run.x32)).max())
    entry = {
        "file": "model.fp16.onnx",
        "max_abs_diff_vs_fp32": round(diff, 5),
        "latency_ms_b1": round(ort_latency_ms(sess, run.x1), 4),
    }
    if run.ds is not None:
        entry["val_accuracy"] = round(ort_accuracy(sess, *run.val), 4)
    run.log(f"onnx-fp16: model.fp16.onnx (max abs diff vs fp32 {diff:.3g})")
    return {"onnx-fp16": entry}


def export_int8(run: ExportRun) -> dict[str, dict[str, Any]]:
    """``model.int8.onnx`` (:func:`export.quantize.to_int8`: static Q/DQ on the calibration images, dynamic
    without them): latency at batch 1 and 32, validation accuracy and its drop from FP32's."""
    from export.runtime import ort_accuracy, ort_latency_ms, ort_session

    from .quantize import to_int8

    int8_path, mode = to_int8(run.onnx_path, run.tmp / "model.int8.onnx", run.calib)
    sess = ort_session(int8_path)
    entry = {
        "file": "model.int8.onnx",
        "mode": mode,
        "calibration_images": 0 if run.calib is None else len(run.calib),
        "latency_ms_b1": round(ort_latency_ms(sess, run.x1), 4),
        "latency_ms_b32": round(ort_latency_ms(sess, run.x32, repeats=10), 4),
    }
    fp32 = run.fp32_stats
    if run.ds is not None:
        entry["val_accuracy"] = round(ort_accuracy(sess, *run.val), 4)
        entry["accuracy_drop_vs_fp32"] = round(fp32["val_accuracy"] - entry["val_accuracy"], 4)
    fp32_acc = round(fp32["val_accuracy"], 4) if "val_accuracy" in fp32 else "n/a"
    run.log(
        f"onnx-int8: model.int8.onnx ({mode}), accuracy {entry.get('val_accuracy', 'n/a')} vs fp32 {fp32_acc}, "
        f"b1 {entry['latency_ms_b1']:.3f} ms vs {fp32['latency_ms_b1']:.3f} ms"
    )
    return {"onnx-int8": entry}
