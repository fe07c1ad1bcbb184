"""Fleet scaling: one 20-profile fleet built by each executor, from a cold cache every time.

The fleet is synthetic (``make_fleet``): CPU boards with onnxruntime and GPU boards with TensorRT,
latency / memory / parameter budgets drawn log-uniformly so that profiles share some shapes and
not others. Each executor builds it with ``peg-factory build --fleet`` in a fresh process and a
fresh ``--out`` (so Ray's start-up is included): ``local --jobs 1``, ``local --jobs 2`` and
``ray`` (a local Ray instance on all this machine's CPUs, 1 CPU per task). Reported: wall
time, distinct shapes fine-tuned, learngene stages, devices built, Ray's bare start-up time, and
whether the manifest (shape, model and ONNX sha256 per device) equals that of ``local --jobs 2``,
which pins the same one thread per fine-tune as 1-CPU Ray tasks.

Usage:
    python bench/fleet_scale.py --json bench/out/fleet_scale.json --md bench/out/fleet_scale.md
    python bench/fleet_scale.py --profiles 4 --steps 10 --json /tmp/f.json     # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

from common import write_outputs

ROOT = Path(__file__).resolve().parent.parent

CPU_BOARD = {
    "kind": "cpu",
    "peak_tflops": {"fp32": 0.2},
    "memory_bandwidth_gbs": 17,
    "memory_mb": 2048,
    "runtime": "onnxruntime",
    "source": "synthetic fleet bench",
}
GPU_BOARD = {
    "kind": "gpu",
    "peak_tflops": {"fp32": 1.3, "fp16": 10.0},
    "memory_bandwidth_gbs": 60,
    "memory_mb": 4096,
    "runtime": "tensorrt",
    "source": "synthetic fleet bench",
}


def make_fleet(directory: Path, n: int, seed: int = 0) -> Path:
    """``n`` profiles with varied budgets and a fleet file listing them; returns the fleet file."""
    import yaml

    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        gpu = i % 4 == 3
        budgets = {
            "latency_ms": round(math.exp(rng.uniform(math.log(0.3), math.log(3.0))), 3),
            "params_m": round(math.exp(rng.uniform(math.log(0.3), math.log(3.0))), 3),
        }
        if rng.random() < 0.5:
            budgets["memory_mb"] = round(rng.uniform(8, 64), 1)
        profile = {
            "name": f"dev{i:02d}",
            "description": f"synthetic {'GPU' if gpu else 'CPU'} board {i}",
            "hardware": GPU_BOARD if gpu else CPU_BOARD,
            "precision": "fp16" if gpu else "fp32",
            "batch": 1,
            "budgets": budgets,
            "export": ["onnx"],
        }
        (directory / f"dev{i:02d}.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
        names.append(f"dev{i:02d}.yaml")
    fleet = directory / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"profiles": names}))
    return fleet


def build(fleet: Path, out: Path, steps: int, extra: list[str]) -> tuple[float, dict, str]:
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    cmd = [
        sys.executable,
        "-m",
        "factory.cli",
        "build",
        "--fleet",
        str(fleet),
        "--out",
        str(out),
        "--steps",
        str(steps),
        *extra,
    ]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if done.returncode not in (0, 2) or not (out / "manifest.json").is_file():
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return seconds, json.loads((out / "manifest.json").read_text()), done.stdout


def identity(manifest: dict) -> list:
    return [
        (
            d["name"],
            d.get("shape"),
            d.get("artifacts", {}).get("model", {}).get("sha256"),
            d.get("artifacts", {}).get("onnx", {}).get("sha256"),
        )
        for d in manifest["devices"]
    ]


def ray_startup(cpus: int) -> float:
    # what a Ray build pays before its first fine-tune and local threads do not: the instance, and workers that
    # import torch and factory and load the ancestry and data (the driver has them already)
    code = (
        "import time, ray; t = time.perf_counter(); ray.init(num_cpus=%d, include_dashboard=False)\n"  # noqa: UP031
        "@ray.remote(num_cpus=1)\ndef warm():\n    import factory.pipeline.build, torch\n"
        "    from factory.core.ancestry import load_ancestry\n"
        "    from factory.data import load_dataset\n    load_dataset('digits', 28, 1); load_ancestry('demo'); return 1\n"
        "ray.get([warm.remote() for _ in range(%d)]); print(time.perf_counter() - t); ray.shutdown()" % (cpus, cpus)
    )
    return float(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1]
    )


def run(args) -> dict:
    t_start = time.perf_counter()
    work = Path(args.work)
    fleet = make_fleet(work / "profiles", args.profiles, args.seed)
    runs = {
        "local --jobs 1": ["--jobs", "1"],
        "local --jobs 2": ["--jobs", "2"],
        f"ray (local instance, {os.cpu_count()} CPUs, 1 per task)": ["--executor", "ray", "--task-cpus", "1"],
    }
    rows, manifests = [], {}
    for label, extra in runs.items():
        out = work / label.split(" (")[0].replace(" ", "_").replace("-", "")
        if out.exists():
            import shutil

            shutil.rmtree(out)
        seconds, manifest, log = build(fleet, out, args.steps, extra)
        manifests[label] = manifest
        ok = [d for d in manifest["devices"] if d["status"] == "ok"]
        rows.append(
            {
                "executor": label,
                "seconds": round(seconds, 1),
                "devices_ok": len(ok),
                "devices": len(manifest["devices"]),
                "distinct_shapes": len(list((out / ".cache" / "finetune").iterdir())),
                "learngene_stages": len(list((out / ".cache" / "learngene").iterdir())),
            }
        )
        print(f"{label}: {seconds:.1f}s, {len(ok)}/{len(manifest['devices'])} ok", flush=True)
    reference = identity(manifests["local --jobs 2"])
    for row in rows:
        row["same_manifest_as_jobs2"] = identity(manifests[row["executor"]]) == reference
    return {
        "rows": rows,
        "ray_startup_s": round(ray_startup(os.cpu_count() or 1), 2),
        "steps": args.steps,
        "profiles": args.profiles,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
    }


def table(data: dict) -> str:
    lines = [
        f"Fleet of {data['profiles']} synthetic profiles, {data['steps']} fine-tuning steps per shape, cold cache per run; "
        f"{data['machine']}; Ray start-up (init + workers importing torch and factory, loading ancestry and data) "
        f"{data['ray_startup_s']} s.",
        "",
        "| executor | wall s | vs jobs 1 | devices ok | distinct shapes | learngene stages | same manifest as --jobs 2 |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    base = data["rows"][0]["seconds"]
    for r in data["rows"]:
        lines.append(
            f"| {r['executor']} | {r['seconds']} | {base / r['seconds']:.2f}x | {r['devices_ok']}/{r['devices']} | "
            f"{r['distinct_shapes']} | {r['learngene_stages']} | {'yes' if r['same_manifest_as_jobs2'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profiles", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/peg-fleet-bench")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "fleet_scale.json")
    parser.add_argument("--md", type=Path, default=ROOT / "bench" / "out" / "fleet_scale.md")
    args = parser.parse_args()
    data = run(args)
    write_outputs(data, table(data), args.json, args.md)


if __name__ == "__main__":
    main()
