"""What every format's export step shares (:class:`ExportRun`), and the one rule that says which
artifacts a deployment may use (:func:`verified_formats`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: A reduced-precision artifact may deploy when its accuracy is within this of FP32's.
MAX_ACCURACY_DROP = 0.01


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
    exist: :attr:`export.formats.FormatSpec.exact`) and the others when their recorded accuracy is within
    :data:`MAX_ACCURACY_DROP` of FP32's."""
    from export.formats import format_spec

    fp32_acc = artifacts.get("onnx", {}).get("test_accuracy", artifacts.get("onnx", {}).get("val_accuracy"))
    out = []
    for fmt, art in artifacts.items():
        acc = art.get("test_accuracy", art.get("val_accuracy"))
        if format_spec(fmt).exact or (acc is not None and fp32_acc is not None and fp32_acc - acc <= MAX_ACCURACY_DROP):
            out.append(fmt)
    return out
