"""Generic CPU latency terms, fitted on published measurements of known ViTs on other CPUs.

A CPU profile declares its datasheet figures (peak FP32 throughput, DRAM bandwidth) and ``cores``;
what a datasheet cannot say is how much of that a ViT attains. These terms say it, once for every
CPU, and come from measurements nobody made on the device being predicted:

- **Data** (``factory/assets/published_cpu_latency.json``): 42 batch-1 FP32 latencies of plain
  ViT/DeiT models (ViT-Ti/S/B/L/H at patch 8-32, 224 and 384 px) from timm's published benchmark
  tables on an Intel Core i9-10940X and an i7-12700H (PyTorch 2.4, ``torch.compile``, all 14 cores),
  each CPU with its Intel ARK figures (peak at base clock; the file cites every figure).
- **Model** (:func:`factory.device.roofline.roofline_ms` with ``cached_activations``): Amdahl's
  serial fraction ``s`` (``n`` cores give ``n / (1 + s (n - 1))`` times one core), a fork-join cost
  per thread of every op, attention's and the weight stream's efficiencies, and a per-run constant.
- **Assumption, not fitted**: a matmul attains ``matmul = 0.9`` of one core's FMA peak. With every
  published CPU at 14 cores, ``s`` and the matmul efficiency are confounded (only their ratio at 14
  cores is measured), so one must be fixed: 0.9 is what tuned single-core SGEMM kernels reach
  (BLIS, oneDNN, OpenBLAS report 85-95%). ``bench/latency_model.py`` reports the host check at 0.8 and
  1.0 too.

:data:`CPU_TERMS` holds the fitted values (a test refits them from the data); :data:`CPU_BAND` states
their error: in-sample, leave-one-device-out, and on the build host, a CPU outside the fit.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from factory.core.shapes import DescendantShape
from factory.device.fit import fit_efficiency
from factory.device.roofline import Device, Efficiency, roofline_ms, vit_ops

DATA = Path(__file__).resolve().parents[1] / "assets" / "published_cpu_latency.json"
MATMUL_EFFICIENCY = 0.9  # the assumption above
#: The shape of the generic terms: the multi-core model with activations kept in cache, no per-op constant.
GENERIC_CPU = Efficiency(
    matmul=MATMUL_EFFICIENCY,
    attention=1.0,
    memory=0.5,
    op_overhead_us=0.0,
    fixed_ms=0.0,
    serial_fraction=0.05,
    sync_us_per_thread=1.0,
    cached_activations=True,
)
#: The terms fitted on the published rows, with their bounds.
FITTED = {
    "serial_fraction": (0.0, 1.0),
    "attention": (1e-3, 5.0),
    "memory": (0.05, 1.0),
    "sync_us_per_thread": (0.0, 50.0),
    "fixed_ms": (0.0, 50.0),
}

#: :func:`fit_cpu_terms` on the shipped data (``tests/test_published_terms.py`` refits and compares).
CPU_TERMS = dataclasses.replace(
    GENERIC_CPU, serial_fraction=0.0948, attention=1.8203, memory=0.6756, sync_us_per_thread=2.4774, fixed_ms=0.0
)
#: Their error band and its evidence (figures from ``bench/latency_model.py``; bench/RESULTS.md).
CPU_BAND = (
    "generic CPU terms fitted on 42 published ViT latencies of 2 CPUs (timm benchmark tables): median 9.7%, "
    "90th percentile 18.9% in-sample; 12.7-20.1% median on the CPU left out of the fit; on this build host from "
    "its datasheet alone, median 17.2% on a quiet run (81% within +-30%, 0.6-1.9x) and 22.9-29.4% on two noisy "
    "ones, each at that run's noise floor (bench/latency_model.py). An estimate, not a measurement: calibrate "
    "for decisions near the budget"
)
#: The same terms on this host's *measured* GEMM rate and bandwidth (``profiles/host.yaml`` without kernel tables).
HOST_MEASURED_BAND = (
    "generic CPU terms fitted on 42 published ViT latencies of 2 CPUs (timm benchmark tables), on this "
    "host's measured GEMM rate: median 25.2-25.8% on held-out shapes in two noisy runs, at their noise "
    "floor of 20-27% (bench/latency_model.py); kernel tables (`peg-factory profiles measure`) or a "
    "calibration do better on a quiet machine"
)


@dataclass(frozen=True)
class PublishedRow:
    """One published latency: a known ViT at one input size on one CPU."""

    device: str
    model: str
    shape: DescendantShape
    batch: int
    latency_ms: float


def load_published(path: Path = DATA) -> tuple[dict[str, Device], list[PublishedRow]]:
    """The CPUs (as :class:`Device`, from their datasheet figures) and the published rows."""
    data = json.loads(Path(path).read_text())
    devices = {
        name: Device(
            peak_flops=d["peak_fp32_tflops"] * 1e12,
            bandwidth=d["memory_bandwidth_gbs"] * 1e9,
            runtime="pytorch",
            memory_mb=1e6,
            fused_attention=False,
            cores=d["cores"],
        )
        for name, d in data["devices"].items()
    }
    rows = []
    for r in data["rows"]:
        m = data["models"][r["model"]]
        shape = DescendantShape(
            m["depth"], m["embed_dim"], m["num_heads"], m["mlp_ratio"], r["img_size"], m["patch_size"], 1000
        )
        rows.append(PublishedRow(r["device"], r["model"], shape, r["batch"], r["latency_ms"]))
    return devices, rows


def predict(terms: Efficiency, device: Device, shape: DescendantShape, batch: int = 1) -> float:
    """Latency in ms of ``shape`` on ``device`` with ``terms`` (FP32, the published rows' precision)."""
    return roofline_ms(vit_ops(shape, batch, "fp32"), device, terms)


def fit_cpu_terms(
    devices: dict[str, Device], rows: list[PublishedRow], start: Efficiency = GENERIC_CPU
) -> tuple[Efficiency, list[float]]:
    """Fit :data:`FITTED` (:func:`factory.device.fit.fit_efficiency`) to ``rows``, each on its CPU;
    returns the terms (rounded to 4 decimals) and each row's relative error ``predicted / measured - 1``."""
    terms, errors = fit_efficiency(
        start, FITTED, [(vit_ops(r.shape, r.batch, "fp32"), devices[r.device], r.latency_ms) for r in rows]
    )
    return dataclasses.replace(terms, **{k: round(getattr(terms, k), 4) for k in FITTED}), errors


def leave_one_device_out(
    devices: dict[str, Device], rows: list[PublishedRow], start: Efficiency = GENERIC_CPU
) -> dict[str, list[float]]:
    """Per CPU: the relative errors on its rows of the terms fitted on the other CPUs' rows alone."""
    out = {}
    for held in sorted({r.device for r in rows}):
        terms, _ = fit_cpu_terms(devices, [r for r in rows if r.device != held], start)
        out[held] = [
            predict(terms, devices[held], r.shape, r.batch) / r.latency_ms - 1.0 for r in rows if r.device == held
        ]
    return out
