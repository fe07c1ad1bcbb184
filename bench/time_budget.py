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
  fine-tune), ``weight_selection`` and ``scratch`` (no phase: the whole budget fine-tunes); ``auto (equal
  steps)`` is the default with ``--budget-split steps`` (every shape of the fleet the same fine-tuning steps,
  not the same time: factory.pipeline.time_budget, "equal time per shape"). Per cell: the
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
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import binomial_se, mnist_unseen, run_and_write, write_folder

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = {
    "auto (default)": {"init": "auto"},
    "auto (equal steps)": {"init": "auto", "budget_split": "steps"},  # the default before equal time per shape
    "auto (last weights)": {"init": "auto", "keep_weights": "last"},  # the default before --keep-weights best-val
    "auto (no sharing)": {"init": "auto", "share_within": 0.0},  # the default before a fleet's devices shared shapes
    "auto (share within 1 SE)": {"init": "auto", "share_within": 1.0},  # the first default of --share-within
    "auto (share within 3 SE)": {"init": "auto", "share_within": 3.0},  # a wider --share-within
    "peg": {"init": "peg"},
    "weight_selection": {"init": "weight_selection"},
    "scratch": {"init": "scratch"},
}


def mnist_unseen_folder(root: Path) -> str:
    """MNIST images the demo ancestry never trained on, as an ImageFolder (train/val/test)."""
    return write_folder(mnist_unseen(), root)


def _task_spec(task: str, scratch: Path) -> str:
    """The build's ``--data`` for ``task``; ``photos224``: a generated 224-px RGB ImageFolder (5 classes, 300
    training images; :func:`factory.data.generate.write_image_folder`) for a 224-px ancestry -- random pixels
    with class structure, so its accuracies say nothing: the row is for time and choices."""
    if task == "mnist-unseen":
        return mnist_unseen_folder(scratch / "mnist-unseen")
    if task == "photos224":
        from factory.data.generate import write_image_folder

        return str(
            write_image_folder(
                scratch / "photos224", classes=5, size=256, per_class={"train": 60, "val": 10, "test": 20}
            )
        )
    return task


def _cli_build(specs: list[str], out: Path, steps: int, *, dry_run: bool) -> tuple[str, float]:
    """``peg-factory build`` in a fresh process, as a user runs it: its output and wall seconds."""
    cmd = [sys.executable, "-m", "factory.cli", "build", *[a for s in specs for a in ("--profile", s)]]
    cmd += ["--out", str(out), "--data", "digits", "--steps", str(steps), *(["--dry-run"] if dry_run else [])]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    return res.stdout + res.stderr, seconds


def plan_part(args, log) -> list[dict]:
    """The dry run's total against the build's seconds. ``--process fresh`` (default): each a fresh
    ``peg-factory build`` process, as a user runs them (the build's seconds include the interpreter's start);
    ``same``: both through the Python API in this process (the build then finds imports, data and the
    ancestry warm from the dry run, so it is faster than a user's)."""
    from factory.device.profile import load_profile
    from factory.pipeline.build import build
    from factory.pipeline.config import BuildConfig

    rows = []
    fleets = {args.profile: [args.profile], "demo fleet": _fleet_specs()}
    for name, specs in fleets.items():
        if args.quick and name == "demo fleet":
            continue
        with tempfile.TemporaryDirectory() as out:
            if args.process == "fresh":
                text, _ = _cli_build(specs, Path(out) / "b", args.steps, dry_run=True)
                found = re.search(r"plan: total ~(\d+)s", text)
                if found is None:
                    raise RuntimeError(f"the dry run printed no total:\n{text[-2000:]}")
                estimate, stages = float(found.group(1)), {}
                _, seconds = _cli_build(specs, Path(out) / "b", args.steps, dry_run=False)
            else:
                profiles = [load_profile(s) for s in specs]
                cfg = BuildConfig(data="digits", finetune_steps=args.steps)
                dry = build(profiles, Path(out) / "b", cfg, dry_run=True, log=log)
                estimate, stages = dry["total_estimate_s"], {r["stage"]: r["estimate_s"] for r in dry["stages"]}
                t0 = time.perf_counter()
                build(profiles, Path(out) / "b", cfg, log=log)
                seconds = time.perf_counter() - t0
        rows.append(
            {
                "what": name,
                "devices": len(specs),
                "process": args.process,
                "estimate_s": estimate,
                "stages": stages,
                "measured_s": round(seconds, 1),
                "ratio": round(seconds / estimate, 3),
            }
        )
        print(f"plan {name}: estimated {estimate:.0f}s, measured {seconds:.0f}s", flush=True)
    return rows


def equal_part(args, log) -> list[dict]:
    from factory.device.profile import load_profile
    from factory.pipeline.build import build
    from factory.pipeline.config import BuildConfig

    rows = []
    specs = _profile_specs(args.profile)
    profiles = [load_profile(s) for s in specs]
    with tempfile.TemporaryDirectory() as scratch:
        for task in args.tasks:
            data = _task_spec(task, Path(scratch))
            for budget in args.budgets:
                for name, settings in STRATEGIES.items():
                    if name not in args.strategies or (args.quick and name not in ("auto (default)", "scratch")):
                        continue
                    for seed in args.seeds:
                        cfg = BuildConfig(
                            data=data,
                            seed=seed,
                            expand_steps=args.expand_cap,
                            time_budget_s=budget,
                            **({"ancestry": args.ancestry} if args.ancestry else {}),
                            **settings,
                        )
                        with tempfile.TemporaryDirectory() as out:
                            t0 = time.perf_counter()
                            manifest = build(profiles, Path(out) / "b", cfg, log=log)
                            seconds = time.perf_counter() - t0
                        for dev in manifest["devices"]:
                            rows.append(_row(task, name, seed, budget, manifest, dev, seconds))
                            r = rows[-1]
                            print(
                                f"{task} {budget:.0f}s {name} seed {seed} {r['device']}: {r['shape']} {r['init']} "
                                f"E={r['expand_steps']} N={r['finetune_steps']} acc {r['accuracy']:.4f} in "
                                f"{seconds:.0f}s ({r['ratio']:.2f}x)",
                                flush=True,
                            )
    return rows


def _fleet_specs(path: Path = ROOT / "profiles/demo/fleet.yaml") -> list[str]:
    """A fleet file's profile paths (default the demo fleet's, ``--profile demo-fleet``)."""
    from factory.pipeline.fleet import load_fleet

    return [str(p) for p in load_fleet(path)]


def _profile_specs(profile: str) -> list[str]:
    """``--profile``'s devices: the demo fleet, every profile of a fleet file (a YAML with ``profiles:``), or one
    profile."""
    if profile == "demo-fleet":
        return _fleet_specs()
    if profile.endswith((".yaml", ".yml")) and Path(profile).is_file():
        import yaml

        doc = yaml.safe_load(Path(profile).read_text())
        if isinstance(doc, dict) and "profiles" in doc:
            return _fleet_specs(Path(profile))
    return [profile]


def _row(task, name, seed, budget, manifest, dev, seconds) -> dict:
    """One device's row of one build (``seconds``: the whole build's, shared by its devices)."""
    record = manifest["time_budget"]
    first = record["plans"]["first"]
    n = sum(sum(r) for r in dev["accuracy"].get("confusion") or [[0]]) or 1
    acc = dev["accuracy"]["test"]
    lg = (manifest["learngene"].get("recipe") or {}).get("expanding") or {}
    pace = dev["finetune"].get("pace") or {}  # a paced fine-tune's (factory.pipeline.pacing)
    selection = dev.get("selection") or {}
    decision = next((r.get("decision") for r in selection.get("candidates", []) if r["chosen"]), None) or {}
    return {
        "task": task,
        "device": dev["name"],
        "strategy": name,
        "seed": seed,
        "budget_s": budget,
        "shape": f"d{dev['shape']['depth']}-w{dev['shape']['embed_dim']}",
        "init": dev["init"],
        "expand_steps": lg.get("steps", 0),
        "finetune_steps": dev["finetune"]["steps"],
        "finetune_planned_steps": pace.get("planned_steps", dev["finetune"]["steps"]),  # the plan's N
        "finetune_allotted_s": pace.get("allotted_s"),
        "finetune_s": dev["finetune"]["seconds"],
        "kept_step": dev["finetune"].get("kept_step"),  # --keep-weights best-val: the step whose weights shipped
        "planned_first": first,
        "accuracy": acc,
        "se": binomial_se(acc, n),
        "test_images": n,
        "seconds": round(seconds, 1),
        "ratio": round(seconds / budget, 3),
        "measured": record["measured_s"],
        "skipped_expanding_phase": (manifest.get("expanding_phase_check") or {}).get("skipped_phase"),
        "shares_fine_tune_with": selection.get("shares_fine_tune_with", []),  # a fleet's devices on one fine-tune
        "shared": decision.get("shared"),  # took another device's shape over its own best (within noise)
        "not_shared": decision.get("not_shared"),  # the other devices' shapes it probed, and how far they were
    }


def _steps(r: dict) -> str:
    """The fine-tuning steps that ran; a paced fine-tune's with its planned count and its time against its
    allotment (``ran/planned (seconds/allotted)``); ``, kept k`` where the weights of step ``k`` shipped."""
    planned, allotted = r.get("finetune_planned_steps", r["finetune_steps"]), r.get("finetune_allotted_s")
    kept = r.get("kept_step")
    kept = f", kept {kept}" if kept is not None and kept < r["finetune_steps"] else ""
    if not allotted:
        return f"{r['finetune_steps']}{kept}"
    return f"{r['finetune_steps']}/{planned} ({r['finetune_s']:.0f}/{allotted:.0f}s{kept})"


def run(args) -> dict:
    lines: list[str] = []
    return {
        "machine": platform.processor() or platform.machine(),
        "profile": args.profile,
        "expand_cap": args.expand_cap,
        "ancestry": args.ancestry or "demo",
        "plan": plan_part(args, lines.append) if "plan" in args.parts else [],
        "equal": equal_part(args, lines.append) if "equal" in args.parts else [],
    }


def summarise(data: dict) -> str:
    out = [
        f"Machine {data['machine']}; profile `{data['profile']}`; ancestry {data.get('ancestry', 'demo')}; expanding phase "
        f"capped at {data['expand_cap']} steps.",
    ]
    if data["plan"]:
        out += [
            "",
            "**The dry run's total against the build** (no budget, fresh folders, digits; process: "
            f"{', '.join(sorted({r.get('process', 'same') for r in data['plan']}))}):",
            "",
            "| build | devices | estimated s | measured s | measured / estimated |",
            "|---|---|---|---|---|",
        ]
    for r in data["plan"]:
        out.append(
            f"| {r['what']} | {r['devices']} | {r['estimate_s']:.0f} | {r['measured_s']:.0f} | {r['ratio']:.2f} |"
        )
    if data["equal"]:
        out += [
            "",
            "**Equal wall time** (each strategy given the same `--time-budget`):",
            "",
            "| task | budget | device | strategy | seed | shape | init | E | N (paced: ran/planned (s/allotted)) | "
            "test acc. (SE) | gap to best (SE) | build s | / budget |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    rows = data["equal"]

    def cell_of(r: dict) -> tuple:  # runs before the fleet option have no device: their one profile
        return r["task"], r["budget_s"], r["seed"], r.get("device", data["profile"])

    for key in dict.fromkeys(map(cell_of, rows)):
        cell = [r for r in rows if cell_of(r) == key]
        best = max(r["accuracy"] for r in cell)
        for r in cell:
            gap = (r["accuracy"] - best) / r["se"] if r["se"] else 0.0
            out.append(
                f"| {r['task']} | {r['budget_s']:.0f}s | {key[3]} | {r['strategy']} | {r['seed']} | {r['shape']} | "
                f"{r['init']} | {r['expand_steps']} | {_steps(r)} | {r['accuracy']:.4f} ({r['se']:.4f}) | "
                f"{gap:+.1f} | {r['seconds']:.0f} | {r['ratio']:.2f} |"
            )
    out += _sharing_lines(rows)
    builds = {(r["task"], r["budget_s"], r["seed"], r["strategy"]): r for r in rows}  # a fleet build: one row a device
    ratios = [r["ratio"] for r in builds.values()]
    if ratios:
        within = sum(r <= 1.15 for r in ratios)
        out += ["", f"Builds within 1.15x their budget: {within} of {len(ratios)} (max {max(ratios):.2f}x)."]
    return "\n".join(out)


def _sharing_lines(rows: list[dict]) -> list[str]:
    """One line per device whose probes weighed another device's shape: taken (one fine-tune for both) or not,
    with the paired NLL gap."""
    out = []
    for r in rows:
        where = f"{r['task']} {r['budget_s']:.0f}s {r['strategy']} seed {r['seed']}, {r['device']}"
        if r.get("shared"):
            x = r["shared"]
            out.append(
                f"- {where}: took {x['shared']} over its own best {x['best']} (NLL {x['nll_gap']:+.4f}, SE {x['se']:.4f})"
            )
        elif (r.get("not_shared") or {}).get("considered"):
            parts = [
                f"{c['shape']} NLL {c['nll_gap']:+.4f} (SE {c['se']:.4f})"
                if "nll_gap" in c
                else f"{c['shape']} dropped"
                for c in r["not_shared"]["considered"]
            ]
            out.append(f"- {where}: kept its own best; other devices' shapes: {', '.join(parts)}")
    return ["", "Shapes weighed for sharing:", "", *out] if out else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tasks", nargs="+", default=["digits", "textures", "mnist-unseen"], help="also: photos224 (a 224-px folder)"
    )
    parser.add_argument(
        "--profile",
        default="jetson_orin",
        help="a profile, demo-fleet (profiles/demo/fleet.yaml: one build, all devices) or a fleet file "
        "(e.g. profiles/demo/fleet_all.yaml)",
    )
    parser.add_argument("--budgets", nargs="+", type=float, default=[180.0], help="seconds")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--expand-cap", type=int, default=400)
    parser.add_argument("--steps", type=int, default=100, help="fine-tuning steps of the plan part's builds")
    parser.add_argument(
        "--strategies", nargs="+", choices=tuple(STRATEGIES), default=list(STRATEGIES), metavar="STRATEGY"
    )
    parser.add_argument("--ancestry", default=None, help="the builds' --ancestry [default: the demo ancestry]")
    parser.add_argument("--parts", nargs="+", choices=("plan", "equal"), default=["plan", "equal"])
    parser.add_argument(
        "--process",
        choices=("fresh", "same"),
        default="fresh",
        help="plan part: dry run and build each in a fresh CLI process (as a user runs them), or both in this one",
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.budgets, args.steps = args.tasks[:1], [min(args.budgets[0], 120.0)], 20
    run_and_write(run, summarise, args)


if __name__ == "__main__":
    main()
