"""OpenVINO artifacts for CPU targets: FP32 IR, BF16 execution, INT8 IR via NNCF.

- ``openvino``: the verified ONNX model converted with ``openvino.convert_model`` and saved as IR
  (``model.xml`` + ``model.bin``) with FP32 weights (``compress_to_fp16=False``).
- ``openvino-int8``: NNCF post-training quantisation (``nncf.quantize``, mixed preset, transformer
  model type so LayerNorm/Softmax/GELU stay in float) of that IR, calibrated on the task's
  training images; saved as ``model.int8.xml/.bin``.
- BF16 is not a file: it is OpenVINO's CPU execution precision (``INFERENCE_PRECISION_HINT=bf16``)
  of the FP32 IR, used when the CPU reports ``BF16`` among its optimisation capabilities. It is
  measured and verified like a format and recorded as ``openvino-bf16`` in ``export.json``.

OpenVINO is an optional extra (``pip install 'peg-factory[openvino]'``); without it these formats
are refused with one line naming the extra.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import numpy as np

from factory.errors import FactoryError

EXTRA_HINT = "pip install 'peg-factory[openvino]'"


def require_openvino():
    """The ``openvino`` module, or a one-line :class:`FactoryError` naming the extra."""
    try:
        import openvino
    except ImportError as exc:
        raise FactoryError(f"OpenVINO formats need the openvino extra: {EXTRA_HINT}") from exc
    return openvino


def cpu_supports_bf16() -> bool:
    ov = require_openvino()
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def to_openvino(onnx_path: Path, xml_path: Path) -> Path:
    ov = require_openvino()
    model = ov.convert_model(str(onnx_path))
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return xml_path


def to_openvino_int8(xml_fp32: Path, xml_int8: Path, calibration: np.ndarray) -> Path:
    """NNCF post-training INT8 quantisation of the FP32 IR, calibrated on ``calibration`` images."""
    ov = require_openvino()
    try:
        import nncf
    except ImportError as exc:
        raise FactoryError(f"openvino-int8 needs NNCF (part of the openvino extra): {EXTRA_HINT}") from exc
    if calibration is None or len(calibration) == 0:
        raise FactoryError("openvino-int8 needs task images to calibrate on; pass them", param="data")
    model = ov.Core().read_model(str(xml_fp32))
    dataset = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    # NNCF loads its torch backend, whose import of torch.utils.cpp_extension logs "No CUDA runtime is found"
    # on CPU builds: nothing the user can act on, so that logger is kept quiet
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    quantized = nncf.quantize(
        model,
        dataset,
        preset=nncf.QuantizationPreset.MIXED,
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(calibration),
    )
    ov.save_model(quantized, str(xml_int8), compress_to_fp16=False)
    return xml_int8


def ov_compile(xml_path: Path, *, precision: str = "f32", threads: int | None = None):
    """A CPU-compiled model; ``precision`` is ``f32`` or ``bf16`` (the execution precision hint)."""
    ov = require_openvino()
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return ov.Core().compile_model(str(xml_path), "CPU", config)


def ov_logits(compiled, images: np.ndarray, batch: int = 256) -> np.ndarray:
    request = compiled.create_infer_request()
    out = []
    for i in range(0, len(images), batch):
        request.infer({0: images[i : i + batch]})
        out.append(np.array(request.get_output_tensor(0).data, copy=True))
    return np.concatenate(out)


def ov_latency_ms(compiled, x: np.ndarray, *, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time (ms) of one synchronous inference of ``x`` after ``warmup`` runs."""
    return ov_latency_stats(compiled, x, repeats=repeats, warmup=warmup)["median"]


def ov_latency_stats(compiled, x: np.ndarray, *, repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    """``{"median", "p90"}`` wall time (ms) of synchronous inferences of ``x`` after ``warmup`` runs."""
    request = compiled.create_infer_request()
    for _ in range(warmup):
        request.infer({0: x})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        request.infer({0: x})
        times.append((time.perf_counter() - start) * 1e3)
    return {"median": statistics.median(times), "p90": float(np.percentile(times, 90))}


def inference_precision(compiled) -> str:
    """The precision the compiled model runs in, as OpenVINO reports it (``f32``, ``bf16``...)."""
    value = compiled.get_property("INFERENCE_PRECISION_HINT")
    return value.to_string() if hasattr(value, "to_string") else str(value)


def benchmark_app_command(xml_name: str, shape: tuple[int, ...], precision: str) -> list[str]:
    """The exact ``benchmark_app`` call for an IR with a dynamic batch, at ``shape``, in ``precision``."""
    return [
        "benchmark_app",
        "-m",
        xml_name,
        "-d",
        "CPU",
        "-shape",
        f"images[{','.join(map(str, shape))}]",
        "-infer_precision",
        precision,
        "-hint",
        "latency",
    ]


def ov_accuracy(compiled, images: np.ndarray, labels: np.ndarray) -> float:
    return float((ov_logits(compiled, images).argmax(-1) == labels).mean())


# -- the registered export steps (export.formats) ------------------------------------------------------------


def _measure(run, fmt: str, compiled, entry: dict, fp32_test: float | None) -> dict:
    """Latency (median, p90, the host's load while timing) and test accuracy at the precision that runs."""
    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    b1, b32 = ov_latency_stats(compiled, run.x1), ov_latency_stats(compiled, run.x32, repeats=10)
    running = inference_precision(compiled)
    entry.update(
        latency_ms_b1=round(b1["median"], 4),
        latency_ms_b1_p90=round(b1["p90"], 4),
        latency_ms_b32=round(b32["median"], 4),
        latency_ms_b32_p90=round(b32["p90"], 4),
        host_load_1min=round(load, 2) if load is not None else None,
        inference_precision=running,
        benchmark_app=" ".join(benchmark_app_command(entry["file"], (run.batch, *run.x1.shape[1:]), running)),
    )
    if run.ds is not None:
        entry["test_accuracy"] = round(ov_accuracy(compiled, run.ds.test.images.numpy(), run.ds.test.labels.numpy()), 4)
        entry["accuracy_drop_vs_fp32"] = round(fp32_test - entry["test_accuracy"], 4)
    run.log(
        f"{fmt}: {entry['file']} ({running}) b1 {entry['latency_ms_b1']:.3f} ms (p90 {entry['latency_ms_b1_p90']:.3f}), "
        f"accuracy {entry.get('test_accuracy', 'n/a')} (fp32 {round(fp32_test, 4) if fp32_test is not None else 'n/a'})"
    )
    return entry


def _fp32_test_accuracy(run) -> float | None:
    """The FP32 ONNX model's test accuracy (onnxruntime), computed once per export."""
    from export.runtime import ort_accuracy

    if run.ds is None:
        return None
    if "fp32_test_accuracy" not in run.fp32_stats:
        run.fp32_stats["fp32_test_accuracy"] = ort_accuracy(
            run.fp32, run.ds.test.images.numpy(), run.ds.test.labels.numpy()
        )
    return run.fp32_stats["fp32_test_accuracy"]


def export_openvino(run) -> dict[str, dict]:
    """FP32 IR verified against PyTorch (max abs diff <= 1e-4), and its BF16 execution where the CPU has it
    (recorded as ``openvino-bf16``), each timed and scored on the task's test images."""
    import torch

    out: dict[str, dict] = {}
    fp32_test = _fp32_test_accuracy(run)
    with torch.no_grad():
        reference = run.net(torch.from_numpy(run.x32)).numpy()
    xml = to_openvino(run.onnx_path, run.tmp / "model.xml")
    compiled = ov_compile(xml, precision="f32")
    diff = float(np.abs(ov_logits(compiled, run.x32) - reference).max())
    if diff > 1e-4:
        raise FactoryError(f"OpenVINO FP32 output differs from PyTorch by {diff:.3g} (> 1e-4); not exported")
    out["openvino"] = _measure(
        run,
        "openvino",
        compiled,
        {"file": "model.xml", "weights": "model.bin", "max_abs_diff_vs_pytorch": diff},
        fp32_test,
    )
    if cpu_supports_bf16():
        bf16 = ov_compile(xml, precision="bf16")
        entry = {
            "file": "model.xml",
            "weights": "model.bin",
            "execution_precision": "bf16",
            "max_abs_diff_vs_pytorch": round(float(np.abs(ov_logits(bf16, run.x32) - reference).max()), 5),
        }
        out["openvino-bf16"] = _measure(run, "openvino-bf16", bf16, entry, fp32_test)
    else:
        run.log("openvino-bf16: this CPU has no BF16 support; FP32 execution only")
    if fp32_test is not None:
        out["openvino"]["fp32_onnxruntime_test_accuracy"] = round(fp32_test, 4)
    return out


def export_openvino_int8(run) -> dict[str, dict]:
    """The NNCF INT8 IR of ``openvino``'s FP32 IR (made first: :attr:`FormatSpec.requires`), calibrated on the
    task's training images, timed and scored."""
    to_openvino_int8(run.tmp / "model.xml", run.tmp / "model.int8.xml", run.calib)
    entry = {"file": "model.int8.xml", "weights": "model.int8.bin", "calibration_images": len(run.calib)}
    return {
        "openvino-int8": _measure(
            run, "openvino-int8", ov_compile(run.tmp / "model.int8.xml"), entry, _fp32_test_accuracy(run)
        )
    }
