"""One decision, not two: the default build (``--init auto`` choosing the pair shape + initialisation) against
the same build deciding the initialisation at the shape searched for PEG (``--no-joint-choice``, the old
default) and every fixed ``--init`` (each searching its own shape), in one run.

Each cell is a real ``peg-factory build`` (the Python API) of one profile on one task with the build's own
recipe (``--steps``, default 100): the shape and initialisation it shipped, its test accuracy with the
binomial standard error ``sqrt(p (1 - p) / n)``, and the build's wall time. ``gap`` is the default's
accuracy minus the best strategy's, in those standard errors.

Tasks: built-in ``digits`` and ``textures`` (bench/common.py describes them); ``mnist`` is the ancestry's own
task (a check that the joint choice does not leave PEG where it transfers).

Usage:
    python bench/joint_choice.py --json bench/out/joint_choice.json --md bench/out/joint_choice.md   # ~25 min
    python bench/joint_choice.py --quick --json /tmp/q.json                                           # smoke run
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

from common import binomial_se, run_and_write

STRATEGIES = {
    "auto (joint, default)": {"init": "auto"},
    "auto at PEG's shape (old)": {"init": "auto", "joint_choice": False},
    "peg": {"init": "peg"},
    "weight_selection": {"init": "weight_selection"},
    "tleg": {"init": "tleg"},
    "scratch": {"init": "scratch"},
}


def run(args) -> dict:
    from factory.device.profile import load_profile
    from factory.pipeline.build import build
    from factory.pipeline.config import BuildConfig

    rows = []
    profile = load_profile(args.profile)
    for task in args.tasks:
        for name, settings in STRATEGIES.items():
            if args.quick and name not in ("auto (joint, default)", "scratch"):
                continue
            cfg = BuildConfig(
                data=task, finetune_steps=args.steps, seed=args.seed, candidates=args.candidates, **settings
            )
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                manifest = build([profile], Path(out) / "b", cfg, log=lambda *_: None)
                seconds = time.perf_counter() - t0
            dev = manifest["devices"][0]
            n = sum(sum(r) for r in dev["accuracy"].get("confusion") or [[0]]) or 400
            acc = dev["accuracy"]["test"]
            rows.append(
                {
                    "task": task,
                    "strategy": name,
                    "shape": f"d{dev['shape']['depth']}-w{dev['shape']['embed_dim']}",
                    "init": dev["init"],
                    "accuracy": acc,
                    "se": binomial_se(acc, n),
                    "test_images": n,
                    "seconds": round(seconds, 1),
                    "skipped_expanding_phase": (manifest.get("expanding_phase_check") or {}).get("skipped_phase"),
                }
            )
            print(f"{task} {name}: {rows[-1]['shape']} {dev['init']} {acc:.4f} in {seconds:.0f}s", flush=True)
    return {
        "machine": platform.processor() or platform.machine(),
        "profile": args.profile,
        "steps": args.steps,
        "seed": args.seed,
        "rows": rows,
    }


def summarise(data: dict) -> str:
    lines = [
        f"Profile `{data['profile']}`, {data['steps']} fine-tuning steps, seed {data['seed']}; {data['machine']}.",
        "",
        "| task | strategy | shape | init | test acc. (SE) | gap to best (SE) | build s |",
        "|---|---|---|---|---|---|---|",
    ]
    for task in dict.fromkeys(r["task"] for r in data["rows"]):
        rows = [r for r in data["rows"] if r["task"] == task]
        best = max(r["accuracy"] for r in rows)
        for r in rows:
            gap = (r["accuracy"] - best) / r["se"] if r["se"] else 0.0
            lines.append(
                f"| {task} | {r['strategy']} | {r['shape']} | {r['init']} | {r['accuracy']:.4f} ({r['se']:.4f}) | "
                f"{gap:+.1f} | {r['seconds']:.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["digits", "textures", "mnist"])
    parser.add_argument("--profile", default="jetson_orin")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--candidates", type=int, default=8, help="shapes the accuracy search probes per device")
    parser.add_argument("--quick", action="store_true", help="two strategies, 3 candidates, 4 steps: a smoke run")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.steps, args.candidates = args.tasks[:1], min(args.steps, 4), min(args.candidates, 3)
    run_and_write(run, summarise, args)


if __name__ == "__main__":
    main()
