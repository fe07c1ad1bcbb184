"""How honest are the latency and memory models on this host (onnxruntime CPU)?

1. Draw ``--shapes`` random descendant shapes of a ViT-S-like ancestry (seeded), at batch 1.
2. Measure each with onnxruntime (export, warm-up, median of repeats).
3. Predict with the uncalibrated roofline of ``profiles/host.yaml`` (host peak and bandwidth
   measured, default efficiencies), and with the model calibrated on ``--calibrate`` of the
   measured shapes; report the share of the *other* shapes within +-10% (and +-20%).
4. Memory: predicted vs measured resident-memory growth (VmRSS) of an onnxruntime session that
   loads the model and runs it once (a subprocess per shape, so allocations don't overlap).
5. Search speed: time to search >= 10,000 candidate shapes of a ViT-B ancestry for Jetson Orin.

Usage: python bench/latency_model.py [--shapes 36] [--calibrate 10] [--seed 0] --json PATH [--md PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

from factory import DescendantShape
from factory.cost import CostModel, Measurement, calibrate, measure_host, measure_onnxruntime_latency
from factory.profile import load_profile
from factory.search import SearchSpace, search
from factory.shapes import ArchConfig

ANCESTRY = ArchConfig(embed_dim=384, depth=12, num_heads=6, mlp_hidden=1536, img_size=224, patch_size=16, num_classes=1000)

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


def random_shapes(n: int, seed: int) -> list[DescendantShape]:
    space = SearchSpace.from_arch(ANCESTRY, img_sizes=(96, 128, 160, 192, 224), max_depth=12)
    rng = random.Random(seed)
    return [space.random_shape(rng) for _ in range(n)]


def measure_memory(shape: DescendantShape, batch: int) -> float:
    import tempfile
    from pathlib import Path


    from export.onnx_export import export_onnx
    from factory.timm_vit import build_vit

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        export_onnx(build_vit(ANCESTRY, shape, seed=0).eval(), path, img_size=shape.img_size, in_chans=3, verify=False)
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path), str(batch), "3", str(shape.img_size)],
                             capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=int, default=36)
    parser.add_argument("--calibrate", type=int, default=10)
    parser.add_argument("--memory-shapes", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, required=True, help="where to write the figures")
    parser.add_argument("--md", type=Path, default=None, help="where to write the Markdown tables")
    args = parser.parse_args()

    host = measure_host()
    profile = load_profile("host")
    base = CostModel.for_profile(profile, arch=ANCESTRY, host=host)
    shapes = random_shapes(args.shapes, args.seed)
    rows = []
    for s in shapes:
        ms = measure_onnxruntime_latency(s, 1, arch=ANCESTRY, repeats=15)
        rows.append(Measurement(s, 1, ms))
        print(f"{s.label():26s} measured {ms:8.3f} ms  roofline {base.latency_ms(s):8.3f} ms", flush=True)
    fit_rows, test_rows = rows[: args.calibrate], rows[args.calibrate :]
    cal = calibrate(base, fit_rows)

    def share(model: CostModel, data: list[Measurement], tol: float) -> float:
        return sum(abs(model.latency_ms(r.shape) / r.latency_ms - 1) <= tol for r in data) / len(data)

    def errors(model: CostModel, data: list[Measurement]) -> list[float]:
        return sorted(abs(model.latency_ms(r.shape) / r.latency_ms - 1) for r in data)

    memory = []
    for s in shapes[: args.memory_shapes]:
        measured = measure_memory(s, 1)
        predicted = base.memory_mb(s)
        memory.append({"shape": s.label(), "predicted_mb": round(predicted, 1), "measured_rss_growth_mb": round(measured, 1)})
        print(f"{s.label():26s} memory predicted {predicted:7.1f} MB, measured RSS growth {measured:7.1f} MB", flush=True)

    from factory.ancestry import load_ancestry

    vitb = load_ancestry("random:vit_base_patch16_224").arch
    orin = load_profile("jetson_orin")
    space = SearchSpace.from_arch(vitb, img_sizes=(160, 192, 224))
    cost = CostModel.for_profile(orin, arch=vitb)
    t0 = time.perf_counter()
    enum = search(orin, space, cost)
    t_enum = time.perf_counter() - t0
    t0 = time.perf_counter()
    evo = search(orin, space, cost, enumerate_limit=1000, evaluations=10_000)
    t_evo = time.perf_counter() - t0

    result = {
        "machine": f"{platform.machine()}, host peak {host.peak_flops / 1e9:.1f} GFLOP/s fp32, copy bandwidth "
                   f"{host.bandwidth / 1e9:.1f} GB/s, {host.threads} threads",
        "shapes": len(rows),
        "calibrated_on": len(fit_rows),
        "evaluated_on": len(test_rows),
        "uncalibrated_within_10pct": round(share(base, test_rows, 0.10), 3),
        "uncalibrated_within_20pct": round(share(base, test_rows, 0.20), 3),
        "uncalibrated_median_abs_error": round(errors(base, test_rows)[len(test_rows) // 2], 3),
        "calibrated_within_10pct": round(share(cal, test_rows, 0.10), 3),
        "calibrated_within_20pct": round(share(cal, test_rows, 0.20), 3),
        "calibrated_median_abs_error": round(errors(cal, test_rows)[len(test_rows) // 2], 3),
        "calibrated_efficiency": {k: round(float(v), 4) for k, v in cal.efficiency.__dict__.items()},
        "memory": memory,
        "search": {
            "space": enum.space_size, "enumerate_seconds": round(t_enum, 2), "evolutionary_evaluations": evo.evaluated,
            "evolutionary_seconds": round(t_evo, 2), "best_enumerated": enum.feasible[0].shape.label(),
            "best_evolutionary": evo.feasible[0].shape.label(),
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    if args.md:
        args.md.write_text(table + "\n")
    print(table)


def markdown(j: dict) -> str:
    """The figures as Markdown (the text pasted into bench/RESULTS.md)."""
    lines = [f"Machine: {j['machine']}. {j['shapes']} shapes, calibrated on {j['calibrated_on']}, evaluated on the other "
             f"{j['evaluated_on']}.", "",
             "| model | within +-10% | within +-20% | median abs error |", "|---|---|---|---|",
             f"| roofline, uncalibrated | {j['uncalibrated_within_10pct']:.0%} | {j['uncalibrated_within_20pct']:.0%} | "
             f"{j['uncalibrated_median_abs_error']:.0%} |",
             f"| roofline, calibrated on {j['calibrated_on']} measurements | {j['calibrated_within_10pct']:.0%} | "
             f"{j['calibrated_within_20pct']:.0%} | {j['calibrated_median_abs_error']:.0%} |", "",
             "Fitted efficiencies: " + ", ".join(f"{k} {float(v):.3g}" for k, v in j["calibrated_efficiency"].items()) + ".", "",
             "| shape | predicted MB | measured RSS growth MB |", "|---|---|---|"]
    lines += [f"| {m['shape']} | {m['predicted_mb']} | {m['measured_rss_growth_mb']} |" for m in j["memory"]]
    sr = j["search"]
    lines += ["", f"Search speed (ViT-B/16 ancestry, Jetson Orin, inputs 160/192/224): {sr['space']:,} shapes enumerated in "
              f"{sr['enumerate_seconds']} s; evolutionary search of {sr['evolutionary_evaluations']:,} shapes in "
              f"{sr['evolutionary_seconds']} s; picks {sr['best_enumerated']} / {sr['best_evolutionary']}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
