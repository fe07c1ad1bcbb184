"""How honest are the latency and memory models on this host (onnxruntime CPU)?

Per batch size (``--batches``, default 1 and 8), seeded random shapes of a ViT-S-like ancestry:
``--calibrate`` shapes fit the calibrations, ``--shapes`` other shapes are held out and measured
twice (onnxruntime, median of ``--repeats`` runs; the second measurement shows the noise floor).

1. Kernel tables (:mod:`factory.device.tables`) are measured in the same run on grids spanning the
   space; their three whole-model terms are fitted on the calibration shapes.
2. Predictors compared on the held-out shapes: the roofline of ``profiles/host.yaml`` (host GEMM
   rate and bandwidth measured) with the published CPU terms, with the priors used before them, and
   calibrated on the same shapes; the kernel tables'
   raw sum; the kernel tables with the fitted terms; and, with nothing measured on this host,
   this machine's datasheet profile (:func:`factory.device.host_datasheet.host_datasheet`: its ISA,
   cores and clock from ``/proc/cpuinfo``; ``profiles/host_datasheet.yaml`` is the Zen 4 VM's, where
   RESULTS' figures were measured) with the generic CPU terms fitted on
   published measurements of other CPUs (:mod:`factory.device.published`), also refitted with the
   matmul-efficiency assumption at 0.8 and 1.0. Share within +-10% / +-20% / +-30%, median error.
   The published fit itself: in-sample and leave-one-device-out error per CPU.
3. Memory: predicted vs measured resident-memory growth (VmRSS) of an onnxruntime session.
4. Search speed with the kernel predictor, and with the roofline over a ViT-B space.

Usage: python bench/latency_model.py [--shapes 36] [--calibrate 10] [--batches 1,8] --json PATH [--md PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from factory import DescendantShape
from factory.core.shapes import ArchConfig
from factory.device.fit import Measurement, calibrate
from factory.device.host_datasheet import host_datasheet_profile
from factory.device.measure import measure_host, measure_onnxruntime_latency, measure_tables
from factory.device.profile import load_profile
from factory.device.published import GENERIC_CPU, fit_cpu_terms, leave_one_device_out, load_published
from factory.device.resolve import latency_model_for
from factory.device.roofline import Efficiency
from factory.device.search import SearchSpace, search
from factory.device.tables import Grids

IMG_SIZES = (96, 128, 160, 192, 224)
ANCESTRY = ArchConfig(
    embed_dim=384, depth=12, num_heads=6, mlp_hidden=1536, img_size=224, patch_size=16, num_classes=1000
)

MEMORY_PROBE = r"""
import json, sys, numpy as np, onnxruntime as ort
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
path, b, c, s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
x = np.zeros((b, c, s, s), np.float32)
before = rss_mb()
sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
sess.run(None, {"images": x})
print(json.dumps(rss_mb() - before))
"""


def measure_memory(shape: DescendantShape, batch: int) -> float:
    import tempfile
    from pathlib import Path

    from export.onnx_export import export_onnx
    from factory.core.timm_vit import build_vit

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        export_onnx(build_vit(ANCESTRY, shape, seed=0).eval(), path, img_size=shape.img_size, in_chans=3, verify=False)
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, str(path), str(batch), "3", str(shape.img_size)],
            capture_output=True,
            text=True,
            check=True,
        )
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=int, default=36, help="held-out shapes per batch size")
    parser.add_argument("--calibrate", type=int, default=10, help="shapes per batch size that fit the calibrations")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--points", type=int, default=6, help="kernel table grid points per axis")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--stat",
        choices=["median", "min"],
        default="median",
        help="statistic of the repeated runs, for the kernel tables and every whole-model time",
    )
    parser.add_argument("--memory-shapes", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--normalise",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="divide each measurement by the reference model's time just before it (machine drift)",
    )
    parser.add_argument("--json", type=Path, required=True, help="where to write the figures")
    parser.add_argument("--md", type=Path, default=None, help="where to write the Markdown tables")
    args = parser.parse_args()
    batches = tuple(int(b) for b in args.batches.split(","))
    t_start = time.perf_counter()

    host = measure_host()
    profile = load_profile("host")
    space = SearchSpace.from_arch(ANCESTRY, img_sizes=IMG_SIZES, max_depth=12)
    rng = random.Random(args.seed)
    fit = [(space.random_shape(rng), b) for b in batches for _ in range(args.calibrate)]
    held = [(space.random_shape(rng), b) for b in batches for _ in range(args.shapes)]

    # This VM's speed drifts by tens of percent over minutes (shared host). So a reference model is timed
    # just before every whole-model measurement (--normalise divides the drift out), fit and held-out
    # shapes are measured interleaved in a shuffled order, and each held-out shape is measured again at
    # a later time (that second measurement is the noise floor: same shape, same code, another moment).
    reference = (DescendantShape(6, 192, 3, 4.0, 160, 16, 1000), 1)
    drift: list[float] = []
    speed: list[float] = []  # the reference model's time just before each whole-model measurement

    def raw_measure(s, b):
        return measure_onnxruntime_latency(s, b, arch=ANCESTRY, repeats=args.repeats, stat=args.stat)

    def measure(s, b):
        """A shape's time, with the reference model timed just before it (the machine's speed then)."""
        speed.append(raw_measure(*reference))
        return raw_measure(s, b)

    def probe():
        drift.append(round(raw_measure(*reference), 4))

    # 1. the kernel tables, measured in this run
    probe()
    tables = measure_tables(ANCESTRY, Grids.for_space(space, ANCESTRY, batches, args.points), log=print, stat=args.stat)
    probe()
    # 2. whole models: fit and held-out shapes interleaved; held-out ones again later, in another order
    order = [("fit", i) for i in range(len(fit))] + [("held", i) for i in range(len(held))]
    random.Random(args.seed + 1).shuffle(order)
    measured: dict[tuple[str, int], float] = {}
    speed_at: dict = {}
    for key in order:
        s, b = (fit if key[0] == "fit" else held)[key[1]]
        measured[key] = measure(s, b)
        speed_at[key] = speed[-1]
    again_order = list(range(len(held)))
    random.Random(args.seed + 2).shuffle(again_order)
    again, again_speed = {}, {}
    for i in again_order:
        again[i] = measure(*held[i])
        again_speed[i] = speed[-1]
    drift.extend(round(v, 4) for v in speed)
    # drift-normalised times: as if the machine ran at its median speed of the run throughout
    typical = statistics.median(speed)
    if args.normalise:
        measured = {k: v * typical / speed_at[k] for k, v in measured.items()}
        again = {i: v * typical / again_speed[i] for i, v in again.items()}
    fit_rows = [(s, b, measured[("fit", i)]) for i, (s, b) in enumerate(fit)]
    tables.fit(fit_rows, ANCESTRY)
    print(f"tables: {tables.points} kernel points in {tables.seconds}s; {tables.describe_terms()}", flush=True)
    tables.save(args.json.with_name(args.json.stem + "_tables.json"))  # to re-analyse without re-measuring
    # 3. the roofline, uncalibrated and calibrated on the same shapes
    base = latency_model_for(profile.model_copy(update={"latency_tables": None}), arch=ANCESTRY, host=host)
    old = dataclasses.replace(base, efficiency=Efficiency.default_for(profile.hardware))
    cal = calibrate(base, [Measurement(s, b, t) for s, b, t in fit_rows])
    raw = dataclasses.replace(tables, terms={}, _memo={})
    datasheet = latency_model_for(host_datasheet_profile().model_copy(update={"batch": 1}), arch=ANCESTRY)
    devices, published_rows = load_published()
    variants = {}
    for e0 in (0.8, 1.0):
        terms, _ = fit_cpu_terms(devices, published_rows, dataclasses.replace(GENERIC_CPU, matmul=e0))
        variants[e0] = dataclasses.replace(datasheet, efficiency=terms)
    predictors = {
        "datasheet + published CPU terms (nothing measured here)": lambda s, b: datasheet.latency_ms(s, b),
        "the same, matmul efficiency assumed 0.8": lambda s, b: variants[0.8].latency_ms(s, b),
        "the same, matmul efficiency assumed 1.0": lambda s, b: variants[1.0].latency_ms(s, b),
        "host.yaml: measured GEMM rate + published CPU terms": lambda s, b: base.latency_ms(s, b),
        "host.yaml: measured GEMM rate + the old priors (before the published terms)": lambda s, b: old.latency_ms(
            s, b
        ),
        f"roofline, calibrated on the same {len(fit_rows)} models": lambda s, b: cal.latency_ms(s, b),
        "kernel tables, sum only": lambda s, b: raw.latency_ms(s, b, ANCESTRY),
        f"kernel tables + 3 terms per batch fitted on {args.calibrate} models each": lambda s, b: tables.latency_ms(
            s, b, ANCESTRY
        ),
    }
    rows = []
    for i, (s, b) in enumerate(held):
        first, second = measured[("held", i)], again[i]
        row = {
            "shape": s.label(),
            "batch": b,
            "measured_ms": round(first, 4),
            "remeasured_ms": round(second, 4),
            "predicted_ms": {name: round(fn(s, b), 4) for name, fn in predictors.items()},
        }
        rows.append(row)
        pm = row["predicted_ms"]
        print(
            f"{s.label():26s} b{b} measured {first:8.3f} / {second:8.3f} ms  kernel {pm[list(predictors)[-1]]:8.3f}"
            f"  datasheet+published {pm[list(predictors)[0]]:8.3f}",
            flush=True,
        )

    def summary(errs: list[float]) -> dict:
        errs = sorted(errs)
        return {
            "within_10pct": round(sum(e <= 0.10 for e in errs) / len(errs), 3),
            "within_20pct": round(sum(e <= 0.20 for e in errs) / len(errs), 3),
            "within_30pct": round(sum(e <= 0.30 for e in errs) / len(errs), 3),
            "median_abs_error": round(statistics.median(errs), 4),
        }

    per_batch = {}
    for b in batches:
        mine = [r for r in rows if r["batch"] == b]
        per_batch[b] = {
            "noise (same shape re-measured later in the run)": summary(
                [abs(r["remeasured_ms"] / r["measured_ms"] - 1) for r in mine]
            )
        }
        for name in predictors:
            per_batch[b][name] = summary([abs(r["predicted_ms"][name] / r["measured_ms"] - 1) for r in mine])
    kernel = list(predictors)[-1]
    generic = list(predictors)[0]
    _, in_sample = fit_cpu_terms(devices, published_rows)
    lodo = leave_one_device_out(devices, published_rows)
    published = {
        dev: {
            "rows": sum(r.device == dev for r in published_rows),
            "in_sample_median": round(
                statistics.median(abs(e) for e, r in zip(in_sample, published_rows) if r.device == dev), 4
            ),
            "left_out_median": round(statistics.median(abs(e) for e in lodo[dev]), 4),
            "left_out_within_30pct": round(sum(abs(e) <= 0.3 for e in lodo[dev]) / len(lodo[dev]), 3),
        }
        for dev in sorted(lodo)
    }
    memory = []
    for s, _ in held[: args.memory_shapes]:
        measured = measure_memory(s, 1)
        predicted = base.memory_mb(s)
        memory.append(
            {"shape": s.label(), "predicted_mb": round(predicted, 1), "measured_rss_growth_mb": round(measured, 1)}
        )

    # 4. search speed with the kernel predictor over the same space (and the roofline on a ViT-B space)
    kernel_cost = dataclasses.replace(base, tables=tables, method="kernel tables")
    t0 = time.perf_counter()
    ks = search(profile, space, kernel_cost)
    t_kernel = time.perf_counter() - t0
    from factory.core.ancestry import load_ancestry

    vitb = load_ancestry("random:vit_base_patch16_224").arch
    orin = load_profile("jetson_orin")
    vspace = SearchSpace.from_arch(vitb, img_sizes=(160, 192, 224))
    cost = latency_model_for(orin, arch=vitb)
    t0 = time.perf_counter()
    enum = search(orin, vspace, cost)
    t_enum = time.perf_counter() - t0

    result = {
        "machine": f"{platform.machine()}, host peak {host.peak_flops / 1e9:.1f} GFLOP/s fp32 (ViT GEMM sizes), copy bandwidth "
        f"{host.bandwidth / 1e9:.1f} GB/s, {host.threads} threads, onnxruntime {tables.host['runtime_version']}",
        "stat": args.stat,
        "repeats": args.repeats,
        "batches": list(batches),
        "held_out_per_batch": args.shapes,
        "fit_per_batch": args.calibrate,
        "table_points": tables.points,
        "table_seconds": tables.seconds,
        "reference_model": f"{reference[0].label()} b{reference[1]}",
        "reference_ms_over_the_run": drift,
        "drift_max_over_min": round(max(drift) / min(drift), 3),
        "normalised": args.normalise,
        "fitted_terms": tables.describe_terms(),
        "per_batch": {str(b): v for b, v in per_batch.items()},
        # the headline figures: the kernel predictor, over all batch sizes
        "calibrated_within_10pct": summary([abs(r["predicted_ms"][kernel] / r["measured_ms"] - 1) for r in rows])[
            "within_10pct"
        ],
        "calibrated_within_20pct": summary([abs(r["predicted_ms"][kernel] / r["measured_ms"] - 1) for r in rows])[
            "within_20pct"
        ],
        "calibrated_median_abs_error": summary([abs(r["predicted_ms"][kernel] / r["measured_ms"] - 1) for r in rows])[
            "median_abs_error"
        ],
        "calibrated_efficiency": {k: round(float(v), 4) for k, v in cal.efficiency.__dict__.items()},
        "generic_cpu_terms": {k: v for k, v in datasheet.efficiency.__dict__.items()},
        "published_fit": published,
        "generic_on_host": summary([abs(r["predicted_ms"][generic] / r["measured_ms"] - 1) for r in rows]),
        "rows": rows,
        "memory": memory,
        "search": {
            "kernel_space": ks.space_size,
            "kernel_evaluated": ks.evaluated,
            "kernel_seconds": round(t_kernel, 2),
            "vitb_space": enum.space_size,
            "vitb_roofline_seconds": round(t_enum, 2),
        },
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    if args.md:
        args.md.write_text(table + "\n")
    print(table)


def markdown(j: dict) -> str:
    """The figures as Markdown (the text pasted into bench/RESULTS.md)."""
    lines = [
        f"Machine: {j['machine']}. Per batch size: {j['held_out_per_batch']} held-out random shapes (not used to fit "
        f"anything) and {j['fit_per_batch']} shapes that fit the calibrations; kernel tables: {j['table_points']} "
        f"kernel measurements in {j['table_seconds']} s; fitted terms: {j['fitted_terms']}. Every time is the "
        f"{j.get('stat', 'median')} of its runs ({j.get('repeats', 20)} per whole model).",
        "",
    ]
    lines += [
        f"Machine drift: the reference model {j['reference_model']}, timed before every whole-model measurement, took "
        f"{min(j['reference_ms_over_the_run'])}-{max(j['reference_ms_over_the_run'])} ms over the run "
        f"({j['drift_max_over_min']}x); measurements are "
        + ("normalised by it (time x median reference / reference just before)." if j["normalised"] else "raw."),
        "",
    ]
    for b, preds in j["per_batch"].items():
        lines += [
            f"Batch {b}:",
            "",
            "| predictor | within +-10% | within +-20% | within +-30% | median abs error |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {name} | {v['within_10pct']:.0%} | {v['within_20pct']:.0%} | {v.get('within_30pct', float('nan')):.0%} | "
            f"{v['median_abs_error']:.1%} |"
            for name, v in preds.items()
        ]
        lines.append("")
    if "generic_on_host" in j:
        g = j["generic_on_host"]
        lines += [
            f"All batches, this host from its datasheet with the published CPU terms (nothing measured here): "
            f"{g['within_30pct']:.0%} within +-30%, median abs error {g['median_abs_error']:.1%}. Terms: "
            + ", ".join(f"{k} {v}" for k, v in j["generic_cpu_terms"].items())
            + ".",
            "",
            "The published fit (timm's benchmark tables; each CPU's rows predicted by the terms fitted on the other CPU alone):",
            "",
            "| CPU | rows | in-sample median error | left-out median error | left-out within +-30% |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {dev} | {v['rows']} | {v['in_sample_median']:.1%} | {v['left_out_median']:.1%} | {v['left_out_within_30pct']:.0%} |"
            for dev, v in j["published_fit"].items()
        ]
        lines.append("")
    lines += [
        f"All batches, kernel predictor: {j['calibrated_within_10pct']:.0%} within +-10%, "
        f"{j['calibrated_within_20pct']:.0%} within +-20%, median abs error {j['calibrated_median_abs_error']:.1%}.",
        "",
        "| shape | predicted MB | measured RSS growth MB |",
        "|---|---|---|",
    ]
    lines += [f"| {m['shape']} | {m['predicted_mb']} | {m['measured_rss_growth_mb']} |" for m in j["memory"]]
    sr = j["search"]
    lines += [
        "",
        f"Search speed: kernel predictor, {sr['kernel_evaluated']:,} shapes of the {sr['kernel_space']:,}-shape space in "
        f"{sr['kernel_seconds']} s; roofline, ViT-B/16 space of {sr['vitb_space']:,} shapes in {sr['vitb_roofline_seconds']} s.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
