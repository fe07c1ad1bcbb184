"""What every format's export step shares (:class:`ExportRun`), and the one rule that says which
artifacts a deployment may use (:func:`verified_formats`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: A reduced-precision artifact may deploy when its accuracy is within this of FP32's.
MAX_ACCURACY_DROP = 0.01
#: A delegate (XNNPACK under ExecuTorch or LiteRT) taking a smaller share of the graph's operators than this is a
#: warning in the log, the entry and the card: the rest runs on the runtime's portable kernels.
MIN_COVERAGE = 0.9
#: At most this many test images (spread over the split) check an artifact run outside onnxruntime.
CHECK_IMAGES = 1000


@dataclass(frozen=True)
class ExportRun:
    """The verified FP32 ONNX, its session, the task's data and the reference inputs (batch 1 and 32),
    and the artifacts recorded so far (a later step may read an earlier one's, e.g. TensorRT INT8 builds
    from ``onnx-int8``'s Q/DQ model)."""

    tmp: Path  # the export directory being written
    onnx_path: Path
    net: Any  # the PyTorch model (eval mode)
    arch: Any  # its factory.core.shapes.ArchConfig
    ds: Any  # factory.data.Dataset, or None when the task has no data
    calib: np.ndarray | None  # calibration images for INT8
    x1: np.ndarray
    x32: np.ndarray
    fp32: Any  # onnxruntime session of the FP32 model
    fp32_stats: dict[str, float]  # the FP32 ONNX model's latency (b1, b32) and validation accuracy
    profile: Any  # factory.device.profile.Profile, or None
    batch: int
    log: Callable[[str], None]
    require_engine: bool = False
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)  # filled as the steps run

    @property
    def val(self) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
        """The validation images and labels (``(None, None)`` without task data)."""
        if self.ds is None:
            return None, None
        return self.ds.val.images.numpy(), self.ds.val.labels.numpy()


def verified_formats(artifacts: dict[str, dict[str, Any]]) -> list[str]:
    """The artifacts a deployment may use: exact ones (FP32, verified against PyTorch, or they would not
    exist: :attr:`export.formats.FormatSpec.exact`) and the others when their accuracy is within
    :data:`MAX_ACCURACY_DROP` of FP32's **on the same images**: the ``accuracy_drop_vs_fp32`` their step
    measured against the FP32 model, else their accuracy against FP32 ONNX's on the same split (test, else
    validation). A test accuracy is never compared with a validation one."""
    from export.formats import format_spec

    fp32 = artifacts.get("onnx", {})
    out = []
    for fmt, art in artifacts.items():
        drop = art.get("accuracy_drop_vs_fp32")
        if drop is None:
            split = next((k for k in ("test_accuracy", "val_accuracy") if k in art and k in fp32), None)
            drop = None if split is None else fp32[split] - art[split]
        if format_spec(fmt).exact or (drop is not None and drop <= MAX_ACCURACY_DROP):
            out.append(fmt)
    return out


def check_images(run: ExportRun, limit: int = CHECK_IMAGES) -> tuple[np.ndarray, np.ndarray | None, str]:
    """``(images, labels or None, what)`` an artifact is checked on: at most ``limit`` test images at evenly
    spaced indices (every class of a split sorted by class), or the reference inputs when the task has no
    data (said in ``what``: a random-input check hides what only real images show)."""
    if run.ds is None:
        return run.x32, None, "random reference inputs (no task data)"
    test = run.ds.test
    n = len(test)
    idx = np.unique(np.linspace(0, n - 1, min(n, limit)).round().astype(int))
    return test.images.numpy()[idx], test.labels.numpy()[idx], f"{len(idx)} test images"


def set_fused_attention(net, fused: bool) -> None:
    """timm's attention as ``F.scaled_dot_product_attention`` (``fused``) or the explicit ``q @ k^T, softmax,
    @ v`` (the same math): mobile converters lower the explicit form to their delegates more often."""
    for module in net.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused


@contextmanager
def attention_form(net, fused: bool) -> Iterator[None]:
    """:func:`set_fused_attention` for the ``with`` block, each module's own setting restored after it."""
    before = [getattr(m, "fused_attn", None) for m in net.modules()]
    set_fused_attention(net, fused)
    try:
        yield
    finally:
        for m, flag in zip(net.modules(), before):
            if flag is not None:
                m.fused_attn = flag


def pt2e_quantised(net, example, quantizer, calibration: np.ndarray, *, fold_quantize: bool = True):
    """PT2E post-training quantisation for a mobile delegate: ``net`` exported at ``example``'s shape, prepared
    with ``quantizer`` (XNNPACK's under ExecuTorch, litert-torch's for LiteRT), run on each calibration image
    (batch 1, the shape it is exported at) and converted; ``fold_quantize=False`` keeps the weights' quantise
    ops for a converter that folds them itself (litert-torch)."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared = prepare_pt2e(torch.export.export(net, (example,)).module(), quantizer)
    with torch.no_grad():
        for i in range(len(calibration)):
            prepared(torch.from_numpy(calibration[i : i + 1]))
    return convert_pt2e(prepared, fold_quantize=fold_quantize)


def logits_check(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray | None, what: str) -> dict[str, Any]:
    """A runtime's logits on the check images against PyTorch's (``reference``): the largest absolute
    difference, top-1 agreement and, with ``labels``, its accuracy and the drop from PyTorch's."""
    entry: dict[str, Any] = {
        "checked_on": what,
        "max_abs_diff_vs_pytorch": float(np.abs(logits - reference).max()),
        "top1_agreement": round(float((logits.argmax(-1) == reference.argmax(-1)).mean()), 4),
    }
    if labels is not None:
        entry["test_accuracy"] = round(float((logits.argmax(-1) == labels).mean()), 4)
        fp32 = float((reference.argmax(-1) == labels).mean())
        entry["accuracy_drop_vs_fp32"] = round(fp32 - entry["test_accuracy"], 4)
    return entry


def coverage_note(run: ExportRun, fmt: str, entry: dict[str, Any], fallback: str) -> None:
    """``entry["delegated_fraction"]`` from its ``delegated_ops`` / ``total_ops``, and a warning (in the entry
    and the log) when XNNPACK takes less than :data:`MIN_COVERAGE` of the ops: the rest runs on ``fallback``."""
    share = entry["delegated_ops"] / max(1, entry["total_ops"])
    entry["delegated_fraction"] = round(share, 4)
    if share < MIN_COVERAGE:
        worst = ", ".join(f"{op} x{n}" for op, n in list(entry.get("outside_ops", {}).items())[:3])
        entry["warning"] = (
            f"XNNPACK takes {entry['delegated_ops']} of {entry['total_ops']} ops ({share:.0%} < {MIN_COVERAGE:.0%}): "
            f"the rest ({worst}) runs on {fallback}, slower"
        )
        run.log(f"{fmt}: WARNING {entry['warning']}")
