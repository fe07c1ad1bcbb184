"""Does the datasheet latency model get the *thread count* right? A check the published fit never saw.

The generic CPU terms (:mod:`factory.device.published`) were fitted on 14-core CPUs and checked on this
host at its 2 cores (``bench/latency_model.py``). Here the same seeded held-out shapes run under
onnxruntime with 1 and with 2 intra-op threads, the two back to back for each shape (the VM's speed drifts
over minutes, far less within one shape's pair). For each thread count ``t`` the host's datasheet profile
(:func:`factory.device.host_datasheet.host_datasheet`, from this machine's ``/proc/cpuinfo``) is resolved
with ``cores: t`` (peak ``t x`` the per-core figure) and predicts
every shape; nothing measured here fits anything.

Reported: median error per thread count, and the measured 2-thread speedup against the predicted one
(``A(n)`` and the per-thread fork-join cost set it; a constant fraction of peak would predict exactly 2x).

Usage: python bench/latency_threads.py [--shapes 24] [--repeats 20] --json PATH [--md PATH]
"""

from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path

from common import run_and_write

from factory.core.shapes import ArchConfig
from factory.device.host_datasheet import host_datasheet_profile
from factory.device.measure import measure_onnxruntime_latency
from factory.device.resolve import latency_model_for
from factory.device.search import SearchSpace

ANCESTRY = ArchConfig(
    embed_dim=384, depth=12, num_heads=6, mlp_hidden=1536, img_size=224, patch_size=16, num_classes=1000
)
IMG_SIZES = (96, 128, 160, 192, 224)
THREADS = (1, 2)


def model_for(threads: int):
    prof = host_datasheet_profile()
    hw = prof.hardware
    per_core = {k: v / hw.cores for k, v in hw.peak_tflops.items()}
    hw = hw.model_copy(update={"cores": threads, "peak_tflops": {k: v * threads for k, v in per_core.items()}})
    return latency_model_for(prof.model_copy(update={"hardware": hw}), arch=ANCESTRY)


def run(args) -> dict:
    space = SearchSpace.from_arch(ANCESTRY, img_sizes=IMG_SIZES, max_depth=12)
    rng = random.Random(args.seed)
    shapes = [space.random_shape(rng) for _ in range(args.shapes)]
    models = {t: model_for(t) for t in THREADS}
    rows = []
    for s in shapes:
        measured = {
            t: measure_onnxruntime_latency(s, 1, arch=ANCESTRY, repeats=args.repeats, threads=t) for t in THREADS
        }
        predicted = {t: models[t].latency_ms(s, 1) for t in THREADS}
        rows.append(
            {
                "shape": s.label(),
                "measured_ms": {t: round(v, 4) for t, v in measured.items()},
                "predicted_ms": {t: round(v, 4) for t, v in predicted.items()},
            }
        )
        print(
            f"{s.label():28s} 1 thread {measured[1]:8.3f} (pred {predicted[1]:8.3f})  2 threads {measured[2]:8.3f} "
            f"(pred {predicted[2]:8.3f})",
            flush=True,
        )
    per_threads = {}
    for t in THREADS:
        errs = sorted(abs(r["predicted_ms"][t] / r["measured_ms"][t] - 1) for r in rows)
        per_threads[t] = {
            "median_abs_error": round(statistics.median(errs), 4),
            "within_30pct": round(sum(e <= 0.3 for e in errs) / len(errs), 3),
        }
    speedup = {
        "measured_median": round(statistics.median(r["measured_ms"][1] / r["measured_ms"][2] for r in rows), 3),
        "predicted_median": round(statistics.median(r["predicted_ms"][1] / r["predicted_ms"][2] for r in rows), 3),
        "median_abs_error": round(
            statistics.median(
                abs((r["predicted_ms"][1] / r["predicted_ms"][2]) / (r["measured_ms"][1] / r["measured_ms"][2]) - 1)
                for r in rows
            ),
            4,
        ),
    }
    datasheet = host_datasheet_profile().hardware
    return {
        "gflops_per_core": round(datasheet.peak_tflops["fp32"] / datasheet.cores * 1000, 2),
        "datasheet_source": datasheet.source,
        "shapes": args.shapes,
        "repeats": args.repeats,
        "seed": args.seed,
        "per_threads": per_threads,
        "speedup_2_threads": speedup,
        "rows": rows,
    }


def summarise(data: dict) -> str:
    lines = [
        f"{data['shapes']} seeded held-out shapes (batch 1, median of {data['repeats']} runs), each timed with 1 and "
        "2 onnxruntime threads back to back; predicted by `host_datasheet` with `cores` set to the thread count.",
        "",
        "| threads | predicted peak GFLOP/s | median abs error | within +-30% |",
        "|---|---|---|---|",
    ]
    for t, v in data["per_threads"].items():
        per_core = data.get("gflops_per_core", 83.2)  # runs before the datasheet came from the machine: the Zen 4 VM's
        lines.append(f"| {t} | {per_core * int(t):.1f} | {v['median_abs_error']:.1%} | {v['within_30pct']:.0%} |")
    s = data["speedup_2_threads"]
    lines += [
        "",
        f"2-thread speedup over 1 thread: measured median {s['measured_median']}x, predicted median "
        f"{s['predicted_median']}x (per-shape error of the predicted speedup: median {s['median_abs_error']:.1%}).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7, help="seed of the shapes (latency_model.py uses 0)")
    parser.add_argument("--json", type=Path, default=None, help="raw results")
    parser.add_argument("--md", type=Path, default=None, help="Markdown table")
    run_and_write(run, summarise, parser.parse_args())


if __name__ == "__main__":
    main()
