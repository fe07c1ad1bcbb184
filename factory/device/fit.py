"""Fitting latency models to measurements: a calibration CSV's rows, read and checked, and the
roofline's :class:`~factory.device.roofline.Efficiency` fitted to them.

A calibration CSV has the columns :data:`CALIBRATION_FIELDS` plus ``latency_ms`` (what the
calibration kit's ``measure.py`` writes; :mod:`factory.device.calibration_kit`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from factory.core.shapes import DescendantShape
from factory.device.roofline import CostModel, Device, Efficiency, roofline_ms, vit_ops
from factory.errors import FactoryError
from factory.io import require_regular_file

CALIBRATION_FIELDS = ("depth", "embed_dim", "num_heads", "mlp_ratio", "img_size", "patch_size", "num_classes", "batch")


@dataclass(frozen=True)
class Measurement:
    shape: DescendantShape
    batch: int
    latency_ms: float


#: The terms a calibration fits, with their bounds (the multi-core terms are kept as the model has them).
CALIBRATED = {
    "matmul": (1e-3, 1.5),
    "attention": (1e-3, 1.5),
    "memory": (1e-3, 1.5),
    "op_overhead_us": (0.0, 1e3),
    "fixed_ms": (0.0, 1e3),
}
#: With at least this many rows the band is cross-validated (each row predicted by a fit without it).
MIN_ROWS_HELD_OUT = 5
FOLDS = 5


def calibrate(model: CostModel, rows: list[Measurement]) -> CostModel:
    """Fit the five :data:`CALIBRATED` terms of :class:`Efficiency` to measured rows (bounded least
    squares on log ratios; the multi-core terms stay as ``model`` has them). The stated band is
    held-out when there are :data:`MIN_ROWS_HELD_OUT` rows or more: ``FOLDS``-fold cross-validation,
    every row predicted by the fit to the other folds; in-sample below that."""
    import numpy as np

    if not rows:
        raise FactoryError("calibration needs at least one measured row")
    eff, errors = _fit(model, rows)
    fitted = dataclasses.replace(model, efficiency=eff, calibrated=True)
    if len(rows) < MIN_ROWS_HELD_OUT:
        return dataclasses.replace(fitted, band=fit_band(errors, len(rows)))
    held_out = []
    for k in range(FOLDS):
        train = [r for i, r in enumerate(rows) if i % FOLDS != k]
        test = [r for i, r in enumerate(rows) if i % FOLDS == k]
        if not test:
            continue
        fold = dataclasses.replace(model, efficiency=_fit(model, train)[0])
        held_out += [fold.latency_ms(r.shape, r.batch) / r.latency_ms - 1.0 for r in test]
    return dataclasses.replace(fitted, band=fit_band(np.array(held_out), len(rows), held_out=True))


def _fit(model: CostModel, rows: list[Measurement]) -> tuple[Efficiency, list[float]]:
    ops = [
        vit_ops(r.shape, r.batch, model.precision, arch=model.arch, fused_attention=model.device.fused_attention)
        for r in rows
    ]
    return fit_efficiency(model.efficiency, CALIBRATED, [(o, model.device, r.latency_ms) for o, r in zip(ops, rows)])


def fit_efficiency(
    start: Efficiency, bounds: dict[str, tuple[float, float]], cases: list[tuple[list, Device, float]]
) -> tuple[Efficiency, list[float]]:
    """Fit the :class:`Efficiency` fields named in ``bounds`` (the others stay as ``start`` has them) to
    measured ``(ops, device, latency_ms)`` cases by bounded least squares on ``log(predicted / measured)``;
    returns the fitted terms and each case's relative error ``predicted / measured - 1``."""
    import numpy as np
    from scipy.optimize import least_squares

    names = list(bounds)
    lo = np.array([bounds[k][0] for k in names])
    hi = np.array([bounds[k][1] for k in names])
    x0 = np.clip(np.array([getattr(start, k) for k in names], dtype=float), lo + 1e-9, hi - 1e-9)
    measured = np.array([latency for _, _, latency in cases])

    def efficiency(x) -> Efficiency:
        return dataclasses.replace(start, **{k: float(v) for k, v in zip(names, x)})

    def residual(x):
        eff = efficiency(x)
        return np.log(np.array([roofline_ms(ops, device, eff) for ops, device, _ in cases]) / measured)

    fit = least_squares(residual, x0, bounds=(lo, hi))
    return efficiency(fit.x), list(np.exp(fit.fun) - 1.0)


def fit_band(relative_errors, rows: int, *, held_out: bool = False) -> str:
    """A calibration's stated error band: the median and 90th percentile of ``|predicted / measured - 1|``
    -- on rows each left out of the fit that predicted it (``held_out``), or on the rows it was fitted
    to (in-sample: a lower bound on the error for shapes far from them)."""
    import numpy as np

    errors = np.abs(np.asarray(relative_errors, dtype=float))
    how = f"{FOLDS}-fold cross-validated: each row predicted by a fit without it" if held_out else "in-sample"
    return (
        f"+-{np.percentile(errors, 90):.0%} (90th percentile of the fit's error on its {rows} calibration rows; median "
        f"{np.median(errors):.0%}; {how})"
    )


#: The largest row a calibration CSV may hold: the bounds of every search space the factory runs
#: (the CLI's bounds on depth, widths, image sizes and batch).
ROW_BOUNDS = {
    "depth": 4096,
    "embed_dim": 1 << 16,
    "num_heads": 4096,
    "img_size": 1 << 16,
    "patch_size": 1 << 16,
    "num_classes": 1 << 20,
    "batch": 1 << 16,
}


def read_calibration_csv(path, profile_path: str, runtime: str | None = None) -> list[Measurement]:
    """Rows :data:`CALIBRATION_FIELDS` + ``latency_ms`` (+ ``runtime``, what the kit writes), each
    within :data:`ROW_BOUNDS`. With ``runtime`` (the profile's), rows measured with another runtime
    -- by their ``runtime`` column, else by ``calibration.json`` beside the CSV -- are refused."""
    import csv

    path = Path(path)
    if path.exists():  # a folder or a FIFO is named as one, not as "not found"
        require_regular_file(path, f"profile {profile_path}: calibration file")
    if not path.is_file():
        raise FactoryError(
            f"profile {profile_path}: calibration file {path} not found; fix the path or remove calibration"
        )
    tagged = _json_runtime(path)
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            for i, row in enumerate(csv.DictReader(fh), start=2):
                rows.append(_row(row, path, i, runtime, tagged))
    except UnicodeDecodeError as exc:
        raise FactoryError(
            f"calibration {path}: not UTF-8 text ({exc.reason} at byte {exc.start}); write it as a UTF-8 CSV"
        ) from exc
    except csv.Error as exc:
        raise FactoryError(
            f"calibration {path}: not a CSV file ({exc}); expected columns {','.join(CALIBRATION_FIELDS)},latency_ms"
        ) from exc
    if not rows:
        raise FactoryError(f"calibration {path}: no rows; measure the kit (python3 measure.py) or remove calibration")
    return rows


def _json_runtime(csv_path: Path) -> str | None:
    try:
        value = json.loads(csv_path.with_suffix(".json").read_text()).get("runtime")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _row(row: dict, path: Path, line: int, runtime: str | None, tagged: str | None) -> Measurement:
    try:
        measured_with = (row.get("runtime") or "").strip() or tagged
        if runtime is not None and measured_with is not None and measured_with != runtime:
            raise ValueError(
                f"measured with {measured_with}, but the profile runs {runtime}; measure the kit with "
                f"--runtime {runtime} or fix the profile's runtime"
            )
        values = {k: int(row[k]) if k in row and row[k] not in (None, "") else None for k in ROW_BOUNDS if k != "batch"}
        values["num_classes"] = values["num_classes"] or 1000
        batch = int(row.get("batch") or 1)
        for name, bound in ROW_BOUNDS.items():
            value = batch if name == "batch" else values[name]
            if value is None:
                raise KeyError(name)
            if not 1 <= value <= bound:
                raise ValueError(f"{name} {value} is outside 1..{bound} (no search space holds it)")
        ratio, latency = float(row["mlp_ratio"]), float(row["latency_ms"])
        if not (math.isfinite(latency) and latency > 0):
            raise ValueError(
                f"latency_ms must be a finite number > 0 and batch >= 1, got {row['latency_ms']!r}, "
                f"{row.get('batch')!r}"
            )
        if not (math.isfinite(ratio) and 0 < ratio <= 64):
            raise ValueError(f"mlp_ratio {row['mlp_ratio']!r} is outside (0, 64]")
        shape = DescendantShape(
            depth=values["depth"],
            embed_dim=values["embed_dim"],
            num_heads=values["num_heads"],
            mlp_ratio=ratio,
            img_size=values["img_size"],
            patch_size=values["patch_size"],
            num_classes=values["num_classes"],
        )
        return Measurement(shape, batch, latency)
    except (KeyError, TypeError, ValueError, FactoryError) as exc:
        what = f"missing column {exc}" if isinstance(exc, KeyError) else str(exc)
        raise FactoryError(
            f"calibration {path} line {line}: {what}; expected columns {','.join(CALIBRATION_FIELDS)},latency_ms"
        ) from exc


def calibration_provenance(csv_path: Path) -> str:
    """What ``calibration.json`` beside a calibration CSV says it was measured with ('' if absent)."""
    meta = csv_path.with_suffix(".json")
    try:
        data = json.loads(meta.read_text())
        return f"{data['runtime']} {data.get('runtime_version', '')} on {data.get('host', '?')}, {data.get('date', '?')}".replace(
            "  ", " "
        )
    except (OSError, ValueError, KeyError, TypeError):
        return ""
