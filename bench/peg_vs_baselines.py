"""PEG vs baselines: fine-tuning speed of descendants initialised four ways.

For each descendant shape (shallower, narrower and deeper than the learngene) and downstream task
(``bench/common.py``: ``digits``, ``mnist-unseen`` and ``textures``, none seen by the demo ancestry or
its learngene), every initialisation -- ``scratch``, ``weight_selection``, ``tleg`` and ``peg`` (the
factory's default learngene: the one shipped in ``factory/assets/demo_learngene``) -- is fine-tuned
with the same recipe and step budget for several seeds; ``peg-untrained`` (the paper's sampled
mixture, tau 1, no expanding phase) can be added with ``--methods``. Reported: accuracy at fixed step
budgets (mean over seeds, plotted to PNG) and the steps each method needs to reach the scratch
model's final accuracy.

Usage:
    python bench/peg_vs_baselines.py --out bench/out            # full run (~35 min, 2 CPU cores)
    python bench/peg_vs_baselines.py --quick --out /tmp/q       # smoke run (CI), asserts nothing
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from common import TASKS, finetune_curve, load_tasks, rows_with_int_steps

from factory import DescendantShape, init_descendant, load_ancestry, sample_learngene
from factory.core.demo import load_demo_learngene

METHODS = ("scratch", "weight_selection", "tleg", "peg-untrained", "peg")


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    anc = load_ancestry("demo")
    learngenes = {"peg": load_demo_learngene(anc), "peg-untrained": sample_learngene(anc, 3, seed=0)}
    shapes = [
        DescendantShape(3, 192, 3, 4.0, 28, 7, 10),  # shallower than the ancestry, learngene depth
        DescendantShape(6, 96, 2, 2.0, 28, 7, 10),  # narrower
        DescendantShape(9, 192, 3, 4.0, 28, 7, 10),  # deeper
    ][: 1 if args.quick else 3]
    results = []
    for task, (train_set, eval_set) in load_tasks(args.tasks).items():
        for shape in shapes:
            for method in args.methods:
                for seed in range(args.seeds):
                    kind = "peg" if method.startswith("peg") else method
                    model = init_descendant(kind, shape, ancestry=anc, learngene=learngenes.get(method), seed=seed)
                    t0 = time.perf_counter()
                    curve = finetune_curve(model, train_set, eval_set, args.steps, args.eval_every, seed)
                    results.append(
                        {
                            "task": task,
                            "shape": shape.label(),
                            "method": method,
                            "seed": seed,
                            "curve": curve,
                            "seconds": round(time.perf_counter() - t0, 1),
                        }
                    )
                    print(
                        f"{task:12s} {shape.label():22s} {method:16s} seed {seed}: "
                        + " ".join(f"{k}:{v:.3f}" for k, v in curve.items()),
                        flush=True,
                    )
    lg = learngenes["peg"]
    return {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "ancestry": anc.identity(),
        "learngene": {
            "sha256": lg.sha256,
            "layers": lg.num_layers,
            "heads": lg.num_heads,
            "expanding_phase": lg.meta.get("expanding_phase"),
            "rescale": lg.meta.get("rescale"),
        },
        "results": results,
    }


def summarise(data: dict) -> str:
    """Markdown tables: accuracy at each budget (mean +- std over seeds), steps to scratch's final."""
    rows = rows_with_int_steps(data["results"])
    lines = []
    groups = sorted({(r["task"], r["shape"]) for r in rows})
    for task, shape in groups:
        sub = [r for r in rows if r["task"] == task and r["shape"] == shape]
        steps = sorted({k for r in sub for k in r["curve"]})
        lines.append(f"\n**{task}, {shape}** (accuracy, mean ± std over {len({r['seed'] for r in sub})} seeds)\n")
        lines.append("| method | " + " | ".join(f"step {s}" for s in steps) + " | steps to scratch final |")
        lines.append("|---|" + "---|" * (len(steps) + 1))
        mean_curve = {}
        for method in METHODS:
            runs = [r for r in sub if r["method"] == method]
            if not runs:
                continue
            mean_curve[method] = {s: statistics.mean(r["curve"][s] for r in runs) for s in steps}
            std = {s: statistics.pstdev(r["curve"][s] for r in runs) for s in steps}
            mean_curve[method + "_std"] = std
        target = mean_curve["scratch"][steps[-1]]
        for method in METHODS:
            if method not in mean_curve:
                continue
            reach = next((s for s in steps if mean_curve[method][s] >= target), None)
            cells = " | ".join(f"{mean_curve[method][s]:.3f} ± {mean_curve[method + '_std'][s]:.3f}" for s in steps)
            lines.append(f"| {method} | {cells} | {reach if reach is not None else '> ' + str(steps[-1])} |")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows_with_int_steps(data["results"])
    groups = sorted({(r["task"], r["shape"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, (task, shape) in zip(axes[0], groups):
        for method in METHODS:
            runs = [r for r in rows if r["task"] == task and r["shape"] == shape and r["method"] == method]
            if not runs:
                continue
            steps = sorted(runs[0]["curve"])
            mean = [statistics.mean(r["curve"][s] for r in runs) for s in steps]
            ax.plot(steps, mean, marker="o", markersize=3, label=method)
        ax.set_title(f"{task}\n{shape}", fontsize=9)
        ax.set_xlabel("fine-tuning steps")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 shape, digits, few steps, 1 seed")
    parser.add_argument(
        "--out", type=Path, default=Path("bench/out"), help="directory for the PNG (and default JSON/MD)"
    )
    parser.add_argument("--json", type=Path, default=None, help="raw results [default: OUT/peg_vs_baselines.json]")
    parser.add_argument("--md", type=Path, default=None, help="Markdown tables [default: OUT/peg_vs_baselines.md]")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=["scratch", "weight_selection", "tleg", "peg"], choices=METHODS)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if args.quick:
        args.tasks = ["digits"]
    args.steps = args.steps or (10 if args.quick else 150)
    args.eval_every = args.eval_every or (5 if args.quick else 25)
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.out.mkdir(parents=True, exist_ok=True)
    args.json = args.json or args.out / "peg_vs_baselines.json"
    args.md = args.md or args.out / "peg_vs_baselines.md"
    start = time.perf_counter()
    data = run(args)
    data["wall_seconds"] = round(time.perf_counter() - start, 1)
    args.json.write_text(json.dumps(data, indent=2, default=str))
    table = summarise(json.loads(json.dumps(data, default=str)))
    args.md.write_text(table + "\n")
    plot(json.loads(json.dumps(data, default=str)), args.out / "peg_vs_baselines.png")
    print(table)
    print(f"\nwall time {data['wall_seconds']} s")


if __name__ == "__main__":
    main()
