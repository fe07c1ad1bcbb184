"""ExecuTorch artifacts for phones and ARM boards: an XNNPACK-delegated ``.pte``, FP32 and INT8.

- ``executorch``: ``torch.export`` of the model at batch 1, lowered with ``to_edge_transform_and_lower`` and
  the ``XnnpackPartitioner``, written as ``model.pte``.
- ``executorch-int8``: PT2E post-training quantisation for XNNPACK (``XNNPACKQuantizer``, symmetric per-channel
  weights, per-tensor activations; ``prepare_pt2e`` / ``convert_pt2e``) calibrated on the task's training
  images, then lowered the same way: ``model.int8.pte``.

**Delegate coverage** (what AI Hub's layer counts report): ExecuTorch's ``get_delegation_info`` on the lowered
graph -- how many of its operator nodes XNNPACK takes (``delegated_ops``) of all (``total_ops``; ``getitem``,
tuple indexing, is not an operator), and which stay outside (``outside_ops``: e.g. the demo's 13 LayerNorms and
its expand/squeeze copies). Every op left outside runs on ExecuTorch's portable kernels, the slow path users
find only on the device. timm's fused
attention (``F.scaled_dot_product_attention``) does not lower to XNNPACK; the explicit ``q @ k^T, softmax,
@ v`` form does. Both are exact (the same math; checked against PyTorch on the test images), so the export
lowers both and keeps the one with the larger delegated share (``attention`` in the entry); a share below
:data:`export.context.MIN_COVERAGE` is a warning in the log, the entry and the card.

**Verified on the task's images**, never random inputs alone: the ``.pte`` runs in ``executorch.runtime``
(XNNPACK, this CPU) on the test split (a spread sample of at most :data:`export.context.CHECK_IMAGES`), against the PyTorch
model: top-1 agreement, maximum logit difference, accuracy and its drop from FP32. FP32 must agree to
1e-4 (exact); INT8 is checked by accuracy (:data:`export.context.MAX_ACCURACY_DROP`). Without task data the
check runs on the reference inputs and says so.

ExecuTorch is an optional extra (``pip install 'peg-factory[executorch]'``: ``executorch`` 1.5.1 with its
``torchao``); without it these formats are refused in one line naming the extra.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from export.context import attention_form, check_images, coverage_note, logits_check, pt2e_quantised
from factory.errors import FactoryError

EXTRA_HINT = "pip install 'peg-factory[executorch]'"
#: Graph nodes that are not operators (tuple indexing of a node's outputs): left out of the coverage counts.
NOT_OPS = ("getitem",)


def require_executorch():
    """The ``executorch`` package, or a one-line :class:`FactoryError` naming the extra."""
    try:
        import executorch  # noqa: F401
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: F401
        from executorch.runtime import Runtime  # noqa: F401
    except ImportError as exc:
        raise FactoryError(f"ExecuTorch formats need the executorch extra: {EXTRA_HINT} ({exc})") from exc


def lower(program_module, example) -> tuple[Any, dict[str, int]]:
    """``(executorch program manager, coverage)`` of a module exported at ``example``'s shape and lowered to
    XNNPACK; coverage: ``delegated_ops``, ``total_ops`` (operator nodes), ``delegated_subgraphs``."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower

    exported = torch.export.export(program_module, (example,))
    edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    info = get_delegation_info(edge.exported_program().graph_module)
    table = info.get_operator_delegation_dataframe()
    rows = [r for r in table.to_dict("records") if r["op_type"] not in ("Total", *NOT_OPS)]
    inside = sum(int(r["occurrences_in_delegated_graphs"]) for r in rows)
    outside = {r["op_type"]: int(r["occurrences_in_non_delegated_graphs"]) for r in rows}
    outside = {op: n for op, n in sorted(outside.items(), key=lambda kv: -kv[1]) if n}
    coverage = {
        "delegated_ops": inside,
        "total_ops": inside + sum(outside.values()),
        "delegated_subgraphs": int(info.num_delegated_subgraphs),
        "outside_ops": outside,
    }
    return edge.to_executorch(), coverage


def pte_method(path: Path):
    """The ``forward`` method of the program at ``path``, loaded by ``executorch.runtime``."""
    from executorch.runtime import Runtime

    return Runtime.get().load_program(str(path)).load_method("forward")


def pte_logits(method, images: np.ndarray) -> np.ndarray:
    """Logits of ``images`` run one at a time (the program is exported at batch 1)."""
    import torch

    return np.concatenate(
        [method.execute([torch.from_numpy(images[i : i + 1])])[0].numpy() for i in range(len(images))]
    )


def pte_latency_ms(method, x: np.ndarray, *, repeats: int = 20, warmup: int = 3) -> float:
    import torch

    inp = [torch.from_numpy(x)]
    for _ in range(warmup):
        method.execute(inp)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        method.execute(inp)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _verify(run, fmt: str, path: Path, reference: np.ndarray, images, labels, what: str) -> dict[str, Any]:
    method = pte_method(path)
    entry = logits_check(pte_logits(method, images), reference, labels, what)
    return {**entry, "latency_ms_b1": round(pte_latency_ms(method, run.x1), 4)}


def export_executorch(run) -> dict[str, dict]:
    """FP32 ``model.pte`` (XNNPACK), the attention form with the larger delegated share, verified exact against
    PyTorch on the task's test images."""
    import torch

    require_executorch()
    images, labels, what = check_images(run)
    with torch.no_grad():
        reference = run.net(torch.from_numpy(images)).numpy()
    example = torch.from_numpy(run.x1)
    best = None
    for fused in (False, True):  # explicit attention first: it is what XNNPACK lowers
        try:
            with attention_form(run.net, fused):
                program, coverage = lower(run.net, example)
        except Exception as exc:  # noqa: BLE001 - a converter that cannot lower an op: the other form may
            run.log(f"executorch: {'fused' if fused else 'explicit'} attention did not lower: {str(exc)[:200]}")
            continue
        if (
            best is None
            or coverage["delegated_ops"] / coverage["total_ops"] > best[1]["delegated_ops"] / best[1]["total_ops"]
        ):
            best = (program, coverage, "fused" if fused else "explicit")
    if best is None:
        raise FactoryError("executorch: the model did not lower to XNNPACK in either attention form; not exported")
    program, coverage, attention = best
    path = run.tmp / "model.pte"
    path.write_bytes(program.buffer)
    entry = {"file": path.name, "attention": attention, **coverage}
    entry.update(_verify(run, "executorch", path, reference, images, labels, what))
    if entry["max_abs_diff_vs_pytorch"] > 1e-4:
        raise FactoryError(
            f"executorch output differs from PyTorch by {entry['max_abs_diff_vs_pytorch']:.3g} (> 1e-4) on {what}; "
            "not exported"
        )
    coverage_note(run, "executorch", entry, "ExecuTorch's portable kernels")
    run.log(
        f"executorch: {path.name} ({attention} attention; XNNPACK {entry['delegated_ops']}/{entry['total_ops']} ops), "
        f"max diff {entry['max_abs_diff_vs_pytorch']:.2e} on {what}, b1 {entry['latency_ms_b1']:.3f} ms"
    )
    return {"executorch": entry}


def export_executorch_int8(run) -> dict[str, dict]:
    """``model.int8.pte``: PT2E INT8 for XNNPACK calibrated on the task's training images, checked by accuracy."""
    import torch

    require_executorch()
    if run.calib is None or len(run.calib) == 0:
        raise FactoryError("executorch-int8 needs task images to calibrate on; pass them", param="data")
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    images, labels, what = check_images(run)
    with torch.no_grad():
        reference = run.net(torch.from_numpy(images)).numpy()
    attention = (run.artifacts.get("executorch") or {}).get("attention", "explicit")
    example = torch.from_numpy(run.x1)
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    with attention_form(run.net, attention == "fused"):
        program, coverage = lower(pt2e_quantised(run.net, example, quantizer, run.calib), example)
    path = run.tmp / "model.int8.pte"
    path.write_bytes(program.buffer)
    entry = {"file": path.name, "attention": attention, "calibration_images": len(run.calib), **coverage}
    entry.update(_verify(run, "executorch-int8", path, reference, images, labels, what))
    coverage_note(run, "executorch-int8", entry, "ExecuTorch's portable kernels")
    run.log(
        f"executorch-int8: {path.name} (XNNPACK {entry['delegated_ops']}/{entry['total_ops']} ops), top-1 agreement "
        f"{entry['top1_agreement']:.4f}, accuracy {entry.get('test_accuracy', 'n/a')} on {what}, "
        f"b1 {entry['latency_ms_b1']:.3f} ms"
    )
    return {"executorch-int8": entry}


def kit_model(onnx_path: Path, model, shape: tuple[int, ...]) -> Path:
    """The calibration kit's ``.pte`` twin of a kit model (random weights), lowered as the export lowers it,
    for the kit's ``measure.py`` (:attr:`factory.device.runtimes.RuntimeSpec.kit_model`)."""
    import torch

    require_executorch()
    with attention_form(model, False):
        program, _ = lower(model, torch.randn(*shape))
    path = onnx_path.with_suffix(".pte")
    path.write_bytes(program.buffer)
    return path
