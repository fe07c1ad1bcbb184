"""Fitting latency models to measurements: a calibration CSV's rows, read and checked, and the
roofline's :class:`~factory.device.roofline.Efficiency` fitted to them.

A calibration CSV has the columns :data:`CALIBRATION_FIELDS` plus ``latency_ms`` (what the
calibration kit's ``measure.py`` writes; :mod:`factory.device.kit`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from factory.core.shapes import DescendantShape
from factory.device.roofline import CostModel, Efficiency, roofline_ms, vit_ops
from factory.errors import FactoryError

CALIBRATION_FIELDS = ("depth", "embed_dim", "num_heads", "mlp_ratio", "img_size", "patch_size", "num_classes", "batch")


@dataclass(frozen=True)
class Measurement:
    shape: DescendantShape
    batch: int
    latency_ms: float


def calibrate(model: CostModel, rows: list[Measurement]) -> CostModel:
    """Fit :class:`Efficiency` to measured rows (bounded least squares on log ratios)."""
    import numpy as np
    from scipy.optimize import least_squares

    if not rows:
        raise FactoryError("calibration needs at least one measured row")
    op_lists = [vit_ops(r.shape, r.batch, model.precision, arch=model.arch, fused_attention=model.device.fused_attention)
                for r in rows]
    measured = np.array([r.latency_ms for r in rows])
    names = ("matmul", "attention", "memory", "op_overhead_us", "fixed_ms")
    lo = np.array([1e-3, 1e-3, 1e-3, 0.0, 0.0])
    hi = np.array([1.5, 1.5, 1.5, 1e3, 1e3])
    x0 = np.clip(np.array([getattr(model.efficiency, k) for k in names], dtype=float), lo + 1e-9, hi - 1e-9)

    def residual(x):
        eff = Efficiency(*x)
        pred = np.array([roofline_ms(ops, model.device, eff) for ops in op_lists])
        return np.log(pred / measured)

    fit = least_squares(residual, x0, bounds=(lo, hi))
    return dataclasses.replace(model, efficiency=Efficiency(*fit.x), calibrated=True)


def read_calibration_csv(path, profile_path: str) -> list[Measurement]:
    """Rows :data:`CALIBRATION_FIELDS` + ``latency_ms``."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise FactoryError(f"profile {profile_path}: calibration file {path} not found; fix the path or remove calibration")
    rows = []
    with open(path, newline="") as fh:
        for i, row in enumerate(csv.DictReader(fh), start=2):
            try:
                shape = DescendantShape(
                    depth=int(row["depth"]), embed_dim=int(row["embed_dim"]), num_heads=int(row["num_heads"]),
                    mlp_ratio=float(row["mlp_ratio"]), img_size=int(row["img_size"]), patch_size=int(row["patch_size"]),
                    num_classes=int(row.get("num_classes") or 1000),
                )
                batch, latency = int(row.get("batch") or 1), float(row["latency_ms"])
                if not (math.isfinite(latency) and latency > 0) or batch < 1:
                    raise ValueError(f"latency_ms must be a finite number > 0 and batch >= 1, got {row['latency_ms']!r}, "
                                     f"{row.get('batch')!r}")
                rows.append(Measurement(shape, batch, latency))
            except (KeyError, TypeError, ValueError, FactoryError) as exc:
                raise FactoryError(f"calibration {path} line {i}: {exc}; expected columns "
                                   f"{','.join(CALIBRATION_FIELDS)},latency_ms") from exc
    return rows


def calibration_provenance(csv_path: Path) -> str:
    """What ``calibration.json`` beside a calibration CSV says it was measured with ('' if absent)."""
    meta = csv_path.with_suffix(".json")
    try:
        data = json.loads(meta.read_text())
        return f"{data['runtime']} {data.get('runtime_version', '')} on {data.get('host', '?')}, {data.get('date', '?')}".replace("  ", " ")
    except (OSError, ValueError, KeyError, TypeError):
        return ""
