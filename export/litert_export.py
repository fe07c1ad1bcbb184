"""LiteRT (the TFLite runtime) artifacts for Android phones and ARM boards: ``.tflite``, FP32 and INT8.

- ``litert``: ``litert_torch.convert`` of the model at batch 1 (``torch.export`` lowered through StableHLO to
  the LiteRT converter; no TensorFlow), written as ``model.tflite``.
- ``litert-int8``: PT2E static post-training quantisation (litert-torch's ``PT2EQuantizer``, symmetric
  per-channel weights, per-tensor activations) calibrated on the task's training images, converted with its
  ``QuantConfig``: ``model.int8.tflite``.

**Delegate coverage**: the ``.tflite`` is loaded by ``ai_edge_litert``'s ``Interpreter``, which applies the
XNNPACK delegate as on a phone; each ``DELEGATE`` node stands for a partition of the original operators.
A partition's operators are found by walking back from its output tensors through their producers to its
input tensors (:func:`delegated_nodes`); ``delegated_ops`` of ``total_ops`` is the share XNNPACK runs, the
rest (``outside_ops``, by type) runs on LiteRT's reference kernels. timm's fused attention and the explicit
form are the same math; the explicit form is converted first and the fused one only when the explicit one
leaves operators outside, and the larger share is kept (``attention``); a share below
:data:`export.context.MIN_COVERAGE` is a warning in the log, the entry and the card.

**Verified on the task's images** (a spread sample of the test split, :func:`export.context.check_images`),
never random inputs alone: top-1 agreement, maximum logit difference, accuracy and its drop from FP32.
FP32 must agree with PyTorch to 1e-4 (exact); INT8 is checked by accuracy.

LiteRT is an optional extra (``pip install 'peg-factory[litert]'``: ``litert-torch`` 0.10 with
``ai-edge-litert``). It cannot share a venv with the ``executorch``/``coreml`` extras: litert-torch pins
``typing-extensions`` 4.12.2, which breaks coremltools' ``cattrs`` (README, "Which extras combine").
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from export.context import attention_form, check_images, coverage_note, logits_check, pt2e_quantised
from factory.errors import FactoryError

EXTRA_HINT = "pip install 'peg-factory[litert]' (in its own venv: it cannot share one with the executorch extra)"
#: Interpreter threads for the check and the host timing (a phone's XNNPACK default is its big cores).
THREADS = 2


def require_litert():
    """``litert_torch`` and ``ai_edge_litert``, or a one-line :class:`FactoryError` naming the extra."""
    try:
        import litert_torch  # noqa: F401
        from ai_edge_litert.interpreter import Interpreter  # noqa: F401
    except ImportError as exc:
        raise FactoryError(f"LiteRT formats need the litert extra: {EXTRA_HINT} ({exc})") from exc


def interpreter(path: Path, threads: int = THREADS):
    """An ``ai_edge_litert`` Interpreter of the file with its default delegate (XNNPACK), tensors allocated."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=threads)
    it.allocate_tensors()
    return it


def delegated_nodes(nodes: list[dict[str, Any]]) -> tuple[int, int, dict[str, int]]:
    """``(delegated, total, outside by type)`` of an Interpreter's ``_get_ops_details()`` list: the original
    operators (every node but the ``DELEGATE`` ones), and those inside a delegate partition -- reached walking
    back from a ``DELEGATE`` node's outputs through their producers, stopping at the node's inputs."""
    original = [n for n in nodes if n["op_name"] != "DELEGATE"]
    producer = {t: i for i, n in enumerate(original) for t in n["outputs"]}
    inside: set[int] = set()
    for node in nodes:
        if node["op_name"] != "DELEGATE":
            continue
        stop = set(int(t) for t in node["inputs"])
        pending = [int(t) for t in node["outputs"]]
        while pending:
            tensor = pending.pop()
            i = producer.get(tensor)
            if tensor in stop or i is None or i in inside:
                continue
            inside.add(i)
            pending.extend(int(t) for t in original[i]["inputs"] if t >= 0)
    outside = Counter(n["op_name"] for i, n in enumerate(original) if i not in inside)
    return len(inside), len(original), dict(outside.most_common())


def coverage(it) -> dict[str, Any]:
    done, total, outside = delegated_nodes(it._get_ops_details())
    return {"delegated_ops": done, "total_ops": total, "outside_ops": outside}


def _quantise(detail: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """``x`` in the tensor's type: float as it is, an integer tensor by its scale and zero point."""
    if np.issubdtype(detail["dtype"], np.floating):
        return x.astype(detail["dtype"])
    scale, zero = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(detail["dtype"])


def _dequantise(detail: dict[str, Any], y: np.ndarray) -> np.ndarray:
    if np.issubdtype(detail["dtype"], np.floating):
        return y.astype(np.float32)
    scale, zero = detail["quantization"]
    return ((y.astype(np.float32) - zero) * scale).astype(np.float32)


def tflite_logits(it, images: np.ndarray) -> np.ndarray:
    """Logits of ``images`` run one at a time (the model is converted at batch 1); a quantised input or output
    (an INT8 model's) goes through its scale and zero point, as an app feeding it float images would."""
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    rows = []
    for i in range(len(images)):
        it.set_tensor(inp["index"], _quantise(inp, images[i : i + 1]))
        it.invoke()
        rows.append(_dequantise(out, it.get_tensor(out["index"])))
    return np.concatenate(rows)


def tflite_latency_ms(it, x: np.ndarray, *, repeats: int = 20, warmup: int = 3) -> float:
    inp = it.get_input_details()[0]
    it.set_tensor(inp["index"], _quantise(inp, x))
    for _ in range(warmup):
        it.invoke()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        it.invoke()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def convert(module, example, path: Path, quant_config=None) -> None:
    """``module`` traced at ``example``'s shape, converted by litert-torch and written to ``path``."""
    import litert_torch

    try:
        model = litert_torch.convert(module, (example,), quant_config=quant_config)
    except Exception as exc:  # noqa: BLE001 - an op the converter cannot lower: one line, the other formats go on
        raise FactoryError(
            f"litert: the converter could not lower the model: {' '.join(str(exc).split())[:300]}"
        ) from None
    model.export(str(path))


def _verify(run, fmt: str, path: Path, reference: np.ndarray, images, labels, what: str) -> dict[str, Any]:
    it = interpreter(path)
    entry = {"file": path.name, **coverage(it), **logits_check(tflite_logits(it, images), reference, labels, what)}
    entry["latency_ms_b1"] = round(tflite_latency_ms(it, run.x1), 4)
    coverage_note(run, fmt, entry, "LiteRT's reference kernels")
    return entry


def _reference(run):
    import torch

    images, labels, what = check_images(run)
    with torch.no_grad():
        return images, labels, what, run.net(torch.from_numpy(images)).numpy()


def export_litert(run) -> dict[str, dict[str, Any]]:
    """FP32 ``model.tflite``, the attention form XNNPACK takes more of, exact against PyTorch on the task's test
    images."""
    import torch

    require_litert()
    images, labels, what, reference = _reference(run)
    example = torch.from_numpy(run.x1)
    path = run.tmp / "model.tflite"
    best: dict[str, Any] | None = None
    for fused in (False, True):  # explicit first: the fused form only when the explicit one leaves ops outside
        trial = run.tmp / f"model.{'fused' if fused else 'explicit'}.tflite"
        with attention_form(run.net, fused):
            convert(run.net, example, trial)
        entry = {
            "attention": "fused" if fused else "explicit",
            **_verify(run, "litert", trial, reference, images, labels, what),
        }
        if best is None or entry["delegated_fraction"] > best["delegated_fraction"]:
            best, keep = entry, trial
        if best["delegated_fraction"] >= 1.0:
            break
    for trial in run.tmp.glob("model.*.tflite"):
        if trial != keep:
            trial.unlink()
    keep.rename(path)
    best["file"] = path.name
    if best["max_abs_diff_vs_pytorch"] > 1e-4:
        raise FactoryError(
            f"litert output differs from PyTorch by {best['max_abs_diff_vs_pytorch']:.3g} (> 1e-4) on {what}; "
            "not exported"
        )
    run.log(
        f"litert: {path.name} ({best['attention']} attention; XNNPACK {best['delegated_ops']}/{best['total_ops']} ops), "
        f"max diff {best['max_abs_diff_vs_pytorch']:.2e} on {what}, b1 {best['latency_ms_b1']:.3f} ms"
    )
    return {"litert": best}


def export_litert_int8(run) -> dict[str, dict[str, Any]]:
    """``model.int8.tflite``: PT2E static INT8 calibrated on the task's training images, checked by accuracy."""
    import torch

    require_litert()
    if run.calib is None or len(run.calib) == 0:
        raise FactoryError("litert-int8 needs task images to calibrate on; pass them", param="data")
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig

    images, labels, what, reference = _reference(run)
    attention = (run.artifacts.get("litert") or {}).get("attention", "explicit")
    example = torch.from_numpy(run.x1)
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))

    with attention_form(run.net, attention == "fused"):
        module = pt2e_quantised(run.net, example, quantizer, run.calib, fold_quantize=False)
    path = run.tmp / "model.int8.tflite"
    convert(module, example, path, quant_config=QuantConfig(pt2e_quantizer=quantizer))
    entry = {"attention": attention, "calibration_images": len(run.calib)}
    entry.update(_verify(run, "litert-int8", path, reference, images, labels, what))
    run.log(
        f"litert-int8: {path.name} (XNNPACK {entry['delegated_ops']}/{entry['total_ops']} ops), top-1 agreement "
        f"{entry['top1_agreement']:.4f}, accuracy {entry.get('test_accuracy', 'n/a')} on {what}, "
        f"b1 {entry['latency_ms_b1']:.3f} ms"
    )
    return {"litert-int8": entry}


def kit_model(onnx_path: Path, model, shape: tuple[int, ...]) -> Path:
    """The calibration kit's ``.tflite`` twin of a kit model (random weights), converted as the export converts it,
    for the kit's ``measure.py`` (:attr:`factory.device.runtimes.RuntimeSpec.kit_model`)."""
    import torch

    require_litert()
    path = onnx_path.with_suffix(".tflite")
    with attention_form(model, False):
        convert(model, torch.randn(*shape), path)
    return path
