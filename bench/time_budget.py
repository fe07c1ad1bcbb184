"""A wall-clock budget, measured: how true the dry run's total is, how close a budgeted build comes to its
budget, and what each strategy ships when every one is given the same time.

Three parts, one run (the Python API, ``factory.pipeline.build.build``):

- ``plan``: without a budget, the dry run's total (``total_estimate_s``: measured fine-tuning steps, the
  measure stage's reference round times each format's cost) against the real build's seconds, for one
  profile and for the demo fleet (3 devices), fresh output folders. Target: within +-25%.
- ``equal``: for each budget, task and strategy, a build of ``--profile`` with ``--time-budget B`` and a
  learngene that must be trained (``--expand-steps CAP``: not the shipped recipe's 1,500, so nothing is
  free). The default (``--init auto``: the joint choice; the expanding phase only where the ancestry
  transfers, planned to its share of the budget) against fixed ``peg`` (the phase always, split with the
  fine-tune), ``weight_selection`` and ``scratch`` (no phase: the whole budget fine-tunes). Per cell: the
  shipped shape, init, planned expanding/fine-tuning steps, test accuracy (binomial SE), the build's
  seconds and its ratio to the budget (target <= 1.15). ``gap``: the default minus the best strategy, in SE.

Tasks: ``digits`` and ``textures`` (bench/common.py) and ``mnist-unseen`` written as an ImageFolder (2,000
images of MNIST's validation split to train, 500 + 2,000 of its test split to validate and test: digits
the ancestry never trained on).

Usage:
    python bench/time_budget.py --json bench/out/time_budget.json --md bench/out/time_budget.md
    python bench/time_budget.py --quick --json /tmp/q.json        # smoke run: one task, two strategies, 2 min
"""

from __future__ import annotations

import argparse
import math
import platform
import tempfile
import time
from pathlib import Path

from common import run_and_write

STRATEGIES = {
    "auto (default)": {"init": "auto"},
    "peg": {"init": "peg"},
    "weight_selection": {"init": "weight_selection"},
    "scratch": {"init": "scratch"},
}


def mnist_unseen_folder(root: Path) -> str:
    """MNIST images the demo ancestry never trained on, as an ImageFolder (train/val/test)."""
    from PIL import Image

    from factory.data import load_dataset

    mnist = load_dataset("mnist", img_size=28)
    splits = {
        "train": mnist.val.subset(0, 2000),
        "val": mnist.test.subset(0, 500),
        "test": mnist.test.subset(500, 2500),
    }
    for split, data in splits.items():
        images = data.images * 0.3081 + 0.1307  # un-normalise (MNIST's mean and std)
        for i, (x, y) in enumerate(zip(images, data.labels.tolist())):
            folder = root / split / str(y)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((x[0].clamp(0, 1) * 255).round().byte().numpy(), "L").save(folder / f"{i}.png")
    return str(root)


def _task_spec(task: str, scratch: Path) -> str:
    return mnist_unseen_folder(scratch / "mnist-unseen") if task == "mnist-unseen" else task


def plan_part(args, log) -> list[dict]:
    from factory.device.profile import load_profile
    from factory.pipeline.build import build
    from factory.pipeline.config import BuildConfig
    from factory.pipeline.fleet import load_fleet

    rows = []
    fleets = {
        args.profile: [load_profile(args.profile)],
        "demo fleet": [load_profile(p) for p in load_fleet(Path("profiles/demo/fleet.yaml"))],
    }
    for name, profiles in fleets.items():
        if args.quick and name == "demo fleet":
            continue
        cfg = BuildConfig(data="digits", finetune_steps=args.steps)
        with tempfile.TemporaryDirectory() as out:
            dry = build(profiles, Path(out) / "b", cfg, dry_run=True, log=log)
            t0 = time.perf_counter()
            build(profiles, Path(out) / "b", cfg, log=log)
            seconds = time.perf_counter() - t0
        rows.append(
            {
                "what": name,
                "devices": len(profiles),
                "estimate_s": dry["total_estimate_s"],
                "stages": {r["stage"]: r["estimate_s"] for r in dry["stages"]},
                "measured_s": round(seconds, 1),
                "ratio": round(seconds / dry["total_estimate_s"], 3),
            }
        )
        print(f"plan {name}: estimated {dry['total_estimate_s']:.0f}s, measured {seconds:.0f}s", flush=True)
    return rows


def equal_part(args, log) -> list[dict]:
    from factory.device.profile import load_profile
    from factory.pipeline.build import build
    from factory.pipeline.config import BuildConfig

    rows = []
    profile = load_profile(args.profile)
    with tempfile.TemporaryDirectory() as scratch:
        for task in args.tasks:
            data = _task_spec(task, Path(scratch))
            for budget in args.budgets:
                for name, settings in STRATEGIES.items():
                    if args.quick and name not in ("auto (default)", "scratch"):
                        continue
                    for seed in args.seeds:
                        cfg = BuildConfig(
                            data=data,
                            seed=seed,
                            expand_steps=args.expand_cap,
                            time_budget_s=budget,
                            **settings,
                        )
                        with tempfile.TemporaryDirectory() as out:
                            t0 = time.perf_counter()
                            manifest = build([profile], Path(out) / "b", cfg, log=log)
                            seconds = time.perf_counter() - t0
                        rows.append(_row(task, name, seed, budget, manifest, seconds))
                        r = rows[-1]
                        print(
                            f"{task} {budget:.0f}s {name} seed {seed}: {r['shape']} {r['init']} E={r['expand_steps']} "
                            f"N={r['finetune_steps']} acc {r['accuracy']:.4f} in {seconds:.0f}s ({r['ratio']:.2f}x)",
                            flush=True,
                        )
    return rows


def _row(task, name, seed, budget, manifest, seconds) -> dict:
    dev = manifest["devices"][0]
    record = manifest["time_budget"]
    first = record["plans"]["first"]
    n = sum(sum(r) for r in dev["accuracy"].get("confusion") or [[0]]) or 1
    acc = dev["accuracy"]["test"]
    lg = (manifest["learngene"].get("recipe") or {}).get("expanding") or {}
    return {
        "task": task,
        "strategy": name,
        "seed": seed,
        "budget_s": budget,
        "shape": f"d{dev['shape']['depth']}-w{dev['shape']['embed_dim']}",
        "init": dev["init"],
        "expand_steps": lg.get("steps", 0),
        "finetune_steps": dev["finetune"]["steps"],
        "planned_first": first,
        "accuracy": acc,
        "se": math.sqrt(max(acc * (1 - acc), 1e-12) / n),
        "test_images": n,
        "seconds": round(seconds, 1),
        "ratio": round(seconds / budget, 3),
        "measured": record["measured_s"],
        "skipped_expanding_phase": (manifest.get("expanding_phase_check") or {}).get("skipped_phase"),
    }


def run(args) -> dict:
    lines: list[str] = []
    return {
        "machine": platform.processor() or platform.machine(),
        "profile": args.profile,
        "expand_cap": args.expand_cap,
        "plan": plan_part(args, lines.append),
        "equal": equal_part(args, lines.append),
    }


def summarise(data: dict) -> str:
    out = [
        f"Machine {data['machine']}; profile `{data['profile']}`; expanding phase capped at {data['expand_cap']} steps.",
        "",
        "**The dry run's total against the build** (no budget, fresh folders, digits):",
        "",
        "| build | devices | estimated s | measured s | measured / estimated |",
        "|---|---|---|---|---|",
    ]
    for r in data["plan"]:
        out.append(
            f"| {r['what']} | {r['devices']} | {r['estimate_s']:.0f} | {r['measured_s']:.0f} | {r['ratio']:.2f} |"
        )
    out += [
        "",
        "**Equal wall time** (each strategy given the same `--time-budget`):",
        "",
        "| task | budget | strategy | seed | shape | init | E | N | test acc. (SE) | gap to best (SE) | build s | / budget |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = data["equal"]
    for key in dict.fromkeys((r["task"], r["budget_s"], r["seed"]) for r in rows):
        cell = [r for r in rows if (r["task"], r["budget_s"], r["seed"]) == key]
        best = max(r["accuracy"] for r in cell)
        for r in cell:
            gap = (r["accuracy"] - best) / r["se"] if r["se"] else 0.0
            out.append(
                f"| {r['task']} | {r['budget_s']:.0f}s | {r['strategy']} | {r['seed']} | {r['shape']} | {r['init']} | "
                f"{r['expand_steps']} | {r['finetune_steps']} | {r['accuracy']:.4f} ({r['se']:.4f}) | {gap:+.1f} | "
                f"{r['seconds']:.0f} | {r['ratio']:.2f} |"
            )
    ratios = [r["ratio"] for r in rows]
    if ratios:
        within = sum(r <= 1.15 for r in ratios)
        out += ["", f"Builds within 1.15x their budget: {within} of {len(ratios)} (max {max(ratios):.2f}x)."]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["digits", "textures", "mnist-unseen"])
    parser.add_argument("--profile", default="jetson_orin")
    parser.add_argument("--budgets", nargs="+", type=float, default=[180.0], help="seconds")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--expand-cap", type=int, default=400)
    parser.add_argument("--steps", type=int, default=100, help="fine-tuning steps of the plan part's builds")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.budgets, args.steps = args.tasks[:1], [min(args.budgets[0], 120.0)], 20
    run_and_write(run, summarise, args)


if __name__ == "__main__":
    main()
