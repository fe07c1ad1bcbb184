"""Which latency model a profile gets -- decided here and nowhere else.

1. ``latency_tables`` named and present: the measured kernel tables answer latency
   (:class:`factory.device.tables.KernelTables`; ``host`` means this machine's, at
   :func:`factory.device.measure.host_tables_path`); missing ``host`` tables fall back to the roofline
   and say how to measure them; a missing named file is an error.
2. Otherwise the roofline (:class:`factory.device.roofline.CostModel`) with the profile's declared
   figures (or this host's, measured, for ``measure: true``). Its terms: for a CPU that declares
   ``cores`` (and its datasheet figures), or this host measured (on its thread count), the generic
   CPU terms fitted on published measurements (:data:`factory.device.published.CPU_TERMS`, with
   their band); for other devices the priors of
   :meth:`~factory.device.roofline.Efficiency.default_for`. Fitted to the profile's calibration CSV
   when it has one (:func:`factory.device.fit.calibrate`).

``method`` on the result says which, and why, in words.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from factory.core.shapes import STANDARD_ARCH, ArchConfig
from factory.device.fit import calibrate, calibration_provenance, read_calibration_csv
from factory.device.profile import Profile
from factory.device.published import CPU_BAND, CPU_TERMS, HOST_MEASURED_BAND
from factory.device.roofline import TABLES_BAND, CostModel, Device, Efficiency, HostFacts
from factory.device.tables import KernelTables
from factory.errors import FactoryError
from factory.io import require_regular_file


def tables_path(profile: Profile, arch: ArchConfig) -> Path | None:
    """The kernel tables file ``profile`` points at (``host``: this machine's for ``arch``), or ``None``."""
    if profile.latency_tables is None:
        return None
    if profile.latency_tables == "host":
        from factory.device.measure import host_tables_path  # onnxruntime is imported only for host tables

        return host_tables_path(arch)
    base = Path(profile.path).parent if profile.path else Path.cwd()
    return (base / profile.latency_tables).resolve()


def _precision_caveat(precision: str) -> str:
    """The published CPU terms were fitted at FP32; say what that means at another precision."""
    if precision == "fp32":
        return ""
    return (
        f". Fitted at FP32: at {precision} the prediction scales by the datasheet's {precision}/fp32 peak ratio, which "
        f"CPU {precision} kernels rarely attain (on the build host onnxruntime INT8 ran 0.9-1.85x its FP32 against a 4x "
        f"datasheet ratio, bench/RESULTS.md 'Export latency'): optimistic, calibrate at {precision}"
    )


def latency_model_for(
    profile: Profile, *, arch: ArchConfig = STANDARD_ARCH, host: HostFacts | None = None
) -> CostModel:
    """The profile's latency model (see the module docstring); ``host`` are this machine's measured
    facts for a ``measure: true`` profile (measured now when not given)."""
    if profile.hardware.measure and host is None:
        from factory.device.measure import measure_host

        host = measure_host()
    hw = profile.hardware
    device = Device.from_profile(profile, host)
    if hw.kind == "cpu" and (hw.measure or hw.cores is not None):
        basis, band = (
            (f"this host's measured GEMM rate and bandwidth ({device.cores} threads)", HOST_MEASURED_BAND)
            if hw.measure
            else (f"the datasheet figures ({hw.cores} cores)", CPU_BAND)
        )
        model = CostModel(
            device,
            profile.precision,
            profile.batch,
            CPU_TERMS,
            arch,
            method=f"roofline of {basis} with generic CPU terms fitted on published ViT measurements",
            band=band + _precision_caveat(profile.precision),
        )
    else:
        model = CostModel(device, profile.precision, profile.batch, Efficiency.default_for(hw), arch)
    csv = profile.calibration_path()
    if csv is not None:
        rows = read_calibration_csv(csv, profile.path or "<profile>", runtime=profile.hardware.runtime)
        model = calibrate(model, rows)
        what = calibration_provenance(csv)
        model = dataclasses.replace(
            model, method=f"roofline calibrated on {len(rows)} rows of {csv.name}" + (f" ({what})" if what else "")
        )
    tables = tables_path(profile, arch)
    if tables is None:
        return model
    if tables.exists():  # a folder or a FIFO is named as one, not as "not found"
        require_regular_file(tables, f"profile {profile.path}: latency_tables")
    if tables.is_file():
        loaded = KernelTables.load(tables)
        host_facts = None
        if profile.latency_tables == "host":
            from factory.device.measure import host_facts as measure_facts

            host_facts = measure_facts()
        loaded.check_for(arch, tables, host_facts)
        return dataclasses.replace(model, tables=loaded, method=f"kernel tables {tables.name}", band=TABLES_BAND)
    if profile.latency_tables == "host":
        return dataclasses.replace(
            model,
            method=f"{model.method} (no host latency tables yet: run `peg-factory "
            "profiles measure` to predict per kernel)",
        )
    raise FactoryError(
        f"profile {profile.path}: latency_tables {profile.latency_tables} not found; fix the path "
        "or measure them with `peg-factory profiles measure --out PATH`"
    )
